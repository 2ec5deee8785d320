"""Replaying the untouched model's prefill, layer by layer, under a plan.

A plan changes nothing before its first changed layer: those layers see the input the untouched model gave them and
compute what it computed. When many plans answer the same prompts (a sweep, the composed planner's search), the
untouched model's prefill is recorded once, layer by layer (`Recorder`: each layer's input, output and the keys and
values it cached), and under a plan (`replaying`) a layer whose input is exactly one recorded puts the recorded keys
and values in the cache and returns the recorded output instead of computing it. A layer whose input differs (the
plan changed it, or this is a decoding step) runs as usual, so the replay needs no knowledge of the plan, and a plan
costs the layers from its first change on, as the ablation KL's reruns do (`skipit.capture`).

Only plain `DynamicLayer` caches are replayed (a sliding-window layer's cache keeps a window and counts what it saw:
it runs as usual).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from skipit import compat
from skipit.adapters import get_adapter

BUDGET = 2 * 2**30  # bytes of recorded tensors at most; layers past it are not recorded (they run as usual)


@dataclass
class Call:
    """One prefill call of a layer in the untouched model."""

    input: torch.Tensor
    output: torch.Tensor
    keys: torch.Tensor | None  # what the layer cached (None: no cache, or not a plain DynamicLayer)
    values: torch.Tensor | None


def _base(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", layer)  # under a plan, layers sit in skipit's wrappers


class Recorder:
    """`with Recorder(model) as rec:` records the prefill call of every decoder layer of `model` (a call that
    starts an empty cache, or has none) while the block runs, up to `budget` bytes."""

    def __init__(self, model: nn.Module, budget: int = BUDGET):
        self.layers = get_adapter(model).layers
        self.calls: list[list[Call]] = [[] for _ in self.layers]
        self.budget, self.bytes = budget, 0
        self._hooks, self.recorded = [], False

    def __enter__(self) -> Recorder:
        if not self.recorded:  # one recording: entered again, it records nothing more
            self._hooks = [_base(layer).register_forward_hook(self._record(j), with_kwargs=True)
                           for j, layer in enumerate(self.layers)]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.recorded = [], True

    def _record(self, j: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            cache = compat.get_cache(kwargs)
            keys = values = None
            if cache is not None:
                layer = cache.layers[j] if j < len(cache.layers) else None
                if (type(layer) is not DynamicLayer or not layer.is_initialized
                        or layer.keys.shape[-2] != hidden.shape[1]):  # fmt: skip
                    return  # a decoding step (the cache held more), or a cache the replay does not rebuild
                keys, values = layer.keys, layer.values  # the cache replaces, never edits, these tensors
            size = sum(t.numel() * t.element_size() for t in (hidden, output, keys, values) if t is not None)
            if self.bytes + size > self.budget:
                return
            self.bytes += size
            self.calls[j].append(Call(hidden.clone(), output.clone(), keys, values))

        return hook


class Replay(nn.Module):
    """Stands in for a decoder layer under a plan: a call whose input is exactly a recorded one is answered from the
    record; any other call runs the layer."""

    def __init__(self, layer: nn.Module, j: int, calls: list[Call]):
        super().__init__()
        self.layer, self.j, self.calls = layer, j, calls
        self.replayed = 0  # calls answered from the record

    def __getattr__(self, name):  # the engine reads the layer's attributes (its attention, its window)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        call = next((c for c in self.calls if c.input.shape == hidden_states.shape
                     and torch.equal(c.input, hidden_states)), None)  # fmt: skip
        cache = compat.get_cache(kwargs)
        if call is not None and cache is not None:
            layer = cache.layers[self.j] if self.j < len(cache.layers) else None
            if call.keys is None or type(layer) is not DynamicLayer or layer.is_initialized:
                call = None  # the cache must end as the layer would leave it: only an empty plain layer is rebuilt
            else:
                layer.update(call.keys, call.values)
        if call is None:
            return self.layer(hidden_states, *args, **kwargs)
        self.replayed += 1
        return call.output.clone()  # what follows may write into it


@contextmanager
def replaying(model: nn.Module, recorder: Recorder | None):
    """While the block runs, `model`'s layers (inside the wrappers of an applied plan) answer recorded calls from
    `recorder`. Nothing changes without a recorder or a plan."""
    layers = get_adapter(model).layers
    wrapped = [] if recorder is None else [(layer, j) for j, layer in enumerate(layers)
                                           if hasattr(layer, "base_layer") and recorder.calls[j]]  # fmt: skip
    for layer, j in wrapped:
        layer.base_layer = Replay(layer.base_layer, j, recorder.calls[j])
    try:
        yield
    finally:
        for layer, _ in wrapped:
            layer.base_layer = layer.base_layer.layer
