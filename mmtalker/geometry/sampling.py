"""Learnable non-uniform sampling of surface points, with unbiased importance weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mmtalker.errors import TemplateError


@dataclass(frozen=True)
class SurfaceSample:
    """Surface points: triangle ``face_index`` (P,), ``bary`` (P, 3) and importance ``weight`` (P,).

    ``weight`` = q/p, area-uniform over sampler probability of the point's face (detached).
    """

    face_index: Tensor
    bary: Tensor
    weight: Tensor


class SurfaceSampler(torch.nn.Module):
    """A learnable distribution over the surface: triangle f with p_f ∝ A_f·exp(θ_f), uniform in it.

    The surface loss is estimated as mean_i(weight_i·error_i), weight = q/p with q the area-uniform
    probability: unbiased for the area-uniform integral whatever p is, so that loss cannot train θ
    (its expectation does not depend on p). θ instead minimises the estimator's variance,
    Σ_f q_f² E[e²|f] / p_f, smallest at p_f ∝ A_f·rms(e|f): samples gather where the error (the
    motion: lips, eyes) is large. Its gradient −E_p[(q e/p)² ∇θ log p] is estimated with the score
    function (:meth:`estimator_loss`), unbiased and cheap. Gumbel-softmax or straight-through would
    relax the triangle choice into a biased sample; as that choice is the only discrete step (the
    barycentrics are exact uniforms), the score function is exact in expectation instead.
    :meth:`coverage_loss`, weighted by the caller, keeps every p_f > 0, which unbiasedness needs.
    """

    def __init__(self, faces: np.ndarray | Tensor, areas: np.ndarray | Tensor) -> None:
        super().__init__()
        faces = torch.as_tensor(faces, dtype=torch.long)
        areas = torch.as_tensor(areas, dtype=torch.get_default_dtype())
        if faces.ndim != 2 or faces.shape[1] != 3 or areas.shape != (len(faces),):
            raise TemplateError(
                f"need faces (F, 3) and areas (F,), got {tuple(faces.shape)}, {tuple(areas.shape)}"
            )
        if not (areas > 0).all():
            raise TemplateError(
                f"{int((~(areas > 0)).sum())} triangles have no positive area; a sampler needs "
                "every triangle to have some probability, so remove degenerate triangles first"
            )
        self.register_buffer("faces", faces)
        self.register_buffer("areas", areas)
        self.logits = torch.nn.Parameter(torch.zeros(len(faces), dtype=areas.dtype))

    def _log_probabilities(self) -> Tensor:
        return torch.log_softmax(self.areas.log() + self.logits, dim=0)

    def probabilities(self) -> Tensor:
        """p_f (F,), area-aware: zero logits give the area-uniform distribution."""
        return self._log_probabilities().exp()

    def area_probabilities(self) -> Tensor:
        """q_f (F,), the area-uniform distribution the surface integral is taken against."""
        return self.areas / self.areas.sum()

    def sample(self, num_points: int, generator: torch.Generator | None = None) -> SurfaceSample:
        """``num_points`` points drawn from p, with their importance weights q/p."""
        p = self.probabilities().detach()
        face_index = torch.multinomial(p, num_points, replacement=True, generator=generator)
        r1, r2 = torch.rand(2, num_points, generator=generator, dtype=p.dtype, device=p.device)
        # sqrt of the first uniform makes the point uniform over the triangle's area.
        s = r1.sqrt()
        bary = torch.stack([1.0 - s, s * (1.0 - r2), s * r2], dim=1)
        weight = self.area_probabilities()[face_index] / p[face_index]
        return SurfaceSample(face_index, bary, weight)

    def log_prob(self, face_index: Tensor) -> Tensor:
        """log p of the given triangles, differentiable in the logits."""
        return self._log_probabilities()[face_index]

    def estimator_loss(self, sample: SurfaceSample, point_error: Tensor) -> Tensor:
        """Surrogate whose gradient is an unbiased estimate of the estimator variance's gradient.

        ``point_error`` (..., P): leading dims (e.g. frames sharing the points) are averaged.
        """
        error = point_error.detach().reshape(-1, len(sample.weight)).mean(dim=0)
        score = (sample.weight * error).pow(2)
        return -(score * self.log_prob(sample.face_index)).mean()

    def coverage_loss(self) -> Tensor:
        """KL(q ‖ p): zero at the area-uniform start, growing as p starves any triangle."""
        q = self.area_probabilities()
        return (q * (q.log() - self._log_probabilities())).sum()

    def density_ratio(self, vertex_region: np.ndarray | Tensor) -> float:
        """Sampling density per unit area over a region, relative to the surface average.

        The region's triangles are those with at least two of their corners in it.
        """
        region = torch.as_tensor(vertex_region, dtype=torch.long, device=self.faces.device)
        inside = torch.isin(self.faces, region).sum(dim=1) >= 2
        if not inside.any():
            raise TemplateError("no triangle has two corners in the region; it is too sparse")
        p = self.probabilities().detach()
        return float(p[inside].sum() / self.areas[inside].sum() * self.areas.sum())
