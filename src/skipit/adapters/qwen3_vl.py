"""Qwen3-VL (and its MoE): the generic layout, plus DeepStack. The text model adds visual features from the first
`len(vision_config.deepstack_visual_indexes)` vision encoder levels into the residual stream at the vision
positions, right after decoder layers 0, 1, ... (`Qwen3VLTextModel._deepstack_process`), in the call that carries
the pixels.

Under a skip plan the injection is part of the residual stream, not of the layer: after layer j the model adds
feature j to every vision token's state, whatever layer j did with that token. A vision token a layer skips
(late entry 'absent' or 'frozen', a skipped layer, an exit, pruning) keeps its state through the layer and still
receives the injection; so a layer that runs only on text still hands the whole sequence, in original order, to the
injection (`injected_after`).
"""

from __future__ import annotations

from skipit.adapters.base import Adapter


class Qwen3VLAdapter(Adapter):
    @property
    def injected_after(self) -> frozenset[int]:
        vision = getattr(self.model.config, "vision_config", None)
        return frozenset(range(len(getattr(vision, "deepstack_visual_indexes", None) or ())))
