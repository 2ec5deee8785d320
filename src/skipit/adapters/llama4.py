"""Llama 4: the generic layout (the text decoder under `language_model.model`), with
- complex rotary: each decoder layer receives `position_embeddings = freqs_cis`, one complex tensor (batch or 1, seq,
  head_dim / 2) (`Llama4TextRotaryEmbedding.forward`), sliced per token like (cos, sin);
- chunked attention on its RoPE layers (`layer_types`), served by the engine (`Adapter.chunks`): a query sees the keys
  of its chunk of `attention_chunk_size` positions, counted from the row's first real token;
- NoPE layers (`no_rope_layers`, full attention) whose queries are scaled by position when `attn_temperature_tuning`
  is set: `Llama4TextAttention.forward` counts that position in the layer's own cache slots (cached length + index in
  the call), which is the token's sequence index only when the layer processes every token. The scale is exactly 1
  below position `floor_scale - 1` (`log1p(floor((pos + 1) / floor_scale))`), so a NoPE layer may process a token
  subset (late entry, exit, pruning, frozen vision) only while the sequence is shorter than `floor_scale` (8192 in
  the released models); longer calls are refused (`check_call`). Layers that run on every token, or on none, are
  exact at any length.
"""

from __future__ import annotations

import torch
from torch import nn

from skipit import compat
from skipit.adapters.base import Adapter
from skipit.errors import SkipitError
from skipit.plan import ALL, SKIP


class Llama4Adapter(Adapter):
    @staticmethod
    def check_positions(position_embeddings, layer: nn.Module) -> None:
        if not (isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex()):
            raise SkipitError(
                f"skip plans need {type(layer).__name__} to receive its rotary positions as one complex freqs_cis "
                f"tensor (Llama 4); got {type(position_embeddings).__name__}"
            )

    @staticmethod
    def take_positions(position_embeddings, index: torch.Tensor):
        """The freqs_cis (batch, n, head_dim / 2) of the tokens at `index` (batch, n): their original positions."""
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        return position_embeddings.expand(index.shape[0], *position_embeddings.shape[1:])[rows, index]

    def check_call(self, inputs: dict, plan) -> None:
        config = self.backbone.config
        if not getattr(config, "attn_temperature_tuning", False):
            return
        roles = plan.roles()
        subset = [j for j, rope in enumerate(config.no_rope_layers) if not rope and roles[j] not in (ALL, SKIP)]
        if not subset:
            return
        mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
        if mask is None:  # the sequence's length is the mask's; without it, only a call that starts the cache is known
            cache = compat.get_cache(inputs)
            if (cache is not None and cache.get_seq_length() > 0) or ids is None:
                raise SkipitError(
                    f"Llama 4's NoPE layers {subset} run on token subsets under this plan: pass the attention mask of "
                    "the whole sequence, which tells how long it is (their query scale depends on position)"
                )
        length = mask.shape[-1] if mask is not None else ids.shape[-1]
        if length >= config.floor_scale:
            raise SkipitError(
                f"Llama 4's NoPE layers {subset} run on token subsets under this plan, and from position "
                f"{config.floor_scale - 1} (floor_scale - 1) on their queries are scaled by a position counted in "
                f"cache slots, which a token subset does not keep: sequences of {length} tokens are refused (shorter "
                f"than {config.floor_scale}, or keep these layers on every token)"
            )
