"""A plan file is checked field by field on load: exact types, no coercion, one line naming the file and field."""

import json

import pytest

from skipit.errors import SkipitError
from skipit.plan import Plan


def plan_dict(**fields) -> dict:
    return Plan("LlamaForCausalLM", 32, "0" * 16).to_dict() | fields


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"skip_layers": "13"}, r"field 'skip_layers': input should be a valid list, got '13'"),
        ({"skip_layers": "13,20"}, r"field 'skip_layers'"),
        ({"skip_layers": [13.7]}, r"field 'skip_layers.0': input should be a valid integer, got 13.7"),
        ({"skip_layers": [True]}, r"field 'skip_layers.0': input should be a valid integer, got True"),
        ({"skip_layers": ["a"]}, r"field 'skip_layers.0'"),
        ({"skip_layers": None}, r"field 'skip_layers'.*got None"),
        ({"late_entry": 13.7}, r"field 'late_entry': input should be a valid integer"),
        ({"late_entry": True}, r"field 'late_entry'"),
        ({"early_exit": "20"}, r"field 'early_exit'"),
        ({"late_entry_mode": "gone"}, r"field 'late_entry_mode'"),
        ({"prune_vision_keep": "0.5"}, r"field 'prune_vision_keep'"),
        ({"version": 2, "prune_vision_rank": "fastv"}, r"field 'prune_vision_rank'"),
        ({"version": 2, "prune_vision_after": 1, "prune_vision_rank": 2}, r"field 'prune_vision_rank'"),
        ({"num_layers": 32.0}, r"field 'num_layers'"),
        ({"evidence": []}, r"field 'evidence'"),
        ({"skip_layers": [40]}, r"skip_layers \[40\] out of range"),  # types fine, range checked by the plan
    ],
)
def test_bad_fields_name_file_and_field(tmp_path, fields, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(**fields)))
    with pytest.raises(SkipitError, match=message) as info:
        Plan.load(path)
    assert "\n" not in str(info.value)


def test_ints_stay_ints_and_a_whole_float_share_is_accepted(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(skip_layers=[20, 13, 13], prune_vision_after=3, prune_vision_keep=0.25)))
    plan = Plan.load(path)
    assert plan.skip_layers == (13, 20) and plan.prune_vision_keep == 0.25


def test_a_version_1_file_from_before_rankings_loads(tmp_path):
    """Exactly what an older skipit wrote for a FastV-style plan: no prune_vision_rank field."""
    path = tmp_path / "plan.json"
    old = {"format": "skipit-plan", "version": 1, "architecture": "LlamaForCausalLM", "num_layers": 32,
           "fingerprint": "0" * 16, "late_entry": 0, "late_entry_mode": "absent", "early_exit": None,
           "skip_layers": [], "frozen_vision_layers": [], "prune_vision_after": 1, "prune_vision_keep": 0.5,
           "evidence": {}}  # fmt: skip
    path.write_text(json.dumps(old))
    plan = Plan.load(path)
    assert plan.prune_vision_rank == "attention" and plan.prune_vision_after == 1
    assert plan.to_dict() == old  # and it is written back the same


def test_python_construction_does_not_coerce_either():
    with pytest.raises(SkipitError, match="skip_layers must be a list of layer indices"):
        Plan("LlamaForCausalLM", 32, "0" * 16, skip_layers="13")
    with pytest.raises(SkipitError, match="skip_layers must be a list of layer indices"):
        Plan("LlamaForCausalLM", 32, "0" * 16, skip_layers=[13.7])
    with pytest.raises(SkipitError, match="late_entry must be a layer index"):
        Plan("LlamaForCausalLM", 32, "0" * 16, late_entry=True)


def test_directory_and_binary_file(tmp_path):
    with pytest.raises(SkipitError, match="is a directory"):
        Plan.load(tmp_path)
    binary = tmp_path / "plan.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(SkipitError, match="is not text"):
        Plan.load(binary)
