"""Llama 4 under skip plans, with test_skipping's machinery taught Llama 4 (tiny random models, its slow reference of
every plan mode, batch 4 with left padding and rows with 1 or 2 image tiles), plus the native check: a plan that
skips layer j equals the untouched model whose layer j returns its input (the model's own masks and positions).

The tiny model has Llama 4's layout: RoPE layers with chunked attention (chunks of 4 positions, so that chunks cut in
prefill and decoding, counted from each row's first real token) and complex rotary (freqs_cis), NoPE layers 2 and 5
with full attention, mixture-of-experts layers 1, 3, 5.
"""

from __future__ import annotations

import functools

import pytest
import test_skipping as ts
import torch
import transformers
from test_families import _native_layer
from test_skipping import IMAGE, PLANS, TEXT, one_thread  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, Llama4Config, Llama4ForConditionalGeneration

from skipit.adapters import get_adapter
from skipit.adapters.llama4 import Llama4Adapter
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan

CHUNK, NOPE = 4, [2, 5]
STEPS = 8
L4_PLANS = {
    "empty": {},  # the untouched model itself against the reference: the reference's masks are the model's
    **PLANS,
    "divprune": dict(prune_vision_after=-1, prune_vision_rank="divprune", prune_vision_keep=0.5),
}


def build(family: str = "llama4"):
    """`_build(family)`, skipping the test where the installed transformers' own Llama4ForConditionalGeneration
    cannot run a forward call (5.24.0 reads `image_outputs` off its language model's output, which has none): there
    is nothing of skipit's to test. Only that known upstream failure skips; any other error fails the test."""
    model = _build(family)
    if family != "llama4_text" and (why := _upstream_failure(family)):
        pytest.skip(f"transformers {transformers.__version__}: the untouched {type(model).__name__} fails ({why})")
    return model


@functools.cache
def _upstream_failure(family: str) -> str | None:
    try:
        with torch.no_grad():
            _build(family)(**make_inputs(family, 2))
    except AttributeError as e:
        if "image_outputs" in str(e):
            return str(e)
        raise
    return None


@functools.cache
def _build(family: str = "llama4"):
    """The tiny Llama 4; "llama4_floor": the same with floor_scale 8, so that the NoPE layers' query scale (by
    position) differs from 1 in these short prompts (the released models: 8192); "llama4_text": its text model
    alone."""
    torch.manual_seed(0)
    text = dict(TEXT, head_dim=8, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=2, attention_chunk_size=CHUNK,
                no_rope_layers=[int(j not in NOPE) for j in range(TEXT["num_hidden_layers"])],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    if family == "llama4_floor":
        text["floor_scale"] = 8
    if family == "llama4_text":  # Llama4ForCausalLM, the text model alone
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama4_text", **text))
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
        return model.eval()
    vision = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32,
                  vision_output_dim=32)  # fmt: skip
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=IMAGE)
    model = Llama4ForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # random weights: always decode the full length
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(family: str, batch: int) -> dict:
    """Left-padded rows: text, 1 or 2 image tiles (4 tokens each), text."""
    gen = torch.Generator().manual_seed(batch)
    tiles = [1 + b % 2 for b in range(batch)]

    def text(n: int) -> list[int]:
        return torch.randint(3, 88, (n,), generator=gen).tolist()

    if family == "llama4_text":  # text only
        rows = [text(9 + b) for b in range(batch)]
    else:
        rows = [text(2 + b) + [IMAGE] * 4 * tiles[b] + text(3) for b in range(batch)]
    width = max(map(len, rows))
    inputs = dict(
        input_ids=torch.tensor([[0] * (width - len(r)) + r for r in rows]),
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    )
    if family != "llama4_text":
        inputs["pixel_values"] = torch.randn(sum(tiles), 3, 16, 16, generator=gen)
    return inputs


def run_layer(layer, x, pe, rows, blocks=None):
    """The layer on the tokens `rows` of one sequence x (n, D) of real tokens, no cache: causal, and in a chunked
    layer within the chunk (rows // CHUNK: chunks count from the first real token); pe is (freqs_cis,)."""
    q, k = rows[:, None], rows[None, :]
    mask = k <= q
    if layer.self_attn.config.layer_types[layer.self_attn.layer_idx] == "chunked_attention":
        mask = mask & (k // CHUNK == q // CHUNK)
    out = layer(x[rows][None], attention_mask=mask[None, None], position_embeddings=pe[0][rows][None],
                position_ids=None, use_cache=False)  # fmt: skip
    return out[0]


@pytest.fixture(autouse=True)
def llama4_machinery(monkeypatch):
    """test_skipping's helpers, taught Llama 4: its models and inputs, its freqs_cis carried as a 1-tuple (which the
    reference slices per row like (cos, sin)) and its chunked masks; other families as they were."""
    families = ("llama4", "llama4_floor", "llama4_text")
    for name, ours in (("build", build), ("make_inputs", make_inputs)):
        theirs = getattr(ts, name)
        monkeypatch.setattr(ts, name, lambda family, *a, _o=ours, _t=theirs: (_o if family in families else _t)(
            family, *a))  # fmt: skip
    layer_inputs = ts.layer_inputs

    def wrapped(model, inputs):
        x, pe = layer_inputs(model, inputs)
        return x, ((pe,) if isinstance(pe, torch.Tensor) else pe)

    monkeypatch.setattr(ts, "layer_inputs", wrapped)
    monkeypatch.setattr(ts, "run_layer", run_layer)
    monkeypatch.setattr(ts, "VLMS", [*ts.VLMS, *families])


def test_adapter():
    model = build()
    adapter = get_adapter(model)
    assert isinstance(adapter, Llama4Adapter) and adapter.family == "Llama 4" and adapter.plan_refusal() is None
    assert adapter.chunks == [CHUNK, CHUNK, None, CHUNK, CHUNK, None] and adapter.windows == [None] * 6
    assert (make_inputs("llama4", 4)["input_ids"] == IMAGE).sum(1).tolist() == [4, 8, 4, 8]


def test_empty_plan_changes_nothing():
    ts.test_empty_plan_changes_nothing("llama4", 4)  # prefill and 20 decoding steps


@pytest.mark.parametrize("name", list(L4_PLANS))
def test_plan_matches_reference(name):
    model = build()
    plan = Plan.for_model(model, **L4_PLANS[name])
    if plan.prune_vision_after is not None and plan.prune_vision_rank in ("attention", "dart"):
        with pytest.raises(SkipitError, match="pruning vision tokens by attention is not supported for Llama4Text"):
            apply_plan(model, plan)
        return
    changed = ts.check_against_reference("llama4", plan, make_inputs("llama4", 4), steps=STEPS)
    assert changed > 1e-2 or plan.is_empty, "the plan should change the outputs, or the test proves nothing"


def _native(family: str, monkeypatch, skip: list[int] | None = None, plain_chunks: bool = False) -> float:
    """Max |logit| difference between a plan skipping layer j and the untouched model with layer j an identity
    (prefill and STEPS decoding steps); `plain_chunks`: the plan's masks without the chunks."""
    model, inputs = build(family), make_inputs(family, 4)
    j = _native_layer(model)
    def drop_chunks():
        for layer in get_adapter(model).layers if plain_chunks else ():
            layer.chunk = None

    with monkeypatch.context() as patch, torch.no_grad():
        planned, native = ts.skip_and_identity(model, inputs, j, patch, STEPS, after_apply=drop_chunks)
    if not plain_chunks:
        assert torch.equal(planned.sequences, native.sequences)
    return float((torch.stack(planned.logits) - torch.stack(native.logits)).abs().max())


@pytest.mark.parametrize("family", ["llama4", "llama4_floor", "llama4_text"])
def test_skipping_a_layer_equals_an_identity_layer(family, monkeypatch):
    """Native check: the model's own chunked masks (left padding included), freqs_cis and NoPE query scales (in
    "llama4_floor" they differ from 1; the NoPE layers run on every token); also the text model alone
    (Llama4ForCausalLM). Without the chunks the plan's logits are far off, so the check sees a dropped mask."""
    assert _native(family, monkeypatch) < 1e-5
    assert _native(family, monkeypatch, plain_chunks=True) > 1e-1


@pytest.mark.parametrize("mask", [True, False])
def test_nope_layers_on_token_subsets_are_refused_from_floor_scale(mask):
    """A NoPE layer scales its queries by a position counted in its own cache slots, which a layer running on a token
    subset does not keep; the scale is 1 below floor_scale - 1 only. With floor_scale 8, the prompts (9-16 tokens) are
    refused, in one line, under a plan whose NoPE layer 2 sees text only (late entry 'absent' up to layer 2); a plan
    whose NoPE layers see every token runs (the native check above)."""
    model, inputs = build("llama4_floor"), make_inputs("llama4_floor", 2 if mask else 1)
    if not mask:
        del inputs["attention_mask"]
    apply_plan(model, Plan.for_model(model, late_entry=3))
    try:
        with pytest.raises(SkipitError, match=r"NoPE layers \[2\] run on token subsets") as info, torch.no_grad():
            model(**inputs)
    finally:
        remove_plan(model)
    assert "\n" not in str(info.value)
    model = build("llama4")  # floor_scale 8192: the same call runs
    apply_plan(model, Plan.for_model(model, late_entry=3))
    try:
        with torch.no_grad():
            model(**make_inputs("llama4", 2 if mask else 1))
    finally:
        remove_plan(model)
