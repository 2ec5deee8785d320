"""Hooks and the Calibrator on tiny random models of every supported family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_skipping import FAMILIES, IMAGE, VLMS, build, make_inputs

from skipit.adapters import get_adapter
from skipit.capture import Calibrator, hooks
from skipit.errors import SkipitError
from skipit.measures.functional import kl_from_logits
from skipit.stats import MeasureConfig, StatsConfig

torch.set_num_threads(1)
CONFIG = StatsConfig(n_bootstrap=16, sketch_size=64)


def ids(n: int) -> list[str]:
    return [f"ex{i}" for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_hidden_states_equal_output_hidden_states(family):
    model, inputs = build(family), make_inputs(family, 3)
    adapter = get_adapter(model)
    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with torch.no_grad():
        model(**inputs, output_hidden_states=True)  # transformers installs its own capture hooks on first use
    before, got = n_hooks(), {}
    with torch.no_grad(), hooks(model, lambda i, x: got.setdefault(i, x.clone())) as handles:
        reference = model(**inputs, output_hidden_states=True).hidden_states
    assert sorted(got) == list(range(adapter.num_layers + 1)) and len(reference) == adapter.num_layers + 1
    assert {"layers.0.resid_pre", f"layers.{adapter.num_layers - 1}.resid_post"} <= set(handles)
    for i in range(adapter.num_layers):
        assert torch.equal(got[i], reference[i]), f"X_{i}"
    # transformers returns the final-normed stream as its last hidden state; the hooks keep the raw X_L
    assert not torch.allclose(got[adapter.num_layers], reference[-1])
    assert torch.equal(adapter.final_norm(got[adapter.num_layers]), reference[-1])
    assert n_hooks() == before


def direct_var(attentions, inputs) -> torch.Tensor:
    """VAR per layer from output_attentions, written out query by query."""
    vision = inputs["input_ids"] == IMAGE
    valid = inputs["attention_mask"].bool()
    per_layer = []
    for weights in attentions:
        masses = []
        for b in range(weights.shape[0]):
            for q in range(weights.shape[2]):
                seen = vision[b, : q + 1] & valid[b, : q + 1]
                if valid[b, q] and not vision[b, q] and seen.any():
                    masses.append(weights[b, :, q, : q + 1][:, seen].sum(-1).mean())
        per_layer.append(torch.stack(masses).mean())
    return torch.stack(per_layer)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_var_equals_direct_computation_from_eager_weights(family):
    model, inputs = build(family), make_inputs(family, 3)
    adapter = get_adapter(model)
    assert adapter.attn_implementation == "sdpa"
    with Calibrator(model, CONFIG) as cal:
        assert adapter.attn_implementation == "eager"
        cal.update(inputs, ids(3))
    assert adapter.attn_implementation == "sdpa"  # restored: inference keeps SDPA
    var = cal.attention_stats.finalize()["var"]["mean"]
    eager = build(family + "_eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    expected = direct_var(attentions, inputs)
    assert expected.std() > 1e-3  # layers differ, so a per-layer mix-up would show
    torch.testing.assert_close(torch.tensor(var, dtype=torch.float64), expected.double(), atol=1e-6, rtol=0)


def row(inputs: dict, b: int) -> dict:
    """Row b of a left-padded LLaVA batch, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b : b + 1, keep], "pixel_values": inputs["pixel_values"][b : b + 1],
            "attention_mask": inputs["attention_mask"][b : b + 1, keep]}  # fmt: skip


def test_streaming_equals_one_batch():
    model, inputs = build("llava"), make_inputs("llava", 4)
    with Calibrator(model, CONFIG, ablation=True) as one:
        one.update(inputs, ids(4))
    with Calibrator(model, CONFIG, ablation=True) as streamed:
        for b, name in enumerate(ids(4)):
            streamed.update(row(inputs, b), [name])
    for attr in ("sums", "counts", "hist"):
        torch.testing.assert_close(getattr(streamed.layer_stats, attr), getattr(one.layer_stats, attr), atol=1e-6,
                                   rtol=1e-6)
    for attr in ("mass", "share", "n"):
        torch.testing.assert_close(getattr(streamed.attention_stats, attr), getattr(one.attention_stats, attr),
                                   atol=1e-5, rtol=1e-5)  # float32 attention: padding changes the last bits
    for attr in ("lens", "lens_n", "abl", "abl_n", "slope_max"):
        torch.testing.assert_close(getattr(streamed.functional_stats, attr), getattr(one.functional_stats, attr),
                                   atol=1e-6, rtol=1e-5)
    assert one.functional_stats.lens_n[0] == 4 and one.layer_stats.counts[0, 0, 0] == 4 * 9  # 9 vision tokens each


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_every_measure(family):
    model, inputs = build(family), make_inputs(family, 3)
    with Calibrator(model, CONFIG, ablation=True, attention=family in VLMS) as cal:
        cal.update(inputs, ids(3))
    valid = inputs["attention_mask"].bool()
    n_vision = int(((inputs["input_ids"] == IMAGE) & valid).sum()) if family in VLMS else 0
    hidden = cal.layer_stats.finalize(MeasureConfig(informational=False))["modalities"]  # k-means: test_analyze
    assert hidden["vision"]["n_tokens"][0] == n_vision and hidden["text"]["n_tokens"][0] == valid.sum() - n_vision
    functional = cal.functional_stats.finalize()
    lens, ablation = functional["logit_lens"]["kl"]["mean"], functional["ablation"]
    assert all(v > 0 for v in lens)
    # Without layer L-1's update, the answer token is read from X_{L-1}: text ablation there is the logit lens.
    assert ablation["text"]["kl"]["mean"][-1] == pytest.approx(lens[-1], rel=1e-5)
    assert all(ablation["text"]["lipschitz"]["max"]["holds"])  # K = the largest slope bounds the mean in-sample
    if family in VLMS:
        var = cal.attention_stats.finalize()["var"]["mean"]
        assert all(0 < v < 1 for v in var)
        assert all(v > 0 for v in ablation["vision"]["kl"]["mean"][:-1])
        # vision tokens' last update reaches no output: the answer's distribution is bitwise the same
        assert ablation["vision"]["kl"]["mean"][-1] == 0.0
    else:
        assert cal.attention_stats is None and ablation["vision"]["n_examples"] == [0] * cal.adapter.num_layers


def test_logit_lens_equals_direct_computation_from_output_hidden_states():
    model, inputs = build("qwen2_vl"), make_inputs("qwen2_vl", 3)
    adapter = get_adapter(model)
    with Calibrator(model, CONFIG, attention=False) as cal:
        cal.update(inputs, ids(3))
    got = cal.functional_stats.finalize()["logit_lens"]["kl"]["mean"]
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        # left padding: every row's answer is the last column; transformers' last hidden state is already normed
        lens = [adapter.lm_head(adapter.final_norm(h[:, -1])) for h in out.hidden_states[:-1]] + [out.logits[:, -1]]
    expected = [float(kl_from_logits(lens[j + 1], lens[j]).mean()) for j in range(adapter.num_layers)]
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("family", ["llava", "aya_vision", "cohere2", "gemma2"])
def test_logit_lens_reads_with_the_models_whole_head(family):
    """At the last layer's output (before the final norm) the lens gives the model's own logits: Cohere's logit scale
    and Gemma 2's soft-cap included."""
    model, inputs = build(family), make_inputs(family, 3)
    with Calibrator(model, CONFIG, attention=False) as cal:
        cal.update(inputs, ids(3))
    last = []
    hook = cal.adapter.layers[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple)
                                                                                     else out))  # fmt: skip
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    hook.remove()
    torch.testing.assert_close(cal._lens_logits(last[0][:, -1]), logits, atol=1e-4, rtol=0)


def test_ablation_kl_matches_a_model_without_that_update():
    """Layer 2's update dropped for vision tokens == a copy whose layer 2 returns its input at vision positions."""
    model, inputs = build("llava"), make_inputs("llava", 2)
    with Calibrator(model, CONFIG, ablation=True, attention=False) as cal:
        cal.update(inputs, ids(2))
    got = cal.functional_stats.finalize()["ablation"]["vision"]["kl"]["mean"][2]
    vision = inputs["input_ids"] == IMAGE
    layer = get_adapter(model).layers[2]
    original = layer.forward

    def forward(hidden_states, *args, **kwargs):
        return torch.where(vision[..., None], hidden_states, original(hidden_states, *args, **kwargs))

    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        layer.forward = forward
        try:
            ablated = model(**inputs).logits[:, -1]
        finally:
            del layer.forward
    assert got == pytest.approx(float(kl_from_logits(full, ablated).mean()), rel=1e-6)


def _ablation(model, inputs, n, monkeypatch=None, rerun=True):
    """Every layer's and modality's ablation KL and TV (finalized means), counting decoder-layer calls."""
    from skipit import capture

    if not rerun:
        monkeypatch.setattr(capture._LayerCalls, "replays", lambda self, hidden: False)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in get_adapter(model).layers]
    try:
        with Calibrator(model, CONFIG, ablation=True, attention=False, logit_lens=False) as cal:
            cal.update(inputs, ids(n))
    finally:
        for h in handles:
            h.remove()
    out = cal.functional_stats.finalize()["ablation"]
    return {m: (out[m]["kl"]["mean"], out[m]["tv"]["mean"]) for m in out}, len(calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_reruns_only_later_layers_and_equals_full_forwards(family, monkeypatch):
    """The rerun from the captured X_j (about L/2 layers per ablation) gives what a full forward per ablation gives,
    for every layer and modality, on every family."""
    model, inputs = build(family), make_inputs(family, 3)
    L = get_adapter(model).num_layers
    fast, fast_calls = _ablation(model, inputs, 3)
    slow, slow_calls = _ablation(model, inputs, 3, monkeypatch, rerun=False)
    n_mod = 2 if family in VLMS else 1  # a text-only model has no vision tokens to ablate
    assert slow_calls == L + n_mod * L * L  # the reference, then one full forward per layer and modality
    assert fast_calls == L + n_mod * L * (L + 1) // 2  # layers j..L-1 per ablation of layer j
    for m in slow:
        for got, want in zip(fast[m], slow[m], strict=True):
            np.testing.assert_allclose(np.array(got, float), np.array(want, float), rtol=1e-4, atol=1e-7)


def test_ablation_falls_back_to_full_forwards_when_something_is_injected_between_layers():
    """An injection between layers (like Qwen3-VL's deepstack) breaks "layer j's input is layer j-1's output": the
    ablation must then rerun the whole model, injection included."""
    model, inputs = build("llava"), make_inputs("llava", 2)
    layers = get_adapter(model).layers

    def inject(module, args, kwargs):  # added to layer 2's input, after layer 1's output was recorded
        if args:
            return (args[0] + 0.5, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + 0.5}

    bump = layers[2].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        got, calls = _ablation(model, inputs, 2)
    finally:
        bump.remove()
    assert calls == len(layers) * (1 + 2 * len(layers))  # every ablation was a full forward
    assert all(np.isfinite(kl).all() for kl, _ in got.values())


def test_non_finite_hidden_state_names_layer_and_example():
    model, inputs = build("llava"), make_inputs("llava", 3)
    layer = get_adapter(model).layers[2]

    def poison(module, args, output):
        output = output.clone()
        output[1, -2, 0] = float("nan")
        return output

    handle = layer.register_forward_hook(poison)
    try:
        with pytest.raises(SkipitError, match=r"X_3 \(the output of decoder layer 2\) has NaN or inf values for "
                                              r"example 'ex1'"), Calibrator(model, CONFIG) as cal:
            cal.update(inputs, ids(3))
    finally:
        handle.remove()
    assert get_adapter(model).attn_implementation == "sdpa"
