"""Qwen3.5 (hybrid linear attention) under skip plans, with test_skipping's machinery taught Qwen3.5 (tiny random
models, its slow reference of every plan mode, batch 4 with left padding and rows with different numbers of vision
tokens), plus the native check: a plan that skips layer j equals the untouched model whose layer j returns its input
(the model's own masks, M-RoPE positions and hybrid cache: keys and values of the full-attention layers, conv and
recurrent states of the linear-attention ones).

The tiny models alternate linear-attention (Gated DeltaNet: layers 0, 2, 4) and full-attention layers (1, 3, 5). The
reference runs a linear-attention layer on exactly the tokens the plan lets through, in order, from a zero state (the
row's real tokens only, so no padding): a token removed from a layer is not in its recurrence, a frozen one feeds it
and keeps its state.
"""

from __future__ import annotations

import functools
import re

import pytest
import test_skipping as ts
import torch
from test_skipping import IMAGE, PLANS, QWEN_IDS, TEXT, one_thread  # noqa: F401
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from skipit import compat
from skipit.adapters import get_adapter
from skipit.adapters.qwen3_5 import Qwen3_5Adapter
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import SkipLayer, apply_plan, remove_plan
from skipit.skipping import layer as skip_layer

STEPS = 8
KINDS = ["linear_attention", "full_attention"] * 3
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
QWEN3_5_TEXT = dict(TEXT, head_dim=16, layer_types=KINDS, rope_parameters=ROPE, linear_num_value_heads=2,
                    linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
FAMILIES = ["qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"]
VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
              num_position_embeddings=64)  # fmt: skip
Q_PLANS = {
    "empty": {},  # the untouched model itself against the reference
    **PLANS,
    "divprune": dict(prune_vision_after=-1, prune_vision_rank="divprune", prune_vision_keep=0.5),
}
_RUN_LAYER = ts.run_layer


@functools.cache
def build(family: str):
    """The tiny Qwen3.5 VLM ("qwen3_5", M-RoPE) or its text model alone ("qwen3_5_text", Qwen3_5ForCausalLM); with
    "_moe", the mixture-of-experts variant (4 experts, 2 per token, a shared expert)."""
    torch.manual_seed(0)
    text = dict(QWEN3_5_TEXT, **MOE) if "moe" in family else QWEN3_5_TEXT
    if family.endswith("_text"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **text))
    elif family == "qwen3_5_moe":
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=text, vision_config=VISION,
                                                                    **QWEN_IDS))  # fmt: skip
    else:
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=VISION, **QWEN_IDS))
    # a real checkpoint's padding embedding is not zero (nn.Embedding's padding_idx zeroes it at init only): padding
    # tokens then carry states, which a linear-attention layer must mask out
    with torch.no_grad():
        model.get_input_embeddings().weight[0].normal_(0, 0.2)
    model.generation_config.eos_token_id = None  # random weights: always decode the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def run_layer(layer, x, pe, rows, blocks=None):
    """The layer on the tokens `rows` of one sequence x (n, D) of real tokens, no cache: a linear-attention layer runs
    its recurrence over exactly these, in order (no mask: no padding); a full-attention layer as test_skipping's."""
    if not hasattr(layer, "linear_attn"):
        return _RUN_LAYER(layer, x, pe, rows, blocks)
    out = layer(x[rows][None], attention_mask=None, position_embeddings=tuple(t[rows][None] for t in pe),
                position_ids=None, use_cache=False)  # fmt: skip
    return out[0]


@pytest.fixture(autouse=True)
def qwen3_5_machinery(monkeypatch):
    """test_skipping's helpers, taught Qwen3.5: its models, its linear-attention layers in the reference, its VLMs
    among the Qwen VLMs (M-RoPE ids from the mask, `mm_token_type_ids`); other families as they were."""
    theirs = ts.build
    monkeypatch.setattr(ts, "build", lambda family: (build if family in FAMILIES else theirs)(family))
    monkeypatch.setattr(ts, "run_layer", run_layer)
    monkeypatch.setattr(ts, "VLMS", [*ts.VLMS, "qwen3_5", "qwen3_5_moe"])
    monkeypatch.setattr(ts, "QWEN_VL", (*ts.QWEN_VL, "qwen3_5", "qwen3_5_moe"))


def check_against_reference(family: str, plan: Plan, steps: int = STEPS) -> float:
    """test_skipping's check (prefill without a cache, then generate() against the reference recomputing every step)
    at a tolerance of 1e-3: the gated delta rule runs in float32 whatever the model's dtype, and its chunked form
    (prefill, the reference) and recurrent form (decoding) differ by up to ~1e-4 on the untouched model too (see
    `test_plan_matches_reference[*-empty]`); a plan changes the logits by more than 1e-2 (asserted)."""
    model, inputs = build(family), ts.make_inputs(family, 4)
    width, real = inputs["input_ids"].shape[1], inputs["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**inputs).logits
        apply_plan(model, plan)
        try:
            prefill = model(**inputs, use_cache=False).logits
            out = ts.generate(model, inputs, steps)
        finally:
            remove_plan(model)
        prompts, decoded = ts.reference_run(model, plan, family, ts.extend(family, inputs, out.sequences[:, width:]),
                                            width, steps)  # fmt: skip
    for b, ref in enumerate(prompts):
        torch.testing.assert_close(prefill[b][real[b]], ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.stack(out.logits), decoded, atol=1e-3, rtol=0)
    return float((prefill - plain)[real].abs().max())


def test_adapter():
    for family in FAMILIES:
        adapter = get_adapter(build(family))
        assert isinstance(adapter, Qwen3_5Adapter) and adapter.plan_refusal() is None
        assert adapter.recurrent == [True, False] * 3 and adapter.windows == [None] * 6
    counts = (ts.make_inputs("qwen3_5", 4)["input_ids"] == IMAGE).sum(1).tolist()
    assert counts == [4, 6, 2, 4]  # rows with different numbers of vision tokens: ragged subsets


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_changes_nothing(family):
    ts.test_empty_plan_changes_nothing(family, 4)  # prefill and 20 decoding steps, greedy tokens identical


@pytest.mark.parametrize("name", list(Q_PLANS))
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_plan_matches_reference(family, name):
    """Every plan mode on the VLMs, linear-attention layers included: layer skips, vision exit and late entry
    ('absent': not in the recurrence; 'frozen': in it, states kept), frozen vision layers, DivPrune's pruning; rows
    with different numbers of vision tokens make ragged token subsets."""
    model = build(family)
    plan = Plan.for_model(model, **Q_PLANS[name])
    if plan.prune_vision_after is not None and plan.prune_vision_rank in ("attention", "dart"):
        p = plan.prune_vision_after
        what = f"after linear-attention layer {p}" if p % 2 == 0 else "for Qwen3_5(Moe)?Attention"
        with pytest.raises(SkipitError, match=f"pruning vision tokens by attention is not supported {what}") as info:
            apply_plan(model, plan)
        assert "\n" not in str(info.value)
        return
    changed = check_against_reference(family, plan)
    assert changed > 1e-2 or plan.is_empty, "the plan should change the outputs, or the test proves nothing"


@pytest.mark.parametrize("skip", [[1], [0, 5], [2, 3]])
def test_text_model_layer_skips_match_reference(skip):
    changed = check_against_reference("qwen3_5_text", Plan.for_model(build("qwen3_5_text"), skip_layers=skip))
    assert changed > 1e-2


def _native(family: str, j: int, monkeypatch, broken: str | None = None) -> float:
    """Max |logit| difference between a plan skipping layer j and the untouched model with layer j an identity
    (prefill and 20 decoding steps, batch 4, left padding). `broken`: the plan run with its linear-attention layers
    given no padding mask ("padding") or no cache ("cache"), to show the check sees either."""
    model, inputs = build(family), ts.make_inputs(family, 4)
    with monkeypatch.context() as patch, torch.no_grad():
        apply_plan(model, Plan.for_model(model, skip_layers=[j]))
        if broken == "padding":
            patch.setattr(skip_layer, "padding_mask", lambda valid: None)
        if broken == "cache":
            recurrent = SkipLayer._recurrent
            patch.setattr(SkipLayer, "_recurrent", lambda self, step, h, kw: recurrent(
                self, step, h, {k: (None if k in ("cache", "past_key_values") else v) for k, v in kw.items()}))
        try:
            planned = ts.generate(model, inputs)
        finally:
            remove_plan(model)
            patch.undo()
        patch.setattr(get_adapter(model).layers[j], "forward", lambda hidden_states, *args, **kwargs: hidden_states)
        native = ts.generate(model, inputs)
    if broken is None:
        assert torch.equal(planned.sequences, native.sequences)
    return float((torch.stack(planned.logits) - torch.stack(native.logits)).abs().max())


# Not layer 1: transformers reads the cache's length (for its masks and positions) off the first full-attention layer,
# which an identity layer 1 leaves empty (the reference checks skipping it).
@pytest.mark.parametrize("j", [0, 2, 3, 4, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_a_layer_equals_an_identity_layer(family, j, monkeypatch):
    """Native check, linear-attention (0, 2, 4) and full-attention layers (3, 5): the model's own masks, positions
    and hybrid cache. With the linear-attention layers' padding mask or cache dropped, the logits are far off."""
    assert _native(family, j, monkeypatch) < 1e-5
    if j == 2:
        assert _native(family, j, monkeypatch, broken="padding") > 1e-2
        assert _native(family, j, monkeypatch, broken="cache") > 1e-1


def test_two_stage_plans_are_refused_with_the_ranking_they_need():
    """A two-stage plan ranks by attention (or DART) after a layer, which Qwen3.5 cannot: one line, before any call
    (so the input stage never meets a linear-attention layer)."""
    model = build("qwen3_5")
    for p in (2, 3):  # a linear-attention layer, a full-attention one
        plan = Plan.for_model(model, input_vision_keep=0.5, prune_vision_after=p, prune_vision_keep=0.25)
        with pytest.raises(SkipitError, match="pruning vision tokens by attention is not supported") as info:
            apply_plan(model, plan)
        assert "\n" not in str(info.value)


def test_ragged_rows_continuing_a_linear_state_are_refused():
    """Rows with different numbers of tokens in a linear-attention layer run with padding slots first, which leave a
    fresh state at zero but would decay a cached one: a call that continues the cache with vision tokens in such a
    layer (the same prompt again; layer 4 is the first linear-attention layer on text only) is refused in one line."""
    model, inputs = build("qwen3_5"), ts.make_inputs("qwen3_5", 4)
    apply_plan(model, Plan.for_model(model, early_exit=2))
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            again = dict(inputs, attention_mask=torch.cat([inputs["attention_mask"]] * 2, 1),
                         position_ids=inputs["attention_mask"].cumsum(-1) + 20)  # fmt: skip
            with pytest.raises(SkipitError, match="linear-attention layer 4 would run on different numbers of tokens "
                                                  "per row in a call that continues its cache") as info:
                model(**again, **{compat.CACHE_KWARG: compat.output_cache(out)})
    finally:
        remove_plan(model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("j", [0, 1])
def test_continuing_a_cache_without_positions_is_refused_or_exact(j, monkeypatch):
    """A call that continues a cache without position_ids gets them from transformers, off the cache's length: layer
    0's (linear attention) from transformers 5.25, the first full-attention layer's (1) before. A plan skipping either
    layer, on any release: the call is refused in one line, and then the untouched model with that layer an identity
    does infer wrong positions (the refusal is needed); or it gives the logits of the correct position_ids passed
    explicitly (those the untouched model infers)."""
    model, inputs = build("qwen3_5_text"), ts.make_inputs("qwen3_5_text", 2)
    one = torch.ones(2, 1, dtype=torch.long)
    step = dict(input_ids=one, attention_mask=torch.cat([inputs["attention_mask"], one], 1))
    positions = torch.full((2, 1), inputs["input_ids"].shape[1])  # the prompt ran at 0..width-1 (no position_ids)

    def continued(**kwargs):
        cache = compat.output_cache(model(**inputs, use_cache=True))
        return model(**step, **kwargs, **{compat.CACHE_KWARG: cache}).logits

    with torch.no_grad():
        assert torch.equal(continued(), continued(position_ids=positions))
        apply_plan(model, Plan.for_model(model, skip_layers=[j]))
        try:
            explicit, wrong = continued(position_ids=positions), continued(position_ids=positions + 1)
            try:
                inferred, refusal = continued(), None
            except SkipitError as error:
                inferred, refusal = None, error
        finally:
            remove_plan(model)
        if refusal is None:
            torch.testing.assert_close(inferred, explicit, atol=1e-5, rtol=0)
            assert (wrong - explicit).abs().max() > 1e-2  # positions matter here: the equality says they were right
            return
        assert re.fullmatch(r"this plan keeps the cache layer .* pass position_ids when continuing from a cache "
                            r"\(generate\(\) does\)", str(refusal))  # fmt: skip
        monkeypatch.setattr(get_adapter(model).layers[j], "forward", lambda hidden_states, *args, **kw: hidden_states)
        assert (continued() - continued(position_ids=positions)).abs().max() > 1e-2
