"""Procedural face charts and templates: resolution, validity, determinism, regions, loading."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import trimesh
from pydantic import ValidationError
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from mmtalker.data import face as F
from mmtalker.errors import TemplateError


@cache
def chart(num_vertices: int) -> F.FaceChart:
    """Charts are deterministic, so every test of one resolution can share one build."""
    return F.make_chart(num_vertices)


def signed_areas(xy: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = xy[faces[:, 0]], xy[faces[:, 1]], xy[faces[:, 2]]
    return 0.5 * (
        (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    )


def boundary_loops(faces: np.ndarray, num_vertices: int) -> list[np.ndarray]:
    """Vertex sets of the boundary loops (edges used by exactly one triangle), found independently
    of the library: connected components of the boundary-edge graph, each checked to be a cycle."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() <= 2, "an edge is shared by more than two triangles (non-manifold)"
    rim = unique[counts == 1]
    graph = sparse.coo_matrix(
        (np.ones(len(rim)), (rim[:, 0], rim[:, 1])), shape=(num_vertices, num_vertices)
    )
    graph = (graph + graph.T).tocsr()
    degree = np.diff(graph.indptr)
    on_rim = np.flatnonzero(degree)
    # A simple closed loop visits every vertex once: each rim vertex has exactly two rim edges.
    assert (degree[on_rim] == 2).all(), "a boundary vertex is pinched between two loops"
    _, labels = connected_components(graph, directed=False)
    return [on_rim[labels[on_rim] == k] for k in np.unique(labels[on_rim])]


# --- resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [1000, 5000, 20000, 50000])
def test_vertex_count_within_three_percent(requested: int) -> None:
    got = chart(requested).num_vertices
    assert abs(got - requested) <= 0.03 * requested, (requested, got)


@pytest.mark.parametrize("requested", [100, 499, 60_001, 100_000])
def test_make_chart_rejects_out_of_range_resolutions(requested: int) -> None:
    with pytest.raises(TemplateError, match="num_vertices"):
        F.make_chart(requested)


# --- mesh validity -----------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [1000, 5000, 20000, 50000])
def test_no_flipped_or_degenerate_triangles(requested: int) -> None:
    c = chart(requested)
    area = signed_areas(c.xy, c.faces)
    assert (area > 0).all(), f"{(area <= 0).sum()} flipped or zero-area triangles"
    # Not merely positive: no sliver is orders of magnitude smaller than a typical triangle.
    assert area.min() > 1e-3 * np.median(area)
    assert c.faces.dtype == np.int32
    assert c.faces.shape[1] == 3
    assert len(np.unique(np.sort(c.faces, axis=1), axis=0)) == len(c.faces), "duplicate faces"


@pytest.mark.parametrize("requested", [1000, 5000, 20000])
def test_four_boundary_loops_outer_eyes_mouth(requested: int) -> None:
    c = chart(requested)
    loops = boundary_loops(c.faces, c.num_vertices)
    assert len(loops) == 4
    centres = {tuple(np.round(c.xy[loop].mean(axis=0), 3)) for loop in loops}
    # The rim of the whole face is centred near the origin; the other three are the openings.
    outer = max(loops, key=len)
    assert np.abs(c.xy[outer].mean(axis=0)).max() < 0.01
    assert np.abs(c.xy[outer, 0]).max() == pytest.approx(F.FACE_HALF_WIDTH, rel=0.02)
    expected = [(-F.EYE_X, F.EYE_Y), (F.EYE_X, F.EYE_Y), (0.0, F.MOUTH_Y)]
    inner = [loop for loop in loops if loop is not outer]
    for cx, cy in expected:
        match = [loop for loop in inner if np.hypot(*(c.xy[loop].mean(axis=0) - (cx, cy))) < 0.003]
        assert len(match) == 1, (cx, cy, centres)
    # Mesh is a disc with three holes: V - E + F = 2 - 4 = -2, consistently wound.
    mesh = trimesh.Trimesh(np.c_[c.xy, np.zeros(c.num_vertices)], c.faces, process=False)
    assert mesh.euler_number == -2
    assert mesh.is_winding_consistent


@pytest.mark.parametrize(
    "requested",
    [
        1000,
        2000,
        5000,
        20000,
    ],
)
def test_mouth_slit_spans_the_mouth_width(requested: int) -> None:
    c = chart(requested)
    mouth = next(
        loop
        for loop in boundary_loops(c.faces, c.num_vertices)
        if abs(c.xy[loop, 1].mean() - F.MOUTH_Y) < 0.003 and abs(c.xy[loop, 0].mean()) < 0.003
    )
    x, y = c.xy[mouth, 0], c.xy[mouth, 1]
    assert np.abs(y - F.MOUTH_Y).max() <= F.MOUTH_GAP + 1e-6
    # Both corners within 10 % of the nominal half-width, at every resolution.
    assert x.min() == pytest.approx(-F.MOUTH_HALF_WIDTH, abs=0.1 * F.MOUTH_HALF_WIDTH)
    assert x.max() == pytest.approx(F.MOUTH_HALF_WIDTH, abs=0.1 * F.MOUTH_HALF_WIDTH)


@pytest.mark.parametrize("requested", [1000, 5000, 20000])
def test_eye_rims_match_the_nominal_almond(requested: int) -> None:
    c = chart(requested)
    for sx in (-1.0, 1.0):
        eye = next(
            loop
            for loop in boundary_loops(c.faces, c.num_vertices)
            if np.hypot(*(c.xy[loop].mean(axis=0) - (sx * F.EYE_X, F.EYE_Y))) < 0.003
        )
        x, y = c.xy[eye, 0], c.xy[eye, 1]
        assert x.min() == pytest.approx(sx * F.EYE_X - F.EYE_HALF_WIDTH, abs=1e-3)
        assert x.max() == pytest.approx(sx * F.EYE_X + F.EYE_HALF_WIDTH, abs=1e-3)
        assert y.max() == pytest.approx(F.EYE_Y + F.EYE_UPPER, abs=5e-4)
        assert y.min() == pytest.approx(F.EYE_Y - F.EYE_LOWER, abs=5e-4)


@pytest.mark.parametrize("requested", [1000, 5000, 20000, 50000])
def test_every_vertex_is_used(requested: int) -> None:
    c = chart(requested)
    np.testing.assert_array_equal(np.unique(c.faces), np.arange(c.num_vertices))
    assert np.isfinite(c.xy).all()


# --- determinism and speakers ------------------------------------------------------------------


def test_make_chart_is_deterministic() -> None:
    a, b = F.make_chart(1000), F.make_chart(1000)
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.faces, b.faces)
    assert a.regions.keys() == b.regions.keys()
    for name in a.regions:
        np.testing.assert_array_equal(a.regions[name], b.regions[name])
    assert a.topology().id == b.topology().id


def test_make_template_is_deterministic_for_a_shape() -> None:
    shape = F.FaceShape.sample(np.random.default_rng(3))
    a, b = F.make_template(1000, shape), F.make_template(1000, shape)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    assert a.topology.id == b.topology.id


def test_default_shape_keeps_the_canonical_chart_in_xy() -> None:
    c = chart(1000)
    vertices = F.warp(c, F.FaceShape())
    assert vertices.shape == (c.num_vertices, 3)
    assert vertices.dtype == np.float32
    np.testing.assert_allclose(vertices[:, :2], c.xy, atol=1e-7)
    # The face looks down +z: the nose tip is the most forward point of the midline.
    midline = np.abs(c.xy[:, 0]) < 0.004
    tip = c.xy[midline][np.argmax(vertices[midline, 2])]
    assert tip[1] == pytest.approx(F.NOSE_TIP_Y, abs=0.01)


def test_different_speakers_share_topology_but_not_vertices() -> None:
    c = chart(1000)
    a = F.make_template(1000, F.FaceShape.sample(np.random.default_rng(1)))
    b = F.make_template(1000, F.FaceShape.sample(np.random.default_rng(2)))
    assert a.vertices.shape == b.vertices.shape == (c.num_vertices, 3)
    assert not np.allclose(a.vertices, b.vertices, atol=1e-4)
    np.testing.assert_array_equal(a.topology.faces, b.topology.faces)
    np.testing.assert_array_equal(a.topology.faces, c.faces)
    assert a.topology.id == b.topology.id == c.topology().id
    for name in c.regions:
        np.testing.assert_array_equal(a.topology.region(name), b.topology.region(name))


def test_sampled_shapes_never_flip_triangles() -> None:
    c = chart(2000)
    for seed in range(10):
        shape = F.FaceShape.sample(np.random.default_rng(seed))
        vertices = F.warp(c, shape)
        assert np.isfinite(vertices).all()
        assert (signed_areas(vertices[:, :2], c.faces) > 0).all(), seed


def test_extreme_shapes_never_flip_triangles() -> None:
    c = chart(2000)
    lows, highs = {}, {}
    for name, info in F.FaceShape.model_fields.items():
        lows[name] = next(m.ge for m in info.metadata if hasattr(m, "ge"))
        highs[name] = next(m.le for m in info.metadata if hasattr(m, "le"))
    for values in (lows, highs):
        vertices = F.warp(c, F.FaceShape(**values))
        assert (signed_areas(vertices[:, :2], c.faces) > 0).all()


def test_shape_factors_act_on_their_feature() -> None:
    c = chart(2000)
    base = F.warp(c, F.FaceShape())
    wide = F.warp(c, F.FaceShape(width=1.1))
    assert np.ptp(wide[:, 0]) == pytest.approx(1.1 * np.ptp(base[:, 0]), rel=1e-3)
    nose = F.warp(c, F.FaceShape(nose_height=1.3))
    assert nose[:, 2].max() > base[:, 2].max() + 0.004
    far = c.xy[:, 1] > F.BROW_Y + 0.02  # the forehead has no nose
    np.testing.assert_allclose(nose[far], base[far], atol=1e-6)


# --- regions -----------------------------------------------------------------------------------


def test_regions_cover_their_features() -> None:
    c = chart(5000)
    x, y = c.xy[:, 0], c.xy[:, 1]
    for name in ("lips", "eyes", "upper_face", "face"):
        assert len(c.regions[name]) > 0, name
        assert len(np.unique(c.regions[name])) == len(c.regions[name])

    lips = c.regions["lips"]
    assert np.abs(x[lips]).max() <= F.MOUTH_HALF_WIDTH * 1.15
    assert np.abs(y[lips] - F.MOUTH_Y).max() <= 0.013
    assert abs(x[lips].mean()) < 0.002

    eyes = c.regions["eyes"]
    assert np.abs(y[eyes] - F.EYE_Y).max() <= 0.011
    assert (np.abs(np.abs(x[eyes]) - F.EYE_X) <= F.EYE_HALF_WIDTH * 1.45).all()
    left, right = (x[eyes] < 0).sum(), (x[eyes] > 0).sum()
    assert left > 0 and right > 0 and abs(left - right) <= 0.15 * max(left, right)

    upper = c.regions["upper_face"]
    assert (y[upper] > F.NOSE_TIP_Y).all()
    assert set(eyes.tolist()) <= set(upper.tolist())
    assert set(lips.tolist()).isdisjoint(upper.tolist())
    brows = np.flatnonzero(np.abs(y - F.BROW_Y) < 0.003)
    assert set(brows.tolist()) <= set(upper.tolist())

    np.testing.assert_array_equal(c.regions["face"], np.arange(c.num_vertices))


def test_opening_rims_are_inside_their_regions() -> None:
    c = chart(5000)
    loops = boundary_loops(c.faces, c.num_vertices)
    lips, eyes = set(c.regions["lips"].tolist()), set(c.regions["eyes"].tolist())
    for loop in loops:
        cx, cy = c.xy[loop].mean(axis=0)
        if abs(cy - F.MOUTH_Y) < 0.003 and abs(cx) < 0.003:
            assert set(loop.tolist()) <= lips
        elif abs(cy - F.EYE_Y) < 0.003:
            assert set(loop.tolist()) <= eyes


# --- FaceShape validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("width", 0.79), ("width", 1.21), ("nose_height", 1.31), ("chin", 0.5), ("eye_size", 2.0)],
)
def test_face_shape_rejects_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        F.FaceShape(**{field: value})


def test_face_shape_sample_stays_inside_the_middle_of_each_range() -> None:
    for seed in range(20):
        shape = F.FaceShape.sample(np.random.default_rng(seed))
        for name, info in F.FaceShape.model_fields.items():
            lo = next(m.ge for m in info.metadata if hasattr(m, "ge"))
            hi = next(m.le for m in info.metadata if hasattr(m, "le"))
            value = getattr(shape, name)
            assert abs(value - 1.0) <= 0.7 * min(1.0 - lo, hi - 1.0) + 1e-12, (name, value)
    a = F.FaceShape.sample(np.random.default_rng(0))
    b = F.FaceShape.sample(np.random.default_rng(0))
    assert a == b


# --- load_template -----------------------------------------------------------------------------


def _masks(template: F.FaceTemplate) -> dict[str, list[int]]:
    return {k: template.topology.region(k).tolist() for k in ("lips", "eyes", "upper_face")}


def test_load_template_round_trips_an_exported_obj(tmp_path) -> None:
    template = F.make_template(1000, F.FaceShape.sample(np.random.default_rng(5)))
    path = tmp_path / "face.obj"
    trimesh.Trimesh(template.vertices, template.topology.faces, process=False).export(path)
    loaded = F.load_template(path, _masks(template))
    assert loaded.vertices.dtype == np.float32
    np.testing.assert_allclose(loaded.vertices, template.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.topology.faces, template.topology.faces)
    assert loaded.topology.id == template.topology.id
    for name in ("lips", "eyes", "upper_face", "face"):
        np.testing.assert_array_equal(loaded.topology.region(name), template.topology.region(name))


def test_load_template_accepts_str_paths_and_ply(tmp_path) -> None:
    template = F.make_template(1000)
    path = tmp_path / "face.ply"
    trimesh.Trimesh(template.vertices, template.topology.faces, process=False).export(path)
    loaded = F.load_template(str(path), _masks(template))
    np.testing.assert_allclose(loaded.vertices, template.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.topology.faces, template.topology.faces)


def test_load_template_missing_file(tmp_path) -> None:
    with pytest.raises(TemplateError, match="not found"):
        F.load_template(tmp_path / "nope.obj", {"lips": [0], "eyes": [0], "upper_face": [0]})


def test_load_template_missing_mask_regions(tmp_path) -> None:
    template = F.make_template(1000)
    path = tmp_path / "face.obj"
    trimesh.Trimesh(template.vertices, template.topology.faces, process=False).export(path)
    with pytest.raises(TemplateError, match="eyes"):
        F.load_template(path, {"lips": [0, 1], "upper_face": [2]})
    with pytest.raises(TemplateError, match="outside"):
        F.load_template(
            path, {"lips": [0], "eyes": [1], "upper_face": [template.vertices.shape[0]]}
        )
    with pytest.raises(TemplateError, match="empty"):
        F.load_template(path, {"lips": [], "eyes": [1], "upper_face": [2]})


@pytest.mark.parametrize("content", ["", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", "# only a comment\n"])
def test_load_template_empty_mesh(tmp_path, content: str) -> None:
    path = tmp_path / "empty.obj"
    path.write_text(content)
    with pytest.raises(TemplateError):
        F.load_template(path, {"lips": [0], "eyes": [0], "upper_face": [0]})


def test_load_template_unreadable_file(tmp_path) -> None:
    path = tmp_path / "broken.ply"
    path.write_bytes(b"ply\nformat nonsense\n\x00\x01\x02")
    with pytest.raises(TemplateError):
        F.load_template(path, {"lips": [0], "eyes": [0], "upper_face": [0]})
