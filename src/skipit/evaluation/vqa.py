"""Visual question answering: batched greedy answers, exact-match and VQA soft-accuracy scoring, the "needs the
image" breakdown of a blind run. Prompts and model
inputs come from `skipit.prompts`."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from skipit import prompts
from skipit.errors import SkipitError
from skipit.evaluation import speed
from skipit.intervals import mean_interval

# re-exported for the callers that read them here (the CLI, mini-llava's training, lmms' shapes_vqa task, sweeps)
ANSWER_INSTRUCTION = prompts.ANSWER_INSTRUCTION
prompt_text = prompts.question_text
measure_speed = speed.measure_generation

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_NUMBERS = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}
MAX_NEW_TOKENS = 8  # short answers: a word or a phrase


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, drop punctuation and articles, number words to digits."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA metric: min(#references equal to the prediction / 3, 1), averaged over the subsets that leave one
    reference out (VQA's 10 answers give its 10-choose-9 subsets). With one reference, there is nothing to leave
    out and it is plain exact match."""
    if not answers:
        raise ValueError("soft accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min((total - h) / 3, 1.0) for h in hits) / len(hits)


# ---------------------------------------------------------------- generation (shared with captioning)


def record_inputs(model, processor, records: Sequence) -> dict:
    """`prompts.record_inputs` on the model's device: the records' images and questions in skipit's VQA prompt."""
    return prompts.record_inputs(processor, records, device=model.device)


@torch.inference_mode()
def generate_texts(model, processor, images: Sequence[Image.Image], texts: Sequence[str], max_new_tokens: int):
    """Greedy continuations of one batch of chat-formatted prompts (one image each), stripped."""
    return generate_from(model, processor, prompts.model_inputs(processor, texts, images, device=model.device),
                         max_new_tokens)  # fmt: skip


@torch.inference_mode()
def generate_from(model, processor, inputs: dict, max_new_tokens: int) -> list[str]:
    """Greedy continuations of one batch of model inputs (pixels, or their encoding from `encode_batches`)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


def encode_batches(model, processor, records, batch_size: int = 16) -> list[dict]:
    """The VQA inputs of `records` in batches, with the vision encoder already run on them: a plan changes only the
    language backbone, so a sweep encodes its images once and every plan answers from these."""
    return [speed.encode_images(model, record_inputs(model, processor, records[i:i + batch_size]))[0]
            for i in range(0, len(records), batch_size)]  # fmt: skip


def answer(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answers for one batch."""
    texts = [prompts.question_text(processor, q) for q in questions]
    return generate_texts(model, processor, images, texts, max_new_tokens)


# ---------------------------------------------------------------- scoring


def check_options(blind: bool = False, with_blind: bool = False) -> None:
    if blind and with_blind:
        raise SkipitError("--with-blind already runs blind: give one of --blind and --with-blind")


def check_scorable(records) -> None:
    unscored = [r.id for r in records if r.answer is None]
    if unscored:
        raise SkipitError(f"{len(unscored)} records have no \"answer\" to score (first: {unscored[0]!r})")


def summarize(rows: list[dict]) -> dict:
    """Exact-match and soft accuracy of prediction rows, overall and per question type (None: no rows); under
    "intervals", the bootstrap interval of each over questions."""
    per_type: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        per_type[row["type"]].append(row)

    def mean(rs: list[dict], key: str) -> float | None:
        return sum(r[key] for r in rs) / len(rs) if rs else None

    def scores(rs: list[dict]) -> dict:
        return {"accuracy": mean(rs, "correct"), "soft_accuracy": mean(rs, "soft"), "n": len(rs)}

    def intervals(rs: list[dict]) -> dict:
        return {key: mean_interval([r[name] for r in rs]).to_dict() if rs else None
                for key, name in (("accuracy", "correct"), ("soft_accuracy", "soft"))}  # fmt: skip

    types = sorted(per_type.items())
    return {**scores(rows), "per_type": {t: scores(rs) for t, rs in types},
            "intervals": {**intervals(rows), "per_type": {t: intervals(rs) for t, rs in types}}}


def evaluate(
    model,
    processor,
    records,
    batch_size: int = 16,
    blind: bool = False,
    on_batch: Callable[[int], None] | None = None,
    encoded: list[dict] | None = None,
) -> dict:
    """Exact-match and VQA soft accuracy overall and per question type (record.extra["type"], if any).

    Soft accuracy scores against every reference answer of a record ("answers"), or against its one "answer".
    `blind=True` replaces every image with a blank one of the same size: what the model gets right then,
    it gets right without looking. `encoded`: these records' inputs from `encode_batches` (same `batch_size`), so
    that the vision encoder does not run again.
    """
    check_scorable(records)
    if encoded is not None and (blind or sum(len(b["input_ids"]) for b in encoded) != len(records)):
        raise ValueError("encoded inputs must be encode_batches of these records, and not for a blind run")
    predictions = []
    for i, start in enumerate(range(0, len(records), batch_size)):
        batch = records[start:start + batch_size]
        if encoded is not None:
            predictions += generate_from(model, processor, encoded[i], MAX_NEW_TOKENS)
        else:
            images = [r.load_image() for r in batch]
            if blind:
                images = [prompts.blank(im) for im in images]
            predictions += answer(model, processor, images, [r.question for r in batch])
        if on_batch:
            on_batch(len(batch))
    rows = [_row(rec, pred) for rec, pred in zip(records, predictions, strict=True)]
    return {**summarize(rows), "predictions": rows}


def _row(rec, prediction: str) -> dict:
    references = rec.answers or [rec.answer]
    return {
        "id": rec.id, "type": rec.extra.get("type", "all"), "question": rec.question, "answer": rec.answer,
        "answers": references, "prediction": prediction, "correct": exact_match(prediction, rec.answer),
        "soft": soft_accuracy(prediction, references),
    }  # fmt: skip


def needs_image(seeing: dict, blind: dict) -> dict:
    """Scores of the run with images on the questions its blind run gets wrong (exact match): those cannot be
    answered from the question alone, so only they show whether the model uses the image."""
    pairs = list(zip(seeing["predictions"], blind["predictions"], strict=True))
    if any(s["id"] != b["id"] for s, b in pairs):
        raise ValueError("the two runs must score the same records in the same order")
    return summarize([s for s, b in pairs if not b["correct"]])


# ---------------------------------------------------------------- the task (see skipit.evaluation)


def run(model, processor, records, batch_size: int = 16, *, blind: bool = False, with_blind: bool = False,
        track: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:  # fmt: skip
    """`evaluate` with images, or blind, or both (`with_blind`: the run with images, its blind run under "blind" and
    the scores on the questions the blind run gets wrong under "needs_image")."""
    check_options(blind, with_blind)
    runs = {}
    for name in ["blind"] if blind else ["image", "blind"] if with_blind else ["image"]:
        advance = track("answering" + (" (blind)" if name == "blind" else ""), len(records)) if track else None
        runs[name] = evaluate(model, processor, records, batch_size, blind=name == "blind", on_batch=advance)
    if not with_blind:
        return next(iter(runs.values()))
    return {**runs["image"], "blind": runs["blind"], "needs_image": needs_image(runs["image"], runs["blind"])}


def speed_prompts(processor, records, batch_size: int) -> tuple[list[Image.Image], list[str]]:
    """The first batch's images (real ones, also for blind runs) and prompts."""
    batch = records[:batch_size]
    return [r.load_image() for r in batch], [prompts.question_text(processor, r.question) for r in batch]
