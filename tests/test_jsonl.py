import json

import pytest
from PIL import Image

from skipit.data.jsonl import load_records
from skipit.errors import SkipitError


def write(tmp_path, rows, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_loads_folder_and_resolves_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write(tmp_path, [{"id": 1, "image": "a.png", "question": "q?", "answer": "yes", "kind": "x"}])
    (rec,) = load_records(tmp_path)
    assert rec.id == "1" and rec.image == (tmp_path / "a.png").resolve() and rec.extra == {"kind": "x"}
    assert rec.load_image().size == (8, 8)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["{not json"], r"data.jsonl:1: not valid JSON"),
        ([{"id": 1, "question": "q"}], r"data.jsonl:1: record lacks image"),
        ([{"id": "r7", "image": "gone.png", "question": "q"}], r"record 'r7': image file .*gone.png does not exist"),
        (["", "  "], r"holds no records"),
        (["[1, 2]"], r"must be a JSON object"),
    ],
)
def test_bad_records_name_what_to_fix(tmp_path, rows, message):
    write(tmp_path, rows)
    with pytest.raises(SkipitError, match=message):
        load_records(tmp_path / "data.jsonl")


def test_missing_data_path(tmp_path):
    with pytest.raises(SkipitError, match="no data at"):
        load_records(tmp_path / "nope")


def test_corrupt_image_names_file_and_record(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    write(tmp_path, [{"id": "r1", "image": "bad.png", "question": "q"}])
    (rec,) = load_records(tmp_path)
    with pytest.raises(SkipitError, match=r"record 'r1': cannot read image .*bad.png \(cannot identify image file"):
        rec.load_image()


def test_ids_are_unique_across_the_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"id": i, "image": "a.png", "question": "q"} for i in ["a", "b", "c", "a"]]
    write(tmp_path, rows)
    with pytest.raises(SkipitError, match=r"data.jsonl:4: record id 'a' already used on line 1: ids must be unique"):
        load_records(tmp_path)


@pytest.mark.parametrize("image", [None, 3, ""])
def test_image_must_be_a_path(tmp_path, image):
    write(tmp_path, [{"id": "r", "image": image, "question": "q"}])
    with pytest.raises(SkipitError, match=r'data.jsonl:1: "image" must be a path'):
        load_records(tmp_path)


def test_non_utf8_file(tmp_path):
    (tmp_path / "data.jsonl").write_bytes('{"id": "é", "image": "a.png", "question": "q"}\n'.encode("latin-1"))
    with pytest.raises(SkipitError, match="not UTF-8 text"):
        load_records(tmp_path)
