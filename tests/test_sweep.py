"""Sweep and baselines on the tiny LLaVA: files, resume, correlations, matched budgets."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from skipit import baselines, composer, models
from skipit.analysis import analyze
from skipit.data.jsonl import load_records
from skipit.data.shapes import write_split
from skipit.evaluation import sweep, vqa
from skipit.plan import Plan
from skipit.skipping import apply_plan, remove_plan
from skipit.stats import StatsConfig


@pytest.fixture(scope="module")
def setup(tiny_llava, tmp_path_factory):
    model, processor = tiny_llava
    root = tmp_path_factory.mktemp("sweep")
    test = load_records(write_split(root / "shapes", "test", n=6).parent)
    calib = load_records(write_split(root / "shapes", "calibration", n=4).parent)
    torch.manual_seed(0)
    analysis = analyze(model, processor, calib, batch_size=2, stats_config=StatsConfig(n_bootstrap=5, sketch_size=16))
    return model, processor, test, calib, analysis.result


def test_grid_covers_every_kind_of_plan(tiny_llava):
    model, _ = tiny_llava
    plans = sweep.grid(model, step=2)  # 6 layers
    assert list(plans) == ["empty", "late_entry_2", "late_entry_4", "early_exit_3", "early_exit_1",
                           "vision_frozen_0", "vision_frozen_2", "vision_frozen_4",
                           "layer_skip_0", "layer_skip_2", "layer_skip_4"]  # fmt: skip
    assert plans["early_exit_1"][1].roles() == ["all", "all"] + ["absent"] * 4
    assert len(sweep.grid(model, step=1)) == 1 + 5 + 5 + 6 + 6


def test_sweep_writes_every_plan_and_resumes(setup, tmp_path, monkeypatch):
    model, processor, test, _, analysis = setup
    plans = dict(list(sweep.grid(model, step=3).items()))
    result = sweep.run(model, processor, test, tmp_path, plans, analysis=analysis, repeats=1)
    assert sorted(p.stem for p in (tmp_path / "plans").glob("*.json")) == sorted(plans)
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    assert on_disk["format"] == "skipit-sweep" and len(on_disk["plans"]) == len(plans)
    rows = {r["name"]: r for r in result["plans"]}
    assert rows["empty"]["accuracy_drop"] == 0 and rows["empty"]["flops_removed"] == pytest.approx(0, abs=1e-12)
    assert rows["layer_skip_3"]["flops_removed"] == pytest.approx(1 / 6, rel=0.02)  # one of six equal layers
    assert all(r["safe"] in (True, False) and set(r["predicted"]) >= {"geometric", "var"} for r in rows.values())
    assert set(result["correlation"]) >= {"geometric", "proximal", "var"}

    def fail(*args, **kwargs):
        raise AssertionError("a finished plan was measured again")

    monkeypatch.setattr(sweep, "measure_plan", fail)
    # the same decisions found again (a newer search, say): the saved scores stay, the plan's evidence is the new one
    family, plan = plans["layer_skip_3"]
    plans["layer_skip_3"] = (family, dataclasses.replace(plan, evidence={"search": {"version": 99}}))
    again = sweep.run(model, processor, test, tmp_path, plans, analysis=analysis, repeats=1)
    assert [r["accuracy"] for r in again["plans"]] == [r["accuracy"] for r in result["plans"]]
    saved = json.loads((tmp_path / "plans" / "layer_skip_3.json").read_text())
    assert saved["plan"]["evidence"] == {"search": {"version": 99}}
    assert saved["accuracy"] == rows["layer_skip_3"]["accuracy"]


def test_correlations_on_known_rankings():
    rows = [{"predicted": {"geometric": x, "var": -x}, "accuracy_drop": 2 * x + 1} for x in range(8)]
    c = sweep.correlations(rows, n_boot=200)
    assert c["geometric"]["spearman"] == pytest.approx(1.0) and c["geometric"]["ci_low"] == pytest.approx(1.0)
    assert c["var"]["spearman"] == pytest.approx(-1.0) and c["geometric"]["n"] == 8


def test_baselines_meet_the_budget_their_own_way(setup):
    model, processor, test, calib, analysis = setup
    encoded = sweep.speed_batch(model, processor, test)
    cache: dict = {}
    # 4 of about 45 tokens are vision; pruning all but one of them after layer 1 of 6 (fastv, dart) saves about 4 %
    budgets = {m: 0.03 if m in ("fastv", "dart", "divprune") else 0.08 for m in baselines.METHODS}
    plans = {m: baselines.baseline_plan(m, model, processor, calib, encoded, b, analysis=analysis, cache=cache)
             for m, b in budgets.items()}  # fmt: skip
    for m, plan in plans.items():
        assert baselines.saving(model, encoded, plan) >= budgets[m]
    assert plans["vtw"].early_exit is not None and not plans["vtw"].skip_layers
    assert plans["shortv"].frozen_vision_layers and not plans["shortv"].skip_layers
    lc = cache["lc"]
    assert list(plans["shortv"].frozen_vision_layers) == sorted(sorted(range(6), key=lambda j: lc[j])[: len(
        plans["shortv"].frozen_vision_layers)])  # fmt: skip
    fastv = plans["fastv"]
    assert fastv.prune_vision_after == 1 and not fastv.skip_layers and fastv.early_exit is None
    more = Plan.for_model(model, prune_vision_after=1, prune_vision_keep=fastv.prune_vision_keep + 0.01)
    assert baselines.saving(model, encoded, more) < 0.03  # the largest share kept that meets the budget
    gromov = plans["gromov"].skip_layers
    assert list(gromov) == list(range(gromov[0], gromov[0] + len(gromov))) and 5 not in gromov  # contiguous
    bi = baselines.shortgpt_layer_influence(analysis)
    assert max(bi[j] for j in plans["shortgpt"].skip_layers) <= min(
        bi[j] for j in range(6) if j not in plans["shortgpt"].skip_layers)  # fmt: skip
    k, kls = baselines.vtw_own_k(model, processor, calib, threshold=0.01)
    assert kls[-1] == pytest.approx(0, abs=1e-6)  # exiting after the last layer changes nothing
    assert k is not None and kls[k] < 0.01 and all(v >= 0.01 for v in kls[:k])


def test_summary_carries_paired_intervals_and_separates_significant_losses(tmp_path):
    """Synthetic plan results on 200 questions with known answers: the intervals are paired against the empty plan,
    McNemar's test separates a real 10-point loss from a 3-point one that is noise, and skipit is compared with each
    baseline at the same budget."""
    n = 200
    base = [i % 2 == 0 for i in range(n)]  # 100 right

    def row(name, family, correct, safe=True):
        plan = Plan("LlavaForConditionalGeneration", 6, "0" * 16).to_dict()
        preds = [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)]
        return {"name": name, "family": family, "plan": plan, "accuracy": sum(correct) / n, "predictions": preds,
                "flops_removed": 0.1, "prefill_speedup": 1.1, "decode_speedup": 1.0, "safe": safe, "per_type": {}}

    lose10 = [c and i >= 40 for i, c in enumerate(base)]  # 20 of the 100 right answers lost: 10 points
    lose3 = [c and i >= 12 for i, c in enumerate(base)]  # 6 lost: 3 points, p = 0.03 -> significant but small
    noisy = [(c and i >= 8) or (not c and i < 4) for i, c in enumerate(base)]  # 4 lost, 2 won: 1 point, p = 0.69
    done = {"empty": row("empty", "empty", base), "big": row("big", "layer_skip", lose10),
            "small": row("small", "layer_skip", lose3), "noise": row("noise", "layer_skip", noisy),
            "skipit@0.1": row("skipit@0.1", "skipit", noisy), "fastv@0.1": row("fastv@0.1", "baseline", lose10)}
    result = sweep.summarize(done, None, tmp_path, lost_points=2.0, meta={"n": n})
    rows = {r["name"]: r for r in result["plans"]}
    assert [math.copysign(1, rows["empty"]["drop_ci"][k]) for k in ("value", "low", "high")] == [1, 1, 1]  # no -0.0
    assert rows["big"]["drop_ci"]["value"] == pytest.approx(10.0)
    assert rows["big"]["drop_ci"]["low"] > 2 and rows["big"]["significant_loss"]
    assert rows["big"]["mcnemar_p"] < 1e-4
    assert rows["noise"]["drop_ci"]["low"] < 0 < rows["noise"]["drop_ci"]["high"]
    assert not rows["noise"]["significant_loss"] and rows["noise"]["mcnemar_p"] > 0.5
    assert rows["small"]["significant_loss"]  # 3 points, and McNemar says not chance
    low, high = rows["big"]["kept_ci"]["low"], rows["big"]["kept_ci"]["high"]
    assert low < 0.8 < high  # 80 of 100 kept
    (versus,) = result["skipit_vs_baselines"]
    assert versus["baseline"] == "fastv" and versus["skipit_gain_points"]["value"] == pytest.approx(9.0)
    assert versus["skipit_gain_points"]["low"] > 0 and versus["mcnemar_p"] < 0.05
    assert all("accuracy_kept_ci" in b and "mcnemar_p" in b for b in result["baselines"])
    assert json.loads((tmp_path / "sweep.json").read_text())["plans"][1]["drop_ci"] == rows["big"]["drop_ci"]


def test_a_noisy_speed_is_measured_again_then_flagged(setup, monkeypatch):
    model, processor, test, _, _ = setup
    encoded = sweep.speed_batch(model, processor, test)
    calls = []

    def compare(model, encoded, configs, new_tokens, repeats, warmup):
        calls.append(repeats)
        return {name: [] for name in configs}

    def rows(noisy):
        def speed_rows(*args, **kwargs):
            row = {k: 1.0 for k in ("prefill_speedup", "decode_speedup", "ideal_prefill_speedup",
                                    "ideal_decode_speedup", "kv_ratio", "prefill_speedup_low",
                                    "prefill_speedup_high", "decode_speedup_low", "decode_speedup_high")}
            return [row, {**row, "noisy": noisy(len(calls))}]
        return speed_rows

    monkeypatch.setattr(sweep.speed, "compare", compare)
    plan = Plan.for_model(model, early_exit=2)
    monkeypatch.setattr(sweep.speed, "speed_rows", rows(lambda k: ["busy"] if k == 1 else []))
    assert sweep.measure_plan(model, processor, test, plan, encoded, 8, 3)["speed_noisy"] == []
    assert calls == [3, 6]  # measured again with twice the rounds, and then clean
    calls.clear()
    monkeypatch.setattr(sweep.speed, "speed_rows", rows(lambda k: ["busy"]))
    assert sweep.measure_plan(model, processor, test, plan, encoded, 8, 3)["speed_noisy"] == ["busy"]
    assert calls == [3, 6]  # still noisy: flagged, never printed as a result


def test_answers_from_images_encoded_once_equal_answers_from_pixels(setup, monkeypatch):
    """The sweep runs the vision encoder once per record for all its plans: the answers must be the ones the model
    gives from the pixels, under a plan too, and the encoder must not run again."""
    model, processor, test, _, _ = setup
    plan = Plan.for_model(model, early_exit=2, frozen_vision_layers=[1])
    encoded = vqa.encode_batches(model, processor, test, batch_size=4)
    apply_plan(model, plan)
    try:
        plain = vqa.evaluate(model, processor, test, batch_size=4)
        tower = model.model.vision_tower
        calls = []
        handle = tower.register_forward_hook(lambda *args: calls.append(1))
        try:
            cached = vqa.evaluate(model, processor, test, batch_size=4, encoded=encoded)
        finally:
            handle.remove()
    finally:
        remove_plan(model)
    assert [p["prediction"] for p in cached["predictions"]] == [p["prediction"] for p in plain["predictions"]]
    assert cached["accuracy"] == plain["accuracy"] and calls == []
    with pytest.raises(ValueError, match="not for a blind run"):
        vqa.evaluate(model, processor, test, batch_size=4, encoded=encoded, blind=True)


def test_a_plan_with_the_same_decisions_is_measured_once_and_the_model_warmed_up_once(setup, tmp_path, monkeypatch):
    model, processor, test, _, analysis = setup
    grid = sweep.grid(model, step=3)
    twin = Plan.from_dict(grid["early_exit_2"][1].to_dict())  # same decisions, other evidence, another name
    twin.evidence = {"method": "found another way"}
    plans = {"empty": grid["empty"], "early_exit_2": grid["early_exit_2"], "exit@0.3": ("baseline", twin)}
    calls = []
    real = sweep.measure_plan

    def counted(*args, warmup=1, **kwargs):
        calls.append(warmup)
        return real(*args, warmup=warmup, **kwargs)

    monkeypatch.setattr(sweep, "measure_plan", counted)
    rows = {r["name"]: r for r in sweep.run(model, processor, test, tmp_path, plans, repeats=1)["plans"]}
    assert calls == [1, 0]  # empty (warms up), early_exit_2; the twin is not measured again
    assert rows["exit@0.3"]["same_as"] == "early_exit_2"
    saved = {n: json.loads((tmp_path / "plans" / f"{n}.json").read_text()) for n in ("exit@0.3", "early_exit_2")}
    assert saved["exit@0.3"]["predictions"] == saved["early_exit_2"]["predictions"]
    assert rows["exit@0.3"]["accuracy"] == rows["early_exit_2"]["accuracy"]
    assert rows["exit@0.3"]["family"] == "baseline"
    assert rows["exit@0.3"]["plan"]["evidence"]["method"] == "found another way"


def test_untimed_plans_are_scored_with_their_ideal_speedups_and_timed_when_asked_later(setup, tmp_path, monkeypatch):
    model, processor, test, _, _ = setup
    grid = sweep.grid(model, step=3)
    twin = Plan.from_dict(grid["layer_skip_3"][1].to_dict())
    plans = {"empty": grid["empty"], "layer_skip_3": grid["layer_skip_3"], "skip@0.2": ("baseline", twin)}
    first = {r["name"]: r for r in sweep.run(model, processor, test, tmp_path, plans, repeats=1,
                                             timed=lambda name: "@" in name)["plans"]}  # fmt: skip
    untimed, timed = first["layer_skip_3"], first["skip@0.2"]
    assert untimed["timed"] is False and all(untimed[k] is None for k in sweep.UNTIMED)
    assert untimed["speed_noisy"] == [] and first["empty"]["timed"] is True  # the control is always timed
    assert "same_as" not in timed and timed["timed"] is True and timed["prefill_speedup"] > 0  # not the untimed twin
    for k in ("flops_removed", "ideal_prefill_speedup", "ideal_decode_speedup", "kv_memory", "accuracy"):
        assert untimed[k] == pytest.approx(timed[k], rel=1e-9), k  # the same decisions: the same ideal and answers

    calls = []
    real = sweep.measure_plan
    monkeypatch.setattr(sweep, "measure_plan", lambda *a, **k: calls.append(k["timed"]) or real(*a, **k))
    again = {r["name"]: r for r in sweep.run(model, processor, test, tmp_path, plans, repeats=1)["plans"]}
    assert calls == [True]  # only the plan saved untimed is measured again, now timed
    assert again["layer_skip_3"]["timed"] is True and again["layer_skip_3"]["prefill_speedup"] > 0


def test_answers_replaying_the_untouched_prefill_equal_answers_computed_in_full(setup):
    from skipit.adapters import get_adapter
    from skipit.replay import Recorder

    model, processor, test, _, _ = setup
    grid = sweep.grid(model, step=1)
    enc = sweep.speed_batch(model, processor, test)
    batches = vqa.encode_batches(model, processor, test, batch_size=4)  # two batches of other lengths
    recorder = Recorder(model)
    sweep.measure_plan(model, processor, test, grid["empty"][1], enc, 4, 1, batches, timed=False, replay=recorder)
    assert all(len(calls) == 2 for calls in recorder.calls)  # every layer's prefill, per batch
    calls = [0] * len(get_adapter(model).layers)
    hooks = [layer.register_forward_hook(lambda *a, j=j: calls.__setitem__(j, calls[j] + 1))
             for j, layer in enumerate(get_adapter(model).layers)]  # fmt: skip
    try:
        for name, first in (("layer_skip_3", 3), ("early_exit_2", 3), ("vision_frozen_4", 4), ("late_entry_1", 0)):
            calls[:] = [0] * len(calls)
            fast = sweep.measure_plan(model, processor, test, grid[name][1], enc, 4, 1, batches, timed=False,
                                      replay=recorder)  # fmt: skip
            replayed, calls[:] = calls[:], [0] * len(calls)
            slow = sweep.measure_plan(model, processor, test, grid[name][1], enc, 4, 1, batches, timed=False)
            assert fast["predictions"] == slow["predictions"], name
            # the layers before the plan's first change ran for the decoding steps only, not for the prefill
            saved = [c - r for r, c in zip(replayed, calls, strict=True)]
            assert saved == [2] * first + [0] * (len(calls) - first), name
    finally:
        for hook in hooks:
            hook.remove()


def test_layer_contribution_equals_its_definition(setup):
    # ShortV's KL(full || vision frozen at j), recomputed here plan by plan from the pixels, every layer run
    model, processor, _, calib, _ = setup
    full = baselines.last_logprobs(model, processor, calib)
    empty = Plan.for_model(model)
    slow = [baselines.kl(full, baselines.last_logprobs(model, processor, calib,
                                                       empty.with_decisions(frozen_vision_layers=[j])))
            for j in range(empty.num_layers)]  # fmt: skip
    fast = baselines.layer_contribution(model, processor, calib)  # the same batches: the same padding
    assert fast == pytest.approx(slow, rel=1e-4, abs=1e-9) and max(slow) > 1e-5


def test_captions_under_each_compared_plan_with_paired_intervals_and_resume(setup, tmp_path, monkeypatch):
    from skipit.evaluation import caption

    model, processor, test, _, _ = setup
    # references: the untouched model's own captions (a random model scores 0 against the shapes captions), short
    # enough that they differ between images (CIDEr-D gives nothing for an n-gram that every image's references hold)
    firsts, tokens = [rec for rec, _ in caption.by_image(test)], 12
    own = caption.evaluate(model, processor, firsts, max_new_tokens=tokens)["predictions"]
    ref_of = {p["image"]: p["prediction"] for p in own}
    records = [dataclasses.replace(r, caption=ref_of[str(r.image)]) for r in test]
    empty = Plan.for_model(model)
    skip = empty.with_decisions(skip_layers=[3])
    compared = [{"method": "skipit", "budget": 0.1, "flops_removed": 0.0, "plan": empty.to_dict()},
                {"method": "random", "budget": 0.1, "flops_removed": 1 / 6, "plan": skip.to_dict()},
                {"method": "fastv", "budget": None, "flops_removed": 0.3, "plan": skip.to_dict()}]  # fmt: skip
    made = []
    evaluate = caption.evaluate
    monkeypatch.setattr(caption, "evaluate", lambda *a, **k: made.append(1) or evaluate(*a, **k))
    n = len(firsts) - 1
    result = sweep.caption_pareto(model, processor, records, tmp_path, compared, n, max_new_tokens=tokens)

    assert result["n_images"] == n and result["reference"]["cider"] > 0
    assert [(r["method"], r["budget"]) for r in result["rows"]] == [("skipit", 0.1), ("random", 0.1)]
    mine, other = result["rows"]
    assert mine["cider"] == result["reference"]["cider"] and mine["cider_kept"] == 1.0  # the empty plan's decisions
    assert len(made) == 2  # the untouched model and the skip plan: skipit's plan is the empty one, captioned once
    apply_plan(model, skip)  # the method's CIDEr-D is what captioning under its plan gives
    try:
        alone = evaluate(model, processor, records, max_new_tokens=tokens)
    finally:
        remove_plan(model)
    by_image = caption.by_image(records)[:n]
    cider, _ = caption.cider_d([p["prediction"] for p in alone["predictions"][:n]], [refs for _, refs in by_image])
    assert other["cider"] == pytest.approx(cider)
    assert other["cider_kept"] == pytest.approx(other["cider"] / result["reference"]["cider"])
    # FLOPs on the captioning prompts: skipping one of six equal layers removes a sixth of them, whatever the prompt
    assert other["flops_removed"] == pytest.approx(1 / 6, rel=0.02) and other["flops_removed_benchmark"] == 1 / 6
    assert mine["flops_removed"] == 0
    assert other["skipit_gain"]["value"] == pytest.approx(mine["cider"] - other["cider"])
    assert other["skipit_gain"]["low"] <= other["skipit_gain"]["value"] <= other["skipit_gain"]["high"]
    assert sorted(p.name for p in (tmp_path / "captions").glob("*.json")) == [
        "empty.json", "random@0.1.json", "skipit@0.1.json"]

    made.clear()  # a rerun reuses what it made; other images are another key, captioned again
    again = sweep.caption_pareto(model, processor, records, tmp_path, compared, n, max_new_tokens=tokens)
    assert again["rows"] == result["rows"] and made == []
    sweep.caption_pareto(model, processor, records, tmp_path, compared, n + 1, max_new_tokens=tokens)
    assert len(made) == 2



def _saved_split_and_analysis(model_dir, tmp_path):
    """Test and calibration folders of 4 records each, and an analysis of the model in tmp_path/run."""
    test = write_split(tmp_path / "shapes", "test", n=4).parent
    calib = write_split(tmp_path / "shapes", "calibration", n=4).parent
    model, processor = models.load(model_dir)
    analyze(model, processor, load_records(calib), batch_size=2,
            stats_config=StatsConfig(n_bootstrap=5, sketch_size=16)).save(tmp_path / "run")  # fmt: skip
    return test, calib


def test_sweep_with_captions_adds_them_to_sweep_json(tiny_llava_dir, tmp_path, monkeypatch):
    from skipit.composer import compose
    from skipit.evaluation import caption
    from skipit.evaluation.run import sweep_model

    test, calib = _saved_split_and_analysis(tiny_llava_dir, tmp_path)
    out = tmp_path / "sweep"
    summary = sweep_model(tiny_llava_dir, test, out, analysis=tmp_path / "run", calib=calib, step=6, budgets="0.2",
                          methods="random,shortgpt", n_calib=4, repeats=1, time_grid=False, captions=2)  # fmt: skip
    captions = json.loads((out / "sweep.json").read_text())["captions"]
    assert captions == json.loads(json.dumps(summary["captions"])) and captions["n_images"] == 2
    compared = [(b["method"], b["budget"]) for b in summary["baselines"] if b["budget"] is not None]
    assert [(r["method"], r["budget"]) for r in captions["rows"]] == compared and len(compared) == 3
    assert {p.stem for p in (out / "captions").glob("*.json")} == {"empty"} | {f"{m}@{b:g}" for m, b in compared}

    # a rerun searches for no composed plan and captions nothing again: both were saved under the same settings
    def fail(*args, **kwargs):
        raise AssertionError("searched or captioned again")

    monkeypatch.setattr(composer, "compose", fail)
    monkeypatch.setattr(caption, "evaluate", fail)
    again = sweep_model(tiny_llava_dir, test, out, analysis=tmp_path / "run", calib=calib, step=6, budgets="0.2",
                        methods="random,shortgpt", n_calib=4, repeats=1, time_grid=False, captions=2)  # fmt: skip
    assert again["captions"] == summary["captions"]
    assert [r["plan"] for r in again["baselines"]] == [r["plan"] for r in summary["baselines"]]
    monkeypatch.undo()
    searched = []  # other calibration records: skipit's plans are searched again
    monkeypatch.setattr(composer, "compose", lambda *a, **k: searched.append(1) or compose(*a, **k))
    sweep_model(tiny_llava_dir, test, out, analysis=tmp_path / "run", calib=calib, step=6, budgets="0.2",
                methods="random,shortgpt", n_calib=3, repeats=1, time_grid=False)  # fmt: skip
    assert len(searched) == 2  # skipit+composed and skipit@0.2


def test_a_sweep_stopped_while_it_scores_keeps_its_search(tiny_llava_dir, tmp_path, monkeypatch):
    from skipit.composer import compose
    from skipit.evaluation.run import sweep_model

    test, calib = _saved_split_and_analysis(tiny_llava_dir, tmp_path)
    out, args = tmp_path / "sweep", dict(analysis=tmp_path / "run", calib=calib, step=6, budgets="0.2",
                                         methods="random", n_calib=4, repeats=1, time_grid=False)  # fmt: skip

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "measure_plan", stop)  # stopped at the first plan scored, after the search
    with pytest.raises(KeyboardInterrupt):
        sweep_model(tiny_llava_dir, test, out, **args)
    assert not list((out / "plans").glob("*.json"))
    planned = json.loads((out / "planned.json").read_text())
    monkeypatch.undo()
    searched = []
    monkeypatch.setattr(composer, "compose", lambda *a, **k: searched.append(1) or compose(*a, **k))
    summary = sweep_model(tiny_llava_dir, test, out, **args)
    assert searched == []  # the saved composed plans were taken, not searched again
    rows = {r["name"]: r["plan"] for r in summary["plans"]}
    assert rows["skipit@0.2"] == planned["skipit@0.2"] and rows["skipit+composed"] == planned["skipit+composed"]
    assert (out / composer.MEASUREMENTS).is_file()  # and its KLs
    restarted = sweep_model(tiny_llava_dir, test, out, restart=True, **args)  # a restart searches again ...
    assert len(searched) == 2
    plan = next(r["plan"] for r in restarted["plans"] if r["name"] == "skipit@0.2")
    assert plan["evidence"]["search"]["plans_read_back"] == 0  # ... measuring every plan again


def test_a_composer_knows_its_own_plans(tiny_llava, setup):
    model, processor, _, calib, _ = setup
    mine = composer.Composer(model, processor, calib, shortlist=2)
    plan = mine.plan(budget=0.2)
    assert mine.made_here(plan, budget=0.2) and not mine.made_here(plan, budget=0.3)
    assert not mine.made_here(plan)  # the kappa plan
    assert not composer.Composer(model, processor, calib, shortlist=3).made_here(plan, budget=0.2)
    assert not composer.Composer(model, processor, calib, shortlist=2, tokens=2).made_here(plan, budget=0.2)
    assert not composer.Composer(model, processor, calib[::-1], shortlist=2).made_here(plan, budget=0.2)
    plan.evidence["search"]["version"] -= 1  # made by another version of the search
    assert not mine.made_here(plan, budget=0.2)


def test_the_largest_cut_keeping_99_percent_is_each_methods_largest_plan_that_does_kappa_plan_included():
    def row(method, budget, flops, kept, high=None):
        return {"method": method, "budget": budget, "flops_removed": flops, "accuracy_kept": kept,
                "accuracy_kept_ci": {"value": kept, "low": kept - 0.02, "high": high or kept + 0.02, "level": 0.95}}

    rows = [row("grid", None, 0.5, 1.0),  # a plan of the grid, not made for a budget: not a candidate
            row("skipit", 0.1, 0.104, 0.995), row("skipit", 0.2, 0.203, 0.99), row("skipit", 0.3, 0.301, 0.95),
            row("vtw", 0.1, 0.113, 0.985), row("vtw", 0.2, 0.206, 0.6, high=0.991)]  # fmt: skip
    cuts = {c["method"]: c for c in sweep.largest_cut_kept(rows)}
    assert set(cuts) == {"skipit", "vtw"}
    assert (cuts["skipit"]["plan"], cuts["skipit"]["budget"], cuts["skipit"]["flops_removed"]) == (
        "skipit@0.2", 0.2, 0.203)
    assert cuts["skipit"]["accuracy_kept_ci"]["low"] == pytest.approx(0.97)
    assert cuts["vtw"]["flops_removed"] is None and cuts["vtw"]["plan"] is None and cuts["vtw"]["level"] == 0.99
    # by the interval's upper end: vtw@0.1 (high 1.005) and vtw@0.2 (high 0.991) both reach 99 %; skipit@0.3 does not
    lenient = {c["method"]: c for c in sweep.largest_cut_kept(rows, by="interval")}
    assert lenient["vtw"]["plan"] == "vtw@0.2" and lenient["skipit"]["plan"] == "skipit@0.2"
    # skipit's --kappa plan (made for the largest cut within a KL) is skipit's when it cuts more and keeps 99 %
    kappa = row("skipit+composed", None, 0.25, 0.996)
    cuts = {c["method"]: c for c in sweep.largest_cut_kept([*rows, kappa])}
    assert (cuts["skipit"]["plan"], cuts["skipit"]["budget"], cuts["skipit"]["flops_removed"]) == (
        "skipit+composed", None, 0.25)
    assert {c["method"]: c["plan"] for c in sweep.largest_cut_kept([*rows, kappa | {"accuracy_kept": 0.98}])} == {
        "skipit": "skipit@0.2", "vtw": None}
    more = row("skipit+kappa=0.03", None, 0.27, 0.991)  # another KL limit's plan (benchmarks/budgets.py --kappas)
    assert sweep.largest_cut_kept([*rows, kappa, more])[0]["plan"] == "skipit+kappa=0.03"
    with pytest.raises(ValueError, match="unknown by 'mean'; available: point, interval"):
        sweep.largest_cut_kept(rows, by="mean")


