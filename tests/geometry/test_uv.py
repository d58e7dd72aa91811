"""UV charts of face meshes and the surface-point ↔ UV ↔ 3D correspondence built on them."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
import trimesh

from mmtalker.data.face import FaceShape, FaceTemplate, make_chart, make_template
from mmtalker.errors import TemplateError
from mmtalker.geometry.uv import (
    attach_uv,
    barycentric_interpolate,
    compute_uv,
    face_areas,
    locate_uv,
    subdivide,
)

SHAPED = FaceShape.sample(np.random.default_rng(7))


@cache
def template(name: str) -> FaceTemplate:
    if name == "shaped":
        return make_template(1000, SHAPED)
    return make_template(int(name))


@cache
def chart_uv(name: str) -> np.ndarray:
    """Charts are deterministic, so every test of one template can share one."""
    tpl = template(name)
    return compute_uv(tpl.vertices, tpl.topology.faces)


def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def signed_areas(xy: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (xy[faces[:, k]].astype(np.float64) for k in range(3))
    return 0.5 * cross(b - a, c - a)


def random_surface_points(
    num_faces: int, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    bary = rng.dirichlet(np.ones(3), size=count)
    return rng.integers(0, num_faces, count), bary


# --- the chart ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1000", "5000", "shaped"])
def test_chart_fills_unit_square_without_folds(name: str) -> None:
    uv, faces = chart_uv(name), template(name).topology.faces
    assert uv.dtype == np.float32 and uv.shape == (template(name).topology.num_vertices, 2)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # Aspect is kept: the taller axis spans [0, 1], the other is centred.
    assert np.ptp(uv[:, 1]) == pytest.approx(1.0)
    assert uv[:, 0].min() == pytest.approx(1.0 - uv[:, 0].max(), abs=1e-6)
    area = signed_areas(uv, faces)
    # Oriented like the face's xy (triangles counter-clockwise seen from +z), none folded.
    assert (area > 0).all(), f"{(area <= 0).sum()} triangles flipped or degenerate"


@pytest.mark.parametrize("name", ["1000", "5000", "shaped"])
def test_chart_axes_follow_the_face(name: str) -> None:
    uv, vertices = chart_uv(name), template(name).vertices
    assert np.corrcoef(uv[:, 0], vertices[:, 0])[0, 1] > 0.9
    assert np.corrcoef(uv[:, 1], vertices[:, 1])[0, 1] > 0.9


@pytest.mark.parametrize("name", ["1000", "5000"])
def test_chart_is_close_to_the_canonical_chart_up_to_similarity(name: str) -> None:
    uv, xy = chart_uv(name).astype(np.float64), make_chart(int(name)).xy
    a, b = uv - uv.mean(axis=0), xy - xy.mean(axis=0)
    u, s, vt = np.linalg.svd(a.T @ b)
    rotation = u @ vt
    assert np.linalg.det(rotation) > 0, "the chart is mirrored"
    fitted = a @ rotation * (s.sum() / (a * a).sum())
    residual = np.linalg.norm(fitted - b, axis=1) / np.ptp(xy, axis=0).max()
    # Only the nose and the cheeks' curvature distort a conformal flattening, by a few percent.
    assert np.sqrt((residual**2).mean()) < 0.04
    assert residual.max() < 0.08


def test_attach_uv_carries_the_chart_on_the_topology() -> None:
    tpl = template("1000")
    topology = attach_uv(tpl.topology, tpl.vertices)
    assert tpl.topology.uv is None
    np.testing.assert_array_equal(topology.uv, chart_uv("1000"))
    assert topology.id == tpl.topology.id


def test_face_areas_match_trimesh() -> None:
    tpl = template("1000")
    mesh = trimesh.Trimesh(tpl.vertices, tpl.topology.faces, process=False)
    areas = face_areas(tpl.vertices, tpl.topology.faces)
    np.testing.assert_allclose(areas, mesh.area_faces, rtol=1e-5)


# --- meshes that have no chart -----------------------------------------------------------------


def test_two_disconnected_parts_are_rejected() -> None:
    tpl = template("1000")
    shifted = tpl.vertices + np.array([0.5, 0.0, 0.0], dtype=np.float32)
    vertices = np.concatenate([tpl.vertices, shifted])
    faces = np.concatenate([tpl.topology.faces, tpl.topology.faces + len(tpl.vertices)])
    with pytest.raises(TemplateError, match="2 disconnected parts"):
        compute_uv(vertices, faces)


def test_closed_surface_is_rejected() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    with pytest.raises(TemplateError, match="closed"):
        compute_uv(sphere.vertices, sphere.faces)


def test_unused_vertices_are_rejected() -> None:
    tpl = template("1000")
    vertices = np.concatenate([tpl.vertices, np.zeros((1, 3), dtype=np.float32)])
    with pytest.raises(TemplateError, match="1 vertices belong to no triangle"):
        compute_uv(vertices, tpl.topology.faces)


def test_a_triangle_wound_against_its_neighbours_is_reported_flipped() -> None:
    tpl = template("1000")
    faces = tpl.topology.faces.copy()
    faces[100] = faces[100, ::-1]
    with pytest.raises(TemplateError, match="1 flipped and 0 degenerate"):
        compute_uv(tpl.vertices, faces)


# --- barycentric interpolation -----------------------------------------------------------------


def test_interpolation_at_corners_returns_the_vertices_exactly() -> None:
    tpl = template("1000")
    faces = tpl.topology.faces
    face_index = np.repeat(np.arange(len(faces)), 3)
    bary = np.tile(np.eye(3), (len(faces), 1))
    got = barycentric_interpolate(tpl.vertices, faces, face_index, bary)
    np.testing.assert_array_equal(got, tpl.vertices[faces.reshape(-1)])


def test_interpolation_is_linear_and_agrees_between_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    faces = template("1000").topology.faces
    num_vertices = template("1000").topology.num_vertices
    x, y = rng.normal(size=(2, 2, 3, num_vertices, 4))
    face_index, bary = random_surface_points(len(faces), 50, rng)

    def at(values: np.ndarray) -> np.ndarray:
        return barycentric_interpolate(values, faces, face_index, bary)

    assert at(x).shape == (2, 3, 50, 4)
    np.testing.assert_allclose(at(2.0 * x - 3.0 * y), 2.0 * at(x) - 3.0 * at(y), atol=1e-12)
    as_torch = barycentric_interpolate(
        torch.from_numpy(x), torch.from_numpy(faces), torch.from_numpy(face_index), bary
    )
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), at(x), atol=1e-12)


def test_interpolation_is_differentiable_in_values_and_barycentrics() -> None:
    # A small patch keeps the numerical Jacobian cheap; the code path is the same at any size.
    faces = np.array([[0, 1, 2], [1, 3, 2], [2, 3, 4], [3, 5, 4]])
    face_index, bary = random_surface_points(len(faces), 7, np.random.default_rng(1))
    values = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    bary_t = torch.tensor(bary, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, b: barycentric_interpolate(v, faces, face_index, b), (values, bary_t)
    )


# --- locating UV points ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1000", "5000"])
def test_locate_uv_round_trips_surface_points(name: str) -> None:
    tpl, uv = template(name), chart_uv(name)
    faces = tpl.topology.faces
    face_index, bary = random_surface_points(len(faces), 5000, np.random.default_rng(2))
    query = barycentric_interpolate(uv.astype(np.float64), faces, face_index, bary)
    found_face, found_bary = locate_uv(uv, faces, query)
    assert (found_bary >= 0).all()
    np.testing.assert_allclose(found_bary.sum(axis=1), 1.0)
    np.testing.assert_allclose(
        barycentric_interpolate(tpl.vertices.astype(np.float64), faces, found_face, found_bary),
        barycentric_interpolate(tpl.vertices.astype(np.float64), faces, face_index, bary),
        atol=1e-9,
    )


def test_locate_uv_snaps_off_chart_points_to_the_nearest_boundary_point() -> None:
    uv, faces = chart_uv("1000").astype(np.float64), template("1000").topology.faces
    rng = np.random.default_rng(3)
    mouth = uv[template("1000").topology.region("lips")].mean(axis=0)
    query = np.concatenate([rng.uniform(-0.3, 1.3, (300, 2)), mouth[None]])
    face_index, bary = locate_uv(uv, faces, query)
    assert (bary >= 0).all()
    np.testing.assert_allclose(bary.sum(axis=1), 1.0)
    snapped = barycentric_interpolate(uv, faces, face_index, bary)
    # Independent answer: the distance to the chart is 0 inside a triangle, else the distance
    # to the nearest edge, checked by brute force over all triangles.
    a, b, c = (uv[faces[:, k]] for k in range(3))
    expected = []
    for point in query:
        side = [cross(q - p, point - p) for p, q in ((a, b), (b, c), (c, a))]
        if ((side[0] >= 0) & (side[1] >= 0) & (side[2] >= 0)).any():
            expected.append(0.0)
            continue
        gaps = []
        for p, q in ((a, b), (b, c), (c, a)):
            t = np.clip(((point - p) * (q - p)).sum(1) / ((q - p) ** 2).sum(1), 0.0, 1.0)
            gaps.append(np.linalg.norm(p + t[:, None] * (q - p) - point, axis=1).min())
        expected.append(min(gaps))
    np.testing.assert_allclose(np.linalg.norm(snapped - query, axis=1), expected, atol=1e-12)
    assert expected[-1] > 0, "the mouth's centre should lie in the mouth slit, off the chart"


# --- subdivision -------------------------------------------------------------------------------


def test_subdivision_splits_each_triangle_into_four_with_midpoint_uvs() -> None:
    tpl, uv = template("1000"), chart_uv("1000")
    faces = tpl.topology.faces
    vertices, sub_faces, sub_uv = subdivide(tpl.vertices, faces, uv)
    edges = np.unique(np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1), axis=0)
    assert len(sub_faces) == 4 * len(faces)
    assert len(vertices) == len(sub_uv) == len(tpl.vertices) + len(edges)
    np.testing.assert_array_equal(vertices[: len(tpl.vertices)], tpl.vertices)
    np.testing.assert_allclose(sub_uv[len(uv) :], uv[edges].mean(axis=1), atol=1e-7)
    np.testing.assert_allclose(vertices[len(uv) :], tpl.vertices[edges].mean(axis=1), atol=1e-7)
    assert (signed_areas(sub_uv, sub_faces) > 0).all()
    _, twice, _ = subdivide(tpl.vertices, faces, uv, iterations=2)
    assert len(twice) == 16 * len(faces)


def test_subdivided_vertices_map_back_onto_the_base_surface() -> None:
    tpl, uv = template("1000"), chart_uv("1000")
    faces = tpl.topology.faces
    vertices, _, sub_uv = subdivide(tpl.vertices, faces, uv, iterations=2)
    face_index, bary = locate_uv(uv, faces, sub_uv)
    np.testing.assert_allclose(
        barycentric_interpolate(tpl.vertices, faces, face_index, bary), vertices, atol=1e-6
    )


def test_the_full_ict_face_gets_a_chart_despite_its_crumpled_mouth_corners() -> None:
    # LSCM turns over six sub-millimetre triangles of the scanned face (mouth and eye corners);
    # the chart smooths them out locally and is fold-free everywhere.
    from mmtalker.rig import face_regions, load_ict

    face = load_ict().subset("face")
    uv = compute_uv(face.neutral, face.faces)
    a, b, c = (uv[face.faces[:, k]].astype(np.float64) for k in range(3))
    area = (b - a)[:, 0] * (c - a)[:, 1] - (c - a)[:, 0] * (b - a)[:, 1]
    assert (area > 0).all() or (area < 0).all()
    # The lips keep a chart of their own size: the repair stayed local.
    lips = uv[face_regions(face)["lips"]]
    assert 0.1 < np.ptp(lips[:, 0]) < 0.6
