"""The planner on synthetic analyses whose plan is known, and end to end on a tiny model."""

from __future__ import annotations

import pytest
import torch

from skipit.analysis import Analysis, analyze
from skipit.data.jsonl import load_records
from skipit.data.shapes import write_split
from skipit.errors import SkipitError
from skipit.flops import Shape
from skipit.plan import Plan
from skipit.planner import Thresholds, is_safe, make_plan, predicted, predicted_damage
from skipit.result import AnalysisResult
from skipit.skipping import apply_plan, remove_plan
from skipit.stats import StatsConfig

SHAPE = dict(num_layers=8, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100)


def fake_analysis(*args, **kwargs) -> AnalysisResult:
    return AnalysisResult.from_dict(fake_json(*args, **kwargs))


def fake_json(rho_v, rho_t, var, tail_v=None, tail_t=None, n_vision=64, n_text=32) -> dict:
    """An analysis.json holding only what the planner reads, 10 records."""
    L = len(rho_v)

    def modality(rho, tail, n):
        return {
            "n_tokens": [10 * n] * L,
            "geometric": {"rho": {"mean": rho}, "angular": {"mean": rho},
                          "block_influence": {"mean": [2 * r for r in rho]}},
            "proximal": {"tail": {"0.05": tail if tail is not None else [0.0] * L}},
            "informational": {"score": rho},
            "cka": {"value": [1 - r for r in rho]},
        }  # fmt: skip

    return {
        "format": "skipit-analysis", "version": 1, "layers": list(range(L)),
        "model": {"class": "LlavaForConditionalGeneration", "num_layers": L, "fingerprint": "f" * 16,
                  "shape": dict(SHAPE, num_layers=L)},
        "data": {"n_records": 10},
        "measures": {
            "hidden": {"modalities": {"vision": modality(rho_v, tail_v, n_vision),
                                      "text": modality(rho_t, tail_t, n_text)}},
            "var": {"var": {"mean": var}},
            "functional": {"logit_lens": {"kl": {"mean": rho_t}}},
        },
    }  # fmt: skip


# layer:     0     1     2     3     4     5     6     7
RHO_V = [0.005, 0.01, 0.30, 0.01, 0.005, 0.20, 0.30, 0.40]
RHO_T = [0.300, 0.01, 0.30, 0.01, 0.300, 0.20, 0.30, 0.40]
VAR = [0.05, 0.05, 0.50, 0.30, 0.30, 0.05, 0.02, 0.01]


def test_default_plan_takes_the_widest_bands_that_meet_the_conditions():
    plan = make_plan(fake_analysis(RHO_V, RHO_T, VAR))
    # vision redundant and VAR low on layers 0, 1 -> late entry 2 (absent); VAR low on 5, 6, 7 -> exit after 4,
    # although vision tokens change a lot there: nothing reads them after the exit;
    # layers 1 and 3 redundant for both modalities -> skipped (3 also lies between k and m).
    assert (plan.late_entry, plan.late_entry_mode, plan.early_exit) == (2, "absent", 4)
    assert plan.skip_layers == (1, 3)
    assert plan.roles() == ["absent", "skip", "all", "skip", "all", "absent", "absent", "absent"]
    assert is_safe(fake_analysis(RHO_V, RHO_T, VAR), plan)
    ev = plan.evidence
    assert ev["thresholds"] == {"epsilon": 0.015, "delta": 0.05, "eta": 0.1, "tau": 0.1, "kappa": 0.02}
    assert set(ev["reasons"]) == {"epsilon", "delta_eta", "tau"}
    assert ev["roles"] == plan.roles() and 0 < ev["predicted"]["flops_removed"] < 1
    assert (plan.architecture, plan.num_layers, plan.fingerprint) == ("LlavaForConditionalGeneration", 8, "f" * 16)


def test_frozen_late_entry_where_text_still_reads_the_image():
    var = [0.5, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3]  # text reads vision everywhere: no absent band, no exit
    plan = make_plan(fake_analysis(RHO_V, RHO_T, var))
    assert (plan.late_entry, plan.late_entry_mode, plan.early_exit) == (2, "frozen", None)
    assert make_plan(fake_analysis(RHO_V, RHO_T, var), mode="absent").late_entry == 0


def test_tail_condition_and_user_thresholds():
    tail_v = [0.5] + [0.0] * 7  # half the vision tokens turn a lot at layer 0, though the mean is small
    plan = make_plan(fake_analysis(RHO_V, RHO_T, VAR, tail_v=tail_v))
    assert plan.late_entry == 0
    strict = make_plan(fake_analysis(RHO_V, RHO_T, VAR), Thresholds(epsilon=0.008))
    assert strict.skip_layers == () and strict.late_entry == 1 and strict.evidence["thresholds"]["epsilon"] == 0.008
    with pytest.raises(SkipitError, match="delta 0.02 was not measured"):
        make_plan(fake_analysis(RHO_V, RHO_T, VAR), Thresholds(delta=0.02))


def test_freeze_vision_adds_the_redundant_layers_between_k_and_m():
    rho_v = [0.3, 0.3, 0.005, 0.30, 0.01, 0.3, 0.3, 0.3]
    plan = make_plan(fake_analysis(rho_v, [0.3] * 8, [0.5] * 8), freeze_vision=True)
    assert plan.frozen_vision_layers == (2, 4) and plan.late_entry == 0 and plan.early_exit is None


def test_budget_removes_at_least_that_much_from_the_cheapest_layers():
    a = fake_analysis(RHO_V, RHO_T, VAR)
    for budget in (0.05, 0.2, 0.5):
        plan = make_plan(a, budget=budget)
        assert predicted(a, plan)["flops_removed"] >= budget
        smaller = make_plan(a, Thresholds().scaled(plan.evidence["threshold_scale"] * 0.999))
        assert predicted(a, smaller)["flops_removed"] < budget  # the smallest scale that meets the budget
    with pytest.raises(SkipitError, match="no plan removes 99% of the FLOPs"):
        make_plan(a, budget=0.99)
    with pytest.raises(SkipitError, match="budget is a fraction"):
        make_plan(a, budget=1.5)


def test_predicted_damage_sums_what_the_plan_removes():
    raw = fake_json(RHO_V, RHO_T, VAR)
    a = AnalysisResult.from_dict(raw)
    plan = make_plan(a)  # skip 1, 3; vision absent at 0 and 5..7
    d = predicted_damage(a, plan)
    skip = sum((64 * RHO_V[j] + 32 * RHO_T[j]) / 96 for j in (1, 3))
    assert d["geometric"] == pytest.approx(skip + RHO_V[0] + RHO_V[5] + RHO_V[6] + RHO_V[7])
    assert d["var"] == pytest.approx(VAR[0] + VAR[1] + VAR[3] + VAR[5] + VAR[6] + VAR[7])
    assert d["cka"] == pytest.approx(d["geometric"])  # cka was built as 1 - rho
    assert d["ablation_kl"] is None  # measured only with analyze --ablation
    raw["measures"]["functional"]["ablation"] = {m: {"kl": {"mean": [2 * r for r in rho]}}
                                                 for m, rho in (("vision", RHO_V), ("text", RHO_T))}  # fmt: skip
    a = AnalysisResult.from_dict(raw)
    assert predicted_damage(a, plan)["ablation_kl"] == pytest.approx(2 * d["geometric"])


def test_pruning_counts_the_share_of_vision_it_removes():
    a = fake_analysis(RHO_V, RHO_T, VAR)

    def pruned(after: int) -> Plan:
        return Plan("LlavaForConditionalGeneration", 8, "f" * 16, prune_vision_after=after, prune_vision_keep=0.25)

    d = predicted_damage(a, pruned(4))
    assert d["geometric"] == pytest.approx(0.75 * sum(RHO_V[5:]))
    assert d["var"] == pytest.approx(0.75 * sum(VAR[5:]))
    assert is_safe(a, pruned(4))  # text reads little of the image after layer 4 (VAR < tau): the exit condition
    assert not is_safe(a, pruned(1))  # ... but reads it at layers 2-4


def test_functional_freezing_takes_the_lowest_ablation_kl_under_kappa():
    raw = fake_json(RHO_V, RHO_T, VAR)
    with pytest.raises(SkipitError, match="analyze --ablation"):
        make_plan(AnalysisResult.from_dict(raw), functional=True)
    kl = [0.5, 0.004, 0.3, 0.001, 0.009, 0.002, 0.006, 0.0]
    raw["measures"]["functional"]["ablation"] = {"vision": {"kl": {"mean": kl}}}
    a = AnalysisResult.from_dict(raw)
    plan = make_plan(a, Thresholds(tau=0.01, kappa=0.01), functional=True)  # bands: the other conditions
    assert (plan.late_entry, plan.late_entry_mode, plan.early_exit, plan.skip_layers) == (2, "frozen", None, (1, 3))
    # in 2..7 without the skipped 3, by KL: 7 (0), 5 (.002), 6 (.006) -> sum .008; adding 4 (.009) reaches .017
    assert plan.frozen_vision_layers == (5, 6, 7)
    assert plan.evidence["functional"]["frozen_sum"] == pytest.approx(0.008)
    assert make_plan(a, Thresholds(tau=0.01), functional=True).frozen_vision_layers == (4, 5, 6, 7)  # kappa 0.02
    with pytest.raises(SkipitError, match="does not take a budget"):
        make_plan(a, budget=0.2, functional=True)


def test_text_only_model_gets_only_layer_skips():
    raw = fake_json(RHO_V, RHO_T, VAR)
    none = [None] * len(RHO_V)  # what analyze writes for a modality without tokens
    raw["measures"]["hidden"]["modalities"]["vision"] = {
        "n_tokens": [0] * len(RHO_V), "geometric": {"rho": {"mean": none}, "angular": {"mean": none}},
        "proximal": {"tail": {"0.05": none}}, "informational": {"score": none}, "cka": {"value": none},
    }  # fmt: skip
    raw["measures"]["var"] = None
    a = AnalysisResult.from_dict(raw)
    plan = make_plan(a)
    assert plan.skip_layers == (1, 3) and plan.late_entry == 0 and plan.early_exit is None
    assert predicted_damage(a, plan)["geometric"] == pytest.approx(RHO_T[1] + RHO_T[3])


def test_old_analysis_without_shape_is_a_clear_error():
    raw = fake_json(RHO_V, RHO_T, VAR)
    del raw["model"]["shape"]
    with pytest.raises(SkipitError, match="run skipit analyze again"):
        make_plan(AnalysisResult.from_dict(raw))


def test_make_plan_takes_the_typed_result_or_the_analysis_and_nothing_else():
    a = fake_analysis(RHO_V, RHO_T, VAR)
    assert make_plan(Analysis(a)) == make_plan(a)
    for other in (fake_json(RHO_V, RHO_T, VAR), "runs/a", None):
        with pytest.raises(SkipitError, match=r"^make_plan needs an analysis .*got (dict|str|NoneType)") as err:
            make_plan(other)
        assert "\n" not in str(err.value)


def test_plan_from_a_real_analysis_applies_to_its_model(tiny_llava, tmp_path):
    model, processor = tiny_llava
    records = load_records(write_split(tmp_path / "shapes", "calibration", n=4).parent)
    torch.manual_seed(0)
    analysis = analyze(model, processor, records, batch_size=2, stats_config=StatsConfig(n_bootstrap=5, sketch_size=16))
    assert analysis.result.model.shape == Shape.from_model(model).__dict__
    plan = make_plan(analysis.result, budget=0.3)
    assert predicted(analysis.result, plan)["flops_removed"] >= 0.3
    assert make_plan(analysis, budget=0.3) == plan  # the Analysis that analyze returns, as it is
    apply_plan(model, plan)  # bound to this model: check() passes
    try:
        inputs = processor(images=[records[0].load_image()], text=["<image> a"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        remove_plan(model)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_cli_plan_and_sweep(tiny_llava, tiny_llava_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, processor = tiny_llava
    calib = write_split(tmp_path / "shapes", "calibration", n=4)
    test = write_split(tmp_path / "shapes", "test", n=4)
    analysis = analyze(model, processor, load_records(calib), batch_size=2, run_dir=tmp_path / "run",
                       stats_config=StatsConfig(n_bootstrap=5, sketch_size=16))  # fmt: skip
    assert analysis is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    exe = str(Path(sys.executable).parent / "skipit")

    def cli(*args):
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)

    done = cli("plan", tmp_path / "run", "--budget", "0.3")
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["format"] == "skipit-plan" and plan["evidence"]["predicted"]["flops_removed"] >= 0.3
    bad = cli("plan", tmp_path / "run", "--mode", "sideways")
    assert bad.returncode == 2 and bad.stderr.startswith("error: late entry mode") and "Traceback" not in bad.stderr
    bad = cli("plan", tmp_path / "run", "--functional")
    assert bad.returncode == 2 and "run skipit analyze --ablation" in bad.stderr
    missing = cli("plan", tmp_path / "nowhere")
    assert missing.returncode == 2 and "no analysis at" in missing.stderr

    done = cli("sweep", tiny_llava_dir, "--data", test, "--out", tmp_path / "sweep", "--analysis", tmp_path / "run",
               "--n", 4, "--step", 3, "--budgets", "0.05", "--methods", "shortgpt,random", "--repeats", 1)  # fmt: skip
    assert done.returncode == 0, done.stderr
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {r["name"] for r in sweep["plans"]} >= {"empty", "skipit", "skipit@0.05", "shortgpt@0.05", "random@0.05"}
    assert "Spearman" in done.stdout
    bad = cli("sweep", tiny_llava_dir, "--data", test, "--out", tmp_path / "s2", "--analysis", tmp_path / "run",
              "--methods", "medusa")  # fmt: skip
    assert bad.returncode == 2 and "unknown baselines ['medusa']" in bad.stderr
