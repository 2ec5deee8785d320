"""benchmarks/budgets.py --table on a run folder written here, whose answers are known: skipit's gain over each
method at the same budget, its KL-limited plans paired with the method's plan nearest in FLOPs, and the largest cut
keeping 99 % by point estimate and by the interval's upper end."""

import json
from pathlib import Path

import pytest
from conftest import benchmark_script

N = 200  # questions


@pytest.fixture(scope="module")
def budgets():
    return benchmark_script("budgets")


def write_plan(folder: Path, name: str, flops: float, wrong: set[int]) -> None:
    """A scored plan: the reference gets questions 0-179 right; this plan also misses the questions in `wrong`."""
    correct = [i < 180 and i not in wrong for i in range(N)]
    row = {"name": name, "flops_removed": flops, "accuracy": sum(correct) / N,
           "predictions": [{"id": str(i), "correct": c} for i, c in enumerate(correct)]}  # fmt: skip
    (folder / f"{name}.json").write_text(json.dumps(row))


def test_the_table_pairs_each_plan_and_finds_each_methods_largest_cut(budgets, tmp_path, capsys):
    plans = tmp_path / "plans"
    plans.mkdir()
    write_plan(plans, "empty", 0.0, set())
    write_plan(plans, "skipit@0.1", 0.101, set())  # keeps 100 %
    write_plan(plans, "divprune@0.1", 0.105, {1})  # 179 / 180: 99.4 %
    write_plan(plans, "skipit@0.3", 0.302, set(range(20)))  # 160 / 180: 88.9 %
    write_plan(plans, "divprune@0.3", 0.300, set(range(40)))  # 140 / 180: skipit +20 questions = +10 points
    write_plan(plans, "skipit+composed", 0.28, {5})  # a KL-limited plan: 99.4 % at 28 %
    budgets.print_table(tmp_path)
    out = capsys.readouterr().out
    # gains are in points of accuracy: 160 - 140 questions right of 200 = +10.0; 179 - 140 = +19.5
    assert "| divprune@0.3 | 30.0% | 77.8% " in out and "| +10.0 [" in out
    assert "| skipit+composed | 28.0% | divprune@0.3 | 30.0% | +19.5 [" in out  # nearest in FLOPs, not @0.1
    point, interval = out.split("largest cut keeping 99% (point estimate)")[1].split("largest cut keeping 99% (upper")
    assert "- skipit: 28.0% (skipit+composed)" in point and "- divprune: 10.5% (divprune@0.1)" in point
    assert "- skipit: 28.0% (skipit+composed)" in interval


def test_no_untouched_run_is_a_clear_error(budgets, tmp_path):
    (tmp_path / "plans").mkdir()
    with pytest.raises(budgets.SkipitError, match="no untouched model's result"):
        budgets.print_table(tmp_path)
