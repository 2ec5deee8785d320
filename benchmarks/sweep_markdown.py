"""Markdown tables of a sweep (for docs/planning.md): every plan, the correlations, and the baselines.

    python benchmarks/sweep_markdown.py runs/mini-llava/sweep.json [--analysis RUN_DIR]
    python benchmarks/sweep_markdown.py runs/pareto/sweep.json --pareto

--pareto prints only the comparison at matched FLOPs: every method at every budget with skipit's paired gain, the
largest cut each keeps 99 % at, and the captions (`skipit sweep --captions`) when the sweep has them.

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
    ap.add_argument("--pareto", action="store_true", help="only the comparison at matched FLOPs")
    args = ap.parse_args()
    sweep = json.loads(Path(args.sweep).read_text())
    if args.pareto:
        return pareto(sweep)
    if args.analysis:
        from skipit.evaluation.sweep import judge
        from skipit.result import AnalysisResult

        analysis = AnalysisResult.load(Path(args.analysis))
        sweep |= judge(sweep["plans"], analysis, sweep["lost_points"])
    ref = sweep["reference"]["accuracy"]
    print(f"Reference (no plan): accuracy {with_ci(ref, sweep['reference'].get('accuracy_ci'))} on "
          f"{sweep['data']['n']} questions. Intervals: 95 % paired bootstrap over the same questions; p: McNemar's "
          "exact test against no plan; a speed-up that is not a result (rounds disagree, beats its ideal by more "
          "than 15 %, or the empty-plan control strayed) reads \"noisy\".\n")
    print("| plan | accuracy | drop (points) | p | FLOPs removed | prefill x (ideal) | decode x | safe |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    order = ["empty", "late_entry", "early_exit", "vision_frozen", "layer_skip", "skipit", "baseline"]

    def key(r):
        tail = r["name"].rsplit("_", 1)[-1]
        return order.index(r["family"]) if r["family"] in order else 99, int(tail) if tail.isdigit() else 0, r["name"]

    for r in sorted(sweep["plans"], key=key):
        safe = "" if "safe" not in r else ("yes" if r["safe"] else "no")
        print(f"| {r['name']} | {with_ci(r['accuracy'], r.get('accuracy_ci'))} | "
              f"{with_ci(r['accuracy_drop'], r.get('drop_ci'), '+.1f')} | {p_value(r)} | {r['flops_removed']:.1%} | "
              f"{speedup(r, 'prefill')} ({r['ideal_prefill_speedup']:.2f}) | {speedup(r, 'decode')} | {safe} |")
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
        if "safe_but_lost_significant" in sweep:
            real = sweep["safe_but_lost_significant"]
            print(f"Of those, significant (McNemar p < 0.05): {', '.join(real) or 'none: each may be chance'}.")
    print("\n| method | budget | FLOPs removed | prefill x | decode x | accuracy | kept |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in sorted(sweep["baselines"], key=lambda b: (b["budget"] or 0, b["method"] != "skipit", b["method"])):
        budget = "default" if b["budget"] is None else f"{b['budget']:g}"
        print(f"| {b['method']} | {budget} | {b['flops_removed']:.1%} | {speedup(b, 'prefill')} | "
              f"{speedup(b, 'decode')} | {with_ci(b['accuracy'], b.get('accuracy_ci'))} | "
              f"{with_ci(b['accuracy_kept'], b.get('accuracy_kept_ci'), '.1%')} |")
    if sweep.get("skipit_vs_baselines"):
        print("\n| budget | method | skipit's gain (points) | skipit right / wrong where it is not | McNemar p |")
        print("|---:|---|---:|---:|---:|")
        for v in sweep["skipit_vs_baselines"]:
            gain = v["skipit_gain_points"]
            print(f"| {v['budget']:g} | {v['baseline']} | {with_ci(gain['value'], gain, '+.1f')} | "
                  f"{v['skipit_better']} / {v['skipit_worse']} | {v['mcnemar_p']:.2g} |")


def pareto(sweep: dict) -> None:
    ref = sweep["reference"]
    print(f"Reference (no plan): accuracy {with_ci(ref['accuracy'], ref.get('accuracy_ci'))} on "
          f"{sweep['data']['n']} questions.\n")
    gains = {(v["budget"], v["baseline"]): v for v in sweep.get("skipit_vs_baselines") or []}
    print("| budget | method | FLOPs removed | accuracy kept [95 % CI] | skipit's gain, points [95 % CI] | McNemar p |")
    print("|---:|---|---:|---:|---:|---:|")
    rows = sorted(sweep["baselines"], key=lambda b: (b["budget"] is None, b["budget"] or 0, b["method"] != "skipit",
                                                     b["method"]))  # fmt: skip
    for b in rows:
        v = gains.get((b["budget"], b["method"]))
        gain = "–" if v is None else with_ci(v["skipit_gain_points"]["value"], v["skipit_gain_points"], "+.1f")
        p = "–" if v is None else f"{v['mcnemar_p']:.2g}"
        budget = "own" if b["budget"] is None else f"{b['budget']:g}"
        print(f"| {budget} | {b['method']} | {b['flops_removed']:.1%} | "
              f"{with_ci(b['accuracy_kept'], b.get('accuracy_kept_ci'), '.1%')} | {gain} | {p} |")
    cuts = sweep.get("largest_cut_kept") or []
    if cuts:
        print(f"\nThe largest cut keeping {cuts[0]['level']:.0%} of the accuracy, of the budgets tried:\n")
        print("| method | budget | FLOPs removed | accuracy kept [95 % CI] |")
        print("|---|---:|---:|---:|")
        for c in sorted(cuts, key=lambda c: -(c["flops_removed"] or 0)):
            if c["flops_removed"] is None:
                print(f"| {c['method']} | none | – | – |")
            else:
                print(f"| {c['method']} | {c['budget']:g} | {c['flops_removed']:.1%} | "
                      f"{with_ci(c['accuracy_kept'], c['accuracy_kept_ci'], '.1%')} |")
    captions = sweep.get("captions")
    if captions:
        ref = captions["reference"]
        print(f"\nCaptions: {captions['n_images']} images, the untouched model's CIDEr-D "
              f"{with_ci(ref['cider'], ref['cider_ci'])}.\n")
        print("| budget | method | FLOPs removed | CIDEr-D | CIDEr-D kept [95 % CI] | skipit's gain [95 % CI] |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in sorted(captions["rows"], key=lambda r: (r["budget"], r["method"] != "skipit", r["method"])):
            gain = with_ci(r["skipit_gain"]["value"], r["skipit_gain"], "+.3f") if r.get("skipit_gain") else "–"
            kept = "–" if r["cider_kept"] is None else with_ci(r["cider_kept"], r["cider_kept_ci"], ".1%")
            print(f"| {r['budget']:g} | {r['method']} | {r['flops_removed']:.1%} | {r['cider']:.3f} | {kept} | "
                  f"{gain} |")


def with_ci(value, ci, spec: str = ".3f") -> str:
    if not ci:
        return f"{value:{spec}}"
    return f"{value:{spec}} [{ci['low']:{spec}}, {ci['high']:{spec}}]"


def p_value(row: dict) -> str:
    p = row.get("mcnemar_p")
    return "" if p is None or p != p else f"{p:.2g}"


def speedup(row: dict, kind: str) -> str:
    if any(kind in reason for reason in row.get("speed_noisy") or []):
        return "noisy"
    low, high = row.get(f"{kind}_speedup_low"), row.get(f"{kind}_speedup_high")
    text = f"{row[f'{kind}_speedup']:.2f}"
    return text if low is None else f"{text} [{low:.2f}, {high:.2f}]"


if __name__ == "__main__":
    main()
