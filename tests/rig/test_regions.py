"""Regions of the ICT face area: where the metrics look (lips, eyes, upper face)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
from scipy.spatial import cKDTree

from mmtalker.data.sequence import REQUIRED_REGIONS
from mmtalker.errors import RigError
from mmtalker.rig import FACE_PART, Rig, face_topology, load_ict
from mmtalker.rig.regions import LIPS_REACH, boundary_loops, mouth_rim


@pytest.fixture(scope="module")
def face() -> Rig:
    return load_ict().subset(FACE_PART)


@pytest.fixture(scope="module")
def landmarks() -> np.ndarray:
    """Multi-PIE 68 landmarks on the face area: 36-47 the eyes' corners and lids, 48-67 the lips."""
    asset = resources.files("mmtalker.rig") / "assets" / "ict_face.npz"
    with asset.open("rb") as stream, np.load(stream, allow_pickle=False) as data:
        return data["landmarks_multipie68"]


def test_face_area_has_an_outer_rim_a_mouth_and_two_eyes(face: Rig) -> None:
    loops = boundary_loops(face.faces, face.num_vertices)
    assert sorted(len(loop) for loop in loops) == [42, 42, 74, 204]
    rim = mouth_rim(face)
    assert len(rim) == 74
    centre = face.neutral[rim].mean(axis=0)
    assert abs(centre[0]) < 1e-3 and -0.04 < centre[1] < -0.03


def test_regions_are_where_the_metrics_expect_them(face: Rig, landmarks: np.ndarray) -> None:
    topology = face_topology(face)
    regions = topology.regions
    assert set(regions) == set(REQUIRED_REGIONS)
    assert len(regions["face"]) == face.num_vertices
    v = face.neutral
    lips, eyes, upper = (v[regions[n]] for n in ("lips", "eyes", "upper_face"))
    # Lips: around the mouth, covering every lip landmark, not reaching the nose or the chin.
    mouth = v[landmarks[48:68]]
    assert np.abs(lips.mean(axis=0)[:2] - mouth.mean(axis=0)[:2]).max() < 0.005
    assert cKDTree(lips).query(mouth)[0].max() < 0.002
    assert np.ptp(lips[:, 1]) < 2 * LIPS_REACH + 0.01 and np.ptp(lips[:, 0]) < 0.08
    # Eyes: both eyelids, around each eye's landmarks.
    for side in (landmarks[36:42], landmarks[42:48]):
        eye = v[side]
        near = np.linalg.norm(eyes[:, None, :2] - eye.mean(axis=0)[:2], axis=-1) < 0.03
        assert near.sum() > 0.4 * len(eyes)
    assert cKDTree(eyes).query(v[landmarks[36:48]])[0].max() < 0.004
    # Upper face: above the mouth, holding the eyes and brows.
    assert upper[:, 1].min() > mouth[:, 1].max()
    assert np.isin(regions["eyes"], regions["upper_face"]).mean() > 0.9
    assert np.intersect1d(regions["lips"], regions["upper_face"]).size == 0


def test_regions_need_a_face_with_arkit_shapes(face: Rig) -> None:
    names = tuple(n.replace("jawOpen", "mouthOpen") for n in face.shape_names)
    renamed = Rig(face.neutral, face.faces, names, face.shapes, face.identity_modes, face.parts)
    with pytest.raises(RigError, match="unknown shape 'jawOpen'"):
        face_topology(renamed)
