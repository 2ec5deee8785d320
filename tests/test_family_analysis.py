"""`skipit analyze` on every family skip plans serve: the Calibrator gives finite per-layer numbers for both
modalities (hidden-state measures, logit lens, ablation KL) and VAR, on the tiny random configs of the family tests."""

from __future__ import annotations

import math

import pytest
import test_llama4
import test_paligemma
import test_qwen3_5
import test_skipping as ts
from test_qwen3_5 import qwen3_5_machinery  # noqa: F401 (autouse: test_skipping's inputs, taught Qwen3.5's VLMs)

from skipit.capture import Calibrator
from skipit.stats import MeasureConfig, StatsConfig

CONFIG = StatsConfig(n_bootstrap=8, sketch_size=32)
VLMS = [*ts.GENERIC_VLMS, "qwen3_vl", "qwen3_vl_moe", "gemma3", "mistral3_sliding", "aya_vision_sliding"]
BUILDERS = {**{f: (ts.build, ts.make_inputs) for f in VLMS},
            **{f: (test_paligemma.build, test_paligemma.make_inputs) for f in test_paligemma.FAMILIES},
            "llama4": (test_llama4.build, test_llama4.make_inputs)}  # fmt: skip
TEXT_ONLY = ["gemma2", "llama4_text"]


def _finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_vlm_family_gives_finite_measures_for_both_modalities_and_var(family):
    build, make_inputs = BUILDERS[family]
    model, inputs = build(family), make_inputs(family, 2)
    with Calibrator(model, CONFIG, ablation=True, attention=True) as cal:
        cal.update(inputs, ["a", "b"])
    L = cal.adapter.num_layers
    hidden = cal.layer_stats.finalize(MeasureConfig(informational=False))["modalities"]
    for modality in ("vision", "text"):
        assert hidden[modality]["n_tokens"][0] > 0, modality
        rho = hidden[modality]["geometric"]["rho"]["mean"]
        assert len(rho) == L and _finite(rho) and _finite(hidden[modality]["cka"]["value"]), modality
    functional = cal.functional_stats.finalize()
    assert _finite(functional["logit_lens"]["kl"]["mean"])
    for modality in ("vision", "text"):
        assert _finite(functional["ablation"][modality]["kl"]["mean"]), modality
    var = cal.attention_stats.finalize()["var"]["mean"]
    assert len(var) == L and all(0 < v < 1 for v in var)


@pytest.mark.parametrize("family", TEXT_ONLY)
def test_text_families_give_finite_text_measures(family):
    build, make_inputs = (test_llama4.build, test_llama4.make_inputs) if family == "llama4_text" else (
        ts.build, ts.make_inputs)  # fmt: skip
    model, inputs = build(family), make_inputs(family, 2)
    with Calibrator(model, CONFIG, ablation=True, attention=False) as cal:
        cal.update(inputs, ["a", "b"])
    hidden = cal.layer_stats.finalize(MeasureConfig(informational=False))["modalities"]
    assert hidden["text"]["n_tokens"][0] > 0 and _finite(hidden["text"]["geometric"]["rho"]["mean"])
    functional = cal.functional_stats.finalize()
    assert _finite(functional["logit_lens"]["kl"]["mean"]) and _finite(functional["ablation"]["text"]["kl"]["mean"])


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_linear_attention_vlms_give_finite_measures_for_both_modalities(family):
    # VAR needs attention weights, which linear-attention layers do not have: the Calibrator refuses it there
    model, inputs = test_qwen3_5.build(family), ts.make_inputs(family, 2)
    with Calibrator(model, CONFIG, ablation=True, attention=False) as cal:
        cal.update(inputs, ["a", "b"])
    hidden = cal.layer_stats.finalize(MeasureConfig(informational=False))["modalities"]
    functional = cal.functional_stats.finalize()
    for modality in ("vision", "text"):
        assert hidden[modality]["n_tokens"][0] > 0 and _finite(hidden[modality]["geometric"]["rho"]["mean"])
        assert _finite(functional["ablation"][modality]["kl"]["mean"]), modality
