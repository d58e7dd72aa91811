"""A FaceFormer-style baseline (Fan et al., CVPR 2022): an autoregressive audio-to-vertex decoder.

Speech features (the deepest level of our speech encoder) condition a causal transformer decoder
over past vertex motion through FaceFormer's diagonal alignment mask; self-attention carries
FaceFormer's periodic ALiBi-style biases and its inputs a periodic positional encoding (PPE).
It regresses the training topology's fixed vertex set, and, like FaceFormer, it handles at most
``max_frames`` frames: it is a baseline for comparison, not a model for arbitrary lengths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mmtalker.data.batch import Batch
from mmtalker.data.sequence import Topology
from mmtalker.errors import MMTalkerError, TemplateError
from mmtalker.losses import (
    LossConfig,
    combined_loss,
    motion_losses,
    phone_loss,
    vertex_weights,
)
from mmtalker.nn.base import AnimationModel, check_attention_widths
from mmtalker.nn.speech import (
    SpeechConfig,
    build_speech_encoder,
    decoder_levels,
    phone_readout,
    read_phones,
)


class FaceFormerConfig(BaseModel):
    """Architecture of the FaceFormer-style baseline; defaults follow FaceFormer on VOCASET."""

    model_config = ConfigDict(extra="forbid")

    speech: SpeechConfig = Field(default_factory=SpeechConfig)
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(1, ge=1)
    ff_dim: int = Field(256, ge=8)
    period: int = Field(30, ge=1)
    max_frames: int = Field(600, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> FaceFormerConfig:
        check_attention_widths(self.speech.dim, self.dim, self.heads)
        if self.dim % 2:
            raise ValueError(f"dim ({self.dim}) must be even for the sinusoidal encoding")
        return self


def periodic_positional_encoding(dim: int, period: int, length: int) -> Tensor:
    """FaceFormer's PPE ``(length, dim)``: the sinusoidal encoding of ``position % period``."""
    position = (torch.arange(length) % period).float()[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric per-head slopes, interleaved for head counts that are not powers of 2."""
    if math.log2(heads).is_integer():
        start = 2 ** (-(2 ** -(math.log2(heads) - 3)))
        return [start**i for i in range(1, heads + 1)]
    closest = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


def periodic_bias_mask(heads: int, length: int, period: int) -> Tensor:
    """Causal self-attention bias ``(heads, length, length)``: -slope * floor(distance / period).

    Future frames get ``-inf``; the bias steps once per period, so frames within one are equal.
    """
    frames = torch.arange(length)
    distance = frames[:, None] - frames[None, :]
    slopes = torch.tensor(alibi_slopes(heads))[:, None, None]
    bias = -slopes * torch.div(distance.clamp_min(0), period, rounding_mode="floor")
    return bias.masked_fill(distance < 0, float("-inf"))


def alignment_mask(length: int) -> Tensor:
    """FaceFormer's cross-attention mask ``(length, length)``: frame t sees audio feature t only."""
    mask = torch.full((length, length), float("-inf"))
    return mask.fill_diagonal_(0.0)


class FaceFormer(AnimationModel):
    """Speech (B, N) + a training speaker's style → displacements of the training topology.

    Speakers outside training (held-out test speakers) get the mean of the learnt styles, where
    FaceFormer itself conditions on one chosen training subject.
    """

    kind = "faceformer"
    config_class = FaceFormerConfig
    # Only the speech encoder's deepest level conditions the decoder, as in FaceFormer, so the
    # shallower levels' output projections never get gradients.
    all_parameters_used = False
    config: FaceFormerConfig

    def __init__(
        self, config: FaceFormerConfig, topology: Topology, templates: dict[str, np.ndarray]
    ) -> None:
        super().__init__(config, topology, templates)
        if not self.speakers:
            raise TemplateError("the FaceFormer-style baseline needs at least one training speaker")
        self.num_vertices = topology.num_vertices
        values = self.num_vertices * 3
        self.speech = build_speech_encoder(config.speech)
        self.phone_readout = phone_readout(config.speech)
        self.audio_map = nn.Linear(config.dim, config.dim)
        self.style_embedding = nn.Embedding(len(self.speakers), config.dim)
        self.motion_encoder = nn.Linear(values, config.dim)
        layer = nn.TransformerDecoderLayer(
            config.dim, config.heads, config.ff_dim, config.dropout, batch_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config.layers)
        self.motion_decoder = nn.Linear(config.dim, values)
        # As in FaceFormer: training starts from the neutral face and learns motion from there.
        nn.init.zeros_(self.motion_decoder.weight)
        nn.init.zeros_(self.motion_decoder.bias)
        self.input_dropout = nn.Dropout(config.dropout)
        # Fixed tables (not learnt, not saved), so a trained model may be reloaded with another
        # max_frames.
        length = config.max_frames
        self.register_buffer(
            "ppe", periodic_positional_encoding(config.dim, config.period, length), False
        )
        self.register_buffer(
            "self_bias", periodic_bias_mask(config.heads, length, config.period), False
        )
        self.register_buffer("cross_mask", alignment_mask(length), persistent=False)

    def _check_length(self, num_frames: int) -> None:
        limit = self.config.max_frames
        if num_frames > limit:
            raise MMTalkerError(
                f"the FaceFormer-style baseline animates at most {limit} frames (the length of its "
                f"positional and attention-bias tables), got {num_frames}; animate shorter audio "
                "or set max_frames higher in the model config (the tables are not learnt)"
            )

    def styles(self, speakers: Tensor | None, batch: int) -> Tensor:
        """Style vectors (B, dim); unknown speakers (-1 or ``None``) get the mean learnt style."""
        table = self.style_embedding.weight
        mean = table.mean(dim=0)
        if speakers is None:
            return mean.expand(batch, -1)
        known = speakers >= 0
        return torch.where(known[:, None], table[speakers.clamp_min(0)], mean)

    def audio_features(
        self, audio: Tensor, num_frames: int, audio_lengths: Tensor | None = None
    ) -> Tensor:
        """The speech encoder's deepest level at the frame rate, projected: (B, T, dim)."""
        levels = decoder_levels(self.phone_readout, self.speech(audio, num_frames, audio_lengths))
        return self.audio_map(levels[-1])

    def decode(self, tokens: Tensor, features: Tensor) -> Tensor:
        """Decoder states (B, T, dim) for motion tokens and audio features, both (B, T, dim)."""
        batch, length, _ = tokens.shape
        self._check_length(length)
        heads = self.config.heads
        tokens = self.input_dropout(tokens + self.ppe[:length])
        bias = self.self_bias[:, :length, :length]
        # nn.MultiheadAttention wants per-head masks flattened batch-major: (B * heads, T, T).
        bias = bias.expand(batch, -1, -1, -1).reshape(batch * heads, length, length)
        cross = self.cross_mask[:length, : features.shape[1]]
        return self.decoder(tokens, features, tgt_mask=bias, memory_mask=cross)

    def teacher_forced(self, features: Tensor, motion: Tensor, style: Tensor) -> Tensor:
        """Teacher-forced displacements (B, T, V, 3) in model units given true motion (same units).

        Frame t sees ``motion[:, :t]`` and audio feature t; ``motion[:, -1]`` is never used.
        """
        style = style[:, None]
        previous = self.motion_encoder(motion[:, :-1].flatten(2)) + style
        hidden = self.decode(torch.cat([style, previous], dim=1), features)
        return self.motion_decoder(hidden).unflatten(-1, (self.num_vertices, 3))

    def training_loss(self, batch: Batch, losses: LossConfig) -> tuple[Tensor, dict[str, float]]:
        """Position and velocity loss of teacher-forced predictions over every vertex, plus the
        phone loss when the speech encoder has a phone readout."""
        target = batch.displacements / self.displacement_scale
        levels, logits = read_phones(
            self.phone_readout,
            self.speech(batch.audio, batch.num_frames, batch.audio_lengths),
            self.motion_gradient(losses),
        )
        features = self.audio_map(levels[-1])
        pred = self.teacher_forced(features, target, self.styles(batch.speakers, len(target)))
        weights, dynamics = (
            torch.as_tensor(vertex_weights(self.topology, factors), device=pred.device)
            for factors in (losses.region_weights, losses.dynamics_regions)
        )
        lips = torch.zeros(self.num_vertices, dtype=torch.bool, device=pred.device)
        lips[torch.as_tensor(self.topology.region("lips"), device=pred.device)] = True
        parts = motion_losses(pred, target, batch.frame_mask(), weights, lips, dynamics)
        loss = combined_loss(parts, losses)
        logs = {"loss": loss, "position": parts.position, "velocity": parts.velocity,
                "lip_max": parts.lip_max}  # fmt: skip
        objective = loss
        if logits is not None:
            logs["phones"] = phone_loss(logits, batch.phones)
            objective = loss + losses.phones * logs["phones"]
        return objective, {name: float(value.detach()) for name, value in logs.items()}

    def prepare(
        self, templates: Tensor, speakers: Tensor | None = None, points: object = None
    ) -> Tensor:
        """Style vectors (B, dim) of the speakers; the neutral faces themselves are not needed."""
        if points is not None:
            raise TemplateError(
                "the FaceFormer-style baseline regresses a fixed vertex set; "
                "it cannot animate other point sets"
            )
        if templates.shape[1] != self.num_vertices:
            raise TemplateError(
                f"templates have {templates.shape[1]} vertices but the model was trained on "
                f"{self.num_vertices}"
            )
        return self.styles(speakers, templates.shape[0])

    def animate(
        self,
        audio: Tensor,
        num_frames: int,
        state: Tensor,
        out: Tensor | None = None,
        audio_lengths: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> Tensor:
        """Autoregressive displacements (B, T, V, 3) in dataset units, one frame per step.

        As in FaceFormer each step re-runs the decoder over the whole prefix: O(T²) decoder
        positions in all (O(T³) attention), so long audio gets slow.
        """
        self._check_length(num_frames)
        # Decoding is causal, so padding frames at the end never reach a clip's own frames.
        features = self.audio_features(audio, num_frames, audio_lengths)
        style = state[:, None]
        tokens = style
        frames = []
        for t in range(num_frames):
            if frames:
                tokens = torch.cat([tokens, self.motion_encoder(frames[-1]) + style], dim=1)
            # Frame t's output depends only on audio feature t, so later features are not passed.
            hidden = self.decode(tokens, features[:, : t + 1])
            frames.append(self.motion_decoder(hidden[:, -1:]))
        motion = torch.cat(frames, dim=1).unflatten(-1, (self.num_vertices, 3))
        return self.deliver(motion * self.displacement_scale, out)
