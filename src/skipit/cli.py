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
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, cuda:1, ...")] = "cpu",
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

        train(out, seed=seed, log=log, device=device, **options)
    console.print(f"trained weights written to {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder (a rerun resumes from it)")] = Path("runs/demo"),
    n_test: Annotated[int, typer.Option(help="Test questions scored per plan")] = 100,
    n_calib: Annotated[int, typer.Option(help="Calibration records analysed")] = 32,
    step: Annotated[int, typer.Option(help="Layer spacing of the sweep's plan grid")] = 15,
    model: Annotated[Path | None, typer.Option(help="mini-llava folder (default: the cache)")] = None,
) -> None:
    """The whole pipeline on mini-llava, offline: build/load, analyze, plan, sweep with baselines, report."""
    import json

    from skipit.demo import pipeline

    config = pipeline.DemoConfig(n_calib=n_calib, n_test=n_test, step=step)
    head = pipeline.run(out, config, model_path=model, console=console)
    answers = json.loads((out / "plans" / "empty.json").read_text())
    table = Table(title="mini-llava on shapes/test (first answers, no plan)")
    for col in ("question", "answer", "prediction", ""):
        table.add_column(col)
    for row in answers["predictions"][:8]:
        table.add_row(row["question"], row["answer"], row["prediction"], "✓" if row["correct"] else "✗")
    console.print(table)
    per_type = ", ".join(f"{t} {v:.2f}" for t, v in answers["per_type"].items())
    console.print(f"accuracy without a plan: {head['reference_accuracy']:.3f} on {answers['n']} test questions "
                  f"({per_type})")  # fmt: skip
    console.print(
        f"[bold]skipit's plan: {head['flops_removed']:.1%} of FLOPs removed, prefill x{head['prefill_speedup']:.2f} "
        f"and decode x{head['decode_speedup']:.2f} measured, accuracy {head['accuracy']:.3f} "
        f"({head['accuracy_kept']:.1%} kept)[/bold]"
    )
    console.print(f"report: {head['report']}")


EVAL_TASKS = ("vqa", "caption")


@app.command("eval")
def eval_(
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
    import torch

    from skipit.analysis import _versions
    from skipit.data.jsonl import load_records
    from skipit.evaluation import caption, vqa
    from skipit.io import write_json

    if task not in EVAL_TASKS:
        raise SkipitError(f"unknown task {task!r}: choose one of {', '.join(EVAL_TASKS)}")
    if task != "vqa" and (blind or with_blind):
        raise SkipitError("--blind and --with-blind score answers to questions: use them with --task vqa")
    if blind and with_blind:
        raise SkipitError("--with-blind already runs blind: give one of --blind and --with-blind")
    records = load_records(data, limit=n)
    (vqa if task == "vqa" else caption).check_scorable(records)  # before the slow model load
    skip = _load_plan(plan)
    vlm, processor = _load_vlm(model, skip)
    torch.manual_seed(seed)
    if task == "vqa":
        result = _eval_vqa(vlm, processor, records, batch_size, blind, with_blind)
    else:
        result = _eval_caption(vlm, processor, records, batch_size)
    title = f"{model} on {data}" + (f" under {plan}" if plan else "") + (" (blind)" if blind else "")
    (_print_vqa if task == "vqa" else _print_caption)(result, title)
    if measure_speed:
        result["speed"] = _eval_speed(vlm, processor, records, batch_size, task)
        _print_speed(result["speed"])
    if out:
        config = {"model": str(model), "plan": None if skip is None else skip.to_dict(),
                  "plan_path": None if plan is None else str(plan), "data": str(data), "n": n,
                  "n_records": len(records), "seed": seed, "batch_size": batch_size, "task": task, "blind": blind,
                  "with_blind": with_blind, "versions": _versions()}  # fmt: skip
        write_json(out, {"config": config, **result})
        console.print(f"result written to {out}")


def _eval_vqa(vlm, processor, records, batch_size: int, blind: bool, with_blind: bool) -> dict:
    from skipit.evaluation import vqa
    from skipit.progress import progress

    runs = {}
    with progress("q") as bar:
        for name in ["blind"] if blind else ["image", "blind"] if with_blind else ["image"]:
            task = bar.add_task("answering" + (" (blind)" if name == "blind" else ""), total=len(records))
            runs[name] = vqa.evaluate(vlm, processor, records, batch_size, blind=name == "blind",
                                      on_batch=lambda k, t=task: bar.advance(t, k))  # fmt: skip
    if not with_blind:
        return next(iter(runs.values()))
    return {**runs["image"], "blind": runs["blind"], "needs_image": vqa.needs_image(runs["image"], runs["blind"])}


def _eval_caption(vlm, processor, records, batch_size: int) -> dict:
    from skipit.evaluation import caption
    from skipit.progress import progress

    with progress("img") as bar:
        task = bar.add_task("captioning", total=len(caption.by_image(records)))
        return caption.evaluate(vlm, processor, records, batch_size, on_batch=lambda k: bar.advance(task, k))


def _eval_speed(vlm, processor, records, batch_size: int, task: str) -> dict:
    """Speed on the first batch of the evaluation's own prompts (real images, also for blind runs)."""
    from skipit.evaluation import caption, vqa

    if task == "vqa":
        batch = records[:batch_size]
        texts = [vqa.prompt_text(processor, r.question) for r in batch]
    else:
        batch = [rec for rec, _ in caption.by_image(records)[:batch_size]]
        texts = [caption.prompt_text(processor)] * len(batch)
    with console.status(f"measuring speed on a batch of {len(batch)}"):
        return vqa.measure_speed(vlm, processor, [r.load_image() for r in batch], texts)


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
    kappa: Annotated[float | None, typer.Option(help="Functional: summed ablation KL under this (nats) [0.02]")] = None,
) -> None:
    """Turn an analysis into a skip plan: the widest bands whose layers all meet the conditions."""
    from dataclasses import replace

    from skipit.analysis import Analysis
    from skipit.planner import Thresholds, make_plan

    result = Analysis.load(analysis).result
    given = {"epsilon": epsilon, "delta": delta, "eta": eta, "tau": tau, "kappa": kappa}
    thresholds = replace(Thresholds(), **{k: v for k, v in given.items() if v is not None})
    plan = make_plan(result, thresholds, budget=budget, mode=mode, freeze_vision=freeze_vision, functional=functional)
    out = out or (analysis if analysis.is_dir() else analysis.parent) / "plan.json"
    plan.save(out)
    _print_plan(plan)
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
    model: Annotated[str, typer.Argument(help="Model folder (Hugging Face format)")],
    data: Annotated[Path, typer.Option(help="Scored VQA records (JSONL file or folder)")],
    out: Annotated[Path, typer.Option(help="Sweep folder (resumes from what it holds)")],
    analysis: Annotated[Path | None, typer.Option(help="Analysis of the model: predictions and baselines")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration records for VTW / ShortV / Gromov")] = None,
    n: Annotated[int, typer.Option(help="Records to score per plan")] = 150,
    step: Annotated[int, typer.Option(help="Layer spacing of the plan grid")] = 3,
    budgets: Annotated[str, typer.Option(help="FLOPs budgets, skipit vs baselines (comma-separated)")] = "0.1,0.2,0.3",
    methods: Annotated[str | None, typer.Option(help="Baselines (comma-separated) [default: all]")] = None,
    n_calib: Annotated[int, typer.Option(help="Calibration records the baselines use")] = 20,
    batch_size: int = 16,
    repeats: Annotated[int, typer.Option(help="Speed measurement rounds per plan")] = 3,
) -> None:
    """Many plans on one benchmark: accuracy, FLOPs, speed; predicted vs measured; baselines at matched FLOPs."""
    from skipit import baselines as baselines_mod
    from skipit.analysis import Analysis
    from skipit.data.jsonl import load_records
    from skipit.evaluation import sweep as sweep_mod
    from skipit.progress import progress

    vlm, processor = _load_vlm(model, None)
    records = load_records(data, limit=n)
    result = Analysis.load(analysis).result if analysis else None
    plans, encoded = sweep_mod.grid(vlm, step), None
    if result is not None:
        chosen = baselines_mod.METHODS if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
        if unknown := [m for m in chosen if m not in baselines_mod.METHODS]:
            raise SkipitError(f"unknown baselines {unknown}; choose from {', '.join(baselines_mod.METHODS)}")
        try:
            levels = [float(b) for b in budgets.split(",") if b.strip()]
        except ValueError:
            raise SkipitError(f"budgets must be comma-separated fractions, got {budgets!r}") from None
        calib_records = load_records(calib, limit=n_calib) if calib else records[:n_calib]
        encoded = sweep_mod.speed_batch(vlm, processor, records)
        with console.status("ranking layers for the baselines"):
            plans |= sweep_mod.compared_plans(vlm, processor, calib_records, result, encoded, levels, chosen)
    with progress("plan") as bar:
        task = bar.add_task("sweeping plans", total=len(plans))
        summary = sweep_mod.run(vlm, processor, records, out, plans, analysis=result, batch_size=batch_size,
                                repeats=repeats, encoded=encoded, on_plan=lambda name: bar.advance(task))  # fmt: skip
    _print_sweep(summary)
    console.print(f"sweep written to {out / 'sweep.json'}")


def _print_sweep(summary: dict) -> None:
    table = Table(title=f"plans (reference accuracy {summary['reference']['accuracy']:.3f})")
    for col in ("plan", "accuracy", "drop (pts)", "FLOPs removed", "prefill x", "ideal x", "decode x", "safe"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in summary["plans"]:
        safe = "" if "safe" not in r else ("yes" if r["safe"] else "no")
        table.add_row(r["name"], f"{r['accuracy']:.3f}", f"{r['accuracy_drop']:+.1f}", f"{r['flops_removed']:.1%}",
                      f"{r['prefill_speedup']:.2f}", f"{r['ideal_prefill_speedup']:.2f}", f"{r['decode_speedup']:.2f}",
                      safe)  # fmt: skip
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

def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()  # typer itself reports usage errors (exit 2)
    except SkipitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
