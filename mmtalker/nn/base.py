"""What training, evaluation, checkpoints and inference need from an animation model."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from mmtalker.data.batch import Batch
from mmtalker.data.sequence import Topology
from mmtalker.losses import LossConfig


def check_attention_widths(speech_dim: int, dim: int, heads: int) -> None:
    """Config rule of every attention model: speech features of width ``dim`` split into heads."""
    if speech_dim != dim:
        raise ValueError(f"speech.dim ({speech_dim}) must equal dim ({dim})")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")


class AnimationModel(nn.Module):
    """Base of every model: built from (config, topology, training templates).

    Models predict displacements from the speaker's neutral face in dataset units. Work that
    depends only on the face (and point set) happens in :meth:`prepare`, once per face; then
    :meth:`animate` runs per audio chunk.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[BaseModel]]
    #: Whether every parameter gets a gradient from every training step; data-parallel
    #: wrappers must search for unused ones (a slower path) when not.
    all_parameters_used: ClassVar[bool] = True
    #: Whether :meth:`prepare` takes any point set of the chart (``points``), not only the
    #: training mesh's vertices: such models can animate other resolutions of the face.
    queries_points: ClassVar[bool] = False
    #: The factor on the motion losses' gradients into a phone-read speech encoder when
    #: ``LossConfig.speech_motion_gradient`` is None (each model's best in the bench screens).
    speech_motion_gradient: ClassVar[float] = 1.0

    def __init__(
        self, config: BaseModel, topology: Topology, templates: dict[str, np.ndarray]
    ) -> None:
        super().__init__()
        self.config = config
        self.topology = topology
        self.speakers = sorted(templates)
        # Outputs are learnt in units of this scale (set from the training data's spread) so
        # networks work with numbers near one whatever the dataset's length unit.
        self.register_buffer("displacement_scale", torch.tensor(0.01))

    def motion_gradient(self, losses: LossConfig) -> float:
        """The factor on the motion losses' gradients into the speech encoder for ``losses``."""
        chosen = losses.speech_motion_gradient
        return self.speech_motion_gradient if chosen is None else chosen

    def forward(self, batch: Batch, losses: LossConfig) -> tuple[Tensor, dict[str, float]]:
        """:meth:`training_loss`, as ``forward`` so a DistributedDataParallel wrapper syncs it."""
        return self.training_loss(batch, losses)

    def training_loss(self, batch: Batch, losses: LossConfig) -> tuple[Tensor, dict[str, float]]:
        """The objective to minimise on one batch, and named scalars for logging.

        The logs hold ``loss``: the model's own loss, comparable across models (objective terms
        that only steer auxiliary parts, such as a sampler's surrogate, are left out of it).
        """
        raise NotImplementedError(f"{self.kind} has no trainable parameters")

    def prepare(self, templates: Tensor, speakers: Tensor | None = None, points: Any = None) -> Any:
        """Per-face state for :meth:`animate` (templates (B, V, 3))."""
        raise NotImplementedError

    def animate(
        self,
        audio: Tensor,
        num_frames: int,
        state: Any,
        out: Tensor | None = None,
        audio_lengths: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> Tensor:
        """Displacements (B, T, P, 3) for audio (B, N) given the prepared face state.

        With ``out`` (B, T, P, 3), the displacements are added into it (a buffer holding the
        neutral face yields positions without another pass over the output) and it is returned.
        ``audio_lengths``/``frame_lengths`` (B,) mark padded clips; frames past a clip's length
        are unspecified.
        """
        raise NotImplementedError

    @staticmethod
    def deliver(result: Tensor, out: Tensor | None) -> Tensor:
        """``result``, or ``out`` with it added: for models that cannot add in place."""
        return result if out is None else out.add_(result)

    def predict(
        self,
        audio: Tensor,
        num_frames: int,
        templates: Tensor,
        speakers: Tensor | None = None,
        audio_lengths: Tensor | None = None,
    ) -> Tensor:
        """Vertex displacements (B, T, V, 3) for audio (B, N) on the given neutral faces;
        ``audio_lengths`` (B,) marks zero padding (``mmtalker.data.sequence.pad_to_frames``)."""
        state = self.prepare(templates, speakers)
        return self.animate(audio, num_frames, state, audio_lengths=audio_lengths)
