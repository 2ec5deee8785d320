"""Load VQA / captioning records from JSONL: one object per line with at least "id", "image" and
"question"; "answer" (or "answers", a list of reference answers, as in VQA) and "caption" are needed only by
the tasks that score them. Relative image paths are resolved against the JSONL file's folder.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from skipit.errors import SkipitError

REQUIRED = ("id", "image", "question")


@dataclass
class Record:
    id: str
    image: Path
    question: str
    answer: str | None = None  # with "answers" only: the most common of them (VQA's multiple_choice_answer)
    answers: list[str] | None = None  # several reference answers, for VQA soft accuracy
    caption: str | None = None
    extra: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise SkipitError(f"record {self.id!r}: image file {self.image} does not exist") from None
        except Exception as e:  # PIL raises several types for corrupt files; its message says which problem
            reason = str(e).split("\n")[0] or type(e).__name__
            raise SkipitError(f"record {self.id!r}: cannot read image {self.image} ({reason})") from None


def resolve(path: str | Path) -> Path:
    """A JSONL file, or a folder holding `data.jsonl`."""
    p = Path(path)
    if p.is_dir():
        p = p / "data.jsonl"
    if not p.is_file():
        raise SkipitError(f"no data at {path}: give a JSONL file or a folder containing data.jsonl")
    return p


def _answers(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(a, str | int | float) for a in value):
        raise SkipitError(f'{where}: "answers" must be a non-empty list of strings')
    return [str(a) for a in value]


def load_records(path: str | Path, limit: int | None = None, check_images: bool = True) -> list[Record]:
    """Parse and validate a JSONL data file; errors name the line (and record) to fix."""
    p = resolve(path)
    records: list[Record] = []
    first_line: dict[str, int] = {}  # id -> line: ids key the analysis's sampling and every saved result
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SkipitError(f"{p}: not UTF-8 text (byte {e.start}): save the JSONL file as UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SkipitError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SkipitError(f"{p}:{lineno}: each line must be a JSON object")
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise SkipitError(f"{p}:{lineno}: record lacks {', '.join(missing)}")
        if not isinstance(obj["image"], str) or not obj["image"]:
            raise SkipitError(f'{p}:{lineno}: "image" must be a path (a non-empty string), got {obj["image"]!r}')
        answers = _answers(obj.get("answers"), f"{p}:{lineno}")
        answer = obj.get("answer")
        if answer is None and answers:
            answer = Counter(answers).most_common(1)[0][0]
        rec = Record(
            id=str(obj["id"]),
            image=(p.parent / obj["image"]).resolve(),
            question=str(obj["question"]),
            answer=None if answer is None else str(answer),
            answers=answers,
            caption=obj.get("caption"),
            extra={k: v for k, v in obj.items() if k not in (*REQUIRED, "answer", "answers", "caption")},
        )
        if rec.id in first_line:
            raise SkipitError(f"{p}:{lineno}: record id {rec.id!r} already used on line {first_line[rec.id]}: "
                              "ids must be unique")
        first_line[rec.id] = lineno
        if check_images and not rec.image.is_file():
            raise SkipitError(f"{p}:{lineno}: record {rec.id!r}: image file {rec.image} does not exist")
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise SkipitError(f"{p} holds no records")
    return records
