"""Training losses: position and velocity errors with region weights, and the sampler's terms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmtalker.data.sequence import Topology


class LossConfig(BaseModel):
    """Weights of the loss terms; region weights multiply the error of points in that region."""

    model_config = ConfigDict(extra="forbid")

    position: float = Field(1.0, ge=0)
    velocity: float = Field(1.0, ge=0)
    region_weights: dict[str, float] = {"lips": 3.0, "eyes": 2.0}
    sampler: float = Field(1.0, ge=0)
    coverage: float = Field(0.05, ge=0)
    points: int = Field(1024, ge=16)


def vertex_weights(topology: Topology, region_weights: dict[str, float]) -> np.ndarray:
    """Per-vertex loss weight: 1 everywhere, the largest region weight inside weighted regions."""
    weights = np.ones(topology.num_vertices, np.float32)
    for name, weight in region_weights.items():
        region = topology.region(name)
        weights[region] = np.maximum(weights[region], weight)
    return weights


@dataclass
class MotionLoss:
    """Position and velocity losses, and each one's detached mean error per point."""

    position: Tensor
    velocity: Tensor
    point_position: Tensor
    point_velocity: Tensor


def motion_losses(
    pred: Tensor, target: Tensor, frame_mask: Tensor, point_weights: Tensor
) -> MotionLoss:
    """Position and velocity losses over real frames of displacements (B, T, P, 3).

    ``point_weights`` (P,) combine region and importance weights. The per-point errors (P,) are
    unweighted squared errors averaged over the batch's real frames (or frame pairs).
    """
    # Counts stay in float32 even under bf16 autocast, where 701 frames would round to 700.
    mask = frame_mask[..., None].float()
    squared = ((pred - target) ** 2).sum(-1)
    frames = mask.sum().clamp_min(1.0)
    position = (squared * mask * point_weights[..., None, :]).sum() / (frames * pred.shape[2])
    both = (frame_mask[:, 1:] & frame_mask[:, :-1])[..., None].float()
    speed_error = ((pred.diff(dim=1) - target.diff(dim=1)) ** 2).sum(-1)
    steps = both.sum().clamp_min(1.0)
    velocity = (speed_error * both * point_weights[..., None, :]).sum() / (steps * pred.shape[2])
    return MotionLoss(
        position=position,
        velocity=velocity,
        point_position=((squared * mask).sum(dim=(0, 1)) / frames).detach(),
        point_velocity=((speed_error * both).sum(dim=(0, 1)) / steps).detach(),
    )
