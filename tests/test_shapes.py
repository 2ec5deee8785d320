import json
import random

import numpy as np
import pytest

from skipit.data import shapes
from skipit.data.jsonl import load_records
from skipit.data.shapes import Obj, ask, caption, generate_records, render


def test_deterministic_by_seed():
    a = list(generate_records("test", 12, seed=3))
    b = list(generate_records("test", 12, seed=3))
    c = list(generate_records("test", 12, seed=4))
    assert [r for _, r in a] == [r for _, r in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True))
    assert [r["caption"] for _, r in a] != [r["caption"] for _, r in c]


def test_splits_share_no_scene():
    captions = {s: {r["caption"] + r["question"] for _, r in generate_records(s, 200)} for s in ("train", "test")}
    assert len(captions["train"] & captions["test"]) < 5  # only tiny scenes can coincide by chance


def test_every_question_type_in_rotation():
    recs = [r for _, r in generate_records("calibration", 70)]
    assert {r["type"] for r in recs} == set(shapes.QUESTION_TYPES)
    assert all(r.keys() >= {"id", "image", "question", "answer", "caption"} for r in recs)


def test_answers_follow_the_scene():
    scene = [
        Obj("circle", "red", "large", 0, 0),
        Obj("square", "blue", "small", 2, 1),
        Obj("circle", "green", "small", 1, 2),
    ]
    rng = random.Random(0)
    assert ask(scene, "color", rng) == ("What color is the square?", "blue")  # the circle is ambiguous
    assert ask(scene, "shape", random.Random(1))[1] in {"circle", "square"}
    assert ask(scene, "count", rng) == ("How many shapes are in the image?", "three")
    assert ask(scene, "row", rng) == ("Is the square in the top, middle or bottom row?", "bottom")
    assert ask(scene, "column", rng) == ("Is the square in the left, middle or right column?", "middle")
    assert ask(scene, "size", rng) == ("Is the square small or large?", "small")
    for seed in range(20):
        q, a = ask(scene, "exists", random.Random(seed))
        color, shape = q.split()[3:5]
        assert a == ("yes" if any(o.color == color and o.shape == shape for o in scene) else "no")
    assert ask([Obj("circle", "red", "large", 0, 0), Obj("circle", "blue", "large", 0, 1)], "color", rng) is None
    assert caption(scene) == (
        "A large red circle at the top left, a small green circle on the right and a small blue square at the bottom."
    )


def test_render_draws_each_shape_in_its_cell_and_colour():
    scene = [Obj("square", "red", "large", 0, 0), Obj("circle", "blue", "small", 2, 2)]
    img = np.asarray(render(scene))
    cell = shapes.IMAGE_SIZE / 3
    assert tuple(img[int(cell / 2), int(cell / 2)]) == shapes.COLORS["red"]
    assert tuple(img[int(2.5 * cell), int(2.5 * cell)]) == shapes.COLORS["blue"]
    assert tuple(img[int(1.5 * cell), int(1.5 * cell)]) == (245, 245, 245)  # the centre cell is empty


def test_write_split_round_trips_through_the_loader(tmp_path):
    path = shapes.write_split(tmp_path, "test", n=9)
    records = load_records(path)
    assert len(records) == 9
    first = json.loads(path.read_text().splitlines()[0])
    assert records[0].id == first["id"] and records[0].answer == first["answer"]
    assert records[0].load_image().size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert not list(tmp_path.rglob("*.tmp"))


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        next(generate_records("dev", 1))


def test_test_split_is_sized_to_detect_a_two_point_loss_and_extends_the_old_one():
    from skipit.intervals import mcnemar_sample_size

    assert shapes.DEFAULT_SIZES["test"] >= mcnemar_sample_size(0.02, 0.06)
    old = [rec for _, rec in shapes.generate_records("test", 20)]
    new = [rec for _, rec in shapes.generate_records("test", 40)][:20]
    assert old == new  # a larger split starts with the smaller one


def test_ensure_split_regenerates_a_cache_of_another_size(tmp_path, monkeypatch):
    monkeypatch.setitem(shapes.DEFAULT_SIZES, "calibration", 3)
    shapes.write_split(tmp_path, "calibration", n=2)  # as an earlier release with another size wrote it
    path = shapes.ensure_split(tmp_path, "calibration")
    assert len(path.read_text().splitlines()) == 3
    mtime = path.stat().st_mtime_ns
    assert shapes.ensure_split(tmp_path, "calibration").stat().st_mtime_ns == mtime  # the right size is kept
