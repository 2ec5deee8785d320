"""Gemma 3: the generic layout, plus a mask in which the tokens of one image attend to each other bidirectionally,
read from `token_type_ids` (`Gemma3Model.forward`, `get_block_sequence_ids_for_mask`, `create_masks_for_vision_model`):
each run of consecutive image tokens (`token_type_ids == 1`) is a block whose tokens see each other whatever their
order, in full-attention layers and in sliding ones, where a pair of the same block must still be inside the window
(AND(window, OR(causal, block))). generate() passes `token_type_ids` in its first call only.

Under a plan a layer processes a subset of the tokens: two tokens of a block that the layer both processes see each
other, as in the model's own mask restricted to that subset. Blocks hold within the call that carries them; a call
that continues a cache with blocks is refused (the model indexes them by absolute position, which only the first
call's `token_type_ids` cover).
"""

from __future__ import annotations

import torch

from skipit.adapters.base import Adapter
from skipit.errors import SkipitError


class Gemma3Adapter(Adapter):
    bidirectional_blocks = True

    def blocks(self, inputs: dict, first_call: bool) -> torch.Tensor | None:
        types = inputs.get("token_type_ids")
        if types is None:
            return None
        image = types == 1
        if not bool(image.any()):
            return None
        if not first_call:
            raise SkipitError(
                "a skip plan reproduces Gemma 3's bidirectional image blocks (token_type_ids) only in the call that "
                "starts the cache (as generate() passes them): this call continues a cache"
            )
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, starts.long().cumsum(1) - 1, -1)
