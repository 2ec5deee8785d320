"""The one table of model families: `get_adapter` and `skipit.models.load` both read it, and nothing else names a
family.

A family is a set of `model_type`s (the config's), how to load it (a VLM through `AutoModelForImageTextToText` and
`AutoProcessor`, a causal LM through `AutoModelForCausalLM` and `AutoTokenizer`), its adapter (the generic one unless
its layout differs) and, where skip plans cannot run on it exactly, why (`refused`). A refused family still loads,
measures (`skipit analyze`) and runs an empty plan; per-model refusals (chunked or linear-attention layers in one
config, ...) are found by the adapter itself (`Adapter.plan_refusal`). A VLM whose model type is not listed here is
still served by the generic adapter when its layout is the common one.
"""

from __future__ import annotations

from dataclasses import dataclass

from skipit.adapters.base import Adapter
from skipit.adapters.gemma3 import Gemma3Adapter
from skipit.adapters.llama4 import Llama4Adapter
from skipit.adapters.paligemma import PaliGemmaAdapter
from skipit.adapters.qwen3_5 import Qwen3_5Adapter
from skipit.adapters.qwen3_vl import Qwen3VLAdapter

VLM, CAUSAL_LM = "vlm", "causal_lm"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    kind: str = VLM
    adapter: type[Adapter] = Adapter
    refused: str | None = None  # why non-empty skip plans are refused on every model of the family

    def label(self) -> str:
        if self.kind == VLM or self.refused:
            return self.name
        return f"{self.name}s ({', '.join(self.model_types)})"


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA", ("llava",)),
    Family("LLaVA-NeXT", ("llava_next",)),
    Family("LLaVA-OneVision", ("llava_onevision",)),
    Family("Qwen2-VL", ("qwen2_vl",)),
    Family("Qwen2.5-VL", ("qwen2_5_vl",)),
    Family("Qwen3-VL", ("qwen3_vl", "qwen3_vl_moe"), adapter=Qwen3VLAdapter),
    Family("Idefics3", ("idefics3",)),
    Family("SmolVLM", ("smolvlm",)),
    Family("InternVL", ("internvl",)),
    Family("Mistral3", ("mistral3",)),
    Family("Aya Vision", ("aya_vision",)),
    Family("Gemma 3", ("gemma3",), adapter=Gemma3Adapter),  # image tokens attend to each other bidirectionally
    Family("PaliGemma", ("paligemma",), adapter=PaliGemmaAdapter),  # the prefix (image and prompt) is one block
    Family("Llama 4", ("llama4",), adapter=Llama4Adapter),  # chunked layers, complex rotary, NoPE layers
    Family("Llama 4 text model", ("llama4_text",), kind=CAUSAL_LM, adapter=Llama4Adapter),
    Family("Qwen3.5", ("qwen3_5", "qwen3_5_moe"), adapter=Qwen3_5Adapter),  # hybrid linear attention
    Family("Qwen3.5 text model", ("qwen3_5_text", "qwen3_5_moe_text"), kind=CAUSAL_LM, adapter=Qwen3_5Adapter),
    Family("causal LM", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3"),
           kind=CAUSAL_LM),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for_type(model_type: str | None) -> Family | None:
    return _BY_TYPE.get(model_type)


def supported_families() -> str:
    return ", ".join(f.label() for f in FAMILIES)


def supported_classes() -> str:
    """The model classes of every family, as transformers names them (for error messages)."""
    from transformers.models.auto import modeling_auto as auto

    names = []
    for family in FAMILIES:
        table = auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if family.kind == VLM else \
            auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # fmt: skip
        names += [table[t] for t in family.model_types if t in table]
    return ", ".join(names)
