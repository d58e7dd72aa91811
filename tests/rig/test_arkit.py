"""ARKit-52: names in Live Link Face order, the ICT map, and the bounded least-squares solver."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.optimize import lsq_linear

from mmtalker.errors import RigError
from mmtalker.rig import (
    ARKIT_NAMES,
    FACE_PART,
    ArkitSolver,
    Rig,
    arkit_to_rig,
    load_ict,
    rig_to_arkit,
)
from mmtalker.rig.arkit import arkit_matrix, arkit_name

# Apple's ARFaceAnchor.BlendShapeLocation list, alphabetically.
APPLE = sorted(
    [
        "browDownLeft",
        "browDownRight",
        "browInnerUp",
        "browOuterUpLeft",
        "browOuterUpRight",
        "cheekPuff",
        "cheekSquintLeft",
        "cheekSquintRight",
        "eyeBlinkLeft",
        "eyeBlinkRight",
        "eyeLookDownLeft",
        "eyeLookDownRight",
        "eyeLookInLeft",
        "eyeLookInRight",
        "eyeLookOutLeft",
        "eyeLookOutRight",
        "eyeLookUpLeft",
        "eyeLookUpRight",
        "eyeSquintLeft",
        "eyeSquintRight",
        "eyeWideLeft",
        "eyeWideRight",
        "jawForward",
        "jawLeft",
        "jawOpen",
        "jawRight",
        "mouthClose",
        "mouthDimpleLeft",
        "mouthDimpleRight",
        "mouthFrownLeft",
        "mouthFrownRight",
        "mouthFunnel",
        "mouthLeft",
        "mouthLowerDownLeft",
        "mouthLowerDownRight",
        "mouthPressLeft",
        "mouthPressRight",
        "mouthPucker",
        "mouthRight",
        "mouthRollLower",
        "mouthRollUpper",
        "mouthShrugLower",
        "mouthShrugUpper",
        "mouthSmileLeft",
        "mouthSmileRight",
        "mouthStretchLeft",
        "mouthStretchRight",
        "mouthUpperUpLeft",
        "mouthUpperUpRight",
        "noseSneerLeft",
        "noseSneerRight",
        "tongueOut",
    ]
)


@pytest.fixture(scope="module")
def speaker() -> Rig:
    """A speaker's identity-adapted ICT face area."""
    return load_ict().identity(seed=5).subset(FACE_PART)


def sparse_weights(rig: Rig, frames: int, seed: int) -> np.ndarray:
    """Random weights in [0, 1], about 15 % of the shapes active per frame, a few at the bounds."""
    rng = np.random.default_rng(seed)
    shape = (frames, rig.num_shapes)
    w = rng.uniform(0, 1, shape) * (rng.uniform(size=shape) < 0.15)
    w[rng.uniform(size=shape) < 0.02] = 1.0
    return w


def test_names_are_apples_in_live_link_face_order() -> None:
    assert len(ARKIT_NAMES) == 52 and sorted(ARKIT_NAMES) == APPLE
    assert ARKIT_NAMES[:2] == ("eyeBlinkLeft", "eyeLookDownLeft")
    assert ARKIT_NAMES[14:18] == ("jawForward", "jawRight", "jawLeft", "jawOpen")
    assert ARKIT_NAMES[-7:] == (
        "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
        "noseSneerLeft", "noseSneerRight", "tongueOut",
    )  # fmt: skip


def test_ict_shapes_map_onto_arkit(speaker: Rig) -> None:
    channels = {arkit_name(n) for n in speaker.shape_names}
    assert channels == set(ARKIT_NAMES) - {"tongueOut"}
    assert arkit_name("eyeBlink_L") == "eyeBlinkLeft" and arkit_name("jawOpen") == "jawOpen"
    assert arkit_name("browInnerUp_R") == "browInnerUp" and arkit_name("cheekPuff_L") == "cheekPuff"
    matrix = arkit_matrix(speaker.shape_names)
    assert matrix.shape == (52, 53)
    inner = ARKIT_NAMES.index("browInnerUp")
    halves = [speaker.shape_index("browInnerUp_L"), speaker.shape_index("browInnerUp_R")]
    assert matrix[inner, halves].tolist() == [0.5, 0.5] and matrix[inner].sum() == 1.0
    assert not matrix[ARKIT_NAMES.index("tongueOut")].any()
    # ARKit → rig → ARKit is the identity, but for tongueOut, which the rig cannot show.
    arkit = np.random.default_rng(0).uniform(0, 1, (4, 52)).astype(np.float32)
    rig_weights = arkit_to_rig(arkit, speaker.shape_names)
    assert rig_weights[:, halves[0]].tolist() == rig_weights[:, halves[1]].tolist()
    back = rig_to_arkit(rig_weights, speaker.shape_names)
    expected = arkit.copy()
    expected[:, -1] = 0.0
    np.testing.assert_allclose(back, expected, atol=1e-7)
    with pytest.raises(RigError, match="not ARKit blendshapes"):
        arkit_matrix(("jawOpen", "smile_L2"))


def test_solver_recovers_known_weights_on_the_fine_face(speaker: Rig) -> None:
    w = sparse_weights(speaker, 300, seed=1)
    solver = ArkitSolver(speaker)
    solved = solver.solve_rig(speaker.compose(w))
    assert solved.min() >= 0.0 and solved.max() <= 1.0
    assert np.abs(solved - w).max() < 1e-3 and np.abs(solved - w).mean() < 1e-5
    arkit = solver.solve(speaker.compose(w))
    np.testing.assert_allclose(arkit, rig_to_arkit(w, speaker.shape_names), atol=1e-3)


def test_solver_matches_scipy_and_clips_at_the_box(speaker: Rig) -> None:
    rng = np.random.default_rng(2)
    # Out-of-box truths (below 0, above 1) and noise of 0.3 mm: the box must bind.
    w = rng.uniform(-0.4, 1.4, (6, speaker.num_shapes))
    frames = speaker.compose(w) + rng.normal(0, 3e-4, (6, speaker.num_vertices, 3)).astype(
        np.float32
    )
    solved = ArkitSolver(speaker).solve_rig(frames)
    assert (solved == 0.0).any() and (solved == 1.0).any()
    basis = speaker.shapes.reshape(speaker.num_shapes, -1).T.astype(np.float64)
    for frame, weights in zip(frames, solved, strict=True):
        motion = (frame - speaker.neutral).ravel().astype(np.float64)
        reference = lsq_linear(basis, motion, bounds=(0.0, 1.0), tol=1e-12).x
        np.testing.assert_allclose(weights, reference, atol=2e-4)


def test_solver_error_under_noise_is_bounded(speaker: Rig) -> None:
    w = sparse_weights(speaker, 200, seed=3)
    rng = np.random.default_rng(4)
    noisy = speaker.compose(w) + rng.normal(0, 2e-4, (200, speaker.num_vertices, 3)).astype(
        np.float32
    )
    error = np.abs(ArkitSolver(speaker).solve_rig(noisy) - w)
    assert error.mean() < 0.005 and error.max() < 0.2


def test_solver_on_a_vertex_subset_and_its_errors(speaker: Rig) -> None:
    w = sparse_weights(speaker, 20, seed=5)
    frames = speaker.compose(w)
    lower = np.flatnonzero(speaker.neutral[:, 1] < 0.0)
    # Elsewhere the frames are garbage: a fit to the lower face must not see it.
    frames[:, speaker.neutral[:, 1] >= 0.0] += 0.01
    lower_shapes = [i for i, s in enumerate(speaker.shapes) if np.abs(s[lower]).max() > 2e-3]
    solved = ArkitSolver(speaker, vertices=lower).solve_rig(frames)
    assert np.abs(solved - w)[:, lower_shapes].max() < 1e-2
    with pytest.raises(RigError, match=r"\(T, 9409, 3\) for this rig"):
        ArkitSolver(speaker).solve(frames[:, :100])
    with pytest.raises(RigError, match="finite"):
        ArkitSolver(speaker).solve(np.full_like(frames, np.nan))


def test_solver_on_a_whole_head_fits_its_face_part_only() -> None:
    # The head's sockets and neck are carried from the face by a model's display map: their
    # errors must not bend the weights.
    head = load_ict().identity(4)
    w = sparse_weights(head, 10, seed=7)
    frames = head.compose(w)
    face = head.parts[FACE_PART].vertices
    frames[:, face.stop :] += 0.01
    assert np.abs(ArkitSolver(head).solve_rig(frames) - w).max() < 1e-3


def test_a_minute_solves_in_seconds(speaker: Rig) -> None:
    w = sparse_weights(speaker, 1800, seed=6)
    frames = speaker.compose(w)
    solver = ArkitSolver(speaker)
    start = time.perf_counter()
    solved = solver.solve_rig(frames)
    # 60 s at 30 fps on the 9,409-vertex face: ~1 s on one idle core; generous for shared CI.
    assert time.perf_counter() - start < 20.0
    assert np.abs(solved - w).mean() < 1e-4
