"""`skipit sweep`: many plans on one benchmark, and whether the measures predicted what each plan cost.

Per plan: VQA accuracy on the same records, prefill FLOPs removed, ideal and measured speed-ups (measured side by side
with the untouched model on one batch of the benchmark's prompts). With an analysis of the model, also what each measure
predicted (`skipit.planner.predicted_damage`), whether the default conditions call the plan safe, the Spearman rank
correlation between each measure's prediction and the measured accuracy drop (bootstrap CI over plans), and every
plan called safe that still loses more than `lost_points` points: the framework's own falsification test.

Each plan's result is written to RUN_DIR/plans/NAME.json as soon as it is measured, so an interrupted sweep resumes
without redoing finished plans; RUN_DIR/sweep.json holds everything at the end. Every saved result carries the key
of what it was measured with (`run_key`: the model's fingerprint, the records' digest, the settings that change the
numbers); a sweep refuses a folder holding results under another key (`check_saved`) unless told to restart.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from skipit import baselines, prompts
from skipit.analysis import records_digest
from skipit.composer import MEASUREMENTS
from skipit.errors import SkipitError
from skipit.evaluation import caption, speed, vqa
from skipit.flops import batch_costs, prefill_saving
from skipit.intervals import mean_interval, paired
from skipit.io import write_json
from skipit.measures import spearman
from skipit.plan import Plan, fingerprint
from skipit.planner import MEASURES, ablation_kl, is_safe, make_plan, predicted_damage
from skipit.replay import Recorder, replaying
from skipit.skipping import apply_plan, remove_plan

FORMAT, VERSION = "skipit-sweep", 1
SPEED_BATCH, SPEED_NEW_TOKENS = 8, 8  # the speed batch: the first records' prompts; tokens generated per run
CAPTION_TOKENS = 64  # `caption_pareto`: the longest caption generated
KEPT_LEVEL = 0.99  # `largest_cut_kept`: the share of the reference's accuracy a cut must keep
GRID = ("late_entry", "early_exit", "vision_frozen", "layer_skip")  # the families the correlations are over
UNTIMED = ("prefill_speedup", "decode_speedup", "prefill_speedup_low", "prefill_speedup_high", "decode_speedup_low",
           "decode_speedup_high")  # None in the row of a plan scored but not timed


def grid(model, step: int = 3) -> dict[str, tuple[str, Plan]]:
    """name -> (family, plan): every late entry k and early exit m, every single layer skipped for vision tokens
    (frozen) and for all tokens, at layer spacing `step`."""
    if step < 1:
        raise SkipitError(f"step must be at least 1, got {step}")
    empty = Plan.for_model(model)
    L, plan = empty.num_layers, empty.with_decisions
    out = {"empty": ("empty", empty)}
    out |= {f"late_entry_{k}": ("late_entry", plan(late_entry=k)) for k in range(step, L, step)}
    out |= {f"early_exit_{m}": ("early_exit", plan(early_exit=m)) for m in range(L - 1 - step, -1, -step)}
    out |= {f"vision_frozen_{j}": ("vision_frozen", plan(frozen_vision_layers=[j])) for j in range(0, L, step)}
    out |= {f"layer_skip_{j}": ("layer_skip", plan(skip_layers=[j])) for j in range(0, L, step)}
    return out


def compared_plans(model, processor, calib, analysis: dict, encoded: dict, budgets: list[float],
                   methods: tuple[str, ...] | None = None, composer=None, composed: bool = True,
                   saved: dict[str, Plan] | None = None) -> dict[str, tuple[str, Plan]]:  # fmt: skip
    """skipit's own plans (the conditions' plan with its default thresholds, without and with frozen vision layers;
    functional freezing when the analysis has the ablation KL; the composed functional plan at its default KL
    limit), FastV's own, and skipit (composed, `skipit.composer`) and each baseline at every FLOPs budget
    ("method@budget"), all planned from the calibration records `calib`.
    A method that cannot reach a budget (say, VTW past what removing every vision token saves) is left out there.
    `methods`: registered baseline names (`skipit.baselines.available()`, the default); `composer`: a
    `skipit.composer.Composer` of the same model and records, to reuse its measurements; `composed` False: none of
    the composed planner's plans ("skipit+composed", "skipit@budget"), for a caller that brings its own (the demo).
    `saved`: plans by name from an earlier run (`saved_plans`); a composed plan among them that this composer would
    make again (`Composer.made_here`) is taken instead of searching again."""
    from skipit.composer import Composer

    methods = baselines.available() if methods is None else tuple(methods)
    for m in methods:
        baselines.get_baseline(m)  # an unknown name is an error, not an empty column
    out = {"skipit": ("skipit", make_plan(analysis)),
           "skipit+freeze": ("skipit", make_plan(analysis, freeze_vision=True))}
    if ablation_kl(analysis).get("vision"):  # analyze --ablation
        out["skipit+functional"] = ("skipit", make_plan(analysis, functional=True))
    if composed:
        composer = composer or Composer(model, processor, calib)  # one set of measurements for every budget

        def composed_plan(name: str, budget: float | None = None) -> Plan:
            old = (saved or {}).get(name)
            return old if old is not None and composer.made_here(old, budget=budget) else composer.plan(budget=budget)

        out["skipit+composed"] = ("skipit", composed_plan("skipit+composed"))
    if "fastv" in methods:  # FastV's own setting, K = 2 and R = 50 %, whatever it saves
        out["fastv"] = ("baseline", Plan.for_model(model, prune_vision_after=baselines.FASTV_LAYER))
    cache: dict = {}
    for b in budgets:
        for method in ("skipit", *methods) if composed else methods:
            try:
                plan = (composed_plan(f"skipit@{b:g}", b) if method == "skipit" else
                        baselines.baseline_plan(method, model, processor, calib, encoded, b, analysis=analysis,
                                                cache=cache))  # fmt: skip
            except SkipitError:
                continue
            out[f"{method}@{b:g}"] = ("skipit" if method == "skipit" else "baseline", plan)
    return out


def measure_plan(model, processor, records, plan: Plan, encoded: dict, batch_size: int, repeats: int,
                 answer_batches: list[dict] | None = None, warmup: int = 1, timed: bool = True,
                 replay: Recorder | None = None) -> dict:  # fmt: skip
    """Accuracy of `plan` on `records`, and its speed measured side by side with the untouched model.
    `answer_batches`: the records' inputs with their images encoded once for the whole sweep (`vqa.encode_batches`);
    `warmup`: untimed rounds first (the sweep warms up once, on its first plan). With `timed` False, only the ideal
    (FLOPs, KV bytes) ratios: the measured speed-ups are None. `replay`: the empty plan's answering records the
    untouched prefill into it, and other plans' answering replays the layers it leaves as they are
    (`skipit.replay`; never while timing)."""
    apply_plan(model, plan)
    try:
        with nullcontext() if replay is None else replay if plan.is_empty else replaying(model, replay):
            result = vqa.evaluate(model, processor, records, batch_size=batch_size, encoded=answer_batches)
    finally:
        remove_plan(model)
    scored = {"accuracy": result["accuracy"], "per_type": {t: v["accuracy"] for t, v in result["per_type"].items()},
              "predictions": result["predictions"], "timed": timed}  # fmt: skip
    if not timed:
        base, mine = (batch_costs(model, encoded, p, SPEED_NEW_TOKENS) for p in (None, plan))
        return scored | {
            "flops_removed": 1 - mine["prefill"] / base["prefill"],
            "ideal_prefill_speedup": base["prefill"] / mine["prefill"],
            "ideal_decode_speedup": base["decode"] / mine["decode"],
            "kv_memory": mine["kv_bytes"] / base["kv_bytes"],
            **dict.fromkeys(UNTIMED),
            "speed_noisy": [],
        }
    configs = {"untouched": None, "plan": plan}
    for attempt in range(2):  # a noisy measurement is taken again, with twice the rounds, before it is flagged
        runs = speed.compare(model, encoded, configs, new_tokens=SPEED_NEW_TOKENS, repeats=repeats * (1 + attempt),
                             warmup=warmup)  # fmt: skip
        row = speed.speed_rows(model, encoded, configs, runs, new_tokens=SPEED_NEW_TOKENS)[1]
        if not row["noisy"]:
            break
    return scored | {
        "flops_removed": 1 - 1 / row["ideal_prefill_speedup"],  # ideal = untouched / plan prefill FLOPs
        "ideal_prefill_speedup": row["ideal_prefill_speedup"],
        "prefill_speedup": row["prefill_speedup"],
        "decode_speedup": row["decode_speedup"],
        "ideal_decode_speedup": row["ideal_decode_speedup"],
        **{k: row[k] for k in ("prefill_speedup_low", "prefill_speedup_high", "decode_speedup_low",
                               "decode_speedup_high")},
        "speed_noisy": row["noisy"],
        "kv_memory": row["kv_ratio"],  # measured: the cache's bytes after the run
    }


def speed_batch(model, processor, records, n: int = SPEED_BATCH) -> dict:
    """One batch of the benchmark's own prompts, vision features precomputed, for the speed measurements."""
    return speed.encode_images(model, vqa.record_inputs(model, processor, records[:n]))[0]


def run_key(model, records, batch_size: int, repeats: int) -> dict:
    """What a saved result was measured with: the model's weights, the scored records (answers included) and every
    setting that changes a number. Results under different keys never mix."""
    return {"fingerprint": fingerprint(model), "records": records_digest(records, labels=True), "n": len(records),
            "batch_size": batch_size, "repeats": repeats, "speed_batch": SPEED_BATCH,
            "speed_new_tokens": SPEED_NEW_TOKENS}  # fmt: skip


PLANNED = "planned.json"  # the compared plans, saved before any is scored: a sweep cut short need not search again


def save_planned(run_dir: str | Path, plans: dict[str, tuple[str, Plan]]) -> None:
    """Keep the plans `compared_plans` made in RUN_DIR/planned.json (read back by `saved_plans`)."""
    write_json(Path(run_dir) / PLANNED, {name: plan.to_dict() for name, (_, plan) in plans.items()})


def saved_plans(run_dir: str | Path) -> dict[str, Plan]:
    """The plans saved in RUN_DIR, by name: those planned (`save_planned`), then those of the results in plans/ (after
    `check_saved`: measured under this key). A composed plan among them is taken only if the composer would make it
    again (`compared_plans`)."""
    run_dir, out = Path(run_dir), {}
    try:
        planned = json.loads((run_dir / PLANNED).read_text())
    except (OSError, ValueError):
        planned = {}
    found = list(planned.items()) if isinstance(planned, dict) else []
    for path in sorted((run_dir / "plans").glob("*.json")):
        try:
            found.append((path.stem, json.loads(path.read_text())["plan"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for name, data in found:
        try:
            out[name] = Plan.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError, SkipitError):
            continue  # planned again, like any plan that was not saved
    return out


def saved_files(run_dir: str | Path) -> list[Path]:
    """The results a sweep saved in RUN_DIR: plans/*.json and sweep.json."""
    run_dir = Path(run_dir)
    return sorted((run_dir / "plans").glob("*.json")) + [p for p in [run_dir / "sweep.json"] if p.is_file()]


def check_saved(run_dir: str | Path, key: dict, restart: bool = False) -> None:
    """Refuse RUN_DIR if it holds results measured under another key; with `restart`, delete them instead."""
    if restart:  # captions, the saved plans and the composed search's KLs too (`caption_pareto` keys its own files)
        for path in [*(Path(run_dir) / "captions").glob("*.json"), Path(run_dir) / PLANNED,
                     Path(run_dir) / MEASUREMENTS]:
            path.unlink(missing_ok=True)
    for path in saved_files(run_dir):
        if restart:
            path.unlink()
            continue
        try:
            theirs = json.loads(path.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            theirs = "unreadable"
        if theirs != key:
            raise SkipitError(f"{path} holds a result measured {_difference(theirs, key)}: use a fresh --out, or "
                              "pass --restart to discard the saved results")  # fmt: skip


def _difference(theirs, mine: dict) -> str:
    if theirs == "unreadable":
        return "that cannot be read back"
    if not isinstance(theirs, dict):
        return "before results were keyed (model, records, settings unknown)"
    names = {"fingerprint": "another model", "records": "on other records"}
    diffs = [names.get(k) or f"with {k} {theirs.get(k)!r} (now {v!r})" for k, v in mine.items() if theirs.get(k) != v]
    return ", ".join(diffs) or "under another key"


def run(
    model,
    processor,
    records,
    run_dir: str | Path,
    plans: dict[str, tuple[str, Plan]],
    analysis: dict | None = None,
    batch_size: int = 16,
    repeats: int = 3,
    lost_points: float = 2.0,
    on_plan: Callable[[str], None] | None = None,
    encoded: dict | None = None,
    restart: bool = False,
    timed: Callable[[str], bool] | None = None,
) -> dict:
    """Measure every plan (resuming from RUN_DIR/plans/), then correlate; writes RUN_DIR/sweep.json. `encoded`: the
    speed batch (`speed_batch` of the same records), when the caller has it already. Results saved under another
    key (`run_key`) are an error, or with `restart` deleted first. `timed(name)`: whether a plan's speed is
    measured (default: every plan's); the others are scored, with their ideal speed-ups only. The empty plan is
    always timed: it is the speed control."""
    if not records:
        raise SkipitError("the sweep has no records to score")
    run_dir = Path(run_dir)
    if "empty" not in plans:
        raise SkipitError("a sweep needs the empty plan as its reference")
    key = run_key(model, records, batch_size, repeats)
    check_saved(run_dir, key, restart)
    encoded = speed_batch(model, processor, records) if encoded is None else encoded
    answer_batches = None  # the vision encoder runs once per record for the whole sweep, when a plan needs answers
    recorder = Recorder(model)  # the untouched prefill, for the layers each plan leaves as they are
    done, measured = {}, 0  # measured: plans timed in this call (the first one warms the model up)
    for name, (family, plan) in plans.items():
        path = run_dir / "plans" / f"{name}.json"
        wanted = name == "empty" or timed is None or timed(name)
        if path.is_file():
            saved = json.loads(path.read_text())
            # read back through Plan, so files written before a plan field existed still match; the evidence (how
            # the plan was found, e.g. a search's seconds) may differ between runs, the decisions may not
            if (_decisions(Plan.from_dict(saved["plan"])) == _decisions(plan) and saved["key"] == key
                    and (saved.get("timed", True) or not wanted)):  # fmt: skip
                if saved["plan"] != (current := plan.to_dict()):  # a search run again: its evidence, same scores
                    saved["plan"] = current
                    write_json(path, saved)
                done[name] = saved
                if on_plan:
                    on_plan(name)
                continue
        row = {"name": name, "family": family, "plan": plan.to_dict(), "n": len(records), "key": key}
        twin = next((r for r in done.values() if _decisions(Plan.from_dict(r["plan"])) == _decisions(plan)
                     and (r.get("timed", True) or not wanted)), None)  # fmt: skip
        if twin is not None:  # the same decisions under another name (a budget plan equal to a plan above, say)
            row |= {k: v for k, v in twin.items() if k not in row} | {"same_as": twin["name"]}
        else:
            if answer_batches is None:
                answer_batches = vqa.encode_batches(model, processor, records, batch_size)
            row |= measure_plan(model, processor, records, plan, encoded, batch_size, repeats, answer_batches,
                                warmup=0 if measured else 1, timed=wanted, replay=recorder)  # fmt: skip
            measured += wanted
        write_json(path, row)
        done[name] = row
        if on_plan:
            on_plan(name)
    return summarize(done, analysis, run_dir, lost_points, meta={"n": len(records)}, key=key)


def _decisions(plan: Plan) -> dict:
    return {k: v for k, v in plan.to_dict().items() if k != "evidence"}


def summarize(done: dict[str, dict], analysis: dict | None, run_dir: Path, lost_points: float, meta: dict,
              key: dict | None = None) -> dict:  # fmt: skip
    """RUN_DIR/sweep.json from the measured rows: accuracy drops with paired intervals and McNemar's test against
    the empty plan, the baselines table with skipit compared to each method at the same budget and, with an
    analysis, the predictions, correlations and falsification list."""
    reference = done["empty"]["accuracy"]
    correct = {name: _correct(row, done["empty"]) for name, row in done.items()}
    # the empty plan is the speed control: if even it does not measure x1.00, no speed-up of this run is a result
    control = speed.control_noise(done["empty"]) if "prefill_speedup" in done["empty"] else []
    rows = []
    for name, row in done.items():
        row = {k: v for k, v in row.items() if k != "predictions"}  # they stay in RUN_DIR/plans/
        if "speed_noisy" in row and row.get("timed", True):
            row["speed_noisy"] = row["speed_noisy"] + control
        row["accuracy_drop"] = 100 * (reference - row["accuracy"])
        versus = paired(correct["empty"], correct[name])
        row |= {"accuracy_ci": versus.run.to_dict(), "drop_ci": _points(versus.difference),
                "kept_ci": versus.kept.to_dict(), "mcnemar_p": versus.mcnemar_p,
                "significant_loss": versus.loses_more_than(lost_points / 100)}  # fmt: skip
        rows.append(row)
    result = {
        "format": FORMAT, "version": VERSION,
        "model": {"fingerprint": done["empty"]["plan"]["fingerprint"], "class": done["empty"]["plan"]["architecture"]},
        "data": meta, "key": key, "reference": {"accuracy": reference}, "plans": rows, "speed_control": control,
    }  # fmt: skip
    reference_row = done["empty"]
    result["reference"] |= {k: reference_row[k] for k in ("per_type",)}
    result["reference"]["accuracy_ci"] = next(r["accuracy_ci"] for r in rows if r["name"] == "empty")
    result["baselines"] = [
        {"method": r["name"].split("@")[0], "budget": float(r["name"].split("@")[1]) if "@" in r["name"] else None,
         "flops_removed": r["flops_removed"], "prefill_speedup": r["prefill_speedup"],
         "decode_speedup": r["decode_speedup"], "speed_noisy": r.get("speed_noisy", []),
         "accuracy": r["accuracy"], "accuracy_ci": r["accuracy_ci"],
         "accuracy_kept": r["accuracy"] / reference if reference else None, "accuracy_kept_ci": r["kept_ci"],
         "mcnemar_p": r["mcnemar_p"], "plan": r["plan"]}
        for r in rows if r["family"] in ("skipit", "baseline")
    ]  # fmt: skip
    result["skipit_vs_baselines"] = versus_baselines(done, correct)
    result["largest_cut_kept"] = largest_cut_kept(result["baselines"])
    result["largest_cut_not_below"] = largest_cut_kept(result["baselines"], by="interval")
    if analysis is not None:
        result |= judge(rows, analysis, lost_points)
    write_json(run_dir / "sweep.json", result)
    return result


def _correct(row: dict, reference: dict) -> list[float]:
    """Right (1) or wrong (0) per question of `row`, in the reference run's question order."""
    by_id = {p["id"]: float(p["correct"]) for p in row["predictions"]}
    try:
        return [by_id[p["id"]] for p in reference["predictions"]]
    except KeyError as e:
        raise SkipitError(f"plan {row['name']!r} was scored on other questions than the empty plan ({e})") from None


def _points(interval) -> dict:
    """An accuracy difference as a drop in points (100 x reference - run), interval bounds swapped accordingly."""
    points = [0.0 - 100 * x for x in (interval.value, interval.high, interval.low)]  # 0.0 - x: never -0.0
    return {"value": points[0], "low": points[1], "high": points[2], "level": interval.level}


def made_for_kl(name: str) -> bool:
    """skipit's composed plans made for a KL limit (`--kappa`), not for a budget: "skipit+composed" (the default
    limit) and "skipit+kappa=K" (`benchmarks/budgets.py --kappas`)."""
    return name == "skipit+composed" or name.startswith("skipit+kappa=")


def largest_cut_kept(rows: list[dict], level: float = KEPT_LEVEL, by: str = "point") -> list[dict]:
    """Per method, of its plans made for a budget (the `baselines` rows) and, for skipit, also its `--kappa` plan
    (`made_for_kl`: made to remove the most FLOPs within a KL), the one that removes the most FLOPs while keeping
    at least `level` of the reference's accuracy, with its interval; None where none does. `by="point"`: the point
    estimate reaches `level`; `by="interval"`: the interval's upper end does (the data do not show it below `level`,
    the benefit of the doubt each method gets alike). Only the plans scored are tried: a finer grid can find more."""
    if by not in ("point", "interval"):
        raise ValueError(f"unknown by {by!r}; available: point, interval")

    def method(r: dict) -> str:
        return "skipit" if made_for_kl(r["method"]) else r["method"]

    def reaches(r: dict) -> bool:
        if r["accuracy_kept"] is None:
            return False
        return (r["accuracy_kept_ci"]["high"] if by == "interval" else r["accuracy_kept"]) >= level

    candidates = [r for r in rows if r["budget"] is not None or made_for_kl(r["method"])]
    out = []
    for name in dict.fromkeys(method(r) for r in candidates):
        best = max((r for r in candidates if method(r) == name and reaches(r)), key=lambda r: r["flops_removed"],
                   default=None)  # fmt: skip
        plan = best and (best["method"] if best["budget"] is None else f"{best['method']}@{best['budget']:g}")
        out.append({"method": name, "level": level, "by": by, "plan": plan, "budget": best and best["budget"],
                    "flops_removed": best and best["flops_removed"], "accuracy_kept": best and best["accuracy_kept"],
                    "accuracy_kept_ci": best and best["accuracy_kept_ci"]})  # fmt: skip
    return out


def versus_baselines(done: dict[str, dict], correct: dict[str, list[float]]) -> list[dict]:
    """skipit's plan against each baseline's at the same FLOPs budget, on the same questions: the paired difference
    in accuracy (skipit - baseline, points) and McNemar's exact test."""
    out = []
    for name in done:
        method, _, budget = name.partition("@")
        if not budget or method == "skipit" or f"skipit@{budget}" not in done:
            continue
        versus = paired(correct[name], correct[f"skipit@{budget}"])
        gain = versus.difference  # skipit - baseline, as a fraction
        out.append({"budget": float(budget), "baseline": method,
                    "skipit_gain_points": {"value": 100 * gain.value, "low": 100 * gain.low, "high": 100 * gain.high,
                                           "level": gain.level},
                    "skipit_better": versus.better, "skipit_worse": versus.worse, "mcnemar_p": versus.mcnemar_p})
    return out


def judge(rows: list[dict], analysis: dict, lost_points: float) -> dict:
    """Add each row's predicted damage and safety under `analysis`; return the correlations and the falsification
    list (every plan called safe that lost more than `lost_points`)."""
    for row in rows:
        plan = Plan.from_dict(row["plan"])
        row["predicted"], row["safe"] = predicted_damage(analysis, plan), is_safe(analysis, plan)
    scored = [r for r in rows if r["family"] in GRID]
    families = sorted({r["family"] for r in scored})
    return {
        "correlation": correlations(scored),
        "correlation_by_family": {f: correlations([r for r in scored if r["family"] == f]) for f in families},
        # every plan counts here, skipit's own and the baselines' too: the falsification test is about the conditions
        "safe_but_lost": [r["name"] for r in rows
                          if r["family"] != "empty" and r["safe"] and r["accuracy_drop"] > lost_points],
        # of those, the losses McNemar's exact test (p < 0.05) says are not chance; the rest may be noise
        "safe_but_lost_significant": [r["name"] for r in rows
                                      if r["family"] != "empty" and r["safe"] and r["significant_loss"]],
        "lost_points": lost_points,
    }  # fmt: skip


def correlations(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Spearman rank correlation between each measure's predicted damage and the measured accuracy drop, with a
    95 % percentile bootstrap CI over plans."""
    out = {}
    rng = random.Random(seed)
    for measure in MEASURES:
        pairs = [(r["predicted"][measure], r["accuracy_drop"]) for r in rows if r["predicted"].get(measure) is not None]
        if len(pairs) < 3:
            continue
        x, y = zip(*pairs, strict=True)
        boots = []
        for _ in range(n_boot):
            idx = [rng.randrange(len(pairs)) for _ in pairs]
            value = spearman([x[i] for i in idx], [y[i] for i in idx])
            if value == value:  # not NaN
                boots.append(value)
        boots.sort()
        lo, hi = (boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1]) if boots else (None, None)
        out[measure] = {"spearman": spearman(list(x), list(y)), "ci_low": lo, "ci_high": hi, "n": len(pairs)}
    return out


# ---------------------------------------------------------------- captioning under the compared plans


def caption_key(model, examples: list[tuple], batch_size: int, max_new_tokens: int) -> dict:
    """What a saved caption result was measured with (as `run_key` for the VQA results): the model, the images'
    records and every reference caption (`caption.by_image`), and the settings."""
    references = hashlib.sha256(json.dumps([refs for _, refs in examples]).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint(model), "records": records_digest([rec for rec, _ in examples]),
            "references": references, "n": len(examples), "batch_size": batch_size,
            "max_new_tokens": max_new_tokens}  # fmt: skip


def caption_pareto(model, processor, records, run_dir: str | Path, compared: list[dict], n_images: int,
                   batch_size: int = 16, max_new_tokens: int = CAPTION_TOKENS,
                   on_plan: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """CIDEr-D of greedy captions of the first `n_images` distinct images of `records`, by the untouched model and
    under each plan of `compared` made for a budget (the `baselines` rows of sweep.json), with skipit's plan
    against each method at the same budget.

    The VQA sweep scores one-word answers; a caption is tens of tokens written from the vision tokens, and a plan
    can keep the one and lose the other. CIDEr-D's document frequencies come from the references of these images,
    the same for every plan, and corpus CIDEr-D is the mean of the per-image scores, so "kept" (a plan's CIDEr-D over
    the untouched model's) and skipit's gain (its CIDEr-D minus the method's) carry paired bootstrap intervals over
    the same images. A row's `flops_removed` is the plan's share of the prefill FLOPs of these captioning prompts
    (`flops_removed_benchmark`: of the benchmark's, at which the plan was made for its budget): with fewer text
    tokens than a question, the same plan removes another share of them. Each plan's captions land in
    RUN_DIR/captions/NAME.json as they are made; a rerun reuses those made with the same decisions under the same
    key (`caption_key`) and makes the others again."""
    examples = caption.by_image(records)[:n_images]
    chosen = {rec.image for rec, _ in examples}
    images = [rec for rec in records if rec.image in chosen]  # every record of those images: all their references
    key = caption_key(model, examples, batch_size, max_new_tokens)
    prompt_inputs = prompts.model_inputs(processor, [prompts.caption_text(processor)] * len(examples),
                                         [rec.load_image() for rec, _ in examples])  # fmt: skip
    folder = Path(run_dir) / "captions"
    empty = Plan.for_model(model)
    runs = [("empty", None, 0.0, empty)] + [
        (f"{b['method']}@{b['budget']:g}", b, b["flops_removed"], Plan.from_dict(b["plan"]))
        for b in compared if b.get("budget") is not None]  # fmt: skip
    scores: dict[str, dict] = {}
    for name, _, _, plan in runs:
        path = folder / f"{name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved.get("key") != key or saved.get("decisions") != _decisions(plan):
            twin = next((s for s in scores.values() if s["decisions"] == _decisions(plan)), None)
            if twin is not None:  # the same decisions under another name: same captions
                saved = twin | {"name": name}
            else:
                apply_plan(model, plan)
                try:
                    run = caption.evaluate(model, processor, images, batch_size, max_new_tokens=max_new_tokens)
                finally:
                    remove_plan(model)
                saved = {"name": name, "key": key, "decisions": _decisions(plan), "cider": run["cider"],
                         "scores": [p["cider"] for p in run["predictions"]],
                         "captions": [p["prediction"] for p in run["predictions"]]}  # fmt: skip
            write_json(path, saved)
        scores[name] = saved
        if on_plan:
            on_plan(name)
    reference = scores["empty"]
    rows = []
    for name, row, flops, plan in runs[1:]:
        versus = paired(reference["scores"], scores[name]["scores"])
        rows.append({"method": row["method"], "budget": row["budget"],
                     "flops_removed": prefill_saving(model, prompt_inputs, plan), "flops_removed_benchmark": flops,
                     "cider": scores[name]["cider"], "cider_ci": versus.run.to_dict(),
                     "cider_kept": versus.kept.value if reference["cider"] else None,
                     "cider_kept_ci": versus.kept.to_dict() if reference["cider"] else None})  # fmt: skip
    mine = {r["budget"]: f"skipit@{r['budget']:g}" for r in rows if r["method"] == "skipit"}
    for r, (name, *_) in zip(rows, runs[1:], strict=True):
        if r["method"] != "skipit" and r["budget"] in mine:  # skipit - method, CIDEr-D points, paired over images
            r["skipit_gain"] = paired(scores[name]["scores"], scores[mine[r["budget"]]]["scores"]).difference.to_dict()
    return {"n_images": len(examples), "max_new_tokens": max_new_tokens, "key": key,
            "reference": {"cider": reference["cider"], "cider_ci": mean_interval(reference["scores"]).to_dict(),
                          "examples": reference["captions"][:3]},
            "rows": rows}  # fmt: skip
