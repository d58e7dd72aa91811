"""A linear face rig (neutral + expression shapes + identity modes) and the committed ICT head.

A face with identity weights ``a`` (K,) and expression weights ``w`` (S,) is
``neutral + a @ identity_modes + w @ shapes`` (each flattened over vertices): both sums are
linear, so a speaker's rig is the generic rig with its neutral moved by ``a @ identity_modes``
(:meth:`Rig.with_identity`) and the same expression shapes. Positions are metres, +y up, +z out
of the face.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np

from mmtalker.errors import RigError

ICT_ASSET = "ict_face.npz"
#: The ICT head's part holding the animated face area (lips, eyelids, cheeks, brows, ears, neck).
FACE_PART = "face"


@dataclass(frozen=True)
class Part:
    """A named piece of a rig's mesh: contiguous vertex and triangle index ranges."""

    vertices: range
    triangles: range


@dataclass(frozen=True, eq=False)
class Rig:
    """Neutral head (V, 3), named expression shapes (S, V, 3), identity modes (K, V, 3), faces.

    Shapes and modes are displacements from ``neutral`` per unit weight, float32, metres.
    """

    neutral: np.ndarray
    faces: np.ndarray
    shape_names: tuple[str, ...]
    shapes: np.ndarray
    identity_modes: np.ndarray
    parts: Mapping[str, Part]

    def __post_init__(self) -> None:
        neutral = np.ascontiguousarray(self.neutral, dtype=np.float32)
        if neutral.ndim != 2 or neutral.shape[1] != 3 or not np.isfinite(neutral).all():
            raise RigError(f"neutral must be finite (V, 3), got shape {neutral.shape}")
        v = len(neutral)
        faces = np.ascontiguousarray(self.faces, dtype=np.int32)
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
            raise RigError(f"faces must be a non-empty (F, 3) array, got {faces.shape}")
        if faces.min() < 0 or faces.max() >= v:
            raise RigError(f"faces index vertices outside 0..{v - 1}")
        shapes = np.ascontiguousarray(self.shapes, dtype=np.float32)
        names = tuple(str(n) for n in self.shape_names)
        if shapes.shape != (len(names), v, 3):
            raise RigError(
                f"shapes must be ({len(names)}, {v}, 3) for the names, got {shapes.shape}"
            )
        if len(set(names)) != len(names):
            raise RigError(f"shape names must be unique, got {names}")
        modes = np.ascontiguousarray(self.identity_modes, dtype=np.float32)
        if modes.ndim != 3 or modes.shape[1:] != (v, 3):
            raise RigError(f"identity_modes must be (K, {v}, 3), got {modes.shape}")
        for name, part in self.parts.items():
            if part.vertices.stop > v or part.triangles.stop > len(faces):
                raise RigError(f"part {name!r} reaches past the mesh ({v} vertices)")
        object.__setattr__(self, "neutral", neutral)
        object.__setattr__(self, "faces", faces)
        object.__setattr__(self, "shape_names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "identity_modes", modes)
        object.__setattr__(self, "parts", dict(self.parts))

    @property
    def num_vertices(self) -> int:
        return len(self.neutral)

    @property
    def num_shapes(self) -> int:
        return len(self.shape_names)

    @property
    def num_identity_modes(self) -> int:
        return len(self.identity_modes)

    def shape(self, name: str) -> np.ndarray:
        """The displacement (V, 3) of the expression shape ``name`` at weight 1."""
        return self.shapes[self.shape_index(name)]

    def shape_index(self, name: str) -> int:
        """Index of the expression shape ``name``."""
        if name not in self.shape_names:
            raise RigError(f"unknown shape {name!r}; this rig has {list(self.shape_names)}")
        return self.shape_names.index(name)

    def compose(self, expression: np.ndarray, identity: np.ndarray | None = None) -> np.ndarray:
        """Vertices for expression weights (S,) → (V, 3), or (T, S) → (T, V, 3), in one product.

        ``identity`` (K,) moves the neutral first: ``neutral + identity @ modes + w @ shapes``.
        """
        w = np.asarray(expression, dtype=np.float32)
        if w.ndim not in (1, 2) or w.shape[-1] != self.num_shapes or not np.isfinite(w).all():
            raise RigError(
                f"expression weights must be finite (S,) or (T, S) with S = {self.num_shapes}, "
                f"got {w.shape}"
            )
        base = self.neutral if identity is None else self.with_identity(identity).neutral
        motion = w.reshape(-1, self.num_shapes) @ self.shapes.reshape(self.num_shapes, -1)
        frames = base + motion.reshape(-1, self.num_vertices, 3)
        return frames[0] if w.ndim == 1 else frames

    def with_identity(self, weights: np.ndarray) -> Rig:
        """This rig with its neutral moved by ``weights @ identity_modes`` (weights (K,))."""
        a = np.asarray(weights, dtype=np.float32)
        if a.shape != (self.num_identity_modes,) or not np.isfinite(a).all():
            raise RigError(
                f"identity weights must be finite ({self.num_identity_modes},), got {a.shape}"
            )
        moved = self.identity_modes.reshape(len(a), -1).T @ a
        return self.with_neutral(self.neutral + moved.reshape(-1, 3))

    def identity_weights(self, seed: int, scale: float = 1.0) -> np.ndarray:
        """Identity weights (K,) drawn from N(0, scale²) by ``seed``: a plausible random person."""
        return (
            scale * np.random.default_rng(seed).standard_normal(self.num_identity_modes)
        ).astype(np.float32)

    def identity(self, seed: int, scale: float = 1.0) -> Rig:
        """The rig of the random person :meth:`identity_weights` draws for ``seed``."""
        return self.with_identity(self.identity_weights(seed, scale))

    def with_neutral(self, neutral: np.ndarray) -> Rig:
        """This rig on another neutral head of the same topology (e.g. a user's fitted head)."""
        neutral = np.asarray(neutral, dtype=np.float32)
        if neutral.shape != self.neutral.shape:
            raise RigError(
                f"a neutral head for this rig must be {self.neutral.shape}, got {neutral.shape}"
            )
        return Rig(
            neutral, self.faces, self.shape_names, self.shapes, self.identity_modes, self.parts
        )

    def subset(self, *names: str) -> Rig:
        """The rig of the named parts only, in the given order; vertices and faces renumbered."""
        unknown = [n for n in names if n not in self.parts]
        if unknown or not names:
            raise RigError(
                f"unknown parts {unknown or '(none given)'}; this rig has {list(self.parts)}"
            )
        chosen = [self.parts[n] for n in names]
        vertices = np.concatenate([np.arange(p.vertices.start, p.vertices.stop) for p in chosen])
        renumber = np.full(self.num_vertices, -1, dtype=np.int64)
        renumber[vertices] = np.arange(len(vertices))
        triangles = np.concatenate(
            [self.faces[p.triangles.start : p.triangles.stop] for p in chosen]
        )
        faces = renumber[triangles]
        if (faces < 0).any():
            raise RigError(f"the triangles of parts {list(names)} use vertices of other parts")
        parts, v0, t0 = {}, 0, 0
        for name, p in zip(names, chosen, strict=True):
            parts[name] = Part(range(v0, v0 + len(p.vertices)), range(t0, t0 + len(p.triangles)))
            v0, t0 = v0 + len(p.vertices), t0 + len(p.triangles)
        return Rig(
            self.neutral[vertices],
            faces,
            self.shape_names,
            self.shapes[:, vertices],
            self.identity_modes[:, vertices],
            parts,
        )


def load_ict() -> Rig:
    """The ICT head committed with the package (ICT-FaceKit light model, MIT; see assets/).

    17,202 vertices in 7 parts, 53 ARKit-named expression shapes, 100 identity modes; reads a
    10.6 MB compressed npz without unpickling anything (about 0.2 s).
    """
    asset = resources.files("mmtalker.rig") / "assets" / ICT_ASSET
    try:
        with asset.open("rb") as stream, np.load(stream, allow_pickle=False) as data:
            ranges = zip(data["part_vertices"], data["part_triangles"], strict=True)
            parts = {
                str(name): Part(range(*map(int, v)), range(*map(int, t)))
                for name, (v, t) in zip(data["part_names"], ranges, strict=True)
            }
            return Rig(
                data["neutral"],
                data["faces"],
                tuple(str(n) for n in data["shape_names"]),
                data["shapes"].astype(np.float32),
                data["identity_modes"].astype(np.float32),
                parts,
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise RigError(
            f"the packaged ICT head {ICT_ASSET} cannot be read ({exc}); reinstall mmtalker or "
            "rebuild it with `python -m mmtalker.rig.convert`"
        ) from exc
