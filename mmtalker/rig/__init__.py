"""Face rigs: the committed ICT head, its regions, coarse versions of its face, ARKit-52.

- :mod:`mmtalker.rig.rig`: :class:`Rig` (neutral + expression shapes + identity modes) and
  :func:`load_ict`, the ICT-FaceKit head shipped in ``assets/`` (MIT; see its README).
- :mod:`mmtalker.rig.regions`: lips, eyes, upper face and face regions from geometry and shapes.
- :mod:`mmtalker.rig.coarse`: :func:`~mmtalker.rig.coarse.coarse_face`, a decimated face area
  whose rig is the fine one interpolated, and the maps between the resolutions (imported from
  its module: it needs libigl and the geometry package).
- :mod:`mmtalker.rig.arkit`: Apple's 52 names in Live Link Face order, the rig ↔ ARKit maps and
  the bounded least-squares solver.
- :mod:`mmtalker.rig.convert`: rebuilds the asset from the ICT Face Model Light.
"""

from mmtalker.rig.arkit import ARKIT_NAMES, ArkitSolver, arkit_to_rig, rig_to_arkit
from mmtalker.rig.regions import face_regions, face_topology
from mmtalker.rig.rig import FACE_PART, Part, Rig, load_ict

__all__ = [
    "ARKIT_NAMES",
    "FACE_PART",
    "ArkitSolver",
    "Part",
    "Rig",
    "arkit_to_rig",
    "face_regions",
    "face_topology",
    "load_ict",
    "rig_to_arkit",
]
