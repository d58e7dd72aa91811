"""The faces a synthetic corpus can animate: the procedural face or the ICT head through ARKit.

Both turn a speaker and the per-frame channel curves of :mod:`mmtalker.data.motion` (speech
articulation, blinks, brows) into vertex positions on one topology shared by every speaker:

* :class:`ProceduralFace` — the procedural chart face (:mod:`mmtalker.data.face`) at any
  resolution, each speaker a smooth warp of it, each channel a displacement field. Quick: for
  unit tests and tiny corpora.
* :class:`IctFace` — the ICT head's face area (:mod:`mmtalker.rig`): speakers are ICT identities
  (identity weights drawn per speaker, so held-out speakers have unseen faces), the channels
  drive ARKit blendshapes (:mod:`mmtalker.data.arkit_drive`), and the ARKit weights of every
  frame are the sequence's controls. At ``num_vertices`` below the full face area's 9,409 the
  face is a coarse version whose vertices lie on the full surface (:func:`coarse_face`), whose
  rig is the full rig read at those points: the corpus then costs a fraction of the disk and a
  model trained on it can still be asked for the full face (its points located on the chart).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from mmtalker.data import face as F
from mmtalker.data import motion
from mmtalker.data.arkit_drive import arkit_weights
from mmtalker.data.sequence import Topology
from mmtalker.rig.arkit import ARKIT_NAMES, arkit_to_rig
from mmtalker.rig.coarse import coarse_face, full_face
from mmtalker.rig.head import head_display
from mmtalker.rig.regions import face_topology
from mmtalker.rig.rig import Rig, load_ict

#: Spread of the identity weights of synthetic ICT speakers (weights ~ N(0, scale²)).
IDENTITY_SCALE = 1.0


class SpeakerFace(ABC):
    """One speaker's face: its neutral vertices, and its frames for channel curves."""

    neutral: np.ndarray

    @abstractmethod
    def frames(self, curves: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Vertices (T, V, 3) and controls (T, C) or None, for curves (T, len(CHANNELS))."""


class CorpusFace(ABC):
    """A face model for a corpus: one topology, per-speaker faces, named per-frame controls."""

    topology: Topology
    control_names: list[str]

    @abstractmethod
    def speaker(self, shape: F.FaceShape, identity: np.ndarray | None) -> SpeakerFace:
        """The face of a speaker with this procedural shape or ICT identity (K,)."""


class _ProceduralSpeaker(SpeakerFace):
    def __init__(self, chart: F.FaceChart, shape: F.FaceShape) -> None:
        self.neutral = F.warp(chart, shape)
        self._shapes = motion.blendshapes(chart, shape, self.neutral)

    def frames(self, curves: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return motion.animate(self.neutral, self._shapes, curves), None


class ProceduralFace(CorpusFace):
    """The procedural chart face at ``num_vertices``; speakers differ by :class:`FaceShape`."""

    def __init__(self, num_vertices: int) -> None:
        self._chart = F.make_chart(num_vertices)
        self.topology = self._chart.topology()
        self.control_names = []

    def speaker(self, shape: F.FaceShape, identity: np.ndarray | None) -> SpeakerFace:
        return _ProceduralSpeaker(self._chart, shape)


class _RigSpeaker(SpeakerFace):
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.neutral = rig.neutral

    def frames(self, curves: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        arkit = arkit_weights(curves, ARKIT_NAMES)
        return self.rig.compose(arkit_to_rig(arkit, self.rig.shape_names)), arkit


class IctFace(CorpusFace):
    """The ICT head's face area at ``num_vertices`` (the full 9,409 or a coarse version)."""

    def __init__(self, num_vertices: int) -> None:
        head = load_ict()
        full = full_face(head)
        face = full if num_vertices >= full.rig.num_vertices else coarse_face(head, num_vertices)
        self.rig = face.rig
        topology = face_topology(self.rig)
        self.topology = Topology(
            topology.faces, topology.num_vertices, topology.regions, display=head_display(face)
        )
        self.control_names = list(ARKIT_NAMES)

    def identity_modes(self) -> int:
        """How many identity weights a speaker of this face has."""
        return self.rig.num_identity_modes

    def speaker(self, shape: F.FaceShape, identity: np.ndarray | None) -> SpeakerFace:
        if identity is None:
            return _RigSpeaker(self.rig)
        return _RigSpeaker(self.rig.with_identity(identity))
