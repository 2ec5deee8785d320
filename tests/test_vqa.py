import json

import pytest
from PIL import Image

from skipit.data import shapes
from skipit.data.jsonl import load_records
from skipit.errors import SkipitError
from skipit.evaluation import vqa
from skipit.evaluation.vqa import exact_match, normalize_answer, soft_accuracy
from skipit.prompts import question_messages as prompt_messages


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("Red.", "red"), ("  The circle ", "circle"), ("Two", "2"), ("top-left", "top left"), ("YES!", "yes")],
)
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("Three.", "three")
    assert exact_match("a square", "square")
    assert not exact_match("The circle is red", "red")


def test_prompt_puts_image_first_and_the_instruction_last():
    (msg,) = prompt_messages("What color?")
    assert msg["content"][0] == {"type": "image"}
    assert msg["content"][1]["text"].startswith("What color?\n")
    assert prompt_messages("q", with_image=False)[0]["content"][0]["type"] == "text"


# ---------------------------------------------------------------- soft accuracy


@pytest.mark.parametrize(("hits", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_on_ten_answers(hits, expected):
    # one of the 10 leave-one-out subsets holds hits-1 matches per matching answer left out, the others hold hits:
    # e.g. 1 match -> (1 * 0 + 9 * 1/3) / 10 = 0.3, 3 matches -> (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["red"] * hits + ["blue"] * (10 - hits)
    assert soft_accuracy("Red.", answers) == pytest.approx(expected)


def test_soft_accuracy_with_one_answer_is_exact_match():
    for pred, ans in [("Three.", "three"), ("a square", "square"), ("The circle is red", "red"), ("2", "two")]:
        assert soft_accuracy(pred, [ans]) == float(exact_match(pred, ans))
    assert soft_accuracy("no", ["yes"]) == 0.0 and soft_accuracy("Yes", ["yes"]) == 1.0


def test_soft_accuracy_with_a_few_answers():
    # 3 answers, 2 say "red": leave out a red -> 1/3 (twice), leave out the blue -> 2/3; mean 4/9
    assert soft_accuracy("red", ["red", "red", "blue"]) == pytest.approx(4 / 9)
    with pytest.raises(ValueError):
        soft_accuracy("red", [])


def _records(tmp_path, rows):
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"image": "a.png", **r}) for r in rows) + "\n")
    return load_records(tmp_path)


def test_records_carry_several_answers(tmp_path):
    a, b, c = _records(tmp_path, [
        {"id": "a", "question": "q", "answers": ["red", "blue", "red"]},
        {"id": "b", "question": "q", "answer": "blue", "answers": ["red", "red"]},
        {"id": "c", "question": "q", "answer": 2},
    ])  # fmt: skip
    assert (a.answer, a.answers, a.extra) == ("red", ["red", "blue", "red"], {})  # the most common answer
    assert (b.answer, b.answers) == ("blue", ["red", "red"])  # an explicit answer is kept
    assert (c.answer, c.answers) == ("2", None)


@pytest.mark.parametrize("bad", [[], "red", [["red"]], [None]])
def test_bad_answers_name_the_line(tmp_path, bad):
    with pytest.raises(SkipitError, match=r'data.jsonl:2: "answers" must be a non-empty list of strings'):
        _records(tmp_path, [{"id": "a", "question": "q", "answer": "x"}, {"id": "b", "question": "q", "answers": bad}])


def test_evaluate_scores_exact_and_soft_per_type(tmp_path, monkeypatch):
    records = _records(tmp_path, [
        {"id": "1", "question": "q", "answers": ["red"] * 2 + ["blue"] * 8, "type": "color"},  # most common: blue
        {"id": "2", "question": "q", "answer": "two", "type": "count"},
        {"id": "3", "question": "q", "answer": "three", "type": "count"},
        {"id": "4", "question": "q", "answers": ["red", "red", "red", "green"], "type": "color"},
    ])  # fmt: skip
    predictions = iter(["Red", "2", "four", "red"])
    monkeypatch.setattr(vqa, "answer", lambda model, processor, images, questions: [next(predictions) for _ in images])
    result = vqa.evaluate(None, None, records, batch_size=3)
    # exact match against "answer" (blue, two, three, red): wrong, right, wrong, right
    assert [r["correct"] for r in result["predictions"]] == [False, True, False, True]
    # soft: 2 of 10 -> 0.6; exact 1; 0; 3 of 4 -> leave out a red: 2/3 (3 times), the green: 1 -> 0.75
    assert [r["soft"] for r in result["predictions"]] == pytest.approx([0.6, 1.0, 0.0, 0.75])
    assert (result["accuracy"], result["n"]) == (0.5, 4)
    assert result["soft_accuracy"] == pytest.approx((0.6 + 1 + 0 + 0.75) / 4)
    assert result["per_type"]["color"] == pytest.approx({"accuracy": 0.5, "soft_accuracy": 0.675, "n": 2})
    assert result["per_type"]["count"] == {"accuracy": 0.5, "soft_accuracy": 0.5, "n": 2}


def _run(correct, types="abab"):
    pairs = enumerate(zip(types, correct, strict=True))
    rows = [{"id": str(i), "type": t, "correct": c, "soft": float(c)} for i, (t, c) in pairs]
    return {**vqa.summarize(rows), "predictions": rows}


def test_needs_image_scores_what_the_blind_run_gets_wrong():
    seeing, blind = _run([True, True, False, True]), _run([True, False, False, False])
    needs = vqa.needs_image(seeing, blind)  # questions 1, 2, 3, of which 1 and 3 are right with the image
    assert (needs["n"], needs["accuracy"]) == (3, pytest.approx(2 / 3))
    assert needs["per_type"] == {"a": {"accuracy": 0.0, "soft_accuracy": 0.0, "n": 1},
                                 "b": {"accuracy": 1.0, "soft_accuracy": 1.0, "n": 2}}  # fmt: skip
    everything_guessed = vqa.needs_image(seeing, _run([True] * 4))
    assert everything_guessed["n"] == 0 and everything_guessed["accuracy"] is None
    shuffled = {**blind, "predictions": blind["predictions"][::-1]}
    with pytest.raises(ValueError, match="same records"):
        vqa.needs_image(seeing, shuffled)


# ---------------------------------------------------------------- on the tiny random LLaVA


def test_blind_and_seeing_runs_on_a_tiny_model(tiny_llava, tmp_path):
    model, processor = tiny_llava
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (28, 28), shapes.COLORS[color]).save(tmp_path / f"{i}.png")
    rows = [{"id": str(i), "image": f"{i}.png", "question": "What color is the shape?", "answer": c}
            for i, c in enumerate(["red", "blue", "green"])]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(tmp_path)
    seeing = vqa.evaluate(model, processor, records, batch_size=2)
    blind = vqa.evaluate(model, processor, records, batch_size=2, blind=True)
    assert seeing["n"] == 3 and seeing["soft_accuracy"] == seeing["accuracy"]  # one answer each
    assert [r["id"] for r in seeing["predictions"]] == ["0", "1", "2"]
    assert all(isinstance(r["prediction"], str) for r in seeing["predictions"])
    # batching does not change greedy answers (left padding)
    one_by_one = vqa.evaluate(model, processor, records, batch_size=1)
    assert [r["prediction"] for r in one_by_one["predictions"]] == [r["prediction"] for r in seeing["predictions"]]
    needs = vqa.needs_image(seeing, blind)
    assert needs["n"] == sum(not r["correct"] for r in blind["predictions"])


def test_measure_speed_follows_the_applied_plan(tiny_llava):
    from skipit.plan import Plan
    from skipit.skipping import apply_plan, remove_plan

    model, processor = tiny_llava
    images = [Image.new("RGB", (28, 28), (200, 30, 30))] * 2
    texts = [vqa.prompt_text(processor, "What color is the shape?"), vqa.prompt_text(processor, "How many?")]
    plain = vqa.measure_speed(model, processor, images, texts, new_tokens=3, repeats=1)
    assert plain["batch"] == 2 and plain["new_tokens"] == 3 and plain["peak_memory_kind"] == "peak_resident_set"
    for key in ("prefill_ms", "first_token_ms", "decode_tokens_per_s", "kv_cache_mib", "peak_memory_mib"):
        assert plain[key] > 0, key
    apply_plan(model, Plan.for_model(model, early_exit=0, skip_layers=[1, 2, 3, 4]))
    try:
        cut = vqa.measure_speed(model, processor, images, texts, new_tokens=3, repeats=1)
    finally:
        remove_plan(model)
    # layers 1-4 skipped cache nothing, layer 5 caches text only: far less than 6 layers of everything
    assert cut["kv_cache_mib"] < plain["kv_cache_mib"] / 3
