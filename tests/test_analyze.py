"""`skipit.analyze` and `skipit analyze` end to end on tiny models: schema, plots, resume, torchrun, errors."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from skipit import models
from skipit.analysis import Analysis, analyze
from skipit.data.jsonl import load_records
from skipit.data.shapes import write_split
from skipit.errors import SkipitError
from skipit.flops import Shape
from skipit.plan import fingerprint
from skipit.stats import StatsConfig

torch.set_num_threads(1)
SMALL = StatsConfig(n_bootstrap=20, sketch_size=64)
BIN = Path(sys.executable).parent
PLOTS = {"geometric", "proximal", "informational", "cka", "logit_lens", "var"}


def cli(*args, env_extra=None, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*launcher, str(BIN / "skipit"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llava_dir):
    """(model folder, data folder): the tiny LLaVA saved like a checkpoint, and 6 calibration records."""
    root = tmp_path_factory.mktemp("analyze")
    return tiny_llava_dir, write_split(root / "shapes", "calibration", n=6).parent


def close(a, b, path="measures"):
    """Recursive equality of two JSON trees, numbers within float tolerance."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_cli_writes_analysis_and_plots(saved, tmp_path):
    model_dir, data = saved
    out = tmp_path / "run"
    proc = cli("analyze", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4", "--ablation")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "analysis.json").read_text())
    model, _ = models.load(model_dir)
    assert (result["format"], result["version"]) == ("skipit-analysis", 1)
    assert result["model"] | {"path": None} == {
        "path": None, "class": "LlavaForConditionalGeneration", "family": "LLaVA", "num_layers": 6,
        "hidden_size": 48, "fingerprint": fingerprint(model), "shape": asdict(Shape.from_model(model))}  # fmt: skip
    assert result["data"]["n_records"] == 6 and result["data"]["path"] == str(data)
    assert result["settings"]["batch_size"] == 4 and result["settings"]["ablation"] and result["seed"] == 0
    assert {"skipit", "torch", "transformers"} <= set(result["versions"])
    hidden = result["measures"]["hidden"]["modalities"]
    assert hidden["vision"]["n_tokens"][0] == 6 * 4  # 4 vision tokens per image
    for modality in ("vision", "text"):
        entry = hidden[modality]
        assert all(0 < v < 1 for v in entry["geometric"]["rho"]["mean"])
        assert all(v is not None for v in entry["informational"]["score"] + entry["cka"]["value"])
        assert len(result["measures"]["functional"]["ablation"][modality]["kl"]["mean"]) == 6
    assert all(0 < v < 1 for v in result["measures"]["var"]["var"]["mean"])
    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs == PLOTS | {"ablation_kl", "lipschitz"}
    assert all((out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    assert list((out / "shards").iterdir())  # the resume point


def test_two_processes_equal_one(saved, tmp_path):
    model_dir, data = saved
    out = tmp_path / "run"
    proc = cli("analyze", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "1",
               launcher=(str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "analysis.json").read_text())
    assert two["settings"]["world_size"] == 2
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank000-of-002.safetensors",
                                                                 "rank001-of-002.safetensors"]
    model, processor = models.load(model_dir)
    one = analyze(model, processor, load_records(data), batch_size=1)
    close(two["measures"], one.result.to_dict()["measures"])


def test_resume_after_interrupt_equals_uninterrupted(tiny_llava, saved, tmp_path):
    model, processor = tiny_llava
    records = load_records(saved[1])
    full = analyze(model, processor, records, batch_size=2, stats_config=SMALL, ablation=True)
    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        analyze(model, processor, records, batch_size=2, stats_config=SMALL, ablation=True, run_dir=run,
                shard_every=1, on_batch=interrupt)
    assert not (run / "analysis.json").exists() and (run / "shards" / "rank000-of-001.safetensors").is_file()
    seen.clear()
    resumed = analyze(model, processor, records, batch_size=2, stats_config=SMALL, ablation=True, run_dir=run,
                      shard_every=1, on_batch=seen.append)
    assert seen == [2]  # only the last batch ran again
    assert resumed.measures == full.measures
    assert Analysis.load(run).measures == json.loads(json.dumps(full.measures))
    with pytest.raises(SkipitError, match="other settings"):
        analyze(model, processor, records, batch_size=3, stats_config=SMALL, ablation=True, run_dir=run)


def test_nan_in_hidden_states_is_a_one_line_error_and_writes_nothing(saved, tmp_path):
    model_dir, data = saved
    model, processor = models.load(model_dir)
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.model.language_model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    poisoned.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    proc = cli("analyze", str(tmp_path / "model"), "--data", str(data), "--out", str(out))
    first = load_records(data)[0].id
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: hidden state X_3 (the output of decoder layer 2) has NaN or inf values for example "
                      f"{first!r}"], proc.stderr
    assert not (out / "analysis.json").exists()


def test_empty_or_unreadable_data_is_a_clear_error(tiny_llava, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    proc = cli("analyze", "whatever", "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "holds no records" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SkipitError, match="no records"):
        analyze(*tiny_llava, [])


def test_text_only_causal_lm(saved, tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    result = analyze(lm.eval(), tok, load_records(saved[1]), batch_size=4, stats_config=SMALL,
                     run_dir=tmp_path).result.to_dict()
    hidden = result["measures"]["hidden"]["modalities"]
    assert result["measures"]["var"] is None and hidden["vision"]["n_tokens"] == [0] * 4
    assert all(0 < v < 1 for v in hidden["text"]["geometric"]["rho"]["mean"])
    assert {p.stem for p in tmp_path.glob("*.png")} == PLOTS - {"var"}
