"""The CPU rasterizer: framing, close-ups, face colours, coverage without cracks, shading,
heatmaps, panels, the ICT head's preview, bad input."""

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
    Palette,
    RenderConfig,
    Renderer,
    comparison_frames,
    comparison_still,
    error_colors,
    face_colors,
    side_by_side,
)
from mmtalker.rig import load_ict

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


def marked(
    renderer: Renderer, vertices: np.ndarray, chosen: np.ndarray, share: float = 0.5
) -> np.ndarray:
    """Pixels where the ``chosen`` vertices show, through the renderer's camera.

    A pixel is theirs when at least ``share`` of its colour comes from them: with 0.99, only
    pixels of triangles whose corners are all chosen.
    """
    paint = np.zeros((len(vertices), 3))
    paint[chosen] = 255.0
    white = renderer.render(vertices, np.full_like(paint, 255.0))
    shown = renderer.render(vertices, paint).min(axis=2) >= share * white.min(axis=2)
    return shown & covered(white, renderer.config)


def redness(image: np.ndarray, mask: np.ndarray) -> float:
    """How much redder than green and blue the masked pixels are, on average."""
    pixels = image[mask].astype(float)
    return float((pixels[:, 0] - pixels[:, 1:].mean(axis=1)).mean())


FRONT = SMALL.model_copy(update={"yaw": 0.0, "pitch": 0.0})


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


def test_face_colours_reach_the_image(face: tuple) -> None:
    neutral, _, topology = face
    lips, eyes = topology.region("lips"), topology.region("eyes")
    renderer = Renderer(topology.faces, neutral, FRONT, regions=topology.regions)
    image = renderer.render(neutral)
    # The lips proper: the inner half of the (generous) lips region, around the mouth slit.
    rest = np.setdiff1d(np.arange(topology.num_vertices), lips)
    depth = np.min(np.linalg.norm(neutral[lips, None] - neutral[None, rest], axis=2), axis=1)
    inner = lips[depth > depth.max() / 2]
    # Cheeks: beside the nose, between the eyes' and the mouth's heights, outside every region.
    x, y = neutral[:, 0], neutral[:, 1]
    beside = (np.abs(x) > 0.03) & (y < neutral[eyes, 1].min()) & (y > neutral[lips, 1].max())
    cheeks = np.setdiff1d(np.flatnonzero(beside), np.union1d(lips, eyes))
    lip_pixels = marked(renderer, neutral, inner, share=0.99)
    cheek_pixels = marked(renderer, neutral, cheeks, share=0.99)
    assert lip_pixels.sum() > 30 and cheek_pixels.sum() > 50
    assert redness(image, lip_pixels) > redness(image, cheek_pixels) + 25
    # Skin, not grey: the cheeks keep the palette's warm hue under the light.
    assert redness(image, cheek_pixels) > 20
    plain = Renderer(topology.faces, neutral, FRONT).render(neutral)
    assert abs(redness(plain, cheek_pixels)) < 8


def test_a_close_up_frames_the_focus_regions(face: tuple) -> None:
    square, topology = grid(21, jitter=0.0)
    patch = np.flatnonzero(np.abs(square[:, :2]).max(axis=1) < 0.5 + 1e-6)
    # Flat shading paints a triangle the mean of its corners: only those inside the patch are
    # full white, and together they cover exactly the patch, -0.5..0.5 in x and y.
    config = FRONT.model_copy(update={"shading": "flat", "ambient": 1.0, "focus": ("patch",)})
    paint = np.zeros((topology.num_vertices, 3))
    paint[patch] = 255.0
    usable = (1 - 2 * config.margin) * min(config.width, config.height)
    for padding in (0.0, 0.25):
        settings = config.model_copy(update={"focus_padding": padding})
        renderer = Renderer(topology.faces, square, settings, regions={"patch": patch})
        image = renderer.render(square, paint)
        assert covered(image, settings).mean() > 0.95  # the rest of the square fills the frame
        rows, cols = np.nonzero(image.min(axis=2) == 255)
        for low, high, size in ((rows.min(), rows.max(), 192), (cols.min(), cols.max(), 160)):
            assert abs(high + 1 - low - usable / (1 + 2 * padding)) <= 1.5
            assert abs((low + high + 1) / 2 - size / 2) <= 1
    # The face's default close-up: lips and eyes span most of the width, with room for brows
    # and chin around them; the rest of the face overflows the frame.
    neutral, _, topology = face
    focus = np.union1d(topology.region("lips"), topology.region("eyes"))
    preview = Renderer(topology.faces, neutral, SMALL, regions=topology.regions)
    full = Renderer(topology.faces, neutral, SMALL)
    spans = []
    for renderer in (preview, full):
        cols = np.nonzero(marked(renderer, neutral, focus))[1]
        spans.append((cols.max() + 1 - cols.min()) / SMALL.width)
    assert spans[0] > 0.6 and spans[0] > 1.1 * spans[1]
    for renderer, overflows in ((preview, True), (full, False)):
        rows = np.nonzero(covered(renderer.render(neutral), SMALL))[0]
        assert (rows.min() == 0 and rows.max() == SMALL.height - 1) == overflows


def test_without_regions_a_mesh_renders_as_before(face: tuple) -> None:
    neutral, _, topology = face
    plain = Renderer(topology.faces, neutral, SMALL).render(neutral)
    grey = np.tile(SMALL.mesh_color, (topology.num_vertices, 1))
    explicit = Renderer(topology.faces, neutral, FRONT, colors=grey).render(neutral)
    np.testing.assert_array_equal(plain, explicit)
    # One grey, shaded: every covered pixel is the mesh colour times one brightness.
    pixels = plain[covered(plain, SMALL)].astype(float)
    brightness = pixels / np.array(SMALL.mesh_color)
    assert np.ptp(brightness, axis=1).max() < 0.03
    # Regions without lips or eyes colour the mesh but keep the front view of the whole of it.
    only_face = {"face": topology.region("face"), "upper_face": topology.region("upper_face")}
    skin = Renderer(topology.faces, neutral, SMALL, regions=only_face).render(neutral)
    np.testing.assert_array_equal(covered(skin, SMALL), covered(plain, SMALL))
    assert redness(skin, covered(skin, SMALL)) > 20


def test_face_colours_follow_the_regions() -> None:
    square, _ = grid(31, jitter=0.0)
    x, y = square[:, 0], square[:, 1]
    lips = np.flatnonzero(np.hypot(x, y + 0.4) < 0.3)
    eyes = np.flatnonzero(np.hypot(np.abs(x) - 0.5, y - 0.5) < 0.2)
    # The procedural face's regions: skin, with lips and eyelids tinted.
    regions = {"face": np.arange(len(square)), "upper_face": np.flatnonzero(y > 0)}
    palette = Palette(lips=(200, 40, 60))
    colors = face_colors(square, {**regions, "lips": lips, "eyes": eyes}, palette)
    assert colors.dtype == np.uint8 and colors.shape == (len(square), 3)
    skin, lip = np.array(palette.skin), np.array(palette.lips)
    assert (colors[np.setdiff1d(np.arange(len(square)), np.union1d(lips, eyes))] == skin).all()
    # The lips' tint fades in from the region's edge to its full colour in the middle.
    middle = lips[np.argmin(np.hypot(x[lips], y[lips] + 0.4))]
    edge = lips[np.argmax(np.hypot(x[lips], y[lips] + 0.4))]
    np.testing.assert_array_equal(colors[middle], lip)
    assert np.abs(colors[edge] - skin).sum() < np.abs(colors[edge] - lip).sum()
    lids = colors[eyes].astype(int).sum(axis=1)
    assert (lids <= skin.sum()).all() and (lids < skin.sum() - 60).any()
    # A rig's parts: an eyeball of radius 0.1 looking along +z, and a mouth socket.
    rng = np.random.default_rng(1)
    ball = rng.normal(size=(400, 3))
    ball = 0.1 * ball / np.linalg.norm(ball, axis=1, keepdims=True) + (0.5, 0.5, 0.2)
    ball[:3] = [(0.5, 0.5, 0.3), (0.5, 0.5, 0.1), (0.535, 0.5, 0.294)]  # front, back, in the iris
    mouth = rng.uniform(-0.2, 0.2, size=(50, 3)) - (0.0, 0.4, 0.5)
    parts = {"eyeball_left": range(400), "mouth_socket": np.arange(400, 450)}
    colors = face_colors(np.concatenate([ball, mouth]), parts)
    palette = Palette()
    assert (colors[0] == palette.pupil).all() and (colors[1] == palette.sclera).all()
    assert (colors[2] == palette.iris).all()
    assert (colors[:400] == palette.sclera).all(axis=1).mean() > 0.8
    assert (colors[400:] == palette.mouth).all()


def test_ict_head_preview_shows_an_open_mouth_and_blinks() -> None:
    rig = load_ict()
    parts = {name: part.vertices for name, part in rig.parts.items()}
    # The face area's regions take seconds to find; the mouth socket and eyeballs alone frame a
    # close-up of the face.
    focus = ("mouth_socket", "eyeball_left", "eyeball_right")
    config = RenderConfig(width=192, height=192, focus=focus)
    renderer = Renderer(rig.faces, rig.neutral, config, regions=parts)
    weights = np.zeros(rig.num_shapes, dtype=np.float32)
    weights[[rig.shape_index(n) for n in ("jawOpen", "eyeBlink_L", "eyeBlink_R")]] = 0.5, 1, 1
    talking = rig.compose(weights)
    before, after = renderer.render(rig.neutral), renderer.render(talking)
    assert covered(before, config).mean() > 0.7
    # Pupils show between the open eyelids and are gone when they blink.
    in_eyes = marked(renderer, rig.neutral, np.concatenate([parts[n] for n in focus[1:]]))
    pupil = [np.abs(image.astype(int) - config.palette.pupil).max(axis=2) <= 10
             for image in (before, after)]  # fmt: skip
    assert (pupil[0] & in_eyes).sum() > 10 and (pupil[1] & in_eyes).sum() == 0
    # The closed mouth hides its socket; the open one shows it, dark.
    shown = [marked(renderer, v, np.asarray(parts["mouth_socket"])) for v in (rig.neutral, talking)]
    assert shown[0].sum() < 40 and shown[1].sum() > 400
    assert after[shown[1]].astype(int).sum(axis=1).mean() < 150


def test_comparison_panels_keep_the_heatmap_on_a_coloured_face(face: tuple) -> None:
    neutral, jaw, topology = face
    truth = np.stack([neutral, neutral + jaw])
    prediction = truth + np.float32(0.001)
    renderer = Renderer(topology.faces, neutral, SMALL, regions=topology.regions)
    frame = next(comparison_frames(truth, prediction, renderer))[40:]
    panels = [frame[:, k * SMALL.width : (k + 1) * SMALL.width] for k in range(3)]
    face_mask = covered(panels[0], SMALL)
    assert redness(panels[0], face_mask) > 20
    # A uniform 1.7 mm error is the top of the ramp: viridis yellow, green above blue.
    heat = panels[2][covered(panels[2], SMALL)].astype(int)
    assert (heat[:, 1] > heat[:, 2] + 80).mean() > 0.95
    still = comparison_still(truth, prediction, topology.faces, SMALL, regions=topology.regions)
    assert still.shape == (SMALL.height, 3 * SMALL.width, 3)
    assert redness(still[40:, : SMALL.width], face_mask) > 20
    # The still is the frame where the truth moves most: the open jaw, not the rest pose.
    scale = float(np.linalg.norm(prediction - truth, axis=-1).max())
    moving = next(comparison_frames(truth[1:], prediction[1:], renderer, scale))
    np.testing.assert_array_equal(still, moving)


def test_bad_colours_and_regions_are_refused(face: tuple) -> None:
    neutral, _, topology = face
    v = topology.num_vertices
    with pytest.raises(RenderError, match="per-vertex RGB"):
        Renderer(topology.faces, neutral, SMALL, colors=np.zeros((v - 1, 3)))
    with pytest.raises(RenderError, match=r"0\.\.255"):
        Renderer(topology.faces, neutral, SMALL, colors=np.full((v, 3), -1.0))
    with pytest.raises(RenderError, match=r"0\.\.255"):
        Renderer(topology.faces, neutral, SMALL, colors=np.full((v, 3), np.nan))
    with pytest.raises(RenderError, match="numeric"):
        Renderer(topology.faces, neutral, SMALL, colors=[["skin"] * 3] * v)
    with pytest.raises(RenderError, match="outside 0"):
        Renderer(topology.faces, neutral, SMALL, regions={"lips": [0, v]})
    with pytest.raises(RenderError, match="'eyes' must be a 1-D list of vertex indices"):
        Renderer(topology.faces, neutral, SMALL, regions={"eyes": np.ones(v, dtype=bool)})
    with pytest.raises(RenderError, match="vertex indices"):
        face_colors(neutral, {"lips": np.array([0.5, 2.0])})
    with pytest.raises(RenderError, match="neutral must be"):
        face_colors(neutral[:, :2], topology.regions)
    with pytest.raises(RenderError, match=r"regions \('lips', 'eyes'\) have no extent"):
        Renderer(topology.faces, neutral, SMALL, regions={"lips": [3]})


@pytest.mark.parametrize(
    "fields",
    [
        {"width": 0},
        {"mesh_color": (0, 0, 256)},
        {"light": (0, 0, 0)},
        {"fov": 30},
        {"yaw": 120},
        {"palette": {"lips": (0, 0, 256)}},
        {"palette": {"skin": (1, 2)}},
        {"palette": {"hair": (1, 2, 3)}},
        {"focus_padding": -0.1},
    ],
)
def test_bad_settings_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        RenderConfig(**fields)
