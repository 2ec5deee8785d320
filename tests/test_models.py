import pytest
import torch
from transformers import LlavaForConditionalGeneration

from skipit import models
from skipit.errors import SkipitError


def test_load_round_trips_a_saved_llava(tiny_llava, tmp_path):
    model, processor = tiny_llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = models.load(tmp_path)
    assert isinstance(loaded, LlavaForConditionalGeneration) and not loaded.training
    assert proc.image_token == processor.image_token
    for (k, v), w in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_unsupported_type_names_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SkipitError, match=r"'bert' is not supported; supported families: LLaVA, LLaVA-NeXT"):
        models.load(tmp_path)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model"])
def test_missing_path(path):
    with pytest.raises(SkipitError, match="does not exist"):
        models.load(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(SkipitError, match="has no config.json"):
        models.load(tmp_path)


def test_device_and_dtype_choices(tiny_llava_dir, monkeypatch):
    monkeypatch.delenv("SKIPIT_DEVICE", raising=False)
    if not torch.cuda.is_available():
        assert models.default_device() == "cpu"
    loaded, _ = models.load(tiny_llava_dir, device="cpu")
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    monkeypatch.setenv("SKIPIT_DTYPE", "bfloat16")
    assert models.load(tiny_llava_dir, device="cpu")[0].dtype == torch.bfloat16
    monkeypatch.setenv("SKIPIT_DTYPE", "float99")
    with pytest.raises(SkipitError, match="SKIPIT_DTYPE='float99' is not a torch dtype"):
        models.load(tiny_llava_dir, device="cpu")
    monkeypatch.delenv("SKIPIT_DTYPE")
    if not torch.cuda.is_available():
        monkeypatch.setenv("SKIPIT_DEVICE", "cuda:3")
        with pytest.raises(SkipitError, match="cannot put the model on 'cuda:3'"):
            models.load(tiny_llava_dir)


def test_loading_reads_the_one_family_registry():
    from skipit.adapters.registry import FAMILIES

    listed = models.supported_families()
    assert all(family.name in listed for family in FAMILIES)
    assert {"LLaVA-OneVision", "SmolVLM", "InternVL", "Mistral3", "Qwen3-VL"} <= {f.name for f in FAMILIES}
