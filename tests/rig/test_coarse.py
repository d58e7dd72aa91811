"""The coarse ICT face: vertices on the fine surface, the rig carried exactly, a valid UV chart."""

from __future__ import annotations

import igl
import numpy as np
import pytest

from mmtalker.errors import RigError
from mmtalker.geometry.uv import attach_uv
from mmtalker.rig import FACE_PART, Rig, load_ict
from mmtalker.rig.coarse import CoarseFace, coarse_face
from mmtalker.rig.regions import LIPS_REACH, boundary_loops, mouth_rim

SIZE = 1000


@pytest.fixture(scope="module")
def ict() -> Rig:
    return load_ict()


@pytest.fixture(scope="module")
def coarse(ict: Rig) -> CoarseFace:
    return coarse_face(ict, SIZE)


def _distance(points: np.ndarray, rig: Rig) -> np.ndarray:
    sq, _, _ = igl.point_mesh_squared_distance(
        points.astype(np.float64), rig.neutral.astype(np.float64), rig.faces.astype(np.int64)
    )
    return np.sqrt(sq)


def test_coarse_face_is_an_open_manifold_with_a_uv_chart(coarse: CoarseFace) -> None:
    rig = coarse.rig
    assert rig.num_vertices == SIZE and list(rig.parts) == [FACE_PART]
    # The outer rim, the mouth and both eyes stay open.
    assert len(boundary_loops(rig.faces, rig.num_vertices)) == 4
    topology = attach_uv(coarse.topology(), rig.neutral)
    assert topology.uv is not None and topology.uv.shape == (SIZE, 2)
    assert all(len(topology.region(n)) for n in ("lips", "eyes", "upper_face", "face"))
    lips = rig.neutral[topology.region("lips")]
    rim = rig.neutral[mouth_rim(rig)]
    assert np.linalg.norm(lips[:, None] - rim[None], axis=2).min(axis=1).max() < LIPS_REACH + 0.005


def test_coarse_vertices_lie_on_the_fine_surface(ict: Rig, coarse: CoarseFace) -> None:
    fine = ict.subset(FACE_PART)
    assert _distance(coarse.rig.neutral, fine).max() < 1e-6
    # And the coarse surface stays close to the fine one (ICT at 1,000 vertices: 0.5 mm mean).
    gap = _distance(fine.neutral, coarse.rig)
    assert gap.mean() < 1e-3 and gap.max() < 8e-3


def test_coarse_rig_composes_like_the_fine_rig_at_its_points(ict: Rig, coarse: CoarseFace) -> None:
    rng = np.random.default_rng(3)
    w = rng.uniform(0, 1, (5, ict.num_shapes)) * (rng.uniform(size=(5, ict.num_shapes)) < 0.3)
    a = ict.identity_weights(11)
    fine = ict.subset(FACE_PART).compose(w, a)
    np.testing.assert_allclose(
        coarse.rig.compose(w, a), coarse.on_fine.interpolate(fine), atol=2e-6
    )


def test_fine_points_located_on_the_coarse_face_follow_its_motion(
    ict: Rig, coarse: CoarseFace
) -> None:
    face = ict.parts[FACE_PART].vertices
    on_coarse = coarse.locate(np.arange(face.start, face.stop))
    assert len(on_coarse) == len(face)
    np.testing.assert_allclose(on_coarse.barycentric.sum(axis=1), 1.0, atol=1e-9)
    assert on_coarse.barycentric.min() >= 0
    moved = on_coarse.interpolate(coarse.rig.shapes)
    truth = ict.shapes[:, face.start : face.stop]
    # 2.7 % of the ICT shapes' motion energy is lost at 1,000 vertices: no point on a wrong lip.
    assert np.sum((moved - truth) ** 2) / np.sum(truth**2) < 0.05**2
    assert np.linalg.norm(moved - truth, axis=2).max() < 0.005
    # The mouth socket follows the lips and jaw: an open mouth shows a mouth, not a hole.
    socket = ict.parts["mouth_socket"].vertices
    jaw = ict.shape_index("jawOpen")
    inside = coarse.locate(np.arange(socket.start, socket.stop)).interpolate(coarse.rig.shapes[jaw])
    true_jaw = ict.shapes[jaw, socket.start : socket.stop]
    error = np.linalg.norm(inside - true_jaw, axis=1).mean()
    assert error < 0.3 * np.linalg.norm(true_jaw, axis=1).mean()


def test_decimation_is_deterministic_and_checks_its_arguments(ict: Rig, coarse: CoarseFace) -> None:
    again = coarse_face(ict, SIZE)
    np.testing.assert_array_equal(again.rig.faces, coarse.rig.faces)
    np.testing.assert_array_equal(again.rig.neutral, coarse.rig.neutral)
    with pytest.raises(RigError, match=r"num_vertices must be in 100\.\.9408"):
        coarse_face(ict, 20000)
    with pytest.raises(RigError, match="no 'face' part"):
        coarse_face(ict.subset("eyeball_left"), 500)
    with pytest.raises(RigError, match="indices into the fine rig"):
        coarse.locate(np.array([ict.num_vertices]))
