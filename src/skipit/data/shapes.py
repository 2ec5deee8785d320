"""`shapes`: a procedurally rendered visual QA and captioning dataset, deterministic by seed.

Each scene puts 1-4 shapes in distinct cells of a 3x3 grid. Questions cover colour, shape, size,
count, position (row / column) and existence (yes/no); every image also has one reference caption.
Records follow the JSONL format of :mod:`skipit.data.jsonl`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.22, "large": 0.42}  # half-extent as a fraction of the cell side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "size", "count", "row", "column", "exists")
SPLITS = {"train": 0, "calibration": 1, "test": 2}  # split -> seed offset, so splits never share scenes
# test: 1200 questions, so that a paired 2-point accuracy loss is detectable: McNemar's test needs about 1170
# questions for 80 % power when 6 % of the answers change correctness between the two runs
# (skipit.intervals.mcnemar_sample_size(0.02, 0.06)). Records are drawn in sequence, so the first 600 are the
# 600-question split of earlier releases.
DEFAULT_SIZES = {"train": 6000, "calibration": 256, "test": 1200}
IMAGE_SIZE = 112


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def cell(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "in the center"
        if self.row == 1:
            return f"on the {COLUMNS[self.col]}"
        if self.col == 1:
            return f"at the {ROWS[self.row]}"
        return f"at the {ROWS[self.row]} {COLUMNS[self.col]}"

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.cell}"


def sample_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    return [
        Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), c // 3, c % 3)
        for c in cells
    ]


def render(objs: list[Obj], size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for o in objs:
        _draw(draw, o, size, COLORS[o.color])
    return img


def object_map(objs: list[Obj], size: int = IMAGE_SIZE) -> Image.Image:
    """Which object covers each pixel of `render(objs)`: 0 for the background, i + 1 for `objs[i]` (mode "L")."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(objs):
        _draw(draw, o, size, i + 1)
    return img


def _draw(draw: ImageDraw.ImageDraw, o: Obj, size: int, fill) -> None:
    cell = size / 3
    cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
    r = SIZES[o.size] * cell
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def caption(objs: list[Obj]) -> str:
    ordered = sorted(objs, key=lambda o: (o.row, o.col))
    parts = [o.phrase() for o in ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _unique(objs: list[Obj], attr: str) -> list[Obj]:
    """Objects whose value of `attr` no other object shares (so a question about them is unambiguous)."""
    values = [getattr(o, attr) for o in objs]
    return [o for o in objs if values.count(getattr(o, attr)) == 1]


def ask(objs: list[Obj], qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of type `qtype`, or None when the scene cannot pose it unambiguously."""
    by_shape, by_color = _unique(objs, "shape"), _unique(objs, "color")
    if qtype == "color" and by_shape:
        o = rng.choice(by_shape)
        return f"What color is the {o.shape}?", o.color
    if qtype == "shape" and by_color:
        o = rng.choice(by_color)
        return f"What shape is the {o.color} object?", o.shape
    if qtype == "size" and by_shape:
        o = rng.choice(by_shape)
        return f"Is the {o.shape} small or large?", o.size
    if qtype == "count":
        return "How many shapes are in the image?", NUMBER_WORDS[len(objs)]
    if qtype == "row" and by_shape:
        o = rng.choice(by_shape)
        return f"Is the {o.shape} in the top, middle or bottom row?", ROWS[o.row]
    if qtype == "column" and by_shape:
        o = rng.choice(by_shape)
        return f"Is the {o.shape} in the left, middle or right column?", COLUMNS[o.col]
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"Is there a {o.color} {o.shape} in the image?", "yes"
        present = {(o.color, o.shape) for o in objs}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = rng.choice(absent)
        return f"Is there a {c} {s} in the image?", "no"
    return None


def scene_questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question type the scene can pose, as (question, answer, type), in random order."""
    out = [(*qa, t) for t in QUESTION_TYPES if (qa := ask(objs, t, rng)) is not None]
    rng.shuffle(out)
    return out


def generate_records(split: str, n: int, seed: int = 0):
    """Yield `(image, record)` pairs; one question per image, question types in rotation."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    rng = random.Random(f"shapes/{seed}/{SPLITS[split]}")
    i = 0
    while i < n:
        objs = sample_scene(rng)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        qa = ask(objs, qtype, rng)
        if qa is None:
            continue  # resample the scene so every type keeps its share
        rid = f"{split}-{i:05d}"
        record = {
            "id": rid,
            "image": f"images/{rid}.png",
            "question": qa[0],
            "answer": qa[1],
            "caption": caption(objs),
            "type": qtype,
        }
        yield render(objs), record
        i += 1


def write_split(out_dir: str | Path, split: str, n: int | None = None, seed: int = 0) -> Path:
    """Write `<out_dir>/<split>/{images/*.png, data.jsonl}`; the JSONL is written last, atomically."""
    n = DEFAULT_SIZES[split] if n is None else n
    root = Path(out_dir) / split
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for img, rec in generate_records(split, n, seed):
        img.save(root / rec["image"])
        lines.append(json.dumps(rec))
    tmp = root / "data.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, root / "data.jsonl")
    return root / "data.jsonl"


def ensure_split(root: str | Path, split: str) -> Path:
    """The standard split under `root` (its data.jsonl), generated on first use, and again when its size is not
    the standard one (a cache written by an earlier release)."""
    path = Path(root) / split / "data.jsonl"
    if path.is_file() and sum(1 for line in path.open() if line.strip()) == DEFAULT_SIZES[split]:
        return path
    return write_split(root, split)
