"""The MMTalker model: hierarchical speech features and mesh tokens fused by dual cross-attention,
decoded by a UV regression head at any point set of the face, trained on learnt surface samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from mmtalker.data.batch import Batch
from mmtalker.data.sequence import Topology
from mmtalker.errors import TemplateError
from mmtalker.geometry.sampling import SurfaceSampler
from mmtalker.geometry.spectral import laplacian_eigenfunctions
from mmtalker.geometry.uv import barycentric_interpolate, face_areas, locate_uv
from mmtalker.losses import (
    LossConfig,
    combined_loss,
    motion_losses,
    phone_loss,
    vertex_weights,
)
from mmtalker.nn.base import AnimationModel, check_attention_widths
from mmtalker.nn.fusion import DualCrossAttentionFusion
from mmtalker.nn.gcn import MeshEncoder
from mmtalker.nn.head import UVRegressionHead
from mmtalker.nn.speech import (
    SpeechConfig,
    build_speech_encoder,
    decoder_levels,
    phone_readout,
    read_phones,
)

#: Metres to model units for neutral positions: a face then spans about ±1.
POSITION_SCALE = 10.0
#: Laplacian eigenfunctions new models' heads read (``spectral_features``). With 32, a basis fitted
#: to the ICT corpus's motion leaves a least-squares lip error (LVE) of 0.05 on unseen speakers,
#: without any 0.29; in the 20-minute benchmark on the ICT head the test LVE fell from 0.504 to
#: 0.286 over three seeds, on the mannequin it stayed within a run's spread (docs/accuracy.md).
SPECTRAL_FEATURES = 32


class MMTalkerConfig(BaseModel):
    """Architecture of the MMTalker model."""

    model_config = ConfigDict(extra="forbid")

    speech: SpeechConfig = SpeechConfig()
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    gcn_blocks: int = Field(1, ge=1)
    #: Width of the GCN on the full mesh (the coarser levels and the tokens have ``dim``). The
    #: full mesh is where the mesh branch spends its time: 32 instead of 128 takes a bench
    #: training step from 715 to 580 ms on one thread, and it learns as much per step.
    fine_dim: int = Field(32, ge=1)
    clusters: tuple[int, ...] = (256, 32)
    temporal_kernel: int = Field(5, ge=1)
    basis: int = Field(64, ge=1)
    fourier_bands: int = Field(6, ge=0)
    head_hidden: int = Field(128, ge=8)
    #: Laplacian eigenfunctions of the training speakers' mean face read by the head's point
    #: basis beside the UV chart (0: none, as in checkpoints from before they existed; new
    #: models get ``SPECTRAL_FEATURES``). The chart puts the two lips of a closed mouth side by
    #: side; the surface does not, and without them the basis cannot move the lips apart.
    spectral_features: int = Field(0, ge=0, le=256)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> MMTalkerConfig:
        check_attention_widths(self.speech.dim, self.dim, self.heads)
        return self


@dataclass
class PointSet:
    """Points on the chart to animate: UV (P, 2) and the neutral face's positions (B, P, 3); where
    the caller knows it, ``surface``: the triangle (P,) and barycentrics (P, 3) each lies at on the
    model's mesh, which spares locating the points on the chart again for every clip."""

    uv: Tensor
    neutral: Tensor
    surface: tuple[Tensor, Tensor] | None = None


@dataclass
class FaceState:
    """What depends only on the face: its mesh tokens and the basis of its point set."""

    tokens: Tensor
    basis: Tensor


class MMTalker(AnimationModel):
    """Speech (B, N) + neutral faces (B, V, 3) → displacements at any point set of the chart."""

    kind = "mmtalker"
    config_class = MMTalkerConfig
    queries_points = True
    # Its fusion reads every speech level, which the motion losses alone bend towards the
    # training speakers' voices: 0.1 gained on the val and test splits and degraded audio over
    # three seeds, where the baseline's single projection lost at 0.1 and 0.5 (docs/accuracy.md).
    speech_motion_gradient = 0.1

    def __init__(
        self, config: MMTalkerConfig, topology: Topology, templates: dict[str, np.ndarray]
    ) -> None:
        super().__init__(config, topology, templates)
        if topology.uv is None:
            raise TemplateError(
                "the topology has no UV chart; attach one with mmtalker.geometry.uv.attach_uv"
            )
        reference = np.mean([templates[s] for s in self.speakers], axis=0)
        self.register_buffer("faces", torch.as_tensor(topology.faces, dtype=torch.long), False)
        self.register_buffer("uv", torch.as_tensor(topology.uv), persistent=False)
        lips = torch.zeros(topology.num_vertices, dtype=torch.bool)
        lips[torch.as_tensor(topology.region("lips"), dtype=torch.long)] = True
        self.register_buffer("lips", lips, persistent=False)
        self.speech = build_speech_encoder(config.speech)
        self.phone_readout = phone_readout(config.speech)
        self.mesh = MeshEncoder(
            topology.faces,
            topology.uv,
            config.dim,
            config.clusters,
            config.gcn_blocks,
            config.fine_dim,
        )
        self.fusion = DualCrossAttentionFusion(
            config.dim, config.speech.levels, config.heads, config.temporal_kernel, config.dropout
        )
        self.head = UVRegressionHead(
            config.dim, config.basis, config.fourier_bands, config.head_hidden,
            config.spectral_features,
        )  # fmt: skip
        spectral = None
        if config.spectral_features:
            spectral = torch.from_numpy(
                laplacian_eigenfunctions(reference, topology.faces, config.spectral_features)
            )
        # Stored with the weights: an eigenvector's sign and a degenerate pair's rotation may
        # differ on another machine, and the basis was learnt on these.
        self.spectral: Tensor | None
        self.register_buffer("spectral", spectral)
        self.sampler = SurfaceSampler(topology.faces, face_areas(reference, topology.faces))

    def _tokens(self, centred: Tensor) -> Tensor:
        """Mesh tokens, encoded once per distinct face in the batch (speakers recur in batches)."""
        unique, inverse = torch.unique(centred.flatten(1), dim=0, return_inverse=True)
        return self.mesh(unique.view(-1, *centred.shape[1:]))[inverse]

    def _centred(self, templates: Tensor) -> tuple[Tensor, Tensor]:
        centroid = templates.mean(dim=1, keepdim=True)
        return (templates - centroid) * POSITION_SCALE, centroid

    def prepare(
        self, templates: Tensor, speakers: Tensor | None = None, points: PointSet | None = None
    ) -> FaceState:
        """Mesh tokens and the point basis (the template's vertices unless ``points``)."""
        centred, centroid = self._centred(templates)
        if points is None:
            uv, neutral, spectral = self.uv, centred, self.spectral
        else:
            uv, neutral = points.uv, (points.neutral - centroid) * POSITION_SCALE
            spectral = self._spectral_at(points)
        return FaceState(self._tokens(centred), self.head.point_basis(uv, neutral, spectral))

    def _spectral_at(self, points: PointSet) -> Tensor | None:
        """The eigenfunctions at a point set, read on its triangles (located from its UVs unless
        it names them)."""
        if self.spectral is None:
            return None
        if points.surface is not None:
            return self._spectral_on(*points.surface)
        uv = points.uv.cpu().numpy()
        index, bary = locate_uv(self.topology.uv, self.topology.faces, uv)
        return self._spectral_on(torch.from_numpy(index), torch.from_numpy(bary))

    def _spectral_on(self, face_index: Tensor, bary: Tensor) -> Tensor | None:
        """The eigenfunctions at surface points (triangle, barycentrics); None without them."""
        if self.spectral is None:
            return None
        return barycentric_interpolate(self.spectral, self.faces, face_index, bary)

    def _motion(self, levels: list[Tensor], tokens: Tensor, frame_lengths: Tensor | None) -> Tensor:
        padding = None
        if frame_lengths is not None:
            frames = torch.arange(levels[0].shape[1], device=levels[0].device)
            padding = frames[None, :] >= frame_lengths[:, None]
        return self.fusion(levels, tokens, padding)

    def animate(
        self,
        audio: Tensor,
        num_frames: int,
        state: FaceState,
        out: Tensor | None = None,
        audio_lengths: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> Tensor:
        """Displacements (B, T, P, 3) in dataset units, added into ``out`` when given."""
        levels = decoder_levels(self.phone_readout, self.speech(audio, num_frames, audio_lengths))
        motion = self._motion(levels, state.tokens, frame_lengths)
        return self.head(motion, state.basis, self.displacement_scale, out)

    def training_loss(self, batch: Batch, losses: LossConfig) -> tuple[Tensor, dict[str, float]]:
        """Position/velocity loss on points drawn by the learnt sampler, plus the sampler's own
        and, with a phone readout, the phone loss.

        The surface loss is importance weighted (unbiased for the area-uniform surface loss);
        the sampler is trained to lower that estimate's variance, so it concentrates where the
        error is, and a coverage term keeps every triangle reachable.
        """
        sample = self.sampler.sample(losses.points)
        faces, index, bary = self.faces, sample.face_index, sample.bary
        centred, _ = self._centred(batch.templates)
        uv = barycentric_interpolate(self.uv, faces, index, bary)
        neutral = barycentric_interpolate(centred, faces, index, bary)
        spectral = self._spectral_on(index, bary)
        target = barycentric_interpolate(batch.displacements, faces, index, bary)
        levels, logits = read_phones(
            self.phone_readout,
            self.speech(batch.audio, batch.num_frames, batch.audio_lengths),
            self.motion_gradient(losses),
        )
        motion = self._motion(levels, self._tokens(centred), batch.frame_lengths)
        pred = self.head(motion, self.head.point_basis(uv, neutral, spectral))
        factors = np.stack(
            [
                vertex_weights(self.topology, by_region)
                for by_region in (losses.region_weights, losses.dynamics_regions)
            ],
            axis=1,
        )
        factors = torch.as_tensor(factors, device=pred.device)
        region, dynamics = barycentric_interpolate(factors, faces, index, bary).unbind(dim=1)
        lips = self.lips[faces[index]].float().mean(dim=1) > 0.5
        target = target / self.displacement_scale
        parts = motion_losses(
            pred, target, batch.frame_mask(), region * sample.weight, lips, dynamics
        )
        # The sampler is steered by each point's share of the surface loss (region-weighted
        # position and velocity error), rescaled to unit mean square so its step size does not
        # depend on the error's magnitude (the variance-optimal density is scale-free).
        error = region * (
            losses.position * parts.point_position + losses.velocity * parts.point_velocity
        )
        error = error / (error * sample.weight).pow(2).mean().sqrt().clamp_min(1e-12)
        sampler = self.sampler.estimator_loss(sample, error)
        coverage = self.sampler.coverage_loss()
        surface = combined_loss(parts, losses)
        loss = surface + losses.sampler * sampler + losses.coverage * coverage
        logs = {
            "loss": surface, "position": parts.position, "velocity": parts.velocity,
            "lip_max": parts.lip_max, "coverage": coverage,
        }  # fmt: skip
        if logits is not None:
            logs["phones"] = phone_loss(logits, batch.phones)
            loss = loss + losses.phones * logs["phones"]
        return loss, {name: float(value.detach()) for name, value in logs.items()}
