"""The CPU rasterizer: framing, coverage without cracks, shading, heatmaps, panels, bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from mmtalker.data import motion
from mmtalker.data.face import FaceShape, make_chart, warp
from mmtalker.data.sequence import REQUIRED_REGIONS, Topology
from mmtalker.errors import MMTalkerError, RenderError
from mmtalker.io.render import (
    RenderConfig,
    Renderer,
    comparison_frames,
    error_colors,
    side_by_side,
)

SMALL = RenderConfig(width=160, height=192)


@pytest.fixture(scope="module")
def face() -> tuple[np.ndarray, np.ndarray, Topology]:
    """A 600-vertex neutral face, its jaw-opening displacement field and its topology."""
    chart = make_chart(600)
    neutral = warp(chart, FaceShape())
    jaw = motion.blendshapes(chart, FaceShape(), neutral)[motion.CHANNELS.index("jaw_open")]
    return neutral, jaw, chart.topology()


def covered(image: np.ndarray, config: RenderConfig) -> np.ndarray:
    return (image != np.array(config.background, dtype=np.uint8)).any(axis=2)


def grid(n: int = 24, jitter: float = 0.3) -> tuple[np.ndarray, Topology]:
    """A flat square (-1..1)² of irregular triangles facing the viewer."""
    u = np.linspace(-1.0, 1.0, n)
    x, y = np.meshgrid(u, u)
    rng = np.random.default_rng(0)
    inner = (np.abs(x) < 1) & (np.abs(y) < 1)
    step = u[1] - u[0]
    x = x + inner * rng.uniform(-jitter, jitter, x.shape) * step
    y = y + inner * rng.uniform(-jitter, jitter, y.shape) * step
    vertices = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], axis=1).astype(np.float32)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)]).reshape(-1, 3)
    regions = dict.fromkeys(REQUIRED_REGIONS, np.arange(n * n))
    return vertices, Topology(faces, n * n, regions)


def test_face_is_framed_inside_its_margins(face: tuple) -> None:
    neutral, _, topology = face
    image = Renderer(topology.faces, neutral, SMALL).render(neutral)
    assert image.shape == (192, 160, 3) and image.dtype == np.uint8
    rows, cols = np.nonzero(covered(image, SMALL))
    # The face is taller than wide, so its height fills the image minus the margins.
    margin = SMALL.margin * SMALL.height
    assert abs(rows.min() - margin) <= 1 and abs(rows.max() + 1 - (SMALL.height - margin)) <= 1
    width = (rows.max() - rows.min()) * np.ptp(neutral[:, 0]) / np.ptp(neutral[:, 1])
    assert abs((cols.max() - cols.min()) - width) <= 2
    assert abs((cols.min() + cols.max() + 1) / 2 - SMALL.width / 2) <= 1
    # Background everywhere outside the face's box; the oval covers most of the box.
    box = np.zeros(image.shape[:2], dtype=bool)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert (image[~box] == SMALL.background).all()
    assert covered(image, SMALL)[box].mean() > 0.6


@pytest.mark.parametrize(
    "config",
    [
        RenderConfig(width=97, height=83),
        RenderConfig(width=120, height=120, shading="flat"),
        RenderConfig(width=120, height=120, yaw=35, pitch=-20),
    ],
)
def test_a_closed_surface_has_no_cracks(config: RenderConfig) -> None:
    vertices, topology = grid()
    mask = covered(Renderer(topology.faces, vertices, config).render(vertices), config)
    # The square's image is convex: every row and column it touches is one unbroken run.
    for lines in (mask, mask.T):
        for index in np.flatnonzero(lines.any(axis=1)):
            run = np.flatnonzero(lines[index])
            assert run[-1] - run[0] + 1 == run.size, f"crack in line {index}"
    assert mask.sum() > 0.4 * mask.size


def test_moving_the_jaw_changes_the_lower_face_only(face: tuple) -> None:
    neutral, jaw, topology = face
    renderer = Renderer(topology.faces, neutral, SMALL)
    closed = renderer.render(neutral).astype(int)
    opened = renderer.render(neutral + jaw).astype(int)
    changed = np.abs(opened - closed).sum(axis=2) > 30
    rows = np.nonzero(changed)[0]
    assert changed.sum() > 100
    # Jaw and lips are in the lower half of the image; the forehead never moves.
    assert np.mean(rows > SMALL.height / 2) > 0.9


def test_shading_follows_the_light(face: tuple) -> None:
    neutral, _, topology = face
    brightness = {}
    for side in (-1.0, 1.0):
        config = SMALL.model_copy(update={"light": (side, 0.0, 0.3)})
        image = Renderer(topology.faces, neutral, config).render(neutral).astype(float)
        mask = covered(image.astype(np.uint8), config)
        half = np.arange(SMALL.width) < SMALL.width / 2
        left, right = image[mask & half].mean(), image[mask & ~half].mean()
        brightness[side] = left - right
    assert brightness[-1.0] > 10 and brightness[1.0] < -10


def test_heatmap_colours_follow_the_error(face: tuple) -> None:
    neutral, _, topology = face
    colors = error_colors(np.array([0.0, 0.5, 1.0, 3.0, -1.0]), vmax=1.0)
    assert colors.dtype == np.uint8 and colors.shape == (5, 3)
    scale = colors.astype(int)
    luminance = scale @ np.array([0.2126, 0.7152, 0.0722])
    assert luminance[0] < luminance[1] < luminance[2] == luminance[3]
    assert (scale[4] == scale[0]).all()
    # Error on the lower face only: the chin renders in the ramp's yellow, the forehead in blue.
    errors = np.where(neutral[:, 1] < 0, 1.0, 0.0)
    renderer = Renderer(topology.faces, neutral, SMALL.model_copy(update={"ambient": 1.0}))
    image = renderer.render(neutral, error_colors(errors, 1.0)).astype(int)
    mask = covered(image.astype(np.uint8), SMALL)
    top, bottom = image[: SMALL.height // 3][mask[: SMALL.height // 3]], image[-60:][mask[-60:]]
    assert top[:, 1].mean() < 40 and top[:, 2].mean() > top[:, 1].mean() + 40
    assert bottom[:, 1].mean() > 200 and bottom[:, 2].mean() < 80


def test_turned_views_stay_framed(face: tuple) -> None:
    neutral, _, topology = face
    front = Renderer(topology.faces, neutral, SMALL).render(neutral)
    turned_config = SMALL.model_copy(update={"yaw": 50.0, "pitch": 15.0})
    turned = Renderer(topology.faces, neutral, turned_config).render(neutral)
    assert (turned != front).any()
    rows, cols = np.nonzero(covered(turned, SMALL))
    margin = SMALL.margin * min(SMALL.width, SMALL.height)
    assert rows.min() >= margin - 1 and cols.min() >= margin - 1
    assert rows.max() < SMALL.height - margin + 1 and cols.max() < SMALL.width - margin + 1


def test_side_by_side_concatenates_and_labels() -> None:
    panels = [np.full((48, 40, 3), value, dtype=np.uint8) for value in (0, 255, 90)]
    plain = side_by_side(panels)
    assert plain.shape == (48, 120, 3)
    np.testing.assert_array_equal(plain[:, 40:80], panels[1])
    labelled = side_by_side(panels, ["gt", "pred", "err 0-2 mm"])
    changed = (labelled != plain).any(axis=2)
    assert changed[:, :40].any() and changed[:, 40:80].any() and changed[:, 80:].any()
    # Text stays in the top corner, dark on the light panel, light on the dark ones.
    assert not changed[24:].any()
    assert (labelled[:, :40][changed[:, :40]] == 255).all()
    assert (labelled[:, 40:80][changed[:, 40:80]] == 0).all()
    assert (panels[0] == 0).all()  # inputs are not drawn on


def test_comparison_frames_show_three_aligned_panels(face: tuple) -> None:
    neutral, jaw, topology = face
    truth = np.stack([neutral, neutral + 0.5 * jaw, neutral + jaw])
    prediction = truth.copy()
    prediction[:, :, 2] += 0.001
    renderer = Renderer(topology.faces, neutral, SMALL)
    frames = list(comparison_frames(truth, prediction, renderer))
    assert len(frames) == 3
    assert all(f.shape == (SMALL.height, 3 * SMALL.width, 3) for f in frames)
    first = frames[0][40:]  # below the labels
    # Same camera: the silhouettes of all three panels coincide.
    masks = [covered(first[:, k * SMALL.width : (k + 1) * SMALL.width], SMALL) for k in range(3)]
    assert (masks[0] == masks[2]).all() and (masks[0] != masks[1]).mean() < 0.01
    assert (first[:, 2 * SMALL.width :] != first[:, : SMALL.width]).any()


def nan_frame(v: np.ndarray) -> np.ndarray:
    v = v.copy()
    v[5, 1] = np.nan
    return v


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda v: v[:10], "shape"),
        (lambda v: np.stack([v, v]), "frame by frame"),
        (nan_frame, "NaN"),
    ],
)
def test_bad_vertices_are_refused(face: tuple, change: Callable, match: str) -> None:
    neutral, _, topology = face
    with pytest.raises(RenderError, match=match):
        Renderer(topology.faces, neutral, SMALL).render(change(neutral))


def test_other_bad_input_is_refused(face: tuple) -> None:
    neutral, _, topology = face
    renderer = Renderer(topology.faces, neutral, SMALL)
    v = topology.num_vertices
    with pytest.raises(RenderError, match="per-vertex RGB"):
        renderer.render(neutral, np.zeros((v, 4)))
    with pytest.raises(RenderError, match=r"0\.\.255"):
        renderer.render(neutral, np.full((v, 3), 300.0))
    with pytest.raises(RenderError, match="no extent"):
        Renderer(topology.faces, np.zeros_like(neutral), SMALL)
    scrambled = np.random.default_rng(0).permutation(neutral)
    with pytest.raises(RenderError, match="vertex order"):
        Renderer(topology.faces, neutral, RenderConfig(width=512, height=512)).render(scrambled)
    with pytest.raises(RenderError, match="vmax"):
        error_colors(np.zeros(v), 0.0)
    with pytest.raises(RenderError, match="finite"):
        error_colors(np.array([np.nan]), 1.0)
    with pytest.raises(RenderError, match="same height"):
        side_by_side([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
    with pytest.raises(RenderError, match="one per image"):
        side_by_side([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])
    with pytest.raises(RenderError, match="uint8"):
        side_by_side([np.zeros((4, 4, 3))])
    with pytest.raises(RenderError, match="for this topology"):
        comparison_frames(np.zeros((2, v, 3)), np.zeros((3, v, 3)), renderer)
    assert issubclass(RenderError, MMTalkerError) and issubclass(RenderError, ValueError)


@pytest.mark.parametrize(
    "fields",
    [{"width": 0}, {"mesh_color": (0, 0, 256)}, {"light": (0, 0, 0)}, {"fov": 30}, {"yaw": 120}],
)
def test_bad_settings_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        RenderConfig(**fields)
