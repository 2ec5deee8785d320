"""benchmarks/serving.py on a tiny random LLaVA: every plan it offers runs under generate(), and the KV cache each
leaves measures what skipit.flops predicts (the table's "KV ratio" and "ideal KV" columns)."""

import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def serving():
    return benchmark_script("serving")


def test_every_plan_runs_and_its_cache_is_the_predicted_size(serving, tmp_path):
    out = tmp_path / "serving.json"
    tiny = ["--hidden", "64", "--layers", "4", "--heads", "2", "--intermediate", "128", "--vocab", "512",
            "--vision-tokens", "576", "--batch", "2", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--out", str(out), "--plans", *serving.PLANS]  # fmt: skip
    assert serving.main(tiny) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["untouched", *(serving.PLANS[name](4)[0] for name in serving.PLANS)]
    for row in rows:
        assert row["kv_ratio"] == pytest.approx(row["ideal_kv_ratio"], rel=1e-9), row["config"]
    two_stage = next(r for r in rows if r["config"].startswith("two stages"))
    # 50 % of 576 enter (288); 12.5 % (72) go on after layer 2: layers 0-2 cache 288 + 40 text, layer 3 72 + 40
    assert two_stage["ideal_kv_ratio"] == pytest.approx((3 * (288 + 40) + (72 + 40) + 4 * 2) / (4 * (616 + 2)))
