"""The whole ICT head from a model trained on (a coarse version of) its face area.

A corpus on the ICT face stores its topology with a :class:`~mmtalker.data.sequence.DisplayMap`
onto the committed head (:func:`head_display`): every head vertex that expressions move (face,
neck, mouth and eye sockets; not the eyeballs) is located on the training mesh, so a model that
learnt displacements over the training mesh's UV chart is queried at those points and animates
the head at full resolution, an open mouth showing the mouth socket (:func:`head_points`,
:func:`assemble`): each vertex moves as the surface point it is located at does. A speaker's
head comes from identity weights fitted to their neutral face at the training resolution
(:func:`head_neutral`), or from a user's own head in the ICT topology.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mmtalker.data.sequence import DisplayMap, Topology
from mmtalker.errors import RigError
from mmtalker.geometry.uv import barycentric_interpolate
from mmtalker.rig.coarse import CoarseFace, SurfaceMap
from mmtalker.rig.regions import face_regions
from mmtalker.rig.rig import FACE_PART, Rig, load_ict

#: The display mesh this module builds and reads: :func:`load_ict`'s head.
DISPLAY_MESH = "ict_head"
#: Parts of the head no expression moves: they stay at the neutral.
STILL_PARTS = ("eyeball_left", "eyeball_right")


def head_display(coarse: CoarseFace) -> DisplayMap:
    """Where the head's moving vertices lie on ``coarse`` and where coarse vertices lie on it."""
    head = coarse.fine
    face = head.parts[FACE_PART]
    # The face part leads the head's vertex and triangle lists, so positions on the face area
    # (coarse.on_fine) are positions on the head as they are.
    if face.vertices.start != 0 or face.triangles.start != 0:
        raise RigError("the head's face part must come first to share its vertex numbering")
    still = np.zeros(head.num_vertices, dtype=bool)
    for name in STILL_PARTS:
        if name in head.parts:
            still[head.parts[name].vertices.start : head.parts[name].vertices.stop] = True
    animated = np.flatnonzero(~still).astype(np.int32)
    located = coarse.locate(animated)
    return DisplayMap(
        DISPLAY_MESH,
        animated,
        located.triangles.astype(np.int32),
        located.barycentric.astype(np.float32),
        coarse.on_fine.triangles.astype(np.int32),
        coarse.on_fine.barycentric.astype(np.float32),
    )


def display_head(topology: Topology) -> Rig:
    """The head a topology's display map refers to; an error if it has none."""
    display = topology.display
    if display is None or display.mesh != DISPLAY_MESH:
        raise RigError(
            "this model's topology has no map onto the ICT head: it animates its own mesh only "
            "(train on an ICT corpus, `mmtalker data synth --face ict`, for the whole head)"
        )
    return load_ict()


def head_neutral(topology: Topology, template: np.ndarray, head: Rig) -> np.ndarray:
    """The head (V_head, 3) of the person whose neutral face on ``topology`` is ``template``.

    Identity weights are fitted to the template by least squares over the identity modes read at
    the topology's vertices: exact for the corpus' ICT speakers, the nearest ICT person else.
    """
    display = _display(topology)
    source = SurfaceMap(head.faces, display.source_triangles, display.source_barycentric)
    modes = source.interpolate(head.identity_modes).reshape(head.num_identity_modes, -1)
    offset = (np.asarray(template, np.float64) - source.interpolate(head.neutral)).reshape(-1)
    weights, *_ = np.linalg.lstsq(modes.T.astype(np.float64), offset, rcond=None)
    return head.with_identity(weights.astype(np.float32)).neutral


def head_template(topology: Topology, neutral: np.ndarray, head: Rig) -> np.ndarray:
    """The neutral face on ``topology`` (V, 3) of a whole head ``neutral`` (V_head, 3)."""
    display = _display(topology)
    return SurfaceMap(head.faces, display.source_triangles, display.source_barycentric).interpolate(
        np.asarray(neutral, np.float32)
    )


class HeadPoints(NamedTuple):
    """The surface points a head's animated vertices lie at on a topology's mesh."""

    uv: np.ndarray
    positions: np.ndarray
    triangles: np.ndarray
    barycentric: np.ndarray


def head_points(topology: Topology, neutral: np.ndarray, head: Rig) -> HeadPoints:
    """UV (P, 2), neutral positions (P, 3), triangles (P,) and barycentrics (P, 3) of the surface
    points the animated vertices of the head ``neutral`` (V_head, 3) lie at on the topology.

    The positions are the points' own, on the person's face at the topology's resolution: a
    mouth-socket vertex is read at the lip point it moves with, not at its place behind the
    skin, which pairs that point's UV with a position no training point had.
    """
    display = _display(topology)
    if topology.uv is None:
        raise RigError("the topology has no UV chart; the model's topology carries one")

    def at_points(values: np.ndarray) -> np.ndarray:
        return barycentric_interpolate(
            values, topology.faces, display.triangles, display.barycentric
        )

    return HeadPoints(
        at_points(topology.uv), at_points(head_template(topology, neutral, head)),
        display.triangles, display.barycentric,
    )  # fmt: skip


def assemble(topology: Topology, neutral: np.ndarray, displacements: np.ndarray) -> np.ndarray:
    """Head frames (T, V_head, 3): the neutral, its animated vertices moved by ``displacements``
    (T, P, 3), those of their :func:`head_points`."""
    display = _display(topology)
    frames = np.repeat(np.asarray(neutral, np.float32)[None], len(displacements), axis=0)
    frames[:, display.animated] += displacements
    return frames


def head_topology(head: Rig) -> Topology:
    """The whole head as a topology: its faces, and the face area's regions (``face``: all)."""
    face = head.parts[FACE_PART]
    regions = face_regions(head.subset(FACE_PART))
    regions = {name: idx + face.vertices.start for name, idx in regions.items() if name != "face"}
    return Topology(
        head.faces, head.num_vertices, {**regions, "face": np.arange(head.num_vertices)}
    )


def head_regions(head: Rig) -> dict[str, np.ndarray]:
    """Named vertex sets of the whole head for previews: the face's regions and every part
    (``mouth_socket``, ``eyeball_left``, …)."""
    parts = {name: np.arange(p.vertices.start, p.vertices.stop) for name, p in head.parts.items()}
    return {**head_topology(head).regions, **parts}


def _display(topology: Topology) -> DisplayMap:
    if topology.display is None:
        raise RigError("this topology has no display map onto the ICT head")
    return topology.display
