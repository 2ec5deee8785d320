"""The `skipit` command line: a thin typer layer over the Python API.

Every command checks its options and output paths before it loads a model (a user error is one line on stderr,
`error: ...`, exit code 2, nothing written), and a Ctrl-C keeps what is saved, says what, prints the command that
resumes, and exits 130.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from skipit.errors import SkipitError
from skipit.evaluation.run import at_least

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic `shapes` VQA/captioning data.")
app.add_typer(data_app, name="data")
console = Console()

IMAGE_PLACEHOLDER = "<image>"
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


# ---------------------------------------------------------------- checks before any work


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried, then removed: permissions, read-only mounts and root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".skipit-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _writable(path: Path, option: str) -> None:
    """The folder that will hold `path` (itself or its nearest existing parent) is a folder we can write in."""
    base = _nearest_existing(path.parent if not path.exists() else path)
    if not base.is_dir():
        raise SkipitError(f"{option} {path}: {base} is a file, not a folder")
    if not _can_write_in(base):
        raise SkipitError(f"{option} {path}: cannot write in {base} (read-only or no permission)")


def check_out_file(path: Path | None, option: str = "--out") -> None:
    """An output file path: not an existing folder, and somewhere we can write."""
    if path is None:
        return
    if path.is_dir():
        raise SkipitError(f"{option} {path} is a folder: give the path of a file to write")
    _writable(path.parent if path.exists() else path, option)


def check_out_dir(path: Path | None, option: str = "--out") -> None:
    """An output folder: an existing folder or none yet, and somewhere we can write."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise SkipitError(f"{option} {path} is a file: give a folder")
    _writable(path, option)


# ---------------------------------------------------------------- Ctrl-C


def _command_line(ctx: click.Context, drop: tuple[str, ...] = ()) -> str:
    """The command being run, rebuilt from its parsed options (those left at their default omitted)."""
    words = ["skipit", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop:
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
            continue
        default = param.default() if callable(param.default) else param.default
        if value is None or value == default or (param.multiple and list(value) == list(default or ())):
            continue
        if isinstance(value, bool):
            if value:
                words.append(param.opts[0])
            elif param.secondary_opts:
                words.append(param.secondary_opts[0])
        else:
            for v in value if param.multiple else [value]:
                words += [param.opts[0], str(v)]
    return shlex.join(words)


@contextlib.contextmanager
def _interruptible(ctx: click.Context, kept: Callable[[], str], drop: tuple[str, ...] = ()) -> Iterator[None]:
    """On Ctrl-C: one line on stderr saying what `kept()` is kept and the command that resumes; exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {kept()}; resume with: {_command_line(ctx, drop)}", file=sys.stderr, flush=True)
        raise typer.Exit(INTERRUPTED) from None


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option(help="Output folder; each split goes to OUT/SPLIT/{data.jsonl,images/}")],
    split: Annotated[list[str], typer.Option(help="Splits to write (repeatable)")] = ("train", "calibration", "test"),
    n: Annotated[int | None, typer.Option(help="Records per split (default: the split's standard size)")] = None,
    seed: int = 0,
) -> None:
    """Write the `shapes` dataset as PNG images + JSONL records."""
    from skipit.data.shapes import SPLITS, write_split

    if unknown := [s for s in split if s not in SPLITS]:
        raise SkipitError(f"unknown split {unknown[0]!r}; available: {', '.join(SPLITS)}")
    at_least(1, n=n)
    check_out_dir(out)
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

    check_out_dir(out)
    with console.status("assembling mini-llava (SmolLM2-135M + DINOv2 ViT-S/14 + projector)"):
        path = build_model(out, trained or TRAINED_FILE)
    console.print(f"mini-llava written to {path}")


@app.command("train-mini-llava")
def train_mini_llava(
    out: Annotated[Path, typer.Option(help="Where to write the trained weights (safetensors)")],
    steps: Annotated[int | None, typer.Option(help="Optimizer steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step")] = None,
    lr: Annotated[float | None, typer.Option(help="Projector learning rate")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on the LM's linear layers (0: none)")] = None,
    lora_lr: Annotated[float | None, typer.Option(help="LoRA learning rate")] = None,
    n_train: Annotated[int | None, typer.Option(help="Training scenes (features cached once)")] = None,
    align_steps: Annotated[int | None, typer.Option(help="Projector-only alignment steps before the VQA steps")] = None,
    align_weight: Annotated[float | None, typer.Option(help="Alignment loss weight next to the VQA loss")] = None,
    align_positions: Annotated[str, typer.Option(help="Align object patches to their position words too: 'row,column', "
                                                      "'column' or 'row' (levers for column questions, "
                                                      "docs/benchmarks.md)")] = "",
    captions: Annotated[bool, typer.Option(help="Train on each scene's reference caption too")] = False,
    init: Annotated[Path | None, typer.Option(help="Continue from these trained weights (safetensors) instead of "
                                                    "a random projector")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the training scenes and of the run")] = None,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """Train mini-llava's projector (+ LoRA on the LM) on `shapes`; the vision tower stays frozen.

    With no training option this reproduces the shipped weights (src/skipit/demo/mini_llava_trained.safetensors):
    the stages of `skipit.demo.train.RECIPE` in turn, each continuing from the one before. With any option, one
    stage with those settings (the rest at their defaults).
    """
    from skipit.demo.train import POSITION_WORDS, train, train_recipe
    from skipit.progress import progress

    at_least(1, steps=steps, batch_size=batch_size, n_train=n_train)
    at_least(0, lora_rank=lora_rank, align_steps=align_steps, align_weight=align_weight)
    check_out_file(out)
    positions = tuple(w.strip() for w in align_positions.split(",") if w.strip())
    if set(positions) - set(POSITION_WORDS):
        raise SkipitError(f"--align-positions {align_positions!r}: use a comma-separated subset of "
                          f"{', '.join(POSITION_WORDS)}")
    if init is not None and not init.is_file():
        raise SkipitError(f"--init {init}: no such file; pass trained weights written by `skipit train-mini-llava`")
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "lora_rank": lora_rank, "lora_lr": lora_lr,
             "n_train": n_train, "align_steps": align_steps, "align_weight": align_weight, "seed": seed,
             "init": init, "align_positions": positions or None, "captions": captions or None}
    options = {k: v for k, v in given.items() if v is not None}
    with progress("step") as bar:
        task = bar.add_task("training", total=None)

        def log(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step + 1, total=total, description=f"training (loss {loss:.3f})")

        if options:
            train(out, log=log, device=device, **options)
        else:
            train_recipe(out, log=log, device=device)
    console.print(f"trained weights written to {out}")


def speed_text(row: dict, kind: str) -> str:
    """A measured speed-up with its range over rounds, or why it is not a result (see `speed.noise`)."""
    if row.get("timed") is False:
        return f"{kind} not timed"
    if reasons := [r for r in row.get("speed_noisy", []) if kind in r]:
        return f"{kind} noisy, not a result ({'; '.join(reasons)})"
    return f"{kind} x{row[f'{kind}_speedup']:.2f} [{row[f'{kind}_speedup_low']:.2f}, {row[f'{kind}_speedup_high']:.2f}]"


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run folder (a rerun resumes from it)")] = Path("runs/demo"),
    n_test: Annotated[int, typer.Option(help="Test questions scored per plan")] = 100,
    n_calib: Annotated[int, typer.Option(help="Calibration records analysed")] = 24,
    step: Annotated[int, typer.Option(help="Layer spacing of the sweep's plan grid")] = 15,
    model: Annotated[Path | None, typer.Option(help="mini-llava folder (default: the cache)")] = None,
) -> None:
    """The whole pipeline on mini-llava, offline: build/load, analyze, plan, sweep with baselines, report."""
    import json

    from skipit.demo import pipeline

    at_least(1, n_test=n_test, n_calib=n_calib, step=step)
    check_out_dir(out)
    config = pipeline.DemoConfig(n_calib=n_calib, n_test=n_test, step=step)
    with _interruptible(ctx, lambda: f"what is finished is saved in {out}"):
        head = pipeline.run(out, config, model_path=model, console=console)
    answers = json.loads((out / "plans" / "empty.json").read_text())
    table = Table(title="mini-llava on shapes/test (first answers, no plan)")
    for col in ("question", "answer", "prediction", ""):
        table.add_column(col)
    for row in answers["predictions"][:8]:
        table.add_row(row["question"], row["answer"], row["prediction"], "✓" if row["correct"] else "✗")
    console.print(table)
    per_type = ", ".join(f"{t} {v:.2f}" for t, v in answers["per_type"].items())
    ref_ci, acc_ci, kept_ci = head["reference_accuracy_ci"], head["accuracy_ci"], head["accuracy_kept_ci"]
    console.print(f"accuracy without a plan: {head['reference_accuracy']:.3f} [{ref_ci['low']:.3f}, "
                  f"{ref_ci['high']:.3f}] on {answers['n']} test questions ({per_type})")  # fmt: skip
    console.print(
        f"[bold]skipit's plan: {head['flops_removed']:.1%} of prefill FLOPs removed, "
        f"measured {speed_text(head, 'prefill')} and {speed_text(head, 'decode')}, accuracy {head['accuracy']:.3f} "
        f"[{acc_ci['low']:.3f}, {acc_ci['high']:.3f}], {head['accuracy_kept']:.1%} kept "
        f"[{kept_ci['low']:.1%}, {kept_ci['high']:.1%}] (McNemar p = {head['mcnemar_p']:.2g})[/bold]"
    )
    console.print(f"report: {head['report']}")


@app.command("eval")
def eval_(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder (or hub id)")],
    data: Annotated[Path, typer.Option(help="JSONL file, or a folder with data.jsonl")],
    plan: Annotated[Path | None, typer.Option(help="Skip plan (JSON) to evaluate the model under")] = None,
    task: Annotated[str, typer.Option(help="vqa: exact match and VQA soft accuracy; caption: CIDEr-D")] = "vqa",
    n: Annotated[int | None, typer.Option(help="Score only the first N records")] = None,
    batch_size: int = 16,
    seed: Annotated[int, typer.Option(help="Torch seed, set before generating (decoding is greedy)")] = 0,
    blind: Annotated[bool, typer.Option(help="Blank every image: what is still right needs no vision")] = False,
    with_blind: Annotated[
        bool, typer.Option(help="Run with images and blind; also score the questions the blind run gets wrong")
    ] = False,
    measure_speed: Annotated[
        bool, typer.Option("--speed/--no-speed", help="Time prefill and decoding, and peak memory, on the first batch")
    ] = True,
    out: Annotated[Path | None, typer.Option(help="Write the full result (with every prediction) as JSON")] = None,
) -> None:
    """VQA accuracy or captioning CIDEr-D of MODEL on DATA (optionally under a skip plan), with speed and memory."""
    from skipit.evaluation.run import evaluate_model
    from skipit.io import write_json

    check_out_file(out)
    with _interruptible(ctx, lambda: "nothing was saved (eval writes its result when it has scored every record)"):
        result = evaluate_model(model, data, plan=plan, task=task, n=n, batch_size=batch_size, seed=seed, blind=blind,
                                with_blind=with_blind, measure_speed=measure_speed, progress=True,
                                status=console.status)  # fmt: skip
    title = f"{model} on {data}" + (f" under {plan}" if plan else "") + (" (blind)" if blind else "")
    PRINTERS.get(task, _print_summary)(result, title)
    if "speed" in result:
        _print_speed(result["speed"])
    if out:
        write_json(out, result)
        console.print(f"result written to {out}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print_vqa(result: dict, title: str) -> None:
    blind, needs = result.get("blind"), result.get("needs_image")
    table = Table(title=title)
    for col in ["question type", "n", "accuracy", "soft accuracy"] + (["blind", "n needing image", "accuracy on those"]
                                                                        if blind else []):  # fmt: skip
        table.add_column(col, justify="left" if col == "question type" else "right")

    def cells(t: str | None, v: dict) -> list[str]:
        row = [str(v["n"]), _fmt(v["accuracy"]), _fmt(v["soft_accuracy"])]
        if blind:
            b = blind if t is None else blind["per_type"][t]
            nv = needs if t is None else needs["per_type"].get(t, {"n": 0, "accuracy": None})
            row += [_fmt(b["accuracy"]), str(nv["n"]), _fmt(nv["accuracy"])]
        return row

    for t, v in result["per_type"].items():
        table.add_row(t, *cells(t, v))
    table.add_row("[bold]all", *(f"[bold]{c}" for c in cells(None, result)))
    console.print(table)


def _print_caption(result: dict, title: str) -> None:
    table = Table(title=f"{title}: first captions")
    for col in ("reference", "prediction", "CIDEr-D"):
        table.add_column(col, justify="right" if col == "CIDEr-D" else "left")
    for row in result["predictions"][:5]:
        table.add_row(row["references"][0], row["prediction"], f"{row['cider']:.3f}")
    console.print(table)
    console.print(f"[bold]CIDEr-D: {result['cider']:.3f}[/bold] on {result['n']} images")


def _print_summary(result: dict, title: str) -> None:
    console.print(title)
    console.print({k: v for k, v in result.items() if isinstance(v, int | float | str)})


PRINTERS = {"vqa": _print_vqa, "caption": _print_caption}  # a task without one gets its numbers printed


def _print_speed(s: dict) -> None:
    memory = "CUDA peak allocated" if s["peak_memory_kind"] == "cuda_max_allocated" else "peak resident set"
    table = Table(title=f"speed on the first batch ({s['batch']} x {s['prompt_tokens']} prompt tokens, {s['device']})")
    table.add_column(f"median of {s['repeats']} runs")
    table.add_column("", justify="right")
    for label, value in [
        ("vision encoder (once, not in prefill)", f"{s['vision_encoder_ms']:.1f} ms"),
        ("prefill", f"{s['prefill_ms']:.1f} ms"),
        ("time to first token", f"{s['first_token_ms']:.1f} ms"),
        ("decode", f"{s['decode_tokens_per_s']:.1f} tokens/s"),
        (f"KV cache after {s['new_tokens']} new tokens", f"{s['kv_cache_mib']:.2f} MiB"),
        (f"peak memory ({memory})", f"{s['peak_memory_mib']:.0f} MiB"),
    ]:
        table.add_row(label, value)
    console.print(table)


@app.command("analyze")
def analyze_(
    ctx: typer.Context,
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

    at_least(1, n=n, batch_size=batch_size, shard_every=shard_every)
    check_out_dir(out)
    records = load_records(data, limit=n)
    with distributed_from_env(), _interruptible(ctx, lambda: _shards_kept(out)):
        vlm, processor = models.load(model)
        result = analyze(vlm, processor, records, batch_size=batch_size, ablation=ablation, seed=seed, run_dir=out,
                         shard_every=shard_every, model_path=model, data_path=str(data), progress=True)
    if result is not None:
        console.print(f"analysis of {len(records)} records written to {out / 'analysis.json'}")


def _shards_kept(run_dir: Path) -> str:
    from skipit.analysis import load_shard

    shards = sorted((run_dir / "shards").glob("*.safetensors"))
    if not shards:
        return "nothing was saved yet (statistics are saved every --shard-every batches)"
    done = sum(load_shard(path)[0]["done"] for path in shards)
    return f"the statistics of {done} records are saved in {run_dir / 'shards'}"


@app.command("plan")
def plan_(
    analysis: Annotated[Path, typer.Argument(help="RUN_DIR of skipit analyze, or its analysis.json")],
    out: Annotated[Path | None, typer.Option(help="Plan file to write [default: RUN_DIR/plan.json]")] = None,
    budget: Annotated[float | None, typer.Option(help="Fraction of prefill FLOPs to remove, cheapest first")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Geometric: mean rho below this [0.015]")] = None,
    delta: Annotated[float | None, typer.Option(help="Proximal: rho above this ... [0.05]")] = None,
    eta: Annotated[float | None, typer.Option(help="... for less than this fraction of tokens [0.1]")] = None,
    tau: Annotated[float | None, typer.Option(help="Attention: text's share on vision keys below this [0.1]")] = None,
    mode: Annotated[str | None, typer.Option(help="Late entry mode: absent or frozen [whichever saves more]")] = None,
    freeze_vision: Annotated[bool, typer.Option(help="Also freeze vision tokens in redundant layers in k..m")] = False,
    functional: Annotated[bool, typer.Option(
        help="Freeze vision tokens where ablation KL is lowest, summed under kappa (analyze --ablation)")] = False,
    kappa: Annotated[float | None, typer.Option(
        help="Functional: summed ablation KL under this; composed: held-out KL at most this (nats) [0.02]")] = None,
    composed: Annotated[bool, typer.Option(
        help="Run the model: add decisions by measured KL per FLOP, check the plan on held-out records")] = False,
    model: Annotated[str | None, typer.Option(help="Composed: model folder (default: the analysed model)")] = None,
    calib: Annotated[Path | None, typer.Option(
        help="Composed: calibration records (default: the analysis's data)")] = None,
    n_score: Annotated[int | None, typer.Option(help="Composed: records that rank the decisions [16]")] = None,
    n_heldout: Annotated[int | None, typer.Option(help="Composed: held-out records that check the plan [16]")] = None,
    beam: Annotated[int | None, typer.Option(help="Composed: plans kept at each step [1: greedy]")] = None,
    shortlist: Annotated[int | None, typer.Option(help="Composed: best-ranked decisions tried per step [6]")] = None,
    step: Annotated[int | None, typer.Option(
        help="Composed: layer spacing of exits, entries, pruning (default: about layers / 8)")] = None,
    kl_tokens: Annotated[int | None, typer.Option(
        help="Composed: the KL is the mean over the first T tokens of the untouched model's greedy reply [1: the "
             "answer token]")] = None,
    kl_prompt: Annotated[str | None, typer.Option(
        help="Composed: what the calibration records are asked: question (their VQA question) or caption "
             "[question]")] = None,
) -> None:
    """Turn an analysis into a skip plan: the widest bands whose layers all meet the conditions (or, with
    --composed, the decisions measured to cost the least KL per FLOP removed)."""
    from dataclasses import replace

    from skipit.analysis import Analysis
    from skipit.planner import Thresholds, make_plan

    check_out_file(out)
    if budget is not None and not 0 < budget < 1:
        raise SkipitError(f"--budget is a fraction of the prefill FLOPs between 0 and 1, got {budget:g}")
    search = {"n_score": n_score, "n_heldout": n_heldout, "beam": beam, "shortlist": shortlist, "step": step}
    if composed:
        conditions = {"--functional": functional, "--freeze-vision": freeze_vision, "--mode": mode,
                      "--epsilon": epsilon, "--delta": delta, "--eta": eta, "--tau": tau}  # fmt: skip
        if given := [name for name, value in conditions.items() if value not in (None, False)]:
            raise SkipitError(f"--composed measures every decision on the model; it does not take {given[0]} "
                              "(give --budget or --kappa)")  # fmt: skip
        if budget is not None and kappa is not None:
            raise SkipitError("--composed takes one of --budget (the FLOPs to remove) and --kappa (the KL allowed)")
        if kappa is not None and not kappa > 0:
            raise SkipitError(f"--kappa is the held-out KL allowed, in nats, above 0; got {kappa:g}")
        at_least(1, **search)
        from skipit.composer import check_kl

        check_kl(kl_tokens or 1, kl_prompt or "question")
        search |= {"tokens": kl_tokens, "prompt": kl_prompt}
    elif given := [name for name, value in {"model": model, "calib": calib, **search, "kl_tokens": kl_tokens,
                                            "kl_prompt": kl_prompt}.items() if value is not None]:  # fmt: skip
        raise SkipitError(f"--{given[0].replace('_', '-')} goes with --composed")
    result = Analysis.load(analysis).result
    given = {"epsilon": epsilon, "delta": delta, "eta": eta, "tau": tau, "kappa": kappa}
    thresholds = replace(Thresholds(), **{k: v for k, v in given.items() if v is not None})
    if composed:
        from skipit.composer import N_HELDOUT, N_SCORE
        from skipit.data.jsonl import load_records
        from skipit.evaluation.run import load_vlm

        model = model or result.model.path
        calib = calib or (Path(result.data.path) if result.data.path else None)
        if model is None or calib is None:
            missing = "--model" if model is None else "--calib"
            raise SkipitError(f"the analysis does not say where its {missing[2:]} is: give {missing}")
        records = load_records(calib, limit=(n_score or N_SCORE) + (n_heldout or N_HELDOUT))
        vlm, processor = load_vlm(model)
        with console.status(f"measuring plans on {len(records)} calibration records"):
            plan = make_plan(result, thresholds, budget=budget, composed=True, model=vlm, processor=processor,
                             calib=records, compose_options={k: v for k, v in search.items() if v is not None})
    else:
        plan = make_plan(result, thresholds, budget=budget, mode=mode, freeze_vision=freeze_vision,
                         functional=functional)  # fmt: skip
    out = out or (analysis if analysis.is_dir() else analysis.parent) / "plan.json"
    check_out_file(out)
    plan.save(out)
    _print_plan(plan)
    if composed:
        ev, kl = plan.evidence, plan.evidence["kl"]
        decisions = ", ".join(d["name"] for d in ev["decisions"]) or "none"
        console.print(f"composed of: {decisions}; held-out KL {kl['value']:.4g} [{kl['low']:.4g}, {kl['high']:.4g}] "
                      f"nats on {len(ev['calibration']['heldout'])} records, {ev['flops_removed']:.1%} of prefill "
                      f"FLOPs removed ({sum(ev['search']['plans_measured'].values())} plans measured in "
                      f"{ev['search']['seconds']:.0f} s)")  # fmt: skip
    console.print(f"plan written to {out}")


def _print_plan(plan) -> None:
    p = plan.evidence.get("predicted", {})
    vision = f"enter at layer {plan.late_entry} ({plan.late_entry_mode})" if plan.late_entry else "enter at layer 0"
    vision += f", exit after layer {plan.early_exit}" if plan.early_exit is not None else ", stay to the end"
    table = Table(title=f"skip plan ({plan.num_layers} layers)", show_header=False)
    table.add_row("vision tokens", vision)
    table.add_row("frozen vision layers", ", ".join(map(str, plan.frozen_vision_layers)) or "none")
    table.add_row("skipped layers", ", ".join(map(str, plan.skip_layers)) or "none")
    if p:
        table.add_row("predicted", f"{p['flops_removed']:.1%} of prefill FLOPs removed; prefill x{p['prefill']:.2f}, "
                                   f"decode x{p['decode']:.2f}, KV cache x{p['kv_memory']:.2f}")  # fmt: skip
    console.print(table)


@app.command()
def sweep(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model folder (Hugging Face format)")],
    data: Annotated[Path, typer.Option(help="Scored VQA records (JSONL file or folder)")],
    out: Annotated[Path, typer.Option(help="Sweep folder (resumes from what it holds)")],
    analysis: Annotated[Path | None, typer.Option(help="Analysis of the model: predictions and baselines")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration records (composed plans, baselines)")] = None,
    n: Annotated[int | None, typer.Option(
        help="Records to score per plan [default: all; shapes' 1200 test questions detect a 2-point loss]")] = None,
    step: Annotated[int, typer.Option(help="Layer spacing of the plan grid")] = 3,
    budgets: Annotated[str, typer.Option(help="FLOPs budgets, skipit vs baselines (comma-separated)")] = "0.1,0.2,0.3",
    methods: Annotated[str | None, typer.Option(help="Baselines (comma-separated) [default: all]")] = None,
    n_calib: Annotated[int, typer.Option(
        help="How many of them (the composed planner ranks with the first half, checks with the second)")] = 32,
    batch_size: int = 16,
    repeats: Annotated[int, typer.Option(help="Speed measurement rounds per plan")] = 3,
    restart: Annotated[bool, typer.Option(help="Discard the results saved in OUT (else: resume)")] = False,
    time_grid: Annotated[bool, typer.Option(help="Time the grid's plans too (else: their accuracy and ideal "
                                                  "speed-ups only)")] = True,
    captions: Annotated[int | None, typer.Option(
        help="Also caption the first N distinct images under the untouched model and every plan compared at a "
             "budget: CIDEr-D kept, with paired intervals (needs --analysis and records with a caption)")] = None,
    kl_tokens: Annotated[int, typer.Option(
        help="skipit's composed plans: KL over the first T tokens of the untouched model's greedy reply")] = 1,
    kl_prompt: Annotated[str, typer.Option(
        help="skipit's composed plans: the calibration records are asked their question or for a caption"),
    ] = "question",
) -> None:
    """Many plans on one benchmark: accuracy, FLOPs, speed; predicted vs measured; baselines at matched FLOPs."""
    from skipit.evaluation.run import sweep_model

    check_out_dir(out)
    with _interruptible(ctx, lambda: _plans_kept(out), drop=("restart",)):
        summary = sweep_model(model, data, out, analysis=analysis, calib=calib, n=n, step=step, budgets=budgets,
                              methods=methods, n_calib=n_calib, batch_size=batch_size, repeats=repeats,
                              restart=restart, time_grid=time_grid, captions=captions, kl_tokens=kl_tokens,
                              kl_prompt=kl_prompt, progress=True)  # fmt: skip
    _print_sweep(summary)
    console.print(f"sweep written to {out / 'sweep.json'}")


def _plans_kept(run_dir: Path) -> str:
    saved = sorted((run_dir / "plans").glob("*.json"))
    return f"{len(saved)} measured plans are saved in {run_dir / 'plans'}" if saved else "no plan was finished yet"


def _print_sweep(summary: dict) -> None:
    table = Table(title=f"plans (reference accuracy {summary['reference']['accuracy']:.3f})")
    for col in ("plan", "accuracy", "drop (pts)", "FLOPs removed", "prefill x", "ideal x", "decode x", "safe"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in summary["plans"]:
        safe = "" if "safe" not in r else ("yes" if r["safe"] else "no")
        measured = [("–" if r[k] is None else f"{r[k]:.2f}") for k in ("prefill_speedup", "decode_speedup")]
        table.add_row(r["name"], f"{r['accuracy']:.3f}", f"{r['accuracy_drop']:+.1f}", f"{r['flops_removed']:.1%}",
                      measured[0], f"{r['ideal_prefill_speedup']:.2f}", measured[1], safe)  # fmt: skip
    console.print(table)
    if "correlation" in summary:
        corr = Table(title="Spearman: predicted damage vs measured accuracy drop (grid plans)")
        for col in ("measure", "rho", "95% CI", "plans"):
            corr.add_column(col)
        for m, c in summary["correlation"].items():
            ci = f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else "n/a"
            corr.add_row(m, f"{c['spearman']:.2f}", ci, str(c["n"]))
        console.print(corr)
        lost = summary["safe_but_lost"]
        console.print(f"called safe but lost > {summary['lost_points']:g} points: {', '.join(lost) or 'none'}")
    if cuts := [c for c in summary.get("largest_cut_kept", []) if c["flops_removed"] is not None]:
        ranked = sorted(cuts, key=lambda c: -c["flops_removed"])
        console.print(f"largest cut keeping {cuts[0]['level']:.0%} of the accuracy (of the budgets tried): "
                      + ", ".join(f"{c['method']} {c['flops_removed']:.1%}" for c in ranked))
    if "captions" in summary:
        c = summary["captions"]
        table = Table(title=f"captioning under the compared plans: CIDEr-D on {c['n_images']} images (untouched "
                            f"{c['reference']['cider']:.3f})")  # fmt: skip
        for col in ("budget", "method", "FLOPs removed", "CIDEr-D", "kept", "skipit's gain [95% CI]"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in c["rows"]:
            g = r.get("skipit_gain")
            gain = f"{g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "–"
            kept = "–" if r["cider_kept"] is None else f"{r['cider_kept']:.1%}"
            table.add_row(f"{r['budget']:g}", r["method"], f"{r['flops_removed']:.1%}", f"{r['cider']:.3f}", kept, gain)
        console.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder: analysis.json (required), plan.json, sweep.json")],
) -> None:
    """Write RUN_DIR/report.html: measures with the plan's bands, VAR, plan, predicted vs measured, speed, baselines.

    One file with every chart inline (SVG): it opens offline, in any browser. A section whose input is missing
    (no plan or no sweep yet) says so instead of showing a chart.
    """
    from skipit.report import load_run, save_report

    run = load_run(run_dir)
    path = save_report(run)
    console.print(f"report written to {path}")
    for note in run.notes.values():
        console.print(f"[dim]{note}[/dim]", highlight=False)


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

    from skipit.evaluation.run import load_plan, load_vlm
    from skipit.prompts import chat_inputs, load_image

    at_least(1, max_new_tokens=max_new_tokens)
    if temperature <= 0:
        raise SkipitError(f"--temperature must be positive, got {temperature:g}")
    _no_placeholder(prompt, IMAGE_PLACEHOLDER)
    skip, picture = load_plan(plan), load_image(image)
    vlm, processor = load_vlm(model, skip)
    _no_placeholder(prompt, getattr(processor, "image_token", None))
    inputs = chat_inputs(processor, [picture], [prompt])
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    new = out[:, inputs["input_ids"].shape[1]:]
    typer.echo(processor.batch_decode(new, skip_special_tokens=True)[0].strip())


def _no_placeholder(prompt: str, placeholder: str | None) -> None:
    if placeholder and placeholder in prompt:
        raise SkipitError(f"--prompt contains the image placeholder {placeholder!r}: skipit puts the image in the "
                          "prompt itself, give the text only")  # fmt: skip


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
    from skipit.evaluation import speed
    from skipit.evaluation.run import bench_plan
    from skipit.io import write_json

    check_out_file(out)
    result = bench_plan(model, plan, data=data, image=image, prompt=prompt, batch_size=batch_size,
                        new_tokens=new_tokens, repeats=repeats, status=console.status)  # fmt: skip
    rows = result["rows"]
    table = Table(title=f"{plan}: batch {batch_size}, {result['prompt_tokens']} prompt tokens")
    table.add_column("")  # one row per measure: fits a terminal
    for row in rows:
        table.add_column(row["config"], justify="right")
    cells = [speed.format_cells(row) for row in rows]
    for i, (_, header, _) in enumerate(speed.COLUMNS[1:], 1):
        table.add_row(header, *(c[i] for c in cells))
    console.print(table)
    console.print(f"vision encoder: {1e3 * result['vision_encoder_s']:.0f} ms (not in the prefill times); medians of "
                  f"{repeats} rounds")  # fmt: skip
    if out:
        write_json(out, {k: result[k] for k in ("model", "plan", "batch_size", "rows")})
        console.print(f"rows written to {out}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()  # typer itself reports usage errors (exit 2)
    except SkipitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
