"""Does the composed planner's objective rank plans like their test accuracy? Plans of many shapes at one budget.

    python benchmarks/objective.py ~/.cache/skipit/mini-llava-v3 --data ~/.cache/skipit/shapes/test --n 400 \
        --calib ~/.cache/skipit/shapes/calibration --budget 0.5 --seen 64 --fresh 192 \
        --extra runs/pareto-1200/plans/skipit@0.5.json --out runs/objective-50

Every plan of `SHAPES` is fitted to remove the budget's share of the prefill FLOPs on the sweep's speed batch (its
last pruning share the largest that meets it; a shape that cannot reach the budget is left out), and `--extra` adds
saved plans (a sweep's result files) as they are. Each is scored on the first N test questions (the sweep's
machinery, untimed, resumable in --out), and measured label-free on calibration records: the first `--seen` (those
a composer given `--n-calib` of that many used to choose its plan) and the next `--fresh` (which no composer saw).
Label-free objectives, over the first answer token as the composer's KL: the mean KL(untouched || plan), its median,
the share of records whose top-1 token is kept, and the mean log-probability the plan loses on the untouched top-1.
Printed: each plan's measurements, then each objective's rank correlation with the accuracy kept across the plans.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from skipit.composer import ModelMeasurer
from skipit.data.jsonl import load_records
from skipit.errors import SkipitError
from skipit.evaluation import sweep
from skipit.evaluation.run import load_vlm
from skipit.flops import largest_keep_share, prefill_saving
from skipit.plan import Plan

DIVPRUNE = dict(prune_vision_after=-1, prune_vision_rank="divprune")
# name -> the plan's decisions; its last pruning share (prune_vision_keep) is fitted to the budget
SHAPES = {
    "divprune": DIVPRUNE,
    **{f"divprune+exit{m}": DIVPRUNE | dict(early_exit=m) for m in (24, 20, 16, 12)},
    "in0.25+attention-after4": dict(input_vision_keep=0.25, prune_vision_after=4),
    "in0.25+attention-after8+exit24": dict(input_vision_keep=0.25, prune_vision_after=8, early_exit=24),
    "in0.3+attention-after4+exit24": dict(input_vision_keep=0.3, prune_vision_after=4, early_exit=24),
    "in0.25+dart-after4+exit24": dict(input_vision_keep=0.25, prune_vision_after=4, early_exit=24,
                                      prune_vision_rank="dart"),
}  # fmt: skip
OBJECTIVES = {"kl": -1, "kl_median": -1, "top1_kept": 1, "top1_logprob_lost": -1}  # sign: larger is better


def objectives(measurer: ModelMeasurer, plan: Plan) -> dict[str, float]:
    kl, kept, lost = [], [], []
    for split in ("score", "heldout"):
        for p, q in zip(measurer.reference[split], measurer._logprobs(split, plan), strict=True):
            p, q = p[:, 0], q[:, 0]  # the answer token's log-probabilities, untouched and under the plan
            top = p.argmax(-1, keepdim=True)
            kl += (p.exp() * (p - q)).sum(-1).tolist()
            kept += (q.argmax(-1, keepdim=True) == top)[:, 0].float().tolist()
            lost += (p.gather(-1, top) - q.gather(-1, top))[:, 0].tolist()
    return {"kl": sum(kl) / len(kl), "kl_median": torch.tensor(kl).median().item(),
            "top1_kept": sum(kept) / len(kept), "top1_logprob_lost": sum(lost) / len(lost)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=400, help="test questions (the first N)")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--seen", type=int, default=64, help="calibration records a composer used (the first)")
    ap.add_argument("--fresh", type=int, default=192, help="calibration records after those")
    ap.add_argument("--extra", nargs="*", default=[], help="saved plans to add (a sweep's plans/NAME.json)")
    ap.add_argument("--out", required=True, help="folder for the scored plans (a rerun resumes)")
    args = ap.parse_args()
    model, processor = load_vlm(args.model)
    records = load_records(args.data, limit=args.n)
    encoded = sweep.speed_batch(model, processor, records)
    empty = Plan.for_model(model)

    def fitted(fields: dict) -> Plan | None:
        def make(share: float) -> Plan | None:
            try:
                return empty.with_decisions(**fields, prune_vision_keep=share)
            except SkipitError:  # a share the plan cannot hold (above its input share)
                return None

        share = largest_keep_share(lambda f: (p := make(f)) is not None and prefill_saving(model, encoded, p)
                                   >= args.budget)  # fmt: skip
        return None if share is None else make(share)

    plans = {name: plan for name, fields in SHAPES.items() if (plan := fitted(fields)) is not None}
    for path in map(Path, args.extra):
        plans[path.stem] = Plan.from_dict(json.loads(path.read_text())["plan"])
    run = {"empty": ("empty", empty)} | {name: ("plan", plan) for name, plan in plans.items()}
    sweep.run(model, processor, records, args.out, run, repeats=1, timed=lambda name: False, encoded=encoded,
              on_plan=lambda name: print(f"scored {name}", flush=True))  # fmt: skip
    rows = {name: json.loads((Path(args.out) / "plans" / f"{name}.json").read_text()) for name in run}
    reference = rows["empty"]["accuracy"]

    calib = load_records(args.calib, limit=args.seen + args.fresh)
    half = lambda rows: (rows[: len(rows) // 2], rows[len(rows) // 2 :])  # noqa: E731
    sets = {"seen": ModelMeasurer(model, processor, *half(calib[: args.seen])),
            "fresh": ModelMeasurer(model, processor, *half(calib[args.seen :]))}  # fmt: skip
    table = []
    for name, plan in plans.items():
        row = {"plan": name, "flops_removed": rows[name]["flops_removed"], "kept": rows[name]["accuracy"] / reference}
        for label, measurer in sets.items():
            row |= {f"{label}_{k}": v for k, v in objectives(measurer, plan).items()}
        table.append(row)
        print(json.dumps(row), flush=True)
    (Path(args.out) / "objective.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"\n{len(table)} plans at {args.budget:.0%}; reference accuracy {reference:.3f}, {len(records)} questions\n")
    print("| plan | FLOPs removed | accuracy kept | KL seen | KL fresh | top-1 kept fresh |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in sorted(table, key=lambda r: -r["kept"]):
        print(f"| {r['plan']} | {r['flops_removed']:.1%} | {r['kept']:.1%} | {r['seen_kl']:.3f} | "
              f"{r['fresh_kl']:.3f} | {r['fresh_top1_kept']:.1%} |")  # fmt: skip
    print("\n| objective | records | Spearman | Kendall |\n|---|---|---:|---:|")
    kept = [r["kept"] for r in table]
    for label in sets:
        for key, sign in OBJECTIVES.items():
            x = [sign * r[f"{label}_{key}"] for r in table]
            print(f"| {key} | {label} | {spearmanr(x, kept).statistic:+.2f} | {kendalltau(x, kept).statistic:+.2f} |")


if __name__ == "__main__":
    main()
