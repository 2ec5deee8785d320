"""Captioning: CIDEr-D against hand-computed values and pycocoevalcap itself, generation on the tiny random LLaVA."""

import json
import math

import pytest
from PIL import Image
from pycocoevalcap.cider.cider import Cider

from skipit.data import shapes
from skipit.data.jsonl import load_records
from skipit.errors import SkipitError
from skipit.evaluation import caption


def test_tokenize_lowercases_and_drops_punctuation():
    assert caption.tokenize("A small, RED circle at the top-left.") == "a small red circle at the top left"
    assert caption.tokenize(" ... ") == ""


def test_identical_captions_score_ten():
    # every n-gram of a caption is in its own references only: each n-gram order has cosine 1, no length penalty
    refs = ["a large red circle in the center", "two small blue squares on the left", "one green triangle at the top"]
    score, scores = caption.cider_d(refs, [[r] for r in refs])
    assert scores == pytest.approx([10.0] * 3) and score == pytest.approx(10.0)


def test_hand_computed_cider():
    # two images, so an n-gram found in one image's references has idf log(2) - log(1) = log 2, and an n-gram found
    # in none of them log 2 - log(max(1, 0)) = log 2 as well: every n-gram weighs the same here
    score, scores = caption.cider_d(["X y z w", "p q r"], [["x y z"], ["P, q r."]])
    # image 1: cosines sqrt(3)/sqrt(4 * 3) (unigrams), 2/sqrt(3 * 2) (bigrams), 1/sqrt(2 * 1) (trigrams), 0 (the
    # reference has no 4-gram); one more word than the reference: penalty exp(-1 / (2 * 6^2))
    first = 10 / 4 * math.exp(-1 / 72) * (3 / math.sqrt(12) + 2 / math.sqrt(6) + 1 / math.sqrt(2))
    # image 2: identical, cosine 1 for 1- to 3-grams, 0 for 4-grams
    assert scores == pytest.approx([first, 7.5])
    assert score == pytest.approx((first + 7.5) / 2)
    # a caption sharing only one word: unigram cosine 1/2 (two words each, one shared), nothing else
    assert caption.cider_d(["a b", "c e"], [["a b"], ["c d"]])[1] == pytest.approx([5.0, 1.25])


def test_same_number_as_pycocoevalcap():
    candidates = ["A small red circle.", "Two large squares, at the top!", "a blue triangle on the left"]
    references = [
        ["A small red circle in the center.", "a red circle"],
        ["Two large squares at the top.", "two squares", "Large squares, top row."],
        ["A small blue triangle on the left."],
    ]
    score, scores = caption.cider_d(candidates, references)
    gts = {i: [caption.tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [caption.tokenize(c)] for i, c in enumerate(candidates)}
    direct, direct_scores = Cider().compute_score(gts, res)
    assert score == direct and scores == list(direct_scores)
    assert 0 < score < 10


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError, match="one candidate per image"):
        caption.cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one word"):
        caption.cider_d(["a", "b"], [["a"], ["!"]])


def _data(tmp_path, rows):
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (28, 28), shapes.COLORS[color]).save(tmp_path / f"{i}.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_records(tmp_path)


ROWS = [
    {"id": "a", "image": "0.png", "question": "q", "caption": "A large red circle in the center."},
    {"id": "b", "image": "1.png", "question": "q", "caption": "A small blue square at the top."},
    {"id": "c", "image": "0.png", "question": "q2", "caption": "A red circle."},  # the same image as "a"
    {"id": "d", "image": "2.png", "question": "q", "caption": "A small green diamond on the left."},
]


def test_records_sharing_an_image_are_one_example(tmp_path):
    examples = caption.by_image(_data(tmp_path, ROWS))
    assert [(rec.id, refs) for rec, refs in examples] == [
        ("a", ["A large red circle in the center.", "A red circle."]),
        ("b", ["A small blue square at the top."]),
        ("d", ["A small green diamond on the left."]),
    ]


def test_evaluate_on_a_tiny_model(tiny_llava, tmp_path):
    model, processor = tiny_llava
    records = _data(tmp_path, ROWS)
    seen = []
    result = caption.evaluate(model, processor, records, batch_size=2, max_new_tokens=12, on_batch=seen.append)
    assert seen == [2, 1] and result["n"] == 3
    rows = result["predictions"]
    assert [r["id"] for r in rows] == ["a", "b", "d"] and rows[0]["references"][1] == "A red circle."
    assert all(r["prediction"] for r in rows)
    score, scores = caption.cider_d([r["prediction"] for r in rows], [r["references"] for r in rows])
    assert result["cider"] == score and [r["cider"] for r in rows] == scores
    # left padding: batching does not change the greedy captions
    alone = caption.evaluate(model, processor, records, batch_size=1, max_new_tokens=12)
    assert [r["prediction"] for r in alone["predictions"]] == [r["prediction"] for r in rows]


def test_prompt_holds_the_image_and_the_instruction(tiny_llava):
    _, processor = tiny_llava
    text = caption.prompt_text(processor)
    assert text.index("<image>") < text.index(caption.CAPTION_PROMPT)


def test_records_without_captions_are_refused(tmp_path):
    records = _data(tmp_path, [*ROWS, {"id": "e", "image": "1.png", "question": "q", "caption": " . "},
                               {"id": "f", "image": "2.png", "question": "q"}])  # fmt: skip
    with pytest.raises(SkipitError, match=r"^2 records have no \"caption\" to score \(first: 'e'\)$"):
        caption.evaluate(None, None, records)


def test_blind_captions_see_a_blank_image(tiny_llava, tmp_path, monkeypatch):
    from skipit import prompts

    model, processor = tiny_llava
    records = _data(tmp_path, ROWS)
    seen = []
    real = caption.generate_texts
    spy = lambda m, p, images, *a: seen.extend(images) or real(m, p, images, *a)  # noqa: E731
    monkeypatch.setattr(caption, "generate_texts", spy)
    blind = caption.evaluate(model, processor, records, batch_size=2, max_new_tokens=6, blind=True)
    blank = prompts.blank(records[0].load_image())
    assert len(seen) == 3 and all(list(im.getdata()) == list(blank.getdata()) for im in seen)
    assert len({r["prediction"] for r in blind["predictions"]}) == 1  # one blank image, one caption
