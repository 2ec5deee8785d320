"""The `skipit` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from skipit.errors import SkipitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic `shapes` VQA/captioning data.")
app.add_typer(data_app, name="data")
console = Console()


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Output folder; each split goes to OUT/SPLIT/{data.jsonl,images/}")],
    split: Annotated[list[str], typer.Option(help="Splits to write (repeatable)")] = ("train", "calibration", "test"),
    n: Annotated[int | None, typer.Option(help="Records per split (default: the split's standard size)")] = None,
    seed: int = 0,
) -> None:
    """Write the `shapes` dataset as PNG images + JSONL records."""
    from skipit.data.shapes import write_split

    for s in split:
        path = write_split(out, s, n, seed)
        console.print(f"wrote {path}")


@app.command()
def build(
    out: Annotated[Path | None, typer.Option(help="Folder to write mini-llava to (default: the cache)")] = None,
    projector: Annotated[Path | None, typer.Option(help="Projector weights (default: the packaged ones)")] = None,
) -> None:
    """Assemble mini-llava from the packaged pretrained parts and write it in Hugging Face format."""
    from skipit.demo.build import PROJECTOR_FILE
    from skipit.demo.build import build as build_model

    with console.status("assembling mini-llava (SmolLM2-135M + DINOv2 ViT-S/14 + projector)"):
        path = build_model(out, projector or PROJECTOR_FILE)
    console.print(f"mini-llava written to {path}")


@app.command("train-projector")
def train_projector(
    out: Annotated[Path, typer.Option(help="Where to write the projector weights (safetensors)")],
    steps: int = 450,
    batch_size: int = 16,
    lr: float = 1e-3,
    n_train: int = 6000,
    seed: int = 0,
) -> None:
    """Train mini-llava's projector on `shapes` (vision tower and language model frozen)."""
    from skipit.demo.train import train_projector as train
    from skipit.progress import progress

    with progress("step") as bar:
        task = bar.add_task("training projector", total=steps)

        def log(step: int, loss: float) -> None:
            bar.update(task, advance=1, description=f"training projector (loss {loss:.3f})")

        train(out, steps=steps, batch_size=batch_size, lr=lr, n_train=n_train, seed=seed, log=log)
    console.print(f"projector written to {out}")


@app.command()
def demo(
    n: Annotated[int, typer.Option(help="Test questions to score")] = 200,
    batch_size: int = 16,
    model: Annotated[Path | None, typer.Option(help="mini-llava folder (default: the cache)")] = None,
) -> None:
    """Build (first run) or load mini-llava, show a few answers and its `shapes` test accuracy."""
    from skipit import models
    from skipit.data.jsonl import load_records
    from skipit.demo.build import cache_dir, ensure_built
    from skipit.evaluation import vqa
    from skipit.progress import progress

    with console.status("building mini-llava and the shapes test split (first run only)"):
        path = model or ensure_built()
        data = ensure_shapes(cache_dir() / "shapes", "test")
    vlm, processor = models.load(path)
    records = load_records(data, limit=n)
    with progress("q") as bar:
        task = bar.add_task("answering shapes/test", total=len(records))
        result = vqa.evaluate(vlm, processor, records, batch_size, on_batch=lambda k: bar.advance(task, k))
    table = Table(title="mini-llava on shapes/test (first answers)")
    for col in ("question", "answer", "prediction", ""):
        table.add_column(col)
    for row in result["predictions"][:8]:
        table.add_row(row["question"], row["answer"], row["prediction"], "✓" if row["correct"] else "✗")
    console.print(table)
    per_type = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in result["per_type"].items())
    console.print(f"per type: {per_type}")
    console.print(f"[bold]accuracy: {result['accuracy']:.3f}[/bold] on {result['n']} test questions ({path})")


def ensure_shapes(root: Path, split: str) -> Path:
    """The standard `shapes` split under `root`, generated on first use."""
    from skipit.data.shapes import write_split

    path = root / split / "data.jsonl"
    return path if path.is_file() else write_split(root, split)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()  # typer itself reports usage errors (exit 2)
    except SkipitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
