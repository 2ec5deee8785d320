"""Hooks that stream a model's hidden states (and, during calibration, attention weights) into skipit's
accumulators. No transformers code is copied or patched: PyTorch forward hooks on the decoder layers, found
through the family adapter, read what the unmodified forward computes.

Named hook points (decoder layers 0..L-1, layer j maps X_j to X_{j+1}):
- `layers.0.resid_pre`: forward pre-hook on layer 0, X_0 (the input embeddings, vision features included);
- `layers.{j}.resid_post`: forward hook on layer j, X_{j+1}: the raw residual stream, before the final norm; where
  the model writes into the stream between layers j and j+1 (Qwen3-VL's DeepStack, `Adapter.injected_after`),
  a forward pre-hook on layer j+1 instead, so that X_{j+1} is what layer j+1 reads, injection included;
- `layers.{j}.attn_weights`: forward hook on layer j's attention module, its weights [B, H, Q, K]. Attention
  modules return weights only under eager attention, so a `Calibrator` switches the language backbone to eager
  while it is open and restores the previous implementation on exit (inference keeps SDPA).

Modalities: `vision` = the adapter's vision positions, `text` = every other real token of the prompt; padding (the
attention mask's zeros) is in neither. Text queries for VAR are the prompt's text tokens: no continuation is
generated. The answer position is each row's last real token (the last prompt token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from skipit import compat
from skipit.adapters import get_adapter
from skipit.errors import SkipitError
from skipit.functional_stats import FunctionalStats
from skipit.measures.functional import kl_from_logits, tv_from_logits
from skipit.skipping import applied_plan
from skipit.stats import AttentionStats, LayerStats, StatsConfig
from skipit.tokens import answer_index

MODALITIES = ("vision", "text")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooks(
    model: nn.Module,
    on_hidden: Callable[[int, torch.Tensor], None],
    on_attention: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[dict]:
    """Install the named hooks: on_hidden(i, X_i) for i = 0..L, on_attention(j, weights) for layer j.

    Yields {name: handle}; everything is removed on exit. Attention weights arrive only under eager attention.
    """
    adapter = get_adapter(model)
    layers = adapter.layers

    def pre(module, args, kwargs):
        on_hidden(0, args[0] if args else kwargs["hidden_states"])

    def next_input(j):
        def hook(module, args, kwargs):
            on_hidden(j + 1, args[0] if args else kwargs["hidden_states"])
        return hook

    handles = {"layers.0.resid_pre": layers[0].register_forward_pre_hook(pre, with_kwargs=True)}
    try:
        for j, layer in enumerate(layers):
            if j in adapter.injected_after and j + 1 < len(layers):  # X_{j+1} after the injection
                handles[f"layers.{j}.resid_post"] = layers[j + 1].register_forward_pre_hook(next_input(j),
                                                                                            with_kwargs=True)
            else:
                handles[f"layers.{j}.resid_post"] = layer.register_forward_hook(
                    lambda module, args, output, j=j: on_hidden(j + 1, _first(output)))
            if on_attention is not None:
                attention = adapter.attention_parts(layer)[1]
                handles[f"layers.{j}.attn_weights"] = attention.register_forward_hook(
                    lambda module, args, output, j=j: on_attention(j, output[1]) if output[1] is not None else None)
        yield handles
    finally:
        for handle in handles.values():
            handle.remove()


def _skip_update(mask: torch.Tensor):
    """Forward hook that undoes a layer's update for the tokens in mask [B, T]: they leave with their input state."""

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = torch.where(mask[..., None].to(x.device), x, _first(output))
        return (y, *output[1:]) if isinstance(output, tuple) else y

    return hook


class Calibrator:
    """Feeds batches through the model with hooks and streams every measure's statistics.

    `layer_stats` (geometric, proximal, informational, CKA), `attention_stats` (VAR: text queries on vision keys),
    `functional_stats` (logit lens; with ablation=True, ablation KL and the Lipschitz pairs: one more forward per
    layer and modality). Use as a context manager: hooks and eager attention are in place only inside it.
    logit_lens=False leaves the logit lens out (its LM-head projections are the costliest cheap measure).
    """

    def __init__(self, model: nn.Module, config: StatsConfig | None = None, ablation: bool = False,
                 attention: bool = True, logit_lens: bool = True):
        if applied_plan(model) is not None:
            raise SkipitError("remove the skip plan (skipit.remove_plan) before measuring the model")
        self.model, self.adapter, self.attention, self.logit_lens = model, get_adapter(model), attention, logit_lens
        if attention and (bare := [j for j, layer in enumerate(self.adapter.layers)
                                   if not isinstance(getattr(layer, "self_attn", None), nn.Module)]):  # fmt: skip
            raise SkipitError(
                f"attention statistics need softmax attention in every decoder layer; layers {bare} of "
                f"{type(model).__name__} have none (hybrid linear attention): measure with attention=False"
            )
        self.config = config or StatsConfig()
        n_layers = self.adapter.num_layers
        self.layer_stats = LayerStats(n_layers, self.adapter.hidden_size, MODALITIES, self.config)
        self.attention_stats = AttentionStats(n_layers, ("text",), "vision", self.config) if attention else None
        self.functional_stats = FunctionalStats(n_layers, MODALITIES, self.config, ablation)
        self._batch: dict | None = None
        self._stack = None

    # -- hooks

    def __enter__(self) -> Calibrator:
        self._previous = self.adapter.set_attn_implementation("eager") if self.attention else None
        self._hooks = hooks(self.model, self._on_hidden, self._on_attention if self.attention else None)
        try:
            self._hooks.__enter__()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._hooks.__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            self.adapter.set_attn_implementation(self._previous)

    def _on_hidden(self, i: int, x: torch.Tensor) -> None:
        batch = self._batch
        if batch is None:  # a forward outside update(), or an ablation pass: nothing to record
            return
        # NaN and inf survive a sum over the hidden size: one cheap [B, T] check instead of a [B, T, D] one
        bad = ~torch.isfinite(x.sum(-1)) & batch["valid"].to(x.device)
        if bad.any():
            example = batch["ids"][int(bad.nonzero()[0, 0])]
            where = "the input embeddings" if i == 0 else f"the output of decoder layer {i - 1}"
            raise SkipitError(f"hidden state X_{i} ({where}) has NaN or inf values for example {example!r}")
        batch["hidden"][i] = x.detach()

    def _on_attention(self, j: int, weights: torch.Tensor) -> None:
        batch = self._batch
        if batch is not None:
            self.attention_stats.update(batch["ids"], j, weights.detach(), batch["masks"], batch["valid"])

    # -- one batch

    def masks(self, inputs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({modality: bool [B, T]}, valid [B, T]) of a batch of model inputs."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise SkipitError("measuring needs input_ids (to find the vision tokens), not inputs_embeds")
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        vision = self.adapter.vision_mask(input_ids, inputs)
        vision = torch.zeros_like(valid) if vision is None else vision.bool() & valid
        return {"vision": vision.cpu(), "text": (valid & ~vision).cpu()}, valid.cpu()

    def _forward(self, inputs: dict, answer: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, V] at the answer positions (only the last column is computed when it holds
        every answer)."""
        last = bool((answer == inputs["input_ids"].shape[1] - 1).all())
        logits = self.model(**inputs, use_cache=False, logits_to_keep=1 if last else 0).logits
        rows = torch.arange(len(answer))
        return logits[:, -1] if last else logits[rows, answer.to(logits.device)]

    @torch.no_grad()
    def update(self, inputs: dict, example_ids: Sequence) -> None:
        """Run one batch (the processor's output) and add it to every statistic."""
        inputs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        ids = list(example_ids)
        masks, valid = self.masks(inputs)
        answer = answer_index(valid)
        self._batch = {"ids": ids, "masks": masks, "valid": valid, "hidden": [None] * (self.adapter.num_layers + 1)}
        calls = _LayerCalls(self.adapter.layers) if self.functional_stats.ablation else contextlib.nullcontext()
        try:
            with calls:
                reference = self._forward(inputs, answer)
            hidden = self._batch["hidden"]
        finally:
            self._batch = None
        if any(h is None for h in hidden):
            raise SkipitError("the forward pass did not run every decoder layer; cannot measure it")
        self.layer_stats.update(ids, hidden, masks, valid)
        if self.logit_lens:
            self._logit_lens(ids, hidden, answer)
        if self.functional_stats.ablation:
            self._ablate(inputs, ids, hidden, masks, answer, reference, calls)

    def _lens_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's whole head on x: final norm, LM head, then what its forward does to the logits (Gemma 2's
        soft-cap, Cohere's scale); a lens without them reads other distributions than the model's."""
        logits = self.adapter.lm_head(self.adapter.final_norm(x))
        if cap := getattr(self.adapter.backbone.config, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        if (scale := compat.logit_scale(self.model)) is not None:
            logits = logits * scale
        return logits

    def _logit_lens(self, ids: list, hidden: list[torch.Tensor], answer: torch.Tensor) -> None:
        """KL(P_{j+1} || P_j) and TV between the head's distributions read at X_{j+1} and X_j (what reading X_j
        instead loses), at the answer position; float64 log-probabilities, each computed once."""
        rows = torch.arange(len(ids))
        states = torch.stack([h[rows, answer.to(h.device)] for h in hidden])  # [L + 1, B, D]
        kl, tv, prev = [], [], None
        for chunk in states.split(8):  # one head matmul per 8 layers reads the head's weights once, not per layer
            for logits in self._lens_logits(chunk):
                logp = torch.log_softmax(logits.double(), -1)
                p = logp.exp()
                if prev is not None:
                    kl.append((p * (logp - prev[0])).sum(-1).clamp_min(0.0).cpu())
                    tv.append((0.5 * (p - prev[1]).abs().sum(-1)).cpu())
                prev = logp, p
        self.functional_stats.update_lens(ids, torch.stack(kl, 1), torch.stack(tv, 1))

    def _ablate(self, inputs, ids, hidden, masks, answer, reference, calls: _LayerCalls) -> None:
        """Ablation KL of every layer j and modality m: the model's answer distribution with layer j's update undone
        for m's tokens, against the reference.

        Layers before j compute what the reference did, so an ablation reruns only layers j..L-1, from the
        captured X_j, with the arguments (masks, positions) the model itself gave each layer: about L/2 layers per
        ablation instead of L. That is exact only when each layer's input is the previous layer's output and the
        logits are the model's head on the last layer's output (`_lens_logits`); both are checked on this batch, and a
        model that does anything else (an injection between layers, a head the lens does not reproduce) gets one full
        forward per ablation.
        """
        rerun = calls.replays(hidden) and torch.allclose(
            self._head(hidden[-1], answer).float(), reference.float(), rtol=1e-4, atol=1e-4)
        for j, layer in enumerate(self.adapter.layers):
            for m in MODALITIES:
                mask = masks[m]
                present = mask.any(1)
                if not present.any():
                    continue
                if rerun:
                    ablated = self._head(calls.run_from(j, mask), answer)
                else:
                    handle = layer.register_forward_hook(_skip_update(mask), with_kwargs=True)
                    try:
                        ablated = self._forward(inputs, answer)
                    finally:
                        handle.remove()
                # the layer's own update: with an injection after layer j (DeepStack), X_{j+1} - X_j would add it
                before, after = (calls.inputs[j], calls.outputs[j]) if calls.inputs[j] is not None else (
                    hidden[j], hidden[j + 1])  # fmt: skip
                update = (after - before).double() * mask[..., None].to(before.device)
                self.functional_stats.update_ablation(
                    ids, j, m, kl_from_logits(reference, ablated), tv_from_logits(reference, ablated),
                    update.pow(2).sum((1, 2)).sqrt(), present)

    def _head(self, x: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] read from the last layer's output x at the answer positions."""
        rows = torch.arange(x.shape[0], device=x.device)
        return self._lens_logits(x[rows, answer.to(x.device)])


class _LayerCalls:
    """Records the input, keyword arguments and output of every decoder layer during one forward (a context
    manager), so that layers j..L-1 can be run again from layer j's input with exactly the model's masks and
    positions."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.inputs: list = [None] * len(layers)
        self.kwargs: list = [None] * len(layers)
        self.outputs: list = [None] * len(layers)

    def __enter__(self):
        def record_input(j):
            def hook(module, args, kwargs):
                self.inputs[j] = args[0] if args else kwargs["hidden_states"]
                self.kwargs[j] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        def record_output(j):
            def hook(module, args, output):
                self.outputs[j] = _first(output)
            return hook

        self._handles = [h for j, layer in enumerate(self.layers) for h in (
            layer.register_forward_pre_hook(record_input(j), with_kwargs=True),
            layer.register_forward_hook(record_output(j)))]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def replays(self, hidden: list[torch.Tensor]) -> bool:
        """Whether the model's layer loop is plain: layer 0 read X_0, each later layer read exactly the previous
        layer's output (nothing injected between layers, as DeepStack does), and the last output is X_L."""
        if any(x is None for x in (*self.inputs, *self.outputs)):
            return False
        chain = zip(self.inputs, [hidden[0], *self.outputs[:-1]], strict=True)
        return all(torch.equal(a, b) for a, b in chain) and torch.equal(self.outputs[-1], hidden[-1])

    def run_from(self, j: int, keep: torch.Tensor) -> torch.Tensor:
        """Layers j..L-1 from layer j's recorded input, with layer j's update undone at the tokens in keep [B, T]."""
        x = self.inputs[j]
        y = _first(self.layers[j](x, **self.kwargs[j]))
        x = torch.where(keep[..., None].to(x.device), x, y)
        for i in range(j + 1, len(self.layers)):
            x = _first(self.layers[i](x, **self.kwargs[i]))
        return x
