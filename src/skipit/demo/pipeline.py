"""`skipit demo`: the whole pipeline on mini-llava, offline — build/load, analyze, plan, sweep with baselines, report.

Sized for a 2-core CPU: a small calibration set, a coarse plan grid and one FLOPs budget (the one skipit's own plan
reaches, so every baseline is compared with it at the same compute). Every step writes into RUN_DIR and is skipped
on a rerun when its result is already there, so an interrupted demo resumes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from skipit import models
from skipit.composer import KAPPA, MEASUREMENTS, Composer
from skipit.data.jsonl import load_records
from skipit.demo.build import ensure_built, shapes_split
from skipit.errors import SkipitError
from skipit.plan import Plan, fingerprint
from skipit.progress import progress


@dataclass
class DemoConfig:
    n_calib: int = 24  # calibration records analysed (the plan uses the first 16, ShortV's layer contribution 20)
    ablation: bool = True  # ablation KL too (about 2 min for 24 records on 2 cores): the best predictor of damage
    n_test: int = 100  # test questions scored per plan
    step: int = 15  # layer spacing of the plan grid
    batch_size: int = 16
    repeats: int = 2  # speed measurement rounds per plan
    kappa: float = KAPPA  # the KL (nats) the demo's composed plan may cost on held-out calibration records
    # the composed planner's search, sized for 2 cores: 8 records score the decisions and 8 check the plan, band
    # decisions every 8 layers, 3 candidates tried per step (skipit.composer.Composer; its defaults: 16, 16, L/8, 6)
    compose: dict = field(default_factory=lambda: {"n_score": 8, "n_heldout": 8, "step": 8, "shortlist": 3})


def run(run_dir: str | Path, config: DemoConfig | None = None, model_path: str | Path | None = None,
        console: Console | None = None) -> dict:  # fmt: skip
    """Run (or resume) the demo in `run_dir`; returns the headline numbers."""
    from skipit.analysis import Analysis, analyze, records_digest
    from skipit.evaluation import sweep
    from skipit.report import write_report

    config = config or DemoConfig()
    console = console or Console()
    run_dir = Path(run_dir)
    started = time.monotonic()
    with console.status("building mini-llava and the shapes splits (first run only)"):
        path = model_path or ensure_built()
        calib_path = shapes_split("calibration")
        calib = load_records(calib_path, limit=config.n_calib)
        test = load_records(shapes_split("test"), limit=config.n_test)
    model, processor = models.load(path)

    # 1. analyze
    if (run_dir / "analysis.json").is_file():
        analysis = Analysis.load(run_dir).result
        if analysis.model.fingerprint != fingerprint(model):
            raise SkipitError(f"{run_dir} holds a run of another model: choose another --out")
        if analysis.data.records_digest not in (None, records_digest(calib)):
            raise SkipitError(f"{run_dir} holds an analysis of other calibration records (another --n-calib?): "
                              "choose another --out")
    else:
        with progress("ex") as bar:
            task = bar.add_task("1/4 analyze (calibration)", total=len(calib))
            analysis = analyze(model, processor, calib, batch_size=8, ablation=config.ablation, run_dir=run_dir,
                               model_path=str(path),
                               data_path=str(calib_path),
                               on_batch=lambda n: bar.advance(task, n)).result  # fmt: skip
    # 2. plan: the composed functional plan, measured on the calibration records (skipit.composer)
    saved = run_dir / "plan.json"
    plan = Plan.load(saved) if saved.is_file() else None
    if plan is None or not plan.evidence.get("search"):  # none yet, or one of an earlier release's planner
        with progress("plan") as bar, _timed_step(console, "2/4 plan"):
            task = bar.add_task("2/4 plan: plans measured on the calibration records", total=None)
            composer = Composer(model, processor, calib, **config.compose, on_measure=lambda: bar.advance(task),
                                store=run_dir / MEASUREMENTS)  # a stopped demo's search resumes from its KLs
            plan = composer.plan(kappa=config.kappa)
        plan.save(run_dir / "plan.json")
    saving = plan.evidence["flops_removed"]
    kl = plan.evidence["kl"]
    console.print(f"2/4 plan: {saving:.1%} of prefill FLOPs removed at a held-out KL of {kl['value']:.4f} nats "
                  f"[{kl['low']:.4f}, {kl['high']:.4f}] ({run_dir / 'plan.json'})")

    # 3. sweep: the grid, skipit's plans, and the baselines at the FLOPs skipit's plan removes
    # The demo's own plan is skipit's at the budget it reaches: it is scored once, as "skipit" (timed, the headline),
    # and its "skipit@budget" row, which the baselines are compared with, is the same plan (the sweep's twin rule).
    budget = round(saving, 3)
    plans = sweep.grid(model, config.step) | {"skipit": ("skipit", plan)}
    encoded = sweep.speed_batch(model, processor, test)
    with console.status("3/4 planning skipit's and the baselines' plans at that budget"), \
            _timed_step(console, "3/4 planning the compared plans"):
        compared = sweep.compared_plans(model, processor, calib, analysis, encoded, [budget], composed=False)
    compared.pop("skipit")  # the conditions' default plan: the demo's name "skipit" is its own plan
    plans |= compared | {f"skipit@{budget:g}": ("skipit", plan)}
    with progress("plan") as bar:
        task = bar.add_task("3/4 sweep: plans scored and timed", total=len(plans))
        summary = sweep.run(model, processor, test, run_dir, plans, analysis=analysis, batch_size=config.batch_size,
                            repeats=config.repeats, on_plan=lambda name: bar.advance(task), encoded=encoded,
                            timed=_timed)  # fmt: skip

    # 4. report
    with console.status("4/4 writing the report"):
        report_path = write_report(run_dir)
    console.print(f"demo finished in {_minutes(time.monotonic() - started)}")
    rows = {r["name"]: r for r in summary["plans"]}
    mine, ref = rows["skipit"], rows["empty"]
    return {
        "flops_removed": mine["flops_removed"],
        "prefill_speedup": mine["prefill_speedup"],
        "decode_speedup": mine["decode_speedup"],
        "accuracy": mine["accuracy"],
        "reference_accuracy": ref["accuracy"],
        "accuracy_kept": mine["accuracy"] / ref["accuracy"] if ref["accuracy"] else None,
        "accuracy_ci": mine["accuracy_ci"],  # paired bootstrap over the same questions as the reference
        "accuracy_kept_ci": mine["kept_ci"],
        "reference_accuracy_ci": summary["reference"]["accuracy_ci"],
        "mcnemar_p": mine["mcnemar_p"],
        **{k: mine[k] for k in ("prefill_speedup_low", "prefill_speedup_high", "decode_speedup_low",
                                "decode_speedup_high", "ideal_prefill_speedup", "ideal_decode_speedup")},
        "speed_noisy": mine["speed_noisy"],  # with the empty plan's control: why the speed-ups are not results
        "report": str(report_path),
        "run_dir": str(run_dir),
    }


def _timed(name: str) -> bool:
    """The plans whose speed the demo measures: its own (the headline; the empty plan is always timed, as the
    control). The others are compared at matched FLOPs and scored with their ideal speed-ups only, to save minutes;
    `skipit sweep` times every plan, and benchmarks/ measure speed where it matters (long contexts, batches)."""
    return name == "skipit"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


@contextmanager
def _timed_step(console: Console, name: str):
    """Print how long a step that shows only a spinner took (the progress bars log their own time)."""
    start = time.monotonic()
    yield
    console.print(f"{name}: done in {_minutes(time.monotonic() - start)}")
