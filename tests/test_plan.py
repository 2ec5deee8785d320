"""The Plan object: layer roles, validation, binding to one model, JSON round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from skipit.adapters import get_adapter
from skipit.errors import SkipitError
from skipit.plan import Plan, fingerprint
from skipit.skipping import apply_plan, remove_plan

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)


def llama(layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=layers)).eval()


def plan(**decisions) -> Plan:
    return Plan(architecture="LlamaForCausalLM", num_layers=6, fingerprint="0" * 16, **decisions)


def test_roles_follow_the_layer_indexing():
    assert plan().roles() == ["all"] * 6 and plan().is_empty
    # late entry k=2: layers 0, 1 skip vision; early exit m=3: layers 4, 5 skip vision; layer 5 skipped for all
    p = plan(late_entry=2, late_entry_mode="frozen", early_exit=3, skip_layers=[5])
    assert p.roles() == ["frozen", "frozen", "all", "all", "absent", "skip"]
    assert plan(late_entry=2).roles()[:3] == ["absent", "absent", "all"]
    assert plan(early_exit=5).is_empty  # exiting after the last layer changes nothing
    assert plan(late_entry=3, early_exit=3).roles() == ["absent"] * 3 + ["all"] + ["absent"] * 2
    p = plan(late_entry=1, early_exit=4, frozen_vision_layers=[3, 2], skip_layers=[4])
    assert p.roles() == ["absent", "all", "frozen", "frozen", "skip", "absent"]
    assert p.frozen_vision_layers == (2, 3)
    p = plan(late_entry=1, prune_vision_after=2, early_exit=4, skip_layers=[3])
    assert p.roles() == ["absent", "all", "all", "skip", "pruned", "absent"]
    assert plan(prune_vision_after=5).is_empty  # pruning after the last layer changes nothing
    assert plan(prune_vision_after=1, prune_vision_rank="dart").roles() == ["all"] * 2 + ["pruned"] * 4
    # DivPrune chooses before layer 0: every layer sees only the kept vision tokens
    p = plan(prune_vision_after=-1, prune_vision_rank="divprune", early_exit=3, skip_layers=[1])
    assert p.roles() == ["pruned", "skip", "pruned", "pruned", "absent", "absent"]


@pytest.mark.parametrize(
    "decisions, message",
    [
        (dict(late_entry=4, early_exit=2), r"late_entry \(4\) is after early_exit \(2\)"),
        (dict(late_entry=6), r"late_entry must be a layer index in 0\.\.5"),
        (dict(late_entry=-1), r"late_entry must be a layer index in 0\.\.5"),
        (dict(early_exit=6), r"early_exit must be a layer index in 0\.\.5"),
        (dict(skip_layers=[2, 7]), r"skip_layers \[7\] out of range"),
        (dict(skip_layers=range(6)), "keep at least one"),
        (dict(late_entry=1, late_entry_mode="sleeping"), "late_entry_mode must be one of absent, frozen"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(late_entry=2, frozen_vision_layers=[1]), r"frozen_vision_layers \[1\] must be .* \(2\.\.5\)"),
        (dict(early_exit=3, frozen_vision_layers=[4]), r"frozen_vision_layers \[4\] must be .* \(0\.\.3\)"),
        (dict(skip_layers=[2], frozen_vision_layers=[2]), r"frozen_vision_layers \[2\] must be"),
        (dict(prune_vision_after=4, early_exit=3), r"prune_vision_after must be a layer .* \(0\.\.3, not"),
        (dict(prune_vision_after=2, skip_layers=[2]), "prune_vision_after must be a layer that updates"),
        (dict(prune_vision_after=1, prune_vision_keep=1.0), "prune_vision_keep must be a fraction"),
        (dict(prune_vision_after=1, frozen_vision_layers=[3]), r"frozen_vision_layers \[3\] come after"),
        (dict(prune_vision_after=1, prune_vision_rank="tome"), "prune_vision_rank must be one of attention, dart"),
        (dict(prune_vision_rank="dart"), "prune_vision_rank 'dart' needs prune_vision_after"),
        (dict(prune_vision_after=-1), r"prune_vision_after -1 \(before layer 0\) goes with .*'divprune'"),
        (dict(prune_vision_after=-1, prune_vision_rank="dart"), "goes with prune_vision_rank 'divprune'"),
        (dict(prune_vision_after=2, prune_vision_rank="divprune"), "goes with prune_vision_rank 'divprune'"),
        (dict(prune_vision_after=-2, prune_vision_rank="attention"), "prune_vision_after must be a layer"),
        (dict(input_vision_keep=0.5), "needs a pruning stage at a layer"),
        (dict(input_vision_keep=0.5, prune_vision_after=-1, prune_vision_rank="divprune", prune_vision_keep=0.2),
         "needs a pruning stage at a layer"),
        (dict(input_vision_keep=1.0, prune_vision_after=1), "input_vision_keep must be a fraction"),
        (dict(input_vision_keep=0.5, prune_vision_after=1, prune_vision_keep=0.5), r"must be below input_vision_keep"),
        (dict(input_vision_keep=0.5, prune_vision_after=2, prune_vision_keep=0.2, late_entry=1), "needs late_entry 0"),
        (dict(prune_vision_after=-1, prune_vision_rank="divprune", late_entry=1), "needs late_entry 0"),
        (dict(prune_vision_after=-1, prune_vision_rank="divprune", frozen_vision_layers=[2]), "come after"),
        (dict(prune_vision_after=1.0), "prune_vision_after must be a layer index"),
    ],
)
def test_invalid_plans_say_what_to_fix(decisions, message):
    with pytest.raises(SkipitError, match=message) as err:
        plan(**decisions) if "num_layers" not in decisions else Plan("LlamaForCausalLM", fingerprint="x", **decisions)
    assert "\n" not in str(err.value)


def test_skip_layers_are_sorted_and_deduplicated():
    assert plan(skip_layers=[4, 1, 4]).skip_layers == (1, 4)


def test_plan_is_bound_to_its_model():
    model = llama()
    p = Plan.for_model(model, early_exit=2)
    p.check(model)  # its own model: fine
    with pytest.raises(SkipitError, match="made for a LlamaForCausalLM, not a MistralForCausalLM"):
        torch.manual_seed(0)
        p.check(MistralForCausalLM(MistralConfig(**TINY, num_hidden_layers=6)))
    with pytest.raises(SkipitError, match="made for 6 decoder layers, this model has 4"):
        p.check(llama(layers=4))
    with pytest.raises(SkipitError, match="other weights"):
        p.check(llama(seed=1))
    with pytest.raises(SkipitError, match="other weights"):
        apply_plan(llama(seed=1), p)


def test_fingerprint_ignores_wrapping_and_bfloat16_but_not_weights():
    model = llama()
    before = fingerprint(model)
    apply_plan(model, Plan.for_model(model, skip_layers=[1]))
    assert fingerprint(model) == before
    remove_plan(model)
    assert fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert fingerprint(model) != before


def test_json_round_trip(tmp_path):
    model = llama()
    p = Plan.for_model(model, late_entry=1, late_entry_mode="frozen", early_exit=4, skip_layers=[3],
                       frozen_vision_layers=[2], evidence={"epsilon": 0.05, "flops_saving": 0.31})  # fmt: skip
    path = p.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == "skipit-plan" and data["version"] == 1 and data["skip_layers"] == [3]
    loaded = Plan.load(path)
    assert loaded == p
    loaded.check(model)


def test_rankings_round_trip_as_version_2_and_version_1_files_still_load(tmp_path):
    model = llama()
    for decisions in (dict(prune_vision_after=2, prune_vision_keep=0.3, prune_vision_rank="dart"),
                      dict(prune_vision_after=-1, prune_vision_keep=0.1, prune_vision_rank="divprune")):  # fmt: skip
        p = Plan.for_model(model, **decisions)
        data = json.loads(p.save(tmp_path / "plan.json").read_text())
        assert data["version"] == 2 and data["prune_vision_rank"] == decisions["prune_vision_rank"]
        assert Plan.load(tmp_path / "plan.json") == p
    # a plan version 1 can say is written as version 1, without the new field, so older readers load it
    fastv = Plan.for_model(model, prune_vision_after=1)
    data = fastv.to_dict()
    assert data["version"] == 1 and "prune_vision_rank" not in data
    (tmp_path / "old.json").write_text(json.dumps(data))
    loaded = Plan.load(tmp_path / "old.json")
    assert loaded == fastv and loaded.prune_vision_rank == "attention"
    (tmp_path / "odd.json").write_text(json.dumps(data | {"prune_vision_rank": "dart"}))
    with pytest.raises(SkipitError, match="prune_vision_rank needs plan format version 2, the file says 1"):
        Plan.load(tmp_path / "odd.json")


def test_two_stage_plans_round_trip_as_version_3(tmp_path):
    model = llama()
    p = Plan.for_model(model, input_vision_keep=0.5, prune_vision_after=2, prune_vision_keep=0.2)
    data = json.loads(p.save(tmp_path / "plan.json").read_text())
    assert data["version"] == 3 and data["input_vision_keep"] == 0.5
    assert Plan.load(tmp_path / "plan.json") == p
    assert "input_vision_keep" not in Plan.for_model(model, prune_vision_after=2, prune_vision_rank="dart").to_dict()
    (tmp_path / "odd.json").write_text(json.dumps(data | {"version": 2}))
    with pytest.raises(SkipitError, match="input_vision_keep needs plan format version 3, the file says 2"):
        Plan.load(tmp_path / "odd.json")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "does not hold a JSON object"),
        ('{"format": "something-else"}', "not a skipit plan"),
        ('{"format": "skipit-plan", "version": 99}', r"version 99 is not supported \(this skipit reads 1, 2, 3\)"),
        ('{"format": "skipit-plan", "version": true}', "version True is not supported"),
        ('{"format": "skipit-plan", "version": 1, "num_layers": 6}', "plan is missing"),
    ],
)
def test_bad_plan_files(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(SkipitError, match=message):
        Plan.load(path)


def test_unknown_fields_and_missing_file(tmp_path):
    path = tmp_path / "plan.json"
    data = plan().to_dict() | {"vision_budget": 3}
    path.write_text(json.dumps(data))
    with pytest.raises(SkipitError, match=r"unknown plan fields \['vision_budget'\]"):
        Plan.load(path)
    with pytest.raises(SkipitError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_unsupported_model_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(SkipitError, match="GPT2LMHeadModel is not supported.*LlavaForConditionalGeneration"):
        get_adapter(gpt2)
    assert get_adapter(llama()).num_layers == 6
