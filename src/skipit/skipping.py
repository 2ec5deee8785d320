"""Apply a skip plan at inference, PEFT-style: `apply_plan(model, plan)` returns the same transformers model, whose
`forward` and `generate()` now skip what the plan says; `remove_plan(model)` puts the original layers back.

Each decoder layer of the language backbone is wrapped in a `SkipLayer`. Per forward call, the wrapper gathers the
tokens its layer must process (for instance text only, once vision tokens have exited), runs the unmodified layer
on that shorter sequence and scatters the results back; tokens it did not process keep their hidden state.
Consecutive layers that process the same subset pass it on compacted (gathered once, scattered back once, at the
first layer that needs other tokens or at the last layer), and each group's mask is built once per forward call.
So:
- a layer never sees, computes or caches the tokens it skips: its KV cache is shorter (transformers 5 keeps one
  cache per layer, `cache_utils.DynamicLayer`, so layers may hold different numbers of keys);
- every token keeps its original position: the layer gets the rotary (cos, sin) of exactly its tokens, sliced from
  what the backbone computed for the whole sequence (M-RoPE included);
- the attention mask is built here for each group of layers that cache the same tokens, from each cached key's
  original sequence index (causality) and validity (left padding, and padding slots when rows have different
  numbers of vision tokens: the subset is padded to the longest row and the extra slots masked).
An empty plan passes every call straight to the original layers (no bookkeeping, so no overhead).
Late entry `frozen` first writes the vision tokens' keys/values to the layer's cache (k and v projections only, for
the attention classes `skipit.adapters.base.KEYS_VALUES_ONLY` lists; otherwise the whole attention runs and its
output is discarded), then runs the whole layer on the text tokens, which attend to those keys.
Pruning (`prune_vision_after`, FastV-style) ranks the vision tokens in the forward call that carries them, at the
layer named, by the last real token's attention (`Adapter.last_query_attention`, computed beside the layer, which
keeps SDPA); later layers process the kept ones as a subset, like text tokens after an early exit.

Vision tokens are the family's image/video placeholder ids in a forward call that carries pixels (see
`skipit.adapters`). Supported: `DynamicCache` (what `generate()` uses), SDPA or eager attention, greedy/sampling/
batched generation. Not supported under a plan: static/sliding-window caches, flash attention, continuing from a
cache without passing the full attention mask, `output_hidden_states` (the wrapped layers see token subsets).
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers import DynamicCache

from skipit import compat
from skipit.adapters import Adapter, get_adapter
from skipit.capture import answer_index
from skipit.errors import SkipitError
from skipit.plan import ABSENT, ALL, FROZEN, PRUNED, SKIP, Plan

_ATTR = "_skipit_runtime"


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make `model` follow `plan` (replacing any plan applied before); returns the same model object.

    The model keeps its class, `forward` and `generate()`. While a plan is applied the decoder layers sit inside
    `SkipLayer` wrappers (state-dict keys gain `.base_layer`): save the plan with `plan.save()`, and call
    `remove_plan` before `save_pretrained`.
    """
    if getattr(model, _ATTR, None) is not None:
        remove_plan(model)
    plan.check(model)
    adapter = get_adapter(model)
    if adapter.attn_implementation not in ("sdpa", "eager"):
        raise SkipitError(
            f"attention implementation {adapter.attn_implementation!r} is not supported by skip plans: "
            "load the model with attn_implementation='sdpa'"
        )
    if any(DynamicCache(config=model.config).is_sliding):  # transformers' own reading of the config
        raise SkipitError(
            f"{type(model).__name__} has sliding-window attention layers, which skip plans do not support "
            "(their cache drops old keys)"
        )
    runtime = _Runtime(model, adapter, plan)
    layers = adapter.layers
    for j, role in enumerate(plan.roles()):
        layers[j] = SkipLayer(layers[j], role, runtime, last=j == len(layers) - 1,
                              prunes=j == plan.prune_vision_after and role == ALL)
    runtime.hooks = [
        model.register_forward_pre_hook(runtime.before_forward, with_kwargs=True),
        model.register_forward_hook(runtime.after_forward, always_call=True),
    ]
    setattr(model, _ATTR, runtime)
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo `apply_plan`: the original layer modules are back in place and no hook remains."""
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        return model
    layers = runtime.adapter.layers
    for j, layer in enumerate(layers):
        if isinstance(layer, SkipLayer):
            layers[j] = layer.base_layer
    for hook in runtime.hooks:
        hook.remove()
    delattr(model, _ATTR)
    return model


def applied_plan(model: nn.Module) -> Plan | None:
    runtime = getattr(model, _ATTR, None)
    return runtime.plan if runtime is not None else None


class SkipLayer(nn.Module):
    """A decoder layer that processes only the tokens its role lets through (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, role: str, runtime: _Runtime, last: bool = False,
                 prunes: bool = False):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.role = role
        self.runtime = runtime
        self.last = last  # the backbone's last layer hands the full sequence to the final norm
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
        for part in step.parts(self.role):
            if part.size == 0:
                continue
            pe = part.positions(kwargs["position_embeddings"], adapter)
            kw = {**kwargs, "attention_mask": part.mask, "position_embeddings": pe}
            if part.take is None:
                hidden_states = self.base_layer(step.expand(hidden_states), **kw)
            elif part.attention_only:  # frozen vision tokens: cache their keys/values, keep their states
                adapter.cache_keys_values(self.base_layer, _take(step.full(hidden_states), part.take), kw)
            else:
                sub = step.subset(hidden_states, part.take)
                out = self.base_layer(sub, **kw)
                if part.keep is not None:  # padding slots write back what they read
                    out = torch.where(part.keep[..., None], out, sub)
                hidden_states = step.compact(out, part.take)
        return step.expand(hidden_states) if self.last else hidden_states


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _put(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), values)


class _Keys:
    """What one group of layers (same role, so same cached tokens) holds in its caches, one entry per key slot."""

    def __init__(self):
        self.index = self.valid = None  # (batch, keys): original sequence index, and whether a real token
        self.dense = True  # no invalid slot so far

    def add(self, index: torch.Tensor, valid: torch.Tensor, dense: bool) -> int:
        """Append slots; returns how many were there before."""
        before = 0 if self.index is None else self.index.shape[1]
        self.index = index if self.index is None else torch.cat([self.index, index], 1)
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], 1)
        self.dense = self.dense and dense
        return before


class _Part:
    """One run of a layer (or of its attention only) on a subset of the current tokens."""

    def __init__(self, take, keep, mask, size, attention_only=False):
        self.take = take  # (batch, n) token indices in the current call, or None: all tokens in order
        self.keep = keep  # (batch, n) False at padding slots of ragged rows, or None: no padding slot
        self.mask = mask
        self.size = size
        self.attention_only = attention_only
        self._pe = None

    def positions(self, position_embeddings, adapter: Adapter):
        if self.take is None:
            return position_embeddings
        if self._pe is None or self._pe[0] is not position_embeddings:  # same (cos, sin) object for all layers
            self._pe = (position_embeddings, adapter.take_positions(position_embeddings, self.take))
        return self._pe[1]


class _Step:
    """Everything shared by the layers during one forward call: token kinds, slots and masks per role."""

    def __init__(self, runtime: _Runtime, cache, hidden: torch.Tensor):
        call = runtime.call
        if call is None:
            raise SkipitError("a model with a skip plan must be called through its own forward or generate()")
        B, T = hidden.shape[:2]
        self.runtime, self.dtype, self.device = runtime, hidden.dtype, hidden.device
        self.state = runtime.cache_state(cache)
        seen = self.state.seen
        self.index = (torch.arange(T, device=self.device) + seen).expand(B, T)
        mask = call.attention_mask
        if mask is None:
            self.valid, self.all_valid = torch.ones(B, T, dtype=torch.bool, device=self.device), True
        elif mask.ndim != 2 or mask.shape[1] != seen + T:
            raise SkipitError(
                f"a skip plan needs the 2-D attention mask of the whole sequence ({seen + T} tokens), "
                f"got shape {tuple(mask.shape)}"
            )
        else:
            self.valid = mask[:, -T:].to(self.device, torch.bool)
            self.all_valid = bool(self.valid.all())
        vision = call.vision
        self.vision = vision.to(self.device) if vision is not None and bool(vision.any()) else None
        self.state.seen += T
        self._parts, self._selections = {}, {}
        self._scratch = None
        self.kept = None  # (batch, seq) vision tokens kept by pruning, once the pruning layer has ranked them
        # Layers that process the same subset in a row pass it on compacted: gathered once, scattered back once.
        self._full = None  # the whole sequence as it was when the subset was taken (rows outside it stay current)
        self._subset = None  # the `take` index of the subset being passed on, or None: the whole sequence is

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole sequence, current outside the subset being passed on (enough to read vision tokens)."""
        return hidden if self._subset is None else self._full

    def expand(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._subset is None:
            return hidden
        hidden = _put(self._full, self._subset, hidden)
        self._full = self._subset = None
        return hidden

    def subset(self, hidden: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        if self._subset is take:
            return hidden
        self._full = self.expand(hidden)
        return _take(self._full, take)

    def compact(self, hidden: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        self._subset = take
        return hidden

    @property
    def scratch_cache(self) -> DynamicCache:
        if self._scratch is None:
            self._scratch = DynamicCache()
        return self._scratch

    def rank_vision(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> None:
        """Keep, in each row, the share `prune_vision_keep` (rounded up) of its vision tokens that the row's last
        real token attends to most in `layer`, whose input is `hidden` (the whole sequence)."""
        if self.vision is None or self.kept is not None:
            return
        last = answer_index(self.valid)
        weights = self.runtime.adapter.last_query_attention(layer, hidden, position_embeddings, self.valid, last)
        weights = weights.masked_fill(~self.vision, -1.0)
        counts = torch.ceil(self.vision.sum(1) * self.runtime.plan.prune_vision_keep).long()
        rank = weights.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        self.kept = self.vision & (rank < counts[:, None])

    def parts(self, role: str) -> list[_Part]:
        if role not in self._parts:
            self._parts[role] = self._make_parts(role)
        return self._parts[role]

    def _make_parts(self, role: str) -> list[_Part]:
        keys = self.state.keys.setdefault(role, _Keys())
        if role == ALL or self.vision is None:
            return [self._part(keys, None, ordered=True)]
        if role == ABSENT:
            return [self._part(keys, "text", ordered=True)]
        if role == PRUNED:
            return [self._part(keys, "kept", ordered=True)]
        assert role == FROZEN
        vision = self._part(keys, "vision", ordered=True, attention_only=True)
        return [vision, self._part(keys, "text", ordered=False)]

    def _select(self, name: str):
        """(take, keep, index, valid) of the text, the vision or the text and kept vision tokens; the same objects
        for every role."""
        if name not in self._selections:
            select = self.vision if name == "vision" else ~self.vision
            if name == "kept":
                select = select | self.kept
            counts = select.sum(1)
            n = int(counts.max())
            # kept tokens first, in sequence order; rows with fewer of them are padded with other tokens
            take = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices[:, :n]
            keep = select.gather(1, take)
            keep = None if bool((counts == n).all()) else keep
            index, valid = self.index.gather(1, take), self.valid.gather(1, take)
            if keep is not None:
                valid = valid & keep
            self._selections[name] = take, keep, index, valid
        return self._selections[name]

    def _part(self, keys: _Keys, select: str | None, ordered: bool, attention_only: bool = False) -> _Part:
        """Slots for the tokens in `select` (None: all), appended to `keys`, with the mask their queries need."""
        if select is None:
            take, keep, index, valid = None, None, self.index, self.valid
        else:
            take, keep, index, valid = self._select(select)
        size = index.shape[1]
        dense = self.all_valid and keep is None
        before = keys.add(index, valid, dense)
        mask = None if attention_only else self._mask(keys, before, index, ordered)
        return _Part(take, keep, mask, size, attention_only)

    def _mask(self, keys: _Keys, before: int, q_index: torch.Tensor, ordered: bool):
        n = q_index.shape[1]
        sdpa = self.runtime.adapter.attn_implementation == "sdpa"
        # No mask where SDPA's own handling is exact: one query that may see every key, or a plain causal prefill.
        if keys.dense and (n == 1 or (sdpa and ordered and before == 0)):
            return None
        allowed = keys.valid[:, None, :] & (keys.index[:, None, :] <= q_index[:, :, None])
        # A query always sees its own key: keeps padding queries finite (a fully masked row gives NaN in SDPA).
        q = torch.arange(n, device=self.device)
        allowed[:, q, before + q] = True
        allowed = allowed[:, None]
        if sdpa:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min
        )


class _CacheState:
    def __init__(self):
        self.seen = 0  # tokens of the sequence processed so far
        self.keys: dict[str, _Keys] = {}  # per role


class _Call:
    def __init__(self, vision, attention_mask):
        self.vision, self.attention_mask = vision, attention_mask


class _Runtime:
    """Per-model state of an applied plan: the current forward call, and per-cache bookkeeping."""

    def __init__(self, model: nn.Module, adapter: Adapter, plan: Plan):
        self.adapter, self.plan = adapter, plan
        self.passthrough = plan.is_empty
        self.signature = inspect.signature(model.forward)
        self.var_kwargs = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self.states = weakref.WeakKeyDictionary()  # cache object -> _CacheState; dies with the cache
        self.call: _Call | None = None
        self._step: _Step | None = None
        self.hooks = []

    def before_forward(self, module, args, kwargs):
        if self.passthrough:
            return
        inputs = kwargs  # generate() passes keywords only: binding them to the signature would change nothing
        if args:
            inputs = dict(self.signature.bind_partial(*args, **kwargs).arguments)
            inputs.update(inputs.pop(self.var_kwargs, None) or {})
        mask = inputs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise SkipitError("a skip plan needs a 2-D attention mask tensor (static caches are not supported)")
        cache = compat.get_cache(inputs)
        state = self.states.get(cache) if cache is not None else None
        # transformers infers missing positions from layer 0's cache length, which a plan may have shortened
        if state is not None and inputs.get("position_ids") is None and cache.get_seq_length() != state.seen:
            raise SkipitError(
                "this plan keeps layer 0's cache shorter than the sequence, so positions cannot be inferred from it: "
                "pass position_ids when continuing from a cache (generate() does)"
            )
        self.call = _Call(self.adapter.vision_mask(inputs.get("input_ids"), inputs), mask)
        self._step = None

    def after_forward(self, module, args, output):
        self.call, self._step = None, None

    @property
    def current(self) -> _Step | None:
        return self._step

    def step(self, cache, hidden: torch.Tensor) -> _Step:
        if self._step is None:
            self._step = _Step(self, cache, hidden)
        return self._step

    def cache_state(self, cache) -> _CacheState:
        if cache is None:
            return _CacheState()
        if cache not in self.states:
            if not isinstance(cache, DynamicCache) or any(cache.is_sliding):
                raise SkipitError(
                    f"skip plans need a DynamicCache without sliding-window layers, got a {type(cache).__name__}"
                )
            self.states[cache] = _CacheState()
        return self.states[cache]
