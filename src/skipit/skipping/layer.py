"""`SkipLayer`: the wrapper `apply_plan` puts around each decoder layer of the language backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from skipit import compat
from skipit.errors import SkipitError
from skipit.plan import FROZEN, PRUNED, SKIP, Plan
from skipit.skipping.state import gather_tokens, padding_mask, scatter_tokens

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
                 ranks: str | None = None, window: int | None = None, chunk: int | None = None,
                 recurrent: bool = False, index: int = 0, reduces: bool = False):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.runtime = runtime
        # the layer's sliding window and attention chunk (None: none); its masks are built for them on original indices
        self.window, self.chunk = window, chunk
        # a linear-attention layer (`Adapter.recurrent`), and its index in the cache
        self.recurrent, self.index = recurrent, index
        # the backbone's last layer hands the full sequence to the final norm; so does a layer whose output the
        # model edits before the next layer (Qwen3-VL's deepstack injection, `Adapter.injected_after`)
        self.last = last
        # this layer's part in choosing the vision tokens pruning keeps, on its input (see `ranks_at`): "attention"
        # (its attention ranks them), "keys" (it notes its keys' norms) or "states" (its input ranks them)
        self.ranks = ranks
        # layer 0 of a plan with an input stage: DivPrune chooses, on its input X_0, the vision tokens that enter
        self.reduces = reduces

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return (f"role={self.role!r}" + (f", ranks={self.ranks!r}" if self.ranks else "")
                + (", reduces" if self.reduces else "")
                + (f", window={self.window}" if self.window is not None else "")
                + (f", chunk={self.chunk}" if self.chunk is not None else "")
                + (", recurrent" if self.recurrent else ""))  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.runtime.passthrough:  # an empty plan changes nothing: no bookkeeping at all
            return self.base_layer(hidden_states, *args, **kwargs)
        if args:
            raise SkipitError("skipit expects decoder layers to be called with keyword arguments (transformers 5)")
        if self.role == SKIP and self.ranks is None and not self.reduces:
            step = self.runtime.current
            return step.expand(hidden_states) if self.last and step is not None else hidden_states
        self.runtime.adapter.check_positions(kwargs.get("position_embeddings"), self.base_layer)
        cache_name = compat.cache_kwarg(kwargs)  # passed on under the name the model used (renamed in 5.24)
        cache = kwargs.get(cache_name)
        step = self.runtime.step(cache, hidden_states)
        # a throwaway cache lets text tokens attend to the vision keys (a linear-attention layer runs them in order)
        if cache is None and self.role == FROZEN and not self.recurrent:
            cache = step.scratch_cache
        kwargs[cache_name] = cache
        kwargs["position_ids"] = None  # only flash attention reads them, and plans do not run with it
        adapter = self.runtime.adapter
        if self.reduces:
            step.reduce_input(hidden_states)  # layer 0: its input is X_0, the whole sequence
        if self.ranks is not None:
            hidden_states = step.expand(hidden_states)
            if self.ranks == "attention":
                step.rank_vision(self.base_layer, hidden_states, kwargs["position_embeddings"], self.window)
            elif self.ranks == "keys":
                step.note_keys(self.base_layer, hidden_states, kwargs["position_embeddings"])
            else:
                step.rank_states(hidden_states)
        if self.role == SKIP:
            return hidden_states
        if self.recurrent:
            return self._recurrent(step, hidden_states, kwargs)
        for run in step.runs(self.role):
            if run.size == 0:
                continue
            # transformers computed (cos, sin) and the mask for the whole sequence: this run gets its own
            pe = run.positions(kwargs["position_embeddings"], adapter)
            kw = {**kwargs, "attention_mask": run.mask(self.window, self.chunk), "position_embeddings": pe}
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

    def _recurrent(self, step, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """A linear-attention layer: its recurrent state and short causal conv run over the tokens it processes, in
        sequence order (those it does not process are not in its sequence at all), and it gets their 2-D padding
        mask (it zeroes the inputs of padding tokens, which then leave a zero state at zero)."""
        if self.role == FROZEN and step.vision is not None:
            # frozen vision tokens feed the state in sequence order (as their keys do in attention), keep their states
            full = step.expand(hidden_states)
            out = self.base_layer(full, **{**kwargs, "attention_mask": padding_mask(step.valid)})
            out = torch.where(step.vision[..., None], full, out)
        else:
            (run,) = step.runs(self.role)  # every other role makes one run
            sub = step.expand(hidden_states) if run.take is None else step.subset(hidden_states, run.take)
            x, valid, order = sub, run.valid, None
            if run.keep is not None:
                # ragged rows: padding slots go first, where their zeroed inputs leave the fresh state at zero
                cache = compat.get_cache(kwargs)
                if cache is not None and cache.get_conv_state(self.index) is not None:
                    raise SkipitError(
                        f"linear-attention layer {self.index} would run on different numbers of tokens per row in "
                        "a call that continues its cache (padding slots would decay its recurrent state): not "
                        "supported under this plan"
                    )
                order = torch.sort(run.keep.to(torch.int8), dim=1, stable=True).indices
                x, valid = gather_tokens(sub, order), valid.gather(1, order)
            out = self.base_layer(x, **{**kwargs, "attention_mask": padding_mask(valid)})
            if order is not None:  # back to the subset's order; padding slots write back what they read
                out = torch.where(run.keep[..., None], scatter_tokens(out, order, out), sub)
            if run.take is not None:
                out = step.compact(out, run.take)
        return step.expand(out) if self.last else out


def ranks_at(plan: Plan, j: int) -> str | None:
    """Layer j's part in choosing the vision tokens that pruning keeps, done on the layer's input, or None.

    FastV's attention ranking is layer p's (`prune_vision_after`); DART notes layer p's keys, then ranks at the input
    of layer p+1 (X_{p+1}, what layer p+1 reads); DivPrune (p = -1) ranks at the input of layer 0 (X_0). Layer p+1
    ranks even when it is skipped. Nothing ranks when no layer keeps only the chosen tokens.
    """
    p, rank = plan.prune_vision_after, plan.prune_vision_rank
    if p is None or PRUNED not in plan.roles():
        return None
    if rank == "attention":
        return "attention" if j == p else None
    if rank == "dart" and j == p:
        return "keys"
    return "states" if j == p + 1 else None
