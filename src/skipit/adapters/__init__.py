"""Model-family adapters: the only code in skipit that knows where a model keeps its layers and vision tokens.

One registry (`registry.FAMILIES`) names the families; the generic `Adapter` reads everything else off the model.
"""

from __future__ import annotations

from torch import nn

from skipit.adapters.base import Adapter
from skipit.adapters.registry import FAMILIES, Family, family_for_type, supported_classes, supported_families
from skipit.errors import SkipitError


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family (its config's model_type), or the generic adapter for a model type the
    registry does not list; one line naming what was looked for when the model's layout is not the common one."""
    family = family_for_type(getattr(getattr(model, "config", None), "model_type", None))
    try:
        if family is None:
            return Adapter(model)
        return family.adapter(model, family.name)
    except SkipitError as e:
        raise SkipitError(f"{e}; supported model classes: {supported_classes()}") from None


def family_refusal(adapter: Adapter) -> str | None:
    """Why a non-empty skip plan cannot run exactly on the adapter's model, or None."""
    family = family_for_type(getattr(adapter.model.config, "model_type", None))
    if family is not None and family.refused:
        return family.refused
    return adapter.plan_refusal()


__all__ = ["FAMILIES", "Adapter", "Family", "family_for_type", "family_refusal", "get_adapter", "supported_families"]
