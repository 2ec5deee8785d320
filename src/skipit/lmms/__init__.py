"""lmms-eval plugin: the `skipit` model and the `shapes_vqa` task.

- The model is registered through lmms-eval's ``lmms_eval.models`` entry-point group (see pyproject.toml), so
  ``lmms-eval --model skipit --model_args pretrained=PATH,plan=plan.json`` works once skipit is installed.
- lmms-eval finds tasks only in its own folder or in folders given with ``--include_path``: the ``shapes_vqa`` task
  lives in `TASKS_DIR`, which ``python -m skipit.lmms`` prints.

Nothing here imports lmms-eval until lmms-eval itself loads the plugin.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")
MODEL_ID = "skipit"


def manifest():
    """The entry point's payload: lmms-eval calls it while building its model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="skipit.lmms.model.SkipitLMM")
