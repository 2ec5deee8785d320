"""Two-stage plans against DivPrune alone at matched FLOPs: VQA accuracy on the same questions, paired.

    python benchmarks/two_stage.py ~/.cache/skipit/mini-llava-v3 ~/.cache/skipit/shapes/test --out runs/two-stage \
        --n 200 --budgets 0.4,0.5 --inputs 0.25,0.375,0.5 --after 4,8,12

For each budget: DivPrune before layer 0 at the share that meets it (as the sweep's `divprune` baseline), and for
each input share g and layer p the two-stage plan (DivPrune lets g of the vision tokens in, FastV's attention ranking
keeps the share f after layer p) with the largest f that meets the budget (none when g alone already removes more).
Plans are measured with the sweep's machinery (`skipit.evaluation.sweep.run`, untimed; resumable in --out) and
printed as a markdown table: accuracy kept with its interval, and the gain over DivPrune at the same budget (points of
accuracy, paired bootstrap over questions, McNemar's exact p).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from skipit.data.jsonl import load_records
from skipit.evaluation import sweep
from skipit.evaluation.run import load_vlm, parse_budgets
from skipit.flops import largest_keep_share, prefill_saving
from skipit.intervals import paired
from skipit.plan import Plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", help="a records file or folder (its data.jsonl)")
    ap.add_argument("--out", required=True, help="folder for the measured plans (a rerun resumes)")
    ap.add_argument("--n", type=int, default=200, help="questions (the first N records)")
    ap.add_argument("--budgets", default="0.4,0.5")
    ap.add_argument("--inputs", default="0.25,0.375,0.5", help="input shares g")
    ap.add_argument("--after", default="4,8,12", help="layers p of the second stage")
    args = ap.parse_args()
    model, processor = load_vlm(args.model)
    data = Path(args.data)
    records = load_records(data / "data.jsonl" if data.is_dir() else data, limit=args.n)
    encoded = sweep.speed_batch(model, processor, records)
    empty = Plan.for_model(model)

    def share(make, budget: float) -> float | None:  # the largest share whose plan meets the budget, floored
        found = largest_keep_share(lambda f: (p := make(f)) is not None and prefill_saving(model, encoded, p) >= budget)
        return None if found is None else math.floor(found * 1e4) / 1e4

    def two_stage(g: float, p: int):
        return lambda f: empty.with_decisions(input_vision_keep=g, prune_vision_after=p, prune_vision_keep=f) \
            if f < g else None  # fmt: skip

    plans = {"empty": ("empty", empty)}
    for b in parse_budgets(args.budgets):
        divprune = share(lambda f: empty.with_decisions(prune_vision_after=-1, prune_vision_rank="divprune",
                                                        prune_vision_keep=f), b)  # fmt: skip
        plans[f"divprune@{b}"] = ("divprune", empty.with_decisions(prune_vision_after=-1, prune_vision_rank="divprune",
                                                                   prune_vision_keep=divprune))  # fmt: skip
        for g in (float(x) for x in args.inputs.split(",")):
            for p in (int(x) for x in args.after.split(",")):
                if (f := share(two_stage(g, p), b)) is not None:
                    plans[f"two-g{g:g}-p{p}@{b}"] = ("two-stage", two_stage(g, p)(f))
    result = sweep.run(model, processor, records, args.out, plans, timed=lambda name: False, encoded=encoded,
                       on_plan=lambda name: print(f"measured {name}", flush=True))  # fmt: skip
    rows = {r["name"]: r for r in result["plans"]}
    saved = {name: json.loads((Path(args.out) / "plans" / f"{name}.json").read_text()) for name in plans}
    correct = {name: sweep._correct(row, saved["empty"]) for name, row in saved.items()}
    reference = rows["empty"]["accuracy"]
    print(f"\nReference (no plan): accuracy {reference:.3f} on {len(records)} questions.\n")
    print("| budget | plan | FLOPs removed | accuracy kept [95 % CI] | gain over DivPrune, points [95 % CI] "
          "| McNemar p |")
    print("|---:|---|---:|---:|---:|---:|")
    for name, (_, plan) in plans.items():
        if name == "empty":
            continue
        budget = name.partition("@")[2]
        kept = rows[name]["kept_ci"]
        label = (f"DivPrune {plan.prune_vision_keep:.1%}" if name.startswith("divprune") else
                 f"in {plan.input_vision_keep:.1%}, after {plan.prune_vision_after} {plan.prune_vision_keep:.1%}")
        line = (f"| {budget} | {label} | {rows[name]['flops_removed']:.1%} | {kept['value']:.1%} "
                f"[{100 * kept['low']:.1f}, {100 * kept['high']:.1f}] |")  # fmt: skip
        if name.startswith("divprune"):
            print(line + " – | – |")
            continue
        versus = paired(correct[f"divprune@{budget}"], correct[name])
        gain = versus.difference
        print(line + f" {100 * gain.value:+.1f} [{100 * gain.low:+.1f}, {100 * gain.high:+.1f}] | "
              f"{versus.mcnemar_p:.2g} |")  # fmt: skip


if __name__ == "__main__":
    main()
