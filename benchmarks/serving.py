"""Serving-regime speed of skip plans: long vision contexts at serving batch sizes, where the KV cache dominates.

At batch 1 with 64 vision tokens decoding reads mostly weights, so vision tokens leaving the cache hardly change
decode speed. Here a random-weight LLaVA-shaped model (built from a config in this file: a small CLIP tower,
336-px images of 14-px patches = 576 vision tokens each, several images per prompt for longer contexts, and a
Llama text model whose size is an option) runs prompts of 576 and 2,880 vision tokens (+ 40 text tokens) at
batch 1, 8 and 32. For the untouched model and for plans (by default vision tokens exit after layer L/4 and L/2;
FastV-style pruning to 25 % of the vision tokens after layer 1; `--plans` adds DivPrune before layer 0 and a
two-stage plan, see PLANS), measured side by side in one run, rounds alternating (order
reversed every other round, `skipit.evaluation.speed.compare`), one warm-up round discarded:

- prefill: one forward over the prompts (vision features precomputed, so the language backbone only); with
  `--prefill first-token` (the CPU preset: it halves the run) the time from calling `generate()` to the first
  token's logits instead, which adds generate()'s own set-up (a few ms) to both sides of each ratio;
- decode tokens/s: `generate()`, greedy, `min_new_tokens` = `max_new_tokens`, mean time of a decode step;
- KV-cache bytes held by the returned cache (prompt + new tokens - 1), and peak memory (CUDA peak allocated; CPU
  peak resident set of the process, which includes Python and torch);
- the largest batch that fits a memory budget, COMPUTED (not run): floor((budget - weight bytes) / measured KV
  bytes per row at the end of generation); activations and allocator slack are not counted.

Ratios are plan vs untouched, per round, summarised by the median and [min, max] over the rounds. Next to each:
the ideal from FLOPs (`skipit.flops`), and for decoding also the ideal from bytes moved per decode step: the
weights of the layers that run (linear weights + LM head) read once per step, plus every row's KV cache read
once per step, averaged over the decode steps. Prints a markdown table (and writes it with --table).

    .venv/bin/python benchmarks/serving.py --preset cpu [--table serving.md] [--out serving.json]
    .venv/bin/python benchmarks/serving.py --preset gpu7b            # LLaVA-1.5-7B-shaped text model, bf16, CUDA
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from skipit.evaluation import speed
from skipit.flops import Shape, cost, ideal_speedup, prompt_layout
from skipit.io import write_json
from skipit.plan import SKIP, Plan

IMAGE_SIZE, PATCH = 336, 14  # LLaVA-1.5: 24 x 24 = 576 vision tokens per image
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
TEXT_BEFORE = 5  # text tokens before the images ("USER: ..."); the rest of --text-tokens come after them

PRESETS = {
    # 2 shared CPU cores: small text model; cells over --max-batch-tokens (2,880 vision tokens x batch 32) dropped.
    # One torch thread: on cores other jobs share, each 2-thread op waits for its slower thread, which made decode
    # steps ~10x slower and erratic here (load average 5.6 on 2 cores); the time to the first token is the prefill.
    "cpu": dict(
        hidden=256, layers=8, heads=4, kv_heads=None, intermediate=704, vocab=8192, dtype="float32", device="cpu",
        vision_tokens=[576, 2880], batch=[1, 8, 32], new_tokens=16, repeats=3, warmup=1, budget_gib=16.0,
        max_batch_tokens=24_000, prefill="first-token", threads=1,
    ),
    # LLaVA-1.5-7B's language model (Vicuna-7B: Llama, full multi-head attention), random weights, bfloat16
    "gpu7b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=None, intermediate=11008, vocab=32064, dtype="bfloat16",
        device="cuda", vision_tokens=[576, 2880], batch=[1, 8, 32], new_tokens=32, repeats=3, warmup=1,
        budget_gib=80.0, max_batch_tokens=None, prefill="separate", threads=None,
    ),
}  # fmt: skip


def build_model(args) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration with random weights, made on `args.device` in `args.dtype` (no download).
    The vision tower is tiny (plans do not touch it and it runs once per cell, before the timing)."""
    torch.manual_seed(args.seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, patch_size=PATCH,
            image_size=IMAGE_SIZE,
        ),
        text_config=LlamaConfig(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
            vocab_size=args.vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=args.vocab - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    with torch.device(args.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, args.dtype))
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model, n_vision: int, batch: int, text_tokens: int, seed: int = 0) -> dict:
    """`batch` prompts: a few text tokens, n_vision / 576 images (LLaVA multi-image), then the rest of the text."""
    if n_vision % TOKENS_PER_IMAGE:
        raise SystemExit(f"error: vision tokens must be a multiple of {TOKENS_PER_IMAGE} (one 336-px image each)")
    gen = torch.Generator().manual_seed(seed)
    image_id, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    ids = torch.cat([
        torch.randint(3, vocab - 1, (batch, TEXT_BEFORE), generator=gen),
        torch.full((batch, n_vision), image_id),
        torch.randint(3, vocab - 1, (batch, text_tokens - TEXT_BEFORE), generator=gen),
    ], 1)  # fmt: skip
    pixels = torch.randn(batch * (n_vision // TOKENS_PER_IMAGE), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    dtype = next(model.parameters()).dtype
    return dict(
        input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
        pixel_values=pixels.to(model.device, dtype),
    )  # fmt: skip


PLANS = {  # --plans: name -> (label, decisions) for a text model of L layers; the untouched model always runs
    "exit-quarter": lambda L: (f"early exit after layer {L // 4}", dict(early_exit=L // 4)),
    "exit-half": lambda L: (f"early exit after layer {L // 2}", dict(early_exit=L // 2)),
    "fastv": lambda L: ("FastV: keep 25 % after layer 1", dict(prune_vision_after=1, prune_vision_keep=0.25)),
    "divprune": lambda L: ("DivPrune: keep 25 % before layer 0",
                           dict(prune_vision_after=-1, prune_vision_keep=0.25, prune_vision_rank="divprune")),
    # what skipit's composer chose at 40 % on mini-llava: half the vision tokens enter, 12.5 % go on after L/2
    "two-stage": lambda L: (f"two stages: 50 % enter, 12.5 % after layer {L // 2}",
                            dict(input_vision_keep=0.5, prune_vision_after=L // 2, prune_vision_keep=0.125)),
}
DEFAULT_PLANS = ["exit-quarter", "exit-half", "fastv"]


def plans(model, num_layers: int, names: list[str]) -> dict[str, Plan | None]:
    """The untouched model and the plans `names` (keys of PLANS), by label."""
    out: dict[str, Plan | None] = {"untouched": None}
    for name in names:
        label, decisions = PLANS[name](num_layers)
        out[label] = Plan.for_model(model, **decisions)
    return out


def decode_bytes(shape: Shape, plan: Plan | None, vision: list[bool], batch: int, new_tokens: int, value_bytes: int):
    """Bytes read by a mean decode step: weights of the layers that run and the LM head, once per step, plus each
    row's KV cache (averaged over steps 1..new_tokens-1; the cache grows linearly). Returns (weights, kv)."""
    roles = plan.roles() if plan is not None else ["all"] * shape.num_layers
    weights = (sum(r != SKIP for r in roles) * shape.token_macs + shape.hidden * shape.vocab) * value_bytes
    steps = new_tokens - 1
    first, last = (cost(shape, plan, vision, s, bytes_per_value=value_bytes).kv_bytes for s in (1, steps))
    return weights, batch * (first + last) / 2


def compare(model, encoded: dict, configs: dict[str, Plan | None], args) -> dict[str, list[speed.Run]]:
    """Every configuration once per round, the order reversed every other round, warm-up rounds discarded; with
    --prefill generate, the prefill is generate()'s time to the first token (one call per run instead of two)."""
    return speed.compare(model, encoded, configs, new_tokens=args.new_tokens, repeats=args.repeats,
                         warmup=args.warmup, separate_prefill=args.prefill == "separate")  # fmt: skip


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def cell_rows(model, args, n_vision: int, batch: int, weight_bytes: int) -> list[dict]:
    """Measure one (vision tokens, batch) cell: every plan, side by side."""
    L = model.config.text_config.num_hidden_layers
    configs = plans(model, L, args.plans)
    inputs = make_inputs(model, n_vision, batch, args.text_tokens)
    encoded, encode_s = speed.encode_images(model, inputs)
    del inputs
    shape, value_bytes = Shape.from_model(model), next(model.parameters()).element_size()
    vision = prompt_layout(n_vision, args.text_tokens, TEXT_BEFORE)
    t0 = time.perf_counter()
    runs = compare(model, encoded, configs, args)
    took = time.perf_counter() - t0
    base = runs["untouched"]
    base_w, base_kv = decode_bytes(shape, None, vision, batch, args.new_tokens, value_bytes)
    budget = args.budget_gib * 2**30
    base_row_kv = statistics.median(r.kv_bytes for r in base) / batch
    base_fit = math.floor((budget - weight_bytes) / base_row_kv)
    rows = []
    for name, plan in configs.items():
        mine = runs[name]
        ideal = ideal_speedup(shape, plan, vision, args.new_tokens - 1) if plan else None
        w, kv = decode_bytes(shape, plan, vision, batch, args.new_tokens, value_bytes)
        row_kv = statistics.median(r.kv_bytes for r in mine) / batch
        fit = math.floor((budget - weight_bytes) / row_kv)
        rows.append({
            "vision": n_vision, "batch": batch, "config": name, "plan": plan.to_dict() if plan else None,
            "prefill_ms": 1e3 * statistics.median(r.prefill_s for r in mine),
            "prefill_x": spread([b.prefill_s / m.prefill_s for b, m in zip(base, mine, strict=True)]),
            "ideal_prefill_flops": ideal["prefill"] if ideal else 1.0,
            "tokens_per_s": statistics.median(r.tokens_per_s for r in mine),
            "decode_x": spread([b.decode_s / m.decode_s for b, m in zip(base, mine, strict=True)]),
            "ideal_decode_flops": ideal["decode"] if ideal else 1.0,
            "ideal_decode_bytes": (base_w + base_kv) / (w + kv),
            "kv_share_of_bytes": kv / (w + kv),
            "kv_mib": statistics.median(r.kv_bytes for r in mine) / 2**20,
            "kv_ratio": statistics.median(r.kv_bytes for r in mine) / statistics.median(r.kv_bytes for r in base),
            "ideal_kv_ratio": ideal["kv_memory"] if ideal else 1.0,
            "peak_mib": statistics.median(r.peak_bytes for r in mine) / 2**20,
            "kv_per_row_mib": row_kv / 2**20,
            "max_batch": fit, "max_batch_x": fit / base_fit,
            "vision_encoder_ms": 1e3 * encode_s, "cell_seconds": took,
            "runs": [vars(r) for r in mine],
        })  # fmt: skip
    return rows


def _x(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"


COLUMNS = [  # (header, cell)
    ("vision tok.", lambda r: f"{r['vision']:,}"),
    ("batch", lambda r: str(r["batch"])),
    ("plan", lambda r: r["config"]),
    ("prefill ms", lambda r: f"{r['prefill_ms']:.0f}"),
    ("prefill x [min, max]", lambda r: _x(r["prefill_x"])),
    ("ideal (FLOPs)", lambda r: f"{r['ideal_prefill_flops']:.2f}"),
    ("decode tok/s", lambda r: f"{r['tokens_per_s']:.1f}"),
    ("decode x [min, max]", lambda r: _x(r["decode_x"])),
    ("ideal (FLOPs)", lambda r: f"{r['ideal_decode_flops']:.2f}"),
    ("ideal (bytes)", lambda r: f"{r['ideal_decode_bytes']:.2f}"),
    ("KV share of bytes", lambda r: f"{100 * r['kv_share_of_bytes']:.0f} %"),
    ("KV MiB", lambda r: f"{r['kv_mib']:.1f}"),
    ("KV ratio", lambda r: f"{r['kv_ratio']:.2f}"),
    ("ideal KV", lambda r: f"{r['ideal_kv_ratio']:.2f}"),
    ("peak MiB", lambda r: f"{r['peak_mib']:.0f}"),
    ("max batch (computed)", lambda r: f"{r['max_batch']:,} (x{r['max_batch_x']:.2f})"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|---:|---:|---" + "|---:" * (len(COLUMNS) - 3) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for every option below")
    ap.add_argument("--hidden", type=int, help="text model: hidden size")
    ap.add_argument("--layers", type=int, help="text model: decoder layers")
    ap.add_argument("--heads", type=int, help="text model: attention heads")
    ap.add_argument("--kv-heads", type=int, help="text model: key/value heads (default: = heads)")
    ap.add_argument("--intermediate", type=int, help="text model: MLP intermediate size")
    ap.add_argument("--vocab", type=int, help="text model: vocabulary (the image token is its last id)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--vision-tokens", type=int, nargs="+", help=f"per prompt, multiples of {TOKENS_PER_IMAGE}")
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--text-tokens", type=int, default=40, help=f"per prompt ({TEXT_BEFORE} before the images)")
    ap.add_argument("--new-tokens", type=int, help="generated per row (min_new_tokens = max_new_tokens)")
    ap.add_argument("--repeats", type=int, help="measured rounds (each: every plan once)")
    ap.add_argument("--warmup", type=int, help="rounds discarded first")
    ap.add_argument("--budget-gib", type=float, help="memory budget for the computed largest batch")
    ap.add_argument("--max-batch-tokens", type=int, help="skip cells whose batch x prompt tokens exceeds this")
    ap.add_argument("--prefill", choices=["separate", "first-token"],
                    help="prefill time: a forward of its own, or generate()'s time to the first token")
    ap.add_argument("--threads", type=int, help="torch threads (CPU preset: 1, see PRESETS)")
    ap.add_argument("--plans", nargs="+", choices=sorted(PLANS), default=DEFAULT_PLANS,
                    help=f"plans measured against the untouched model (default: {' '.join(DEFAULT_PLANS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", default=None, help="also write the markdown table (and header) to this file")
    ap.add_argument("--out", default=None, help="write every run as JSON to this file")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.text_tokens < TEXT_BEFORE + 1:
        ap.error(f"--text-tokens must be at least {TEXT_BEFORE + 1}")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed needs a decode step)")
    return args


def cuda_missing(device: str) -> str | None:
    """Why `device` cannot be used here (one line), or None."""
    if not device.startswith("cuda"):
        return None
    if torch.version.cuda is None:
        return (f"--device {device} needs CUDA, and this torch ({torch.__version__}) is a CPU-only build: install a "
                "CUDA build of torch on a GPU machine, or run --preset cpu")  # fmt: skip
    if not torch.cuda.is_available():
        return (f"--device {device} needs CUDA, and torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                "CUDA device here: run it on a GPU machine, or run --preset cpu")  # fmt: skip
    return None


def write_results(args, header: list[str], rows: list[dict], notes: list[str]) -> str:
    """The markdown table with its header and notes, printed; also written to --table and --out if given (after
    every cell, so a run cut short keeps what it measured)."""
    text = "\n".join(header) + "\n\n" + markdown_table(rows) + "\n\n" + "\n".join(notes) + "\n"
    if args.table:
        Path(args.table).write_text(text)
    if args.out:
        write_json(args.out, {"args": vars(args), "header": header, "notes": notes, "rows": rows})
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if why := cuda_missing(args.device):
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")  # fmt: skip
    t0 = time.perf_counter()
    model = build_model(args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    text_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    header = [
        f"Command: `{' '.join(['python', 'benchmarks/serving.py', *argv])}`",
        f"Machine: {where}; torch {torch.__version__}; {args.dtype}; sdpa attention.",
        f"Model (random weights, built in {time.perf_counter() - t0:.0f} s): LLaVA (CLIP tower 1 layer, 336 px) + "
        f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads or args.heads} kv), "
        f"intermediate {args.intermediate}, vocab {args.vocab}: {text_params / 1e9:.3f} B text parameters, "
        f"{weight_bytes / 2**30:.2f} GiB of weights in all.",
        f"Prompts: vision tokens + {args.text_tokens} text tokens; {args.new_tokens} new tokens (greedy); "
        f"{args.warmup} warm-up + {args.repeats} measured rounds, plans alternating (order reversed every other "
        "round); x = untouched / plan per round: median [min, max] over the rounds. Prefill: "
        + ("a forward of its own." if args.prefill == "separate" else "generate()'s time to the first token."),
        f"Max batch (computed): floor(({args.budget_gib:g} GiB - weights) / measured KV bytes per row after "
        "generation); activations not counted. ideal (bytes): (weights read + KV read) per decode step, "
        "untouched / plan; KV share: the KV cache's share of those bytes.",
    ]  # fmt: skip
    print("\n".join(header), flush=True)
    rows, notes = [], []
    for n_vision in args.vision_tokens:
        for batch in args.batch:
            tokens = batch * (n_vision + args.text_tokens)
            if args.max_batch_tokens and tokens > args.max_batch_tokens:
                notes.append(f"Not run: {n_vision:,} vision tokens x batch {batch} ({tokens:,} prompt tokens > "
                             f"--max-batch-tokens {args.max_batch_tokens:,}).")  # fmt: skip
                print(notes[-1], flush=True)
                continue
            try:
                cell = cell_rows(model, args, n_vision, batch, weight_bytes)
            except torch.OutOfMemoryError:
                notes.append(f"Not run: {n_vision:,} vision tokens x batch {batch}: out of memory on {where}.")
                print(notes[-1], flush=True)
                cell = []
            if cuda:
                torch.cuda.empty_cache()
            if not cell:
                continue
            rows += cell
            print(f"measured {n_vision:,} vision tokens x batch {batch} in {cell[0]['cell_seconds']:.0f} s "
                  f"(vision encoder {cell[0]['vision_encoder_ms']:.0f} ms, not timed)", flush=True)  # fmt: skip
            write_results(args, header, rows, [*notes, "(partial: the run continues)"])
    text = write_results(args, header, rows, [*notes, f"Total: {time.perf_counter() - t0:.0f} s."])
    print("\n" + text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
