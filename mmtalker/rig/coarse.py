"""A coarse version of a rig's face area whose vertices lie on the fine surface, and the maps
between the two resolutions.

**Where a point is.** Surfaces here are compared in a *motion space*: a vertex is its neutral
position (3 numbers, metres) followed by how the rig's expression shapes move it (its
displacements under all S shapes at weight 1, projected on their :data:`MOTION_DIMS` principal
axes, times :data:`MOTION_WEIGHT`). Closed lips have the upper and lower lip a fraction of a
millimetre apart but moving apart under jawOpen, so nearest points in this space never land on
the wrong lip, and a point off the surface (the mouth socket, the eye sockets) lands where the
surface moves most like it (the socket behind the lower lip moves with the lower lip).

**Decimation.** The face area is simplified by quadric error edge collapse (libigl ``qslim``) in
that space, which spends vertices where geometry *or* motion varies (lips, eyelids); each coarse
vertex is then placed on the fine surface (its nearest point in motion space) and everything the
rig has there (neutral, expression shapes, identity modes) is the barycentric interpolation of the
fine vertices', so the coarse rig composes exactly like the fine rig at those points.

**A valid chart, an exact count.** The ICT mouth corners hold a crumpled patch (0.3 mm triangles
whose angles sum to 400° at a vertex) that the LSCM chart of :func:`mmtalker.geometry.uv.
compute_uv` folds, on the fine face too. Edge collapses (vertex u merged into a neighbour: the
mesh stays manifold, no triangle turns over, a rim vertex only moves along its rim) remove the
shortest edge of each folded triangle until the chart has none; then the shortest edges are
collapsed, or the longest split (the new vertex again snapped onto the fine surface), until the
vertex count is exactly the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import igl
import numpy as np
from scipy.spatial import cKDTree

from mmtalker.data.sequence import Topology
from mmtalker.errors import RigError
from mmtalker.geometry.uv import DEGENERATE_AREA_FRACTION, barycentric_interpolate
from mmtalker.rig.regions import boundary_loops, face_topology
from mmtalker.rig.rig import FACE_PART, Part, Rig

#: Principal axes of expression motion kept in the motion space, and their weight against
#: position: with 12 axes 97 % of the ICT shapes' motion energy is kept.
MOTION_DIMS, MOTION_WEIGHT = 12, 3.0
MIN_VERTICES = 100
# Candidate triangles per point (nearest centroids in motion space) and points per batch.
_CANDIDATES, _BATCH = 16, 4096


@dataclass(frozen=True, eq=False)
class SurfaceMap:
    """Points on a triangle mesh: a triangle of ``faces`` and barycentric weights per point."""

    faces: np.ndarray
    triangles: np.ndarray
    barycentric: np.ndarray

    def __len__(self) -> int:
        return len(self.triangles)

    def interpolate(self, values: np.ndarray) -> np.ndarray:
        """Per-vertex ``values`` (..., V, C) of the mesh read at the points: (..., P, C)."""
        return barycentric_interpolate(values, self.faces, self.triangles, self.barycentric)


@dataclass(frozen=True, eq=False)
class CoarseFace:
    """The face area of ``fine`` at a lower resolution, as a rig, and where its points lie.

    ``rig`` holds the coarse mesh (one part, ``face``) with neutral, shapes and identity modes
    interpolated from ``fine`` at ``on_fine``: coarse vertex i lies at ``on_fine`` point i of
    the fine rig's mesh.
    """

    rig: Rig
    fine: Rig
    on_fine: SurfaceMap

    def topology(self) -> Topology:
        """Faces and regions of the coarse face (see :mod:`mmtalker.rig.regions`), without UV."""
        return face_topology(self.rig)

    def locate(self, vertices: np.ndarray) -> SurfaceMap:
        """Where the fine rig's ``vertices`` (indices) lie on the coarse face, in motion space.

        Face-area vertices land on the surface point they are; others (mouth socket, eye
        sockets) on the surface point that moves most like them.
        """
        index = np.asarray(vertices, dtype=np.int64)
        if index.ndim != 1 or (
            len(index) and (index.min() < 0 or index.max() >= self.fine.num_vertices)
        ):
            raise RigError(
                "vertices must be 1-D indices into the fine rig's "
                f"{self.fine.num_vertices} vertices"
            )
        space = _MotionSpace(self.fine.subset(FACE_PART))
        triangles, bary = _locate(
            space.embed(self.fine, index), space.embed(self.rig), self.rig.faces
        )
        return SurfaceMap(self.rig.faces, triangles, bary)


def coarse_face(rig: Rig, num_vertices: int) -> CoarseFace:
    """The face area (part ``face``) of ``rig`` decimated to exactly ``num_vertices`` vertices.

    Deterministic; a few seconds on one core (2.5 s for the ICT face at 1,000). Build it once
    from the generic rig: a speaker's coarse rig is then ``.rig.with_identity(weights)``, on the
    same coarse topology (the identity modes are carried like everything else).
    """
    if FACE_PART not in rig.parts:
        raise RigError(f"the rig has no {FACE_PART!r} part to decimate; it has {list(rig.parts)}")
    face = rig.subset(FACE_PART)
    if not MIN_VERTICES <= num_vertices < face.num_vertices:
        raise RigError(
            f"num_vertices must be in {MIN_VERTICES}..{face.num_vertices - 1} for this face, "
            f"got {num_vertices}"
        )
    space = _MotionSpace(face)
    points = space.embed(face)
    coarse, faces = _simplify(points, face.faces, num_vertices)
    on_fine, faces = _place(points, face.faces, coarse, faces, num_vertices)
    return CoarseFace(_interpolated_rig(face, on_fine, faces), rig, on_fine)


def full_face(rig: Rig) -> CoarseFace:
    """The face area of ``rig`` at its own resolution, as a :class:`CoarseFace` of itself."""
    if FACE_PART not in rig.parts:
        raise RigError(f"the rig has no {FACE_PART!r} part; it has {list(rig.parts)}")
    face = rig.subset(FACE_PART)
    # Each vertex is the corner of (the last listed) triangle using it: barycentric one-hot.
    triangles = np.empty(face.num_vertices, dtype=np.int64)
    corner = np.empty(face.num_vertices, dtype=np.int64)
    count = np.arange(len(face.faces))
    for k in range(3):
        triangles[face.faces[:, k]] = count
        corner[face.faces[:, k]] = k
    bary = np.eye(3)[corner]
    return CoarseFace(face, rig, SurfaceMap(face.faces, triangles, bary))


class _MotionSpace:
    """Position plus weighted principal coordinates of expression motion, per vertex."""

    def __init__(self, face: Rig) -> None:
        motion = face.shapes.transpose(1, 0, 2).reshape(face.num_vertices, -1).astype(np.float64)
        self.mean = motion.mean(axis=0)
        _, _, axes = np.linalg.svd(motion - self.mean, full_matrices=False)
        self.axes = axes[:MOTION_DIMS].T

    def embed(self, rig: Rig, vertices: np.ndarray | None = None) -> np.ndarray:
        """Motion-space coordinates (P, 3 + MOTION_DIMS) of the rig's (chosen) vertices."""
        index = slice(None) if vertices is None else vertices
        shapes = rig.shapes[:, index].transpose(1, 0, 2)
        motion = shapes.reshape(len(shapes), -1).astype(np.float64) - self.mean
        return np.hstack(
            [rig.neutral[index].astype(np.float64), MOTION_WEIGHT * motion @ self.axes]
        )


def _simplify(points: np.ndarray, faces: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """qslim to at least ``target`` vertices: (positions in motion space, faces)."""
    # A mesh with boundary has two faces per vertex less its rim, so 2·target faces keep more
    # than target vertices; _place collapses the rest.
    out_vertices, out_faces, _, _ = igl.qslim(points, faces.astype(np.int32), 2 * target)
    return _compact(out_vertices, out_faces)


def _place(
    points: np.ndarray, fine_faces: np.ndarray, coarse: np.ndarray, faces: np.ndarray, target: int
) -> tuple[SurfaceMap, np.ndarray]:
    """Snap the coarse vertices onto the fine surface, repair LSCM folds, reach ``target``.

    Returns where each coarse vertex lies on the fine mesh and the coarse faces. Folds are
    repaired by collapsing the shortest edge of each folded triangle; the count is then brought
    to ``target`` by collapsing the shortest edges or splitting the longest.
    """
    triangles, bary = _locate(coarse, points, fine_faces)
    for _ in range(len(coarse)):
        used, faces = _compact(np.arange(len(triangles)), faces)
        triangles, bary = triangles[used], bary[used]
        snapped = np.einsum("pj,pjd->pd", bary, points[fine_faces[triangles]])
        folds = _lscm_folds(snapped[:, :3], faces)
        if len(folds):
            edges = np.concatenate([faces[folds][:, [i, j]] for i, j in ((0, 1), (1, 2), (2, 0))])
            faces = _collapse_shortest(snapped, faces, edges, len(folds), rim_too=True)
        elif len(used) > target:
            count = (len(used) - target + 1) // 2
            faces = _collapse_shortest(snapped, faces, _edges(faces), count, rim_too=False)
        elif len(used) < target:
            faces, ends = _split_longest(snapped, faces)
            # The new vertex lies on the fine surface: the nearest point to the edge's middle.
            middle = snapped[ends].mean(axis=0, keepdims=True)
            new_triangle, new_bary = _locate(middle, points, fine_faces)
            triangles = np.concatenate([triangles, new_triangle])
            bary = np.concatenate([bary, new_bary])
        else:
            return SurfaceMap(fine_faces, triangles, bary), faces
    raise RigError(
        f"the coarse face cannot be flattened to a UV chart at {target} vertices; "
        "ask for another vertex count"
    )


def _split_longest(points: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the longest interior edge a-b at a new vertex m (index ``len(points)``).

    Triangles (a, b, c) and (b, a, d) become (a, m, c), (m, b, c), (b, m, d) and (m, a, d).
    Returns the faces and (a, b).
    """
    edges = _edges(faces)
    length = np.linalg.norm(points[edges[:, 0]] - points[edges[:, 1]], axis=1)
    for a, b in edges[np.argsort(-length, kind="stable")].tolist():
        pair = np.flatnonzero((faces == a).any(axis=1) & (faces == b).any(axis=1))
        if len(pair) == 2:
            break
    m = len(points)
    rows = []
    for t in pair:
        corners = faces[t].tolist()
        i = corners.index(a)
        first, second = (a, b) if corners[(i + 1) % 3] == b else (b, a)
        other = next(x for x in corners if x not in (a, b))
        rows += [[first, m, other], [m, second, other]]
    return np.concatenate([np.delete(faces, pair, axis=0), np.array(rows)]), np.array([a, b])


def _interpolated_rig(face: Rig, on_fine: SurfaceMap, faces: np.ndarray) -> Rig:
    """The rig whose vertices are the ``on_fine`` points of ``face`` (one part, ``face``)."""
    return Rig(
        on_fine.interpolate(face.neutral),
        faces,
        face.shape_names,
        on_fine.interpolate(face.shapes),
        on_fine.interpolate(face.identity_modes),
        {FACE_PART: Part(range(len(on_fine)), range(len(faces)))},
    )


def _compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The used vertices in index order and the faces renumbered to them."""
    used = np.unique(faces)
    renumber = np.full(len(vertices), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return vertices[used], renumber[faces]


def _edges(faces: np.ndarray) -> np.ndarray:
    """Every undirected edge once, as (E, 2)."""
    return np.unique(np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)


def _collapse_shortest(
    points: np.ndarray, faces: np.ndarray, edges: np.ndarray, count: int, rim_too: bool
) -> np.ndarray:
    """``faces`` after collapsing up to ``count`` of the shortest (in motion space) ``edges``.

    A collapse (u, v) merges vertex u into its neighbour v. It may not change the topology (the
    link condition) nor turn a triangle over or make one degenerate; a rim vertex may only
    collapse along its rim (when ``rim_too``), on a rim of over 6 vertices. Collapses in one
    call touch disjoint neighbourhoods, each checked on a current mesh.
    """
    loop_size = np.zeros(len(points), dtype=np.int64)
    for loop in boundary_loops(faces, len(points)):
        loop_size[loop] = len(loop)
    directed = np.concatenate([edges, edges[:, ::-1]])
    u_size, v_size = loop_size[directed[:, 0]], loop_size[directed[:, 1]]
    directed = directed[(u_size == 0) | (rim_too & (u_size > 6) & (v_size == u_size))]
    length = np.linalg.norm(points[directed[:, 0]] - points[directed[:, 1]], axis=1)
    min_area = 1e-3 * np.median(np.linalg.norm(_normals(points[:, :3], faces), axis=1))
    touched = np.zeros(len(points), dtype=bool)
    done = 0
    for u, v in directed[np.argsort(length, kind="stable")].tolist():
        if touched[u] or touched[v]:
            continue
        collapsed = _try_collapse(points[:, :3], faces, u, v, loop_size[u] > 0, min_area)
        if collapsed is None:
            continue
        touched[faces[(faces == u).any(axis=1) | (faces == v).any(axis=1)].ravel()] = True
        faces, done = collapsed, done + 1
        if done == count:
            break
    if not done:
        raise RigError("no edge of the coarse face can collapse; ask for another vertex count")
    return faces


def _try_collapse(
    positions: np.ndarray, faces: np.ndarray, u: int, v: int, on_rim: bool, min_area: float
) -> np.ndarray | None:
    """``faces`` with u merged into v, or None if that breaks the mesh (see _collapse_shortest)."""
    around_u = (faces == u).any(axis=1)
    shared = around_u & (faces == v).any(axis=1)
    if on_rim and shared.sum() != 1:
        return None
    opposite = set(faces[shared].ravel().tolist()) - {u, v}
    neighbours_u = set(faces[around_u].ravel().tolist())
    neighbours_v = set(faces[(faces == v).any(axis=1)].ravel().tolist())
    if (neighbours_u & neighbours_v) - {u, v} != opposite:
        return None
    moved = faces[around_u & ~shared]
    before = _normals(positions, moved)
    after = _normals(positions, np.where(moved == u, v, moved))
    if ((before * after).sum(axis=1) <= 0).any() or (
        np.linalg.norm(after, axis=1) < min_area
    ).any():
        return None
    return np.where(faces[~shared] == u, v, faces[~shared])


def _normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted normals (twice the area long) of the triangles, (F, 3)."""
    a, b, c = (positions[faces[:, k]] for k in range(3))
    return np.cross(b - a, c - a)


def _lscm_folds(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Triangles that the LSCM chart of mmtalker.geometry.uv.compute_uv turns over or flattens.

    The same solve as compute_uv (pinned at the two farthest points of the outer rim), so the
    triangles repaired here are the ones it would reject.
    """
    used, f = _compact(np.arange(len(positions)), faces)
    v = np.ascontiguousarray(positions[used], dtype=np.float64)
    f = np.ascontiguousarray(f, dtype=np.int64)
    outer = igl.boundary_loop(f)
    gaps = np.linalg.norm(v[outer][:, None] - v[outer][None], axis=2)
    i, j = np.unravel_index(np.argmax(gaps), gaps.shape)
    uv, _ = igl.lscm(v, f, outer[[i, j]], np.array([[0.0, 0.0], [gaps[i, j], 0.0]]))
    a, b, c = (uv[f[:, k]] for k in range(3))
    area = (b - a)[:, 0] * (c - a)[:, 1] - (c - a)[:, 0] * (b - a)[:, 1]
    sign = 1.0 if (area > 0).sum() >= (area < 0).sum() else -1.0
    flat = np.abs(area) <= DEGENERATE_AREA_FRACTION * np.median(np.abs(area))
    return np.flatnonzero(flat | (area * sign < 0))


def _locate(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest point of the mesh to each point, all in motion space: (triangle, barycentric)."""
    corners = vertices[faces]
    tree = cKDTree(corners.mean(axis=1))
    k = min(_CANDIDATES, len(faces))
    triangles = np.empty(len(points), dtype=np.int64)
    bary = np.empty((len(points), 3))
    for start in range(0, len(points), _BATCH):
        p = points[start : start + _BATCH]
        _, cand = tree.query(p, k=k)
        cand = cand.reshape(len(p), k)
        weights = _closest_barycentric(p[:, None], corners[cand])
        nearest = np.einsum("pkj,pkjd->pkd", weights, corners[cand])
        best = np.argmin(np.sum((nearest - p[:, None]) ** 2, axis=-1), axis=1)
        rows = np.arange(len(p))
        triangles[start : start + len(p)] = cand[rows, best]
        bary[start : start + len(p)] = weights[rows, best]
    return triangles, bary


def _closest_barycentric(p: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Barycentrics (..., 3) of the point of each triangle (..., 3, D) nearest to p (..., D).

    In any dimension: the projection onto the triangle's plane if it falls inside, else the
    nearest point of its three edges.
    """
    a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]
    e1, e2, d = b - a, c - a, p - a
    g11, g12, g22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)
    r1, r2 = (d * e1).sum(-1), (d * e2).sum(-1)
    det = np.maximum(g11 * g22 - g12 * g12, 1e-300)
    s = (g22 * r1 - g12 * r2) / det
    t = (g11 * r2 - g12 * r1) / det
    inside = np.stack([1.0 - s - t, s, t], axis=-1)
    best, best_dist = inside, np.full(s.shape, np.inf)
    best_dist = np.where((inside >= 0).all(-1), 0.0, best_dist)
    for i, j in ((0, 1), (1, 2), (2, 0)):
        start, edge = corners[..., i, :], corners[..., j, :] - corners[..., i, :]
        u = np.clip(((p - start) * edge).sum(-1) / np.maximum((edge * edge).sum(-1), 1e-300), 0, 1)
        dist = np.sum((start + u[..., None] * edge - p) ** 2, axis=-1)
        on_edge = np.zeros(inside.shape)
        on_edge[..., i], on_edge[..., j] = 1.0 - u, u
        closer = dist < best_dist
        best = np.where(closer[..., None], on_edge, best)
        best_dist = np.where(closer, dist, best_dist)
    return best
