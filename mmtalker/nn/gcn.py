"""Mesh branch: a residual graph convolutional network over the face mesh with a coarse hierarchy.

The speaker's neutral template is encoded on the full mesh graph, pooled onto coarser cluster
graphs and finally into a small set of region tokens, the geometric tokens the fusion attends to.
Clusters are chosen on the UV chart (farthest-point seeds, nearest-seed assignment), so they
depend on the topology only and every speaker's tokens describe the same face regions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.nn import GCNConv


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """Undirected edge index (2, E) of a triangle mesh, both directions, no duplicates."""
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
    return np.unique(pairs, axis=0).T.astype(np.int64)


def farthest_point_clusters(points: np.ndarray, count: int) -> np.ndarray:
    """Assign each point to one of ``count`` farthest-point seeds (deterministic: starts at 0)."""
    count = min(count, len(points))
    seeds = [0]
    distance = np.linalg.norm(points - points[0], axis=1)
    for _ in range(count - 1):
        seeds.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(points - points[seeds[-1]], axis=1))
    to_seed = np.linalg.norm(points[:, None, :] - points[None, seeds, :], axis=2)
    return to_seed.argmin(axis=1)


def pooling_matrix(assignment: np.ndarray, count: int) -> np.ndarray:
    """Row-normalised (count, N) matrix averaging each cluster's members."""
    matrix = np.zeros((count, len(assignment)), dtype=np.float32)
    matrix[assignment, np.arange(len(assignment))] = 1.0
    return matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)


def coarse_edges(edges: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Edges between clusters that share a fine edge (self-loops dropped)."""
    coarse = assignment[edges]
    coarse = coarse[:, coarse[0] != coarse[1]]
    return np.unique(coarse.T, axis=0).T.astype(np.int64)


class ResidualGCNBlock(nn.Module):
    """Two graph convolutions with a residual connection and layer norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = GCNConv(dim, dim)
        self.conv2 = GCNConv(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        hidden = torch.nn.functional.gelu(self.conv1(x, edge_index))
        return self.norm(x + self.conv2(hidden, edge_index))


class MeshEncoder(nn.Module):
    """Template (B, V, 3) → region tokens (B, K, dim) through a residual GCN hierarchy."""

    def __init__(
        self, faces: np.ndarray, uv: np.ndarray, dim: int, clusters: tuple[int, ...], blocks: int
    ) -> None:
        super().__init__()
        edges = mesh_edges(faces)
        self.input = nn.Linear(3 + 2 + 3, dim)
        self.register_buffer("uv", torch.as_tensor(uv, dtype=torch.float32), persistent=False)
        self.register_buffer("edges_0", torch.as_tensor(edges), persistent=False)
        self.levels = nn.ModuleList([nn.ModuleList(ResidualGCNBlock(dim) for _ in range(blocks))])
        points = uv
        for level, count in enumerate(clusters, start=1):
            assignment = farthest_point_clusters(points, count)
            count = int(assignment.max()) + 1
            pool = pooling_matrix(assignment, count)
            edges = coarse_edges(edges, assignment)
            points = pool @ points
            self.register_buffer(f"pool_{level}", torch.as_tensor(pool), persistent=False)
            self.register_buffer(f"edges_{level}", torch.as_tensor(edges), persistent=False)
            self.levels.append(nn.ModuleList(ResidualGCNBlock(dim) for _ in range(blocks)))
        self.num_tokens = points.shape[0]
        self.token_position = nn.Parameter(torch.zeros(self.num_tokens, dim))

    def forward(self, centred: Tensor) -> Tensor:
        """centred: templates (B, V, 3) minus their centroid, in the model's position scale."""
        # Scale-free shape plus absolute offsets and the chart coordinate, so tokens see both
        # which region they are and how this speaker's face is built there.
        scale = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-6)[:, None, None]
        uv = self.uv.expand(centred.shape[0], -1, -1)
        x = self.input(torch.cat([centred / scale, uv, centred], dim=-1))
        for level, blocks in enumerate(self.levels):
            if level > 0:
                x = getattr(self, f"pool_{level}") @ x
            edges = getattr(self, f"edges_{level}")
            for block in blocks:
                x = block(x, edges)
        return x + self.token_position
