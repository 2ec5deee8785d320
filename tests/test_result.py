"""skipit.result: analysis.json as a typed object — files written before it load, it writes them back unchanged, a
malformed or foreign file is a one-line error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skipit.errors import SkipitError
from skipit.flops import Shape
from skipit.result import FORMAT, VERSION, AnalysisResult, Series, as_result, load

# Written by `skipit.analyze` before skipit.result existed (tiny LLaVA, 4 records, --ablation), stored compact.
OLD = Path(__file__).parent / "data" / "analysis_v1.json"


@pytest.fixture
def old() -> dict:
    return json.loads(OLD.read_text())


def test_a_file_written_before_the_typed_result_loads(tmp_path):
    a = load(OLD)
    assert (FORMAT, VERSION) == ("skipit-analysis", 1)
    assert a.num_layers == 6 and a.layers == list(range(6))
    assert (a.model.class_name, a.model.family, a.model.num_layers, a.model.hidden_size) == (
        "LlavaForConditionalGeneration", "LLaVA", 6, 48)  # fmt: skip
    assert a.fingerprint == a.model.fingerprint == "3660e3da5af7bd9a"
    assert a.shape == Shape(num_layers=6, hidden=48, heads=4, kv_heads=2, head_dim=12, intermediate=96, vocab=57)
    assert (a.data.path, a.data.n_records) == ("/data/calibration", 4) and a.data.records_digest
    assert a.settings["batch_size"] == 2 and a.settings["ablation"] and a.seed == 0
    assert a.ci_level == 0.95 and a.measure_config["ci_level"] == 0.95
    assert a.modalities == a.all_modalities == ("vision", "text")
    assert a.n_tokens("vision") == 4 * 4  # 4 vision tokens per image
    for m in a.modalities:
        for name in ("rho", "angular", "block_influence", "informational"):
            s = a.measure(name, m)
            assert isinstance(s, Series) and len(s.mean) == len(s.ci_low) == len(s.ci_high) == 6, (name, m)
        assert a.measure("cka", m).ci_low is None and len(a.measure("cka", m).mean) == 6
        assert a.measure("block_influence", m).mean == pytest.approx([2 * r for r in a.measure("rho", m).mean])
        assert len(a.tail(m, 0.05)) == 6 and a.tail(m, 0.123) is None
    assert 0.05 in a.tail_deltas
    assert len(a.var.share.mean) == len(a.var.normalised.ci_high) == len(a.var.expected_share) == 6
    assert a.logit_lens().mean == a.logit_lens("kl").mean and len(a.logit_lens("tv").ci_low) == 6
    assert a.ablated_modalities == ("vision", "text") and set(a.ablation_kl) == {"vision", "text"}
    assert a.ablation_kl["vision"] == a.ablation("vision", "kl").mean and len(a.ablation("text", "tv").mean) == 6
    assert len(a.lipschitz_bound("vision")) == 6 and a.lipschitz_bound("vision", "q0.42") is None
    with pytest.raises(SkipitError, match="unknown measure 'loudness'"):
        a.measure("loudness", "text")
    with pytest.raises(SkipitError, match="no 'audio' modality"):
        a.measure("rho", "audio")
    (tmp_path / "analysis.json").write_text(OLD.read_text())
    assert load(tmp_path) == a  # a run folder reads its analysis.json


def test_round_trip_writes_the_file_back_unchanged(old, tmp_path):
    a = AnalysisResult.from_dict(old)
    assert json.dumps(a.to_dict()) == json.dumps(old)  # the same keys, in the same order
    path = a.save(tmp_path / "analysis.json")
    assert json.dumps(json.loads(path.read_text())) == json.dumps(old)
    assert load(path) == a and AnalysisResult.from_dict(a.to_dict()) == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis.json"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644
    assert a.save(tmp_path) == path  # a folder gets RUN_DIR/analysis.json


def test_unknown_fields_are_kept(old, tmp_path):
    old["notes"] = {"by": "a later skipit"}
    old["model"]["revision"] = "abc"
    old["data"]["split"] = "calibration"
    a = AnalysisResult.from_dict(old)
    assert (a.extra, a.model.extra, a.data.extra) == ({"notes": {"by": "a later skipit"}}, {"revision": "abc"},
                                                      {"split": "calibration"})  # fmt: skip
    assert load(a.save(tmp_path / "a.json")).to_dict() == old


def test_text_only_and_partial_analyses(old):
    old["measures"]["hidden"]["modalities"]["vision"]["n_tokens"] = [0] * 6
    old["measures"]["var"] = None
    del old["measures"]["functional"]["ablation"], old["model"]["shape"], old["settings"]
    a = AnalysisResult.from_dict(old)
    assert a.modalities == ("text",) and a.all_modalities == ("vision", "text")
    assert a.var is None and a.ablation_kl == {} and a.ablated_modalities == () and a.ablation("text") is None
    assert a.ci_level is None and a.tail_deltas == (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    with pytest.raises(SkipitError, match="no model shape"):
        print(a.shape)


def test_as_result_takes_the_result_or_an_analysis(old):
    from skipit.analysis import Analysis

    a = AnalysisResult.from_dict(old)
    assert as_result(a) is a and as_result(Analysis(a)) is a
    with pytest.raises(SkipitError, match=r"^shortgpt needs an analysis .*got dict: read analysis.json with"):
        as_result(old, "shortgpt")


def _at(path: str, edit):
    """A change of the JSON object at a dotted path: edit(parent, last key)."""

    def change(root):
        *parents, last = path.split(".")
        d = root
        for key in parents:
            d = d[key]
        edit(d, last)
        return root

    return change


def _set(path: str, value):
    return _at(path, lambda d, key: d.__setitem__(key, value))


def _delete(path: str):
    return _at(path, lambda d, key: d.pop(key))


@pytest.mark.parametrize(("change", "message"), [
    (_set("format", "skipit-plan"), r'is not a skipit analysis \(expected "format": "skipit-analysis"\)'),
    (lambda d: [d], "is not a skipit analysis"),
    (_set("version", 2), r"analysis format version 2 is not supported \(this skipit reads 1\)"),
    (_set("version", True), "analysis format version True is not supported"),
    (_delete("version"), "analysis format version None is not supported"),
    (_delete("layers"), 'malformed: "layers" must be a list of layer indices, got None'),
    (_set("layers", [0, 1, "2"]), '"layers" must be a list of layer indices'),
    (_set("measures", []), '"measures" must be an object'),
    (_delete("measures.hidden"), '"measures.hidden.modalities" must be an object'),
    (_set("measures.hidden.modalities.text.n_tokens", [3, 3]), r"text.n_tokens\" must hold one token count per "
                                                               r"layer \(6\), got \[3, 3\]"),
    (_set("measures.var", [0.1]), '"measures.var" must be null or an object with "var"'),
    (_set("measures.functional", "none"), '"measures.functional" must be an object'),
    (_set("model", "tiny"), '"model" must be an object'),
    (_set("model.num_layers", "6"), "\"model.num_layers\" must be an integer, got '6'"),
    (_set("model.shape", {"heads": 4.5}), '"model.shape" must be an object of integers'),
    (_set("data.n_records", 4.0), '"data.n_records" must be an integer, got 4.0'),
    (_set("settings", "fast"), '"settings" must be an object'),
    (_set("created", 20260101), '"created" must be a string'),
])  # fmt: skip
def test_a_malformed_file_is_a_one_line_error_naming_it(old, tmp_path, change, message):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(change(old), indent=2))
    with pytest.raises(SkipitError, match=message) as err:
        load(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"{oops", r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1\)"),
    (b"\xff\xfe\x00garbage\x80", "is not valid JSON"),
    (b"", "is not valid JSON"),
])  # fmt: skip
def test_an_unreadable_file_is_a_one_line_error_naming_it(tmp_path, content, message):
    path = tmp_path / "analysis.json"
    path.write_bytes(content)
    with pytest.raises(SkipitError, match=message) as err:
        load(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(SkipitError, match=r"^no analysis at .*nowhere/analysis.json$"):
        load(tmp_path / "nowhere" / "analysis.json")
