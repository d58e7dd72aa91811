"""Regions of a face rig's mesh, from its geometry and its ARKit-named expression shapes.

The rules only read positions and the shapes' motion, so they give matching regions on the fine
ICT face and on any coarse version of it (whose shapes are the fine ones interpolated):

- ``face``: every vertex of the mesh.
- ``lips``: vertices within :data:`LIPS_REACH` (12 mm) of the mouth opening's rim that the lip
  shapes (mouthFunnel, mouthPucker, mouthRollLower, mouthRollUpper) move by at least
  :data:`LIPS_MOTION` (30 %) of their largest motion. The mouth opening is the hole whose rim
  jawOpen moves most.
- ``eyes``: the eyelids: vertices eyeBlink_L or eyeBlink_R moves by at least :data:`EYES_MOTION`
  (10 %) of its largest motion.
- ``upper_face``: vertices above the mouth opening's rim that the brow, eye, cheekSquint and
  noseSneer shapes move more than the jaw, mouth and cheekPuff shapes, and by at least
  :data:`UPPER_MOTION` (5 %) of their largest motion: forehead, brows, eyes, nose bridge, temples.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from mmtalker.data.sequence import Topology
from mmtalker.errors import RigError
from mmtalker.rig.rig import Rig

LIPS_REACH, LIPS_MOTION, EYES_MOTION, UPPER_MOTION = 0.012, 0.3, 0.1, 0.05
LIP_SHAPES = ("mouthFunnel", "mouthPucker", "mouthRollLower", "mouthRollUpper")
EYE_SHAPES = ("eyeBlink_L", "eyeBlink_R")
_UPPER_PREFIXES = ("brow", "eye", "cheekSquint", "noseSneer")
_LOWER_PREFIXES = ("jaw", "mouth", "cheekPuff")


def face_regions(rig: Rig) -> dict[str, np.ndarray]:
    """The ``lips``, ``eyes``, ``upper_face`` and ``face`` vertex indices of a face-area rig."""
    v = rig.neutral.astype(np.float64)
    rim = mouth_rim(rig)
    lips_motion = _motion(rig, LIP_SHAPES)
    near_mouth = _distance_to_rim(v, rim, rig.faces) <= LIPS_REACH
    blink = np.maximum(_motion(rig, EYE_SHAPES[:1]), _motion(rig, EYE_SHAPES[1:]))
    upper = _motion(rig, [n for n in rig.shape_names if n.startswith(_UPPER_PREFIXES)])
    lower = _motion(rig, [n for n in rig.shape_names if n.startswith(_LOWER_PREFIXES)])
    regions = {
        "lips": near_mouth & (lips_motion >= LIPS_MOTION * lips_motion.max()),
        "eyes": blink >= EYES_MOTION * blink.max(),
        "upper_face": (upper > lower)
        & (upper >= UPPER_MOTION * upper.max())
        & (v[:, 1] > v[rim, 1].max()),
        "face": np.ones(len(v), dtype=bool),
    }
    empty = [name for name, mask in regions.items() if not mask.any()]
    if empty:
        raise RigError(f"regions {empty} are empty: is this rig a face area with ARKit shapes?")
    return {name: np.flatnonzero(mask).astype(np.int32) for name, mask in regions.items()}


def face_topology(rig: Rig) -> Topology:
    """The :class:`Topology` (faces and :func:`face_regions`) of a face-area rig, without UV."""
    return Topology(rig.faces, rig.num_vertices, face_regions(rig))


def boundary_loops(faces: np.ndarray, num_vertices: int) -> list[np.ndarray]:
    """Vertex indices of each boundary loop (hole or outer rim) of a triangle mesh, sorted."""
    rim = _rim_edges(faces)
    graph = sparse.coo_matrix(
        (np.ones(len(rim)), (rim[:, 0], rim[:, 1])), shape=(num_vertices, num_vertices)
    )
    _, label = connected_components(graph, directed=False)
    on_rim = np.unique(rim)
    return [on_rim[label[on_rim] == k] for k in np.unique(label[on_rim])]


def mouth_rim(rig: Rig) -> np.ndarray:
    """Vertices of the boundary loop that jawOpen moves most: the mouth opening's rim."""
    loops = boundary_loops(rig.faces, rig.num_vertices)
    if not loops:
        raise RigError("the rig's mesh is closed; a face area has a mouth opening")
    jaw = _motion(rig, ["jawOpen"])
    return max(loops, key=lambda loop: float(jaw[loop].mean()))


def _rim_edges(faces: np.ndarray) -> np.ndarray:
    """The (E, 2) edges used by one triangle only, each as (smaller, larger) vertex index."""
    edges = np.sort(np.asarray(faces)[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    unique, uses = np.unique(edges, axis=0, return_counts=True)
    return unique[uses == 1]


def _motion(rig: Rig, names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Root of the summed squared displacement of the named shapes, per vertex."""
    index = [rig.shape_index(n) for n in names]
    return np.sqrt(np.sum(rig.shapes[index].astype(np.float64) ** 2, axis=(0, 2)))


def _distance_to_rim(points: np.ndarray, rim: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Distance of each point to the nearest boundary edge between two vertices of ``rim``."""
    edges = _rim_edges(faces)
    edges = edges[np.isin(edges, rim).all(axis=1)]
    start, edge = points[edges[:, 0]], points[edges[:, 1]] - points[edges[:, 0]]
    t = np.einsum("pkc,kc->pk", points[:, None] - start, edge) / np.maximum(
        np.einsum("kc,kc->k", edge, edge), 1e-300
    )
    nearest = start + np.clip(t, 0.0, 1.0)[..., None] * edge
    return np.linalg.norm(points[:, None] - nearest, axis=2).min(axis=1)
