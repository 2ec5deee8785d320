"""Assemble mini-llava: DINOv2 ViT-S/14 -> LLaVA MLP projector -> SmolLM2-135M-Instruct, as a genuine
`transformers.LlavaForConditionalGeneration` written once in Hugging Face format.

Every later command loads the result with `from_pretrained(path)`, the same code path as a hub checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitImageProcessorPil,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from skipit import compat
from skipit.demo import weights
from skipit.demo.dinov2_onnx import convert as convert_dinov2
from skipit.errors import SkipitError

VERSION = "3"  # bump when the assembled model changes, so stale caches are rebuilt
IMAGE_SIZE = 112  # 8 x 8 patches of 14 px -> 64 vision tokens
IMAGE_TOKEN = "<image>"
# DINOv2 hidden states fed to the projector (LLaVA's vision_feature_layer; a list is concatenated): layer 4 is where
# colour explains the most variance (0.31, against 0.08 at layer -2; docs/benchmarks.md), the second-to-last gives
# the shapes.
FEATURE_LAYERS: int | list[int] = [4, -2]
# The trained parts: the projector, and LoRA factors merged into the language model's attention projections.
TRAINED_FILE = Path(__file__).with_name("mini_llava_trained.safetensors")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# SmolLM2's own chat template, extended to LLaVA-style content lists with an image entry.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("SKIPIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skipit"
    return Path(root)


def shapes_split(split: str) -> Path:
    """The standard `shapes` split in the cache (its data.jsonl), generated on first use."""
    from skipit.data.shapes import ensure_split

    return ensure_split(cache_dir() / "shapes", split)


def default_model_path() -> Path:
    return cache_dir() / f"mini-llava-v{VERSION}"


def build_processor(tokenizer, image_size: int = IMAGE_SIZE) -> LlavaProcessor:
    image_processor = BitImageProcessorPil(  # PIL backend: torchvision has no CPU wheel here
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    tokenizer.padding_side = "left"  # batched generation
    tokenizer.init_kwargs["padding_side"] = "left"  # so that save_pretrained records it
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def assemble(trained: dict[str, torch.Tensor] | None = None):
    """Build (model, processor) in memory from the packaged parts and the trained weights.

    `trained` holds `multi_modal_projector.*` tensors and `lora.<module>.A/B` factors (scale folded into B),
    merged as W += B @ A. With None the projector keeps its random initialisation (the start of training).
    """
    gguf = weights.smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **compat.LOAD_KWARGS
    )
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision = convert_dinov2(weights.dinov2_onnx())

    text_cfg = lm.config.to_dict()
    text_cfg.pop("quantization_config", None)
    text_cfg.pop("_name_or_path", None)
    text_cfg.pop("_model_name_or_path", None)
    text_config = LlamaConfig(**{k: v for k, v in text_cfg.items() if k not in ("model_type", "transformers_version")})
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // 14) ** 2,
        vision_feature_layer=FEATURE_LAYERS,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if trained is not None:
        load_trained(model, trained)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), build_processor(tokenizer)


def load_trained(model: LlavaForConditionalGeneration, trained: dict[str, torch.Tensor]) -> None:
    """Load the projector and merge the LoRA factors into the language model: W += B @ A."""
    prefix = "multi_modal_projector."
    model.model.multi_modal_projector.load_state_dict(
        {k[len(prefix):]: v.float() for k, v in trained.items() if k.startswith(prefix)}
    )
    lm = model.model.language_model
    with torch.no_grad():
        for key in (k for k in trained if k.startswith("lora.") and k.endswith(".A")):
            module = key[len("lora."):-len(".A")]
            lm.get_submodule(module).weight += trained[key[:-2] + ".B"].float() @ trained[key].float()


def build(out: str | Path | None = None, trained: str | Path = TRAINED_FILE) -> Path:
    """Write mini-llava (model + processor) to `out`, atomically: a temp dir renamed into place."""
    out = Path(out) if out else default_model_path()
    if not Path(trained).is_file():
        raise SkipitError(f"trained weights {trained} not found; make them with `skipit train-mini-llava`")
    model, processor = assemble(load_file(str(trained)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / STAMP).write_text(_digest(trained) + "\n")
        for f in tmp.iterdir():  # a cache others may read, like a downloaded checkpoint
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


STAMP = "skipit-trained.sha256"  # which trained weights the cached model was built from


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ensure_built() -> Path:
    """Path of the cached mini-llava, (re)building it when missing or built from other trained weights."""
    path = default_model_path()
    stamp = path / STAMP
    current = stamp.is_file() and stamp.read_text().strip() == _digest(TRAINED_FILE)
    if not (path / "config.json").is_file() or not current:
        build(path)
    return path
