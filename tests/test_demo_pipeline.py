"""The demo pipeline end to end on the tiny LLaVA (the real mini-llava run is `make demo`)."""

from __future__ import annotations

import json

import pytest

from skipit.data.shapes import write_split
from skipit.demo import pipeline
from skipit.plan import Plan


@pytest.fixture()
def tiny_run(tiny_llava_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPIT_CACHE", str(tmp_path / "cache"))
    for split, n in (("calibration", 6), ("test", 8)):  # small splits where the demo looks for the standard ones
        write_split(tmp_path / "cache" / "shapes", split, n=n)
    return tmp_path


def test_demo_runs_every_step_and_resumes(tiny_run, tiny_llava_dir, monkeypatch):
    config = pipeline.DemoConfig(n_calib=6, n_test=8, step=3, repeats=1, kappa=1e-4,  # a plan baselines can match
                                 compose={"n_score": 3, "n_heldout": 3, "step": 2})
    headline = pipeline.run(tiny_run / "run", config, model_path=tiny_llava_dir)
    run = tiny_run / "run"
    for name in ("analysis.json", "plan.json", "sweep.json", "report.html"):
        assert (run / name).is_file(), name
    plan = Plan.load(run / "plan.json")
    sweep = json.loads((run / "sweep.json").read_text())
    rows = {r["name"]: r for r in sweep["plans"]}
    assert rows["skipit"]["plan"] == plan.to_dict()
    assert headline["flops_removed"] == pytest.approx(rows["skipit"]["flops_removed"])
    assert headline["accuracy"] == rows["skipit"]["accuracy"]
    assert {r["method"] for r in sweep["baselines"]} >= {"skipit", "shortgpt", "random"}
    budget = round(plan.evidence["flops_removed"], 3)
    # the baselines are compared with the demo's own plan at its budget, scored once (no second budget search)
    assert [n for n in rows if n.startswith("skipit@")] == [f"skipit@{budget:g}"]
    assert rows[f"skipit@{budget:g}"]["same_as"] == "skipit" and rows[f"skipit@{budget:g}"]["plan"] == plan.to_dict()
    assert sweep["skipit_vs_baselines"] and all(v["budget"] == budget for v in sweep["skipit_vs_baselines"])
    wanted = {"empty", "skipit"}  # the headline and its control
    assert all(rows[name]["timed"] for name in wanted)
    untimed = [r for name, r in rows.items() if name not in wanted and "same_as" not in r]  # a twin copies its twin
    assert untimed and all(r["timed"] is False and r["prefill_speedup"] is None for r in untimed)
    assert all(r["ideal_prefill_speedup"] >= 1 for r in untimed)

    def fail(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    from skipit import analysis as analysis_mod
    from skipit.evaluation import sweep as sweep_mod

    monkeypatch.setattr(analysis_mod, "analyze", fail)
    monkeypatch.setattr(sweep_mod, "measure_plan", fail)
    again = pipeline.run(run, config, model_path=tiny_llava_dir)
    assert again == headline
