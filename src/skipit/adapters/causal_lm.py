"""Plain causal LMs (Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM3): `model.model.layers`, every token is text."""

from skipit.adapters.base import Adapter


class CausalLMAdapter(Adapter):
    family = "causal LM"
