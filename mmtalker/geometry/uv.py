"""The UV chart of an open face surface and the (face, barycentric) ↔ UV ↔ 3D correspondence.

A surface point is a triangle index plus barycentric coordinates; through the chart it has a UV
coordinate, and any per-vertex quantity (position, displacement) is read at it by interpolation.
"""

from __future__ import annotations

from typing import TypeVar

import igl
import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from mmtalker.data.sequence import Topology
from mmtalker.errors import TemplateError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: A UV triangle smaller than this fraction of the median one has no meaningful orientation.
DEGENERATE_AREA_FRACTION = 1e-6
#: How far outside a triangle (in barycentric units) a point still counts as on it: rounding.
CONTAINMENT_TOLERANCE = 1e-9


def compute_uv(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """UV chart (V, 2) float32 in [0, 1]² of an open, connected triangle mesh, oriented like its xy.

    LSCM (libigl): conformal, so lips and eyelids keep their shape; the eye and mouth holes are just
    free boundaries to it; and it is one sparse linear solve. Raises TemplateError if it cannot be.
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    _check_open_surface(vertices, faces)
    outer = igl.boundary_loop(faces)
    ends = _farthest_pair(vertices[outer])
    pins = outer[list(ends)]
    span = float(np.linalg.norm(vertices[pins[0]] - vertices[pins[1]]))
    uv, _ = igl.lscm(vertices, faces, pins, np.array([[0.0, 0.0], [span, 0.0]]))
    if uv.shape != (len(vertices), 2) or not np.isfinite(uv).all():
        raise TemplateError("the LSCM solve failed; the mesh is probably not a manifold surface")
    uv = _align_to_xy(uv, vertices[:, :2])
    uv = _unfold(uv, faces)
    low, extent = uv.min(axis=0), np.ptp(uv, axis=0)
    uv = (uv - low) / extent.max() + (1.0 - extent / extent.max()) / 2.0
    uv = np.clip(uv, 0.0, 1.0).astype(np.float32)
    _check_chart(uv, faces)
    return uv


def attach_uv(topology: Topology, vertices: np.ndarray) -> Topology:
    """``topology`` carrying the UV chart computed on its neutral template ``vertices``."""
    return topology.with_uv(compute_uv(vertices, topology.faces))


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """3D area of each triangle, (F,) float64."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    return 0.5 * np.linalg.norm(cross, axis=1)


def barycentric_interpolate(
    values: ArrayT,
    faces: np.ndarray | torch.Tensor,
    face_index: np.ndarray | torch.Tensor,
    bary: np.ndarray | torch.Tensor,
) -> ArrayT:
    """Per-vertex ``values`` (..., V, C) read at surface points (P,) × (P, 3): (..., P, C).

    Returns the type of ``values``; for a tensor it is differentiable in ``values`` and ``bary``.
    """
    if isinstance(values, torch.Tensor):
        faces_t = torch.as_tensor(faces, dtype=torch.long, device=values.device)
        index = torch.as_tensor(face_index, dtype=torch.long, device=values.device)
        weights = torch.as_tensor(bary, dtype=values.dtype, device=values.device)
        corners = faces_t[index]
        # Vertex-major, so each corner gathers whole rows (every frame's values of a vertex):
        # gathering C floats per frame and point was 3x slower on a training batch's targets.
        rows = values.movedim(-2, 0).reshape(values.shape[-2], -1)
        points = sum(rows[corners[:, k]] * weights[:, k, None] for k in range(3))
        points = points.view(len(index), *values.shape[:-2], values.shape[-1])
        return points.movedim(0, -2).contiguous()
    corners = values[..., np.asarray(faces)[np.asarray(face_index)], :]
    weights = np.asarray(bary, dtype=np.result_type(values.dtype, np.float32))
    return (corners * weights[..., None]).sum(-2)


def locate_uv(
    uv: np.ndarray, faces: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The surface point (face index (Q,), barycentrics (Q, 3)) under each UV ``query`` (Q, 2).

    A point off the chart (outside it, or in a hole) snaps to the closest point of the chart.
    """
    uv = np.asarray(uv, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    query = np.asarray(query, dtype=np.float64).reshape(-1, 2)
    face_index, bary = _containing_triangle(uv[faces], query)
    off_chart = face_index < 0
    if off_chart.any():
        face_index[off_chart], bary[off_chart] = _nearest_boundary_point(
            uv, faces, query[off_chart]
        )
    return face_index, bary


def subdivide(
    vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray, iterations: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Midpoint subdivision carrying UVs: each iteration splits every triangle into four.

    The original vertices keep their indices; new (edge-midpoint) vertices follow them.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    vertices, uv = np.asarray(vertices), np.asarray(uv)
    faces = np.asarray(faces, dtype=np.int64)
    for _ in range(iterations):
        half_edges = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1)
        undirected = np.sort(half_edges, axis=2).reshape(-1, 2)
        edges, inverse = np.unique(undirected, axis=0, return_inverse=True)
        mid = len(vertices) + inverse.reshape(-1, 3)
        vertices = np.concatenate([vertices, vertices[edges].mean(axis=1, dtype=vertices.dtype)])
        uv = np.concatenate([uv, uv[edges].mean(axis=1, dtype=uv.dtype)])
        a, b, c = faces.T
        ab, bc, ca = mid.T
        faces = np.concatenate([
            np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
            np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1),
        ])  # fmt: skip
    return vertices, faces.astype(np.int32), uv


def _check_open_surface(vertices: np.ndarray, faces: np.ndarray) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not np.isfinite(vertices).all():
        raise TemplateError(f"vertices must be finite (V, 3), got shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise TemplateError(f"faces must be a non-empty (F, 3) array, got {faces.shape}")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise TemplateError(f"faces index vertices outside 0..{len(vertices) - 1}")
    unused = len(vertices) - len(np.unique(faces))
    if unused:
        raise TemplateError(f"{unused} vertices belong to no triangle; remove them before UV")
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    adjacency = (np.ones(len(edges)), (edges[:, 0], edges[:, 1]))
    graph = sparse.coo_matrix(adjacency, shape=(len(vertices), len(vertices)))
    count, _ = connected_components(graph, directed=False)
    if count != 1:
        raise TemplateError(
            f"the mesh has {count} disconnected parts; a UV chart needs one connected surface"
        )
    _, uses = np.unique(edges, axis=0, return_counts=True)
    if (uses > 2).any():
        raise TemplateError(
            f"{int((uses > 2).sum())} edges are shared by more than two triangles (non-manifold)"
        )
    if not (uses == 1).any():
        raise TemplateError(
            "the mesh is closed (it has no boundary); a UV chart needs an open surface"
        )


def _farthest_pair(points: np.ndarray) -> tuple[int, int]:
    dist = np.linalg.norm(points[:, None] - points[None], axis=2)
    i, j = np.unravel_index(np.argmax(dist), dist.shape)
    return int(i), int(j)


def _align_to_xy(uv: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``uv`` rotated (and reflected if need be) to best match ``xy`` (orthogonal Procrustes)."""
    uv = uv - uv.mean(axis=0)
    u, _, vt = np.linalg.svd(uv.T @ (xy - xy.mean(axis=0)))
    return uv @ (u @ vt)


def _signed_areas(uv: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (uv[faces[:, k]].astype(np.float64) for k in range(3))
    return 0.5 * ((b - a)[:, 0] * (c - a)[:, 1] - (c - a)[:, 0] * (b - a)[:, 1])


def _unfold(uv: np.ndarray, faces: np.ndarray, rounds: int = 50) -> np.ndarray:
    """``uv`` with small folds smoothed out: the corners of turned-over triangles (and, if that
    is not enough, their growing neighbourhood) move to the mean of their neighbours.

    Scanned faces crumple in places (sub-millimetre triangles at the corners of the mouth whose
    angles sum past 360°) that no conformal map flattens; a few local averaging rounds fix such
    a patch without touching the rest of the chart.
    """
    area = _signed_areas(uv, faces)
    sign = 1.0 if (area > 0).sum() >= (area < 0).sum() else -1.0
    flipped = area * sign < 0
    if not flipped.any():
        return uv
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    n = len(uv)
    adjacency = sparse.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), (n, n))
    adjacency = ((adjacency + adjacency.T) > 0).astype(np.float64).tocsr()
    mean = sparse.diags(1.0 / np.maximum(np.asarray(adjacency.sum(axis=1)).ravel(), 1)) @ adjacency
    uv = uv.astype(np.float64)
    moving = np.zeros(n, dtype=bool)
    for _ in range(rounds):
        moving[faces[flipped].ravel()] = True
        for _ in range(10):
            uv[moving] = (mean @ uv)[moving]
        flipped = _signed_areas(uv, faces) * sign < 0
        if not flipped.any():
            break
        moving |= (adjacency @ moving.astype(np.float64)) > 0
    return uv


def _check_chart(uv: np.ndarray, faces: np.ndarray) -> None:
    area = _signed_areas(uv, faces)
    degenerate = np.abs(area) <= DEGENERATE_AREA_FRACTION * np.median(np.abs(area))
    # The majority orientation is the chart's; a fold shows as triangles wound the other way.
    sign = 1.0 if (area > 0).sum() >= (area < 0).sum() else -1.0
    flipped = ~degenerate & (area * sign < 0)
    if degenerate.any() or flipped.any():
        raise TemplateError(
            f"the UV chart has {int(flipped.sum())} flipped and {int(degenerate.sum())} "
            f"degenerate triangles out of {len(faces)}; the mesh cannot be flattened as it is"
        )


def _containing_triangle(corners: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (-1 if none) and barycentrics of a UV triangle (F, 3, 2) holding each query point.

    Triangles are binned by bounding box on a grid of about one triangle per cell, so each query
    is tested only against the few triangles whose boxes overlap its cell.
    """
    low, high = corners.min(axis=(0, 1)), corners.max(axis=(0, 1))
    # A flat (collinear) chart has no area; the second bound keeps its grid at most F cells long.
    cell = max(np.sqrt(np.prod(high - low) / len(corners)), (high - low).max() / len(corners))
    cell = max(float(cell), 1e-12)
    shape = np.maximum(np.ceil((high - low) / cell).astype(np.int64), 1)

    def cell_of(points: np.ndarray) -> np.ndarray:
        return np.clip(((points - low) / cell).astype(np.int64), 0, shape - 1)

    first, last = cell_of(corners.min(axis=1)), cell_of(corners.max(axis=1))
    span = last - first + 1
    tri = np.repeat(np.arange(len(corners)), span[:, 0] * span[:, 1])
    step = _offsets(span[:, 0] * span[:, 1])
    column, row = first[tri, 0] + step % span[tri, 0], first[tri, 1] + step // span[tri, 0]
    cells = column * shape[1] + row
    order = np.argsort(cells, kind="stable")
    cell_tris = tri[order]
    starts = np.searchsorted(cells[order], np.arange(shape[0] * shape[1] + 1))

    qcell = cell_of(query) @ np.array([shape[1], 1])
    counts = starts[qcell + 1] - starts[qcell]
    pair_query = np.repeat(np.arange(len(query)), counts)
    pair_tri = cell_tris[np.repeat(starts[qcell], counts) + _offsets(counts)]
    bary = _barycentric(query[pair_query], corners[pair_tri])
    # Points on a shared edge sit at -1e-17 in both neighbours; the most inside one wins.
    score = bary.min(axis=1)
    order = np.lexsort((-score, pair_query))
    _, best = np.unique(pair_query[order], return_index=True)
    best = order[best]
    hit = best[score[best] >= -CONTAINMENT_TOLERANCE]
    face_index = np.full(len(query), -1, dtype=np.int64)
    result = np.zeros((len(query), 3))
    face_index[pair_query[hit]] = pair_tri[hit]
    inside = np.clip(bary[hit], 0.0, None)
    result[pair_query[hit]] = inside / inside.sum(axis=1, keepdims=True)
    return face_index, result


def _nearest_boundary_point(
    uv: np.ndarray, faces: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Face index and barycentrics of the chart point nearest to each query point off the chart.

    That point lies on a boundary edge; edges are searched by midpoint, widening the search until
    no unseen edge can be nearer (its midpoint would have to lie within gap + half its length).
    """
    slots = np.array([[0, 1], [1, 2], [2, 0]])
    undirected = np.sort(faces[:, slots], axis=2).reshape(-1, 2)
    _, inverse, uses = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    rim = np.flatnonzero(uses[inverse.ravel()] == 1)
    if len(rim) == 0:
        raise TemplateError("query points lie off the chart, but the mesh has no boundary")
    rim_face, rim_slot = np.divmod(rim, 3)
    start = uv[faces[rim_face, slots[rim_slot, 0]]]
    edge = uv[faces[rim_face, slots[rim_slot, 1]]] - start
    reach = 0.5 * np.linalg.norm(edge, axis=1).max()
    tree = cKDTree(start + 0.5 * edge)
    face_index = np.zeros(len(query), dtype=np.int64)
    bary = np.zeros((len(query), 3))
    pending = np.arange(len(query))
    k = min(8, len(rim))
    while len(pending):
        dist, cand = tree.query(query[pending], k=k)
        cand, dist = cand.reshape(len(pending), k), dist.reshape(len(pending), k)
        along = ((query[pending, None] - start[cand]) * edge[cand]).sum(-1)
        t = np.clip(along / np.maximum((edge[cand] ** 2).sum(-1), 1e-300), 0.0, 1.0)
        gap = np.linalg.norm(start[cand] + t[..., None] * edge[cand] - query[pending, None], axis=2)
        best = np.argmin(gap, axis=1)
        rows = np.arange(len(pending))
        settled = (k == len(rim)) | (dist[:, -1] > gap[rows, best] + reach)
        chosen, rows = cand[rows, best][settled], rows[settled]
        done = pending[settled]
        face_index[done] = rim_face[chosen]
        bary[done, slots[rim_slot[chosen], 0]] = 1.0 - t[rows, best[settled]]
        bary[done, slots[rim_slot[chosen], 1]] = t[rows, best[settled]]
        pending = pending[~settled]
        k = min(2 * k, len(rim))
    return face_index, bary


def _offsets(counts: np.ndarray) -> np.ndarray:
    """0..n-1 for each group size n in ``counts``, concatenated."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _barycentric(points: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (N, 3) of ``points`` (N, 2) in triangles (N, 3, 2)."""
    a = corners[:, 0]
    e1, e2, d = corners[:, 1] - a, corners[:, 2] - a, points - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # A degenerate triangle holds no point: NaN coordinates fail every containment test.
    det = np.where(det == 0.0, np.nan, det)
    w1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / det
    w2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / det
    return np.stack([1.0 - w1 - w2, w1, w2], axis=1)
