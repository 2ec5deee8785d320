"""Load a supported model and its processor from a local folder (or a hub id, where the user has a hub)."""

from __future__ import annotations

import os
from pathlib import Path

from skipit.errors import SkipitError

# The families, and how each loads, are in one registry (`skipit.adapters.registry.FAMILIES`) that get_adapter reads
# too; it is imported when needed, so that importing skipit stays free of torch.


def supported_families() -> str:
    from skipit.adapters.registry import supported_families

    return supported_families()


def _looks_like_vlm(config) -> bool:
    """An unlisted model type that the generic adapter may serve: a vision and a text config."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


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

    from skipit import compat

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
    from skipit.adapters.registry import CAUSAL_LM, family_for_type

    family = family_for_type(kind)
    if family is None and not _looks_like_vlm(config):
        raise SkipitError(f"model type {kind!r} is not supported; supported families: {supported_families()}")
    if family is not None and family.kind == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **compat.LOAD_KWARGS)
        processor = AutoTokenizer.from_pretrained(path)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **compat.LOAD_KWARGS)
        except ValueError as e:  # an unlisted type transformers has no image-text-to-text class for
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SkipitError(
                f"model type {kind!r} is not supported ({first}); supported families: {supported_families()}"
            ) from None
        processor = AutoProcessor.from_pretrained(path)
        if family is None:
            from skipit.adapters import get_adapter

            get_adapter(model)  # one line naming what the generic adapter looked for and did not find
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. a CUDA device on a machine without one
        raise SkipitError(f"cannot put the model on {device!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), processor
