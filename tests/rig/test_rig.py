"""The committed ICT head: it loads from the package without pickle, composes as documented."""

from __future__ import annotations

import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from mmtalker.errors import MMTalkerError, RigError
from mmtalker.rig import FACE_PART, Rig, load_ict
from mmtalker.rig.convert import ASSET_NAME, KEPT_PARTS, convert

ASSETS = Path(str(resources.files("mmtalker.rig") / "assets"))


@pytest.fixture(scope="module")
def ict() -> Rig:
    return load_ict()


def test_asset_is_in_the_package_with_its_licence_and_credit() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert ASSETS.resolve().is_relative_to(repo / "mmtalker" / "rig" / "assets")
    asset = ASSETS / ASSET_NAME
    assert asset.stat().st_size < 15e6
    licence = (ASSETS / "LICENSE").read_text()
    assert (
        licence.startswith("MIT License") and "USC Institute for Creative Technologies" in licence
    )
    readme = (ASSETS / "README.md").read_text()
    assert "ICT-FaceKit" in readme and "python -m mmtalker.rig.convert" in readme
    # Plain arrays only: every member is a .npy file that loads with pickling refused.
    with zipfile.ZipFile(asset) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())
    with np.load(asset, allow_pickle=False) as data:
        assert data["shapes"].dtype == data["identity_modes"].dtype == np.float16
        assert all(data[key].dtype != object for key in data.files)


def test_ict_head_has_its_parts_shapes_and_modes(ict: Rig) -> None:
    assert (ict.num_vertices, ict.num_shapes, ict.num_identity_modes) == (17202, 53, 100)
    assert list(ict.parts) == list(KEPT_PARTS)
    assert ict.parts[FACE_PART].vertices == range(0, 9409)
    face = ict.parts[FACE_PART].vertices
    for part in ict.parts.values():
        corners = np.unique(ict.faces[part.triangles.start : part.triangles.stop])
        # A part's triangles use its own vertices, and the sockets and neck the face's seam.
        own = corners[corners >= face.stop] if part.vertices != face else corners
        np.testing.assert_array_equal(own, np.arange(part.vertices.start, part.vertices.stop))
        assert corners.max() < part.vertices.stop
    covered = sum(len(p.triangles) for p in ict.parts.values())
    assert covered == len(ict.faces)
    assert {"jawOpen", "eyeBlink_L", "browInnerUp_R", "cheekPuff_L"} <= set(ict.shape_names)
    # A head about 25 cm across: metres, +y up, the face towards +z.
    extent = np.ptp(ict.neutral, axis=0)
    assert 0.15 < extent[0] < 0.3 and 0.2 < extent[1] < 0.4
    nose_tip = ict.neutral[np.argmax(ict.neutral[:9409, 2])]
    assert abs(nose_tip[0]) < 0.005
    # No expression moves the eyeballs; identities do move them (other people, other eyes).
    eyeball = ict.parts["eyeball_left"].vertices
    assert not ict.shapes[:, eyeball.start : eyeball.stop].any()
    assert ict.identity_modes[:, eyeball.start : eyeball.stop].any()


def test_compose_is_neutral_plus_identity_plus_expression(ict: Rig) -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(0, 1, (4, ict.num_shapes)) * (rng.uniform(size=(4, ict.num_shapes)) < 0.2)
    a = rng.standard_normal(ict.num_identity_modes)
    expected = (
        ict.neutral.astype(np.float64)
        + np.einsum("k,kvc->vc", a, ict.identity_modes.astype(np.float64))
        + np.einsum("ts,svc->tvc", w, ict.shapes.astype(np.float64))
    )
    frames = ict.compose(w, a)
    assert frames.shape == (4, ict.num_vertices, 3) and frames.dtype == np.float32
    np.testing.assert_allclose(frames, expected, atol=2e-6)
    np.testing.assert_allclose(ict.compose(w[2], a), frames[2], atol=1e-6)
    np.testing.assert_array_equal(ict.compose(np.zeros(ict.num_shapes)), ict.neutral)


def test_identities_are_deterministic_and_linear(ict: Rig) -> None:
    person = ict.identity(seed=7)
    np.testing.assert_array_equal(person.neutral, ict.identity(seed=7).neutral)
    np.testing.assert_array_equal(person.shapes, ict.shapes)
    weights = ict.identity_weights(7)
    np.testing.assert_allclose(person.neutral, ict.compose(np.zeros(53), weights), atol=1e-6)
    other = ict.identity(seed=8).neutral - ict.neutral
    assert np.abs(person.neutral - ict.neutral).max() > 1e-3 and np.abs(other).max() > 1e-3
    # A plausible person: the same head within a couple of centimetres.
    assert np.abs(person.neutral - ict.neutral).max() < 0.03
    w = np.zeros(ict.num_shapes)
    w[ict.shape_index("jawOpen")] = 1.0
    np.testing.assert_allclose(person.compose(w), ict.compose(w, weights), atol=1e-6)


def test_subset_keeps_the_parts_mesh_and_motion(ict: Rig) -> None:
    face = ict.subset(FACE_PART)
    assert face.num_vertices == 9409 and list(face.parts) == [FACE_PART]
    assert len(face.faces) == len(ict.parts[FACE_PART].triangles)
    w = np.zeros(ict.num_shapes)
    w[ict.shape_index("mouthFunnel")] = 0.7
    np.testing.assert_array_equal(face.compose(w), ict.compose(w)[:9409])
    # The sockets are stitched to the face area, so they come with it.
    with pytest.raises(RigError, match="use vertices of other parts"):
        ict.subset("mouth_socket")
    mouth = ict.subset(FACE_PART, "mouth_socket")
    assert mouth.parts["mouth_socket"].vertices == range(9409, 9409 + 2046)
    np.testing.assert_array_equal(mouth.neutral[9409:], ict.neutral[11248:13294])
    np.testing.assert_array_equal(mouth.compose(w)[9409:], ict.compose(w)[11248:13294])


def test_bad_arguments_are_specific_errors(ict: Rig) -> None:
    with pytest.raises(RigError, match=r"\(T, S\) with S = 53"):
        ict.compose(np.zeros(52))
    with pytest.raises(RigError, match=r"identity weights must be finite \(100,\)"):
        ict.with_identity(np.zeros(3))
    with pytest.raises(RigError, match="unknown shape 'jawClose'"):
        ict.shape("jawClose")
    with pytest.raises(RigError, match="unknown parts"):
        ict.subset("teeth")
    with pytest.raises(RigError, match=r"must be \(17202, 3\)"):
        ict.with_neutral(ict.neutral[:10])
    with pytest.raises(RigError, match="shapes must be") as info:
        Rig(ict.neutral, ict.faces, ("a",), ict.shapes, ict.identity_modes, {})
    assert isinstance(info.value, MMTalkerError)


def _polygon_source(path: Path) -> None:
    """A three-part source in the ICT Light layout: a quad strip, a triangle fan, teeth."""
    neutral = np.array(
        [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0], [2, 1.2, 0],
         [5, 5, 5], [6, 5, 5], [5, 6, 5], [9, 9, 9], [9, 8, 9], [8, 9, 9]],
        dtype=np.float32,
    )  # fmt: skip
    sizes = np.array([4, 4, 3, 3], dtype=np.int32)
    corners = np.array([0, 1, 2, 3, 1, 4, 5, 2, 6, 7, 8, 9, 10, 11], dtype=np.int32)
    rng = np.random.default_rng(1)
    names = ["face", "head_and_neck", "mouth_socket", "eye_socket_left", "eye_socket_right"]
    names += ["eyeball_left", "eyeball_right", "teeth"]
    vertex_ranges = [[0, 6], [6, 9], [9, 9], [9, 9], [9, 9], [9, 9], [9, 9], [9, 12]]
    polygon_ranges = [[0, 2], [2, 3], [3, 3], [3, 3], [3, 3], [3, 3], [3, 3], [3, 4]]
    np.savez(
        path,
        neutral=neutral,
        polygon_sizes=sizes,
        polygon_vertices=corners,
        expression_names=np.array(["jawOpen", "eyeBlink_L"]),
        expressions=rng.normal(0, 0.01, (2, 12, 3)).astype(np.float32),
        identities=rng.normal(0, 0.01, (3, 12, 3)).astype(np.float32),
        geometry_names=np.array(names),
        geometry_vertex_ranges=np.array(vertex_ranges, dtype=np.int32),
        geometry_polygon_ranges=np.array(polygon_ranges, dtype=np.int32),
        landmarks_multipie68=np.array([0, 4], dtype=np.int32),
    )


def test_convert_triangulates_keeps_parts_and_stores_float16(tmp_path: Path) -> None:
    source = tmp_path / "source.npz"
    _polygon_source(source)
    target = convert(source, tmp_path / "out")
    assert target == tmp_path / "out" / ASSET_NAME
    with np.load(target, allow_pickle=False) as data, np.load(source) as src:
        assert list(data["part_names"]) == list(KEPT_PARTS)
        # The teeth are dropped; each quad splits along its shorter diagonal (0-2, then 4-2).
        np.testing.assert_array_equal(data["neutral"], src["neutral"][:9])
        np.testing.assert_array_equal(
            data["faces"], [[0, 1, 2], [0, 2, 3], [1, 4, 2], [4, 5, 2], [6, 7, 8]]
        )
        np.testing.assert_array_equal(data["part_triangles"][:2], [[0, 4], [4, 5]])
        np.testing.assert_array_equal(data["part_vertices"][:2], [[0, 6], [6, 9]])
        assert data["shapes"].dtype == np.float16
        np.testing.assert_allclose(data["shapes"], src["expressions"][:, :9], atol=2e-5)
        np.testing.assert_array_equal(data["landmarks_multipie68"], [0, 4])
    # Deterministic: converting again gives the same bytes.
    assert convert(source, tmp_path / "again").read_bytes() == target.read_bytes()


def test_convert_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, neutral=np.zeros((3, 3)))
    with pytest.raises(RigError, match="not the ICT Face Model Light"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
