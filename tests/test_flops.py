"""The analytical cost model: hand-computed values on a tiny shape, and agreement with the work the engine does."""

from __future__ import annotations

import pytest
import torch
from test_skipping import IMAGE, build, make_inputs, with_positions
from torch.utils.flop_counter import FlopCounterMode

from skipit.flops import Shape, cost, ideal_speedup, prompt_layout
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan

# 3 layers, hidden 4, 2 heads of 2 dims, 1 kv head, MLP 6, vocab 10. Per token and layer: q, o 4x4 each (32),
# k, v 4x2 each (16), MLP 3 x 4 x 6 (72) -> 120 multiply-adds; per (query, key) pair 2 x 2 heads x 2 dims = 8.
TINY = Shape(num_layers=3, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=6, vocab=10)
PROMPT = [False, True, True, False]  # text, vision, vision, text


def test_tiny_shape_by_hand():
    assert (TINY.token_macs, TINY.pair_macs, TINY.kv_width) == (120, 8, 2)
    # untouched: every layer 4 tokens x 120 + 10 causal pairs x 8 = 560 MACs; LM head 4 x 10 for the last token
    base = cost(TINY, None, PROMPT, decode_steps=2)
    assert base.prefill_layers == [1120.0] * 3
    assert base.prefill == 3 * 1120 + 80
    assert base.prefill_scores == 3 * 2 * 10 * 8
    # decode step s: 3 layers x 120 + 3 x (4 + s + 1) keys x 8, + LM head
    assert base.decode == [2 * (360 + 15 * 8) + 80, 2 * (360 + 18 * 8) + 80]
    assert base.kv_tokens == [6, 6, 6] and base.kv_bytes == 2 * 18 * 2 * 2  # keys + values, 2 wide, 2 bytes


def test_plan_roles_by_hand():
    plan = ["frozen", "all", "absent"]  # late entry 1 (frozen), early exit after layer 1
    c = cost(TINY, plan, PROMPT, decode_steps=2, bytes_per_value=4)
    # frozen: 2 text tokens x 120; text queries at positions 0 and 3 see 1 and 4 keys; 2 vision tokens x k, v (16)
    # absent: 2 text tokens x 120 + 3 causal pairs among them
    assert c.prefill_layers == [2 * (240 + 5 * 8 + 32), 1120.0, 2 * (240 + 3 * 8)]
    assert c.prefill == 624 + 1120 + 528 + 80
    # decode: the frozen and the full layer hold 4 keys, the absent one 2, plus s + 1 new ones
    assert c.decode == [2 * (360 + (5 + 5 + 3) * 8) + 80, 2 * (360 + (6 + 6 + 4) * 8) + 80]
    assert c.kv_tokens == [6, 6, 4] and c.kv_bytes == 2 * 16 * 2 * 4
    skipped = cost(TINY, ["all", "skip", "all"], PROMPT, decode_steps=1)
    assert skipped.prefill == 2 * 1120 + 80
    assert skipped.decode == [2 * (240 + 10 * 8) + 80] and skipped.kv_tokens == [5, 0, 5]


def _pruned(**decisions) -> Plan:
    return Plan("X", 3, "0" * 16, prune_vision_keep=0.5, **decisions)


def test_pruning_rankings_by_hand():
    """Choosing the kept tokens is counted with the pruning layer (layer 0 for DivPrune); its similarities are
    token-pair products. Prompt: text, 4 vision, 2 text; half the vision tokens kept: 5 tokens, 15 causal pairs."""
    prompt = [False, True, True, True, True, False, False]
    kept = 2 * (5 * 120 + 15 * 8)  # a pruned layer
    full = 2 * (7 * 120 + 28 * 8)  # a layer that sees every token
    # FastV after layer 0: keys of the 7 tokens (4 x 2 each), the last query (4 x 4), its 7 scores (4 each)
    fastv = cost(TINY, _pruned(prune_vision_after=0), prompt)
    assert fastv.prefill_layers == [full + 2 * (7 * 8 + 16 + 7 * 4), kept, kept]
    # DART after layer 0: keys of the 7 tokens; 2 vision pivots (min(4, kept)) and 2 text pivots (the text after the
    # image) against the 4 vision tokens, 4 multiply-adds each
    dart = cost(TINY, _pruned(prune_vision_after=0, prune_vision_rank="dart"), prompt)
    assert dart.prefill_layers == [full + 2 * (7 * 8 + 4 * 4 * 4), kept, kept]
    assert dart.prefill_scores == 2 * (28 + 2 * 15) * 8 + 2 * 4 * 4 * 4
    # DivPrune before layer 0: the 4 x 4 similarities of the vision tokens, counted with layer 0, which is pruned
    divprune = cost(TINY, _pruned(prune_vision_after=-1, prune_vision_rank="divprune"), prompt)
    assert divprune.prefill_layers == [kept + 2 * 4 * 4 * 4, kept, kept]
    assert divprune.prefill_scores == 3 * 2 * 15 * 8 + 2 * 4 * 4 * 4
    assert divprune.kv_tokens == [5, 5, 5]
    # a skipped layer 0 still chooses
    skipped = cost(TINY, _pruned(prune_vision_after=-1, prune_vision_rank="divprune", skip_layers=[0]), prompt)
    assert skipped.prefill_layers == [2 * 4 * 4 * 4, kept, kept] and skipped.kv_tokens == [0, 5, 5]


def test_two_stages_by_hand():
    """An input stage lets 3 of the 4 vision tokens in (6 tokens, 21 causal pairs): DivPrune's 4 x 4 similarities
    with layer 0; FastV after layer 0 ranks those that entered and keeps 2 (half of all 4): 5 tokens after. FastV's
    keys and scores are computed for all 7 tokens (the ones left out are masked, not removed, there)."""
    prompt = [False, True, True, True, True, False, False]
    plan = _pruned(input_vision_keep=0.75, prune_vision_after=0)
    c = cost(TINY, plan, prompt)
    entered, kept = 2 * (6 * 120 + 21 * 8), 2 * (5 * 120 + 15 * 8)
    assert c.prefill_layers == [entered + 2 * 4 * 4 * 4 + 2 * (7 * 8 + 16 + 7 * 4), kept, kept]
    assert c.kv_tokens == [6, 5, 5]
    # with layer 0 skipped, the input stage still chooses there; FastV after layer 1
    skipped = cost(TINY, _pruned(input_vision_keep=0.75, prune_vision_after=1, skip_layers=[0]), prompt)
    assert skipped.prefill_layers == [2 * 4 * 4 * 4, entered + 2 * (7 * 8 + 16 + 7 * 4), kept]


def test_ideal_speedup():
    plan = ["frozen", "all", "absent"]
    ideal = ideal_speedup(TINY, plan, PROMPT, decode_steps=2)
    assert ideal["prefill"] == pytest.approx(3440 / 2352)
    assert ideal["decode"] == pytest.approx((1040 + 1088) / (1008 + 1056))
    assert ideal["kv_memory"] == pytest.approx(16 / 18)
    assert ideal["flops_removed"] == pytest.approx(1 - 2352 / 3440)  # the prefill's share, and only the prefill's
    assert ideal["decode_flops_removed"] == pytest.approx(1 - (1008 + 1056) / (1040 + 1088))
    unchanged = {"prefill": 1.0, "decode": 1.0, "kv_memory": 1.0, "flops_removed": 0.0, "decode_flops_removed": 0.0}
    assert ideal_speedup(TINY, ["all"] * 3, PROMPT, 2) == unchanged


def test_prompt_layout():
    assert prompt_layout(2, 3, text_before=1) == [False, True, True, False, False]
    with pytest.raises(ValueError):
        prompt_layout(2, 3, text_before=4)


def test_shape_counts_every_weight_of_a_layer():
    """token_macs is the weight count of a decoder layer's projections; the text config of a VLM is the one read."""
    model = build("llava")
    shape = Shape.from_model(model)
    text = model.config.text_config
    assert (shape.num_layers, shape.hidden, shape.vocab) == (6, text.hidden_size, text.vocab_size)
    layer = model.model.language_model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert shape.token_macs == weights
    assert shape.hidden * shape.vocab == model.lm_head.weight.numel()


def linear_flops(model, inputs) -> float:
    """Matrix-multiply FLOPs that a forward spends in the language backbone and the LM head (SDPA not counted)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    return sum(
        n
        for name in ("LlavaForConditionalGeneration.model.language_model", "LlavaForConditionalGeneration.lm_head")
        for op, n in counts.get(name, {}).items()
        if str(op) in ("aten.mm", "aten.addmm")
    )


@pytest.mark.parametrize(
    "decisions",
    [{}, dict(late_entry=2), dict(late_entry=2, late_entry_mode="frozen"), dict(early_exit=1, skip_layers=[3]),
     dict(prune_vision_after=1, prune_vision_keep=0.4, early_exit=4),
     dict(prune_vision_after=1, prune_vision_keep=0.4, prune_vision_rank="dart", skip_layers=[2]),
     dict(prune_vision_after=-1, prune_vision_keep=0.4, prune_vision_rank="divprune"),
     dict(prune_vision_after=-1, prune_vision_keep=0.4, prune_vision_rank="divprune", skip_layers=[0]),
     dict(input_vision_keep=0.7, prune_vision_after=1, prune_vision_keep=0.3, late_entry_mode="frozen",
          frozen_vision_layers=[0], skip_layers=[3])],
)
def test_engine_does_the_counted_work(decisions):
    """Under a plan the backbone multiplies exactly what the cost model counts: no token a layer skips goes
    through its projections (frozen vision tokens only through k and v)."""
    model, inputs = build("llava"), with_positions("llava", make_inputs("llava", 1))
    plan = Plan.for_model(model, **decisions)
    apply_plan(model, plan)
    try:
        counted = linear_flops(model, inputs)
    finally:
        remove_plan(model)
    expected = cost(Shape.from_model(model), plan, (inputs["input_ids"][0] == IMAGE).tolist())
    assert counted == expected.prefill - expected.prefill_scores
    if decisions:
        assert counted < linear_flops(model, inputs)
