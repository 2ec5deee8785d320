"""Baselines at the FLOPs of one plan a sweep scored: is that plan ahead of them at the same compute?

    python benchmarks/matched.py ~/.cache/skipit/mini-llava-v3 --sweep runs/pareto-1200 --plan skipit+composed \
        --data ~/.cache/skipit/shapes/test --n 1200 --calib ~/.cache/skipit/shapes/calibration --n-calib 64 \
        --analysis runs/demo --methods divprune,shortv --out runs/matched-kappa

A sweep matches the baselines to its `--budgets`; a plan made for another objective (skipit's `--kappa` plan,
`skipit+composed`) removes whatever share of the FLOPs it removes. This plans each baseline at that share (the
sweep's own matching, `skipit.baselines.baseline_plan`, on the sweep's speed batch and calibration records) and
scores it on the sweep's questions. The sweep's results for the untouched model and the plan are copied into --out
(not measured again; the plan is filed as "skipit@SHARE" so that the sweep's summary pairs it with the baselines),
the baselines are scored untimed (accuracy only), and --out/sweep.json holds the paired comparison; a markdown table
is printed (`benchmarks/sweep_markdown.py`). Resumable in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from skipit import baselines
from skipit.analysis import Analysis
from skipit.data.jsonl import load_records
from skipit.evaluation import sweep
from skipit.evaluation.run import load_vlm
from skipit.plan import Plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--sweep", required=True, help="the sweep folder holding the plan's result")
    ap.add_argument("--plan", required=True, help="the plan's name in the sweep (plans/NAME.json)")
    ap.add_argument("--data", required=True, help="the sweep's --data")
    ap.add_argument("--n", type=int, help="the sweep's --n")
    ap.add_argument("--calib", required=True, help="the sweep's --calib")
    ap.add_argument("--n-calib", type=int, default=32, help="the sweep's --n-calib")
    ap.add_argument("--analysis", required=True, help="the sweep's --analysis")
    ap.add_argument("--methods", default="divprune", help="baselines, comma-separated")
    ap.add_argument("--batch-size", type=int, default=16, help="the sweep's --batch-size")
    ap.add_argument("--repeats", type=int, default=1, help="the sweep's --repeats")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    source = Path(args.sweep) / "plans"
    try:
        row = json.loads((source / f"{args.plan}.json").read_text())
    except OSError as e:
        sys.exit(f"error: no result for plan {args.plan!r} in {args.sweep} ({e.strerror})")
    share = round(row["flops_removed"], 3)
    model, processor = load_vlm(args.model)
    records = load_records(args.data, limit=args.n)
    key = sweep.run_key(model, records, args.batch_size, args.repeats)
    if row["key"] != key:
        sys.exit(f"error: {args.sweep} was scored with other records or settings than --data/--n/--batch-size/"
                 "--repeats say: give the sweep's")  # fmt: skip
    plans_dir = Path(args.out) / "plans"
    plans_dir.mkdir(parents=True, exist_ok=True)
    mine = f"skipit@{share:g}"
    shutil.copyfile(source / "empty.json", plans_dir / "empty.json")
    (plans_dir / f"{mine}.json").write_text(json.dumps(row | {"name": mine}, indent=2) + "\n")
    encoded = sweep.speed_batch(model, processor, records)
    calib = load_records(args.calib, limit=args.n_calib)
    analysis = Analysis.load(args.analysis).result
    plans = {"empty": ("empty", Plan.from_dict(json.loads((plans_dir / "empty.json").read_text())["plan"])),
             mine: ("skipit", Plan.from_dict(row["plan"]))}  # fmt: skip
    cache: dict = {}
    for method in args.methods.split(","):
        plan = baselines.baseline_plan(method, model, processor, calib, encoded, share, analysis=analysis, cache=cache)
        plans[f"{method}@{share:g}"] = ("baseline", plan)
    sweep.run(model, processor, records, args.out, plans, analysis=analysis, batch_size=args.batch_size,
              repeats=args.repeats, encoded=encoded, timed=lambda name: False)  # fmt: skip
    table = Path(__file__).with_name("sweep_markdown.py")
    return subprocess.call([sys.executable, str(table), str(Path(args.out) / "sweep.json"), "--pareto"])


if __name__ == "__main__":
    sys.exit(main())
