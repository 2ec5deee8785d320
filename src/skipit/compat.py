"""Every difference between the transformers releases skipit supports, in one place.

skipit runs on the released `transformers`, no fork; what changes between its minor releases is handled here and
nowhere else, so that the next rename is one edit. Known differences:
- 5.24 renamed the keyword that carries the KV cache from `past_key_values` to `cache` (model, decoder-layer and
  attention `forward`; the old name still works with a deprecation warning until 5.40, passing both raises) and
  output classes gained `.cache` (`.past_key_values` stays as a deprecated alias).
- 5.25: Aya Vision's forward multiplies its logits by its Cohere2 text config's `logit_scale`, as Cohere2ForCausalLM
  always has (before, it left them unscaled): `logit_scale`.
- 5.25: a cache's length (`DynamicCache.get_seq_length()`, from which a model infers the positions a call does not
  pass) is layer 0's whatever its kind, linear-attention layers now counting the tokens they ran; before, a hybrid
  cache whose layer 0 is a linear-attention one reported its first attention layer's. The engine asks the cache
  itself (`PlanRuntime.before_forward`), so a plan skipping Qwen3.5's layer 0 needs position_ids to continue a cache
  from 5.25 on, one skipping its layer 1 before.
- 5.25 loads models with `use_kernels=True` by default (`from_pretrained`): layer forwards are swapped for kernels
  fetched from the hub at load time; skipit loads with them off (`LOAD_KWARGS`).

The tested range is what CI runs: the lock's release and the newest release the declared range allows.
"""

from __future__ import annotations

import inspect
import warnings

import transformers
from packaging.version import Version

# The releases the test suite has passed on: the lock's (the lower bound) and the newest one CI has seen.
TESTED_RANGE = (Version("5.23.0"), Version("5.25.0"))
TRANSFORMERS_VERSION = Version(transformers.__version__)


def _installed_cache_kwarg() -> str:
    """The name this transformers' decoder layers take the cache under (read off a layer's signature)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


CACHE_KWARG = _installed_cache_kwarg()
# `from_pretrained` keywords: no hub kernels (5.25's default), since skipit never downloads at run time and its
# engine is checked against the model's own layer forwards. Every release in the range accepts the keyword.
LOAD_KWARGS = {"use_kernels": False}
_CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(kwargs: dict) -> str:
    """The keyword a call passed its cache under (the installed release's name when it passed none): a layer
    wrapper passes the cache on under the same name it was called with."""
    return next((name for name in _CACHE_NAMES if name in kwargs), CACHE_KWARG)


def get_cache(kwargs: dict):
    """The cache a forward call was given, whichever name carries it (None when there is none)."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


def output_cache(output):
    """The cache a model output carries (`.cache` from 5.24, `.past_key_values` before), without the deprecation
    warning of the old name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def logit_scale(model) -> float | None:
    """The factor `model`'s forward multiplies the LM head's logits by, or None: Cohere's causal LMs keep it as
    `model.logit_scale`; Aya Vision applies its text config's from 5.25 on (`AyaVisionForConditionalGeneration`)."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, float):
        return scale
    if getattr(model.config, "model_type", None) == "aya_vision" and Version("5.25") <= TRANSFORMERS_VERSION:
        return float(model.config.text_config.logit_scale)
    return None


def check_version() -> None:
    """One warning when the installed transformers is outside the range the test suite ran on."""
    low, high = TESTED_RANGE
    if not (low <= TRANSFORMERS_VERSION < Version(f"{high.major}.{high.minor + 1}")):
        warnings.warn(
            f"skipit was tested with transformers {low}-{high.major}.{high.minor}.x; {TRANSFORMERS_VERSION} is "
            "installed, which may have renamed what the skipping engine relies on",
            stacklevel=2,
        )


check_version()
