"""Speed and memory of a model with and without skip plans, next to the FLOPs that predict them.

For each configuration (None: the untouched model, or a `Plan`) one run measures:
- the prefill: one forward over the prompt that fills the cache and gives the first token's logits, with the vision
  features computed beforehand (so the time is the language backbone's, the part a plan changes, as in `flops`);
- decoding: `generate()` with a clock in its logits processors, giving the time to the first token (vision encoder
  excluded, as above) and the mean time of a decode step (one new token per row);
- the KV cache: bytes held by the cache tensors after generation, and the process' peak memory (CUDA: peak
  allocated; CPU: peak resident set, reset before each run).
Configurations are measured round-robin (order reversed every other round) and summarised by medians of ratios to
the untouched run of the same round: machines are shared and noisy, so only side-by-side ratios mean anything.
"""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from skipit import compat
from skipit.errors import SkipitError
from skipit.flops import batch_costs
from skipit.plan import Plan
from skipit.prompts import model_inputs
from skipit.skipping import apply_plan, remove_plan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_images(model, inputs: dict) -> tuple[dict, float]:
    """`inputs` with the pixels replaced by the vision encoder's output (what generate() computes before the
    prefill), and the seconds the encoder took. Models without pre-encoding keep their pixels (and time 0)."""
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    modalities = set(getattr(model, "input_modalities", ())) & {"image", "video"}
    if supports is None or not supports() or not modalities:
        return dict(inputs), 0.0
    device = model.device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        encoded = model._prepare_multimodal_encoder_kwargs_for_generation(dict(inputs))
    _sync(device)
    return encoded, time.perf_counter() - start


class _PeakMemory:
    """Peak memory over a block: CUDA peak allocated, or on CPU the peak resident set (Linux resets it per block)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):  # if so, the peak is the process' lifetime peak
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        try:
            self.peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
        except (OSError, TypeError):
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Clock(LogitsProcessor):
    """Records when each step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers cache (layers that cached nothing hold none)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "is_initialized", False):
            total += layer.keys.nbytes + layer.values.nbytes
    return total


@dataclass
class Run:
    batch: int
    prefill_s: float  # one forward over the prompts, vision features precomputed
    first_token_s: float  # generate() until the first token, vision features precomputed
    decode_s: float  # mean seconds per decode step (one token per row)
    kv_bytes: int  # cache after generation: prompts + (new_tokens - 1) tokens
    peak_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.decode_s if self.decode_s else float("nan")


@torch.inference_mode()
def measure(model, encoded: dict, plan: Plan | None = None, new_tokens: int = 16, separate_prefill: bool = True) -> Run:
    """One run of `model` (with `plan` applied for the run, if any) on inputs from `encode_images`. Without
    `separate_prefill`, the prefill is timed as generate()'s time to the first token (one call instead of two)."""
    if new_tokens < 2:
        raise SkipitError("measuring decode speed needs at least 2 new tokens")
    device = model.device
    if plan is not None:
        apply_plan(model, plan)
    try:
        with _PeakMemory(device) as peak:
            prefill = None
            if separate_prefill:
                _sync(device)
                start = time.perf_counter()
                model(**encoded, use_cache=True, logits_to_keep=1)
                _sync(device)
                prefill = time.perf_counter() - start
            clock = _Clock(device)
            start = time.perf_counter()
            out = model.generate(
                **encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        if plan is not None:
            remove_plan(model)
    t = clock.times
    return Run(
        batch=encoded["input_ids"].shape[0],
        prefill_s=t[0] - start if prefill is None else prefill,
        first_token_s=t[0] - start,
        decode_s=(t[-1] - t[0]) / (len(t) - 1),
        kv_bytes=cache_bytes(compat.output_cache(out)),
        peak_bytes=peak.peak,
    )


def compare(
    model,
    encoded: dict,
    configs: dict[str, Plan | None],
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    on_run: Callable[[str], None] | None = None,
    separate_prefill: bool = True,
) -> dict[str, list[Run]]:
    """Runs of every configuration, round-robin, `warmup` rounds discarded; the order flips every other round."""
    runs: dict[str, list[Run]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            run = measure(model, encoded, configs[name], new_tokens, separate_prefill)
            if r >= warmup:
                runs[name].append(run)
            if on_run:
                on_run(name)
    return runs


def measure_generation(model, processor, images, texts, new_tokens: int = 16, repeats: int = 3) -> dict:
    """Prefill, time to first token, decode speed and peak memory of generation on one batch of prompts, under
    whatever plan the model follows now (medians of `repeats` runs after one warm-up run).

    The vision encoder runs once beforehand and is reported apart: a plan changes the language backbone only.
    Peak memory is CUDA's peak allocated, or on CPU the process' peak resident set over the run (`_PeakMemory`).
    """
    encoded, encode_s = encode_images(model, model_inputs(processor, texts, images, device=model.device))
    runs = compare(model, encoded, {"eval": None}, new_tokens=new_tokens, repeats=repeats)["eval"]

    def median(key: Callable[[Run], float]) -> float:
        return statistics.median(key(r) for r in runs)

    return {
        "batch": len(texts),
        "prompt_tokens": encoded["input_ids"].shape[1],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": str(model.device),
        "vision_encoder_ms": 1e3 * encode_s,
        "prefill_ms": 1e3 * median(lambda r: r.prefill_s),
        "first_token_ms": 1e3 * median(lambda r: r.first_token_s),
        "decode_tokens_per_s": median(lambda r: r.tokens_per_s),
        "kv_cache_mib": median(lambda r: r.kv_bytes) / 2**20,
        "peak_memory_mib": median(lambda r: r.peak_bytes) / 2**20,
        "peak_memory_kind": "cuda_max_allocated" if model.device.type == "cuda" else "peak_resident_set",
    }


# When a measured speed-up is not a result: its rounds disagree by more than SPREAD (highest / lowest ratio), or it
# beats its physical ideal (FLOPs) by more than ABOVE_IDEAL, or the empty plan's control strays from 1 by more than
# CONTROL. A busy machine produces all three; such a figure is re-measured, then flagged, never printed as a result.
SPREAD, ABOVE_IDEAL, CONTROL = 1.3, 1.15, 0.10


def _ratios(a: list[Run], b: list[Run], key: Callable[[Run], float]) -> list[float]:
    """Per round: a's time over b's (rounds ran side by side, so the machine's state at the time cancels)."""
    return [key(x) / key(y) for x, y in zip(a, b, strict=True)]


def _median_ratio(a: list[Run], b: list[Run], key: Callable[[Run], float]) -> float:
    return statistics.median(_ratios(a, b, key))


def noise(row: dict) -> list[str]:
    """Why the speed-ups of a `speed_rows` row cannot be trusted (empty: they can)."""
    reasons = []
    for kind in ("prefill", "decode"):
        low, high = row[f"{kind}_speedup_low"], row[f"{kind}_speedup_high"]
        if high > SPREAD * low:
            reasons.append(f"{kind} rounds disagree ({low:.2f}-{high:.2f})")
        if row[f"{kind}_speedup"] > ABOVE_IDEAL * row[f"ideal_{kind}_speedup"]:
            reasons.append(f"{kind} x{row[f'{kind}_speedup']:.2f} beats its ideal x{row[f'ideal_{kind}_speedup']:.2f}")
    return reasons


def control_noise(row: dict) -> list[str]:
    """Why an empty plan's row (which should measure x1.00) says the machine was too busy to time anything."""
    return [f"the empty plan's {kind} measured x{row[f'{kind}_speedup']:.2f}" for kind in ("prefill", "decode")
            if abs(row[f"{kind}_speedup"] - 1) > CONTROL]  # fmt: skip


def speed_rows(
    model, encoded: dict, configs: dict[str, Plan | None], runs: dict[str, list[Run]], new_tokens: int,
    baseline: str = "untouched",
) -> list[dict]:  # fmt: skip
    """One row per configuration: medians, measured (with their range over rounds) and ideal (FLOPs) ratios to
    `baseline`, and under "noisy" why the measured ones cannot be trusted (`noise`; empty: they can)."""
    base_runs = runs[baseline]
    base = batch_costs(model, encoded, configs[baseline], new_tokens)
    rows = []
    for name, plan in configs.items():
        mine, c = runs[name], batch_costs(model, encoded, plan, new_tokens)
        prefill_ratios = _ratios(base_runs, mine, lambda r: r.prefill_s)
        decode_ratios = _ratios(base_runs, mine, lambda r: r.decode_s)
        prefill_speedup = statistics.median(prefill_ratios)
        ideal_prefill = base["prefill"] / c["prefill"]
        rows.append({
            "config": name,
            "prefill_ms": 1e3 * statistics.median(r.prefill_s for r in mine),
            "first_token_ms": 1e3 * statistics.median(r.first_token_s for r in mine),
            "prefill_speedup": prefill_speedup,
            "ideal_prefill_speedup": ideal_prefill,
            "ratio_to_ideal": prefill_speedup / ideal_prefill,
            "tokens_per_s": statistics.median(r.tokens_per_s for r in mine),
            "decode_speedup": statistics.median(decode_ratios),
            "ideal_decode_speedup": base["decode"] / c["decode"],
            # the range over rounds: with a handful of rounds, an interval needs no more assumptions than that
            "prefill_speedup_low": min(prefill_ratios), "prefill_speedup_high": max(prefill_ratios),
            "decode_speedup_low": min(decode_ratios), "decode_speedup_high": max(decode_ratios),
            "kv_mib": statistics.median(r.kv_bytes for r in mine) / 2**20,
            "kv_ratio": statistics.median(r.kv_bytes for r in mine) / statistics.median(r.kv_bytes for r in base_runs),
            "ideal_kv_ratio": c["kv_bytes"] / base["kv_bytes"],
            "peak_mib": statistics.median(r.peak_bytes for r in mine) / 2**20,
            "prefill_gflops": c["prefill"] / 1e9,
        })  # fmt: skip
        rows[-1]["noisy"] = noise(rows[-1])
    return rows


COLUMNS = [  # (key, header, format)
    ("config", "plan", "{}"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("prefill_speedup", "prefill speed-up", "{:.2f}"),
    ("ideal_prefill_speedup", "ideal (FLOPs)", "{:.2f}"),
    ("ratio_to_ideal", "measured / ideal", "{:.2f}"),
    ("first_token_ms", "1st token ms", "{:.1f}"),
    ("tokens_per_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode speed-up", "{:.2f}"),
    ("ideal_decode_speedup", "ideal decode (FLOPs)", "{:.2f}"),
    ("kv_mib", "KV MiB", "{:.2f}"),
    ("kv_ratio", "KV ratio", "{:.2f}"),
    ("ideal_kv_ratio", "ideal KV", "{:.2f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("prefill_gflops", "prefill GFLOPs", "{:.2f}"),
]


def format_cells(row: dict) -> list[str]:
    return [fmt.format(row[key]) for key, _, fmt in COLUMNS]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" + "|---:" * (len(COLUMNS) - 1) + "|"]
    lines += ["| " + " | ".join(format_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def overhead(rows: list[dict], empty: str = "empty plan") -> dict[str, float] | None:
    """Slow-down of the empty plan against the untouched model (0.01 = 1 % slower), if both were measured."""
    row = next((r for r in rows if r["config"] == empty), None)
    if row is None:
        return None
    return {"prefill": 1 / row["prefill_speedup"] - 1, "decode": 1 / row["decode_speedup"] - 1}
