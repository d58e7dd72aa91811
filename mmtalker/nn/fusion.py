"""Dual cross-attention fusion of hierarchical speech features and mesh tokens.

Each layer runs both directions: speech frames attend to the geometric tokens (what this face
looks like where it moves), then the tokens attend to the speech frames (which regions this
utterance drives), so the next layer's speech queries see utterance-aware tokens. Speech level
``l`` is injected before layer ``l``: coarse-to-deep features enter one resolution at a time.
A depthwise temporal convolution after each layer gives frames local temporal context.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DualCrossAttentionLayer(nn.Module):
    """One speech→mesh and one mesh→speech cross-attention, each with a feed-forward block.

    Without ``update_mesh`` (the last layer, whose tokens nobody reads) the mesh→speech half is
    left out: it would cost time, and parameters without gradients break DDP's reducer.
    """

    def __init__(
        self, dim: int, heads: int, kernel: int, dropout: float, update_mesh: bool = True
    ) -> None:
        super().__init__()
        self.speech_norm = nn.LayerNorm(dim)
        self.mesh_norm = nn.LayerNorm(dim)
        self.speech_to_mesh = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.speech_ff = _feed_forward(dim, dropout)
        self.mesh_to_speech = (
            nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
            if update_mesh
            else None
        )
        self.mesh_ff = _feed_forward(dim, dropout) if update_mesh else None
        self.temporal = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(
        self, speech: Tensor, mesh: Tensor, padding: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """speech (B, T, D), mesh (B, K, D), padding (B, T) True where a frame is padding."""
        query = self.speech_norm(speech)
        keys = self.mesh_norm(mesh)
        speech = speech + self.speech_to_mesh(query, keys, keys, need_weights=False)[0]
        speech = speech + self.speech_ff(speech)
        if padding is not None:
            # Padded frames must not leak into real ones through the temporal convolution.
            speech = speech.masked_fill(padding[..., None], 0.0)
        speech = speech + self.temporal(speech.transpose(1, 2)).transpose(1, 2)
        if self.mesh_to_speech is None or self.mesh_ff is None:
            return speech, mesh
        frames = self.speech_norm(speech)
        mesh = (
            mesh
            + self.mesh_to_speech(
                keys, frames, frames, key_padding_mask=padding, need_weights=False
            )[0]
        )
        return speech, mesh + self.mesh_ff(mesh)


def _feed_forward(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, 2 * dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(2 * dim, dim),
    )


class DualCrossAttentionFusion(nn.Module):
    """Hierarchical speech levels (each (B, T, D)) + mesh tokens (B, K, D) → motion (B, T, D).

    One fusion layer per speech level: level ``l`` is projected and added before layer ``l``.
    """

    def __init__(self, dim: int, levels: int, heads: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.inject = nn.ModuleList(nn.Linear(dim, dim) for _ in range(levels))
        self.layers = nn.ModuleList(
            DualCrossAttentionLayer(dim, heads, kernel, dropout, update_mesh=i < levels - 1)
            for i in range(levels)
        )
        self.out = nn.LayerNorm(dim)

    def forward(self, speech_levels: list[Tensor], mesh: Tensor, padding: Tensor | None) -> Tensor:
        if len(speech_levels) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} speech levels, got {len(speech_levels)}")
        speech = torch.zeros_like(speech_levels[0])
        for inject, layer, features in zip(self.inject, self.layers, speech_levels, strict=True):
            speech, mesh = layer(speech + inject(features), mesh, padding)
        return self.out(speech)
