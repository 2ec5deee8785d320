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
    trained: Annotated[Path | None, typer.Option(help="Trained weights (default: the packaged ones)")] = None,
) -> None:
    """Assemble mini-llava from the packaged pretrained parts and write it in Hugging Face format."""
    from skipit.demo.build import TRAINED_FILE
    from skipit.demo.build import build as build_model

    with console.status("assembling mini-llava (SmolLM2-135M + DINOv2 ViT-S/14 + projector)"):
        path = build_model(out, trained or TRAINED_FILE)
    console.print(f"mini-llava written to {path}")


@app.command("train-mini-llava")
def train_mini_llava(
    out: Annotated[Path, typer.Option(help="Where to write the trained weights (safetensors)")],
    steps: Annotated[int | None, typer.Option(help="Optimizer steps [default: the shipped weights' setting]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step")] = None,
    lr: Annotated[float | None, typer.Option(help="Projector learning rate")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on the LM's linear layers (0: none)")] = None,
    lora_lr: Annotated[float | None, typer.Option(help="LoRA learning rate")] = None,
    n_train: Annotated[int | None, typer.Option(help="Training scenes (features cached once)")] = None,
    seed: int = 0,
) -> None:
    """Train mini-llava's projector (+ LoRA on the LM) on `shapes`; the vision tower stays frozen.

    With no options this reproduces the shipped weights (src/skipit/demo/mini_llava_trained.safetensors).
    """
    from skipit.demo.train import train
    from skipit.progress import progress

    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "lora_rank": lora_rank, "lora_lr": lora_lr,
             "n_train": n_train}
    options = {k: v for k, v in given.items() if v is not None}
    with progress("step") as bar:
        task = bar.add_task("training", total=steps)

        def log(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step + 1, total=total, description=f"training (loss {loss:.3f})")

        train(out, seed=seed, log=log, **options)
    console.print(f"trained weights written to {out}")


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


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id)")],
    data: Annotated[Path, typer.Option(help="JSONL file, or a folder with data.jsonl")],
    n: Annotated[int | None, typer.Option(help="Score only the first N records")] = None,
    batch_size: int = 16,
    blind: Annotated[bool, typer.Option(help="Blank every image: what is still right needs no vision")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the full result (with every prediction) as JSON")] = None,
) -> None:
    """VQA exact-match accuracy of MODEL on DATA (overall and per question type)."""
    from skipit import models
    from skipit.data.jsonl import load_records
    from skipit.evaluation import vqa
    from skipit.io import write_json
    from skipit.progress import progress

    records = load_records(data, limit=n)
    vlm, processor = models.load(model)
    with progress("q") as bar:
        task = bar.add_task("answering" + (" (blind)" if blind else ""), total=len(records))
        result = vqa.evaluate(vlm, processor, records, batch_size, blind=blind, on_batch=lambda k: bar.advance(task, k))
    table = Table(title=f"{model} on {data}" + (" (blind)" if blind else ""))
    table.add_column("question type")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for t, v in result["per_type"].items():
        table.add_row(t, str(v["n"]), f"{v['accuracy']:.3f}")
    table.add_row("[bold]all", str(result["n"]), f"[bold]{result['accuracy']:.3f}")
    console.print(table)
    if out:
        write_json(out, {"model": str(model), "data": str(data), "blind": blind, **result})
        console.print(f"result written to {out}")


@app.command("analyze")
def analyze_(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id)")],
    data: Annotated[Path, typer.Option(help="Calibration data: JSONL file, or a folder with data.jsonl")],
    out: Annotated[Path, typer.Option(help="Run folder: analysis.json, one PNG per measure, shards/ to resume")],
    n: Annotated[int | None, typer.Option(help="Use only the first N records")] = None,
    batch_size: int = 8,
    ablation: Annotated[bool, typer.Option(help="Also ablation KL + Lipschitz (2 more forwards per layer)")] = False,
    seed: int = 0,
    shard_every: Annotated[int, typer.Option(help="Save the statistics every N batches (resume point)")] = 10,
) -> None:
    """Per-layer, per-modality redundancy of MODEL on unlabelled calibration DATA (runs under torchrun too)."""
    from skipit import models
    from skipit.analysis import analyze, distributed_from_env
    from skipit.data.jsonl import load_records

    records = load_records(data, limit=n)
    vlm, processor = models.load(model)
    with distributed_from_env():
        result = analyze(vlm, processor, records, batch_size=batch_size, ablation=ablation, seed=seed, run_dir=out,
                         shard_every=shard_every, model_path=model, data_path=str(data), progress=True)
    if result is not None:
        console.print(f"analysis of {len(records)} records written to {out / 'analysis.json'}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id)")],
    image: Annotated[Path, typer.Option(help="Image file")],
    prompt: Annotated[str, typer.Option(help="What to ask or say about the image")],
    plan: Annotated[Path | None, typer.Option(help="Skip plan (JSON) to apply")] = None,
    max_new_tokens: int = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample)")] = 1.0,
    seed: int = 0,
) -> None:
    """Generate MODEL's reply to PROMPT about IMAGE, optionally under a skip plan; prints the text only."""
    import torch

    from skipit.evaluation.speed import chat_inputs, load_image

    skip, picture = _load_plan(plan), load_image(image)
    vlm, processor = _load_vlm(model, skip)
    inputs = chat_inputs(processor, [picture], [prompt])
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    new = out[:, inputs["input_ids"].shape[1]:]
    typer.echo(processor.batch_decode(new, skip_special_tokens=True)[0].strip())


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="Model folder (or hub id)")],
    plan: Annotated[Path, typer.Option(help="Skip plan (JSON) to measure")],
    data: Annotated[Path | None, typer.Option(help="JSONL file (or folder): images and questions")] = None,
    image: Annotated[Path | None, typer.Option(help="One image, used for every row (instead of --data)")] = None,
    prompt: Annotated[str, typer.Option(help="Prompt for --image")] = "Describe the image.",
    batch_size: int = 1,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per row (decode speed)")] = 16,
    repeats: Annotated[int, typer.Option(help="Rounds measured (medians are reported)")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write the rows as JSON")] = None,
) -> None:
    """Speed of MODEL under PLAN against the untouched model: prefill, decode tokens/s, KV cache, FLOPs."""
    from skipit.data.jsonl import load_records
    from skipit.evaluation import speed
    from skipit.io import write_json

    if (data is None) == (image is None):
        raise SkipitError("give either --data or --image")
    skip = _load_plan(plan)
    if image is not None:
        images, prompts = [speed.load_image(image)] * batch_size, [prompt] * batch_size
    else:
        records = load_records(data, limit=batch_size)
        records = [records[i % len(records)] for i in range(batch_size)]
        images, prompts = [r.load_image() for r in records], [r.question for r in records]
    vlm, processor = _load_vlm(model, None)
    skip.check(vlm)
    encoded, encode_s = speed.encode_images(vlm, speed.chat_inputs(processor, images, prompts))
    configs = {"untouched": None, "plan": skip}
    with console.status(f"measuring {repeats} rounds"):
        runs = speed.compare(vlm, encoded, configs, new_tokens=new_tokens, repeats=repeats)
    rows = speed.speed_rows(vlm, encoded, configs, runs, new_tokens)
    table = Table(title=f"{plan}: batch {batch_size}, {encoded['input_ids'].shape[1]} prompt tokens")
    table.add_column("")  # one row per measure: fits a terminal
    for row in rows:
        table.add_column(row["config"], justify="right")
    cells = [speed.format_cells(row) for row in rows]
    for i, (_, header, _) in enumerate(speed.COLUMNS[1:], 1):
        table.add_row(header, *(c[i] for c in cells))
    console.print(table)
    console.print(f"vision encoder: {1e3 * encode_s:.0f} ms (not in the prefill times); medians of {repeats} rounds")
    if out:
        write_json(out, {"model": model, "plan": str(plan), "batch_size": batch_size, "rows": rows})
        console.print(f"rows written to {out}")


def _load_plan(path: Path | None):
    from skipit.plan import Plan

    return Plan.load(path) if path is not None else None


def _load_vlm(path: str, plan):
    """(model, processor) of a vision-language model, with `plan` applied if given."""
    from skipit import models
    from skipit.skipping import apply_plan

    model, processor = models.load(path)
    if not hasattr(processor, "image_processor"):
        raise SkipitError(f"{path} is not a vision-language model: this command needs an image input")
    if plan is not None:
        apply_plan(model, plan)
    return model, processor

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
