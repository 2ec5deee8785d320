"""`skipit.prompts`: one prompt and one left-padded batch for evaluation, calibration and speed, on the tiny LLaVA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer
from PIL import Image

from skipit import prompts
from skipit.analysis import batch_inputs
from skipit.data import shapes
from skipit.data.jsonl import load_records
from skipit.demo.build import build_processor
from skipit.errors import SkipitError
from skipit.evaluation import caption, vqa

QUESTIONS = ["What color is the shape?", "How many shapes are in the image?", "What shape is it?"]


@pytest.fixture
def records(tmp_path):
    """Three records whose questions differ in length, so that a batch of them is padded."""
    rows = []
    for i, (color, question) in enumerate(zip(["red", "blue", "green"], QUESTIONS, strict=True)):
        Image.new("RGB", (28, 28), shapes.COLORS[color]).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "question": question, "answer": color,
                     "caption": f"A {color} shape."})  # fmt: skip
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_records(tmp_path)


@pytest.fixture
def right_padding():
    """A fresh processor like the tiny LLaVA's whose saved tokenizer pads on the right."""
    processor = build_processor(tiny_tokenizer(), image_size=28)
    processor.tokenizer.padding_side = "right"
    return processor


def assert_left_padded(inputs: dict, last_token: int) -> None:
    mask = inputs["attention_mask"]
    assert (mask == 0).any(), "the batch needs padding for the test to mean anything"
    assert (mask[:, -1] == 1).all() and (inputs["input_ids"][:, -1] == last_token).all()
    assert (mask.diff(dim=1) >= 0).all(), "zeros of the attention mask come before its ones, in every row"


def test_right_padding_tokenizers_still_get_left_padded_batches(right_padding, records):
    processor = right_padding
    assistant = processor.tokenizer.convert_tokens_to_ids("assistant")  # the generation prompt's last token
    assert_left_padded(prompts.record_inputs(processor, records), assistant)
    assert_left_padded(batch_inputs(processor, records, vision=True), assistant)  # calibration
    images = [r.load_image() for r in records]
    assert_left_padded(prompts.chat_inputs(processor, images, [r.question for r in records]), assistant)  # bench
    assert processor.tokenizer.padding_side == "right"  # the tokenizer's own setting is left alone

    tokenizer = tiny_tokenizer()  # a text-only model's: no chat template, pads on the right
    assert tokenizer.padding_side == "right"
    text = batch_inputs(tokenizer, records, vision=False)
    assert_left_padded(text, tokenizer.convert_tokens_to_ids("."))  # "... single word or phrase."


def test_batching_on_a_right_padding_processor_does_not_change_answers(tiny_llava, right_padding, records):
    model, _ = tiny_llava
    batched = vqa.evaluate(model, right_padding, records, batch_size=3)
    alone = vqa.evaluate(model, right_padding, records, batch_size=1)
    assert [r["prediction"] for r in batched["predictions"]] == [r["prediction"] for r in alone["predictions"]]


def test_prompt_holds_the_image_placeholders_the_processor_expects(tiny_llava, records):
    model, processor = tiny_llava
    text = prompts.question_text(processor, "What color is the shape?")
    assert text.count(processor.image_token) == 1
    assert text.index(processor.image_token) < text.index("What color is the shape?\n" + prompts.ANSWER_INSTRUCTION)
    assert text.endswith("assistant\n")  # the generation prompt
    assert prompts.caption_text(processor).count(processor.image_token) == 1
    assert prompts.chat_text(processor, "q", n_images=2).count(processor.image_token) == 2
    inputs = prompts.record_inputs(processor, records)
    real = inputs["attention_mask"].bool()
    image_tokens = ((inputs["input_ids"] == model.config.image_token_index) & real).sum(1)
    assert image_tokens.tolist() == [model.config.image_seq_length] * len(records)  # expanded to the vision tokens
    assert inputs["pixel_values"].shape[0] == len(records)


def test_the_old_names_are_the_prompts_module(tiny_llava):
    _, processor = tiny_llava
    assert vqa.prompt_text(processor, "q") == prompts.question_text(processor, "q")
    assert caption.prompt_text(processor) == prompts.caption_text(processor)
    assert caption.CAPTION_PROMPT == prompts.CAPTION_PROMPT and vqa.ANSWER_INSTRUCTION == prompts.ANSWER_INSTRUCTION


def test_calibration_sees_what_evaluation_sends(tiny_llava, records, monkeypatch):
    model, processor = tiny_llava
    sent = []

    def generate(**kwargs):
        sent.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return kwargs["input_ids"]

    monkeypatch.setattr(model, "generate", generate)
    vqa.evaluate(model, processor, records, batch_size=len(records))
    blind = vqa.evaluate(model, processor, records, batch_size=len(records), blind=True)
    assert all(r["prediction"] == "" for r in blind["predictions"])
    evaluation, blind_inputs = sent
    for calibration in (batch_inputs(processor, records, vision=True), vqa.record_inputs(model, processor, records)):
        assert calibration.keys() == evaluation.keys()
        for key, value in evaluation.items():
            assert torch.equal(calibration[key], value), key
    blank = prompts.record_inputs(processor, records, blind=True)
    assert torch.equal(blind_inputs["input_ids"], evaluation["input_ids"])
    assert torch.equal(blank["pixel_values"], blind_inputs["pixel_values"])
    assert not torch.equal(blank["pixel_values"], evaluation["pixel_values"])


def test_text_only_prompts(records):
    tokenizer = tiny_tokenizer()
    text = prompts.record_texts(tokenizer, records, vision=False)[0]  # no chat template: the text as it is
    assert text == f"A red shape.\nWhat color is the shape?\n{prompts.ANSWER_INSTRUCTION}"
    with pytest.raises(SkipitError, match="takes no images"):
        prompts.chat_text(tokenizer, "q", n_images=1)


def test_bos_is_added_once():
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    raw = prompts.model_inputs(tokenizer, ["what color"])["input_ids"][0].tolist()
    templated = prompts.model_inputs(tokenizer, [f"{bos}what color"])["input_ids"][0].tolist()
    assert raw == templated == [bos_id, *tokenizer("what color", add_special_tokens=False)["input_ids"]]


def test_images_load_or_fail_in_one_line(tmp_path):
    Image.new("RGB", (5, 3), (1, 2, 3)).convert("L").save(tmp_path / "a.png")
    image = prompts.load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (5, 3)
    blank = prompts.blank(image)
    assert blank.size == (5, 3) and blank.getpixel((0, 0)) == prompts.BLANK
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SkipitError, match="cannot read image"):
        prompts.load_image(tmp_path / "broken.png")
    with pytest.raises(SkipitError, match="gone.png does not exist"):
        prompts.load_image(tmp_path / "gone.png")
