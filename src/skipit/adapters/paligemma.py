"""PaliGemma (and PaliGemma 2): the generic layout, plus a prefix-LM mask read from `token_type_ids`
(`PaliGemmaModel.forward` in transformers 5.23): the prefix (`token_type_ids == 0`: the image tokens and the prompt)
is one block whose tokens attend to each other whatever their order; the suffix (`token_type_ids == 1`, and every
generated token) is causal. The model applies the block in a call that starts the cache (no cache, or one not yet
filled) or that carries `pixel_values`. In PaliGemma 2's sliding layers the block is OR-ed onto the sliding causal
mask (`create_sliding_window_causal_mask` with `block_sequence_ids`): two prefix tokens farther apart than the window
still attend to each other, unlike Gemma 3's AND(window, OR(causal, block)).

Two quirks of the model are reproduced or refused, never dropped:
- its text config sets `use_bidirectional_attention`, which transformers reads only in the attention modules
  (`is_causal=False`), not in the masks PaliGemma builds: where the model passes a mask it is causal plus the prefix
  block, so the engine always passes one to several queries (`causal_without_mask`); where the model passes none
  (SDPA, several tokens, no `token_type_ids`, no padding, a fresh cache) its attention is bidirectional over the whole
  call, which plans do not reproduce: refused.
- a call that continues a cache and carries pixels gets the block of its own `token_type_ids` indexed by absolute
  position, i.e. laid over the cached tokens: refused. Without pixels such a call is causal, as in the model.
"""

from __future__ import annotations

import torch

from skipit.adapters.base import Adapter
from skipit.errors import SkipitError


class PaliGemmaAdapter(Adapter):
    bidirectional_blocks = True
    blocks_in_window = False  # OR(sliding causal, block): the prefix block reaches across the window
    masks_ignore_bidirectional_flag = True

    def blocks(self, inputs: dict, first_call: bool) -> torch.Tensor | None:
        types = inputs.get("token_type_ids")
        pixels = any(inputs.get(name) is not None for name in self.pixel_inputs)
        if types is None:
            ids = inputs.get("input_ids")
            mask = inputs.get("attention_mask")
            if (first_call and self.attn_implementation == "sdpa" and ids is not None and ids.shape[1] > 1
                    and (mask is None or bool(mask.all()))):  # fmt: skip
                raise SkipitError(
                    "PaliGemma called without token_type_ids on unpadded prompts attends bidirectionally over every "
                    "token (SDPA without a mask, use_bidirectional_attention), which skip plans do not reproduce: "
                    "pass the processor's token_type_ids"
                )
            return None
        prefix = types == 0
        if not (first_call or pixels) or not bool(prefix.any()):
            return None  # the model's mask for this call is causal
        if not first_call:
            raise SkipitError(
                "a skip plan reproduces PaliGemma's bidirectional prefix only in the call that starts the cache: this "
                "call continues a cache with pixel_values and prefix tokens (token_type_ids 0)"
            )
        return torch.where(prefix, 0, -1)
