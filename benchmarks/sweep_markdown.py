"""Markdown tables of a sweep (for docs/planning.md): every plan, the correlations, and the baselines.

    python benchmarks/sweep_markdown.py runs/mini-llava/sweep.json [--analysis RUN_DIR]

--analysis predicts each plan's damage from another analysis of the same model (say one made with
`skipit analyze --ablation`) and recomputes the correlations and the safe-but-lost list from it; the measured
accuracies are the sweep's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--analysis", help="run folder of another analysis of the same model")
    args = ap.parse_args()
    sweep = json.loads(Path(args.sweep).read_text())
    if args.analysis:
        from skipit.evaluation.sweep import judge

        analysis = json.loads((Path(args.analysis) / "analysis.json").read_text())
        sweep |= judge(sweep["plans"], analysis, sweep["lost_points"])
    ref = sweep["reference"]["accuracy"]
    print(f"Reference (no plan): accuracy {ref:.3f} on {sweep['data']['n']} questions.\n")
    print("| plan | accuracy | drop (points) | FLOPs removed | prefill x (ideal) | decode x | safe |")
    print("|---|---:|---:|---:|---:|---:|---|")
    order = ["empty", "late_entry", "early_exit", "vision_frozen", "layer_skip", "skipit", "baseline"]

    def key(r):
        tail = r["name"].rsplit("_", 1)[-1]
        return order.index(r["family"]) if r["family"] in order else 99, int(tail) if tail.isdigit() else 0, r["name"]

    for r in sorted(sweep["plans"], key=key):
        safe = "" if "safe" not in r else ("yes" if r["safe"] else "no")
        print(f"| {r['name']} | {r['accuracy']:.3f} | {r['accuracy_drop']:+.1f} | {r['flops_removed']:.1%} | "
              f"{r['prefill_speedup']:.2f} ({r['ideal_prefill_speedup']:.2f}) | {r['decode_speedup']:.2f} | {safe} |")
    if "correlation" in sweep:
        print("\n| measure | Spearman (all grid plans) | 95 % CI | plans |", end="")
        families = sorted(sweep["correlation_by_family"])
        print("".join(f" {f} |" for f in families))
        print("|---|---:|---|---:|" + "---:|" * len(families))
        for m, c in sweep["correlation"].items():
            ci = f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]" if c["ci_low"] is not None else "n/a"
            per = [sweep["correlation_by_family"][f].get(m, {}).get("spearman") for f in families]
            cells = "".join(f" {v:.2f} |" if v is not None and v == v else " n/a |" for v in per)
            print(f"| {m} | {c['spearman']:.2f} | {ci} | {c['n']} |{cells}")
        lost = sweep["safe_but_lost"]
        print(f"\nCalled safe but lost more than {sweep['lost_points']:g} points: {', '.join(lost) or 'none'}.")
    print("\n| method | budget | FLOPs removed | prefill x | decode x | accuracy | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in sorted(sweep["baselines"], key=lambda b: (b["budget"] or 0, b["method"] != "skipit", b["method"])):
        budget = "default" if b["budget"] is None else f"{b['budget']:g}"
        print(f"| {b['method']} | {budget} | {b['flops_removed']:.1%} | {b['prefill_speedup']:.2f} | "
              f"{b['decode_speedup']:.2f} | {b['accuracy']:.3f} | {b['accuracy_kept']:.1%} |")


if __name__ == "__main__":
    main()
