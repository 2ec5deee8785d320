"""Captioning: one-sentence descriptions by batched greedy generation, scored with CIDEr-D.

CIDEr-D is pycocoevalcap's (the COCO caption evaluation code) on our own tokenisation: its PTBTokenizer needs Java.
Its document frequencies come from the references of the evaluated corpus, so the score depends on the corpus: an
n-gram that every image's references share weighs nothing, and a corpus of one image scores 0 whatever the caption.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from pycocoevalcap.cider.cider import Cider

from skipit import prompts
from skipit.errors import SkipitError
from skipit.evaluation.vqa import generate_texts
from skipit.intervals import mean_interval

# re-exported for the callers that read them here (the CLI)
CAPTION_PROMPT = prompts.CAPTION_PROMPT
prompt_text = prompts.caption_text


def tokenize(text: str) -> str:
    """Lowercase words with punctuation removed, space-separated (what CIDEr counts n-grams of)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D of one candidate per image against that image's references, and each image's score."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError("cider_d needs one candidate per image and at least one image")
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    if any(not any(refs) for refs in gts.values()):
        raise ValueError("every image needs a reference caption with at least one word")
    res = {i: [tokenize(c)] for i, c in enumerate(candidates)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def check_options(blind: bool = False, with_blind: bool = False) -> None:
    if blind or with_blind:
        raise SkipitError("--blind and --with-blind score answers to questions: use them with --task vqa")


def check_scorable(records) -> None:
    missing = [r.id for r in records if not tokenize(str(r.caption or ""))]
    if missing:
        raise SkipitError(f"{len(missing)} records have no \"caption\" to score (first: {missing[0]!r})")


def by_image(records) -> list[tuple[object, list[str]]]:
    """(first record, distinct reference captions) per image: records that share an image (several questions about
    it) are one captioning example, with all their captions as references."""
    groups: dict = {}
    for r in records:
        _, refs = groups.setdefault(r.image, (r, []))
        if str(r.caption) not in refs:
            refs.append(str(r.caption))
    return list(groups.values())


def evaluate(
    model,
    processor,
    records,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    on_batch: Callable[[int], None] | None = None,
    blind: bool = False,
) -> dict:
    """CIDEr-D of the model's greedy one-sentence captions, one per distinct image of `records` (`blind`: of blank
    images of the same size instead, the score the captions' language alone reaches)."""
    check_scorable(records)
    examples = by_image(records)
    prompt = prompts.caption_text(processor)
    predictions = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        images = [rec.load_image() for rec, _ in batch]
        if blind:
            images = [prompts.blank(im) for im in images]
        predictions += generate_texts(model, processor, images, [prompt] * len(batch), max_new_tokens)
        if on_batch:
            on_batch(len(batch))
    score, scores = cider_d(predictions, [refs for _, refs in examples])
    rows = [
        {"id": rec.id, "image": str(rec.image), "references": refs, "prediction": pred, "cider": s}
        for (rec, refs), pred, s in zip(examples, predictions, scores, strict=True)
    ]
    # CIDEr-D's document frequencies come from the whole set; the interval resamples the per-image scores
    return {"cider": score, "cider_ci": mean_interval(scores).to_dict(), "n": len(rows), "predictions": rows}


# ---------------------------------------------------------------- the task (see skipit.evaluation)


def run(model, processor, records, batch_size: int = 16, *, blind: bool = False, with_blind: bool = False,
        track: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:  # fmt: skip
    """`evaluate`, with progress per image."""
    check_options(blind, with_blind)
    advance = track("captioning", len(by_image(records))) if track else None
    return evaluate(model, processor, records, batch_size, on_batch=advance)


def speed_prompts(processor, records, batch_size: int) -> tuple[list, list[str]]:
    """The first batch of distinct images and the caption prompt."""
    batch = [rec for rec, _ in by_image(records)[:batch_size]]
    return [r.load_image() for r in batch], [prompts.caption_text(processor)] * len(batch)
