"""The two data types everything else speaks: a mesh topology and an audio–mesh sequence."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mmtalker.errors import DatasetError, TemplateError

#: Regions every topology carries; the metrics and the loss weights are defined on them.
REQUIRED_REGIONS = ("lips", "eyes", "upper_face", "face")


@dataclass(frozen=True, eq=False)
class DisplayMap:
    """How this topology's surface sits in a larger display mesh (e.g. the full ICT head).

    ``mesh`` names the display mesh (``ict_head``: :func:`mmtalker.rig.load_ict`). Its vertices
    ``animated`` (P,) lie on this topology at ``triangles`` (P,) with ``barycentric`` (P, 3): a
    model trained here animates them through its chart; the display mesh's other vertices stay
    still. This topology's own vertex i lies on the display mesh at ``source_triangles[i]`` with
    ``source_barycentric[i]``, which turns a display-mesh neutral head into this topology's.
    """

    mesh: str
    animated: np.ndarray
    triangles: np.ndarray
    barycentric: np.ndarray
    source_triangles: np.ndarray
    source_barycentric: np.ndarray

    def __post_init__(self) -> None:
        p = len(self.animated)
        if self.triangles.shape != (p,) or self.barycentric.shape != (p, 3):
            raise TemplateError(
                f"display map: {p} animated vertices need triangles ({p},) and barycentric "
                f"({p}, 3), got {self.triangles.shape} and {self.barycentric.shape}"
            )
        if self.source_barycentric.shape != (*self.source_triangles.shape, 3):
            raise TemplateError("display map: source triangles and barycentrics disagree")


@dataclass(frozen=True, eq=False)
class Topology:
    """Triangle faces shared by every mesh of a dataset, with named vertex regions and a UV chart.

    ``uv`` is the slot for the chart computed by ``mmtalker.geometry``; it is ``None`` until then.
    ``display``, when set, places the topology in a larger mesh to animate (see
    :class:`DisplayMap`).
    """

    faces: np.ndarray
    num_vertices: int
    regions: Mapping[str, np.ndarray]
    uv: np.ndarray | None = None
    display: DisplayMap | None = None
    id: str = field(init=False)

    def __post_init__(self) -> None:
        faces = np.ascontiguousarray(self.faces, dtype=np.int32)
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
            raise TemplateError(f"faces must be a non-empty (F, 3) array, got {faces.shape}")
        if faces.min() < 0 or faces.max() >= self.num_vertices:
            raise TemplateError(
                f"faces index vertices outside 0..{self.num_vertices - 1}; "
                "the faces do not belong to this vertex count"
            )
        missing = [name for name in REQUIRED_REGIONS if name not in self.regions]
        if missing:
            raise TemplateError(
                f"topology lacks the regions {missing}; give vertex index lists for "
                f"{list(REQUIRED_REGIONS)}"
            )
        regions = {
            name: _region_indices(name, idx, self.num_vertices)
            for name, idx in self.regions.items()
        }
        uv = None
        if self.uv is not None:
            uv = np.ascontiguousarray(self.uv, dtype=np.float32)
            if uv.shape != (self.num_vertices, 2):
                raise TemplateError(f"uv must be ({self.num_vertices}, 2), got {uv.shape}")
        if self.display is not None and len(self.display.source_triangles) != self.num_vertices:
            raise TemplateError(
                f"display map locates {len(self.display.source_triangles)} vertices, the "
                f"topology has {self.num_vertices}"
            )
        object.__setattr__(self, "faces", faces)
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "uv", uv)
        digest = hashlib.sha256(faces.tobytes())
        digest.update(str(self.num_vertices).encode())
        object.__setattr__(self, "id", digest.hexdigest()[:16])

    def region(self, name: str) -> np.ndarray:
        """Vertex indices of a named region."""
        if name not in self.regions:
            raise TemplateError(
                f"unknown region {name!r}; this topology has {sorted(self.regions)}"
            )
        return self.regions[name]

    def with_uv(self, uv: np.ndarray) -> Topology:
        """A copy of this topology carrying a UV chart."""
        return Topology(self.faces, self.num_vertices, self.regions, uv, self.display)

    def to_npz(self) -> bytes:
        """Serialise to an ``.npz`` payload (plain arrays only, loadable without pickle)."""
        arrays = {"faces": self.faces, "num_vertices": np.array(self.num_vertices)}
        arrays.update({f"region_{name}": idx for name, idx in self.regions.items()})
        if self.uv is not None:
            arrays["uv"] = self.uv
        if self.display is not None:
            arrays["display_mesh"] = np.array(self.display.mesh)
            for name in _DISPLAY_ARRAYS:
                arrays[f"display_{name}"] = getattr(self.display, name)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, payload: bytes) -> Topology:
        """Inverse of :meth:`to_npz`."""
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                regions = {
                    k.removeprefix("region_"): data[k]
                    for k in data.files
                    if k.startswith("region_")
                }
                uv = data["uv"] if "uv" in data.files else None
                display = None
                if "display_mesh" in data.files:
                    display = DisplayMap(
                        str(data["display_mesh"]),
                        **{name: data[f"display_{name}"] for name in _DISPLAY_ARRAYS},
                    )
                return cls(data["faces"], int(data["num_vertices"]), regions, uv, display)
        except (OSError, KeyError, ValueError) as exc:
            raise DatasetError(f"topology payload is not a valid topology .npz: {exc}") from exc


_DISPLAY_ARRAYS = ("animated", "triangles", "barycentric", "source_triangles", "source_barycentric")


def _region_indices(name: str, indices: object, num_vertices: int) -> np.ndarray:
    idx = np.unique(np.asarray(indices, dtype=np.int64))
    if idx.size == 0:
        raise TemplateError(f"region {name!r} is empty")
    if idx[0] < 0 or idx[-1] >= num_vertices:
        raise TemplateError(f"region {name!r} has vertex indices outside 0..{num_vertices - 1}")
    return idx.astype(np.int32)


@dataclass(frozen=True, eq=False)
class Sequence:
    """One utterance: mono float32 audio and the vertex positions (T, V, 3) it drives.

    ``controls`` (T, C), when the corpus has them, are the rig weights per frame that made the
    vertices (e.g. ARKit blendshape weights; their names are in the dataset manifest).
    ``phones`` (T,), when the corpus knows them, are the phone class spoken at each frame
    (indices into the manifest's ``phone_names``).
    """

    sequence_id: str
    speaker: str
    sentence_id: str
    audio: np.ndarray
    sample_rate: int
    vertices: np.ndarray
    fps: float
    text: str = ""
    controls: np.ndarray | None = None
    phones: np.ndarray | None = None

    def __post_init__(self) -> None:
        audio = np.ascontiguousarray(self.audio, dtype=np.float32)
        vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise DatasetError(
                f"{self.sequence_id}: audio must be non-empty mono, got {audio.shape}"
            )
        if vertices.ndim != 3 or vertices.shape[2] != 3 or vertices.shape[0] == 0:
            raise DatasetError(
                f"{self.sequence_id}: vertices must be (T, V, 3) with T > 0, got {vertices.shape}"
            )
        if self.sample_rate <= 0 or self.fps <= 0:
            raise DatasetError(f"{self.sequence_id}: sample rate and fps must be positive")
        if not (np.isfinite(audio).all() and np.isfinite(vertices).all()):
            raise DatasetError(f"{self.sequence_id}: audio or vertices contain NaN or infinity")
        object.__setattr__(self, "audio", audio)
        object.__setattr__(self, "vertices", vertices)
        if self.controls is not None:
            controls = np.ascontiguousarray(self.controls, dtype=np.float32)
            if controls.ndim != 2 or len(controls) != len(vertices):
                raise DatasetError(
                    f"{self.sequence_id}: controls must be (T, C) with T = {len(vertices)} "
                    f"frames, got {controls.shape}"
                )
            if not np.isfinite(controls).all():
                raise DatasetError(f"{self.sequence_id}: controls contain NaN or infinity")
            object.__setattr__(self, "controls", controls)
        if self.phones is not None:
            phones = np.asarray(self.phones)
            if phones.shape != (len(vertices),) or not np.issubdtype(phones.dtype, np.integer):
                raise DatasetError(
                    f"{self.sequence_id}: phones must be {len(vertices)} integer classes, one per "
                    f"frame, got {phones.dtype} {phones.shape}"
                )
            if phones.size and phones.min() < 0:
                raise DatasetError(f"{self.sequence_id}: phone classes must be >= 0")
            object.__setattr__(self, "phones", phones.astype(np.int16))

    @property
    def num_frames(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[1])

    @property
    def duration(self) -> float:
        """Audio length in seconds."""
        return self.audio.size / self.sample_rate


def frame_samples(num_frames: int, samples_per_frame: float) -> int:
    """Audio samples that ``num_frames`` frames span.

    Speech encoders spread the frames they are asked for evenly over the audio they are given,
    so a clip's audio is padded to this length before encoding: audio ending inside its last
    frame (a corpus's usual case) would otherwise draw every frame's features from earlier
    speech, up to a frame early by the clip's end.
    """
    return round(num_frames * samples_per_frame)


def pad_to_frames(audio: np.ndarray, num_frames: int, samples_per_frame: float) -> np.ndarray:
    """A copy of ``audio`` with zeros appended up to :func:`frame_samples` (never shortened)."""
    return np.pad(audio, (0, max(frame_samples(num_frames, samples_per_frame) - len(audio), 0)))


def displacement_squares(vertices: np.ndarray, template: np.ndarray) -> tuple[float, int]:
    """Sum of squared displacements of frames (T, V, 3) from a template (V, 3), and how many
    values it sums: the parts of a root-mean-square displacement that add across sequences."""
    disp = vertices - template[None]
    return float(np.square(disp, dtype=np.float64).sum()), disp.size
