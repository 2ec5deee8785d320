"""The `shapes_vqa` lmms-eval task: skipit's `shapes` test split, scored as `skipit.evaluation.vqa` scores it.

lmms-eval loads tasks from YAML files only (tasks/shapes_vqa.yaml, found through --include_path); the YAML names
`ShapesVQATask` as its class because the data's location is known only at run time: the split is generated on
first use under skipit's cache (``$SKIPIT_CACHE/shapes/test``, the one `skipit demo` uses). A YAML that includes
shapes_vqa.yaml and sets ``dataset_kwargs: {data_files: {test: /path/data.jsonl}}`` scores any skipit JSONL file
instead (image paths relative to the file, as everywhere in skipit).
"""

from __future__ import annotations

import math
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from skipit.data.shapes import QUESTION_TYPES
from skipit.evaluation.vqa import ANSWER_INSTRUCTION, exact_match


class ShapesVQATask(ConfigurableTask):
    def __init__(self, config: dict | None = None, model_name: str | None = None) -> None:
        from skipit.demo.build import shapes_split  # torch and transformers: only when the task is built

        config = {k: v for k, v in (config or {}).items() if k != "class"}
        kwargs = dict(config.get("dataset_kwargs") or {})
        files = kwargs.get("data_files") or {"test": str(shapes_split("test"))}
        if isinstance(files, str):
            files = {config.get("test_split") or "test": files}
        kwargs["data_files"] = files
        config["dataset_kwargs"] = kwargs
        root = Path(files[config.get("test_split") or "test"]).resolve().parent
        config["process_docs"] = lambda docs: docs.map(lambda doc: {"image": str(root / doc["image"])})
        super().__init__(config=config, model_name=model_name)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(doc["image"]) as im:  # as skipit.data.jsonl.Record.load_image
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    pre, post = kwargs.get("pre_prompt", ""), kwargs.get("post_prompt", f"\n{ANSWER_INSTRUCTION}")
    return f"{pre}{doc['question']}{post}"


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    """exact_match over all questions; exact_match_<type> is None for questions of another type."""
    correct = float(exact_match(results[0], doc["answer"]))
    kind = doc.get("type")
    return {"exact_match": correct, **{f"exact_match_{t}": correct if t == kind else None for t in QUESTION_TYPES}}


def mean_of_scored(items: list) -> float:
    """Mean over the questions a per-type metric scored (NaN when the evaluated questions have none of that type)."""
    scored = [x for x in items if x is not None]
    return sum(scored) / len(scored) if scored else math.nan
