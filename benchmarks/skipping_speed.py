"""Speed of skip plans: measured prefill / decode speed-ups and KV-cache size against the ideal from FLOPs.

Two models: mini-llava (the embedded LLaVA, 30 layers, 64 vision tokens) and a random-weight LLaVA-shaped model
built here from a config (576 vision tokens, hidden 1024, 24 layers by default). For each, a grid of plans (empty;
late entry absent and frozen; early exit at three depths; skipped layers; a combination) next to the untouched
model, at each batch size. Prints markdown tables for docs/benchmarks.md.

    .venv/bin/python benchmarks/skipping_speed.py [--models mini-llava random] [--batch 1 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from skipit import models
from skipit.data.jsonl import load_records
from skipit.demo.build import ensure_built, shapes_split
from skipit.evaluation import speed
from skipit.flops import Shape, roles_of
from skipit.io import write_json
from skipit.plan import Plan
from skipit.prompts import chat_inputs


def random_llava(hidden: int, layers: int, image_size: int = 336, seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-shaped (CLIP-like tower, 14-px patches, Llama LM with full multi-head attention), random weights.
    The tower is kept small: plans do not touch it and its time is reported apart."""
    torch.manual_seed(seed)
    heads = hidden // 64
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
            image_size=image_size,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064, max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def random_inputs(model, batch: int, text_before: int = 5, text_after: int = 35, seed: int = 0) -> dict:
    """Prompts laid out like LLaVA-1.5's: a few text tokens, the image, the question and the answer cue."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    n_vision = (size // model.config.vision_config.patch_size) ** 2
    ids = torch.cat([
        torch.randint(3, 32000, (batch, text_before), generator=gen),
        torch.full((batch, n_vision), model.config.image_token_id),
        torch.randint(3, 32000, (batch, text_after), generator=gen),
    ], 1)  # fmt: skip
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def mini_llava_inputs(processor, batch: int) -> dict:
    """`batch` different images of `shapes`/test, with the first record's question for every row (no padding)."""
    records = load_records(shapes_split("test"), limit=batch)
    return chat_inputs(processor, [r.load_image() for r in records], [records[0].question] * batch)


def plan_grid(model, num_layers: int) -> dict[str, Plan | None]:
    L = num_layers
    k, exits = L // 4, (2, L // 3, 2 * L // 3)
    skips = [L // 2 + i * L // 8 for i in range(4)]
    return {
        "untouched": None,
        "empty plan": Plan.for_model(model),
        f"late entry {k}, absent": Plan.for_model(model, late_entry=k),
        f"late entry {k}, frozen": Plan.for_model(model, late_entry=k, late_entry_mode="frozen"),
        **{f"early exit {m}": Plan.for_model(model, early_exit=m) for m in exits},
        f"skip layers {skips}": Plan.for_model(model, skip_layers=skips),
        f"late 2 + exit {L // 2} + skip [{L - 4}, {L - 2}]": Plan.for_model(
            model, late_entry=2, early_exit=L // 2, skip_layers=[L - 4, L - 2]
        ),
        "FastV: keep 50 % after layer 1": Plan.for_model(model, prune_vision_after=1, prune_vision_keep=0.5),
    }


@torch.inference_mode()
def layer_cost_per_token(model, batch: int, lengths: list[int], repeats: int = 20) -> dict[int, float]:
    """Median seconds per token of one untouched decoder layer on `batch` rows of n tokens, for each n in `lengths`
    (round-robin): the hardware's share of any gap between measured and ideal speed-ups, no skipping code involved."""
    lm = model.model.language_model
    layer, hidden = lm.layers[len(lm.layers) // 2], model.config.text_config.hidden_size
    setups = {}
    for n in lengths:
        x = torch.randn(batch, n, hidden)
        setups[n] = x, lm.rotary_emb(x, torch.arange(n)[None])
    times = {n: [] for n in lengths}
    for _ in range(repeats):
        for n, (x, pe) in setups.items():
            start = time.perf_counter()
            layer(x, attention_mask=None, position_embeddings=pe, position_ids=None)
            times[n].append((time.perf_counter() - start) / (batch * n))
    return {n: statistics.median(t) for n, t in times.items()}


def layer_time_ideal(model, plan: Plan | None, width: int, n_vision: int, per_token: dict[int, float]) -> float:
    """Prefill time of the decoder layers predicted from the untouched layer's measured time per token at the token
    counts the plan runs them on (frozen vision tokens: their share of k/v projection FLOPs at the full count)."""
    shape, n_text = Shape.from_model(model), width - n_vision
    kv_share = 2 * shape.hidden * shape.kv_width / shape.token_macs
    full, text = width * per_token[width], n_text * per_token[n_text]
    roles = roles_of(plan, shape.num_layers)
    each = {"all": full, "absent": text, "frozen": text + n_vision * per_token[width] * kv_share, "skip": 0.0}
    if "pruned" in roles:
        n = n_text + plan.vision_kept(n_vision)
        each["pruned"] = n * per_token[n]
    return sum(each[r] for r in roles)


def bench(name: str, model, inputs: dict, args) -> list[dict]:
    L = model.config.text_config.num_hidden_layers
    configs = plan_grid(model, L)
    encoded, encode_s = speed.encode_images(model, inputs)
    n_vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    batch, width = inputs["input_ids"].shape
    t0 = time.perf_counter()
    runs = speed.compare(model, encoded, configs, new_tokens=args.new_tokens, repeats=args.repeats)
    rows = speed.speed_rows(model, encoded, configs, runs, args.new_tokens)
    print(f"\n### {name}, batch {batch}\n")
    print(
        f"{L} layers, hidden {model.config.text_config.hidden_size}; prompt {width} tokens ({n_vision} vision); "
        f"{args.new_tokens} new tokens; medians of {args.repeats} rounds; vision encoder {1e3 * encode_s:.0f} ms "
        f"(not in the prefill times); {time.perf_counter() - t0:.0f} s\n"
    )
    print(speed.markdown_table(rows))

    lengths = {width, width - n_vision} | {width - n_vision + p.vision_kept(n_vision) for p in configs.values()
                                          if p is not None and p.prune_vision_after is not None}  # fmt: skip
    per_token = layer_cost_per_token(model, batch, sorted(lengths))
    print(
        f"\nOne untouched decoder layer takes {1e6 * per_token[width]:.0f} us per token on the whole prompts "
        f"({width} tokens a row) and {1e6 * per_token[width - n_vision]:.0f} us per token on their text tokens "
        "alone. Prefill speed-up predicted from these layer times instead of FLOPs:\n"
    )
    base = layer_time_ideal(model, None, width, n_vision, per_token)
    print("| plan | measured | ideal (FLOPs) | ideal (layer times) | measured / ideal (layer times) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        hw = base / layer_time_ideal(model, configs[row["config"]], width, n_vision, per_token)
        row.update(ideal_layer_times=hw)
        print(f"| {row['config']} | {row['prefill_speedup']:.2f} | {row['ideal_prefill_speedup']:.2f} | {hw:.2f} "
              f"| {row['prefill_speedup'] / hw:.2f} |")  # fmt: skip

    empty = {"untouched": None, "empty plan": configs["empty plan"]}
    rounds = speed.compare(model, encoded, empty, new_tokens=args.new_tokens, repeats=args.overhead_rounds)
    over = speed.overhead(speed.speed_rows(model, encoded, empty, rounds, args.new_tokens))
    print(
        f"\nWrapper overhead (empty plan vs untouched, {args.overhead_rounds} more rounds of these two alone): "
        f"prefill {100 * over['prefill']:+.1f} %, decode step {100 * over['decode']:+.1f} %"
    )
    return [dict(r, model=name, batch=batch) for r in rows] + [dict(model=name, batch=batch, overhead=over)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mini-llava", "random"], choices=["mini-llava", "random"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--overhead-rounds", type=int, default=15, help="rounds of untouched vs empty plan alone")
    ap.add_argument("--hidden", type=int, default=1024, help="random model: hidden size")
    ap.add_argument("--layers", type=int, default=24, help="random model: decoder layers")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = []
    for name in args.models:
        if name == "mini-llava":
            model, processor = models.load(ensure_built())
            make = lambda b, p=processor: mini_llava_inputs(p, b)  # noqa: E731
        else:
            model = random_llava(args.hidden, args.layers)
            make = lambda b, m=model: random_inputs(m, b)  # noqa: E731
            name = f"random LLaVA (hidden {args.hidden}, {args.layers} layers)"
        for batch in args.batch:
            results += bench(name, model, make(batch), args)
        del model
    if args.out:
        write_json(args.out, {"args": vars(args), "rows": results})


if __name__ == "__main__":
    main()
