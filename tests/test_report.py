"""`skipit report RUN_DIR`: one self-contained HTML page from synthetic analysis / plan / sweep files."""

import json
import re

import pytest
from typer.testing import CliRunner

from skipit import report as rep
from skipit.cli import app
from skipit.errors import SkipitError
from skipit.plan import Plan

SECTIONS = ("measures", "var", "plan", "degradation", "speed", "baselines")


def section(page: str, key: str) -> str:
    """The HTML of one <section id=key>."""
    match = re.search(rf'<section id="{key}">(.*?)</section>', page, flags=re.S)
    assert match, f"no section {key}"
    return match.group(1)


def charts(page: str) -> int:
    return page.count('<figure class="chart">')


def expected_count(page: str) -> int:
    return int(re.search(r'data-expected="(\d+)"', page).group(1))


def test_full_report_is_one_self_contained_page(make_run):
    run = make_run()
    path = rep.write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing to fetch: no external src/href (or protocol-relative), no <img>/<link>/@import, no url() to the network
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", page, flags=re.I)
    assert not re.search(r"<(?:img|link|iframe|object|embed)\b|<script[^>]*\bsrc=|@import|url\(\s*['\"]?(?:https?:)?//",
                         page, flags=re.I)  # fmt: skip
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', "")  # only the SVG namespaces, which are names, not fetches
    for key in SECTIONS:
        assert 'class="note"' not in section(page, key), key  # every input is there: no section degrades
    # 5 per-layer measures, VAR, the scatter
    assert charts(page) == expected_count(page) == 8  # + accuracy kept against FLOPs removed
    assert page.count("<svg") == 8
    measures = section(page, "measures")
    assert charts(measures) == 5
    for title in ("Geometric", "P(rho &gt; 0.05)", "Informational", "CKA", "Logit lens"):
        assert title in measures or title.replace("&gt;", ">") in measures, title
    for band in ("late entry (vision absent)", "early exit (vision gone)", "skipped (all tokens)",
                 "frozen vision layer"):  # fmt: skip
        assert band in measures, band
    assert charts(section(page, "var")) == 1 and "normalised" in section(page, "var")
    plan = section(page, "plan")
    assert "k = 2: vision tokens absent in layers 0–1" in plan
    assert "m = 5" in plan and "gone from layers 6–7" in plan
    assert "epsilon" in plan and "23.7%" in plan and "1.31×" in plan  # thresholds and predicted saving
    assert "vision absent (late entry)" in plan  # per-layer costs
    degradation = section(page, "degradation")
    assert charts(degradation) == 1 and "Spearman" in degradation and "late_entry-3" in degradation
    assert "within each family" in degradation and "more than 2 points" in degradation
    speed = section(page, "speed")
    assert speed.count("<tr>") == 1 + 9  # header + one row per plan
    assert "k=2 (absent), m=5, skip 4" in speed and "lost accuracy" in speed
    assert "Reference (no plan): accuracy 0.800, prefill 12.3 ms, decode 45.6 tokens/s." in speed
    baselines = section(page, "baselines")
    assert baselines.count("<tr>") == 1 + 4 and "ShortGPT" in baselines and "FastV" in baselines
    assert re.search(r'<p id="render-check"[^>]*data-rendered=""', page)  # filled in by the browser


def test_element_ids_are_unique_and_the_page_is_reproducible(make_run):
    run = make_run(ablation=True)
    first = rep.write_report(run).read_bytes()
    page = first.decode()
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "SVG ids clash between charts"
    targets = re.findall(r'href="#([^"]+)"', page) + re.findall(r"url\(#([^)]+)\)", page)
    assert targets and set(targets) <= set(ids)  # every internal reference resolves
    assert charts(page) == expected_count(page) == 10  # + ablation KL and the Lipschitz bound
    assert rep.write_report(run).read_bytes() == first  # no dates, no random ids


def test_no_sweep_degrades_to_notes(make_run):
    page = rep.write_report(make_run(sweep=False)).read_text()
    for key in ("degradation", "speed", "baselines"):
        body = section(page, key)
        assert "No sweep.json" in body and "<table" not in body and "<svg" not in body, key
    assert charts(page) == expected_count(page) == 6
    assert "sweep data" not in page


def test_no_plan_degrades_to_notes(make_run):
    page = rep.write_report(make_run(plan=False)).read_text()
    assert "No plan.json" in section(page, "measures") and "No plan.json" in section(page, "plan")
    assert "late entry (vision" not in page
    assert charts(page) == 8


def test_only_an_analysis(make_run):
    page = rep.write_report(make_run(plan=False, sweep=False)).read_text()
    assert charts(page) == expected_count(page) == 6
    assert page.count('class="note"') == 5  # measures (no bands), plan, degradation, speed, baselines


def test_unreadable_plan_and_sweep_are_notes(make_run):
    run = make_run()
    (run / "plan.json").write_text('{"format": "skipit-plan", "version": 1, "bogus": 1}')
    (run / "sweep.json").write_text("{not json")
    page = rep.write_report(run).read_text()
    assert "plan.json could not be read" in section(page, "plan")
    assert "sweep.json could not be read" in section(page, "speed") and "not valid JSON" in section(page, "speed")


def test_text_only_analysis_and_sparse_sweep(make_run):
    run = make_run(vision=False, plan={"skip_layers": [3, 4]}, baselines=False)
    sweep = json.loads((run / "sweep.json").read_text())
    sweep["plans"][1]["predicted"] = None  # a plan without predictions, one without accuracy: skipped, not fatal
    sweep["plans"][2]["accuracy_drop"] = None
    del sweep["plans"][3]["safe"], sweep["correlation"]["cka"]
    (run / "sweep.json").write_text(json.dumps(sweep))
    page = rep.write_report(run).read_text()
    assert "No VAR" in section(page, "var")
    assert "skipped (all tokens)" in section(page, "measures")
    assert "no baselines" in section(page, "baselines")
    assert charts(page) == expected_count(page) == 6  # 5 measures + scatter
    assert "–" in section(page, "speed")


def test_sweep_of_another_shape_is_a_note(make_run):
    run = make_run()
    sweep = json.loads((run / "sweep.json").read_text())
    sweep["plans"][0]["predicted"] = [0.1, 0.2]  # not a dict
    sweep["baselines"][0]["budget"] = {"odd": 1}  # shown as "–", not fatal
    (run / "sweep.json").write_text(json.dumps(sweep))
    page = rep.write_report(run).read_text()
    assert "sweep.json does not have the expected shape" in section(page, "degradation")
    assert "<table" in section(page, "speed") and "<table" in section(page, "baselines")
    assert charts(page) == expected_count(page) == 7


def test_sweep_as_evaluation_sweep_writes_it(make_run):
    """Reference without timings, data without a path, NaN correlations, a baseline without a budget."""
    run = make_run()
    sweep = json.loads((run / "sweep.json").read_text())
    sweep["reference"] = {"accuracy": 0.8, "per_type": {"color": 0.5}}
    sweep["data"] = {"n": 100}
    sweep["model"] = {"fingerprint": "0123456789abcdef", "class": "LlavaForConditionalGeneration"}
    sweep["correlation"]["geometric"] = {"spearman": float("nan"), "ci_low": None, "ci_high": None, "n": 9}
    sweep["baselines"][0]["budget"] = None
    (run / "sweep.json").write_text(json.dumps(sweep))  # NaN as Python's json writes it
    page = rep.write_report(run).read_text()
    assert "Reference (no plan): accuracy 0.800." in section(page, "speed")
    assert "100 records" in page
    assert charts(page) == expected_count(page) == 8
    assert 'class="note"' not in section(page, "degradation") + section(page, "baselines")


def test_plan_for_another_model_is_said(make_run):
    run = make_run()
    plan = json.loads((run / "plan.json").read_text())
    plan.update(num_layers=12, fingerprint="ffffffffffffffff")
    (run / "plan.json").write_text(json.dumps(plan))
    page = rep.write_report(run).read_text()
    assert "is for 12 layers, the analysis has 8: bands not shown" in section(page, "measures")
    assert "made for other weights" in section(page, "plan")


def test_plan_bands_follow_roles():
    plan = Plan("X", 10, "f", late_entry=3, late_entry_mode="frozen", early_exit=7, skip_layers=[5, 9],
                frozen_vision_layers=[4])  # fmt: skip
    assert plan.roles() == ["frozen"] * 3 + ["all", "frozen", "skip", "all", "all", "absent", "skip"]
    assert rep.plan_bands(plan, 10) == {
        "late entry (vision frozen)": [(0, 2)], "frozen vision layer": [(4, 4)],
        "skipped (all tokens)": [(5, 5), (9, 9)], "early exit (vision gone)": [(8, 8)],
    }  # fmt: skip
    assert rep.plan_bands(Plan("X", 10, "f"), 10) == {}
    assert rep.plan_bands(plan, 12) == {}  # a plan for another layer count shades nothing
    assert rep.describe_plan(plan.to_dict()) == "k=3 (frozen), m=7, skip 5, 9, frozen 4"
    assert rep.describe_plan(Plan("X", 10, "f").to_dict()) == "no change"
    pruned = Plan("X", 10, "f", prune_vision_after=1, prune_vision_keep=0.25, early_exit=6)
    bands = rep.plan_bands(pruned, 10)
    assert bands == {"vision pruned (a share kept)": [(2, 6)], "early exit (vision gone)": [(7, 9)]}
    assert set(bands) <= set(rep.BANDS)  # every band has a colour: the report draws it
    assert rep.describe_plan(pruned.to_dict()) == "m=6, vision pruned to 25% after 1 (attention)"
    diverse = Plan("X", 10, "f", prune_vision_after=-1, prune_vision_keep=0.5, prune_vision_rank="divprune")
    assert rep.describe_plan(diverse.to_dict()) == "vision pruned to 50% before layer 0 (divprune)"
    assert rep.plan_bands(diverse, 10) == {"vision pruned (a share kept)": [(0, 9)]}
    two = Plan("X", 10, "f", input_vision_keep=0.5, prune_vision_after=3, prune_vision_keep=0.1, early_exit=8)
    assert rep.describe_plan(two.to_dict()) == (
        "m=8, vision reduced to 50% before layer 0 (divprune), vision pruned to 10% after 3 (attention)"
    )
    assert rep.plan_bands(two, 10) == {"vision reduced before layer 0": [(0, 3)],
                                       "vision pruned (a share kept)": [(4, 8)], "early exit (vision gone)": [(9, 9)]}


def test_missing_analysis_is_a_one_line_error(make_run, tmp_path):
    run = make_run(analysis=False)
    with pytest.raises(SkipitError, match=r"^no analysis.json in .*: run skipit analyze first$") as err:
        rep.write_report(run)
    assert "\n" not in str(err.value)
    assert not (run / "report.html").exists()
    with pytest.raises(SkipitError, match="does not exist"):
        rep.write_report(tmp_path / "nowhere")
    (run / "analysis.json").write_text("{oops")
    with pytest.raises(SkipitError, match=r"analysis.json is not valid JSON") as err:
        rep.write_report(run)
    assert "\n" not in str(err.value)
    (run / "analysis.json").write_text('{"format": "skipit-plan"}')
    with pytest.raises(SkipitError, match="not a skipit analysis"):
        rep.write_report(run)


def test_write_is_atomic(make_run, monkeypatch):
    run = make_run()
    rep.write_report(run)
    before = (run / "report.html").read_bytes()
    assert sorted(p.name for p in run.iterdir()) == ["analysis.json", "plan.json", "report.html", "sweep.json"]
    assert (run / "report.html").stat().st_mode & 0o777 == 0o644

    def fail(*args):
        raise OSError("disk full")

    import skipit.io

    monkeypatch.setattr(skipit.io.os, "replace", fail)  # the report is written through skipit.io.write_text
    (run / "sweep.json").unlink()
    with pytest.raises(OSError, match="disk full"):
        rep.write_report(run)
    assert sorted(p.name for p in run.iterdir()) == ["analysis.json", "plan.json", "report.html"]  # no temp file
    assert (run / "report.html").read_bytes() == before  # the old report is untouched


def test_cli_command(make_run):
    run = make_run(sweep=False)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output and "No sweep.json" in result.output
    assert (run / "report.html").is_file()
    result = CliRunner().invoke(app, ["report", str(make_run("empty", analysis=False))])
    assert isinstance(result.exception, SkipitError)  # skipit.cli.main prints it as one `error:` line


def test_intervals_noisy_speeds_and_significance_are_shown(make_run):
    run = make_run()
    data = json.loads((run / "sweep.json").read_text())
    plan = data["plans"][1]
    plan["accuracy_ci"] = {"value": plan["accuracy"], "low": 0.512, "high": 0.734, "level": 0.95}
    plan["speed_noisy"] = ["decode x17.54 beats its ideal x1.03"]
    data["plans"][2] |= {"timed": False, "prefill_speedup": None, "decode_speedup": None}  # scored, not timed
    data["baselines"][0]["accuracy_kept_ci"] = {"value": 0.9, "low": 0.871, "high": 0.936, "level": 0.95}
    data["skipit_vs_baselines"] = [{"budget": 0.1, "baseline": "fastv", "mcnemar_p": 0.0123, "skipit_better": 9,
                                    "skipit_worse": 2, "skipit_gain_points": {"value": 3.5, "low": 0.5, "high": 6.5}}]
    data["safe_but_lost_significant"] = []
    (run / "sweep.json").write_text(json.dumps(data))
    page = rep.write_report(run).read_text()
    speed = section(page, "speed")
    assert "[0.512, 0.734]" in speed and 'title="decode x17.54 beats its ideal x1.03">noisy' in speed
    assert "17.54×" not in speed  # a noisy figure is never printed as a result
    assert speed.count("not timed") == 2  # its prefill and decode cells
    base = section(page, "baselines")
    assert "[0.871, 0.936]" in base and "+3.5" in base and "[+0.5, +6.5]" in base and "0.012" in base
    if data.get("safe_but_lost"):
        assert "every such loss may be chance" in section(page, "degradation")


def test_captions_under_the_compared_plans_get_their_own_chart_and_table(make_run):
    run = make_run()
    before = charts(rep.write_report(run).read_text())
    data = json.loads((run / "sweep.json").read_text())
    ci = {"value": 0.8, "low": 0.7, "high": 0.9, "level": 0.95}
    data["captions"] = {"n_images": 40, "max_new_tokens": 64, "reference": {"cider": 7.597, "cider_ci": {
        "value": 7.597, "low": 6.867, "high": 8.288, "level": 0.95}}, "rows": [
        {"method": "skipit", "budget": 0.2, "flops_removed": 0.203, "cider": 6.088, "cider_ci": ci,
         "cider_kept": 0.801, "cider_kept_ci": ci},
        {"method": "divprune", "budget": 0.2, "flops_removed": 0.203, "cider": 6.858, "cider_ci": ci,
         "cider_kept": 0.903, "cider_kept_ci": ci,
         "skipit_gain": {"value": -0.77, "low": -1.424, "high": -0.146, "level": 0.95}}]}  # fmt: skip
    (run / "sweep.json").write_text(json.dumps(data))
    page = rep.write_report(run).read_text()
    base = section(page, "baselines")
    assert charts(page) == before + 1 and "CIDEr-D kept (%)" in base
    assert "Greedy captions of 40 images" in base and "7.597" in base and "[6.867, 8.288]" in base
    assert "-0.770" in base and "[-1.424, -0.146]" in base and "divprune" in base


def test_the_largest_cut_keeping_99_percent_is_a_table(make_run):
    run = make_run()
    data = json.loads((run / "sweep.json").read_text())
    data["largest_cut_kept"] = [
        {"method": "skipit", "level": 0.99, "plan": "skipit@0.15", "budget": 0.15, "flops_removed": 0.152,
         "accuracy_kept": 0.995, "accuracy_kept_ci": {"value": 0.995, "low": 0.978, "high": 1.011, "level": 0.95}},
        {"method": "vtw", "level": 0.99, "plan": None, "budget": None, "flops_removed": None, "accuracy_kept": None,
         "accuracy_kept_ci": None}]  # fmt: skip
    data["largest_cut_not_below"] = [{"method": "skipit", "flops_removed": 0.303}, {"method": "vtw"}]
    (run / "sweep.json").write_text(json.dumps(data))
    base = section(rep.write_report(run).read_text(), "baselines")
    assert "The largest cut that keeps 99.0% of the accuracy" in base
    assert "15.2%" in base and "[0.978, 1.011]" in base and "<td>vtw</td>" in base
    assert "skipit@0.15" in base and "30.3%" in base and "interval reaching it" in base
