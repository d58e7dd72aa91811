"""UV regression head: a 3D displacement for any surface point and frame.

displacement(p, t) = Σ_k basis_k(p) · coefficient_k(t). The basis depends only on the point
(its UV coordinate, Fourier-encoded, the speaker's neutral position there and, optionally, the
face's Laplacian eigenfunctions there: :mod:`mmtalker.geometry.spectral`), so for a point
set it is computed once and reused for every frame and chunk; per frame the head costs one small
matrix product. The basis MLP is continuous over the chart, which is what lets one model
animate the same face at other resolutions (a subdivided mesh, a decimated LOD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fourier_features(uv: Tensor, bands: int) -> Tensor:
    """[uv, sin(2^i π uv), cos(2^i π uv)] for i < bands; (..., 2) → (..., 2 + 4·bands)."""
    frequencies = math.pi * 2.0 ** torch.arange(bands, device=uv.device, dtype=uv.dtype)
    angles = uv[..., None] * frequencies
    return torch.cat([uv, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


#: Scale of the last coefficient layer at initialisation, relative to PyTorch's default.
INITIAL_SCALE = 0.02


class UVRegressionHead(nn.Module):
    """Point basis (B, K, P·3) from UV + neutral position (+ ``spectral`` intrinsic coordinates);
    coefficients (B, T, K) from motion."""

    def __init__(self, dim: int, basis: int, bands: int, hidden: int, spectral: int = 0) -> None:
        super().__init__()
        self.basis, self.bands, self.spectral_features = basis, bands, spectral
        self.point_mlp = nn.Sequential(
            nn.Linear(2 + 4 * bands + 3 + spectral, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, basis * 3),
        )
        self.coefficients = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, basis))
        # Training starts next to the neutral face: random coefficients times a random basis put
        # ripples over the whole face that the first few hundred steps only spend unlearning.
        # Not exactly at it (as FaceFormer's zeroed output layer is): with a zero last layer no
        # gradient reaches the rest of the model until that layer has grown, which measurably
        # slows the start; Adam's updates do not depend on the gradient's scale, so a small
        # layer learns as fast as a full one.
        with torch.no_grad():
            self.coefficients[-1].weight.mul_(INITIAL_SCALE)
            self.coefficients[-1].bias.zero_()

    def point_basis(self, uv: Tensor, neutral: Tensor, spectral: Tensor | None = None) -> Tensor:
        """uv (P, 2) or (B, P, 2), centred neutral positions (B, P, 3) and, if the head reads
        them, eigenfunction values (P, E) or (B, P, E) → basis (B, K, P·3), laid out for the
        per-frame product."""
        if (spectral is None) != (self.spectral_features == 0):
            raise ValueError(
                f"this head reads {self.spectral_features} spectral features per point; got "
                f"{'none' if spectral is None else spectral.shape[-1]}"
            )
        batch = neutral.shape[0]
        if uv.dim() == 2:
            uv = uv.expand(batch, -1, -1)
        parts = [fourier_features(uv, self.bands), neutral]
        if spectral is not None:
            parts.append(spectral.expand(batch, -1, -1) if spectral.dim() == 2 else spectral)
        features = torch.cat(parts, dim=-1)
        basis = self.point_mlp(features).unflatten(-1, (self.basis, 3))
        return basis.transpose(1, 2).flatten(2)

    def forward(
        self, motion: Tensor, basis: Tensor, scale: Tensor | float = 1.0, out: Tensor | None = None
    ) -> Tensor:
        """motion (B, T, D), basis (B, K, P·3) → displacements (B, T, P, 3) times ``scale``.

        The scale multiplies the (B, T, K) coefficients, not the much larger output, which is
        added into ``out`` (B, T, P, 3) when given (e.g. a buffer holding the neutral face): for
        long audio the output is most of the memory traffic, and a fresh buffer per chunk costs
        more in page faults than the product itself.
        """
        coefficients = self.coefficients(motion) * scale
        batch, frames, points = motion.shape[0], motion.shape[1], basis.shape[2] // 3
        if out is None:
            return (coefficients @ basis).view(batch, frames, points, 3)
        flat = out.view(batch, frames, points * 3)
        torch.baddbmm(flat, coefficients, basis, out=flat)
        return out
