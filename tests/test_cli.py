"""User errors: one line on stderr, exit code 2, no traceback, no partial result file."""

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-c", "from skipit.cli import main; main()"]


def run(*args, cwd=None):
    env = {**os.environ, "SKIPIT_CACHE": str(cwd or "."), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


@pytest.fixture()
def data(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "r1", "image": "a.png", "question": "q?", "answer": "x"}))
    return tmp_path


def test_unknown_model_path(tmp_path, data):
    out = tmp_path / "result.json"
    proc = run("eval", str(tmp_path / "nope"), "--data", str(data), "--out", str(out), cwd=tmp_path)
    assert_one_line_error(proc, "does not exist")
    assert not out.exists()


def test_unsupported_model_type(tmp_path, data):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    proc = run("eval", str(tmp_path / "m"), "--data", str(data), cwd=tmp_path)
    assert_one_line_error(proc, "model type 'bert' is not supported; supported families:")


def test_unreadable_data(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "r1", "image": "gone.png", "question": "q"}\n')
    proc = run("eval", "whatever", "--data", str(tmp_path / "bad.jsonl"), cwd=tmp_path)
    assert_one_line_error(proc, "record 'r1': image file")


def test_missing_data(tmp_path):
    proc = run("eval", "whatever", "--data", str(tmp_path / "none"), cwd=tmp_path)
    assert_one_line_error(proc, "no data at")


def test_unscored_records(tmp_path, tiny_llava):
    from PIL import Image

    model, processor = tiny_llava
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "r1", "image": "a.png", "question": "q?"}))
    proc = run("eval", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), cwd=tmp_path)
    assert_one_line_error(proc, "have no \"answer\" to score")
