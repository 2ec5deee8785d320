"""The one module that knows how transformers releases differ."""

import warnings

import pytest
import torch
from packaging.version import Version

from skipit import compat


def test_cache_is_passed_on_under_the_name_it_came_with():
    cache = object()
    assert compat.cache_kwarg({"cache": cache}) == "cache"
    assert compat.cache_kwarg({"past_key_values": cache}) == "past_key_values"
    assert compat.cache_kwarg({}) == compat.CACHE_KWARG
    assert compat.get_cache({"past_key_values": cache}) is compat.get_cache({"cache": cache}) is cache
    assert compat.get_cache({"cache": None, "past_key_values": None}) is None


def test_cache_kwarg_is_the_installed_decoder_layers_own():
    expected = "cache" if Version("5.24") <= compat.TRANSFORMERS_VERSION else "past_key_values"
    assert expected == compat.CACHE_KWARG


def test_output_cache_reads_a_real_output():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated name is touched
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        cache = compat.output_cache(out)
        assert cache.get_seq_length() == 3
        out = model(input_ids=torch.tensor([[4]]), use_cache=True, **{compat.CACHE_KWARG: cache})
    assert compat.output_cache(out).get_seq_length() == 4


@pytest.mark.parametrize(("version", "warns"), [("5.22.2", True), ("5.23.0", False), ("5.24.3", False),
                                                 ("5.25.1", False), ("5.26.0", True), ("6.0.0", True)])  # fmt: skip
def test_versions_outside_the_tested_range_warn_once(monkeypatch, version, warns):
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version(version))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.check_version()
    assert len(caught) == int(warns)
    if warns:
        assert "tested with transformers 5.23.0-5.25.x" in str(caught[0].message)


@pytest.mark.parametrize("family", ["aya_vision", "cohere2", "llama"])
def test_logit_scale_is_the_factor_the_models_forward_applies(family):
    """The model's logits over the LM head's on its (already normed) last hidden state: Aya Vision's is 1 before
    transformers 5.25 and its text config's logit_scale from 5.25 on."""
    import test_skipping as ts

    from skipit.adapters import get_adapter

    model, inputs = ts.build(family), ts.make_inputs(family, 1)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        head = get_adapter(model).lm_head(out.hidden_states[-1])
    scale = compat.logit_scale(model)
    torch.testing.assert_close(out.logits, head * (1.0 if scale is None else scale), atol=1e-5, rtol=0)
    scales = {"aya_vision": Version("5.25") <= compat.TRANSFORMERS_VERSION, "cohere2": True, "llama": False}
    assert (scale is not None) == scales[family]
