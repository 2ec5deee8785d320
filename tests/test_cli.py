"""User errors: one line on stderr, exit code 2, no traceback, no partial result file."""

import json
import os
import subprocess
import sys

import pytest
from conftest import invoke

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


def test_unscored_records(tmp_path, tiny_llava_dir):
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "r1", "image": "a.png", "question": "q?"}))
    proc = run("eval", str(tiny_llava_dir), "--data", str(tmp_path / "d.jsonl"), cwd=tmp_path)
    assert_one_line_error(proc, "have no \"answer\" to score")


# ---------------------------------------------------------------- `skipit eval` on the tiny random LLaVA


@pytest.fixture(scope="module")
def tiny_saved(tiny_llava, tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA on disk, data with answers and captions, an empty plan and a plan for other weights."""
    from PIL import Image

    from skipit.data import shapes
    from skipit.plan import Plan

    root = tmp_path_factory.mktemp("eval")
    model, processor = tiny_llava
    (root / "m").symlink_to(tiny_llava_dir)  # the shared checkpoint, read only
    rows = []
    for i, (color, kind) in enumerate([("red", "color"), ("blue", "color"), ("green", "count"), ("red", "count")]):
        Image.new("RGB", (28, 28), shapes.COLORS[color]).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "question": "What color is the shape?", "answer": color,
                     "caption": f"A large {color} circle.", "type": kind})  # fmt: skip
    rows[0]["answers"] = ["red", "red", "blue"]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    Plan.for_model(model).save(root / "empty.json")
    other = Plan.for_model(model)
    other.fingerprint = "0" * 16
    other.save(root / "other.json")
    return root




def test_eval_vqa_with_blind_run_plan_and_speed(tiny_saved, tmp_path):
    from skipit.evaluation import vqa

    out = tmp_path / "r.json"
    text = invoke("eval", tiny_saved / "m", "--data", tiny_saved, "--plan", tiny_saved / "empty.json",
                  "--with-blind", "--batch-size", 3, "--out", out)  # fmt: skip
    assert "needing" in text and "tokens/s" in text and "peak memory" in text
    result = json.loads(out.read_text())
    config = result["config"]
    assert config["plan"]["fingerprint"] == json.loads((tiny_saved / "empty.json").read_text())["fingerprint"]
    assert (config["task"], config["n"], config["n_records"], config["batch_size"]) == ("vqa", None, 4, 3)
    assert set(config["versions"]) >= {"skipit", "torch", "transformers", "python"}
    assert config["with_blind"] and not config["blind"] and config["model"] == str(tiny_saved / "m")
    assert [r["answers"] for r in result["predictions"]][:2] == [["red", "red", "blue"], ["blue"]]
    assert result["n"] == result["blind"]["n"] == 4 and set(result["per_type"]) == {"color", "count"}
    assert result["needs_image"] == vqa.needs_image(result, result["blind"])
    speed = result["speed"]
    assert speed["batch"] == 3 and speed["first_token_ms"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["peak_memory_mib"] > 0 and speed["kv_cache_mib"] > 0


def test_eval_under_an_empty_plan_gives_the_same_answers(tiny_saved, tmp_path):
    runs = {}
    for name, extra in (("plain", ()), ("empty", ("--plan", tiny_saved / "empty.json"))):
        invoke("eval", tiny_saved / "m", "--data", tiny_saved, "--no-speed", "--out", tmp_path / name, *extra)
        runs[name] = json.loads((tmp_path / name).read_text())
    assert runs["plain"]["config"]["plan"] is None and "speed" not in runs["plain"]
    assert runs["plain"]["predictions"] == runs["empty"]["predictions"]


def test_eval_caption(tiny_saved, tmp_path):
    from skipit.evaluation.caption import cider_d

    out = tmp_path / "c.json"
    text = invoke("eval", tiny_saved / "m", "--data", tiny_saved, "--task", "caption", "--n", 3, "--out", out)
    assert "CIDEr-D" in text
    result = json.loads(out.read_text())
    assert result["config"]["task"] == "caption" and result["config"]["n"] == 3 and result["n"] == 3
    rows = result["predictions"]
    assert result["cider"] == cider_d([r["prediction"] for r in rows], [r["references"] for r in rows])[0]
    assert result["speed"]["batch"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--plan", "{root}/other.json"], "other weights"),
        (["--task", "translate"], "unknown task 'translate'"),
        (["--task", "caption", "--with-blind"], "use them with --task vqa"),
        (["--blind", "--with-blind"], "give one of --blind and --with-blind"),
        (["--task", "caption"], 'have no "caption" to score'),
    ],
)
def test_eval_bad_input_is_one_line(tiny_saved, args, message):
    (tiny_saved / "nocaption.jsonl").write_text(json.dumps({"id": "r1", "image": "0.png", "question": "q?"}))
    data = tiny_saved / ("nocaption.jsonl" if "caption" in message else "data.jsonl")
    args = [a.format(root=tiny_saved) for a in args]
    out = tiny_saved / "never.json"
    proc = run("eval", str(tiny_saved / "m"), "--data", str(data), *args, "--out", str(out), cwd=tiny_saved)
    assert_one_line_error(proc, message)
    assert not out.exists()
