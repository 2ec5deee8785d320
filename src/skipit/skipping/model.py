"""The public API (`apply_plan`, `remove_plan`, `applied_plan`) and the per-model runtime it installs: hooks on the
model's forward that record each call, and per-cache bookkeeping that outlives the call."""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from skipit import compat
from skipit.adapters import Adapter, family_refusal, get_adapter
from skipit.errors import SkipitError
from skipit.plan import SKIP, Plan
from skipit.skipping.layer import SkipLayer, ranks_at
from skipit.skipping.state import CacheState, ForwardCall, ForwardStep

_ATTR = "_skipit_runtime"


class PlanRuntime:
    """Per-model state of an applied plan: the current forward call, and per-cache bookkeeping."""

    def __init__(self, model: nn.Module, adapter: Adapter, plan: Plan):
        self.adapter, self.plan = adapter, plan
        self.passthrough = plan.is_empty
        self.signature = inspect.signature(model.forward)
        self.var_kwargs = next(
            (p.name for p in self.signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self.states = weakref.WeakKeyDictionary()  # cache object -> CacheState; dies with the cache
        self.call: ForwardCall | None = None
        self._step: ForwardStep | None = None
        self.hooks = []
        roles, recurrent = plan.roles(), adapter.recurrent
        # a layer per role that caches keys (a linear-attention layer keeps a fixed-size state instead)
        self.first_layer = {}
        for j, role in enumerate(roles):
            if role != SKIP and not recurrent[j]:
                self.first_layer.setdefault(role, j)

    def before_forward(self, module, args, kwargs):
        if self.passthrough:
            return
        inputs = kwargs  # generate() passes keywords only: binding them to the signature would change nothing
        if args:
            inputs = dict(self.signature.bind_partial(*args, **kwargs).arguments)
            inputs.update(inputs.pop(self.var_kwargs, None) or {})
        for flag in ("output_hidden_states", "output_attentions"):
            if inputs.get(flag, getattr(module.config, flag, False)):
                raise SkipitError(
                    f"{flag} is not supported under a skip plan (the layers see token subsets, so it would return "
                    "short tensors): measure without a plan (skipit.capture), or remove_plan first"
                )
        self.adapter.check_call(inputs, self.plan)  # what the family cannot run exactly in this call
        mask = inputs.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise SkipitError("a skip plan needs a 2-D attention mask tensor (static caches are not supported)")
        cache = compat.get_cache(inputs)
        state = self.states.get(cache) if cache is not None else None
        # transformers infers missing positions from the cache's length, one layer's (which one differs by release, see
        # compat), and a plan may have left that layer short: asking the cache itself is right on every release
        if state is not None and inputs.get("position_ids") is None and cache.get_seq_length() != state.seen:
            raise SkipitError(
                "this plan keeps the cache layer transformers reads the sequence length from (cache.get_seq_length()) "
                "shorter than the sequence, so positions cannot be inferred from it: "
                "pass position_ids when continuing from a cache (generate() does)"
            )
        if state is not None:
            self.check_cache(cache, state)
        # vision tokens: the family's image/video placeholder ids, in a call that carries pixels
        vision = self.adapter.vision_mask(inputs.get("input_ids"), inputs)
        # bidirectional blocks of the model's mask (token_type_ids), for the families whose adapter defines them
        # (the plan's own count: layer 0's cache is empty when the plan skips it)
        first = cache is None or (cache.get_seq_length() if state is None else state.seen) == 0
        self.call = ForwardCall(vision, mask, self.adapter.blocks(inputs, first))
        self._step = None

    def check_cache(self, cache, state: CacheState) -> None:
        """Refuse a cache edited outside the plan's bookkeeping: cropped (assisted or prompt-lookup decoding,
        `assistant_model=`) or reordered in length, each group of layers must still hold the keys it cached."""
        for role, keys in state.keys.items():
            j = self.first_layer.get(role)
            if j is None or keys.index is None or j >= len(cache.layers):
                continue
            if cache.layers[j].get_seq_length() != keys.index.shape[1]:
                raise SkipitError(
                    "the cache was cropped or edited between calls (assisted or prompt-lookup decoding, "
                    "assistant_model=): not supported under a skip plan"
                )

    def after_forward(self, module, args, output):
        self.call, self._step = None, None

    @property
    def current(self) -> ForwardStep | None:
        return self._step

    def step(self, cache, hidden: torch.Tensor) -> ForwardStep:
        """The current call's step, made by the first layer that processes tokens."""
        if self._step is None:
            if self.call is None:
                raise SkipitError("a model with a skip plan must be called through its own forward or generate()")
            self._step = ForwardStep(self.call, self.cache_state(cache), self.adapter, self.plan, hidden)
        return self._step

    def cache_state(self, cache) -> CacheState:
        if cache is None:
            return CacheState()
        if cache not in self.states:
            if not isinstance(cache, DynamicCache):
                raise SkipitError(f"skip plans need a DynamicCache, got a {type(cache).__name__}")
            keep_all_keys(cache)
            self.states[cache] = CacheState()
        return self.states[cache]


def keep_all_keys(cache: DynamicCache) -> None:
    """Make the sliding-window layers of a fresh `cache` keep every key their layer processes.

    transformers' sliding cache layer (`DynamicSlidingWindowLayer`) keeps the last `sliding_window - 1` keys by count,
    which is the window only when the layer caches every token in order. Under a plan a layer caches a subset, with
    padding slots for ragged rows and frozen vision keys ahead of the text, so counting slots would drop keys still
    inside the window. These layers become full `DynamicLayer`s, and the window is applied by the mask, on original
    sequence indices (what transformers' own mask does over a full cache). A cache whose sliding layers already hold
    keys (filled without the plan) is refused.
    """
    for j, layer in enumerate(cache.layers):
        if not getattr(layer, "is_sliding", False):
            continue
        if layer.is_initialized:
            raise SkipitError(
                f"a skip plan cannot continue a cache whose sliding-window layer {j} was filled without it "
                "(it has dropped keys by count): start from an empty cache"
            )
        cache.layers[j] = DynamicLayer()


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
    if not plan.is_empty:  # an empty plan passes every call straight through: exact on the layers it serves
        _check_supported(model, adapter, plan)
    runtime = PlanRuntime(model, adapter, plan)
    layers = adapter.layers
    for j, role in enumerate(plan.roles()):
        # a layer whose output the model edits before the next layer (an injection) hands on the whole sequence
        whole = j == len(layers) - 1 or j in adapter.injected_after
        layers[j] = SkipLayer(layers[j], role, runtime, last=whole, ranks=ranks_at(plan, j),
                              window=adapter.windows[j], chunk=adapter.chunks[j], recurrent=adapter.recurrent[j],
                              index=j, reduces=j == 0 and plan.input_vision_keep is not None)  # fmt: skip
    runtime.hooks = [
        model.register_forward_pre_hook(runtime.before_forward, with_kwargs=True),
        model.register_forward_hook(runtime.after_forward, always_call=True),
    ]
    setattr(model, _ATTR, runtime)
    return model


def _check_supported(model: nn.Module, adapter: Adapter, plan: Plan) -> None:
    """One line saying why a non-empty plan cannot run exactly on `model`, if it cannot."""
    name = type(model).__name__
    if why := family_refusal(adapter):
        raise SkipitError(f"skip plans are not supported on {name}: {why}")
    windows = [getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
               for layer in DynamicCache(config=model.config).layers]  # transformers' own reading of the config
    # transformers' cache keeps a chunked layer's keys as a sliding layer's, the chunk as its window
    local = [w if w is not None else c for w, c in zip(adapter.windows, adapter.chunks, strict=True)]
    if any(windows) and windows != local:
        raise SkipitError(
            f"{name}'s sliding windows per layer {windows} (its cache) differ from those of its layer types "
            f"{local}: skip plans cannot tell which mask each layer uses"
        )
    if plan.prune_vision_after is not None and plan.prune_vision_rank in ("attention", "dart"):
        # FastV's weights and DART's keys are computed beside the layer, from its own projections
        adapter.check_ranking(adapter.layers[plan.prune_vision_after])
        if adapter.chunks[plan.prune_vision_after] is not None:  # the weights beside it know no chunks
            raise SkipitError(f"pruning vision tokens by attention is not supported in {name}'s chunked layers")
    generation = getattr(model, "generation_config", None)
    if getattr(generation, "cache_implementation", None) not in (None, "dynamic"):
        raise SkipitError(
            f"skip plans need a DynamicCache; {name}'s generation_config asks for a "
            f"{generation.cache_implementation!r} cache"
        )


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
    """The plan `model` follows, or None."""
    runtime = getattr(model, _ATTR, None)
    return runtime.plan if runtime is not None else None
