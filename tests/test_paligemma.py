"""PaliGemma's prefix-LM mask under skip plans, with test_skipping's machinery taught PaliGemma (tiny random models,
its slow reference of every plan mode, batch 4 with left padding and rows with 1 or 2 images), plus the native check:
a plan that skips layer j equals the untouched model whose layer j returns its input (the model's own masks).

The prefix (`token_type_ids == 0`: the images and the prompt) attends to itself both ways; the suffix (a row's last
two prompt tokens in some rows, and every generated token) is causal. "paligemma" has PaliGemma 1's Gemma text model
(full attention); "paligemma_sliding" PaliGemma 2's Gemma 2 text model, sliding (window 3, shorter than a prefix) and
full layers alternating, where the prefix block reaches across the window (OR(sliding causal, block)).
"""

from __future__ import annotations

import functools

import pytest
import test_skipping as ts
import torch
from test_families import _native_layer
from test_skipping import IMAGE, PLANS, SIGLIP, TEXT, one_thread  # noqa: F401
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from skipit import compat
from skipit.adapters import get_adapter
from skipit.adapters.paligemma import PaliGemmaAdapter
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan

FAMILIES = ["paligemma", "paligemma_sliding"]
WINDOW = 3
PALI_PLANS = {
    "empty": {},  # the untouched model itself against the reference: the reference's mask is the model's
    **PLANS,
    "dart": dict(prune_vision_after=1, prune_vision_rank="dart", prune_vision_keep=0.5),
    "divprune": dict(prune_vision_after=-1, prune_vision_rank="divprune", prune_vision_keep=0.5),
}
STEPS = 8


@functools.cache
def build(family: str):
    """A tiny PaliGemma; "<family>_eager" is the same with eager attention."""
    family, eager = family.removesuffix("_eager"), family.endswith("_eager")
    torch.manual_seed(0)
    if family == "paligemma":
        text = GemmaConfig(**TEXT, head_dim=8)
    else:
        text = Gemma2Config(**TEXT, head_dim=8, sliding_window=WINDOW,
                            layer_types=["sliding_attention", "full_attention"] * 3)  # fmt: skip
    config = PaliGemmaConfig(text_config=text, vision_config=SiglipVisionConfig(**SIGLIP, image_size=8, patch_size=4),
                             image_token_id=IMAGE, projection_dim=TEXT["hidden_size"])  # fmt: skip
    model = PaliGemmaForConditionalGeneration(config)
    if eager:
        model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = None  # random weights: always decode the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(family: str, batch: int) -> dict:
    """Left-padded rows: 1 or 2 images (4 tokens each), a prompt, and in every third row a suffix of 2 tokens; the
    prefix has token_type_ids 0 (padding too, as the processor pads them), the suffix 1."""
    gen = torch.Generator().manual_seed(batch)
    rows, types, images = [], [], [1 + b % 2 for b in range(batch)]
    for b in range(batch):
        prefix = [IMAGE] * 4 * images[b] + torch.randint(3, 88, (2 + b,), generator=gen).tolist()
        suffix = torch.randint(3, 88, (2 if b % 3 == 2 else 0,), generator=gen).tolist()
        rows.append(prefix + suffix)
        types.append([0] * len(prefix) + [1] * len(suffix))
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    return dict(
        input_ids=torch.tensor([[0] * p + r for p, r in zip(pad, rows, strict=True)]),
        attention_mask=torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pad, rows, strict=True)]),
        token_type_ids=torch.tensor([[0] * p + t for p, t in zip(pad, types, strict=True)]),
        pixel_values=torch.randn(sum(images), 3, 8, 8, generator=gen),
    )


def reference_blocks(family: str, full: dict, b: int, width: int) -> torch.Tensor | None:
    """Row b's prefix: the prompt's columns with token_type_ids 0 (block 0); suffix and generated tokens: -1. None
    without token_type_ids (causal)."""
    if "token_type_ids" not in full:
        return None
    columns = torch.arange(full["input_ids"].shape[1])
    return torch.where((full["token_type_ids"][b] == 0) & (columns < width), 0, -1)


def reference_mask(rows: torch.Tensor, window: int | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """PaliGemma's mask on the tokens `rows` of one sequence: causal (inside the window in a sliding layer), or both
    tokens in the prefix, at any distance: OR(AND(window, causal), block)."""
    q, k = rows[:, None], rows[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    if blocks is not None:
        prefix = blocks[rows] >= 0
        allowed = allowed | (prefix[:, None] & prefix[None, :])
    return allowed[None, None]


def is_paligemma(family: str) -> bool:
    return ts.base(family) == "paligemma"


@pytest.fixture(autouse=True)
def paligemma_machinery(monkeypatch):
    """test_skipping's helpers, taught PaliGemma: its models and inputs, 1-indexed positions (generate() adds 1 to
    the usual ones), its prefix block and mask in the reference; other families as they were."""
    for name, ours in (("build", build), ("make_inputs", make_inputs), ("reference_blocks", reference_blocks)):
        theirs = getattr(ts, name)
        monkeypatch.setattr(ts, name, lambda family, *a, _o=ours, _t=theirs: (_o if is_paligemma(family) else _t)(
            family, *a))  # fmt: skip
    with_positions = ts.with_positions
    monkeypatch.setattr(ts, "with_positions", lambda family, inputs: dict(
        inputs, position_ids=inputs["attention_mask"].cumsum(-1)) if is_paligemma(family) else with_positions(
        family, inputs))  # fmt: skip
    monkeypatch.setattr(ts, "reference_mask", reference_mask)
    monkeypatch.setattr(ts, "VLMS", [*ts.VLMS, "paligemma"])


def test_adapter_and_inputs():
    model, inputs = build("paligemma_sliding"), make_inputs("paligemma_sliding", 4)
    adapter = get_adapter(model)
    assert isinstance(adapter, PaliGemmaAdapter) and adapter.family == "PaliGemma"
    assert adapter.windows == [WINDOW, None] * 3 and not adapter.causal_without_mask
    assert (inputs["input_ids"] == IMAGE).sum(1).tolist() == [4, 8, 4, 8]
    assert (inputs["token_type_ids"] == 1).any(1).tolist() == [False, False, True, False]
    # the prefix is longer than the window in every row: the block reaches across it
    assert int(((inputs["token_type_ids"] == 0) & inputs["attention_mask"].bool()).sum(1).min()) > WINDOW


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_changes_nothing(family):
    ts.test_empty_plan_changes_nothing(family, 4)  # prefill and 20 decoding steps


@pytest.mark.parametrize("name", list(PALI_PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_matches_reference(family, name):
    model = build(family)
    plan = Plan.for_model(model, **PALI_PLANS[name])
    ranked = plan.prune_vision_after is not None and plan.prune_vision_rank in ("attention", "dart")
    if family == "paligemma_sliding" and ranked:  # Gemma 2 softcaps its attention: not reproduced beside it
        with pytest.raises(SkipitError, match="pruning vision tokens by attention is not supported for Gemma2"):
            apply_plan(model, plan)
        return
    changed = ts.check_against_reference(family, plan, make_inputs(family, 4), steps=STEPS)
    assert changed > 1e-2 or plan.is_empty, "the plan should change the outputs, or the test proves nothing"


def _native(family: str, monkeypatch, drop_blocks: bool = False) -> float:
    """Max |logit| difference between a plan skipping layer j and the untouched model with layer j an identity
    (prefill and STEPS decoding steps); `drop_blocks`: the plan's masks without the prefix block."""
    model, inputs = build(family), make_inputs(family, 4)
    j = _native_layer(model)
    with monkeypatch.context() as patch, torch.no_grad():
        if drop_blocks:
            patch.setattr(PaliGemmaAdapter, "blocks", lambda self, inputs, first_call: None)
        planned, native = ts.skip_and_identity(model, inputs, j, patch, STEPS)
    if not drop_blocks:
        assert torch.equal(planned.sequences, native.sequences)
    return float((torch.stack(planned.logits) - torch.stack(native.logits)).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_a_layer_equals_an_identity_layer(family, monkeypatch):
    """Native check: the model's own prefix-LM mask (and sliding windows), no reference of ours; without the prefix
    block the plan's logits are far off, so the check sees a dropped mask."""
    assert _native(family, monkeypatch) < 1e-5
    assert _native(family, monkeypatch, drop_blocks=True) > 1.0


def test_a_prompt_without_prefix_is_causal():
    """token_type_ids all 1 (no prefix), one unpadded row: the model builds a causal mask, which the plan must pass
    to its attention (PaliGemma's attention modules are bidirectional when given none)."""
    inputs = make_inputs("paligemma", 1)
    inputs["token_type_ids"] = torch.ones_like(inputs["token_type_ids"])
    ts.check_against_reference("paligemma", Plan.for_model(build("paligemma")), inputs, steps=4)  # the model's mask
    plan = Plan.for_model(build("paligemma"), **PLANS["combined-absent"])
    assert ts.check_against_reference("paligemma", plan, inputs, steps=4) > 1e-2


def test_without_token_type_ids_padded_prompts_are_causal():
    """Without token_type_ids the model's mask is causal (and sliding) wherever it builds one: padded prompts."""
    for family in FAMILIES:
        inputs = make_inputs(family, 4)
        del inputs["token_type_ids"]
        ts.check_against_reference(family, Plan.for_model(build(family)), inputs, steps=4)  # the model's mask
        plan = Plan.for_model(build(family), **PLANS["combined-frozen"])
        assert ts.check_against_reference(family, plan, inputs, steps=4) > 1e-2


def test_without_token_type_ids_unpadded_prompts_are_refused():
    """Without token_type_ids nor padding the model passes SDPA no mask, and its attention modules (use_bidirectional
    _attention) then attend both ways over the whole prompt: refused in one line, rather than run causally."""
    model, inputs = build("paligemma"), make_inputs("paligemma", 1)
    del inputs["token_type_ids"]
    apply_plan(model, Plan.for_model(model, skip_layers=[3]))
    try:
        with pytest.raises(SkipitError, match="without token_type_ids on unpadded prompts") as info, torch.no_grad():
            model(**ts.with_positions("paligemma", inputs))
    finally:
        remove_plan(model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("skip", [[], [0, 3]])
def test_continuing_a_cache_is_causal_as_in_the_model(skip):
    """A call that continues the cache without pixels gets a causal mask from the model, whatever its token_type_ids
    (here 0, prefix) say: the untouched model (empty plan) and a plan that skips layer 0, whose cache stays empty,
    both match the reference in which the new tokens are causal."""
    family = "paligemma"
    model, inputs = build(family), make_inputs(family, 2)
    width, new = inputs["input_ids"].shape[1], torch.randint(3, 88, (2, 3), generator=torch.Generator().manual_seed(1))
    full = ts.extend(family, inputs, new)  # the new tokens get token_type_ids 0
    assert bool((full["token_type_ids"][:, width:] == 0).all())
    plan = Plan.for_model(model, skip_layers=skip)
    with torch.no_grad():
        apply_plan(model, plan)
        try:
            out = model(**ts.with_positions(family, inputs), use_cache=True)
            step = dict(input_ids=new, attention_mask=full["attention_mask"], token_type_ids=new * 0,
                        position_ids=ts.with_positions(family, full)["position_ids"][:, width:],
                        **{compat.CACHE_KWARG: compat.output_cache(out)})  # fmt: skip
            logits = model(**step).logits
        finally:
            remove_plan(model)
        causal = torch.cat([inputs["token_type_ids"], torch.ones_like(new)], 1)  # the reference's blocks
        prompts, _ = ts.reference_run(model, plan, family, dict(full, token_type_ids=causal), width + 3, steps=1)
    for b, ref in enumerate(prompts):
        torch.testing.assert_close(logits[b], ref[-3:], atol=1e-4, rtol=0)


def test_continuing_a_cache_with_pixels_and_a_prefix_is_refused():
    """The model lays the blocks of such a call over the cached tokens (indexed by absolute position): refused."""
    model, inputs = build("paligemma"), make_inputs("paligemma", 2)
    width = inputs["input_ids"].shape[1]
    apply_plan(model, Plan.for_model(model, skip_layers=[3]))
    try:
        with torch.no_grad():
            out = model(**ts.with_positions("paligemma", inputs), use_cache=True)
            step = dict(inputs, input_ids=inputs["input_ids"][:, -1:], position_ids=torch.full((2, 1), width + 1),
                        token_type_ids=torch.zeros(2, 1, dtype=torch.long))  # fmt: skip
            step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            with pytest.raises(SkipitError, match="only in the call that starts the cache") as info:
                model(**step, **{compat.CACHE_KWARG: compat.output_cache(out)})
    finally:
        remove_plan(model)
    assert "\n" not in str(info.value)


def test_eager_attention_matches_reference():
    """Eager attention: the model's masks are always built (causal without token_type_ids, even unpadded)."""
    family = "paligemma_eager"
    assert build(family).config.text_config._attn_implementation == "eager"
    plan = Plan.for_model(build(family), **PLANS["combined-frozen"])
    ts.check_against_reference(family, plan, make_inputs(family, 4), steps=4)
    inputs = make_inputs(family, 1)
    del inputs["token_type_ids"]
    ts.check_against_reference(family, Plan.for_model(build(family)), inputs, steps=4)  # the model's mask: causal
    assert ts.check_against_reference(family, plan, inputs, steps=4) > 1e-2
