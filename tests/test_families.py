"""Families beyond test_skipping's, on tiny random configs, with the same machinery (test_skipping's slow reference
re-implementation of every plan mode, prefill and decoding, batch 4 with left padding and rows with different numbers
of vision tokens), plus the native check: a plan that skips layer j equals the untouched model whose layer j returns
its input (the model's own masks, positions and injections). And the refusals: what skipit cannot run exactly
fails at once with one line saying why.
"""

from __future__ import annotations

import pytest
import test_skipping as ts
import torch
from test_skipping import GENERIC_VLMS, IMAGE, PLANS, TEXT, build, make_inputs, one_thread  # noqa: F401
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from skipit import compat
from skipit.adapters import FAMILIES, get_adapter
from skipit.adapters.base import Adapter, layer_types
from skipit.capture import Calibrator, hooks
from skipit.errors import SkipitError
from skipit.measures.functional import kl_from_logits
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan
from skipit.stats import StatsConfig

DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")
NEW_FAMILIES = [*GENERIC_VLMS, *DEEPSTACK]
# VLMs whose text layers have sliding windows (ts.WINDOW tokens, so that the window cuts in prefill and decoding):
# Mistral3 with a window on every layer, Aya Vision as released (Cohere2: 3 sliding layers, then a full one)
SLIDING_VLMS = ["mistral3_sliding", "aya_vision_sliding"]
# Gemma 3: each image's tokens attend to each other both ways (token_type_ids), in sliding (window 3) and full layers;
# rows with one image or two (two blocks)
BLOCKS = ["gemma3"]
NAMES = {"llava_onevision": "LLaVA-OneVision", "smolvlm": "SmolVLM", "internvl": "InternVL", "mistral3": "Mistral3",
         "aya_vision": "Aya Vision", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL"}  # fmt: skip
STEPS = 8
CONFIG = StatsConfig(n_bootstrap=16, sketch_size=64)


def _deepstack(model, inputs: dict):
    """The DeepStack features the untouched model adds after layers 0, 1, ... ([n_vision, D] each, row-major over
    the batch's vision tokens) for `inputs`."""
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["embeds"] = kwargs.get("deepstack_visual_embeds")
        raise ts._Stop

    handle = get_adapter(model).backbone.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except ts._Stop:
        pass
    finally:
        handle.remove()
    return grabbed["embeds"]


def deepstack_reference_run(model, plan, family, full: dict, width: int, steps: int):
    """test_skipping.reference_run with the DeepStack injection: after layer j the row's vision tokens gain feature
    j, whatever the plan made layer j do with them."""
    x0, pe = ts.layer_inputs(model, ts.with_positions(family, full))
    embeds = _deepstack(model, full)
    pe = tuple(t.expand(x0.shape[0], *t.shape[1:]) for t in pe)
    vision = full["input_ids"] == IMAGE
    starts = torch.cat([torch.zeros(1, dtype=torch.long), vision.sum(1).cumsum(0)])
    prompts, decoded = [], torch.zeros(steps, x0.shape[0], ts.VOCAB)
    for b in range(x0.shape[0]):
        kept, inject = None, [e[starts[b] : starts[b + 1]] for e in embeds]
        for s in range(steps):
            keep = full["attention_mask"][b, : width + s].bool()
            pe_b = tuple(t[b, : width + s][keep] for t in pe)
            logits, kept = ts.reference_logits(
                model, plan, x0[b, : width + s][keep], pe_b, vision[b, : width + s][keep], kept, inject
            )  # fmt: skip
            prompts += [logits] if s == 0 else []
            decoded[s, b] = logits[-1]
    return prompts, decoded


def check(family: str, plan: Plan, monkeypatch, steps: int = STEPS):
    if family in DEEPSTACK:
        monkeypatch.setattr(ts, "reference_run", deepstack_reference_run)
    return ts.check_against_reference(family, plan, make_inputs(family, 4), steps=steps)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_generic_adapter_finds_the_layout(family):
    model, inputs = build(family), make_inputs(family, 4)
    adapter = get_adapter(model)
    assert adapter.family == NAMES[family] and adapter.num_layers == TEXT["num_hidden_layers"]
    assert adapter.lm_head is model.lm_head and adapter.layers is adapter.backbone.layers
    assert IMAGE in adapter.vision_token_ids() and "pixel_values" in adapter.pixel_inputs
    vision = adapter.vision_mask(inputs["input_ids"], inputs)
    assert torch.equal(vision, inputs["input_ids"] == IMAGE)
    assert (vision.sum(1).unique().numel() > 1) or family == "llava_onevision" or family == "mistral3"
    assert adapter.vision_mask(inputs["input_ids"], {}) is None  # no pixels in the call: every token is text


def test_one_registry_for_loading_and_adapters():
    from skipit import models

    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert not hasattr(models, "VLM_FAMILIES") and not hasattr(models, "CAUSAL_LM_TYPES")
    for family in NEW_FAMILIES:
        assert build(family).config.model_type in types


@pytest.mark.parametrize("family", [*NEW_FAMILIES, *SLIDING_VLMS, *BLOCKS])
def test_empty_plan_changes_nothing(family):
    ts.test_empty_plan_changes_nothing(family, 4)


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("family", [*NEW_FAMILIES, *SLIDING_VLMS, *BLOCKS])
def test_plan_matches_reference(family, name, monkeypatch):
    model = build(family)
    plan = Plan.for_model(model, **PLANS[name])
    if family in SLIDING_VLMS:  # the window cuts keys in prefill already
        assert ts.WINDOW in get_adapter(model).windows
        assert make_inputs(family, 4)["attention_mask"].sum(1).min() > ts.WINDOW
    if plan.prune_vision_after is not None and ts.base(family) == "aya_vision":  # Cohere2: no ranking beside it
        with pytest.raises(SkipitError, match="pruning vision tokens by attention is not supported for Cohere2"):
            apply_plan(model, plan)
        return
    assert check(family, plan, monkeypatch) > 1e-2, "the plan should change the outputs, or the test proves nothing"


def _native_layer(model) -> int:
    """A layer to skip in the native check: not layer 0 (transformers reads positions off layer 0's cache, which an
    identity layer 0 leaves empty), nor the first layer of its kind (transformers sizes the mask of each kind, full
    or sliding, from that layer's cache)."""
    kinds = layer_types(get_adapter(model).backbone.config)
    return next(j for j in range(2, len(kinds)) if kinds.index(kinds[j]) != j)


@pytest.mark.parametrize("family", [*NEW_FAMILIES, *SLIDING_VLMS, *BLOCKS, *ts.SLIDING_LMS])
def test_skipping_a_layer_equals_an_identity_layer(family, monkeypatch):
    """Native check: no reference of ours, the model's own masks (sliding windows included), positions (M-RoPE) and
    injections (DeepStack)."""
    model, inputs = build(family), make_inputs(family, 4)
    # Qwen3-VL: a layer whose output receives a DeepStack injection
    j = 1 if family in DEEPSTACK else _native_layer(model)
    with torch.no_grad():
        plain = ts.generate(model, inputs, steps=STEPS)
        planned, native = ts.skip_and_identity(model, inputs, j, monkeypatch, STEPS)
    assert torch.equal(planned.sequences, native.sequences)
    torch.testing.assert_close(torch.stack(planned.logits), torch.stack(native.logits), atol=1e-5, rtol=0)
    assert not torch.allclose(torch.stack(plain.logits), torch.stack(native.logits))


# -- refusals: one line, at apply_plan (or at the call that cannot run exactly), never silently wrong


def _refused(model, match: str):
    model.eval()
    with pytest.raises(SkipitError, match=match) as info:
        apply_plan(model, Plan.for_model(model, skip_layers=[1]))
    assert "\n" not in str(info.value)
    apply_plan(model, Plan.for_model(model))  # an empty plan passes every call through: accepted
    remove_plan(model)


def test_gemma3_without_token_type_ids_is_causal(monkeypatch):
    """Without token_type_ids Gemma 3's mask is causal (and sliding): so is the plan's."""
    inputs = make_inputs("gemma3", 4)
    del inputs["token_type_ids"]
    plan = Plan.for_model(build("gemma3"), **PLANS["combined-frozen"])
    assert ts.check_against_reference("gemma3", plan, inputs, steps=4) > 1e-2


def test_gemma3_blocks_continuing_a_cache_are_refused():
    """The model indexes its blocks by absolute position, which only the first call's token_type_ids cover: a call
    that continues a cache and carries image blocks is refused in one line."""
    model, inputs = build("gemma3"), make_inputs("gemma3", 2)
    width = inputs["input_ids"].shape[1]
    apply_plan(model, Plan.for_model(model, skip_layers=[3]))
    try:
        with torch.no_grad():
            out = model(**ts.with_positions("gemma3", inputs), use_cache=True)
            step = dict(inputs, input_ids=inputs["input_ids"][:, -1:], position_ids=torch.full((2, 1), width),
                        token_type_ids=torch.ones(2, 1, dtype=torch.long), pixel_values=None)  # fmt: skip
            step["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            with pytest.raises(SkipitError, match="only in the call that starts the cache") as info:
                model(**step, **{compat.CACHE_KWARG: compat.output_cache(out)})
    finally:
        remove_plan(model)
    assert "\n" not in str(info.value)


def test_no_family_is_refused_by_the_registry():
    """Every listed family runs skip plans (Qwen3.5's linear-attention layers: tests/test_qwen3_5.py); what one model
    cannot run is refused by its adapter, per plan or call, with its reason."""
    assert [f.name for f in FAMILIES if f.refused] == []


def test_unsupported_layout_is_one_line_naming_what_was_looked_for():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(SkipitError, match=r"GPT2LMHeadModel is not supported: found no decoder layers \(looked for "
                                          r"model.language_model.layers, .*\); supported model classes: .*Llava"):
        get_adapter(gpt2)


def test_output_hidden_states_and_attentions_are_refused_under_a_plan():
    model, inputs = build("llava"), make_inputs("llava", 2)
    apply_plan(model, Plan.for_model(model, skip_layers=[1]))
    try:
        for flag in ("output_hidden_states", "output_attentions"):
            with pytest.raises(SkipitError, match=f"{flag} is not supported under a skip plan"), torch.no_grad():
                model(**inputs, **{flag: True})
    finally:
        remove_plan(model)
    apply_plan(model, Plan.for_model(model))  # an empty plan returns them in full
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        remove_plan(model)
    assert len(out.hidden_states) == 7 and out.hidden_states[0].shape[1] == inputs["input_ids"].shape[1]


def test_assisted_decoding_is_refused_under_a_plan():
    model, inputs = build("llama"), make_inputs("llama", 1)
    draft = build("qwen2")
    apply_plan(model, Plan.for_model(model, skip_layers=[1]))
    try:
        with pytest.raises(SkipitError, match="assistant_model"), torch.no_grad():
            model.generate(**inputs, assistant_model=draft, max_new_tokens=6, do_sample=False)
    finally:
        remove_plan(model)


def test_static_cache_is_refused_under_a_plan():
    model, inputs = build("llama"), make_inputs("llama", 2)
    apply_plan(model, Plan.for_model(model, skip_layers=[1]))
    try:
        with pytest.raises(SkipitError, match="DynamicCache"), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, cache_implementation="static")
    finally:
        remove_plan(model)
    assert compat.CACHE_KWARG in ("cache", "past_key_values")


def tiny_qwen3_5():
    """Qwen3.5's text model: linear-attention (Gated DeltaNet) and full-attention layers alternating."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_5_text", **TEXT, head_dim=8, layer_types=["linear_attention", "full_attention"] * 3,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def test_hybrid_linear_attention_refusals():
    """Qwen3.5 runs skip plans (tests/test_qwen3_5.py); attention statistics and attention-ranked pruning need
    softmax attention, which its linear-attention layers do not have: refused in one line."""
    model = tiny_qwen3_5()
    # the generic adapter (an unlisted hybrid model) refuses linear-attention layers it does not know
    assert Adapter(model).plan_refusal() == ("it has hybrid linear-attention layers (a recurrent state, not per-token "
                                             "keys; served for Qwen3.5's Gated DeltaNet only): layers [0, 2, 4]")
    with pytest.raises(SkipitError, match=r"not supported after linear-attention layer 2 of Qwen3_5ForCausalLM"):
        apply_plan(model, Plan.for_model(model, prune_vision_after=2, prune_vision_keep=0.5))
    with pytest.raises(SkipitError, match=r"layers \[0, 2, 4\] of Qwen3_5ForCausalLM have none .* attention=False"):
        Calibrator(model, attention=True)
    with Calibrator(model, CONFIG, attention=False) as cal:  # hidden states and the logit lens need no attention
        cal.update({"input_ids": torch.randint(3, 80, (2, 7))}, ["a", "b"])
    assert cal.functional_stats.lens_n[0] == 2


# -- Qwen3-VL's DeepStack in measurement: X_{j+1} is what layer j+1 reads, injection included


def test_hooks_read_deepstack_states_after_the_injection():
    model, inputs = build("qwen3_vl"), make_inputs("qwen3_vl", 3)
    layers = get_adapter(model).layers
    read, outputs, got = {}, {}, {}
    def reads(j):
        def hook(module, args, kwargs):
            read[j] = args[0] if args else kwargs["hidden_states"]
        return hook

    def output(module, args, out):
        outputs[0] = out

    handles = [layer.register_forward_pre_hook(reads(j), with_kwargs=True) for j, layer in enumerate(layers)]
    handles += [layers[0].register_forward_hook(output)]
    try:
        with torch.no_grad(), hooks(model, lambda i, x: got.setdefault(i, x.clone())):
            model(**inputs, use_cache=False)
        embeds = _deepstack(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for i in range(1, len(layers)):
        assert torch.equal(got[i], read[i]), f"X_{i}"
    vision = inputs["input_ids"] == IMAGE
    torch.testing.assert_close(got[1][vision], outputs[0][vision] + embeds[0])  # what layer 0's output lacks
    assert torch.equal(got[1][~vision], outputs[0][~vision])


def test_ablation_on_deepstack_keeps_the_injections(monkeypatch):
    """Qwen3-VL adds features into vision tokens after layers 0 and 1, so rerunning layers j..L-1 from X_j would drop
    them: the ablation takes one full forward per layer instead. Reference: a copy whose layer j returns its input at
    vision positions (the injection after it still lands). The update norm is the layer's own, not the injection."""
    model, inputs = build("qwen3_vl"), make_inputs("qwen3_vl", 3)
    from skipit import capture

    replays = []
    real = capture._LayerCalls.replays
    monkeypatch.setattr(capture._LayerCalls, "replays", lambda self, h: replays.append(real(self, h)) or replays[-1])
    updates = []
    real_update = capture.FunctionalStats.update_ablation
    monkeypatch.setattr(capture.FunctionalStats, "update_ablation",
                        lambda self, ids, j, m, kl, tv, norm, present: updates.append((j, m, norm)) or
                        real_update(self, ids, j, m, kl, tv, norm, present))  # fmt: skip
    with Calibrator(model, CONFIG, ablation=True) as cal:
        cal.update(inputs, ["a", "b", "c"])
    assert replays == [False]  # the chain is broken by the injection: no rerun from X_j
    got = cal.functional_stats.finalize()["ablation"]["vision"]["kl"]["mean"]
    vision = inputs["input_ids"] == IMAGE
    layers = get_adapter(model).layers
    seen = {}
    for j in (0, 1, 2):  # after 0 and 1 something is injected, after 2 nothing
        original = layers[j].forward

        def forward(hidden_states, *args, _original=original, _j=j, **kwargs):
            out = _original(hidden_states, *args, **kwargs)
            seen[_j] = (hidden_states, out)
            return torch.where(vision[..., None], hidden_states, out)

        with torch.no_grad():
            full = model(**inputs).logits[:, -1]
            layers[j].forward = forward
            try:
                ablated = model(**inputs).logits[:, -1]
            finally:
                del layers[j].forward
        assert got[j] == pytest.approx(float(kl_from_logits(full, ablated).mean()), rel=1e-5), j
        x, y = seen[j]
        own = ((y - x).double() * vision[..., None]).pow(2).sum((1, 2)).sqrt()
        norm = next(n for (i, m, n) in updates if i == j and m == "vision")
        torch.testing.assert_close(norm.cpu(), own.cpu(), rtol=1e-5, atol=1e-6)  # without the injection
    assert all(0 < v < 1 for v in cal.attention_stats.finalize()["var"]["mean"])


def test_rotary_that_is_not_a_cos_sin_pair_is_refused():
    """A model whose adapter slices a real (cos, sin) pair (all but Llama 4's, whose freqs_cis its adapter slices) and
    whose layers receive anything else is refused at its first call instead of being sliced wrongly."""
    model, inputs = build("llama"), make_inputs("llama", 2)

    def freqs_cis(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": torch.polar(torch.ones_like(cos), cos)}

    apply_plan(model, Plan.for_model(model, skip_layers=[3]))
    hook = get_adapter(model).layers[1].register_forward_pre_hook(freqs_cis, with_kwargs=True)
    try:
        with pytest.raises(SkipitError, match=r"LlamaDecoderLayer to receive its rotary positions as a real "
                                              r"\(cos, sin\) pair"), torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
        remove_plan(model)
