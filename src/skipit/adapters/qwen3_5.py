"""Qwen3.5 (dense and MoE, the VLM and its text model): the generic layout with hybrid layers (`layer_types`):
full-attention layers (`Qwen3_5Attention`, gated output, partial M-RoPE) served by the engine as any other, and
linear-attention layers (`Qwen3_5GatedDeltaNet`) that keep, per cache, a recurrent state and the last inputs of a
short causal conv instead of per-token keys (`LinearAttentionLayer` in transformers' `DynamicCache`).

A linear-attention layer takes no attention mask: the model gives it the 2-D padding mask of the call
(`create_recurrent_attention_mask`), with which it zeroes the inputs of padding tokens; a zero input leaves a zero
state at zero, so left padding changes nothing. Under a plan (`SkipLayer._recurrent`) it gets the same mask for the
tokens it processes, and runs its recurrence and conv over exactly those, in sequence order: a token a plan removes
from the layer (early exit, late entry 'absent', pruning) is not in its sequence at all, as it is not among an
attention layer's keys; a frozen vision token (late entry 'frozen', frozen vision layers) feeds the state in order,
as its keys would, and keeps its own hidden state. Rows with different numbers of such tokens run with their padding
slots first (zero inputs on a fresh state); in a call that continues the layer's cache that would decay the state,
and is refused. A skipped layer leaves its cache untouched.

Pruning by attention (FastV, DART's keys) is refused on linear-attention layers (no attention weights, no keys), and
on the full-attention ones too (`Qwen3_5Attention` is not in `KEYS_VALUES_ONLY`: its query projection carries an
output gate).
"""

from __future__ import annotations

from torch import nn

from skipit.adapters.base import SERVED_KINDS, Adapter
from skipit.errors import SkipitError


class Qwen3_5Adapter(Adapter):
    served_kinds = (*SERVED_KINDS, "linear_attention")

    def check_ranking(self, layer: nn.Module) -> None:
        if isinstance(getattr(layer, "linear_attn", None), nn.Module):
            raise SkipitError(
                f"pruning vision tokens by attention is not supported after linear-attention layer "
                f"{layer.linear_attn.layer_idx} of {type(self.model).__name__} (it has no attention weights or keys): "
                "rank with prune_vision_rank='divprune'"
            )
        super().check_ranking(layer)
