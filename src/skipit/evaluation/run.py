"""What `skipit eval`, `skipit bench` and `skipit sweep` do, as functions: load, check, measure, return a result dict.

The CLI parses options, calls these and prints tables; a script calls them the same way. Each checks what it can
(options, data, the plan, the analysis) before the model loads, and again what needs the model (the plan's and the
analysis' fingerprints, results already saved in a sweep folder) before any measurement runs. `status(text)` is a
context manager shown around long silent steps (the CLI's spinner); `progress=True` shows rich progress bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from skipit.errors import SkipitError

Status = Callable[[str], contextlib.AbstractContextManager]


def _quiet(text: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _tracker(show: bool, unit: str) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    """track(description, total) -> advance(n) on one rich progress display, or None when not shown."""
    if not show:
        yield None
        return
    from skipit.progress import progress

    with progress(unit) as bar:

        def track(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda k: bar.advance(task, k)

        yield track


def load_plan(path: str | Path | None):
    """The skip plan at `path` (None: no plan)."""
    from skipit.plan import Plan

    return Plan.load(path) if path is not None else None


def load_vlm(path: str | Path, plan=None):
    """(model, processor) of a vision-language model, with `plan` applied (and checked against it) if given."""
    from skipit import models
    from skipit.skipping import apply_plan

    model, processor = models.load(path)
    if not hasattr(processor, "image_processor"):
        raise SkipitError(f"{path} is not a vision-language model: this command needs an image input")
    if plan is not None:
        apply_plan(model, plan)
    return model, processor


def at_least(minimum: float, **values) -> None:
    """Refuse any of `values` (name=value; None passes) below `minimum`, naming the option."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise SkipitError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value:g}")


# ---------------------------------------------------------------- skipit eval


def evaluate_model(
    model: str,
    data: str | Path,
    *,
    plan: str | Path | None = None,
    task: str = "vqa",
    n: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    blind: bool = False,
    with_blind: bool = False,
    measure_speed: bool = True,
    progress: bool = False,
    status: Status = _quiet,
) -> dict:
    """The task's score of `model` on `data` (optionally under the plan at `plan`), with speed and memory on the
    first batch: {"config": what was run, **the task's result, "speed": ...}."""
    import torch

    from skipit.analysis import versions
    from skipit.data.jsonl import load_records
    from skipit.evaluation import get_task
    from skipit.evaluation.speed import measure_generation

    scorer = get_task(task)
    scorer.check_options(blind, with_blind)
    at_least(1, n=n, batch_size=batch_size)
    records = load_records(data, limit=n)
    scorer.check_scorable(records)  # before the slow model load
    skip = load_plan(plan)
    vlm, processor = load_vlm(model, skip)
    torch.manual_seed(seed)
    with _tracker(progress, "q" if task == "vqa" else "it") as track:
        result = scorer.run(vlm, processor, records, batch_size, blind=blind, with_blind=with_blind, track=track)
    if measure_speed:  # the evaluation's own prompts, real images also for blind runs
        images, texts = scorer.speed_prompts(processor, records, batch_size)
        with status(f"measuring speed on a batch of {len(texts)}"):
            result["speed"] = measure_generation(vlm, processor, images, texts)
    config = {"model": str(model), "plan": None if skip is None else skip.to_dict(),
              "plan_path": None if plan is None else str(plan), "data": str(data), "n": n,
              "n_records": len(records), "seed": seed, "batch_size": batch_size, "task": task, "blind": blind,
              "with_blind": with_blind, "versions": versions()}  # fmt: skip
    return {"config": config, **result}


# ---------------------------------------------------------------- skipit bench


def bench_plan(
    model: str,
    plan: str | Path,
    *,
    data: str | Path | None = None,
    image: str | Path | None = None,
    prompt: str = "Describe the image.",
    batch_size: int = 1,
    new_tokens: int = 16,
    repeats: int = 5,
    status: Status = _quiet,
) -> dict:
    """Speed of `model` under the plan at `plan` against the untouched model, side by side on one batch: one row
    per configuration (`skipit.evaluation.speed.speed_rows`), plus the batch's shape and the vision encoder's time."""
    from skipit.data.jsonl import load_records
    from skipit.evaluation import speed
    from skipit.prompts import chat_inputs, load_image

    if (data is None) == (image is None):
        raise SkipitError("give either --data or --image")
    at_least(1, batch_size=batch_size, repeats=repeats)
    at_least(2, new_tokens=new_tokens)
    skip = load_plan(plan)
    if image is not None:
        images, prompts = [load_image(image)] * batch_size, [prompt] * batch_size
    else:
        records = load_records(data, limit=batch_size)
        records = [records[i % len(records)] for i in range(batch_size)]
        images, prompts = [r.load_image() for r in records], [r.question for r in records]
    vlm, processor = load_vlm(model, None)
    skip.check(vlm)
    encoded, encode_s = speed.encode_images(vlm, chat_inputs(processor, images, prompts))
    configs = {"untouched": None, "plan": skip}
    with status(f"measuring {repeats} rounds"):
        runs = speed.compare(vlm, encoded, configs, new_tokens=new_tokens, repeats=repeats)
    return {"model": str(model), "plan": str(plan), "batch_size": batch_size, "repeats": repeats,
            "prompt_tokens": encoded["input_ids"].shape[1], "vision_encoder_s": encode_s,
            "rows": speed.speed_rows(vlm, encoded, configs, runs, new_tokens)}  # fmt: skip


# ---------------------------------------------------------------- skipit sweep


def parse_budgets(budgets: str | Sequence[float]) -> list[float]:
    """FLOPs budgets from "0.1,0.2" (or a list), each a fraction in (0, 1)."""
    try:
        levels = [float(b) for b in budgets.split(",") if b.strip()] if isinstance(budgets, str) else list(budgets)
    except ValueError:
        raise SkipitError(f"budgets must be comma-separated fractions, got {budgets!r}") from None
    if bad := [b for b in levels if not 0 < b < 1]:
        raise SkipitError(f"budgets are fractions of the FLOPs between 0 and 1, got {bad[0]:g}")
    return levels


def parse_methods(methods: str | Sequence[str] | None) -> tuple[str, ...]:
    """Baseline names from "vtw,shortv" (or a list; None: every registered one), each registered."""
    from skipit import baselines

    if methods is None:
        return baselines.available()
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if isinstance(methods, str) else tuple(methods)
    if unknown := [m for m in chosen if m not in baselines.BASELINES]:
        raise SkipitError(f"unknown baselines {unknown}; available: {', '.join(baselines.available())}")
    return chosen


def sweep_model(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    analysis: str | Path | None = None,
    calib: str | Path | None = None,
    n: int | None = None,
    step: int = 3,
    budgets: str | Sequence[float] = (0.1, 0.2, 0.3),
    methods: str | Sequence[str] | None = None,
    n_calib: int = 32,
    batch_size: int = 16,
    repeats: int = 3,
    restart: bool = False,
    time_grid: bool = True,
    captions: int | None = None,
    kl_tokens: int = 1,
    kl_prompt: str = "question",
    progress: bool = False,
) -> dict:
    """The plan grid (and with an analysis skipit's plans and the baselines at matched FLOPs) measured on `data`,
    resuming from OUT/plans/; returns what OUT/sweep.json holds (`skipit.evaluation.sweep.run`). `time_grid`
    False: the grid's plans are scored but not timed (their ideal speed-ups only). `captions` N: also CIDEr-D of
    the first N distinct images' captions under every plan compared at a budget (`sweep.caption_pareto`), in
    sweep.json's "captions". `kl_tokens`, `kl_prompt`: what skipit's composed plans measure their KL on
    (`skipit.composer.ModelMeasurer`)."""
    from skipit.analysis import Analysis
    from skipit.data.jsonl import load_records
    from skipit.evaluation import sweep
    from skipit.plan import fingerprint

    at_least(1, n=n, step=step, n_calib=n_calib, batch_size=batch_size, repeats=repeats, captions=captions)
    chosen, levels = parse_methods(methods), parse_budgets(budgets)
    from skipit.composer import check_kl

    check_kl(kl_tokens, kl_prompt)
    if captions is not None and analysis is None:
        raise SkipitError("--captions captions under the plans compared at matched FLOPs, which need --analysis")
    result = Analysis.load(analysis).result if analysis is not None else None
    records = load_records(data, limit=n)
    if captions is not None:
        from skipit.evaluation import caption

        caption.check_scorable(records)  # before the slow model load
    calib_records = load_records(calib, limit=n_calib) if calib is not None and result is not None else None
    vlm, processor = load_vlm(model, None)
    if result is not None and result.model.fingerprint not in (None, fingerprint(vlm)):
        raise SkipitError(f"--analysis {analysis} is an analysis of another model (fingerprint "
                          f"{result.model.fingerprint}, {model} has {fingerprint(vlm)}): analyze this model first")
    sweep.check_saved(out, sweep.run_key(vlm, records, batch_size, repeats), restart)  # before any plan runs
    plans, encoded = sweep.grid(vlm, step), None
    if result is not None:
        from skipit.composer import MEASUREMENTS, Composer

        encoded = sweep.speed_batch(vlm, processor, records)
        calib_records = calib_records or records[:n_calib]
        with _tracker(progress, "plan") as track:  # the composed planner's search is most of this step
            advance = track("planning skipit's and the baselines' plans (plans measured)", None) if track else None
            composer = Composer(vlm, processor, calib_records, tokens=kl_tokens, prompt=kl_prompt,
                                on_measure=(lambda: advance(1)) if advance else None,
                                store=Path(out) / MEASUREMENTS)  # a stopped sweep's search resumes from its KLs
            plans |= sweep.compared_plans(vlm, processor, calib_records, result, encoded, levels, chosen,
                                          composer=composer, saved=sweep.saved_plans(out))  # fmt: skip
        sweep.save_planned(out, plans)  # the search's result survives a sweep stopped while it scores
    with _tracker(progress, "plan") as track:
        advance = track("sweeping plans", len(plans)) if track else None
        summary = sweep.run(vlm, processor, records, out, plans, analysis=result, batch_size=batch_size,
                            repeats=repeats, encoded=encoded, on_plan=(lambda name: advance(1)) if advance else None,
                            timed=None if time_grid else lambda name: plans[name][0] not in sweep.GRID)  # fmt: skip
    if captions is not None:
        from skipit.io import write_json

        compared = [b for b in summary["baselines"] if b["budget"] is not None]
        with _tracker(progress, "plan") as track:
            advance = track("captioning under the untouched model and each compared plan", len(compared) + 1
                            ) if track else None  # fmt: skip
            summary["captions"] = sweep.caption_pareto(vlm, processor, records, out, compared, captions, batch_size,
                                                       on_plan=(lambda name: advance(1)) if advance else None)
        write_json(Path(out) / "sweep.json", summary)
    return summary
