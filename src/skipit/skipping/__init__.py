"""Apply a skip plan at inference, PEFT-style: `apply_plan(model, plan)` returns the same transformers model, whose
`forward` and `generate()` now skip what the plan says; `remove_plan(model)` puts the original layers back.

Each decoder layer of the language backbone is wrapped in a `SkipLayer` (`layer.py`) that runs the unmodified layer
on only the tokens its role lets through (all of them, text only after vision tokens exit, text plus the vision
tokens pruning kept, or text attending to frozen vision keys); every token keeps its original position. The
per-forward bookkeeping (token subsets, cached key slots, masks) is in `state.py`; the hooks on the model's forward
and the public API in `model.py`. An empty plan passes every call straight to the original layers.

Supported: `DynamicCache` (what `generate()` uses), SDPA or eager attention, greedy/sampling/batched generation,
sliding-window and chunked layers (their masks are built on original positions; their cache layers keep every key
they process) and the bidirectional blocks of the families whose adapter defines them.
Not supported under a plan: static caches, flash attention, continuing from a cache without passing the full
attention mask, `output_hidden_states` (the wrapped layers see token subsets).
"""

from skipit.skipping.layer import SkipLayer
from skipit.skipping.model import applied_plan, apply_plan, remove_plan

__all__ = ["SkipLayer", "applied_plan", "apply_plan", "remove_plan"]
