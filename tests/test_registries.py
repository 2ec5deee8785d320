"""The registries (baselines, evaluation tasks) and the accumulators' protocol."""

from __future__ import annotations

import json

import pytest

from skipit import baselines
from skipit.errors import SkipitError
from skipit.evaluation import TASKS, get_task, sweep


def test_baseline_registry():
    assert baselines.METHODS == baselines.available() == ("vtw", "shortv", "fastv", "shortgpt", "gromov", "random")
    assert baselines.get_baseline("vtw").name == "vtw" and baselines.get_baseline("vtw").reference
    with pytest.raises(SkipitError, match="unknown baseline 'medusa'; available: vtw, shortv, fastv, shortgpt"):
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
