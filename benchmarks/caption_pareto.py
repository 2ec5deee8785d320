"""Captioning under the plans of a sweep: CIDEr-D kept by every method at every budget, with paired intervals.

`skipit sweep` scores VQA; this takes the plans it compared at matched FLOPs (its sweep.json `baselines` rows: skipit's
composed plan at each budget and each baseline's) and captions the first `--n` test images under each, greedy, with
the captioning prompt. CIDEr-D's document frequencies come from the references of those images, the same for every
plan; "kept" is a plan's CIDEr-D over the untouched model's, with a paired bootstrap interval over images (the same
resampled images for both).

    .venv/bin/python benchmarks/caption_pareto.py --sweep runs/pareto --n 100 --out runs/pareto/captions.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from skipit import apply_plan, models, remove_plan
from skipit.data.jsonl import load_records
from skipit.demo.build import ensure_built, shapes_split
from skipit.evaluation import caption
from skipit.intervals import paired
from skipit.io import write_json
from skipit.plan import Plan
from skipit.progress import progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="a sweep folder (its sweep.json)")
    ap.add_argument("--model", default=None, help="the sweep's model [default: mini-llava]")
    ap.add_argument("--n", type=int, default=100, help="test images captioned")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rows = [r for r in json.loads((Path(args.sweep) / "sweep.json").read_text())["baselines"] if r["budget"]]
    model, processor = models.load(args.model or ensure_built())
    records = load_records(shapes_split("test"))
    images = caption.by_image(records)[: args.n]
    records = [rec for rec, _ in images]  # one record per image: by_image keeps the first of each
    out = {"sweep": str(args.sweep), "n_images": len(records), "rows": []}
    with progress("plan") as bar:
        task = bar.add_task("captioning under each plan", total=len(rows) + 1)
        start = time.perf_counter()
        reference = caption.evaluate(model, processor, records, args.batch_size)
        bar.advance(task)
        ref_scores = [p["cider"] for p in reference["predictions"]]
        out["reference"] = {"cider": reference["cider"], "cider_ci": reference["cider_ci"],
                            "seconds": round(time.perf_counter() - start, 1),
                            "examples": [p["prediction"] for p in reference["predictions"][:3]]}  # fmt: skip
        for row in rows:
            start = time.perf_counter()
            apply_plan(model, Plan.from_dict(row["plan"]))
            try:
                run = caption.evaluate(model, processor, records, args.batch_size)
            finally:
                remove_plan(model)
            compared = paired(ref_scores, [p["cider"] for p in run["predictions"]])
            out["rows"].append({"method": row["method"], "budget": row["budget"],
                                "flops_removed": row["flops_removed"], "cider": run["cider"],
                                "kept": compared.kept.to_dict(), "difference": compared.difference.to_dict(),
                                "seconds": round(time.perf_counter() - start, 1),
                                "scores": [p["cider"] for p in run["predictions"]]})  # fmt: skip
            bar.advance(task)
    # skipit against each method at the same budget, paired over images (CIDEr-D points)
    skipit = {r["budget"]: r for r in out["rows"] if r["method"] == "skipit"}
    for r in out["rows"]:
        if r["method"] != "skipit" and r["budget"] in skipit:
            r["skipit_gain"] = paired(r["scores"], skipit[r["budget"]]["scores"]).difference.to_dict()
    write_json(args.out, out)

    ref = out["reference"]
    print(f"untouched: CIDEr-D {ref['cider']:.3f} [{ref['cider_ci']['low']:.3f}, {ref['cider_ci']['high']:.3f}] "
          f"on {len(records)} test images; e.g. {ref['examples'][0]!r}")
    print("\n| budget | method | FLOPs removed | CIDEr-D | CIDEr-D kept [95 % CI] | skipit's gain [95 % CI] |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in sorted(out["rows"], key=lambda r: (r["budget"], r["method"] != "skipit", r["method"])):
        k, g = r["kept"], r.get("skipit_gain")
        gain = f"{g['value']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "–"
        print(f"| {r['budget']:g} | {r['method']} | {r['flops_removed']:.1%} | {r['cider']:.3f} | "
              f"{k['value']:.1%} [{k['low']:.1%}, {k['high']:.1%}] | {gain} |")


if __name__ == "__main__":
    main()
