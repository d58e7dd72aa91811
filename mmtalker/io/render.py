"""Headless preview images of face meshes: a vectorized CPU rasterizer, face colours, error
heatmaps, panels.

No OpenGL and no display: numpy rasterizes every triangle of a frame at once. Triangles are cut
into one span per pixel row (where the row's centre line crosses their edges), spans into pixels
with ``np.repeat``; depth and colour advance along a span by a constant step, and
``np.minimum.at`` resolves the z-buffer. No Python loop runs per triangle or per pixel: a
3k-vertex face renders at about 80 frames/s at 512×512 on one core (``bench/render.py``).
Vertex positions are in metres, colours RGB 0–255.

A mesh with named regions (a topology's ``lips`` and ``eyes``, a rig's parts such as
``mouth_socket`` and ``eyeball_left``) is painted by :func:`face_colors` and framed as a close-up
of its lips and eyes, so lip motion and blinks read in a preview; a mesh without them is one grey.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import sparse
from scipy.spatial import cKDTree

from mmtalker.errors import RenderError

Channel = Annotated[int, Field(ge=0, le=255)]
RGB = tuple[Channel, Channel, Channel]

# Viridis sampled at nine evenly spaced points: perceptually uniform and readable in greyscale.
_VIRIDIS = np.array(
    [
        (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    dtype=np.float64,
)  # fmt: skip
# Fragments may reach this many times the image's pixel count before a frame is refused: a face
# covers each pixel about once, while scrambled vertices would exhaust memory instead.
_MAX_OVERDRAW = 16
# A 3×5 bitmap font: per character six symbols, the character and its five rows, each row's
# three bits left to right (4, 2, 1).
_FONT = (
    "A25755B65656C34443D65556E74647F74644G34553H55755I72227J11152K55655L44447M57755N65555"
    "O25552P65644Q25563R65655S34216T72222U55557V55552W55775X55255Y55222Z71247 00000?61202"
    "075557126227261247361216455711574616634652771222825252925316.00002:02020-00700+02720"
    "=07070/11244(12221)42224%51245_00007"
)
_GLYPHS = {_FONT[i]: _FONT[i + 1 : i + 6] for i in range(0, len(_FONT), 6)}

#: Vertex indices of named parts of a mesh: topology regions, a rig's part ranges.
Regions = Mapping[str, Sequence[int] | np.ndarray | range]
# How a region is painted, by its name or its name's prefix before "_" (a rig's eyeball_left,
# eye_socket_right): a "tint" of the skin fading in from the region's edge (lips and eyelids are
# skin), a "fill" (a part of its own) or an "eyeball" (sclera, iris and pupil), with which
# palette colour. Regions named otherwise (face, upper_face) stay skin. Later entries paint over
# earlier ones.
_REGION_PAINT = (
    ("eyes", "tint", "eyelids"),
    ("lips", "tint", "lips"),
    ("mouth_socket", "fill", "mouth"),
    ("eye_socket", "fill", "eye_socket"),
    ("eyeball", "eyeball", None),
)
# A tint's neighbourhood: a Gaussian of this width, as a fraction of how deep the region is (the
# distance from its innermost vertex to the nearest outside one), cut at this many widths; the
# tint fades in while the region's share of the neighbourhood rises between these two values.
_TINT_BLUR, _TINT_REACH, _TINT_SHARE = 0.5, 2.0, (0.6, 0.8)
_TINT_SAMPLE = 20_000
# Iris and pupil radii as fractions of the eyeball's radius (about 12, 6 and 2.5 mm in a person).
_IRIS_RADIUS, _PUPIL_RADIUS = 0.5, 0.2
# Yaw and pitch (degrees) of a close-up unless the config sets them.
_CLOSE_UP_VIEW = (15.0, -5.0)


class Palette(BaseModel):
    """Base colours of a face by what each part is, RGB 0–255 (see :func:`face_colors`)."""

    model_config = ConfigDict(extra="forbid")

    skin: RGB = (222, 178, 152)
    lips: RGB = (178, 78, 82)
    eyelids: RGB = (182, 126, 110)
    mouth: RGB = (64, 22, 28)
    eye_socket: RGB = (150, 84, 84)
    sclera: RGB = (238, 236, 230)
    iris: RGB = (70, 94, 116)
    pupil: RGB = (14, 14, 18)


class RenderConfig(BaseModel):
    """Image size, colours, camera and lighting of a preview.

    The camera is orthographic, looks along -z at the face (+z towards the viewer, y up) after
    turning it by ``yaw`` (about y) and ``pitch`` (about x), and frames the neutral face's
    bounding box with ``margin`` (a fraction of the image) on every side. Given regions that
    include ``focus`` ones, it frames their box instead, widened by ``focus_padding`` times the
    box's larger side on every side: a close-up, by default of the lips and eyes. ``yaw`` and
    ``pitch`` default to a front view, and a close-up to a slight three-quarter view from a little
    below, which shows lip rounding and an open mouth's depth. ``palette`` paints the regions.
    """

    model_config = ConfigDict(extra="forbid")

    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    background: RGB = (24, 26, 31)
    mesh_color: RGB = (205, 200, 195)
    yaw: float | None = Field(
        None, ge=-90.0, le=90.0, description="degrees; default 0, close-up 15"
    )
    pitch: float | None = Field(
        None, ge=-90.0, le=90.0, description="degrees; default 0, close-up -5"
    )
    margin: float = Field(0.06, ge=0.0, lt=0.5)
    light: tuple[float, float, float] = Field(
        (0.4, 0.5, 1.0), description="direction towards the light, in view coordinates"
    )
    ambient: float = Field(0.3, ge=0.0, le=1.0)
    shading: Literal["gouraud", "flat"] = "gouraud"
    palette: Palette = Palette()
    focus: tuple[str, ...] = Field(
        ("lips", "eyes"), description="regions to frame; the whole mesh when it has none of them"
    )
    focus_padding: float = Field(0.25, ge=0.0, le=4.0)

    @field_validator("light")
    @classmethod
    def _nonzero_light(cls, light: tuple[float, float, float]) -> tuple[float, float, float]:
        if not (all(map(math.isfinite, light)) and any(light)):
            raise ValueError("light must be a finite, non-zero direction such as (0.4, 0.5, 1)")
        return light


class Renderer:
    """Renders meshes of one triangle list through one camera, fitted once to a neutral face.

    ``regions`` (named vertex indices, e.g. ``topology.regions``) paint the surface with
    :func:`face_colors` and frame the camera on the config's ``focus`` regions; ``colors``
    (V, 3), RGB 0–255, paint it instead. Without either, the surface is ``mesh_color``.
    """

    def __init__(
        self,
        faces: np.ndarray,
        neutral: np.ndarray,
        config: RenderConfig | None = None,
        *,
        regions: Regions | None = None,
        colors: np.ndarray | None = None,
    ) -> None:
        self.config = config or RenderConfig()
        cfg = self.config
        self.num_vertices = len(np.atleast_2d(neutral))
        neutral = self._checked_vertices(neutral, "neutral")
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
            raise RenderError(f"faces must be a non-empty (F, 3) index array, got {faces.shape}")
        if faces.min() < 0 or faces.max() >= self.num_vertices:
            raise RenderError(
                f"faces index vertices outside 0..{self.num_vertices - 1}: they belong to "
                "another mesh than the neutral face"
            )
        self._faces = faces
        # Vertex normal = sum of the adjacent triangles' area-weighted normals: one sparse product.
        rows = faces.ravel()
        cols = np.repeat(np.arange(len(faces)), 3)
        ones = np.ones(len(rows), dtype=np.float32)
        shape = (self.num_vertices, len(faces))
        self._incidence = sparse.csr_matrix((ones, (rows, cols)), shape=shape)

        focus = self._focus(regions)
        yaw, pitch = _CLOSE_UP_VIEW if focus is not None else (0.0, 0.0)
        rotation = _rotation(
            yaw if cfg.yaw is None else cfg.yaw, pitch if cfg.pitch is None else cfg.pitch
        )
        low, high = self._framed_box(neutral.astype(np.float64) @ rotation.T, focus)
        extent = high[:2] - low[:2]
        usable = 1.0 - 2.0 * cfg.margin
        scale = min(cfg.width * usable / extent[0], cfg.height * usable / extent[1])
        centre = (low + high) / 2.0
        # Pixel x grows to the right, pixel y downwards, depth away from the viewer.
        flip = np.diag([scale, -scale, -1.0])
        self._projection = (flip @ rotation).T.astype(np.float32)
        offset = np.array([cfg.width / 2, cfg.height / 2, 0.0]) - flip @ centre
        self._offset = offset.astype(np.float32)
        # Lighting happens in model space, so normals never need rotating per frame.
        light = np.asarray(cfg.light, dtype=np.float64)
        self._light = (rotation.T @ (light / np.linalg.norm(light))).astype(np.float32)
        self._towards_viewer = rotation.T[:, 2].astype(np.float32)
        if colors is not None:
            self._albedo = self._checked_colors(colors)
        elif regions is not None:
            self._albedo = face_colors(neutral, regions, cfg.palette).astype(np.float32)
        else:
            mesh_color = np.asarray(cfg.mesh_color, dtype=np.float32)
            self._albedo = np.broadcast_to(mesh_color, (self.num_vertices, 3))
        self._background = np.tile(np.array(cfg.background, dtype=np.uint8), cfg.width * cfg.height)

    def _focus(self, regions: Regions | None) -> np.ndarray | None:
        """Vertices of the config's ``focus`` regions that ``regions`` has; None if none."""
        names = [name for name in self.config.focus if regions is not None and name in regions]
        if not names:
            return None
        chosen = [_region_indices(name, regions[name], self.num_vertices) for name in names]
        chosen = np.concatenate(chosen)
        return chosen if len(chosen) else None

    def _framed_box(
        self, view: np.ndarray, focus: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Low and high corners of what the camera frames, in view coordinates (V, 3) ``view``."""
        framed = view if focus is None else view[focus]
        low, high = framed.min(axis=0), framed.max(axis=0)
        extent = high[:2] - low[:2]
        if not (extent > 0).all():
            seen = (
                "the neutral face has" if focus is None else f"the regions {self.config.focus} have"
            )
            raise RenderError(
                f"{seen} no extent in the image plane ({extent.tolist()} m across); "
                "give a real face, or change yaw/pitch so it is not seen edge-on"
            )
        if focus is not None:
            pad = self.config.focus_padding * extent.max()
            low[:2], high[:2] = low[:2] - pad, high[:2] + pad
        return low, high

    def render(self, vertices: np.ndarray, colors: np.ndarray | None = None) -> np.ndarray:
        """An (H, W, 3) uint8 image of the mesh at ``vertices`` (V, 3), Lambert-shaded.

        ``colors`` (V, 3), RGB 0–255, paints this frame's surface per vertex (e.g.
        :func:`error_colors`) instead of the renderer's own colours.
        """
        cfg = self.config
        v = self._checked_vertices(vertices, "vertices")
        albedo = self._albedo if colors is None else self._checked_colors(colors)
        corners = np.take(v, self._faces, axis=0)
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        if cfg.shading == "flat":
            lit = albedo[self._faces].mean(axis=1) * self._lambert(normals)[:, None]
            color = np.repeat(lit[:, None], 3, axis=1)
        else:
            lit = albedo * self._lambert(self._incidence @ normals)[:, None]
            color = np.take(lit, self._faces, axis=0)
        screen = np.take(v @ self._projection + self._offset, self._faces, axis=0)
        image = self._background.copy()
        self._draw(screen, color, image)
        return image.reshape(cfg.height, cfg.width, 3)

    def _lambert(self, normals: np.ndarray) -> np.ndarray:
        """Ambient + diffuse intensity of (N, 3) unnormalized normals, lit on both sides."""
        length = np.linalg.norm(normals, axis=1)
        facing = normals @ self._towards_viewer
        # The surface is open (lips, eyelids), so its back can show: turn normals to the viewer.
        sign = np.where(facing < 0, -1.0, 1.0).astype(np.float32)
        cosine = (normals @ self._light) * sign / np.maximum(length, 1e-20)
        ambient = self.config.ambient
        return ambient + (1.0 - ambient) * np.maximum(cosine, 0.0)

    def _draw(self, screen: np.ndarray, color: np.ndarray, image: np.ndarray) -> None:
        """Rasterize triangles into the flat RGB ``image``, nearest fragment per pixel.

        ``screen`` (F, 3, 3) holds each corner's pixel x, pixel y and depth, ``color`` (F, 3, 3)
        its RGB. Each triangle is cut into one span per pixel row and spans into pixels; depth
        and colour are affine over a triangle, so along a span they advance by a constant step.
        """
        width, height = self.config.width, self.config.height
        # Corners sorted top to bottom. A shared edge that is not horizontal is then walked from
        # the same end in both its triangles, so both find bit-identical crossings: no cracks.
        corner = np.arange(len(screen))[:, None] * 3 + np.argsort(screen[..., 1], axis=1)
        p = np.take(screen.reshape(-1, 3), corner, axis=0)
        rgb = np.take(color.reshape(-1, 3), corner, axis=0)
        x, y = p[..., 0], p[..., 1]
        e1, e2 = p[:, 1, :2] - p[:, 0, :2], p[:, 2, :2] - p[:, 0, :2]
        area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        # Triangles seen edge-on cover no area; dropping them avoids dividing by ~0.
        keep = np.abs(area) > 1e-6
        x, y, e1, e2, area = x[keep], y[keep], e1[keep], e2[keep], area[keep]
        values = np.concatenate([p[keep][..., 2:], rgb[keep]], axis=2)
        d1, d2 = values[:, 1] - values[:, 0], values[:, 2] - values[:, 0]
        # Depth and colour are affine in the pixel position: corner 0's value plus gradients.
        grad_x = (d1 * e2[:, 1:] - d2 * e1[:, 1:]) / area[:, None]
        grad_y = (d2 * e1[:, :1] - d1 * e2[:, :1]) / area[:, None]
        tri, row, left, count = _spans(x, y, width, height)
        total = int(count.sum())
        if total > _MAX_OVERDRAW * width * height:
            raise RenderError(
                f"the mesh would cover the image {total / (width * height):.0f} times over, so "
                "its triangles are tangled: check that the vertex order matches the topology"
            )
        # Rows of depth, red, green and blue: each quantity contiguous for the per-pixel work.
        affine = np.concatenate([values[:, 0].T, grad_x.T, grad_y.T])
        at_corner, step, down = np.split(np.take(affine, tri, axis=1), 3)
        x0, y0 = np.take(x[:, 0], tri), np.take(y[:, 0], tri)
        centre = row.astype(np.float32) + np.float32(0.5)
        first = left.astype(np.float32) + np.float32(0.5)
        start = at_corner + step * (first - x0) + down * (centre - y0)

        # Fragments: every pixel of every span; the nearest one per pixel wins.
        span = np.repeat(np.arange(len(count)), count)
        offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        pixel = np.take(row * width + left, span) + offset
        dx = offset.astype(np.float32)
        depth = np.take(start[0], span) + np.take(step[0], span) * dx
        nearest = np.full(width * height, np.inf, dtype=np.float32)
        np.minimum.at(nearest, pixel, depth)
        front = np.flatnonzero(depth <= np.take(nearest, pixel))
        span, dx, channel = np.take(span, front), np.take(dx, front), 3 * np.take(pixel, front)
        for k in range(3):
            value = np.take(start[k + 1], span) + np.take(step[k + 1], span) * dx
            image[channel + k] = np.clip(value + 0.5, 0, 255).astype(np.uint8)

    def _checked_vertices(self, vertices: np.ndarray, name: str) -> np.ndarray:
        v = np.asarray(vertices, dtype=np.float32)
        expected = (self.num_vertices, 3)
        if v.shape != expected:
            hint = "; render a clip frame by frame" if v.ndim == 3 else ""
            raise RenderError(
                f"{name} must be one frame of shape {expected} for this topology, "
                f"got {v.shape}{hint}"
            )
        if not np.isfinite(v).all():
            raise RenderError(f"{name} contain NaN or infinity")
        return v

    def _checked_colors(self, colors: np.ndarray) -> np.ndarray:
        try:
            c = np.asarray(colors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise RenderError(f"colors must be numeric per-vertex RGB values: {exc}") from None
        if c.shape != (self.num_vertices, 3):
            raise RenderError(
                f"colors must be per-vertex RGB of shape ({self.num_vertices}, 3), got {c.shape}"
            )
        if not (np.isfinite(c).all() and c.min() >= 0 and c.max() <= 255):
            raise RenderError("colors must be finite RGB values in 0..255")
        return c


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """The (3, 3) rotation turning a face by ``yaw`` degrees about y, then ``pitch`` about x."""
    yaw, pitch = math.radians(yaw), math.radians(pitch)
    turn = np.array(
        [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]]
    )
    tilt = np.array(
        [[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]]
    )
    return tilt @ turn


def _spans(
    x: np.ndarray, y: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Triangles (corners sorted top to bottom) cut into one span of pixels per image row.

    Returns per span its triangle, row, first column and pixel count (0 where none is covered).
    A pixel is covered when its centre (integer + 0.5) lies in the triangle or on its border.
    """
    half = np.float32(0.5)
    first_row = np.maximum(np.ceil(y[:, 0] - half), 0).astype(np.int64)
    last_row = np.minimum(np.floor(y[:, 2] - half), height - 1).astype(np.int64)
    rows = np.maximum(last_row - first_row + 1, 0)
    tri = np.repeat(np.arange(len(rows)), rows)
    row = np.arange(len(tri)) - np.repeat(np.cumsum(rows) - rows - first_row, rows)
    centre = row.astype(np.float32) + half
    # Edge slopes dx/dy of (0, 1), (1, 2) and (0, 2); a horizontal edge gets 0 and is then met
    # at its first end, which still bounds its row's span correctly.
    rise = y[:, [1, 2, 2]] - y[:, [0, 1, 0]]
    slope = (x[:, [1, 2, 2]] - x[:, [0, 1, 0]]) / np.where(rise > 0, rise, np.float32(1))
    # One gather per span of everything it needs (row gathers beat column-wise ones).
    x0, x1, _, y0, y1, _, slope01, slope12, slope02 = np.take(
        np.concatenate([x, y, slope], axis=1), tri, axis=0
    ).T
    # The long edge (0, 2) spans every row; the short one is (0, 1) above corner 1, (1, 2) below.
    short = np.where(centre >= y1, x1 + (centre - y1) * slope12, x0 + (centre - y0) * slope01)
    long = x0 + (centre - y0) * slope02
    left = np.maximum(np.ceil(np.minimum(short, long) - half), 0).astype(np.int64)
    right = np.minimum(np.floor(np.maximum(short, long) - half), width - 1).astype(np.int64)
    return tri, row, left, np.maximum(right - left + 1, 0)


def error_colors(errors: np.ndarray, vmax: float) -> np.ndarray:
    """Per-vertex colours (V, 3) uint8 of ``errors`` (V,) on a viridis ramp from 0 to ``vmax``."""
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 1 or not np.isfinite(e).all():
        raise RenderError(f"errors must be one finite value per vertex, shape (V,), got {e.shape}")
    if not (math.isfinite(vmax) and vmax > 0):
        raise RenderError(f"vmax must be a positive finite number, got {vmax}")
    position = np.clip(e / vmax, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    stops = np.arange(len(_VIRIDIS))
    ramp = [np.interp(position, stops, _VIRIDIS[:, k]) for k in range(3)]
    return np.rint(np.stack(ramp, axis=1)).astype(np.uint8)


def face_colors(
    neutral: np.ndarray, regions: Regions, palette: Palette | None = None
) -> np.ndarray:
    """Per-vertex base colours (V, 3) uint8 of a face (V, 3) from its named regions or parts.

    Skin; ``lips`` redder and ``eyes`` (eyelids) darker, fading in from their edges; a dark
    ``mouth_socket``; ``eye_socket*``; ``eyeball*`` white with an iris and pupil facing +z.
    """
    palette = palette or Palette()
    v = np.asarray(neutral, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or not np.isfinite(v).all():
        raise RenderError(f"neutral must be finite vertex positions (V, 3), got {v.shape}")
    colors = np.tile(np.asarray(palette.skin, dtype=np.float64), (len(v), 1))
    for key, how, paint in _REGION_PAINT:
        for name, indices in regions.items():
            if name != key and not name.startswith(key + "_"):
                continue
            chosen = _region_indices(name, indices, len(v))
            if len(chosen) == 0:
                continue
            if how == "eyeball":
                colors[chosen] = _eyeball_colors(v[chosen], palette)
                continue
            weight = _tint_weights(v, chosen)[:, None] if how == "tint" else 1.0
            colors[chosen] += weight * (np.asarray(getattr(palette, paint)) - colors[chosen])
    return np.rint(colors).astype(np.uint8)


def _region_indices(
    name: str, indices: Sequence[int] | np.ndarray | range, count: int
) -> np.ndarray:
    """The vertex indices of region ``name`` as an int array, checked against ``count`` vertices."""
    chosen = np.asarray(indices)
    if chosen.ndim != 1 or not (chosen.size == 0 or np.issubdtype(chosen.dtype, np.integer)):
        raise RenderError(
            f"region {name!r} must be a 1-D list of vertex indices, got {chosen.dtype} "
            f"{chosen.shape}"
        )
    if chosen.size and (chosen.min() < 0 or chosen.max() >= count):
        raise RenderError(
            f"region {name!r} indexes vertices outside 0..{count - 1}: it belongs to another "
            "mesh (a rig part's indices need the offset of that part in this mesh)"
        )
    return chosen.astype(np.int64)


def _tint_weights(vertices: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per chosen vertex, how strongly its region's tint shows: 0 at the edge, 1 well inside.

    Regions defined by motion thresholds have ragged edges, so the weight is the region's share
    of a Gaussian neighbourhood (of a width set by the region's depth), which rounds them off.
    """
    inside = np.zeros(len(vertices), dtype=bool)
    inside[chosen] = True
    if inside.all():
        return np.ones(len(chosen))
    depth, _ = cKDTree(vertices[~inside]).query(vertices[chosen])
    sigma = _TINT_BLUR * depth.max()
    if sigma <= 0:
        return np.ones(len(chosen))
    # A fixed random sample of a large mesh's vertices estimates the share as well, in bounded
    # time and memory (a 60k-vertex face would otherwise pair each lip vertex with ~1,000).
    sample = np.arange(len(vertices))
    if len(sample) > _TINT_SAMPLE:
        sample = np.sort(np.random.default_rng(0).choice(sample, _TINT_SAMPLE, replace=False))
    pairs = cKDTree(vertices[chosen]).sparse_distance_matrix(
        cKDTree(vertices[sample]), _TINT_REACH * sigma, output_type="ndarray"
    )
    kernel = np.exp(-0.5 * (pairs["v"] / sigma) ** 2)
    total = np.bincount(pairs["i"], kernel, minlength=len(chosen))
    within = np.bincount(pairs["i"], kernel * inside[sample][pairs["j"]], minlength=len(chosen))
    # Where the sample has no vertex in reach, nothing speaks against the region.
    share = np.divide(within, total, out=np.ones(len(chosen)), where=total > 0)
    low, high = _TINT_SHARE
    t = np.clip((share - low) / (high - low), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _eyeball_colors(points: np.ndarray, palette: Palette) -> np.ndarray:
    """Colours of an eyeball's vertices: sclera, with iris and pupil discs on its +z side."""
    low, high = points.min(axis=0), points.max(axis=0)
    centre, radius = (low + high) / 2.0, (high[0] - low[0]) / 2.0
    off_axis = np.hypot(*(points[:, :2] - centre[:2]).T) / max(radius, 1e-12)
    front = points[:, 2] > centre[2]
    colors = np.tile(np.asarray(palette.sclera, dtype=np.float64), (len(points), 1))
    colors[front & (off_axis < _IRIS_RADIUS)] = palette.iris
    colors[front & (off_axis < _PUPIL_RADIUS)] = palette.pupil
    return colors


def side_by_side(images: list[np.ndarray], labels: list[str] | None = None) -> np.ndarray:
    """Panels of equal height concatenated left to right, each labelled in its top-left corner."""
    if not images:
        raise RenderError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise RenderError(f"got {len(labels)} labels for {len(images)} images; give one per image")
    height = images[0].shape[0]
    for index, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RenderError(
                f"image {index} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
            )
        if image.shape[0] != height:
            raise RenderError(
                f"image {index} is {image.shape[0]} pixels high, image 0 is {height}; "
                "render every panel with the same height"
            )
    panels = [image.copy() for image in images]
    for panel, label in zip(panels, labels or [], strict=False):
        _draw_text(panel, label)
    return np.concatenate(panels, axis=1)


def comparison_frames(
    truth: np.ndarray,
    prediction: np.ndarray,
    renderer: Renderer,
    vmax: float | None = None,
) -> Iterator[np.ndarray]:
    """Frames of ground truth | prediction | per-vertex error on the ground-truth surface.

    The error is the L2 distance per vertex per frame; its colour scale runs from 0 to ``vmax``
    metres for the whole clip (default: the clip's largest error), printed in millimetres.
    """
    truth = np.asarray(truth, dtype=np.float32)
    prediction = np.asarray(prediction, dtype=np.float32)
    shape = (renderer.num_vertices, 3)
    if truth.ndim != 3 or truth.shape[1:] != shape or truth.shape != prediction.shape:
        raise RenderError(
            f"truth and prediction must both be (T, {shape[0]}, 3) for this topology, got "
            f"{truth.shape} and {prediction.shape}"
        )
    if len(truth) == 0:
        raise RenderError("truth and prediction have no frames")
    if vmax is not None and not (math.isfinite(vmax) and vmax > 0):
        raise RenderError(f"vmax must be a positive finite number of metres, got {vmax}")
    errors = np.linalg.norm(prediction - truth, axis=-1)
    if not np.isfinite(errors).all():
        raise RenderError("truth or prediction contain NaN or infinity")
    # An exact match still needs a non-empty colour scale: 1 µm shows it as all-zero error.
    scale = vmax if vmax is not None else max(float(errors.max()), 1e-6)
    labels = ["ground truth", "prediction", f"error 0-{scale * 1000:.3g} mm"]
    return (
        side_by_side(
            [
                renderer.render(truth[t]),
                renderer.render(prediction[t]),
                renderer.render(truth[t], error_colors(errors[t], scale)),
            ],
            labels,
        )
        for t in range(len(truth))
    )


def _draw_text(image: np.ndarray, text: str) -> None:
    """Write ``text`` (upper-cased; unknown characters as ?) into the top-left corner, in place."""
    if not text:
        return
    scale = max(1, image.shape[0] // 160)
    rows = np.array([[int(r) for r in _GLYPHS.get(char, _GLYPHS["?"])] for char in text.upper()])
    bits = (rows[:, :, None] >> np.array([2, 1, 0])) & 1
    # A blank column after each glyph separates the characters.
    bits = np.pad(bits, ((0, 0), (0, 0), (0, 1)))
    mask = bits.transpose(1, 0, 2).reshape(5, -1).astype(bool)
    mask = np.kron(mask, np.ones((scale, scale), dtype=bool))
    top = left = 2 * scale
    mask = mask[: max(image.shape[0] - top, 0), : max(image.shape[1] - left, 0)]
    region = image[top : top + mask.shape[0], left : left + mask.shape[1]]
    # Dark text on light backgrounds, light text on dark ones.
    bright = region.size > 0 and region.mean() > 128
    region[mask] = (0, 0, 0) if bright else (255, 255, 255)


def comparison_still(
    truth: np.ndarray,
    prediction: np.ndarray,
    faces: np.ndarray,
    config: RenderConfig | None = None,
    *,
    regions: Regions | None = None,
) -> np.ndarray:
    """The comparison frame where the ground truth moves most from its first frame (chosen by
    the truth alone, so it shows the model where the speech demands most), on the clip's own
    colour scale."""
    truth = np.asarray(truth, dtype=np.float32)
    prediction = np.asarray(prediction, dtype=np.float32)
    if truth.ndim != 3 or len(truth) == 0 or truth.shape != prediction.shape:
        raise RenderError(f"truth and prediction must be equal (T, V, 3), got {truth.shape} "
                          f"and {prediction.shape}")  # fmt: skip
    scale = max(float(np.linalg.norm(prediction - truth, axis=-1).max()), 1e-6)
    peak = int(np.linalg.norm(truth - truth[0], axis=-1).max(axis=1).argmax())
    renderer = Renderer(faces, truth[0], config, regions=regions)
    return next(
        comparison_frames(truth[peak : peak + 1], prediction[peak : peak + 1], renderer, scale)
    )


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
    return path
