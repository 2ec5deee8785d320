"""Speed measurement helpers and the `generate` / `bench` commands, on tiny models (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke
from PIL import Image
from test_cli import assert_one_line_error, run
from test_skipping import build, make_inputs

from skipit import compat
from skipit.evaluation import speed
from skipit.plan import Plan


def test_measure_counts_the_kv_cache_each_plan_keeps():
    model, inputs = build("llava"), make_inputs("llava", 2)
    encoded, _ = speed.encode_images(model, inputs)
    assert "pixel_values" not in encoded and encoded["mm_encoder_outputs"]["image"] is not None
    configs = {"untouched": None, "exit": Plan.for_model(model, early_exit=1, skip_layers=[5])}
    runs = speed.compare(model, encoded, configs, new_tokens=3, repeats=2)
    assert [len(r) for r in runs.values()] == [2, 2]
    width, n_vision = inputs["input_ids"].shape[1], (inputs["input_ids"] == 95).sum(1)
    kv_width = 2 * model.config.text_config.num_key_value_heads * 8 * 4  # keys + values, head_dim 8, float32
    full = 6 * (width + 2) * kv_width * 2  # 6 layers, prompt + 2 decoded tokens, 2 rows
    shortened = (2 * (width + 2) + 3 * (width - int(n_vision.min()) + 2)) * kv_width * 2  # layer 5 caches nothing
    assert runs["untouched"][0].kv_bytes == full and runs["exit"][0].kv_bytes == shortened
    rows = speed.speed_rows(model, encoded, configs, runs, new_tokens=3)
    assert [r["config"] for r in rows] == ["untouched", "exit"]
    assert rows[0]["prefill_speedup"] == rows[0]["ideal_prefill_speedup"] == rows[0]["kv_ratio"] == 1.0
    assert rows[1]["ideal_prefill_speedup"] > 1 and rows[1]["ideal_kv_ratio"] < 1
    assert rows[1]["kv_ratio"] == shortened / full
    assert all(r.peak_bytes > 0 and r.decode_s > 0 for rs in runs.values() for r in rs)
    table = speed.markdown_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| untouched |") and table[3].startswith("| exit |")
    assert speed.overhead(rows) is None


def test_cache_bytes_skips_layers_that_cached_nothing():
    model, inputs = build("llama"), make_inputs("llama", 1)
    with torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
    assert speed.cache_bytes(cache) == 6 * 2 * inputs["input_ids"].numel() * 2 * 8 * 4


@pytest.fixture(scope="module")
def saved(tiny_llava, tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA on disk, an image, an empty plan for it, and a plan for other weights."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = tiny_llava
    (root / "m").symlink_to(tiny_llava_dir)  # the shared checkpoint, read only
    Image.new("RGB", (28, 28), (200, 30, 30)).save(root / "a.png")
    (root / "broken.png").write_bytes(b"not an image")
    Plan.for_model(model).save(root / "empty.json")
    Plan.for_model(model, early_exit=0, skip_layers=[1, 2, 3, 4]).save(root / "cut.json")
    other = Plan.for_model(model)
    other.fingerprint = "0" * 16
    other.save(root / "other.json")
    return root




def test_generate_with_an_empty_plan_prints_the_same_text(saved):
    common = (saved / "m", "--image", saved / "a.png", "--prompt", "what color is the shape ?", "--max-new-tokens", 8)
    plain = invoke("generate", *common)
    assert plain.strip()
    assert invoke("generate", *common, "--plan", saved / "empty.json") == plain
    assert invoke("generate", *common, "--plan", saved / "cut.json") != plain  # a plan that does change the model
    sampled = invoke("generate", *common, "--sample", "--temperature", "1.5", "--seed", 1)
    assert sampled.strip()


def test_bench_prints_a_row_per_configuration(saved, tmp_path):
    out = tmp_path / "rows.json"
    text = invoke(
        "bench", saved / "m", "--plan", saved / "cut.json", "--image", saved / "a.png", "--batch-size", 2,
        "--new-tokens", 2, "--repeats", 1, "--out", out,
    )  # fmt: skip
    lines = text.splitlines()
    header = next(line for line in lines if "untouched" in line)
    assert header.replace("┃", " ").split() == ["untouched", "plan"]
    labels = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert labels == [h for _, h, _ in speed.COLUMNS[1:]]
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["untouched", "plan"]
    assert rows[1]["ideal_prefill_speedup"] > 1 and rows[1]["kv_ratio"] < 1


GENERATE = ["generate", "{m}", "--prompt", "q", "--image"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([*GENERATE, "{root}/a.png", "--plan", "{root}/none.json"], "none.json does not exist"),
        ([*GENERATE, "{root}/broken.png"], "cannot read image"),
        ([*GENERATE, "{root}/gone.png"], "gone.png does not exist"),
        ([*GENERATE, "{root}/a.png", "--plan", "{root}/other.json"], "other weights"),
        (["bench", "{m}", "--plan", "{root}/other.json", "--image", "{root}/a.png"], "other weights"),
        (["bench", "{m}", "--plan", "{root}/empty.json"], "give either --data or --image"),
    ],
)
def test_bad_input_is_one_line(saved, args, message):
    args = [a.format(m=saved / "m", root=saved) for a in args]
    assert_one_line_error(run(*args, cwd=saved), message)


def _row(prefill=(1.3, 1.25, 1.35), decode=(1.02, 1.0, 1.04), ideal=(1.31, 1.03)):
    return {"prefill_speedup": prefill[0], "prefill_speedup_low": prefill[1], "prefill_speedup_high": prefill[2],
            "decode_speedup": decode[0], "decode_speedup_low": decode[1], "decode_speedup_high": decode[2],
            "ideal_prefill_speedup": ideal[0], "ideal_decode_speedup": ideal[1]}  # fmt: skip


def test_noise_flags_what_cannot_be_a_result():
    assert speed.noise(_row()) == []
    assert speed.noise(_row(decode=(17.54, 1.0, 30.0))) == [
        "decode rounds disagree (1.00-30.00)", "decode x17.54 beats its ideal x1.03"]  # the demo's x17.54 of old
    assert speed.noise(_row(prefill=(0.63, 0.4, 0.9))) == ["prefill rounds disagree (0.40-0.90)"]
    assert speed.noise(_row(prefill=(1.6, 1.55, 1.65))) == ["prefill x1.60 beats its ideal x1.31"]
    assert speed.control_noise(_row(prefill=(1.0, 1, 1), decode=(1.0, 1, 1))) == []
    assert speed.control_noise(_row(prefill=(1.2, 1, 1.3), decode=(1.0, 1, 1))) == [
        "the empty plan's prefill measured x1.20"]


def test_speed_rows_give_ranges_over_rounds():
    model, inputs = build("llava"), make_inputs("llava", 2)
    encoded, _ = speed.encode_images(model, inputs)
    configs = {"untouched": None, "exit": Plan.for_model(model, early_exit=1)}
    runs = speed.compare(model, encoded, configs, new_tokens=3, repeats=3)
    rows = speed.speed_rows(model, encoded, configs, runs, new_tokens=3)
    for row in rows:
        for kind in ("prefill", "decode"):
            assert row[f"{kind}_speedup_low"] <= row[f"{kind}_speedup"] <= row[f"{kind}_speedup_high"]
        assert row["noisy"] == speed.noise(row)
    assert rows[0]["prefill_speedup_low"] == rows[0]["prefill_speedup_high"] == 1.0  # untouched against itself
