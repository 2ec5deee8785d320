"""Evaluation: scoring tasks behind a registry, speed and memory, sweeps of many plans.

A task is a module with
- `check_options(blind, with_blind)`: refuse options the task cannot honour (SkipitError);
- `check_scorable(records)`: refuse records it cannot score, before any model loads (SkipitError);
- `run(model, processor, records, batch_size, *, blind, with_blind, track)`: the scored result, a JSON-able dict;
  `track(description, total)` returns a callback `advance(n)` for progress;
- `speed_prompts(processor, records, batch_size)`: (images, prompt texts) of its first batch, for speed.
It is registered in `TASKS` by name and module path (imported on first use); `register_task` adds one.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from skipit.errors import SkipitError

TASKS: dict[str, str] = {
    "vqa": "skipit.evaluation.vqa",  # exact match and VQA soft accuracy
    "caption": "skipit.evaluation.caption",  # CIDEr-D
}


def register_task(name: str, module: str) -> None:
    """Register the task module `module` (an import path) under `name`."""
    if name in TASKS and TASKS[name] != module:
        raise ValueError(f"task {name!r} is registered already ({TASKS[name]})")
    TASKS[name] = module


def get_task(name: str) -> ModuleType:
    """The task module registered as `name`."""
    if name not in TASKS:
        raise SkipitError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return import_module(TASKS[name])
