"""Qwen2-VL and Qwen2.5-VL: image and video placeholders are vision tokens; vision start/end markers are text.

Their M-RoPE positions (3-D: temporal, height, width) reach the decoder layers as one (cos, sin) pair per token,
so the base adapter's token-axis slicing keeps them unchanged.
"""

from skipit.adapters.base import Adapter


class Qwen2VLAdapter(Adapter):
    family = "Qwen2-VL"
    pixel_inputs = ("pixel_values", "pixel_values_videos")

    @property
    def backbone(self):
        return self.model.model.language_model

    def vision_token_ids(self) -> list[int]:
        return [self.model.config.image_token_id, self.model.config.video_token_id]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 - mirrors the transformers class name
    family = "Qwen2.5-VL"
