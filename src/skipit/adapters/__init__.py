"""Model-family adapters: the only code in skipit that knows where a family keeps its layers and vision tokens."""

from __future__ import annotations

from torch import nn

from skipit.adapters.base import Adapter
from skipit.adapters.causal_lm import CausalLMAdapter
from skipit.adapters.idefics3 import Idefics3Adapter
from skipit.adapters.llava import LlavaAdapter, LlavaNextAdapter
from skipit.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from skipit.errors import SkipitError

ADAPTERS: dict[str, type[Adapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLAdapter,
    "Idefics3ForConditionalGeneration": Idefics3Adapter,
}
CAUSAL_LMS = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Phi3", "SmolLM3")


def get_adapter(model: nn.Module) -> Adapter:
    name = type(model).__name__
    if name in ADAPTERS:
        return ADAPTERS[name](model)
    if name in {f"{base}ForCausalLM" for base in CAUSAL_LMS}:
        return CausalLMAdapter(model)
    supported = ", ".join([*ADAPTERS, *(f"{base}ForCausalLM" for base in CAUSAL_LMS)])
    raise SkipitError(f"{name} is not supported; supported model classes: {supported}")


__all__ = ["Adapter", "get_adapter"]
