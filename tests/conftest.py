"""Tiny random models built in the tests: no downloads, seconds to run."""

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from skipit.data import shapes
from skipit.demo.build import IMAGE_TOKEN, build_processor

# Tiny models run fastest on one thread; on a shared 2-core machine more threads make them 10-100x slower.
torch.set_num_threads(1)

SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
WORDS = sorted(
    {*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES, *shapes.ROWS, *shapes.COLUMNS, *shapes.NUMBER_WORDS}
    | set(
        "what color is the shape object how many shapes are in image small or large top middle bottom row left right "
        "column there a yes no answer question using single word phrase system user assistant , . ?".split()
    )
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + [w for w in WORDS if w])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", additional_special_tokens=[IMAGE_TOKEN],
    )
    return fast


@pytest.fixture(scope="session")
def tiny_llava():
    """A LLaVA with the mini-llava layout (DINOv2 tower, CLS dropped, Llama LM) at toy size: 4 vision tokens."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlavaConfig(
        vision_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
            image_size=28,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, build_processor(tok, image_size=28)


# --- synthetic run folders (analysis.json, plan.json, sweep.json) for the report tests: no model, no torch work ---


def _stat(values, spread=0.2):
    return {"mean": list(values), "ci_low": [v * (1 - spread) for v in values],
            "ci_high": [v * (1 + spread) for v in values]}  # fmt: skip


def _synthetic_analysis(L: int, ablation: bool, vision: bool) -> dict:
    """analysis.json content with the schema of docs/analysis.md: redundant middle layers, busy first and last."""
    deltas = [0.01, 0.05, 0.1]
    mods = {}
    for m, scale in (("vision", 1.0), ("text", 1.5)):
        if m == "vision" and not vision:
            continue
        rho = [scale * (0.3 if j == 0 else 0.2 if j == L - 1 else 0.01 + 0.004 * j) for j in range(L)]
        mods[m] = {
            "n_tokens": [64 * 4 if m == "vision" else 50 * 4] * L,
            "geometric": {"rho": _stat(rho), "angular": _stat([r**0.5 for r in rho]),
                          "block_influence": _stat([2 * r for r in rho])},
            "proximal": {"n_bins": 100, "tail": {str(d): [min(1.0, r / d / 3) for r in rho] for d in deltas}},
            "cka": {"value": [1 - r for r in rho], "debiased": True, "n_samples": 64},
            "informational": {"score": [0.2 + r for r in rho], "ci_low": [0.15 + r for r in rho],
                              "ci_high": [0.25 + r for r in rho]},
        }  # fmt: skip
    var = None
    if vision:
        v = [0.18 if j == 0 else 0.03 + 0.01 * (j % 3) for j in range(L)]
        var = {"var": _stat(v), "var_normalised": _stat([x / 0.6 for x in v]), "expected_share": [0.6] * L,
               "n_queries": [200] * L}  # fmt: skip
    functional = {"logit_lens": {"kl": _stat([5.0 if j in (0, L - 1) else 0.1 * (j + 1) for j in range(L)]),
                                 "tv": _stat([0.1] * L)}}  # fmt: skip
    if ablation:
        functional["ablation"] = {
            m: {"kl": _stat([0.01 * (j + 1) for j in range(L)]), "tv": _stat([0.02 * (j + 1) for j in range(L)]),
                "lipschitz": {"q0.9": {"bound": [0.05 * (j + 1) for j in range(L)]}}}
            for m in mods
        }  # fmt: skip
    return {
        "format": "skipit-analysis", "version": 1, "created": "2026-01-01T00:00:00+0000",
        "model": {"path": "/models/tiny-llava", "class": "LlavaForConditionalGeneration", "family": "LLaVA",
                  "num_layers": L, "hidden_size": 48, "fingerprint": "0123456789abcdef"},
        "data": {"path": "/data/calibration", "n_records": 4, "records_digest": "feedc0de"},
        "seed": 0,
        "settings": {"measure_config": {"tail_deltas": deltas}},
        "layers": list(range(L)),
        "measures": {"hidden": {"modalities": mods}, "var": var, "functional": functional},
    }  # fmt: skip


def _synthetic_plan(L: int, evidence: bool = True, **decisions) -> dict:
    """plan.json content (skipit.plan.Plan.to_dict) with planner-style evidence."""
    plan = {"format": "skipit-plan", "version": 1, "architecture": "LlavaForConditionalGeneration", "num_layers": L,
            "fingerprint": "0123456789abcdef", "late_entry": 0, "late_entry_mode": "absent", "early_exit": None,
            "skip_layers": [], "frozen_vision_layers": [], "evidence": {}}  # fmt: skip
    plan.update(decisions)
    if evidence:
        plan["evidence"] = {
            "method": "skipit conditions",
            "thresholds": {"epsilon": 0.05, "delta": 0.05, "eta": 0.1, "tau": 0.1},
            "threshold_scale": 1.0,
            "reasons": {"epsilon": "rho < 0.05 means cos > 0.9"},
            "costs": {"skip": [0.5 + 0.1 * j for j in range(L)], "freeze": [0.4] * L,
                      "absent": [0.9] * (L - 1) + [None], "exit": [1.5] * L},
            "prompt": {"vision_tokens": 64, "text_tokens": 50},
            "predicted": {"prefill": 1.31, "decode": 1.12, "kv_memory": 0.81, "flops_removed": 0.237},
        }  # fmt: skip
    return plan


_FAMILY_SPECS = [("empty", "empty", {}), ("late_entry-2", "late_entry", {"late_entry": 2}),
                ("late_entry-3", "late_entry", {"late_entry": 3}), ("early_exit-5", "early_exit", {"early_exit": 5}),
                ("early_exit-3", "early_exit", {"early_exit": 3}),
                ("vision_frozen-3", "vision_frozen", {"frozen_vision_layers": [3]}),
                ("layer_skip-2", "layer_skip", {"skip_layers": [2]}),
                ("layer_skip-2-5", "layer_skip", {"skip_layers": [2, 5]}),
                ("skipit", "skipit", {"late_entry": 2, "early_exit": 5, "skip_layers": [4]})]  # fmt: skip
_PREDICTED = ["geometric", "proximal", "informational", "cka", "var", "logit_lens"]


def _synthetic_sweep(L: int, baselines: bool) -> dict:
    """sweep.json content: one plan of each family with predicted and measured degradation, correlations."""
    plans = []
    for i, (name, family, decisions) in enumerate(_FAMILY_SPECS):
        g = 0.0 if family == "empty" else 0.01 * i + 0.003 * ((7 * i) % 5)
        plans.append({
            "name": name, "family": family, "plan": _synthetic_plan(L, evidence=False, **decisions),
            "accuracy": 0.8 - 3 * g, "accuracy_drop": 300 * g, "flops_removed": 0.05 * i,
            "ideal_prefill_speedup": 1 + 0.08 * i, "prefill_speedup": 1 + 0.06 * i, "decode_speedup": 1 + 0.02 * i,
            "kv_memory": 1 - 0.05 * i, "predicted": {m: g * (1 + k / 3) for k, m in enumerate(_PREDICTED)},
            "safe": g < 0.04,
        })  # fmt: skip
    sweep = {
        "format": "skipit-sweep", "version": 1,
        "model": {"path": "/models/tiny-llava", "fingerprint": "0123456789abcdef"},
        "data": {"path": "/data/test", "n": 100},
        "reference": {"accuracy": 0.8, "prefill_s": 0.0123, "decode_tokens_per_s": 45.6},
        "plans": plans,
        "correlation": {m: {"spearman": 0.8 - 0.1 * k, "ci_low": 0.5 - 0.1 * k, "ci_high": 0.95 - 0.05 * k,
                            "n": len(plans)} for k, m in enumerate(_PREDICTED)},
        "correlation_by_family": {"late_entry": {"geometric": {"spearman": 1.0, "ci_low": None, "ci_high": None,
                                                               "n": 2}}},
        "safe_but_lost": ["late_entry-3"],
        "lost_points": 2.0,
        "baselines": [],
    }  # fmt: skip
    if baselines:
        sweep["baselines"] = [
            {"method": method, "budget": b, "flops_removed": 1.02 * b, "prefill_speedup": 1 + b,
             "accuracy": 0.8 - b / 3,
             "accuracy_kept": (0.8 - b / 3) / 0.8, "plan": _synthetic_plan(L, evidence=False, skip_layers=[3, 4])}
            for method in ("ShortGPT", "FastV") for b in (0.1, 0.2)
        ]  # fmt: skip
    return sweep


@pytest.fixture
def make_run(tmp_path):
    """make_run(plan=True, sweep=True, ...) -> a run folder with synthetic analysis.json / plan.json / sweep.json.

    `plan` may be a dict of plan decisions (default: late entry 2, early exit 5, skip layer 4, frozen layer 3)."""
    import json

    def make(name="run", L=8, analysis=True, plan=True, sweep=True, baselines=True, ablation=False, vision=True):
        run = tmp_path / name
        run.mkdir()
        if analysis:
            (run / "analysis.json").write_text(json.dumps(_synthetic_analysis(L, ablation, vision)))
        if plan:
            decisions = plan if isinstance(plan, dict) else {
                "late_entry": 2, "early_exit": L - 3, "skip_layers": [4], "frozen_vision_layers": [3]}
            (run / "plan.json").write_text(json.dumps(_synthetic_plan(L, **decisions)))
        if sweep:
            (run / "sweep.json").write_text(json.dumps(_synthetic_sweep(L, baselines)))
        return run

    return make


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_llava, tmp_path_factory):
    """The tiny LLaVA and its processor saved once like a checkpoint; tests only read the folder."""
    model, processor = tiny_llava
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def invoke(*args) -> str:
    """Run the skipit CLI in-process; its stdout, after asserting it succeeded."""
    from typer.testing import CliRunner

    from skipit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # model loading reports progress on stderr


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) imported as a module, to call its functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
