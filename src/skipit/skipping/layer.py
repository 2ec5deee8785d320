"""`SkipLayer`: the wrapper `apply_plan` puts around each decoder layer of the language backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from skipit import compat
from skipit.errors import SkipitError
from skipit.plan import FROZEN, SKIP
from skipit.skipping.state import gather_tokens

if TYPE_CHECKING:
    from skipit.skipping.model import PlanRuntime


class SkipLayer(nn.Module):
    """A decoder layer that processes only the tokens its role lets through.

    Per forward call it gathers those tokens (for instance text only, once vision tokens have exited), runs the
    unmodified `base_layer` on that shorter sequence and scatters the results back; tokens it did not process keep
    their hidden state. So the layer never sees, computes or caches the tokens it skips: its KV cache is shorter
    (transformers 5 keeps one cache per layer, so layers may hold different numbers of keys).
    """

    def __init__(self, base_layer: nn.Module, role: str, runtime: PlanRuntime, last: bool = False,
                 prunes: bool = False):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.runtime = runtime
        # the backbone's last layer hands the full sequence to the final norm; so does a layer whose output the
        # model edits before the next layer (Qwen3-VL's deepstack injection, `Adapter.injected_after`)
        self.last = last
        self.prunes = prunes  # this layer's attention ranks the vision tokens that later layers keep

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"role={self.role!r}"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.runtime.passthrough:  # an empty plan changes nothing: no bookkeeping at all
            return self.base_layer(hidden_states, *args, **kwargs)
        if args:
            raise SkipitError("skipit expects decoder layers to be called with keyword arguments (transformers 5)")
        if self.role == SKIP:
            step = self.runtime.current
            return step.expand(hidden_states) if self.last and step is not None else hidden_states
        pe = kwargs.get("position_embeddings")
        if not (isinstance(pe, (tuple, list)) and len(pe) == 2
                and all(isinstance(t, torch.Tensor) and not t.is_complex() for t in pe)):  # fmt: skip
            raise SkipitError(
                f"skip plans need {type(self.base_layer).__name__} to receive its rotary positions as a real "
                f"(cos, sin) pair, which keeps each token's position when tokens are dropped; got {type(pe).__name__}"
            )
        cache_name = compat.cache_kwarg(kwargs)  # passed on under the name the model used (renamed in 5.24)
        cache = kwargs.get(cache_name)
        step = self.runtime.step(cache, hidden_states)
        if cache is None and self.role == FROZEN:  # a throwaway cache lets text tokens attend to the vision keys
            cache = step.scratch_cache
        kwargs[cache_name] = cache
        kwargs["position_ids"] = None  # only flash attention reads them, and plans do not run with it
        adapter = self.runtime.adapter
        if self.prunes:
            hidden_states = step.expand(hidden_states)
            step.rank_vision(self.base_layer, hidden_states, kwargs["position_embeddings"])
        for run in step.runs(self.role):
            if run.size == 0:
                continue
            # transformers computed (cos, sin) and the mask for the whole sequence: this run gets its own
            pe = run.positions(kwargs["position_embeddings"], adapter)
            kw = {**kwargs, "attention_mask": run.mask, "position_embeddings": pe}
            if run.take is None:
                hidden_states = self.base_layer(step.expand(hidden_states), **kw)
            elif run.attention_only:  # frozen vision tokens: cache their keys/values, keep their states
                adapter.cache_keys_values(self.base_layer, gather_tokens(step.full(hidden_states), run.take), kw)
            else:
                sub = step.subset(hidden_states, run.take)
                out = self.base_layer(sub, **kw)
                if run.keep is not None:  # padding slots write back what they read
                    out = torch.where(run.keep[..., None], out, sub)
                hidden_states = step.compact(out, run.take)
        return step.expand(hidden_states) if self.last else hidden_states
