"""The static-template baseline: the neutral face, never moving (every metric's floor)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mmtalker.nn.base import AnimationModel


class StaticTemplateConfig(BaseModel):
    """The static template has nothing to configure."""

    model_config = ConfigDict(extra="forbid")


class StaticTemplate(AnimationModel):
    """Predicts zero displacement: the speaker's neutral face in every frame."""

    kind = "static"
    config_class = StaticTemplateConfig

    def prepare(
        self, templates: Tensor, speakers: Tensor | None = None, points: object = None
    ) -> Tensor:
        count = templates.shape[1] if points is None else points.uv.shape[0]
        return templates.new_zeros(templates.shape[0], count, 3)

    def animate(
        self,
        audio: Tensor,
        num_frames: int,
        state: Tensor,
        out: Tensor | None = None,
        audio_lengths: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> Tensor:
        return self.deliver(state[:, None].expand(-1, num_frames, -1, -1), out)
