"""Cost of calibration on mini-llava over the `shapes` calibration split.

1. Cheap calibration (geometric, proximal, VAR under eager attention, CKA / informational token sketch, logit
   lens) against a plain forward pass (SDPA, the same call and inputs, no hooks), timed side by side: A/B
   repetitions alternate (and swap order every repetition); medians are reported. Inputs are prepared once, so
   neither side pays for image loading or tokenisation. finalize() (k-means, CKA, bootstrap CIs) is timed apart:
   it runs once per analysis, not per batch.
2. Peak RSS of a fresh process calibrating 100 and 1000 examples (the split's records repeated under new ids), and
   the size of the accumulated statistics: both should not grow with the number of examples.
3. The expensive measures (ablation KL + Lipschitz pairs: one extra forward per layer and modality) on one batch.

    nice -n 10 .venv/bin/python benchmarks/analyze_cost.py [--model PATH] [--parts timing,ablation,memory]
        [--n 64] [--reps 3] [--batch-size 16] [--ablation-examples 4] [--memory 100 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch

from skipit import capture, models
from skipit.analysis import batch_inputs
from skipit.capture import Calibrator
from skipit.data.jsonl import load_records
from skipit.demo.build import default_model_path, shapes_split
from skipit.stats import StatsConfig


def calibration_records(n: int):
    base = load_records(shapes_split("calibration"))
    return [dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}#{i // len(base)}")
            for i in range(n)]


def prepare(processor, records, batch_size: int):
    return [(batch_inputs(processor, records[i:i + batch_size], True), [r.id for r in records[i:i + batch_size]])
            for i in range(0, len(records), batch_size)]


@torch.no_grad()
def plain(model, batches) -> None:
    for inputs, _ in batches:
        model(**inputs, use_cache=False, logits_to_keep=1)  # the call Calibrator makes, without hooks


def calibrate(model, batches, ablation: bool = False, logit_lens: bool = True) -> Calibrator:
    with Calibrator(model, StatsConfig(), ablation=ablation, logit_lens=logit_lens) as cal:
        for inputs, ids in batches:
            cal.update(inputs, ids)
    return cal


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def stats_bytes(cal: Calibrator) -> int:
    parts = (cal.layer_stats, cal.attention_stats, cal.functional_stats)
    return sum(t.numel() * t.element_size() for p in parts for t in p.state_dict().values())


def memory_child(model_path: str, n: int, batch_size: int) -> None:
    """Calibrate n examples streaming (inputs built batch by batch) and print peak RSS as JSON."""
    model, processor = models.load(model_path)
    records = calibration_records(n)
    with Calibrator(model, StatsConfig()) as cal:
        for i in range(0, n, batch_size):
            batch = records[i:i + batch_size]
            cal.update(batch_inputs(processor, batch, True), [r.id for r in batch])
            if i == 0:
                first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "peak_rss_mb": peak, "rss_after_first_batch_mb": first,
                      "stats_mb": stats_bytes(cal) / 2**20}))


def timing(model, processor, args) -> None:
    batches = prepare(processor, calibration_records(args.n), args.batch_size)
    n_tokens = sum(int(inputs["attention_mask"].sum()) for inputs, _ in batches)
    plain(model, batches[:1])  # warm-up both paths
    calibrate(model, batches[:1])
    arms = {"plain": plain, "cheap": lambda m, b: calibrate(m, b, logit_lens=False), "cheap+lens": calibrate}
    times, cal = {name: [] for name in arms}, None
    for rep in range(args.reps):
        for name in list(arms)[rep % 3:] + list(arms)[:rep % 3]:  # rotate the order every repetition
            seconds, out = timed(arms[name], model, batches)
            times[name].append(seconds)
            if name == "cheap+lens":
                cal = out
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    t_fin, _ = timed(lambda: (cal.layer_stats.finalize(), cal.attention_stats.finalize(),
                              cal.functional_stats.finalize()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "examples": args.n, "batch_size": args.batch_size, "tokens": n_tokens, "reps": args.reps, "seconds": times,
        "median_s": med, "ratio_cheap": med["cheap"] / med["plain"],
        "ratio_cheap+lens": med["cheap+lens"] / med["plain"],
        "examples_per_s": {k: args.n / v for k, v in med.items()}, "finalize_s": t_fin,
    }), flush=True)


def ablation(model, processor, args) -> None:
    """Calibration with the ablation KL, each ablation rerunning layers j..L-1 from the captured X_j (skipit's
    path) and, side by side, one full forward per ablation (the path it replaced), against a plain forward;
    medians over --reps alternating repetitions, and the largest difference between the two paths' results."""
    one = prepare(processor, calibration_records(args.ablation_examples), args.ablation_examples)
    full_forwards = mock.patch.object(capture._LayerCalls, "replays", lambda self, hidden: False)
    arms = {"plain": lambda: plain(model, one), "rerun": lambda: calibrate(model, one, True)}

    def full():
        with full_forwards:
            return calibrate(model, one, True)

    arms["full_forwards"] = full
    plain(model, one)  # warm-up
    times, results = {name: [] for name in arms}, {}
    for rep in range(args.reps):
        for name in list(arms)[rep % 3:] + list(arms)[:rep % 3]:
            seconds, out = timed(arms[name])
            times[name].append(seconds)
            results[name] = out
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = (results[k].functional_stats.finalize()["ablation"] for k in ("rerun", "full_forwards"))
    diff = max(abs(x - y) for m in a for x, y in zip(a[m]["kl"]["mean"], b[m]["kl"]["mean"], strict=True)
               if x is not None and y is not None)
    print(json.dumps({"examples": args.ablation_examples, "reps": args.reps, "median_s": med,
                      "ratio_rerun": med["rerun"] / med["plain"],
                      "ratio_full_forwards": med["full_forwards"] / med["plain"],
                      "max_abs_kl_difference": diff}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--parts", default="timing,ablation,memory", help="comma-separated: timing, ablation, memory")
    ap.add_argument("--n", type=int, default=64, help="examples per timed repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ablation-examples", type=int, default=4)
    ap.add_argument("--memory", type=int, nargs="*", default=[100, 1000], help="example counts for the RSS runs")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.model, args.memory_child, args.batch_size)
    parts = args.parts.split(",")
    print(f"torch threads: {torch.get_num_threads()}, model: {args.model}", flush=True)
    model, processor = models.load(args.model)
    if "timing" in parts:
        timing(model, processor, args)
    if "ablation" in parts:
        ablation(model, processor, args)
    for n in args.memory if "memory" in parts else ():
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--memory-child", str(n),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
