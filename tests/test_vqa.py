import pytest

from skipit.evaluation.vqa import exact_match, normalize_answer, prompt_messages


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
