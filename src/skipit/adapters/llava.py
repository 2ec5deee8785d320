"""LLaVA and LLaVA-NeXT: vision features replace the `image_token_id` placeholders (LLaVA-NeXT's image-newline
features included), and the text backbone is `model.model.language_model`."""

from skipit.adapters.base import Adapter


class LlavaAdapter(Adapter):
    family = "LLaVA"
    pixel_inputs = ("pixel_values",)

    @property
    def backbone(self):
        return self.model.model.language_model

    def vision_token_ids(self) -> list[int]:
        return [self.model.config.image_token_id]


class LlavaNextAdapter(LlavaAdapter):
    family = "LLaVA-NeXT"
