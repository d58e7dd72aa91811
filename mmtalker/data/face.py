"""Procedural human-like face templates at any resolution, one topology shared by all speakers.

The mesh is built once in a *canonical* 2D chart (metres; x to the viewer's right, y up, the face
looking down +z): an equilateral triangle lattice clipped to the face outline, with an almond
opening for each eye and a thin mouth slit, whose rims are snapped onto smooth contours. Each
speaker's face is then a smooth warp of the canonical chart plus a height field built from that
speaker's :class:`FaceShape`, so every speaker has the same vertices, faces and region masks.
Displacement fields for articulation (:mod:`mmtalker.data.motion`) are defined on the same chart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from scipy import sparse

from mmtalker.data.sequence import REQUIRED_REGIONS, Topology
from mmtalker.errors import TemplateError

MIN_VERTICES, MAX_VERTICES = 500, 60_000

# Canonical layout (metres). A speaker's FaceShape moves and scales these features.
FACE_HALF_WIDTH, FACE_TOP, FACE_BOTTOM = 0.075, 0.105, -0.115
EYE_X, EYE_Y, EYE_HALF_WIDTH, EYE_UPPER, EYE_LOWER = 0.033, 0.025, 0.0135, 0.0058, 0.0042
MOUTH_Y, MOUTH_HALF_WIDTH, MOUTH_GAP = -0.052, 0.025, 0.0012
BROW_Y, NOSE_TIP_Y, CHIN_Y = 0.047, -0.018, -0.092


class FaceShape(BaseModel):
    """Per-speaker shape parameters, as multiplicative factors around an average face (1.0)."""

    width: float = Field(1.0, ge=0.8, le=1.2)
    height: float = Field(1.0, ge=0.8, le=1.2)
    eye_spacing: float = Field(1.0, ge=0.85, le=1.15)
    eye_size: float = Field(1.0, ge=0.8, le=1.2)
    nose_length: float = Field(1.0, ge=0.8, le=1.2)
    nose_height: float = Field(1.0, ge=0.7, le=1.3)
    nose_width: float = Field(1.0, ge=0.8, le=1.25)
    mouth_width: float = Field(1.0, ge=0.85, le=1.2)
    lip_fullness: float = Field(1.0, ge=0.7, le=1.4)
    brow_ridge: float = Field(1.0, ge=0.6, le=1.4)
    cheek_fullness: float = Field(1.0, ge=0.6, le=1.4)
    chin: float = Field(1.0, ge=0.7, le=1.3)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FaceShape:
        """A random plausible face: each factor drawn inside the middle of its allowed range."""
        values = {}
        for name, info in cls.model_fields.items():
            lo = next(m.ge for m in info.metadata if hasattr(m, "ge"))
            hi = next(m.le for m in info.metadata if hasattr(m, "le"))
            values[name] = float(1.0 + rng.uniform(-0.7, 0.7) * min(1.0 - lo, hi - 1.0))
        return cls(**values)


@dataclass(frozen=True)
class FaceChart:
    """The canonical chart of a procedural face: per-vertex canonical (x, y), faces and regions."""

    xy: np.ndarray
    faces: np.ndarray
    regions: dict[str, np.ndarray]

    @property
    def num_vertices(self) -> int:
        return len(self.xy)

    def topology(self) -> Topology:
        """The topology (faces and region masks) shared by every speaker on this chart."""
        return Topology(self.faces, self.num_vertices, self.regions)


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def outline_axes(theta: np.ndarray) -> np.ndarray:
    """Half-width and half-height of the face oval in direction ``theta`` (narrower at the chin)."""
    s = np.sin(theta)
    half_w = FACE_HALF_WIDTH * (1.0 - 0.3 * np.maximum(-s, 0.0) ** 2)
    return half_w, np.where(s >= 0, FACE_TOP, -FACE_BOTTOM)


@dataclass(frozen=True)
class _Opening:
    """An elliptic opening: `target` half-heights are the rim, `cut` ones what the lattice loses."""

    cx: float
    cy: float
    half_width: float
    upper: float
    lower: float
    cut_upper: float
    cut_lower: float
    #: The cut may reach past the rim's ends and stay tall up to them (an exponent above 2), so
    #: a thin slit is still cut through at its corners on coarse lattices.
    cut_half_width: float
    cut_power: float = 2.0
    slit: bool = False

    def _cut_frame(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dy = y - self.cy
        return (x - self.cx) / self.cut_half_width, np.where(
            dy >= 0, dy / self.cut_upper, dy / self.cut_lower
        )

    def inside_cut(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self._cut_frame(x, y)
        return np.abs(u) ** self.cut_power + v * v < 1.0

    def snap(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move the opening's rim points onto the target rim, keeping their order.

        Round openings (eyes) project radially. A thin slit would have its points bunched
        towards the middle that way, leaving the corners sewn shut, so for a slit each side is
        stretched until its outermost point lands on the corner, and every point then drops
        vertically onto its lip.
        """
        u, v = self._cut_frame(x, y)
        if self.slit:
            dx = x - self.cx
            reach = np.where(dx >= 0, dx.max(initial=0.0), -dx.min(initial=0.0))
            cos = np.clip(dx / np.maximum(reach, 1e-12), -1.0, 1.0)
            sin = np.where(v >= 0, 1.0, -1.0) * np.sqrt(1.0 - cos * cos)
        else:
            theta = np.arctan2(v, u)
            cos, sin = np.cos(theta), np.sin(theta)
        return (
            self.cx + self.half_width * cos,
            self.cy + np.where(sin >= 0, self.upper * sin, self.lower * sin),
        )


def _openings(spacing: float) -> list[_Opening]:
    # The cut must be at least about a third of a lattice row tall, or a thin slit removes no
    # triangle at coarse resolutions and the mouth would be sewn shut.
    cut = max(MOUTH_GAP, 0.4 * spacing)
    eyes = [
        _Opening(
            cx=side * EYE_X, cy=EYE_Y, half_width=EYE_HALF_WIDTH, upper=EYE_UPPER,
            lower=EYE_LOWER, cut_upper=EYE_UPPER, cut_lower=EYE_LOWER,
            cut_half_width=EYE_HALF_WIDTH,
        )
        for side in (-1.0, 1.0)
    ]  # fmt: skip
    mouth = _Opening(
        cx=0.0, cy=MOUTH_Y, half_width=MOUTH_HALF_WIDTH, upper=MOUTH_GAP, lower=MOUTH_GAP,
        cut_upper=cut, cut_lower=cut, cut_half_width=MOUTH_HALF_WIDTH + 0.5 * spacing,
        cut_power=4.0, slit=True,
    )  # fmt: skip
    return [*eyes, mouth]


def _lattice(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Equilateral triangle lattice covering the face's bounding box."""
    row_h = spacing * np.sqrt(3.0) / 2.0
    ys = np.arange(FACE_BOTTOM - row_h, FACE_TOP + 2 * row_h, row_h)
    xs = np.arange(-FACE_HALF_WIDTH - spacing, FACE_HALF_WIDTH + 2 * spacing, spacing)
    nx, ny = len(xs), len(ys)
    shift = (np.arange(ny) % 2)[:, None] * (spacing / 2.0)
    gx = xs[None, :] + shift
    gy = np.broadcast_to(ys[:, None], (ny, nx))
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    idx = np.arange(nx * ny).reshape(ny, nx)
    tris = []
    for j in range(ny - 1):
        a, b = idx[j, :-1], idx[j, 1:]
        c, d = idx[j + 1, :-1], idx[j + 1, 1:]
        if j % 2 == 0:  # the upper row is shifted right
            tris += [np.stack([a, b, c], 1), np.stack([b, d, c], 1)]
        else:  # the lower row is shifted right
            tris += [np.stack([a, d, c], 1), np.stack([a, b, d], 1)]
    return xy, np.concatenate(tris)


def _boundary_vertices(faces: np.ndarray) -> np.ndarray:
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    return np.unique(unique[counts == 1])


def _build(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    xy, faces = _lattice(spacing)
    centroid = xy[faces].mean(axis=1)
    theta = np.arctan2(centroid[:, 1], centroid[:, 0])
    half_w, half_h = outline_axes(theta)
    keep = (centroid[:, 0] / half_w) ** 2 + (centroid[:, 1] / half_h) ** 2 < 1.0
    openings = _openings(spacing)
    for opening in openings:
        keep &= ~opening.inside_cut(centroid[:, 0], centroid[:, 1])
    faces = faces[keep]
    # A triangle with all three corners on a rim would be flattened or folded by the snapping.
    while True:
        ear = np.isin(faces, _boundary_vertices(faces)).all(axis=1)
        if not ear.any():
            break
        faces = faces[~ear]
    used = np.unique(faces)
    remap = np.full(len(xy), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    xy, faces = xy[used].copy(), remap[faces]
    rim = _boundary_vertices(faces)
    x, y = xy[rim, 0], xy[rim, 1]
    nearest = np.argmin(
        [np.hypot((x - o.cx) / o.cut_half_width, (y - o.cy) / o.cut_upper) for o in openings],
        axis=0,
    )
    on_opening = [
        (nearest == k) & (np.hypot((x - o.cx) / o.half_width, (y - o.cy) / 0.03) < 1.6)
        for k, o in enumerate(openings)
    ]
    for opening, close in zip(openings, on_opening, strict=True):
        xy[rim[close], 0], xy[rim[close], 1] = opening.snap(x[close], y[close])
    on_outer = ~np.any(on_opening, axis=0)
    t = np.arctan2(y[on_outer], x[on_outer])
    half_w, half_h = outline_axes(t)
    scale = 1.0 / np.sqrt((x[on_outer] / half_w) ** 2 + (y[on_outer] / half_h) ** 2)
    xy[rim[on_outer]] *= scale[:, None]
    # The slit (the last opening) is too thin and concave to even out or relax around: its
    # neighbours would fold into it, and its corners would slide between the lips.
    slit = set(rim[on_opening[-1]].tolist())
    for loop in _boundary_loops(faces):
        if slit.isdisjoint(loop.tolist()):
            xy[loop] = _resample_closed(xy[loop])
    return _relax(xy, faces, rim, rim[~on_opening[-1]]), faces.astype(np.int32)


def _boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Each boundary loop as vertex indices in walking order."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    _, inverse, counts = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    following = dict(directed[counts[inverse.ravel()] == 1].tolist())
    loops = []
    while following:
        start, current = following.popitem()
        loop = [start]
        while current != start:
            loop.append(current)
            current = following.pop(current)
        loops.append(np.array(loop))
    return loops


def _resample_closed(points: np.ndarray) -> np.ndarray:
    """Points moved to equal arc-length steps along their own closed polyline.

    Snapping can put two rim vertices almost on top of each other, which folds the triangle
    between them; even spacing along the rim removes that without changing the rim's shape.
    """
    closed = np.vstack([points, points[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    targets = np.linspace(0.0, arc[-1], len(points), endpoint=False)
    return np.stack([np.interp(targets, arc, closed[:, k]) for k in range(2)], axis=1)


def _relax(
    xy: np.ndarray, faces: np.ndarray, fixed: np.ndarray, seeds: np.ndarray, rings: int = 4
) -> np.ndarray:
    """Laplacian smoothing of the vertices near the ``seeds`` rims, all rims held fixed.

    Snapping moves rim vertices by up to half a lattice step, which can fold the triangles next
    to them; relaxing a few rings inwards untangles them while the interior stays regular.
    """
    n = len(xy)
    rows = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = sparse.coo_matrix((np.ones(len(rows)), (rows[:, 0], rows[:, 1])), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float64).tocsr()
    near = np.zeros(n, dtype=bool)
    near[seeds] = True
    for _ in range(rings):
        near |= (adj @ near.astype(np.float64)) > 0
    movable = near.copy()
    movable[fixed] = False
    degree = np.asarray(adj.sum(axis=1)).ravel()
    xy = xy.copy()
    for _ in range(40):
        mean = (adj @ xy) / degree[:, None]
        xy[movable] = mean[movable]
    return xy


def _regions(xy: np.ndarray) -> dict[str, np.ndarray]:
    x, y = xy[:, 0], xy[:, 1]
    lips = ((x / (MOUTH_HALF_WIDTH * 1.15)) ** 2 + ((y - MOUTH_Y) / 0.013) ** 2) < 1.0
    eyes = np.zeros(len(xy), dtype=bool)
    for sx in (-1.0, 1.0):
        eyes |= ((x - sx * EYE_X) / (EYE_HALF_WIDTH * 1.45)) ** 2 + ((y - EYE_Y) / 0.011) ** 2 < 1.0
    # As in VOCASET's FDD mask: forehead, brows and eyes, everything above the nose's root.
    upper = y > EYE_Y - 0.012
    face = np.ones(len(xy), dtype=bool)
    return {
        name: np.flatnonzero(mask).astype(np.int32)
        for name, mask in zip(REQUIRED_REGIONS, (lips, eyes, upper, face), strict=True)
    }


def make_chart(num_vertices: int = 5000) -> FaceChart:
    """The canonical face chart with about ``num_vertices`` vertices (within a few percent)."""
    if not MIN_VERTICES <= num_vertices <= MAX_VERTICES:
        raise TemplateError(
            f"num_vertices must be between {MIN_VERTICES} and {MAX_VERTICES}, got {num_vertices}"
        )
    area = np.pi * FACE_HALF_WIDTH * 0.9 * (FACE_TOP - FACE_BOTTOM) / 2.0
    spacing = float(np.sqrt(area / num_vertices * 2.0 / np.sqrt(3.0)))
    for _ in range(3):  # each pass corrects the estimate by the measured vertex density
        xy, faces = _build(spacing)
        spacing *= float(np.sqrt(len(xy) / num_vertices))
    return FaceChart(xy=xy, faces=faces, regions=_regions(xy))


def warp_xy(xy: np.ndarray, shape: FaceShape) -> np.ndarray:
    """Map canonical chart points (N, 2) to a speaker's face plane (N, 2)."""
    x, y = xy[:, 0], xy[:, 1]
    # Feature-local scalings blend smoothly into a global one, so faces never fold.
    eye_w = _gauss(np.abs(x), y, EYE_X, EYE_Y, 0.016, 0.012)
    mouth_w = _gauss(x, y, 0.0, MOUTH_Y, 0.03, 0.016)
    nose_w = _gauss(x, y, 0.0, (EYE_Y + NOSE_TIP_Y) / 2, 0.012, 0.03)
    sx = shape.width * (
        1.0
        + eye_w * (shape.eye_size - 1.0) * (np.abs(x) - EYE_X) / np.maximum(np.abs(x), 1e-6)
        + mouth_w * (shape.mouth_width - 1.0)
        + nose_w * (shape.nose_width - 1.0)
    )
    px = x * sx + np.sign(x) * eye_w * EYE_X * (shape.eye_spacing - 1.0) * shape.width
    py = y * shape.height + eye_w * (y - EYE_Y) * (shape.eye_size - 1.0)
    py += nose_w * (y - EYE_Y) * (shape.nose_length - 1.0) * 0.5
    return np.stack([px, py], axis=1)


def warp(chart: FaceChart, shape: FaceShape) -> np.ndarray:
    """Vertex positions (V, 3) of a speaker's neutral face on the canonical chart."""
    xy = warp_xy(chart.xy, shape)
    return np.concatenate([xy, height(chart.xy, shape)[:, None]], axis=1).astype(np.float32)


def height(xy: np.ndarray, shape: FaceShape) -> np.ndarray:
    """Depth (z) of the face surface over the canonical chart."""
    x, y = xy[:, 0], xy[:, 1]
    z = -(x**2) / (2 * 0.085) - (y**2) / (2 * 0.3)
    # Nose: a ridge from the root between the eyes to the tip, widening downwards, then nostrils.
    ridge = smoothstep((EYE_Y - y) / (EYE_Y - NOSE_TIP_Y)) * (y > NOSE_TIP_Y - 0.012)
    ridge *= np.exp(-0.5 * ((y - NOSE_TIP_Y) / 0.007) ** 2 * (y < NOSE_TIP_Y))
    width = 0.004 + 0.008 * smoothstep((EYE_Y - y) / 0.05)
    z += 0.024 * shape.nose_height * ridge * np.exp(-0.5 * (x / (width * shape.nose_width)) ** 2)
    z += 0.006 * _gauss(np.abs(x), y, 0.011, NOSE_TIP_Y - 0.004, 0.006, 0.005)
    # Eye sockets, with the lids slightly proud of them around the openings.
    z -= 0.012 * _gauss(np.abs(x), y, EYE_X, EYE_Y, 0.017, 0.012)
    z += 0.003 * _gauss(np.abs(x), y, EYE_X, EYE_Y, 0.014, 0.008)
    # Brow ridge, cheeks, lips and chin.
    z += (
        0.006 * shape.brow_ridge * _gauss(np.abs(x), y, EYE_X - 0.004, BROW_Y - 0.006, 0.022, 0.006)
    )
    z += 0.008 * shape.cheek_fullness * _gauss(np.abs(x), y, 0.042, -0.028, 0.018, 0.02)
    lip_y = np.where(y >= MOUTH_Y, MOUTH_Y + 0.006, MOUTH_Y - 0.007)
    z += 0.007 * shape.lip_fullness * _gauss(x, y, 0.0, lip_y, MOUTH_HALF_WIDTH * 0.85, 0.005)
    z += 0.006 * _gauss(x, y, 0.0, MOUTH_Y, MOUTH_HALF_WIDTH * 1.4, 0.02)
    z += 0.008 * shape.chin * _gauss(x, y, 0.0, CHIN_Y, 0.02, 0.013)
    return z


@dataclass(frozen=True)
class FaceTemplate:
    """A speaker's neutral mesh on a topology."""

    vertices: np.ndarray
    topology: Topology


def make_template(num_vertices: int = 5000, shape: FaceShape | None = None) -> FaceTemplate:
    """A procedural neutral face (deterministic for a given resolution and shape)."""
    chart = make_chart(num_vertices)
    return FaceTemplate(warp(chart, shape or FaceShape()), chart.topology())


def load_template(mesh_path: str | Path, masks: dict[str, list[int]]) -> FaceTemplate:
    """A user's own template (OBJ/PLY via trimesh) with their own region masks.

    ``masks`` maps each of ``lips``, ``eyes``, ``upper_face`` (and optionally ``face``, which
    defaults to every vertex) to vertex indices. Vertex order is kept exactly as in the file.
    """
    import trimesh

    path = Path(mesh_path)
    if not path.is_file():
        raise TemplateError(f"template mesh not found: {path}")
    try:
        mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    except Exception as exc:  # trimesh raises many unrelated types for unreadable files
        raise TemplateError(f"cannot read template mesh {path}: {exc}") from exc
    if len(mesh.vertices) == 0 or len(mesh.faces) == 0:
        raise TemplateError(f"template mesh {path} has no triangles")
    regions = {"face": np.arange(len(mesh.vertices)), **masks}
    topology = Topology(np.asarray(mesh.faces), len(mesh.vertices), regions)
    return FaceTemplate(np.asarray(mesh.vertices, dtype=np.float32), topology)
