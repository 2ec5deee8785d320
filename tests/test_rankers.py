"""Pruning rankings beyond FastV's attention (`prune_vision_rank`): DART (after layer p) and DivPrune (before the
language model, p = -1).

The engine against test_skipping's slow reference (prefill and decoding, batch 4 with left padding and rows with
different numbers of vision tokens, Qwen3-VL with its DeepStack injection), and the rankers on synthetic tensors whose
answer is known.
"""

from __future__ import annotations

import math

import pytest
import test_families as tf
import test_skipping as ts
import torch
from test_skipping import FAMILIES, IMAGE, build, make_inputs, one_thread  # noqa: F401

from skipit import compat
from skipit.errors import SkipitError
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan
from skipit.skipping.rankers import dart_keep, divprune_keep

RANKED = {
    "dart": dict(prune_vision_after=1, prune_vision_keep=0.5, prune_vision_rank="dart"),  # DART's K = 2
    # the layer after the pruning layer (3) is skipped: it still ranks, on its input X_3
    "dart-combined": dict(late_entry=1, prune_vision_after=2, prune_vision_keep=0.4, prune_vision_rank="dart",
                          early_exit=4, skip_layers=[3]),  # fmt: skip
    "divprune": dict(prune_vision_after=-1, prune_vision_keep=0.4, prune_vision_rank="divprune"),
    # layer 0 is skipped: the choice is still made on X_0, and no dropped token enters layer 1
    "divprune-combined": dict(prune_vision_after=-1, prune_vision_keep=0.6, prune_vision_rank="divprune",
                              early_exit=3, skip_layers=[0, 4]),  # fmt: skip
    # two stages: DivPrune lets 70 % in, FastV's ranking keeps 30 % (of all) after layer 1
    "two-stage": dict(input_vision_keep=0.7, prune_vision_after=1, prune_vision_keep=0.3),
    # ... with DART after layer 2, layer 0 skipped (the input stage still chooses on X_0) and layer 1 frozen
    "two-stage-dart": dict(input_vision_keep=0.8, prune_vision_after=2, prune_vision_keep=0.4, prune_vision_rank="dart",
                           frozen_vision_layers=[1], early_exit=4, skip_layers=[0]),  # fmt: skip
}


@pytest.mark.parametrize("name", list(RANKED))
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "idefics3"])
def test_ranked_pruning_matches_reference(family, name):
    plan = Plan.for_model(build(family), **RANKED[name])
    assert ts.check_against_reference(family, plan, make_inputs(family, 4), steps=6) > 1e-2


@pytest.mark.parametrize("name", ["dart", "divprune-combined", "two-stage-dart"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", *tf.NEW_FAMILIES, *tf.SLIDING_VLMS, *tf.BLOCKS])
def test_ranked_pruning_matches_reference_on_more_families(family, name, monkeypatch):
    model = build(family)
    plan = Plan.for_model(model, **RANKED[name])
    if "dart" in name and ts.base(family) == "aya_vision":  # DART reads keys computed beside the layer: not for Cohere2
        with pytest.raises(SkipitError, match="not supported for Cohere2"):
            apply_plan(model, plan)
        return
    assert tf.check(family, plan, monkeypatch, steps=4) > 1e-2


def test_rankers_need_no_attention_weights():
    """DART and DivPrune read states and keys, never attention weights: SDPA layers stay SDPA."""
    model, inputs = build("llava"), make_inputs("llava", 2)
    assert model.config.text_config._attn_implementation == "sdpa"
    for name in ("dart", "divprune"):
        apply_plan(model, Plan.for_model(model, **RANKED[name]))
        try:
            with torch.no_grad():
                model(**ts.with_positions("llava", inputs))
        finally:
            remove_plan(model)


@pytest.mark.parametrize(("name", "pruned_from"), [("dart", 2), ("divprune", 0)])
def test_pruning_shortens_the_cache_of_the_right_layers(name, pruned_from):
    model, inputs = build("llava"), make_inputs("llava", 2)  # 9 vision tokens per row
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, **RANKED[name]))
        try:
            cache = compat.output_cache(ts.generate(model, inputs, steps=5))
        finally:
            remove_plan(model)
    kept = math.ceil(9 * RANKED[name]["prune_vision_keep"])
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [width + 4] * pruned_from + [width - 9 + kept + 4] * (6 - pruned_from)


def test_two_stages_shorten_every_cache():
    """Vision tokens the input stage leaves out are in no layer's cache; those pruning drops after layer 1 leave
    the later layers' caches."""
    model, inputs = build("llava"), make_inputs("llava", 2)  # 9 vision tokens per row
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        apply_plan(model, Plan.for_model(model, **RANKED["two-stage"]))  # 7 of 9 enter, 3 go on after layer 1
        try:
            cache = compat.output_cache(ts.generate(model, inputs, steps=5))
        finally:
            remove_plan(model)
    assert [layer.keys.shape[2] for layer in cache.layers] == [width - 2 + 4] * 2 + [width - 6 + 4] * 4


# -- the rankers on tensors whose answer is known


def _points(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles (cosine distance grows with the angle between them)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], -1).float()


def test_divprune_is_greedy_farthest_point_on_cosine_distance():
    # angles 0, 10, 20, 90, 180, 185: token 3 (90) is farthest from its nearest neighbour (70 degrees away)
    x = _points(0, 10, 20, 90, 180, 185)[None]
    vision = torch.ones(1, 6, dtype=torch.bool)
    order = []
    for count in range(1, 7):
        kept = divprune_keep(x, vision, count / 6 - 1e-6)[0]
        assert int(kept.sum()) == count
        order += [i for i in torch.nonzero(kept)[:, 0].tolist() if i not in order]
    # 90 first; then 185 (95 degrees from 90); then 0 (90 degrees from the chosen set, 20 only 70); then 20 (20
    # degrees from 0), 10 (10 degrees) and 180 (5 degrees from 185)
    assert order == [3, 5, 0, 2, 1, 4]


def test_divprune_ignores_text_and_keeps_rows_apart():
    x = torch.cat([_points(0, 20, 100, 150, 180, 0), _points(7, 0, 2, 4, 90, 0)])
    x = x.view(2, 6, 2)
    x[0, 5] = x[1, 5] = torch.tensor([-1.0, -1.0])  # a text token, far from everything: never chosen
    vision = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # row 1: 4 vision tokens
    kept = divprune_keep(x, vision, 0.5)
    # row 0, 3 of 5: 100 degrees (50 from its nearest), then 0 (100 from it), then 180 (80 from the chosen set)
    assert kept[0].tolist() == [True, False, True, False, True, False]
    # row 1, 2 of 4 (the token at 7 degrees is text): 90 degrees, then the farthest from it, 0 degrees
    assert kept[1].tolist() == [False, True, False, False, True, False]
    assert not (kept & ~vision).any()


def test_dart_keeps_the_pivots_and_the_non_duplicates():
    # 8 vision tokens: near-duplicates of the pivot (0, 1, 2 degrees), three near its opposite (178, 180, 181 degrees)
    # and two apart (80 and 260); the vision pivot by key norm is token 0. The text token after the image (at 0
    # degrees) is the text pivot.
    states = _points(0, 1, 2, 178, 180, 181, 80, 260, 0)[None]
    vision = torch.tensor([[True] * 8 + [False]])
    valid = torch.ones(1, 9, dtype=torch.bool)
    norms = torch.tensor([[9.0, 1, 1, 1, 1, 1, 1, 1, 5]])
    kept = dart_keep(states, norms, vision, valid, share=3 / 8, image_pivots=1, text_pivots=1)
    # 3 kept: the vision pivot; it takes the least similar to it (180 degrees), then the text pivot the least similar
    # left (181 degrees)
    assert torch.nonzero(kept[0])[:, 0].tolist() == [0, 4, 5]
    # 5 kept: quotas 2 and 2 after the pivot: 180 and 181 for the vision pivot, 178 and 260 for the text pivot; the
    # duplicates of the pivot (1, 2 degrees) are not kept
    kept = dart_keep(states, norms, vision, valid, share=5 / 8, image_pivots=1, text_pivots=1)
    assert torch.nonzero(kept[0])[:, 0].tolist() == [0, 3, 4, 5, 7]


def test_dart_counts_and_pivots_follow_the_row():
    torch.manual_seed(0)
    states = torch.randn(2, 12, 8)
    vision = torch.zeros(2, 12, dtype=torch.bool)
    vision[0, 1:9] = True  # 8 vision tokens, 3 text tokens after them
    vision[1, 3:6] = True  # 3 vision tokens
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    norms = torch.rand(2, 12)
    kept = dart_keep(states, norms, vision, valid, share=0.7)
    assert kept.sum(1).tolist() == [6, 3] and not (kept & ~vision).any()
    top = torch.nonzero(vision[0])[:, 0][norms[0, 1:9].argsort(descending=True)[:4]]
    assert kept[0, top].all()  # the four vision pivots are kept
