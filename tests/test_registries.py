"""The registries (baselines, evaluation tasks) and the accumulators' protocol."""

from __future__ import annotations

import json

import pytest

from skipit import baselines
from skipit.errors import SkipitError
from skipit.evaluation import TASKS, get_task, sweep


def test_baseline_registry():
    assert baselines.METHODS == baselines.available() == (
        "vtw", "shortv", "fastv", "dart", "divprune", "shortgpt", "gromov", "random")  # fmt: skip
    assert baselines.get_baseline("vtw").name == "vtw" and baselines.get_baseline("vtw").reference
    assert "arXiv:2502.11494" in baselines.get_baseline("dart").reference
    assert "github.com/vbdi/divprune" in baselines.get_baseline("divprune").reference
    with pytest.raises(SkipitError, match="unknown baseline 'medusa'; available: vtw, shortv, fastv, dart, divprune"):
        baselines.get_baseline("medusa")
    with pytest.raises(SkipitError, match="unknown baseline 'medusa'"):
        baselines.baseline_plan("medusa", None, None, [], {}, 0.1)


def test_a_new_baseline_is_one_registered_function(tiny_llava, monkeypatch):
    model, _ = tiny_llava
    monkeypatch.setattr(baselines, "BASELINES", dict(baselines.BASELINES))

    @baselines.register("last-layer", "skip the last layer, whatever the budget")
    def _last(ctx: baselines.BaselineContext):
        return ctx.empty.with_decisions(skip_layers=[ctx.num_layers - 1])

    assert "last-layer" in baselines.available()
    plan = baselines.baseline_plan("last-layer", model, None, [], {}, 0.1)
    assert list(plan.skip_layers) == [5]
    with pytest.raises(ValueError, match="registered already"):
        baselines.register("vtw")(_last)


@pytest.mark.parametrize(("method", "after", "rank"), [("fastv", 1, "attention"), ("dart", 1, "dart"),
                                                       ("divprune", -1, "divprune")])  # fmt: skip
def test_pruning_baselines_keep_the_largest_share_that_meets_the_budget(method, after, rank):
    from test_skipping import build, make_inputs

    model = build("llava")
    encoded = make_inputs("llava", 2)  # 9 vision tokens of about 15 per row
    budget = 0.2
    plan = baselines.baseline_plan(method, model, None, [], encoded, budget)
    assert (plan.prune_vision_after, plan.prune_vision_rank) == (after, rank)
    assert not plan.skip_layers and plan.early_exit is None and plan.late_entry == 0
    assert baselines.saving(model, encoded, plan) >= budget
    more = plan.with_decisions(prune_vision_after=after, prune_vision_rank=rank,
                               prune_vision_keep=plan.prune_vision_keep + 0.01)  # fmt: skip
    assert baselines.saving(model, encoded, more) < budget
    with pytest.raises(SkipitError, match=f"{method} cannot remove 90% of the FLOPs"):
        baselines.baseline_plan(method, model, None, [], encoded, 0.9)


def test_task_registry():
    assert list(TASKS) == ["vqa", "caption"]
    assert get_task("vqa").__name__ == "skipit.evaluation.vqa"
    for name in TASKS:
        task = get_task(name)
        assert all(callable(getattr(task, f)) for f in ("check_options", "check_scorable", "run", "speed_prompts"))
    with pytest.raises(SkipitError, match="unknown task 'translate'; available: vqa, caption"):
        get_task("translate")


def test_every_accumulator_follows_the_stats_protocol():
    from skipit.functional_stats import FunctionalStats
    from skipit.stats import AttentionStats, LayerStats, Stats

    for cls in (LayerStats, AttentionStats, FunctionalStats):
        names = ("update", "merge", "state_dict", "load_state_dict", "from_state_dict", "finalize")
        assert all(callable(getattr(cls, name, None)) for name in names), cls
    assert isinstance(FunctionalStats(num_layers=2), Stats)


def test_saved_results_without_a_key_are_refused(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "empty.json").write_text(json.dumps({"name": "empty", "n": 4}))
    with pytest.raises(SkipitError, match="before results were keyed.*use a fresh --out, or pass --restart"):
        sweep.check_saved(tmp_path, {"n": 4})
    sweep.check_saved(tmp_path, {"n": 4}, restart=True)
    assert not list((tmp_path / "plans").glob("*.json"))
