"""Prompts and model inputs: the chat messages skipit sends a model, rendered with the processor's chat template, and
the batched model inputs built from them.

Every path that feeds a model builds its inputs here (VQA and captioning evaluation, speed, calibration for the
analysis, the baselines' rankings, the lmms-eval model), so that the same record gives the same tokens everywhere,
and every batch is left-padded whatever the saved tokenizer says: generation continues from each row's last
position, and calibration reads the answer at the last prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from skipit.errors import SkipitError

# LLaVA-1.5's short-answer instruction, used for training mini-llava and for every VQA evaluation.
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image in one sentence."
BLANK = (255, 255, 255)  # the colour of the blank images of a "blind" run


# ---------------------------------------------------------------- messages and rendering


def is_text_only(processor) -> bool:
    """Whether `processor` is a plain tokenizer (skipit's causal LMs) rather than a multimodal processor."""
    return not hasattr(processor, "image_processor")


def messages(text: str, n_images: int = 1) -> list[dict]:
    """One user turn: `n_images` images, then `text` (LLaVA-style content list)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def question_messages(question: str, with_image: bool = True) -> list[dict]:
    """skipit's VQA prompt: the image (if any), then the question and the short-answer instruction."""
    return messages(f"{question}\n{ANSWER_INSTRUCTION}", n_images=int(with_image))


def render(processor, chat: list[dict]) -> str:
    """`chat` through the processor's chat template, with the generation prompt (text, not tokens)."""
    return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def chat_text(processor, text: str, n_images: int = 1) -> str:
    """The rendered prompt of one user turn with `n_images` images and `text`. A text-only tokenizer gets `text` as
    the turn's whole content (n_images must be 0), or `text` itself when it has no chat template."""
    if not is_text_only(processor):
        return render(processor, messages(text, n_images))
    if n_images:
        raise SkipitError("a text-only model takes no images")
    if getattr(processor, "chat_template", None) is None:
        return text
    return render(processor, [{"role": "user", "content": text}])


def question_text(processor, question: str) -> str:
    """skipit's rendered VQA prompt for `question`, with one image."""
    return render(processor, question_messages(question))


def caption_text(processor) -> str:
    """skipit's rendered captioning prompt, with one image."""
    return render(processor, messages(CAPTION_PROMPT))


# ---------------------------------------------------------------- images


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB; a missing or unreadable file is a one-line SkipitError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise SkipitError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SkipitError(f"cannot read image {path}: {e}") from None


def blank(image: Image.Image) -> Image.Image:
    """A white image of `image`'s size: what a "blind" run shows instead."""
    return Image.new("RGB", image.size, BLANK)


# ---------------------------------------------------------------- model inputs


def model_inputs(
    processor,
    texts: Sequence[str],
    images: Sequence[Image.Image] = (),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """Model inputs for a batch of rendered prompts and their images (in order, as many as the prompts hold
    placeholders for), always left-padded: the last position of every row is its last prompt token.

    Special tokens are added as transformers' own apply_chat_template(tokenize=True) adds them: not when the prompt
    already starts with the tokenizer's BOS token. Tensors move to `device` (if given), floating ones also to `dtype`
    (if given).
    """
    texts = list(texts)
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": "left"}
    bos = getattr(tokenizer, "bos_token", None)
    if bos and texts and all(t.startswith(bos) for t in texts):
        kwargs["add_special_tokens"] = False
    if images:
        kwargs["images"] = list(images)
    inputs = dict(processor(**kwargs))
    if device is None and dtype is None:
        return inputs
    return {k: _to(v, device, dtype) for k, v in inputs.items()}


def _to(value, device, dtype):
    if not isinstance(value, torch.Tensor):
        return value
    cast = dtype if torch.is_floating_point(value) else None
    return value.to(device=device, dtype=cast)


def chat_inputs(processor, images: Sequence[Image.Image], requests: Sequence[str], device=None, dtype=None) -> dict:
    """Model inputs for one image and one free-form request per row (`skipit generate`, `skipit bench`)."""
    return model_inputs(processor, [chat_text(processor, r) for r in requests], images, device=device, dtype=dtype)


def record_texts(processor, records: Sequence, vision: bool = True) -> list[str]:
    """The rendered prompts of records: skipit's VQA prompt. Without vision, the question as text, preceded by
    the record's caption when it has one (the caption then stands in for the image)."""
    if vision:
        return [question_text(processor, r.question) for r in records]
    return [chat_text(processor, "\n".join(filter(None, [r.caption, r.question, ANSWER_INSTRUCTION])), n_images=0)
            for r in records]  # fmt: skip


def record_inputs(
    processor, records: Sequence, vision: bool = True, blind: bool = False, device=None, dtype=None
) -> dict:
    """Model inputs for a batch of records in skipit's VQA prompt (`record_texts`): what evaluation answers,
    calibration measures and the baselines rank on. `blind` shows blank images of the same sizes."""
    images = [r.load_image() for r in records] if vision else []
    if blind:
        images = [blank(im) for im in images]
    return model_inputs(processor, record_texts(processor, records, vision), images, device=device, dtype=dtype)
