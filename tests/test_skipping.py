"""apply_plan / remove_plan on tiny random models of every supported family.

The strongest check is agreement with `reference_logits`, a slow re-implementation of each plan written here:
it runs the original decoder layers one row at a time, on exactly the tokens each layer must process, with their
original positions, no cache, and recomputes the whole prefix at every decoding step.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    CLIPVisionConfig,
    Cohere2Config,
    DynamicCache,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from skipit import compat
from skipit.adapters import get_adapter
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import SkipLayer, applied_plan, apply_plan, remove_plan
from skipit.skipping.rankers import TIE

VOCAB, IMAGE, VIDEO, V_START, V_END = 96, 95, 94, 92, 93
SPECIAL = [IMAGE, VIDEO, V_START, V_END]
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
    bos_token_id=None, eos_token_id=None,
)  # fmt: skip
CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4)
QWEN_TEXT = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
FAMILIES = ["llama", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3"]
OTHER_CAUSAL_LMS = ["qwen2", "qwen3", "gemma", "phi3", "smollm3"]  # model_type; text only, like "llama"
# VLMs served by the generic adapter with no family code, tested in test_families.py (same machinery as here)
GENERIC_VLMS = ["llava_onevision", "smolvlm", "internvl", "mistral3", "aya_vision"]
VLMS = [*FAMILIES[1:], *GENERIC_VLMS, "qwen3_vl", "qwen3_vl_moe", "gemma3"]
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Causal LMs with sliding-window layers, the window small enough to cut keys in prefill and decoding: Gemma 2 (every
# other layer), Gemma 3 (5 sliding, 1 full), Cohere2 (3 sliding, 1 full), Mistral (every layer), Qwen2 (layers from
# max_window_layers on)
WINDOW = 4
SLIDING_LMS = ["gemma2", "gemma3_text", "cohere2", "mistral_sliding", "qwen2_sliding"]
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and thread contention on a busy machine costs 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def build(family: str):
    """A tiny random model; "<family>_eager" is the same with eager attention."""
    family, eager = family.removesuffix("_eager"), family.endswith("_eager")
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TEXT))
    elif family in OTHER_CAUSAL_LMS or family == "mistral":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TEXT, head_dim=8))
    elif family == "qwen2_sliding":  # sliding layers from layer 2 on, full attention below
        config = Qwen2Config(**TEXT, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
        model = AutoModelForCausalLM.from_config(config)
    elif family in SLIDING_LMS:
        config = AutoConfig.for_model(family.removesuffix("_sliding"), **TEXT, head_dim=8, sliding_window=WINDOW)
        model = AutoModelForCausalLM.from_config(config)
    elif family == "llava":
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**CLIP, image_size=12), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE
        )
        model = LlavaForConditionalGeneration(config)
    elif family == "llava_next":
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**CLIP, image_size=8), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
            image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
        )  # fmt: skip
        model = LlavaNextForConditionalGeneration(config)
    elif family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=QWEN_TEXT, vision_config=vision, **QWEN_IDS))
    elif family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                      window_size=8, fullatt_block_indexes=[0])  # fmt: skip
        config = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=vision, **QWEN_IDS)
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif family == "llava_onevision":
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**SIGLIP, image_size=8, patch_size=4), text_config=Qwen2Config(**TEXT),
            image_token_id=IMAGE, video_token_id=VIDEO, image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
        )  # fmt: skip
        model = LlavaOnevisionForConditionalGeneration(config)
    elif family == "smolvlm":
        config = SmolVLMConfig(vision_config=dict(SIGLIP, image_size=8, patch_size=2), text_config=LlamaConfig(**TEXT),
                               image_token_id=IMAGE)  # fmt: skip
        model = SmolVLMForConditionalGeneration(config)
    elif family == "internvl":
        config = InternVLConfig(vision_config=dict(SIGLIP, image_size=8, patch_size=2), text_config=Qwen2Config(**TEXT),
                                image_token_id=IMAGE)  # fmt: skip
        model = InternVLForConditionalGeneration(config)
    elif family in ("mistral3", "mistral3_sliding"):  # sliding window off, as in Mistral Small 3.1, or on every layer
        window = WINDOW if family.endswith("_sliding") else None
        config = Mistral3Config(
            vision_config=PixtralVisionConfig(**SIGLIP, image_size=16, patch_size=4, head_dim=8),
            text_config=MistralConfig(**TEXT, sliding_window=window, head_dim=8), image_token_id=IMAGE,
        )  # fmt: skip
        model = Mistral3ForConditionalGeneration(config)
    elif family in ("aya_vision", "aya_vision_sliding"):
        # Cohere2 text with every layer full attention, or as released: 3 sliding layers, then a full one
        kinds = None if family.endswith("_sliding") else ["full_attention"] * TEXT["num_hidden_layers"]
        text = Cohere2Config(**TEXT, head_dim=8, layer_types=kinds, sliding_window=WINDOW)
        config = AyaVisionConfig(vision_config=SiglipVisionConfig(**SIGLIP, image_size=8, patch_size=2),
                                 text_config=text, image_token_id=IMAGE)  # fmt: skip
        model = AyaVisionForConditionalGeneration(config)
    elif family == "gemma3":
        # each image's 4 tokens attend to each other both ways (token_type_ids); sliding and full layers alternate,
        # the window (3) shorter than an image, so that it cuts pairs of one image too
        text = dict(TEXT, head_dim=8, sliding_window=3, layer_types=["sliding_attention", "full_attention"] * 3)
        config = Gemma3Config(text_config=text, vision_config=dict(SIGLIP, image_size=8, patch_size=2),
                              image_token_id=IMAGE, mm_tokens_per_image=4)  # fmt: skip
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # initialised to zeros: every image token would enter as the same zero vector
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    elif family == "qwen3_vl":  # DeepStack: features of vision levels 0 and 1 added after decoder layers 0 and 1
        rope = dict(QWEN_TEXT["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                      deepstack_visual_indexes=[0, 1], num_position_embeddings=64)  # fmt: skip
        text = dict(TEXT, head_dim=8, rope_parameters=rope)
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_IDS)
        model = Qwen3VLForConditionalGeneration(config)
    elif family == "qwen3_vl_moe":  # the same with a mixture-of-experts MLP (4 experts, 2 per token)
        rope = dict(QWEN_TEXT["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                      deepstack_visual_indexes=[0, 1], num_position_embeddings=64)  # fmt: skip
        text = dict(TEXT, head_dim=8, rope_parameters=rope, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16, decoder_sparse_step=1)  # fmt: skip
        config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **QWEN_IDS)
        model = Qwen3VLMoeForConditionalGeneration(config)
    else:
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                      patch_size=2)  # fmt: skip
        config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE)
        model = Idefics3ForConditionalGeneration(config)
    if eager:
        model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = None  # random weights: always decode the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def base(family: str) -> str:
    """The family a test model variant belongs to ("llava_eager" -> "llava", "mistral3_sliding" -> "mistral3")."""
    return family.removesuffix("_eager").removesuffix("_sliding")


def make_inputs(family: str, batch: int) -> dict:
    """Left-padded prompts: text, one image (sizes differ per row where the family allows), text."""
    model, family = build(family), base(family)
    gen = torch.Generator().manual_seed(batch)
    rows, extra = [], {}
    if family == "llava":
        extra["pixel_values"] = torch.randn(batch, 3, 12, 12, generator=gen)
        counts = [9] * batch  # (12 / 4)^2 patches, CLS dropped
    elif family == "llava_next":
        sizes = torch.tensor([[8, 16], [16, 16], [16, 8], [8, 8]][:batch])
        extra.update(pixel_values=torch.randn(batch, 5, 3, 8, 8, generator=gen), image_sizes=sizes)
        feats = model.model.get_image_features(pixel_values=extra["pixel_values"], image_sizes=sizes).pooler_output
        counts = [f.shape[0] for f in feats]
    elif family in QWEN_VL:
        grids = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 2, 4], [1, 4, 4]][:batch])
        extra.update(pixel_values=torch.randn(int(grids.prod(-1).sum()), 24, generator=gen), image_grid_thw=grids)
        counts = (grids.prod(-1) // 4).tolist()  # 2 x 2 patches merge into one token
    elif family == "idefics3":
        extra["pixel_values"] = torch.randn(batch, 1, 3, 8, 8, generator=gen)
        counts = [4] * batch  # (8 / 2)^2 patches, 2 x 2 pixel shuffle
    elif family == "llava_onevision":
        sizes = torch.tensor([[8, 16], [16, 16], [16, 8], [8, 8]][:batch])
        extra.update(pixel_values=torch.randn(batch, 5, 3, 8, 8, generator=gen), image_sizes=sizes)
        feats = model.model.get_image_features(pixel_values=extra["pixel_values"], image_sizes=sizes).pooler_output
        counts = [f.shape[0] for f in feats]
    elif family == "smolvlm":  # odd rows carry a second image; all-zero images are padding, which SmolVLM drops
        images = torch.randn(batch, 2, 3, 8, 8, generator=gen)
        images[::2, 1] = 0
        extra["pixel_values"] = images
        counts = [4 * (1 + b % 2) for b in range(batch)]
    elif family in ("internvl", "aya_vision"):  # odd rows' image has two tiles
        tiles = [1 + b % 2 for b in range(batch)]
        extra["pixel_values"] = torch.randn(sum(tiles), 3, 8, 8, generator=gen)
        counts = [4 * n for n in tiles]  # (8 / 2)^2 patches per tile, 2 x 2 pixel shuffle
    elif family == "mistral3":
        sizes = torch.tensor([[16, 16], [8, 16], [16, 8], [8, 8]][:batch])
        extra.update(pixel_values=torch.randn(batch, 3, 16, 16, generator=gen), image_sizes=sizes)
        counts = (sizes // 8).prod(-1).tolist()  # 4 x 4 patches, 2 x 2 spatial merge
    elif family == "gemma3":  # odd rows carry a second image, one text token after the first: two blocks
        images = [1 + b % 2 for b in range(batch)]
        extra["pixel_values"] = torch.randn(sum(images), 3, 8, 8, generator=gen)
        counts = [4] * batch

    def text(n: int) -> list[int]:
        return torch.randint(3, 88, (n,), generator=gen).tolist()  # clear of pad (0) and the special ids

    for b in range(batch):
        row = text(2 + b)  # rows of different lengths: left padding
        if family in VLMS:
            image = [IMAGE] * counts[b]
            row += [V_START, *image, V_END] if family in QWEN_VL else image
        if family == "gemma3" and b % 2:
            row += text(1) + [IMAGE] * counts[b]
        rows.append(row + text(3))
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    if family in QWEN_VL:
        extra["mm_token_type_ids"] = (input_ids == IMAGE).int()
    if family == "gemma3":
        extra["token_type_ids"] = (input_ids == IMAGE).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, **extra)


def with_positions(family: str, inputs: dict) -> dict:
    """The position ids generate() would use; Qwen computes its 3-D M-RoPE ids itself from the mask."""
    if base(family) in QWEN_VL:
        return inputs
    return dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))


def extend(family: str, inputs: dict, new_tokens: torch.Tensor) -> dict:
    out = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new_tokens], 1))
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    if base(family) in QWEN_VL:
        out["mm_token_type_ids"] = (out["input_ids"] == IMAGE).int()
    if "token_type_ids" in inputs:  # generated tokens are text
        out["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(new_tokens)], 1)
    return out


def generate(model, inputs: dict, steps: int = 20, do_sample: bool = False):
    return model.generate(
        **inputs, max_new_tokens=steps, do_sample=do_sample, output_logits=True, return_dict_in_generate=True,
        suppress_tokens=SPECIAL,  # a generated image token would be taken for a missing image
    )  # fmt: skip


def skip_and_identity(model, inputs: dict, j: int, patch, steps: int, after_apply=None):
    """The native check's two runs: generation under a plan skipping layer j, then the untouched model with layer j
    replaced by an identity (left patched through `patch`, a monkeypatch context). `after_apply()` runs once the
    plan is applied (to break something on purpose)."""
    apply_plan(model, Plan.for_model(model, skip_layers=[j]))
    try:
        if after_apply:
            after_apply()
        planned = generate(model, inputs, steps=steps)
    finally:
        remove_plan(model)
    patch.setattr(get_adapter(model).layers[j], "forward", lambda hidden_states, *args, **kwargs: hidden_states)
    return planned, generate(model, inputs, steps=steps)


class _Stop(Exception):
    pass


def layer_inputs(model, inputs: dict):
    """X_0 and the rotary (cos, sin) that an untouched forward feeds to the decoder layers: one pair when every layer
    gets the same, else a list of pairs, one per layer (Gemma 3: local and global rotary)."""
    grabbed = {}

    def grab(j):
        def hook(module, args, kwargs):
            if j == 0:
                grabbed["x"] = args[0] if args else kwargs["hidden_states"]
            grabbed[j] = kwargs["position_embeddings"]

        return hook

    layers = get_adapter(model).layers
    handles = [layer.register_forward_pre_hook(grab(j), with_kwargs=True) for j, layer in enumerate(layers)]
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    pes = [grabbed[j] for j in range(len(layers))]
    if all(torch.equal(a, b) for pe in pes for a, b in zip(pe, pes[0], strict=True)):
        return grabbed["x"], pes[0]
    return grabbed["x"], pes


def row_positions(pe, b: int, columns: slice, keep: torch.Tensor):
    """The (cos, sin) of row b's real tokens among `columns`, for one pair or a list of pairs (per layer)."""
    if isinstance(pe, list):
        return [row_positions(p, b, columns, keep) for p in pe]
    return tuple(t[b if t.shape[0] > 1 else 0, columns][keep] for t in pe)


def layer_window(layer) -> int | None:
    """The sliding window the layer's attention uses (None: full attention), read off the attention module itself:
    Gemma 2/3, Cohere2 and Qwen2 keep it per layer, Mistral and Phi-3 pass their config's to every layer."""
    attention = layer.self_attn
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def reference_mask(rows: torch.Tensor, window: int | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 1, n, n) bool: which of the tokens `rows` (indices into one sequence of real tokens) each of them attends
    to. Causal; tokens with the same block id >= 0 in `blocks` (per token of the sequence) see each other both ways;
    in a sliding layer, only within the window (q - window < k <= q), block pairs too (Gemma 3)."""
    q, k = rows[:, None], rows[None, :]
    allowed = k <= q
    if blocks is not None:
        b = blocks[rows]
        allowed = allowed | ((b[:, None] == b[None, :]) & (b[:, None] >= 0))
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed[None, None]


def additive(mask: torch.Tensor, layer) -> torch.Tensor:
    """The mask as eager attention takes it (added to the scores) where the layer runs eager attention."""
    if layer.self_attn.config._attn_implementation == "eager":
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def run_layer(layer, x, pe, rows, blocks=None):
    """The layer on the tokens `rows` of one sequence x (n, D), no cache, with the mask the model gives them
    (`reference_mask`: causal, the layer's sliding window, bidirectional blocks)."""
    mask = additive(reference_mask(rows, layer_window(layer), blocks), layer)
    out = layer(
        x[rows][None], attention_mask=mask, position_embeddings=tuple(t[rows][None] for t in pe),
        position_ids=None, use_cache=False,
    )  # fmt: skip
    return out[0]


def last_token_attention(layer, x, pe, rows) -> torch.Tensor:
    """Attention weights of the last of `rows` on each of them in `layer`, mean over heads, from transformers' own
    eager attention (which returns its weights)."""
    attention, config = layer.self_attn, layer.self_attn.config
    previous, config._attn_implementation = config._attn_implementation, "eager"
    try:
        mask = reference_mask(rows, layer_window(layer))
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        _, weights = attention(
            hidden_states=layer.input_layernorm(x[rows])[None], attention_mask=mask,
            position_embeddings=tuple(t[rows][None] for t in pe),
        )  # fmt: skip
    finally:
        config._attn_implementation = previous
    return weights[0, :, -1].mean(0)


def layer_keys(layer, x, pe) -> torch.Tensor:
    """The keys (kv heads, n, head_dim) that `layer` caches for the tokens x (n, D): its own attention, run with a
    fresh cache."""
    cache, attention = DynamicCache(), layer.self_attn
    attention(hidden_states=layer.input_layernorm(x)[None], attention_mask=None,
              position_embeddings=tuple(t[None] for t in pe), **{compat.CACHE_KWARG: cache})  # fmt: skip
    return cache.layers[attention.layer_idx].keys[0]


def reference_dart(states, key_norms, vision, share: float, of: int | None = None) -> torch.Tensor:
    """DART's choice for one sequence, written after its `get_retained_image_token`: pivots by key L1 norm (4 vision
    tokens, kept; 4 text tokens after the image), then each pivot takes its quota of the least cosine-similar vision
    tokens not taken yet; the quotas split the row's count (see `skipit.skipping.rankers.dart_keep`): the share of
    its vision tokens, or of `of` tokens (those before an input stage left some out)."""
    tokens = torch.nonzero(vision)[:, 0].tolist()
    count = math.ceil((len(tokens) if of is None else of) * share)
    text = list(range(tokens[-1] + 1, len(vision)))
    image_pivots = sorted(tokens, key=lambda i: -float(key_norms[i]))[: min(4, count)]
    pivots = image_pivots + sorted(text, key=lambda i: -float(key_norms[i]))[:4]
    rest = count - len(image_pivots)
    kept, valid = set(image_pivots), [i for i in tokens if i not in image_pivots]
    for k, item in enumerate(pivots):
        quota = rest // len(pivots) + (k < rest % len(pivots))
        cos = torch.nn.functional.cosine_similarity(states[item][None], states[valid], dim=-1)
        chosen = [valid[t] for t in sorted(range(len(valid)), key=lambda t: float(cos[t]))[:quota]]
        kept.update(chosen)
        valid = [i for i in valid if i not in chosen]
    return torch.tensor(sorted(kept))


def reference_divprune(x0, vision, share: float) -> torch.Tensor:
    """DivPrune's choice for one sequence, as its `DivPrune` function: greedy max-min on 1 - cos of the vision
    tokens' input embeddings, starting from the token farthest from its nearest neighbour."""
    tokens = torch.nonzero(vision)[:, 0]
    count = math.ceil(len(tokens) * share)
    feats = x0[tokens]
    unit = feats / feats.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    chosen: list[int] = []
    for i in range(count):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1] if len(tokens) > 1 else distance[0]
        else:
            scores = distance[chosen].min(dim=0).values
        scores[chosen] = -math.inf
        # ties within rounding go to the earliest token (duplicate tokens' distances differ only by rounding)
        chosen.append(int(torch.nonzero(scores >= scores.max() - TIE)[0, 0]))
    return tokens[chosen]


def reference_logits(model, plan: Plan, x0, pe, vision, kept=None, inject=None, blocks=None):
    """Logits of one sequence (its real tokens only) under `plan`, computed layer by layer from scratch, and the
    vision tokens pruning kept (pass them back in to continue a generation: they are chosen on the prompt).

    pe: the (cos, sin) of the sequence, or a list of them, one per layer. inject[j] (n_vision, D), where given, is
    added to the vision tokens' states after layer j, whatever the layer did with them (Qwen3-VL's DeepStack).
    blocks (n,), where given: the bidirectional block of each token (-1: none), see `reference_mask`."""
    adapter = get_adapter(model)
    x, n = x0.clone(), x0.shape[0]
    p, rank = plan.prune_vision_after, plan.prune_vision_rank
    entered = None  # with an input stage, `kept` is (the vision tokens that entered, those pruning kept)
    if isinstance(kept, tuple):
        entered, kept = kept
    choose = kept is None and vision.any() and "pruned" in plan.roles()
    if plan.input_vision_keep is not None and vision.any() and entered is None:  # DivPrune on X_0
        entered = reference_divprune(x, vision, plan.input_vision_keep)
    n_vision, image = int(vision.sum()), vision
    text = torch.nonzero(~vision)[:, 0]
    if entered is not None:  # the vision tokens the input stage left out are in no layer, as if not in the prompt
        vision = torch.zeros_like(vision)
        vision[entered] = True
    everyone = torch.arange(n) if entered is None else torch.cat([text, entered]).sort().values
    per_layer = pe
    for j, (layer, role) in enumerate(zip(adapter.layers, plan.roles(), strict=True)):
        pe = per_layer[j] if isinstance(per_layer, list) else per_layer
        run = functools.partial(run_layer, blocks=blocks)
        if choose and rank == "attention" and j == p:  # FastV: rank by the last token
            scores = torch.zeros(n).index_put((everyone,), last_token_attention(layer, x, pe, everyone))
            tokens = torch.nonzero(vision)[:, 0]
            count = math.ceil(n_vision * plan.prune_vision_keep)
            kept = tokens[scores[tokens].argsort(descending=True, stable=True)[:count]]  # ties: earliest
        if choose and rank == "dart" and j == p:  # DART's pivots: L1 norm of this layer's keys, all heads
            key_norms = layer_keys(layer, x, pe).abs().sum((0, 2))
        if choose and rank == "dart" and j == p + 1:  # X_{p+1}, what this layer reads, through the final norm
            valid = torch.zeros(n, dtype=torch.bool)
            valid[everyone] = True
            norms = key_norms.masked_fill(~valid, -math.inf)  # tokens left out are not pivots
            kept = reference_dart(adapter.final_norm(x), norms, vision, plan.prune_vision_keep, of=n_vision)
        if choose and rank == "divprune" and j == 0:
            kept = reference_divprune(x, vision, plan.prune_vision_keep)
        if role == "all":
            x[everyone] = run(layer, x, pe, everyone)
        elif role == "absent":  # vision tokens are not in this layer's sequence at all
            x[text] = run(layer, x, pe, text)
        elif role == "frozen":  # vision tokens are keys/values here, but keep their state
            x[text] = run(layer, x, pe, everyone)[~vision[everyone]]
        elif role == "pruned":  # only the kept vision tokens are in this layer's sequence
            rows = torch.cat([text, kept]).sort().values if kept is not None else text
            x[rows] = run(layer, x, pe, rows)
        if inject is not None and j < len(inject):
            x[image] = x[image] + inject[j]
    logits = adapter.lm_head(adapter.final_norm(x))
    if cap := getattr(adapter.backbone.config, "final_logit_softcapping", None):  # Gemma 2
        logits = torch.tanh(logits / cap) * cap
    if (scale := compat.logit_scale(model)) is not None:  # Cohere2's causal LM; Aya Vision from transformers 5.25
        logits = logits * scale
    return logits, (kept if entered is None else (entered, kept))


def reference_blocks(family: str, full: dict, b: int, width: int) -> torch.Tensor | None:
    """Row b's bidirectional block per column (-1: none), as the model's mask has them in the prompt (generated
    tokens are in none): Gemma 3, each run of consecutive image tokens (token_type_ids 1), numbered from 0."""
    if base(family) != "gemma3" or "token_type_ids" not in full:
        return None
    types = full["token_type_ids"][b].tolist()
    blocks, block = [], -1
    for i, t in enumerate(types):
        if t == 1 and (i == 0 or types[i - 1] != 1):
            block += 1
        blocks.append(block if t == 1 and i < width else -1)
    return torch.tensor(blocks)


def reference_run(model, plan, family, full: dict, width: int, steps: int):
    """Reference logits for prompts of `width` columns followed by `steps` tokens, all in `full`.

    Returns each row's prompt logits (real tokens only) and, per step s, each row's last logits after width + s
    columns; every step recomputes the whole prefix from X_0.
    """
    x0, pe = layer_inputs(model, with_positions(family, full))  # X_0 and positions of a token ignore later ones
    vision = (full["input_ids"] == IMAGE) & (base(family) in VLMS)
    prompts, decoded = [], torch.zeros(steps, x0.shape[0], VOCAB)
    for b in range(x0.shape[0]):
        kept = None
        for s in range(steps):
            keep = full["attention_mask"][b, : width + s].bool()
            pe_b = row_positions(pe, b, slice(0, width + s), keep)
            blocks = reference_blocks(family, full, b, width)
            blocks = None if blocks is None else blocks[: width + s][keep]
            logits, kept = reference_logits(
                model, plan, x0[b, : width + s][keep], pe_b, vision[b, : width + s][keep], kept, blocks=blocks
            )  # fmt: skip
            prompts += [logits] if s == 0 else []
            decoded[s, b] = logits[-1]
    return prompts, decoded


def check_against_reference(family: str, plan: Plan, inputs: dict, sample: bool = False, steps: int = 20):
    model, width = build(family), inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**with_positions(family, inputs)).logits
        apply_plan(model, plan)
        try:
            prefill = model(**with_positions(family, inputs), use_cache=False).logits  # also the no-cache path
            torch.manual_seed(0)
            out = generate(model, inputs, steps, do_sample=sample)
        finally:
            remove_plan(model)
        full = extend(family, inputs, out.sequences[:, width:])
        prompts, decoded = reference_run(model, plan, family, full, width, steps)
    for b, ref in enumerate(prompts):
        torch.testing.assert_close(prefill[b][real[b]], ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(out.logits), decoded, atol=1e-4, rtol=0)
    return (prefill - plain)[real].abs().max()


PLANS = {
    "late-absent": dict(late_entry=2),
    "late-frozen": dict(late_entry=2, late_entry_mode="frozen"),
    "early-exit": dict(early_exit=2),
    "layer-skip": dict(skip_layers=[1, 4]),
    "combined-absent": dict(late_entry=2, early_exit=3, skip_layers=[0, 5]),
    "combined-frozen": dict(late_entry=1, late_entry_mode="frozen", early_exit=3, skip_layers=[2]),
    "frozen-vision-layers": dict(frozen_vision_layers=[1, 3]),  # ALL -> FROZEN -> ALL -> FROZEN -> ALL
    "combined-frozen-vision": dict(late_entry=1, early_exit=4, skip_layers=[3], frozen_vision_layers=[2]),
    "fastv": dict(prune_vision_after=1, prune_vision_keep=0.5),  # FastV's K = 2, R = 50 %
    "combined-pruned": dict(late_entry=1, prune_vision_after=2, prune_vision_keep=0.3, early_exit=4, skip_layers=[3]),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_changes_nothing(family, batch):
    model, inputs = build(family), make_inputs(family, batch)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        before_logits = model(**with_positions(family, inputs)).logits
        before = generate(model, inputs)
        apply_plan(model, Plan.for_model(model))
        try:
            after_logits = model(**with_positions(family, inputs)).logits
            after = generate(model, inputs)
        finally:
            remove_plan(model)
    torch.testing.assert_close(after_logits[real], before_logits[real], atol=1e-5, rtol=0)
    assert torch.equal(after.sequences, before.sequences)
    torch.testing.assert_close(torch.stack(after.logits), torch.stack(before.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_matches_reference(family, name):
    plan = Plan.for_model(build(family), **PLANS[name])
    changed = check_against_reference(family, plan, make_inputs(family, 4))
    if family in VLMS or plan.skip_layers:  # vision-only plans are no-ops on a text model
        assert changed > 1e-2, "the plan should change this model's outputs, or the test proves nothing"


@pytest.mark.parametrize("family", OTHER_CAUSAL_LMS)
def test_other_causal_lms_match_reference(family):
    changed = check_against_reference(family, Plan.for_model(build(family), skip_layers=[1, 4]), make_inputs(family, 4))
    assert changed > 1e-2


@pytest.mark.parametrize("family", SLIDING_LMS)
def test_sliding_window_lms_match_reference(family):
    """Sliding-window layers: the window counts original positions, whatever the plan removed (prefill and decoding
    both outrun the window: prompts of 5-8 tokens, 20 steps, window 4)."""
    model, inputs = build(family), make_inputs(family, 4)
    windows = get_adapter(model).windows
    assert WINDOW in windows and (None in windows) == (family not in ("mistral_sliding",))
    assert inputs["attention_mask"].sum(1).min() > WINDOW
    assert check_against_reference(family, Plan.for_model(model, skip_layers=[1, 4]), inputs) > 1e-2


@pytest.mark.parametrize("family", SLIDING_LMS)
def test_empty_plan_changes_nothing_with_sliding_windows(family):
    test_empty_plan_changes_nothing(family, 4)


def test_sliding_layers_keep_every_key_under_a_plan():
    """transformers' sliding cache layer keeps the last window - 1 keys by count; under a plan it keeps them all (the
    mask applies the window on original positions). A cache whose sliding layers were filled without the plan is
    refused."""
    model, inputs = build("gemma3_text"), make_inputs("gemma3_text", 2)
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, skip_layers=[1]))
        try:
            cache = compat.output_cache(generate(model, inputs, steps=5))
        finally:
            remove_plan(model)
        assert not any(cache.is_sliding)
        lengths = [layer.keys.shape[2] if layer.is_initialized else None for layer in cache.layers]
        assert lengths == [width + 4, None] + [width + 4] * 4
        out = model(**with_positions("gemma3_text", inputs), use_cache=True)  # no plan: sliding layers drop keys
        cache = compat.output_cache(out)
        assert any(cache.is_sliding)
        apply_plan(model, Plan.for_model(model, skip_layers=[1]))
        try:
            step = {"input_ids": out.logits[:, -1:].argmax(-1), "position_ids": torch.full((2, 1), width),
                    "attention_mask": torch.ones(2, width + 1, dtype=torch.long), compat.CACHE_KWARG: cache}
            with pytest.raises(SkipitError, match="sliding-window layer 0 was filled without it"):
                model(**step)
        finally:
            remove_plan(model)


@pytest.mark.parametrize("name", ["combined-absent", "combined-frozen"])
def test_eager_attention_matches_reference(name):
    family = "llava_eager"
    assert build(family).config.text_config._attn_implementation == "eager"
    check_against_reference(family, Plan.for_model(build(family), **PLANS[name]), make_inputs(family, 4), steps=6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sampling_matches_reference(family):
    plan = Plan.for_model(build(family), **PLANS["combined-frozen"])
    check_against_reference(family, plan, make_inputs(family, 4), sample=True, steps=10)


def test_remove_plan_restores_exactly():
    model, inputs = build("qwen2_vl"), make_inputs("qwen2_vl", 4)
    layers = list(get_adapter(model).layers)
    keys = list(model.state_dict())
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    with torch.no_grad():
        before = model(**inputs).logits
        apply_plan(model, Plan.for_model(model, **PLANS["combined-frozen"]))
        assert applied_plan(model) is not None and all(isinstance(m, SkipLayer) for m in get_adapter(model).layers)
        assert not torch.allclose(model(**inputs).logits, before)
        remove_plan(model)
        after = model(**inputs).logits
    assert torch.equal(after, before)
    assert all(a is b for a, b in zip(get_adapter(model).layers, layers, strict=True))
    assert list(model.state_dict()) == keys
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert applied_plan(model) is None and type(model) is Qwen2VLForConditionalGeneration


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_early_exit_shortens_kv_cache(family):
    model, inputs = build(family), make_inputs(family, 4)
    width = inputs["input_ids"].shape[1]
    n_vision = (inputs["input_ids"] == IMAGE).sum(1)
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, early_exit=2, skip_layers=[4]))
        try:
            cache = compat.output_cache(generate(model, inputs, steps=5))
        finally:
            remove_plan(model)
    lengths = [layer.keys.shape[2] if layer.is_initialized else None for layer in cache.layers]
    # 5 logits = prefill + 4 decode steps; later layers hold no vision token (rows padded to the fewest vision tokens)
    exited = width - int(n_vision.min()) + 4
    assert lengths == [width + 4] * 3 + [exited, None, exited]
    assert exited < width + 4


def test_pruning_shortens_kv_cache():
    model, inputs = build("llava"), make_inputs("llava", 2)  # 9 vision tokens per row
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, prune_vision_after=1, prune_vision_keep=0.5))
        try:
            cache = compat.output_cache(generate(model, inputs, steps=5))
        finally:
            remove_plan(model)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [width + 4] * 2 + [width - 9 + 5 + 4] * 4  # ceil(9 * 0.5) = 5 vision tokens kept


def test_rows_with_different_vision_counts_stay_independent():
    """A row's output must not depend on the other rows (ragged vision subsets are padded and masked)."""
    family = "qwen2_vl"
    model, inputs = build(family), make_inputs(family, 4)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    n_patches = int(inputs["image_grid_thw"][0].prod())
    alone = dict(
        input_ids=inputs["input_ids"][:1, pad:], attention_mask=inputs["attention_mask"][:1, pad:],
        pixel_values=inputs["pixel_values"][:n_patches], image_grid_thw=inputs["image_grid_thw"][:1],
        mm_token_type_ids=inputs["mm_token_type_ids"][:1, pad:],
    )  # fmt: skip
    assert (inputs["input_ids"] == IMAGE).sum(1).unique().numel() > 1  # rows really differ in vision tokens
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, **PLANS["combined-absent"]))
        try:
            batched, single = generate(model, inputs, steps=8), generate(model, alone, steps=8)
        finally:
            remove_plan(model)
    assert torch.equal(single.sequences[0], batched.sequences[0, pad:])
    torch.testing.assert_close(torch.stack(single.logits)[:, 0], torch.stack(batched.logits)[:, 0], atol=1e-4, rtol=0)


def test_errors_are_clear():
    model, inputs = build("llava"), make_inputs("llava", 1)
    apply_plan(model, Plan.for_model(model, late_entry=2))
    try:
        with pytest.raises(SkipitError, match="forward or generate"):
            model.model.language_model(inputs_embeds=torch.zeros(1, 3, 32))
        with torch.no_grad():
            out = model(**with_positions("llava", inputs), use_cache=True)
            step = {"input_ids": out.logits[:, -1:].argmax(-1), compat.CACHE_KWARG: compat.output_cache(out)}
            with pytest.raises(SkipitError, match="pass position_ids"):
                model(**step)  # layer 0 cached no vision token: its length is not the sequence's
            with pytest.raises(SkipitError, match="attention mask of the whole sequence"):
                model(
                    **step,
                    position_ids=torch.tensor([[inputs["input_ids"].shape[1]]]),
                    attention_mask=step["input_ids"],
                )
    finally:
        remove_plan(model)
    with pytest.raises(SkipitError, match="not a LlavaForConditionalGeneration"):
        apply_plan(model, Plan.for_model(build("idefics3")))
    flex = LlamaForCausalLM(LlamaConfig(**TEXT, attn_implementation="flex_attention"))
    with pytest.raises(SkipitError, match="attn_implementation='sdpa'"):
        apply_plan(flex, Plan.for_model(flex))


def test_frozen_without_the_keys_values_shortcut_matches_reference(monkeypatch):
    """Attention classes skipit has not checked run whole on frozen vision tokens (output thrown away)."""
    monkeypatch.setattr("skipit.adapters.base.KEYS_VALUES_ONLY", frozenset())
    for family in ("llava", "qwen2_vl"):
        plan = Plan.for_model(build(family), **PLANS["combined-frozen"])
        check_against_reference(family, plan, make_inputs(family, 4), steps=4)
