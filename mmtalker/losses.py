"""Training losses: position and velocity errors with region weights, and the sampler's terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmtalker.data.sequence import Topology


class LossConfig(BaseModel):
    """Weights of the loss terms; region weights multiply the error of points in that region."""

    model_config = ConfigDict(extra="forbid")

    position: float = Field(1.0, ge=0)
    velocity: float = Field(1.0, ge=0)
    region_weights: dict[str, float] = {"lips": 3.0, "eyes": 3.0}
    #: Mean over frames of the largest squared error on the lips: the lip vertex error (LVE)
    #: is this maximum, which a mean-square loss alone lets a few lip points carry.
    lip_max: float = Field(0.2, ge=0)
    #: How much each point moves over a clip (the temporal standard deviation of its
    #: displacement, per axis) matched to the truth: a mean-square loss alone rewards damped
    #: motion wherever timing is uncertain, and the upper face (FDD) then looks frozen.
    dynamics: float = Field(1.0, ge=0)
    #: Factors on the dynamics term by region (the largest where regions overlap; 1 elsewhere).
    #: Blinks come at random times no audio reveals, so matching the eyes' temporal spread
    #: teaches a model to invent blinks; left out there (docs/accuracy.md).
    dynamics_regions: dict[str, float] = {"eyes": 0.0}
    sampler: float = Field(1.0, ge=0)
    coverage: float = Field(0.05, ge=0)
    #: Weight of the phone loss: cross-entropy of a linear readout of the speech features
    #: against the per-frame phone labels of corpora that have them (others train without it).
    #: 0.2 lowered both models' bench test LVE on every seed screened (MMTalker e.g. 0.170 vs
    #: 0.198, lip sync 0.945 vs 0.932; docs/accuracy.md). Corpora without labels ignore it.
    phones: float = Field(0.2, ge=0)
    #: With the phone loss: the factor on the motion losses' gradients into the speech encoder
    #: (the phone loss's pass whole); None takes the model's own (``AnimationModel``). Below 1
    #: the encoder learns more to name phones than to fit the training speakers' motion: at 0.1
    #: MMTalker's bench val LVE fell to 0.223-0.240 from 0.247-0.250 and its test LVE to 0.125
    #: from 0.137 over three seeds, but the baseline lost (docs/accuracy.md).
    speech_motion_gradient: float | None = Field(None, ge=0, le=1)
    #: Points drawn on the surface per training frame. 512 take 28% off a CPU step's time but
    #: scored the same in a 20-minute bench screen (docs/accuracy.md).
    points: int = Field(1024, ge=16)


def vertex_weights(topology: Topology, region_weights: dict[str, float]) -> np.ndarray:
    """Per-vertex factor: 1 everywhere, the largest region weight inside weighted regions (a
    region's weight holds even below 1)."""
    weights = np.full(topology.num_vertices, -np.inf, np.float32)
    for name, weight in region_weights.items():
        region = topology.region(name)
        weights[region] = np.maximum(weights[region], weight)
    return np.where(np.isinf(weights), 1.0, weights).astype(np.float32)


@dataclass
class MotionLoss:
    """Position and velocity losses, and each one's detached mean error per point."""

    position: Tensor
    velocity: Tensor
    lip_max: Tensor
    dynamics: Tensor
    point_position: Tensor
    point_velocity: Tensor


def motion_losses(
    pred: Tensor,
    target: Tensor,
    frame_mask: Tensor,
    point_weights: Tensor,
    lips: Tensor,
    dynamics_weights: Tensor | None = None,
) -> MotionLoss:
    """Position, velocity, lip-maximum and dynamics losses over real frames of displacements
    (B, T, P, 3).

    ``point_weights`` (P,) combine region and importance weights; ``lips`` (P,) is True on lip
    points; ``dynamics_weights`` (P,) further scale the dynamics term. The per-point errors (P,)
    are unweighted squared errors averaged over the batch's real frames (or frame pairs).
    """
    # Counts stay in float32 even under bf16 autocast, where 701 frames would round to 700.
    mask = frame_mask[..., None].float()
    squared, speed_error, pred_spread = _PointErrors.apply(pred, target, mask[..., None])
    frames = mask.sum().clamp_min(1.0)
    position = (squared * mask * point_weights).sum() / (frames * pred.shape[2])
    both = (frame_mask[:, 1:] & frame_mask[:, :-1])[..., None].float()
    steps = both.sum().clamp_min(1.0)
    velocity = (speed_error * both * point_weights).sum() / (steps * pred.shape[2])
    if lips.any():
        lip_max = (squared[..., lips].amax(dim=-1) * mask[..., 0]).sum() / frames
    else:
        lip_max = squared.new_zeros(())
    _, _, target_spread = _spread(target.detach(), mask[..., None])
    if dynamics_weights is not None:
        point_weights = point_weights * dynamics_weights
    dynamics = ((pred_spread - target_spread).square().sum(-1) * point_weights).mean()
    return MotionLoss(
        position=position,
        velocity=velocity,
        lip_max=lip_max,
        dynamics=dynamics,
        point_position=((squared * mask).sum(dim=(0, 1)) / frames).detach(),
        point_velocity=((speed_error * both).sum(dim=(0, 1)) / steps).detach(),
    )


def _spread(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, P, 3) values less their mean over real frames (zero elsewhere), the real frames'
    count (B, 1, 1) and the values' standard deviation over them (B, P, 3); mask (B, T, 1, 1)."""
    count = mask.sum(dim=1).clamp_min(1.0)
    # An expanded mask: broadcasting one value per frame over (P, 3) was 2x slower on CPU.
    mask = mask.expand_as(values)
    centred = (values - (values * mask).sum(dim=1, keepdim=True) / count[:, None]) * mask
    # The epsilon keeps the gradient finite for points that do not move at all.
    return centred, count, (centred.square().sum(dim=1) / count + 1e-8).sqrt()


def _squared_norm(values: Tensor) -> Tensor:
    """Squared length of (..., 3) vectors: (...); summing the channels as three slices is 2.5x
    faster on CPU than reducing the last dimension of size 3."""
    squares = values.square()
    return squares[..., 0] + squares[..., 1] + squares[..., 2]


class _PointErrors(torch.autograd.Function):
    """From (B, T, P, 3) predictions, targets and a (B, T, 1, 1) frame mask: the squared error
    per frame and point (B, T, P), the same of the error's frame difference (B, T-1, P), and the
    predictions' standard deviation over real frames (B, P, 3). The target gets no gradient.

    The backward is written out: autograd's graph of the same formulas took about a fifth of a
    CPU training step, a hundred passes over tensors of this size where this takes about twenty.
    """

    @staticmethod
    def forward(ctx: Any, pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        error = pred - target
        delta = error.diff(dim=1)
        centred, count, spread = _spread(pred, mask)
        ctx.save_for_backward(error, delta, centred, count, spread)
        ctx.dtype = pred.dtype
        return _squared_norm(error), _squared_norm(delta), spread

    @staticmethod
    def backward(
        ctx: Any, grad_squared: Tensor, grad_speed: Tensor, grad_spread: Tensor
    ) -> tuple[Tensor | None, ...]:
        error, delta, centred, count, spread = ctx.saved_tensors
        grad = error * (2.0 * grad_squared)[..., None]
        # Frame t's difference is e[t+1] - e[t]: its gradient flows to both frames.
        flow = delta * (2.0 * grad_speed)[..., None]
        grad[:, 1:] += flow
        grad[:, :-1] -= flow
        grad += centred * (grad_spread / (count * spread))[:, None]
        return grad.to(ctx.dtype), None, None


def combined_loss(parts: MotionLoss, losses: LossConfig) -> Tensor:
    """The weighted sum of the motion terms every model trains on."""
    return (
        losses.position * parts.position
        + losses.velocity * parts.velocity
        + losses.lip_max * parts.lip_max
        + losses.dynamics * parts.dynamics
    )


def phone_loss(logits: Tensor, phones: Tensor | None) -> Tensor:
    """Mean cross-entropy of per-frame phone logits (B, T, C) against classes (B, T); frames
    labelled -1 (unknown, padding) are left out, and a batch without labels scores 0."""
    if phones is None:
        # Zero that still depends on the readout, so data-parallel training sees its gradient.
        return logits.sum() * 0.0
    # A sum over the labelled frames divided by their count (at least 1): the mean, or 0 when
    # none is labelled, without reading the labels back to the host on every step.
    labels = phones.flatten()
    total = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)
