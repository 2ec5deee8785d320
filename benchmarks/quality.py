"""mini-llava's answer quality on `shapes`/test: exact-match accuracy per question type, with the real image
and with a blank one ("blind"). Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python benchmarks/quality.py [--n 600] [--out runs/quality.json]
"""

from __future__ import annotations

import argparse
import time

from skipit import models
from skipit.data.jsonl import load_records
from skipit.demo.build import ensure_built, shapes_split
from skipit.evaluation import vqa
from skipit.io import write_json
from skipit.progress import progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    path = ensure_built()
    model, processor = models.load(path)
    records = load_records(shapes_split("test"), limit=args.n)
    results = {}
    for blind in (False, True):
        name = "blind" if blind else "image"
        t0 = time.perf_counter()
        with progress("q") as bar:
            task = bar.add_task(f"shapes/test ({name})", total=len(records))
            results[name] = vqa.evaluate(
                model, processor, records, args.batch_size, blind=blind, on_batch=lambda k, t=task: bar.advance(t, k)
            )
        results[name]["seconds"] = time.perf_counter() - t0

    img, blind = results["image"], results["blind"]
    # questions answered right without the image say nothing about vision; score the rest separately
    needs = vqa.needs_image(img, blind)
    acc_needs = needs["accuracy"]

    print(f"\nmini-llava ({path}) on shapes/test, {len(records)} questions, greedy, exact match\n")
    print("| question type | n | accuracy | blind accuracy |")
    print("|---|---:|---:|---:|")
    for t, v in img["per_type"].items():
        print(f"| {t} | {v['n']} | {v['accuracy']:.3f} | {blind['per_type'][t]['accuracy']:.3f} |")
    print(f"| **all** | {img['n']} | **{img['accuracy']:.3f}** | {blind['accuracy']:.3f} |")
    print(f"\naccuracy on the {needs['n']} questions the blind run gets wrong: {acc_needs:.3f}")
    print(f"time: {img['seconds']:.0f} s with images, {blind['seconds']:.0f} s blind (batch {args.batch_size})")
    if args.out:
        write_json(args.out, {"model": str(path), "n": len(records), "needs_image_accuracy": acc_needs, **results})


if __name__ == "__main__":
    main()
