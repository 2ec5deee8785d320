"""skipit: label-free conditions for skipping layers of vision-language models, and the tools to apply them."""

from skipit.errors import SkipitError
from skipit.models import load

__all__ = ["Analysis", "Plan", "SkipitError", "analyze", "apply_plan", "compose_plan", "load", "make_plan",
           "remove_plan"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The API that pulls in torch (analysis, plans, skipping), imported on first use."""
    if name in ("analyze", "Analysis"):
        from skipit import analysis

        return getattr(analysis, name)
    if name == "Plan":
        from skipit.plan import Plan

        return Plan
    if name == "make_plan":
        from skipit.planner import make_plan

        return make_plan
    if name == "compose_plan":
        from skipit.composer import compose_plan

        return compose_plan
    if name in ("apply_plan", "remove_plan"):
        from skipit import skipping

        return getattr(skipping, name)
    raise AttributeError(f"module 'skipit' has no attribute {name!r}")
