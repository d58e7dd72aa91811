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


def cluster_mean(x: Tensor, assignment: Tensor, sizes: Tensor) -> Tensor:
    """Mean of x (B, N, D) over the clusters of ``assignment`` (N,) of ``sizes`` (K,): (B, K, D)."""
    # A segment sum: the dense pooling product it replaces was almost all zeros and took a
    # tenth of a training step.
    total = x.new_zeros(x.shape[0], len(sizes), x.shape[2]).index_add_(1, assignment, x)
    return total / sizes[:, None]


def coarse_edges(edges: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """Edges between clusters that share a fine edge (self-loops dropped)."""
    coarse = assignment[edges]
    coarse = coarse[:, coarse[0] != coarse[1]]
    return np.unique(coarse.T, axis=0).T.astype(np.int64)


class GraphConvolution(nn.Module):
    """Kipf–Welling graph convolution, Â·X·W + b, for a batch of signals on one fixed graph.

    Â (:func:`normalized_adjacency`: self-loops, symmetric degree normalisation) is applied as
    one sparse product with the batch folded into the feature axis; message passing over a
    (B, V, D) tensor gathers per edge and batch and was several times slower on CPU.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        """x (B, V, D), adjacency sparse (V, V) → (B, V, D)."""
        # Under autocast the sparse product stays in Â's precision: sparse kernels lack most
        # half-precision variants, and this product is a small share of the model's work.
        # Autocast itself must be off for it: it would cast the product (an addmm) down again,
        # and the backward then fails on the mixed dtypes.
        h = self.lin(x).to(adjacency.dtype)
        batch, nodes, dim = h.shape
        with torch.autocast(h.device.type, enabled=False):
            h = torch.sparse.mm(adjacency, h.transpose(0, 1).reshape(nodes, batch * dim))
        return h.view(nodes, batch, dim).transpose(0, 1) + self.bias


def normalized_adjacency(edges: np.ndarray, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Â = D^-1/2 (A + I) D^-1/2 of a graph without self-loops, as coalesced COO.

    ``edges`` (2, E) are unique source → target pairs; returns indices (2, nnz) as (row,
    column), row the target that aggregates, and values (nnz,): torch-geometric's ``gcn_norm``
    (tests check it), computed here because importing torch-geometric costs ~6 s of CPU in
    every process that builds a model (Ray Train workers, serve replicas, batch workers).
    """
    nodes = np.arange(num_nodes)
    targets = np.concatenate([edges[1], nodes])
    sources = np.concatenate([edges[0], nodes])
    scale = 1.0 / np.sqrt(np.bincount(targets, minlength=num_nodes).astype(np.float64))
    adjacency = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([targets, sources])),
        torch.as_tensor((scale[targets] * scale[sources]).astype(np.float32)),
        (num_nodes, num_nodes),
        check_invariants=True,
    ).coalesce()
    return adjacency.indices(), adjacency.values()


class ResidualGCNBlock(nn.Module):
    """Two graph convolutions with a residual connection and layer norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = GraphConvolution(dim)
        self.conv2 = GraphConvolution(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, adjacency: Tensor) -> Tensor:
        hidden = torch.nn.functional.gelu(self.conv1(x, adjacency))
        return self.norm(x + self.conv2(hidden, adjacency))


class MeshEncoder(nn.Module):
    """Template (B, V, 3) → region tokens (B, K, dim) through a residual GCN hierarchy."""

    def __init__(
        self,
        faces: np.ndarray,
        uv: np.ndarray,
        dim: int,
        clusters: tuple[int, ...],
        blocks: int,
        fine_dim: int | None = None,
    ) -> None:
        """``fine_dim`` is the width on the full mesh (default ``dim``); the coarser levels and
        the tokens have ``dim``."""
        super().__init__()
        edges = mesh_edges(faces)
        fine_dim = fine_dim or dim
        self.input = nn.Linear(3 + 2 + 3, fine_dim)
        self.register_buffer("uv", torch.as_tensor(uv, dtype=torch.float32), persistent=False)
        self.sizes = [len(uv)]
        self._register_adjacency(0, edges, len(uv))
        self.levels = nn.ModuleList(
            [nn.ModuleList(ResidualGCNBlock(fine_dim) for _ in range(blocks))]
        )
        # Applied after the first pooling, where it costs a tenth of what it would on the full
        # mesh: a linear map commutes with the cluster mean.
        self.widen = nn.Linear(fine_dim, dim) if fine_dim != dim else nn.Identity()
        points = uv
        for level, count in enumerate(clusters, start=1):
            assignment = farthest_point_clusters(points, count)
            count = int(assignment.max()) + 1
            pool = pooling_matrix(assignment, count)
            edges = coarse_edges(edges, assignment)
            points = pool @ points
            sizes = np.maximum(np.bincount(assignment, minlength=count), 1).astype(np.float32)
            self.register_buffer(f"assignment_{level}", torch.as_tensor(assignment), False)
            self.register_buffer(f"cluster_size_{level}", torch.as_tensor(sizes), False)
            self.sizes.append(count)
            self._register_adjacency(level, edges, count)
            self.levels.append(nn.ModuleList(ResidualGCNBlock(dim) for _ in range(blocks)))
        self.num_tokens = points.shape[0]
        self.token_position = nn.Parameter(torch.zeros(self.num_tokens, dim))

    def _register_adjacency(self, level: int, edges: np.ndarray, num_nodes: int) -> None:
        # Dense index/value buffers, not a sparse tensor: they move with .to() and DDP can sync
        # them at wrap time; the sparse view is rebuilt per forward, which costs nothing.
        index, weight = normalized_adjacency(edges, num_nodes)
        self.register_buffer(f"adjacency_index_{level}", index, persistent=False)
        self.register_buffer(f"adjacency_weight_{level}", weight, persistent=False)

    def adjacency(self, level: int) -> Tensor:
        """Â of hierarchy level ``level`` (0: the mesh) as a sparse (N, N) tensor."""
        index = getattr(self, f"adjacency_index_{level}")
        weight = getattr(self, f"adjacency_weight_{level}")
        size = (self.sizes[level], self.sizes[level])
        return torch.sparse_coo_tensor(
            index, weight, size, is_coalesced=True, check_invariants=False
        )

    def forward(self, centred: Tensor) -> Tensor:
        """centred: templates (B, V, 3) minus their centroid, in the model's position scale."""
        # Scale-free shape plus absolute offsets and the chart coordinate, so tokens see both
        # which region they are and how this speaker's face is built there.
        scale = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-6)[:, None, None]
        uv = self.uv.expand(centred.shape[0], -1, -1)
        x = self.input(torch.cat([centred / scale, uv, centred], dim=-1))
        for level, blocks in enumerate(self.levels):
            if level > 0:
                x = cluster_mean(
                    x, getattr(self, f"assignment_{level}"), getattr(self, f"cluster_size_{level}")
                )
            if level == 1:
                x = self.widen(x)
            adjacency = self.adjacency(level)
            for block in blocks:
                x = block(x, adjacency)
        if len(self.levels) == 1:
            x = self.widen(x)
        return x + self.token_position
