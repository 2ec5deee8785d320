"""Every command checks options and output paths before it loads a model; a sweep resumes only results measured
under the same key; Ctrl-C keeps what is saved and says how to resume (exit 130)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from skipit.data.shapes import write_split

NO_MODEL = "no-such-model"  # a check that passes with this model path ran before any model loaded


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`skipit ARGS` in-process through the real entry point: (exit code, stdout, stderr)."""
    from skipit.cli import main

    monkeypatch.setattr(sys, "argv", ["skipit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def assert_one_line_error(code, out, err, fragment):
    assert code == 2, err
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err


@pytest.fixture()
def files(tmp_path):
    """A folder, a plain file and a data file; nothing else."""
    from PIL import Image

    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "r1", "image": "a.png", "question": "q?", "answer": "x"}))
    (tmp_path / "plan.json").write_text("{}")
    return tmp_path


CASES = [  # (args with {t} for the tmp folder, message fragment)
    # output paths of the wrong kind
    (["eval", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/folder"], "--out {t}/folder is a folder"),
    (["eval", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/file.txt/r.json"], "{t}/file.txt is a file, not a"),
    (["bench", NO_MODEL, "--plan", "{t}/plan.json", "--image", "{t}/a.png", "--out", "{t}/folder"], "is a folder"),
    (["analyze", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/file.txt"], "--out {t}/file.txt is a file"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/file.txt"], "--out {t}/file.txt is a file"),
    (["demo", "--out", "{t}/file.txt"], "--out {t}/file.txt is a file"),
    (["plan", "{t}/nowhere", "--out", "{t}/folder"], "--out {t}/folder is a folder"),
    (["data", "shapes", "--out", "{t}/file.txt"], "--out {t}/file.txt is a file"),
    # option ranges
    (["eval", NO_MODEL, "--data", "{t}/data.jsonl", "--n", "0"], "--n must be at least 1, got 0"),
    (["eval", NO_MODEL, "--data", "{t}/data.jsonl", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["analyze", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    (["analyze", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--n", "0"], "--n must be at least 1"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--repeats", "0"],
     "--repeats must be at least 1, got 0"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--n", "0"], "--n must be at least 1"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--budgets", "0.2,1.5"],
     "budgets are fractions of the FLOPs between 0 and 1, got 1.5"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--methods", "medusa"],
     "unknown baselines ['medusa']; available: vtw, shortv"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--captions", "0"],
     "--captions must be at least 1, got 0"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--kl-tokens", "0"],
     "--kl-tokens must be at least 1, got 0"),
    (["plan", "{t}/nowhere", "--kl-tokens", "4"], "--kl-tokens goes with --composed"),
    (["plan", "{t}/nowhere", "--composed", "--budget", "0.2", "--kl-prompt", "poem"],
     "unknown --kl-prompt 'poem'; available: question, caption"),
    (["sweep", NO_MODEL, "--data", "{t}/data.jsonl", "--out", "{t}/run", "--captions", "2"],
     "--captions captions under the plans compared at matched FLOPs, which need --analysis"),
    (["bench", NO_MODEL, "--plan", "{t}/plan.json", "--image", "{t}/a.png", "--repeats", "0"],
     "--repeats must be at least 1"),
    (["bench", NO_MODEL, "--plan", "{t}/plan.json", "--image", "{t}/a.png", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    (["generate", NO_MODEL, "--image", "{t}/a.png", "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens must be at least 1, got 0"),
    (["generate", NO_MODEL, "--image", "{t}/a.png", "--prompt", "hi", "--sample", "--temperature", "-1"],
     "--temperature must be positive, got -1"),
    (["generate", NO_MODEL, "--image", "{t}/a.png", "--prompt", "<image> What is it?"],
     "--prompt contains the image placeholder '<image>'"),
    (["demo", "--out", "{t}/run", "--n-test", "0"], "--n-test must be at least 1"),
    (["data", "shapes", "--out", "{t}/shapes", "--split", "foo"], "unknown split 'foo'; available: train"),
    (["data", "shapes", "--out", "{t}/shapes", "--n", "0"], "--n must be at least 1"),
    (["plan", "{t}/nowhere", "--budget", "1.5"], "--budget is a fraction of the prefill FLOPs between 0 and 1"),
    (["train-mini-llava", "--out", "{t}/w.safetensors", "--init", "{t}/none.safetensors"],
     "--init {t}/none.safetensors: no such file"),
    (["train-mini-llava", "--out", "{t}/w.safetensors", "--align-positions", "row,diagonal"],
     "--align-positions 'row,diagonal': use a comma-separated subset of row, column"),
]


@pytest.mark.parametrize("args, fragment", CASES, ids=[" ".join(a[:1] + a[3:][-2:]) for a, _ in CASES])
def test_bad_options_and_paths_fail_before_any_work(files, monkeypatch, capsys, args, fragment):
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    code, out, err = cli(monkeypatch, capsys, *[a.format(t=files) for a in args])
    assert_one_line_error(code, out, err, fragment.format(t=files))
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nothing written


def test_unwritable_output_folder(files, monkeypatch, capsys):
    if os.geteuid() == 0:  # root writes anywhere a file system allows: /proc allows no new file
        target = Path("/proc/skipit-test/result.json")
        if not Path("/proc").is_dir():
            pytest.skip("no /proc here")
    else:
        (files / "ro").mkdir()
        (files / "ro").chmod(0o555)
        target = files / "ro" / "sub" / "result.json"
    code, out, err = cli(monkeypatch, capsys, "eval", NO_MODEL, "--data", files / "data.jsonl", "--out", target)
    assert_one_line_error(code, out, err, "cannot write in")
    assert not target.parent.exists()
    code, out, err = cli(monkeypatch, capsys, "analyze", NO_MODEL, "--data", files / "data.jsonl", "--out",
                         target.parent)  # fmt: skip
    assert_one_line_error(code, out, err, "cannot write in")


# ---------------------------------------------------------------- sweep: keyed results, --restart, --analysis


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return write_split(root, "test", n=3).parent, write_split(root, "calibration", n=3).parent


def _sweep_args(model, test, out, *extra):
    return ["sweep", model, "--data", test, "--out", out, "--n", 2, "--step", 6, "--repeats", 1, *extra]


def test_sweep_resumes_only_what_matches(tiny_llava_dir, shapes, tmp_path, monkeypatch, capsys):
    test, _ = shapes
    out = tmp_path / "sweep"
    code, _, err = cli(monkeypatch, capsys, *_sweep_args(tiny_llava_dir, test, out))
    assert code == 0, err
    saved = {p.name: p.read_text() for p in (out / "plans").glob("*.json")}
    assert set(saved) == {"empty.json", "vision_frozen_0.json", "layer_skip_0.json"}
    key = json.loads((out / "sweep.json").read_text())["key"]
    assert key["n"] == 2 and key["batch_size"] == 16 and key["repeats"] == 1 and len(key["fingerprint"]) == 16

    for extra, fragment in ((("--batch-size", 1), "with batch_size 16 (now 1)"), (("--n", 3), "on other records")):
        code, out_, err = cli(monkeypatch, capsys, *_sweep_args(tiny_llava_dir, test, out), *extra)
        assert_one_line_error(code, out_, err, fragment)
        assert "use a fresh --out, or pass --restart" in err
        assert {p.name: p.read_text() for p in (out / "plans").glob("*.json")} == saved  # untouched

    code, _, err = cli(monkeypatch, capsys, *_sweep_args(tiny_llava_dir, test, out), "--batch-size", 1, "--restart")
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["key"]["batch_size"] == 1
    assert all(json.loads(p.read_text())["key"]["batch_size"] == 1 for p in (out / "plans").glob("*.json"))


def test_sweep_refuses_an_analysis_of_another_model(tiny_llava_dir, shapes, make_run, tmp_path, monkeypatch, capsys):
    test, _ = shapes
    other = make_run("other", L=6, plan=False, sweep=False)  # fingerprint 0123456789abcdef
    out = tmp_path / "sweep"
    code, o, err = cli(monkeypatch, capsys, *_sweep_args(tiny_llava_dir, test, out, "--analysis", other))
    assert_one_line_error(code, o, err, "is an analysis of another model (fingerprint 0123456789abcdef")
    assert not out.exists()


def test_sweep_captions_need_records_with_a_caption(make_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    run = make_run("run", L=6, plan=False, sweep=False)
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "r1", "image": "a.png", "question": "q?", "answer": "x"}))
    code, o, err = cli(monkeypatch, capsys, "sweep", NO_MODEL, "--data", data, "--out", tmp_path / "out",
                       "--analysis", run, "--captions", 2)  # fmt: skip
    assert_one_line_error(code, o, err, '1 records have no "caption" to score (first: \'r1\')')
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Ctrl-C


def _interrupted(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return shlex.split(lines[0].split("; resume with: ", 1)[1])


def test_ctrl_c_in_sweep_keeps_finished_plans_and_resumes(tiny_llava_dir, shapes, tmp_path, monkeypatch, capsys):
    from skipit.evaluation import sweep

    test, _ = shapes
    out = tmp_path / "sweep"
    real, calls, interrupt_at = sweep.measure_plan, [], [2]

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) in interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "measure_plan", measure_then_interrupt)
    code, _, err = cli(monkeypatch, capsys, *_sweep_args(tiny_llava_dir, test, out, "--restart"))
    assert code == 130
    assert f"interrupted: 1 measured plans are saved in {out / 'plans'}" in err
    resume = _interrupted(err)
    assert resume == ["skipit", *map(str, _sweep_args(tiny_llava_dir, test, out))]  # without --restart
    assert [p.name for p in (out / "plans").glob("*.json")] == ["empty.json"] and not (out / "sweep.json").exists()

    calls.clear()
    interrupt_at.clear()
    code, _, err = cli(monkeypatch, capsys, *resume[1:])
    assert code == 0, err
    assert len(calls) == 2  # the two plans left, not the finished one
    assert len(json.loads((out / "sweep.json").read_text())["plans"]) == 3


def test_ctrl_c_in_analyze_keeps_shards_and_resumes(tiny_llava_dir, shapes, tmp_path, monkeypatch, capsys):
    from skipit import analysis

    _, calib = shapes
    out = tmp_path / "run"
    real, calls = analysis.batch_inputs, []

    def inputs_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "batch_inputs", inputs_then_interrupt)
    args = ["analyze", tiny_llava_dir, "--data", calib, "--out", out, "--batch-size", 1, "--shard-every", 1]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 130
    assert f"interrupted: the statistics of 2 records are saved in {out / 'shards'}" in err
    assert _interrupted(err) == ["skipit", *map(str, args)]
    assert not (out / "analysis.json").exists()

    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert len(calls) == 3 + 1  # resumed after the two saved records: one batch left
    assert (out / "analysis.json").is_file()


def test_ctrl_c_in_eval_writes_nothing(tiny_llava_dir, shapes, tmp_path, monkeypatch, capsys):
    from skipit.evaluation import vqa

    test, _ = shapes

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vqa, "evaluate", interrupt)
    out = tmp_path / "r.json"
    code, _, err = cli(monkeypatch, capsys, "eval", tiny_llava_dir, "--data", test, "--no-speed", "--out", out)
    assert code == 130 and "interrupted: nothing was saved" in err
    assert _interrupted(err) == ["skipit", "eval", str(tiny_llava_dir), "--data", str(test), "--no-speed", "--out",
                                 str(out)]  # fmt: skip
    assert not out.exists()
