"""mini-llava's answer quality on `shapes`/test: exact-match accuracy per question type, with the real image
and with a blank one ("blind"). Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python benchmarks/quality.py [--n 600] [--out runs/quality.json]
    .venv/bin/python benchmarks/quality.py --trained ckpt.safetensors --split calibration --n 224 --no-blind

Accuracies carry 95 % bootstrap intervals over questions. `--trained` scores other trained weights (a training
checkpoint) instead of the shipped mini-llava.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from skipit import models
from skipit.data.jsonl import load_records
from skipit.demo.build import build, ensure_built, shapes_split
from skipit.evaluation import caption, vqa
from skipit.io import write_json
from skipit.progress import progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trained", default=None, help="trained weights to score instead of the shipped ones")
    ap.add_argument("--split", default="test", choices=("test", "calibration"))
    ap.add_argument("--no-blind", action="store_true", help="skip the blind run")
    ap.add_argument("--captions", type=int, default=0, help="also caption this many test images (CIDEr-D)")
    args = ap.parse_args()

    path = build(Path(tempfile.mkdtemp(prefix="quality-")) / "model", args.trained) if args.trained else ensure_built()
    model, processor = models.load(path)
    records = load_records(shapes_split(args.split), limit=args.n)
    results = {}
    for blind in (False,) if args.no_blind else (False, True):
        name = "blind" if blind else "image"
        t0 = time.perf_counter()
        with progress("q") as bar:
            task = bar.add_task(f"shapes/{args.split} ({name})", total=len(records))
            results[name] = vqa.evaluate(
                model, processor, records, args.batch_size, blind=blind, on_batch=lambda k, t=task: bar.advance(t, k)
            )
        results[name]["seconds"] = time.perf_counter() - t0

    img, blind = results["image"], results.get("blind")

    def cell(run: dict | None, t: str | None = None) -> str:
        if run is None:
            return "-"
        acc = run["accuracy"] if t is None else run["per_type"][t]["accuracy"]
        ci = run["intervals"]["accuracy"] if t is None else run["intervals"]["per_type"][t]["accuracy"]
        return f"{acc:.3f} [{ci['low']:.2f}, {ci['high']:.2f}]"

    name = args.trained or path
    print(f"\nmini-llava ({name}) on shapes/{args.split}, {len(records)} questions, greedy, exact match\n")
    print("| question type | n | accuracy [95 % CI] | blind accuracy [95 % CI] |")
    print("|---|---:|---:|---:|")
    for t, v in img["per_type"].items():
        print(f"| {t} | {v['n']} | {cell(img, t)} | {cell(blind, t)} |")
    print(f"| **all** | {img['n']} | **{cell(img)}** | {cell(blind)} |")
    summary = {"model": str(args.trained or path), "split": args.split, "n": len(records)}
    if blind is not None:
        # questions answered right without the image say nothing about vision; score the rest separately
        needs = vqa.needs_image(img, blind)
        summary["needs_image_accuracy"] = needs["accuracy"]
        print(f"\naccuracy on the {needs['n']} questions the blind run gets wrong: {needs['accuracy']:.3f}")
        print(f"time: {img['seconds']:.0f} s with images, {blind['seconds']:.0f} s blind (batch {args.batch_size})")
    else:
        print(f"\ntime: {img['seconds']:.0f} s (batch {args.batch_size})")
    if args.captions:
        images = load_records(shapes_split(args.split), limit=args.captions)
        for blind in (False,) if args.no_blind else (False, True):
            name = "caption_blind" if blind else "caption"
            t0 = time.perf_counter()
            results[name] = caption.evaluate(model, processor, images, args.batch_size, blind=blind)
            ci = results[name]["cider_ci"]
            print(f"captioning CIDEr-D{' (blind)' if blind else ''} on {results[name]['n']} images: "
                  f"{results[name]['cider']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] "
                  f"({time.perf_counter() - t0:.0f} s)")
        print("e.g.", results["caption"]["predictions"][0]["prediction"], "|",
              results["caption"]["predictions"][0]["references"][0])
    if args.out:
        write_json(args.out, {**summary, **results})


if __name__ == "__main__":
    main()
