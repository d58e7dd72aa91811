"""Apple's 52 ARKit blendshapes: names, the map from a rig's shapes, and a solver for weights.

A rig names its shapes like ARKit with ``_L``/``_R`` for Left/Right (ICT: ``eyeBlink_L``); ICT
splits ``browInnerUp`` and ``cheekPuff`` into halves and has no ``tongueOut``. ARKit weights
drive a rig through :func:`arkit_to_rig` (a merged channel drives both halves); rig weights
become ARKit weights through :func:`rig_to_arkit` (halves averaged, missing channels 0).

:class:`ArkitSolver` turns vertices (T, V, 3) into per-frame weights in [0, 1] against one
speaker's rig: ``min ‖neutral + w @ shapes − vertices‖²`` subject to ``0 ≤ w ≤ 1``, over the
rig's own shapes (so split halves move independently), then mapped to ARKit's 52 channels.
"""

from __future__ import annotations

import numpy as np

from mmtalker.errors import RigError
from mmtalker.rig.rig import FACE_PART, Rig

# Column order of a Live Link Face (Epic Games' iPhone app) CSV take, after Timecode and
# BlendShapeCount, with the first letter lowered: ARKit's names. Read off the header the
# open-source Live Link Face importers parse (e.g. the Blender add-on `livelinkface`'s
# LIVE_LINK_FACE_HEADER and polyvox_filament's DynamicAnimation._loadLiveLinkFaceCSV); note
# jawRight before jawLeft and mouthRight before mouthLeft.
ARKIT_NAMES = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight",
    "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight", "eyeWideRight", "jawForward",
    "jawRight", "jawLeft", "jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthRight",
    "mouthLeft", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthPressLeft",
    "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft",
    "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft",
    "noseSneerRight", "tongueOut",
)  # fmt: skip
#: The rotation columns a Live Link Face CSV has after the 52 weights (degrees; 0 here).
LIVE_LINK_ROTATIONS = (
    "HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
    "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)  # fmt: skip
#: Projected-Newton iterations after which a frame that has not converged is an error.
MAX_ITERATIONS = 100
#: Convergence, in weight units: a frame is done when a projected-gradient step (scaled by the
#: Gram diagonal) or its last Newton step would move no weight further than this.
TOLERANCE = 1e-6
# Step halvings of the projected line search before a frame takes the shortest step.
_HALVINGS = 30


def arkit_name(shape: str) -> str:
    """The ARKit channel a rig shape belongs to (``eyeBlink_L`` → ``eyeBlinkLeft``)."""
    for suffix, side in (("_L", "Left"), ("_R", "Right")):
        if shape.endswith(suffix):
            stem = shape.removesuffix(suffix)
            # A shape ARKit has once, split by the rig into halves (ICT: browInnerUp, cheekPuff).
            return stem if stem in ARKIT_NAMES else stem + side
    return shape


def arkit_matrix(shape_names: tuple[str, ...]) -> np.ndarray:
    """(52, S) matrix taking rig weights to ARKit weights: halves averaged, missing channels 0."""
    channels = [arkit_name(n) for n in shape_names]
    unknown = sorted(set(channels) - set(ARKIT_NAMES))
    if unknown:
        raise RigError(
            f"rig shapes {unknown} are not ARKit blendshapes; name shapes like ARKit, with "
            "_L/_R for Left/Right"
        )
    member = np.array([[c == a for c in channels] for a in ARKIT_NAMES], dtype=np.float64)
    return member / np.maximum(member.sum(axis=1, keepdims=True), 1.0)


def rig_to_arkit(weights: np.ndarray, shape_names: tuple[str, ...]) -> np.ndarray:
    """ARKit weights (..., 52) of rig weights (..., S)."""
    return (np.asarray(weights, dtype=np.float64) @ arkit_matrix(shape_names).T).astype(np.float32)


def arkit_to_rig(arkit: np.ndarray, shape_names: tuple[str, ...]) -> np.ndarray:
    """Rig weights (..., S) driven by ARKit weights (..., 52); a split channel drives its halves."""
    weights = np.asarray(arkit, dtype=np.float64)
    if weights.shape[-1:] != (len(ARKIT_NAMES),):
        raise RigError(
            f"ARKit weights must end in {len(ARKIT_NAMES)} channels, got {weights.shape}"
        )
    drives = (arkit_matrix(shape_names) > 0).astype(np.float64)
    return (weights @ drives).astype(np.float32)


class ArkitSolver:
    """Per-frame ARKit weights of vertices on one rig (e.g. a speaker's identity-adapted rig).

    The fit is bounded least squares over the rig's S shapes. Everything that depends only on the
    rig (its Gram matrix) is computed once here; :meth:`solve` costs one (T, 3V) × (3V, S)
    product plus a few (T, S, S) solves, so a minute of animation takes well under a second.
    """

    def __init__(self, rig: Rig, vertices: np.ndarray | None = None) -> None:
        """Fit to ``vertices`` (indices) of the rig only; by default to its face part, or to all
        of its vertices if it has none."""
        self.rig = rig
        if vertices is None and FACE_PART in rig.parts:
            # A whole head's other moving vertices (mouth and eye sockets, neck) are carried from
            # the face by the model's display map: they add no evidence, only the map's error
            # (ICT benchmark: driven channels' error 0.036 fitted to them too, 0.032 without).
            face = rig.parts[FACE_PART].vertices
            vertices = np.arange(face.start, face.stop)
        self.vertices = None if vertices is None else np.asarray(vertices, dtype=np.int64)
        index = slice(None) if self.vertices is None else self.vertices
        basis = rig.shapes[:, index].reshape(rig.num_shapes, -1)
        self._basis = np.ascontiguousarray(basis.T)
        self._neutral = rig.neutral[index].reshape(-1)
        self._gram = basis.astype(np.float64) @ basis.T.astype(np.float64)
        self._to_arkit = arkit_matrix(rig.shape_names)

    def solve(self, vertices: np.ndarray) -> np.ndarray:
        """ARKit weights (T, 52) in [0, 1] of vertices (T, V, 3) on the rig."""
        return (self.solve_rig(vertices) @ self._to_arkit.T).astype(np.float32)

    def solve_rig(self, vertices: np.ndarray) -> np.ndarray:
        """The rig's own weights (T, S) in [0, 1] that best reproduce vertices (T, V, 3)."""
        frames = np.asarray(vertices, dtype=np.float32)
        expected = (self.rig.num_vertices, 3)
        if frames.ndim != 3 or frames.shape[1:] != expected or not np.isfinite(frames).all():
            raise RigError(
                f"vertices must be finite (T, {expected[0]}, 3) for this rig, got {frames.shape}"
            )
        if self.vertices is not None:
            frames = frames[:, self.vertices]
        # Displacements first: positions are ~0.1 m, motion ~1 mm, and float32 keeps 7 digits.
        motion = frames.reshape(len(frames), -1) - self._neutral
        return _box_qp(self._gram, (motion @ self._basis).astype(np.float64)).astype(np.float32)


def _box_qp(gram: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin over w in [0, 1]^S of ½ wᵀ G w − bᵀ w for each row b of ``target``, (T, S).

    Projected Newton (Bertsekas 1982), every frame at once: variables at a bound whose gradient
    pushes outwards are held; the others take a Newton step on their block of G, then a
    projected backtracking line search. On a quadratic this identifies the active set in a few
    iterations and ends at the exact box-constrained minimum.
    """
    size = gram.shape[0]
    eye = np.eye(size)
    ridge = 1e-12 * np.trace(gram) / size * eye
    w = np.clip(np.linalg.solve(gram + ridge, target.T).T, 0.0, 1.0)
    active = np.arange(len(w))
    for _ in range(MAX_ITERATIONS):
        x, b = w[active], target[active]
        grad = x @ gram - b
        # Optimal (KKT) to within TOLERANCE in weight units: a diagonally scaled projected
        # gradient step would move no weight further. Such frames are done.
        kkt = np.abs(x - np.clip(x - grad / np.diag(gram), 0.0, 1.0)).max(axis=1)
        keep = kkt > TOLERANCE
        active, x, b, grad = active[keep], x[keep], b[keep], grad[keep]
        if not len(active):
            return w
        # Bertsekas' ε-active set: near a bound and pushed outwards counts as at it.
        eps = np.minimum(1e-3, np.abs(x - np.clip(x - grad, 0.0, 1.0)).max(axis=1, keepdims=True))
        held = ((x <= eps) & (grad > 0.0)) | ((x >= 1.0 - eps) & (grad < 0.0))
        free = ~held
        # Newton on the free block; held variables get an identity row, so their step is 0.
        hessian = np.where(free[:, :, None] & free[:, None, :], gram + ridge, eye)
        step = np.linalg.solve(hessian, (-grad * free)[..., None])[..., 0]
        value = _objective(gram, b, x)
        scale = np.ones(len(x))
        new = np.clip(x + step, 0.0, 1.0)
        # Armijo on the projected arc: halve the step of the frames that do not decrease enough.
        for _ in range(_HALVINGS):
            short = _objective(gram, b, new) > value - 1e-4 * np.sum(grad * (x - new), axis=1)
            if not short.any():
                break
            scale[short] /= 2.0
            new[short] = np.clip(x[short] + scale[short, None] * step[short], 0.0, 1.0)
        w[active] = new
        active = active[np.abs(new - x).max(axis=1) > TOLERANCE]
    raise RigError(
        f"the ARKit solve did not converge in {MAX_ITERATIONS} iterations for {len(active)} "
        "frames; are the vertices on this rig?"
    )


def _objective(gram: np.ndarray, target: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.sum((0.5 * (w @ gram) - target) * w, axis=1)
