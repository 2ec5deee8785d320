"""Load a supported model and its processor from a local folder (or a hub id, where the user has a hub)."""

from __future__ import annotations

import os
from pathlib import Path

from skipit.errors import SkipitError

# model_type -> family; the adapters (one per family) are the only code that knows more.
VLM_FAMILIES = {
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "idefics3": "Idefics3 (SmolVLM)",
}
CAUSAL_LM_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "smollm3"}


def supported_families() -> str:
    return ", ".join([*VLM_FAMILIES.values(), "causal LMs (" + ", ".join(sorted(CAUSAL_LM_TYPES)) + ")"])


def _config(path: str):
    from transformers import AutoConfig

    local = Path(path)
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SkipitError(f"model path {path} does not exist: give a folder saved with save_pretrained() or a hub id")
    if local.exists() and not (local / "config.json").is_file():
        raise SkipitError(f"{path} has no config.json: give a folder saved with save_pretrained()")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SkipitError(f"cannot load model {path!r}: {first}") from None


def default_device() -> str:
    """$SKIPIT_DEVICE, else this process's GPU (LOCAL_RANK under torchrun / accelerate), else the CPU."""
    import torch

    if device := os.environ.get("SKIPIT_DEVICE"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def torch_dtype(name: str):
    """The torch dtype called `name` ("float32", "bfloat16", ...), or None if there is none."""
    import torch

    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load(path: str | Path | None = None, dtype=None, device: str | None = None):
    """(model, processor) in eval mode, on `device` (default: `default_device()`); processor is a tokenizer for
    text-only causal LMs. `path`: a folder saved with `save_pretrained` or a hub id; None loads the embedded
    mini-llava (built on first use). dtype: float32 on the CPU, bfloat16 on a GPU, unless given or set in
    $SKIPIT_DTYPE."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if path is None:
        from skipit.demo.build import ensure_built

        path = ensure_built()
    path = str(path)
    config = _config(path)
    kind = getattr(config, "model_type", None)
    device = device or default_device()
    if dtype is None and (name := os.environ.get("SKIPIT_DTYPE")):
        dtype = torch_dtype(name)
        if dtype is None:
            raise SkipitError(f"SKIPIT_DTYPE={name!r} is not a torch dtype (try float32, bfloat16, float16)")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    if kind in VLM_FAMILIES:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
    elif kind in CAUSAL_LM_TYPES:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        processor = AutoTokenizer.from_pretrained(path)
    else:
        raise SkipitError(f"model type {kind!r} is not supported; supported families: {supported_families()}")
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a machine without one
        raise SkipitError(f"cannot put the model on {device!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), processor
