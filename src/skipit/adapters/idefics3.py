"""Idefics3 (SmolVLM): `<image>` placeholders are vision tokens; the `<fake_token_around_image>` and
`<row_x_col_y>`/`<global-img>` markers around them are text. The text backbone is `model.model.text_model`."""

from skipit.adapters.base import Adapter


class Idefics3Adapter(Adapter):
    family = "Idefics3"
    pixel_inputs = ("pixel_values",)

    @property
    def backbone(self):
        return self.model.model.text_model

    def vision_token_ids(self) -> list[int]:
        return [self.model.config.image_token_id]
