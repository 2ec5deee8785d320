"""skipit's composed plans and the chosen baselines at FLOPs budgets, and nothing else: the budget rows of a sweep.

    python benchmarks/budgets.py ~/.cache/skipit/mini-llava-v3 --data ~/.cache/skipit/shapes/test --n 1200 \
        --calib ~/.cache/skipit/shapes/calibration --n-calib 64 --analysis runs/demo-v3 \
        --budgets 0.1,0.15,0.2,0.3,0.4,0.5 --methods divprune --out runs/pareto-1200-v5

`skipit sweep` also scores the plan grid and skipit's condition plans (a dozen more plans, 3-5 min each on 1,200
questions on a 2-core CPU); this plans what the sweep plans at each budget (`sweep.compared_plans`: the composed
planner's `skipit@B` and the baselines' `METHOD@B`, plus the composed `--kappa` plan, `skipit+composed`, and with
--kappas K1,K2 more of them, `skipit+kappa=K`) and scores only those and the untouched model, untimed (accuracy and
FLOPs), with the sweep's own `sweep.run` into --out. A rerun resumes: saved composed plans the planner would make
again are not searched again, scored plans are not scored again (so a second run with more --methods scores only
theirs). Prints, for every plan scored in --out,
its accuracy kept and skipit's gain over each method at the same budget, with paired 95 % intervals and McNemar's p,
and each method's largest cut keeping 99 % of the reference's accuracy (skipit's `--kappa` plans included), by
point estimate and by the interval's upper end, and each KL-limited plan against every method's plan nearest
in FLOPs; `--table` prints that and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skipit.analysis import Analysis
from skipit.data.jsonl import load_records
from skipit.errors import SkipitError
from skipit.evaluation import sweep
from skipit.evaluation.run import load_vlm, parse_budgets, parse_methods
from skipit.intervals import paired
from skipit.plan import Plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="the model (not needed with --table)")
    ap.add_argument("--data", help="scored VQA records")
    ap.add_argument("--n", type=int, help="score only the first N records")
    ap.add_argument("--calib", help="calibration records (the composer and the baselines plan on them)")
    ap.add_argument("--n-calib", type=int, default=64,
                    help="first N calibration records (half score, half held out)")
    ap.add_argument("--analysis", help="an analysis of the model (the baselines that read one)")
    ap.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--methods", default="divprune", help="baselines, comma-separated")
    ap.add_argument("--kappas", default="", help="more composed plans, at these KL limits (nats), comma-separated: "
                                                 "skipit+kappa=K, beside the default limit's skipit+composed")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--table", action="store_true", help="only print the table of the plans scored in --out")
    args = ap.parse_args()
    if args.table:
        print_table(args.out)
        return 0
    if missing := [f"--{k}" if k != "model" else "MODEL" for k in ("model", "data", "calib", "analysis")
                   if getattr(args, k) is None]:  # fmt: skip
        ap.error(f"{', '.join(missing)} needed (all but --out are optional only with --table)")

    budgets, methods = parse_budgets(args.budgets), parse_methods(args.methods)
    kappas = parse_kappas(args.kappas)
    result = Analysis.load(args.analysis).result
    records = load_records(args.data, limit=args.n)
    calib = load_records(args.calib, limit=args.n_calib)
    model, processor = load_vlm(args.model, None)
    from skipit.composer import MEASUREMENTS, Composer

    encoded = sweep.speed_batch(model, processor, records)
    print(f"planning {len(budgets)} budgets, skipit and {', '.join(methods)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    measured = [0]

    def count() -> None:  # the composed search measures hundreds of plans: a line every 50, for a log
        measured[0] += 1
        if measured[0] % 50 == 0:
            print(f"{measured[0]} plans measured", flush=True)

    composer = Composer(model, processor, calib, on_measure=count, store=args.out / MEASUREMENTS)  # resumable
    compared = sweep.compared_plans(model, processor, calib, result, encoded, budgets, methods, composer=composer,
                                    saved=sweep.saved_plans(args.out))
    plans = {"empty": ("empty", Plan.for_model(model))}  # the reference every plan is paired with
    plans |= {name: compared[name] for b in budgets for m in ("skipit", *methods)
              if (name := f"{m}@{b:g}") in compared}  # fmt: skip
    plans["skipit+composed"] = compared["skipit+composed"]
    saved = sweep.saved_plans(args.out)
    for k in kappas:  # each searched once: the measurements are the composer's, shared with the budgets'
        old = saved.get(name := f"skipit+kappa={k:g}")
        again = old is not None and composer.made_here(old, kappa=k)
        plans[name] = ("skipit", old if again else composer.plan(kappa=k))
    sweep.save_planned(args.out, plans)
    sweep.run(model, processor, records, args.out, plans, analysis=None, repeats=1, encoded=encoded,
              on_plan=lambda name: print(f"scored {name}", flush=True), timed=lambda name: False)
    print_table(args.out)
    return 0


def parse_kappas(text: str) -> list[float]:
    try:
        kappas = [float(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise SkipitError(f"--kappas takes KL limits in nats, comma-separated (like 0.01,0.03); got {text!r}") from None
    if bad := [k for k in kappas if not k > 0]:
        raise SkipitError(f"--kappas must be above 0; got {', '.join(f'{k:g}' for k in bad)}")
    return kappas


def print_table(out: Path) -> None:
    """Every plan scored in OUT (this run's and earlier runs' into it), by budget, skipit's first at each."""
    import json

    def order(name: str) -> tuple:
        method, _, budget = name.partition("@")
        return (name != "empty", not budget, float(budget or 0), method != "skipit", method)  # kappa plans: by name

    names = sorted((path.stem for path in (out / "plans").glob("*.json")), key=order)
    if "empty" not in names:
        raise SkipitError(f"no untouched model's result in {out / 'plans'}: score the plans first (without --table)")
    rows = {name: json.loads((out / "plans" / f"{name}.json").read_text()) for name in names}
    reference = rows.pop("empty")

    def correct(row: dict) -> list[float]:  # right or wrong per question, in the reference's order
        return sweep._correct(row, reference)

    base = correct(reference)

    def gain(baseline: str, mine: str) -> str:  # skipit's plan - the baseline's, paired on the same questions
        versus = paired(correct(rows[baseline]), correct(rows[mine]))
        d = versus.difference
        return f"{100 * d.value:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] | {versus.mcnemar_p:.2g}"

    print(f"\nreference accuracy {reference['accuracy']:.4f} on {len(base)} questions\n")
    print("| plan | FLOPs removed | accuracy kept [95 % CI] | skipit's gain, points [95 % CI] | McNemar p |")
    print("|---|---:|---:|---:|---:|")
    budget_rows = []  # the rows `sweep.largest_cut_kept` reads
    for name, row in rows.items():
        kept = paired(base, correct(row)).kept
        method, _, budget = name.partition("@")
        if budget or sweep.made_for_kl(name):
            budget_rows.append({"method": method, "budget": float(budget) if budget else None,
                                "flops_removed": row["flops_removed"], "accuracy_kept": kept.value,
                                "accuracy_kept_ci": kept.to_dict()})  # fmt: skip
        mine = f"skipit@{budget}"
        versus = gain(name, mine) if budget and method != "skipit" and mine in rows else "– | –"
        print(f"| {name} | {100 * row['flops_removed']:.1f}% | {100 * kept.value:.1f}% "
              f"[{100 * kept.low:.1f}, {100 * kept.high:.1f}] | {versus} |")  # fmt: skip
    # a plan made for a KL limit has no budget to pair on: each method's scored plan nearest to it in FLOPs removed
    if kl_plans := [name for name in rows if sweep.made_for_kl(name)]:
        print("\nskipit's plans made for a KL limit against each method's plan nearest in FLOPs removed:\n")
        print("| skipit plan | FLOPs removed | method's plan | FLOPs removed | skipit's gain, points [95 % CI] "
              "| McNemar p |\n|---|---:|---|---:|---:|---:|")  # fmt: skip
        methods = dict.fromkeys(n.partition("@")[0] for n in rows if "@" in n and not n.startswith("skipit@"))
        for mine in kl_plans:
            flops = rows[mine]["flops_removed"]
            for method in methods:
                near = min((n for n in rows if n.partition("@")[0] == method),
                           key=lambda n: abs(rows[n]["flops_removed"] - flops))  # fmt: skip
                print(f"| {mine} | {100 * flops:.1f}% | {near} | {100 * rows[near]['flops_removed']:.1f}% | "
                      f"{gain(near, mine)} |")  # fmt: skip
    for by, says in (("point", "point estimate"), ("interval", "upper end of the 95 % interval: not shown below")):
        print(f"\nlargest cut keeping {sweep.KEPT_LEVEL:.0%} ({says}), of the plans scored here:")
        for cut in sweep.largest_cut_kept(budget_rows, by=by):
            found = cut["plan"] is not None
            print(f"- {cut['method']}: " + (f"{100 * cut['flops_removed']:.1f}% ({cut['plan']})" if found else "none"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SkipitError as e:
        sys.exit(f"error: {e}")
