"""Visual question answering: prompts, batched greedy answers, and exact-match scoring."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from skipit.errors import SkipitError

# LLaVA-1.5's short-answer instruction, used for training mini-llava and for every VQA evaluation.
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_NUMBERS = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, drop punctuation and articles, number words to digits."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def prompt_messages(question: str, with_image: bool = True) -> list[dict]:
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": f"{question}\n{ANSWER_INSTRUCTION}"})
    return [{"role": "user", "content": content}]


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(prompt_messages(question), add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def answer(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers for one batch (left padding, so every row continues from its last prompt token)."""
    texts = [prompt_text(processor, q) for q in questions]
    # left padding whatever the saved tokenizer says: generation continues from each row's last token
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def evaluate(
    model,
    processor,
    records,
    batch_size: int = 16,
    blind: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Exact-match accuracy overall and per question type (record.extra["type"], if any).

    `blind=True` replaces every image with a blank one of the same size: what the model gets right then,
    it gets right without looking.
    """
    unscored = [r.id for r in records if r.answer is None]
    if unscored:
        raise SkipitError(f"{len(unscored)} records have no \"answer\" to score (first: {unscored[0]!r})")
    predictions = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = [r.load_image() for r in batch]
        if blind:
            images = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
        predictions += answer(model, processor, images, [r.question for r in batch])
        if on_batch:
            on_batch(len(batch))
    per_type: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for rec, pred in zip(records, predictions, strict=True):
        ok = exact_match(pred, rec.answer)
        per_type[rec.extra.get("type", "all")].append(ok)
        rows.append({"id": rec.id, "question": rec.question, "answer": rec.answer, "prediction": pred, "correct": ok})
    n_ok = sum(r["correct"] for r in rows)
    return {
        "accuracy": n_ok / len(rows),
        "n": len(rows),
        "per_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_type.items())},
        "predictions": rows,
    }
