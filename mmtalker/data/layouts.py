"""Readers that turn third-party corpora on local disk into mmtalker datasets.

Each :class:`Layout` in :data:`REGISTRY` describes one corpus layout by its properties (file
naming, native frame rate, topology mesh names, standard split) and two strategies (how to find
its items, how to load its templates); :func:`prepare_dataset` is the same for all of them.

* ``vocaset``: VOCASET as processed by FaceFormer/CodeTalker (``wav/``, ``vertices_npy/`` at
  60 fps, ``templates.pkl``), subsampled to 30 fps, with FaceFormer's subject split.
* ``biwi``: FaceFormer's BIWI (same folders, 25 fps) with the BIWI-Test-A protocol. That protocol
  splits by sentence, so val and test hold the training speakers, unlike the synthetic corpus,
  whose val and test speakers are unseen.
* ``folder``: own data, ``ROOT/**/NAME.wav`` with ``NAME.npy`` or a ``NAME/`` folder of OBJ
  frames next to it, one speaker per folder, ``template.obj``/``template.ply`` per speaker or root.

A bad item (missing mesh, unreadable audio, wrong vertex count, NaNs) never stops a conversion:
it is skipped and returned in :class:`PrepareReport` with the reason.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import soxr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmtalker.data.face import load_template
from mmtalker.data.sequence import REQUIRED_REGIONS, Sequence, Topology
from mmtalker.data.shards import DatasetManifest, DatasetWriter
from mmtalker.errors import DatasetError
from mmtalker.storage import S3Settings

DEFAULT_FPS = 30.0
DEFAULT_SPEAKER = "default"
MESH_SUFFIXES = (".obj", ".ply")
#: Folders and template file of the FaceFormer-processed corpora (VOCASET and BIWI).
AUDIO_DIR, VERTICES_DIR, TEMPLATES_PKL = "wav", "vertices_npy", "templates.pkl"
MASKS_JSON = "masks.json"
#: CodeTalker's region files (comma- or whitespace-separated vertex indices) in ``ROOT/regions``.
REGION_FILES = {"lips": "lve.txt", "upper_face": "fdd.txt", "eyes": "eve.txt"}

# Only what numpy needs to rebuild arrays (and dicts, which need no global at all).
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 stores an array's bytes at protocol 2
    }
)


class PrepareOptions(BaseModel):
    """How to read a corpus; ``fps`` and the speaker splits are for layouts without a protocol."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["vocaset", "biwi", "folder"]
    topology: str | None = None
    masks: str | None = None
    fps: float | None = Field(None, gt=0)
    val_speakers: list[str] = []
    test_speakers: list[str] = []
    sample_rate: int = Field(16000, ge=8000)

    @model_validator(mode="after")
    def _fits_layout(self) -> PrepareOptions:
        layout = REGISTRY[self.layout]
        if self.fps is not None and layout.native_fps is not None:
            raise ValueError(
                f"the {self.layout} meshes are stored at {layout.native_fps:g} fps and become "
                f"{layout.fps(self):g} fps; drop the fps option (it is for the folder layout)"
            )
        if layout.protocol and (self.val_speakers or self.test_speakers):
            raise ValueError(
                f"{self.layout} uses the {layout.protocol_name}; drop val_speakers and "
                "test_speakers (they are for the folder layout)"
            )
        both = sorted(set(self.val_speakers) & set(self.test_speakers))
        if both:
            raise ValueError(f"speakers {both} are in both val_speakers and test_speakers")
        return self


@dataclass
class PrepareReport:
    """The written dataset's manifest and the items left out, as ``(item, reason)`` pairs."""

    manifest: DatasetManifest
    skipped: list[tuple[str, str]]


@dataclass(frozen=True)
class SplitRule:
    """Items of these speakers whose sentence number lies in ``sentences`` belong to ``split``."""

    split: str
    speakers: frozenset[str]
    sentences: range


@dataclass(frozen=True)
class _Item:
    """One audio–mesh pair found on disk; ``problem`` is set when it is known to be unusable."""

    name: str
    sequence_id: str
    speaker: str
    sentence_id: str
    wav: Path | None
    mesh: Path | None
    split: str | None
    problem: str | None = None


@dataclass(frozen=True)
class _Templates:
    """The shared topology, each speaker's neutral vertices, and why a speaker has none."""

    topology: Topology
    vertices: dict[str, np.ndarray]
    problems: dict[str, str]


@dataclass(frozen=True)
class Layout:
    """One corpus layout: its properties and the two strategies that read it."""

    name: str
    description: str
    discover: Callable[[Layout, Path, PrepareOptions], list[_Item]]
    load_templates: Callable[[Layout, Path, PrepareOptions, list[_Item]], _Templates]
    topology_candidates: tuple[str, ...]
    stem_pattern: re.Pattern[str] | None = None
    example: str = ""
    protocol_name: str = ""
    protocol: tuple[SplitRule, ...] = ()
    native_fps: float | None = None
    frame_step: int = 1

    def fps(self, options: PrepareOptions) -> float:
        """Frame rate of the converted sequences."""
        if self.native_fps is None:
            return options.fps or DEFAULT_FPS
        return self.native_fps / self.frame_step

    def split_of(self, speaker: str, number: int) -> str | None:
        """The protocol's split for a speaker's numbered sentence, or None if it is not used."""
        rules = (r for r in self.protocol if speaker in r.speakers and number in r.sentences)
        return next((r.split for r in rules), None)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _discover_processed(layout: Layout, root: Path, options: PrepareOptions) -> list[_Item]:
    """Pair ``wav/STEM.wav`` with ``vertices_npy/STEM.npy``; either one alone is reported."""
    audio_dir, vertices_dir = root / AUDIO_DIR, root / VERTICES_DIR
    if not audio_dir.is_dir():
        raise DatasetError(
            f"{root} has no {AUDIO_DIR}/ folder; a {layout.description} root holds "
            f"{AUDIO_DIR}/, {VERTICES_DIR}/ and {TEMPLATES_PKL}"
        )
    wavs = {p.stem: p for p in audio_dir.iterdir() if p.suffix.lower() == ".wav"}
    meshes = {p.stem: p for p in vertices_dir.glob("*.npy")} if vertices_dir.is_dir() else {}
    assert layout.stem_pattern is not None, "processed layouts name their files by a pattern"
    items = []
    for stem in sorted(wavs.keys() | meshes.keys()):
        wav, mesh = wavs.get(stem), meshes.get(stem)
        name = _relative(wav or mesh, root)
        match = layout.stem_pattern.fullmatch(stem)
        if match is None:
            problem = (
                f"file name does not follow the {layout.description} naming ({layout.example})"
            )
            items.append(_Item(name, stem, "", stem, wav, mesh, None, problem))
            continue
        speaker, number = match["speaker"], int(match["number"])
        split = layout.split_of(speaker, number)
        problem = None
        if wav is None:
            problem = f"no audio: expected {AUDIO_DIR}/{stem}.wav"
        elif mesh is None:
            problem = f"no mesh: expected {VERTICES_DIR}/{stem}.npy"
        elif split is None:
            problem = f"not in the {layout.protocol_name} ({speaker}, sentence {number})"
        items.append(_Item(name, stem, speaker, match["sentence"], wav, mesh, split, problem))
    return items


def _discover_folder(layout: Layout, root: Path, options: PrepareOptions) -> list[_Item]:
    """Every ``NAME.wav`` under the root with its mesh; a ``.npy`` without a wav is reported."""
    wavs = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".wav" and p.is_file())
    items = []
    for wav in wavs:
        rel = wav.relative_to(root)
        speaker = rel.parent.as_posix() if rel.parent != Path() else DEFAULT_SPEAKER
        npy, frames = wav.with_suffix(".npy"), wav.with_suffix("")
        mesh = npy if npy.is_file() else frames if frames.is_dir() else None
        chosen = (("val", options.val_speakers), ("test", options.test_speakers))
        split = next((name for name, group in chosen if speaker in group), "train")
        problem = None
        if mesh is None:
            problem = f"no mesh: expected {wav.stem}.npy or a {wav.stem}/ folder of OBJ frames"
        sequence_id = rel.with_suffix("").as_posix()
        items.append(
            _Item(rel.as_posix(), sequence_id, speaker, wav.stem, wav, mesh, split, problem)
        )
    with_audio = {w.with_suffix("") for w in wavs}
    for npy in sorted(root.rglob("*.npy")):
        if npy.with_suffix("") not in with_audio:
            problem = f"no audio: expected {npy.stem}.wav next to it"
            items.append(
                _Item(_relative(npy, root), npy.stem, "", npy.stem, None, npy, None, problem)
            )
    speakers = {item.speaker for item in items if item.wav is not None}
    unknown = sorted(set(options.val_speakers + options.test_speakers) - speakers)
    if unknown:
        raise DatasetError(
            f"val/test speakers {unknown} have no wav files in {root}; speakers are the folder "
            f"names relative to the root: {sorted(speakers)}"
        )
    return items


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts of numpy arrays and nothing else, so a pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        # Pickles from numpy 1 name numpy.core, which numpy 2 keeps only as a deprecated alias.
        canonical = re.sub(r"^numpy\.core(?=\.|$)", "numpy._core", module)
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise DatasetError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed, since "
                "other objects can run code on load; re-save the file as a dict of arrays"
            )
        return super().find_class(canonical, name)


def load_array_pickle(path: Path) -> Any:
    """Unpickle a file that may hold only (dicts of) numpy arrays, Python 2 pickles included."""
    try:
        with path.open("rb") as handle:
            # latin1 turns Python 2 byte strings into the raw array buffers numpy expects.
            return _ArrayUnpickler(handle, encoding="latin1").load()
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except Exception as exc:  # a corrupt pickle fails with many unrelated exception types
        raise DatasetError(f"{path} is not a readable pickle: {exc}") from exc


def _as_vertices(value: object, num_vertices: int) -> np.ndarray | str:
    """A (V, 3) float32 array, or the reason ``value`` is not one."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return f"is a {type(value).__name__}, not a numeric array"
    if array.size != num_vertices * 3:
        return f"has shape {array.shape}, expected ({num_vertices}, 3) to match the topology"
    if not np.isfinite(array).all():
        return "contains NaN or infinity"
    return array.reshape(num_vertices, 3)


def _find_mesh(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _processed_templates(
    layout: Layout, root: Path, options: PrepareOptions, items: list[_Item]
) -> _Templates:
    """Faces and masks from the topology mesh, one neutral mesh per subject from the pickle."""
    pkl = root / TEMPLATES_PKL
    if not pkl.is_file():
        raise DatasetError(
            f"{root} has no {TEMPLATES_PKL}; it is the pickled dict subject -> (V, 3) neutral "
            f"mesh that comes with the {layout.description} data"
        )
    raw = load_array_pickle(pkl)
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{pkl} holds a {type(raw).__name__}; expected a dict subject -> (V, 3) array"
        )
    mesh = (
        Path(options.topology) if options.topology else _find_mesh(root, layout.topology_candidates)
    )
    if mesh is None:
        raise DatasetError(
            f"no topology mesh in {root} (looked for {', '.join(layout.topology_candidates)}); "
            "pass --topology MESH, a mesh with the corpus' vertex order that gives the faces"
        )
    topology = load_template(mesh, _load_masks(root, options)).topology
    vertices, problems = {}, {}
    for speaker in sorted({item.speaker for item in items}):
        if speaker not in raw:
            problems[speaker] = f"{TEMPLATES_PKL} has no template for {speaker}"
            continue
        result = _as_vertices(raw[speaker], topology.num_vertices)
        if isinstance(result, str):
            problems[speaker] = f"template of {speaker} in {TEMPLATES_PKL} {result}"
        else:
            vertices[speaker] = result
    return _Templates(topology, vertices, problems)


def _folder_templates(
    layout: Layout, root: Path, options: PrepareOptions, items: list[_Item]
) -> _Templates:
    """Each speaker's own template, else the root one; faces from --topology or those files."""
    folders = {item.speaker: item.wav.parent for item in items if item.wav is not None}
    shared = _find_mesh(root, layout.topology_candidates)
    own = {s: _find_mesh(f, layout.topology_candidates) or shared for s, f in folders.items()}
    found = sorted(p for p in own.values() if p is not None)
    mesh = Path(options.topology) if options.topology else shared or next(iter(found), None)
    if mesh is None:
        raise DatasetError(
            f"no template mesh: put {' or '.join(layout.topology_candidates)} in {root} (shared) "
            "or in each speaker folder, or pass --topology MESH"
        )
    topology = load_template(mesh, _load_masks(root, options)).topology
    vertices, problems = {}, {}
    for speaker, path in sorted(own.items()):
        if path is None:
            problems[speaker] = (
                f"no {' or '.join(layout.topology_candidates)} in "
                f"{_relative(folders[speaker], root)}/ or in the root"
            )
            continue
        try:
            result = _as_vertices(_read_mesh(path), topology.num_vertices)
        except DatasetError as exc:
            result = str(exc)
        if isinstance(result, str):
            problems[speaker] = f"template {_relative(path, root)} {result}"
        else:
            vertices[speaker] = result
    return _Templates(topology, vertices, problems)


def _load_masks(root: Path, options: PrepareOptions) -> dict[str, list[int]]:
    """Region masks from ``--masks``, ``ROOT/masks.json`` or CodeTalker's ``ROOT/regions``."""
    path = Path(options.masks) if options.masks else root / MASKS_JSON
    if options.masks or path.is_file():
        return _masks_from_json(path)
    if (root / "regions").is_dir():
        return _masks_from_regions(root / "regions")
    raise DatasetError(
        f"no region masks for {root}: provide {MASKS_JSON} ({{region: [vertex indices]}} for "
        f"lips, eyes, upper_face), regions/{', regions/'.join(REGION_FILES.values())}, "
        "or pass --masks FILE"
    )


def _masks_from_json(path: Path) -> dict[str, list[int]]:
    if not path.is_file():
        raise DatasetError(f"mask file not found: {path}")
    try:
        masks = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(masks, dict) or not all(
        isinstance(v, list) and all(isinstance(i, int) for i in v) for v in masks.values()
    ):
        raise DatasetError(f"{path} must be an object {{region: [vertex indices]}}")
    missing = [r for r in REQUIRED_REGIONS if r != "face" and r not in masks]
    if missing:
        raise DatasetError(f"{path} lacks the regions {missing}; add vertex index lists for them")
    return masks


def _masks_from_regions(folder: Path) -> dict[str, list[int]]:
    masks = {}
    for region, filename in REGION_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise DatasetError(
                f"{folder} has no {filename} ({region} vertex indices); provide it, or a "
                f"{MASKS_JSON} with a {region!r} list"
            )
        try:
            masks[region] = [int(t) for t in re.split(r"[,\s]+", path.read_text("utf-8")) if t]
        except (UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"{path} is not a list of vertex indices: {exc}") from exc
    return masks


def _read_audio(path: Path, sample_rate: int) -> tuple[np.ndarray, float]:
    """Mono float32 audio at ``sample_rate`` and the file's duration in seconds."""
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError) as exc:
        raise DatasetError(f"unreadable wav: {exc}") from exc
    if len(data) == 0:
        raise DatasetError("the wav holds no samples")
    mono = data.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.asarray(mono, dtype=np.float32), len(data) / rate


def _read_mesh(path: Path) -> np.ndarray:
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    except Exception as exc:  # trimesh raises many unrelated types for unreadable files
        raise DatasetError(f"cannot read mesh {path.name}: {exc}") from exc
    return np.asarray(mesh.vertices, dtype=np.float32)


def _natural_key(path: Path) -> list[object]:
    # frame_2 before frame_10: exporters often do not zero-pad frame numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _read_frames(path: Path, step: int) -> np.ndarray:
    """Every ``step``-th frame (T, V, 3) of a ``.npy`` sequence or a folder of mesh frames."""
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in MESH_SUFFIXES), key=_natural_key
        )
        if not files:
            raise DatasetError(f"{path.name}/ holds no OBJ frames")
        frames = [_read_mesh(p) for p in files[::step]]
        if len({f.shape for f in frames}) > 1:
            raise DatasetError(f"the frames in {path.name}/ have different vertex counts")
        return np.stack(frames)
    try:
        # Memory-mapped so only the kept frames are read from disk.
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        if data.ndim == 2 and data.shape[1] % 3 == 0:
            data = data.reshape(len(data), -1, 3)
        if data.ndim != 3 or data.shape[2] != 3:
            raise DatasetError(
                f"{path.name} has shape {data.shape}; expected (T, V*3) or (T, V, 3)"
            )
        return np.asarray(data[::step], dtype=np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(f"unreadable mesh file {path.name}: {exc}") from exc


def _convert(
    item: _Item, layout: Layout, templates: _Templates, options: PrepareOptions
) -> Sequence:
    """Load one item as a sequence, or raise :class:`DatasetError` with the reason to skip it."""
    if item.problem is not None:
        raise DatasetError(item.problem)
    if item.speaker not in templates.vertices:
        raise DatasetError(templates.problems[item.speaker])
    assert item.wav is not None and item.mesh is not None, "items without problems are complete"
    audio, duration = _read_audio(item.wav, options.sample_rate)
    vertices = _read_frames(item.mesh, layout.frame_step)
    expected = templates.topology.num_vertices
    if vertices.shape[1] != expected:
        raise DatasetError(f"mesh has {vertices.shape[1]} vertices, the topology {expected}")
    fps = layout.fps(options)
    # Capture often runs a few frames past the audio (VOCASET does); those frames have no sound.
    vertices = vertices[: math.ceil(duration * fps - 1e-6)]
    return Sequence(
        sequence_id=item.sequence_id,
        speaker=item.speaker,
        sentence_id=item.sentence_id,
        audio=audio,
        sample_rate=options.sample_rate,
        vertices=vertices,
        fps=fps,
    )


def prepare_dataset(
    root: str | Path,
    output: str,
    options: PrepareOptions,
    *,
    overwrite: bool = False,
    s3: S3Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Convert the corpus at ``root`` into a dataset at ``output`` (local path or ``s3://``).

    Unusable items are skipped and listed in the report; nothing is written if none is usable.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"corpus folder not found: {root}")
    layout = REGISTRY[options.layout]
    items = layout.discover(layout, root, options)
    if not items:
        raise DatasetError(f"{root} holds no wav files; nothing to convert")
    templates = layout.load_templates(
        layout, root, options, [item for item in items if item.problem is None]
    )
    skipped: list[tuple[str, str]] = []
    writer = None
    for done, item in enumerate(items, start=1):
        try:
            sequence = _convert(item, layout, templates, options)
        except DatasetError as exc:
            skipped.append((item.name, str(exc)))
        else:
            # Opened on the first good item so a failed run never replaces an existing dataset.
            if writer is None:
                writer = DatasetWriter(
                    output,
                    name=f"{layout.name}-{root.resolve().name}",
                    source=layout.name,
                    topology=templates.topology,
                    templates=templates.vertices,
                    fps=layout.fps(options),
                    sample_rate=options.sample_rate,
                    overwrite=overwrite,
                    extra={"root": str(root.resolve()), "prepare": options.model_dump()},
                    s3=s3,
                )
            writer.add(sequence, item.split)
        if progress is not None:
            progress(done, len(items))
    if writer is None:
        item, reason = skipped[0]
        raise DatasetError(
            f"none of the {len(items)} items in {root} could be converted (first: {item}: {reason})"
        )
    return PrepareReport(writer.close(), skipped)


def detect_layout(root: str | Path) -> str:
    """Guess the layout from file names: FaceTalk_* wavs are VOCASET, F2_e01-style BIWI."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"corpus folder not found: {root}")
    audio_dir = root / AUDIO_DIR
    stems = [p.stem for p in audio_dir.glob("*.wav")] if audio_dir.is_dir() else []
    for layout in REGISTRY.values():
        if layout.stem_pattern and any(layout.stem_pattern.fullmatch(s) for s in stems):
            return layout.name
    return "folder"


_VOCASET_TRAIN = frozenset(
    {
        "FaceTalk_170728_03272_TA",
        "FaceTalk_170904_00128_TA",
        "FaceTalk_170725_00137_TA",
        "FaceTalk_170915_00223_TA",
        "FaceTalk_170811_03274_TA",
        "FaceTalk_170913_03279_TA",
        "FaceTalk_170904_03276_TA",
        "FaceTalk_170912_03278_TA",
    }
)
_VOCASET_VAL = frozenset({"FaceTalk_170811_03275_TA", "FaceTalk_170908_03277_TA"})
_VOCASET_TEST = frozenset({"FaceTalk_170809_00138_TA", "FaceTalk_170731_00024_TA"})
# BIWI-Test-A: the same six subjects everywhere, split by sentence.
_BIWI_SUBJECTS = frozenset({"F2", "F3", "F4", "M3", "M4", "M5"})

REGISTRY: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            name="vocaset",
            description="VOCASET (FaceFormer processed)",
            discover=_discover_processed,
            load_templates=_processed_templates,
            topology_candidates=("FLAME_sample.ply", "templates/FLAME_sample.ply"),
            stem_pattern=re.compile(
                r"(?P<speaker>FaceTalk_\d+_\d+_TA)_(?P<sentence>sentence(?P<number>\d+))"
            ),
            example="FaceTalk_170725_00137_TA_sentence01",
            protocol_name="FaceFormer VOCASET split",
            protocol=(
                SplitRule("train", _VOCASET_TRAIN, range(1, 41)),
                SplitRule("val", _VOCASET_VAL, range(21, 41)),
                SplitRule("test", _VOCASET_TEST, range(21, 41)),
            ),
            native_fps=60.0,
            frame_step=2,
        ),
        Layout(
            name="biwi",
            description="BIWI (FaceFormer processed)",
            discover=_discover_processed,
            load_templates=_processed_templates,
            topology_candidates=("BIWI.ply", "templates/BIWI.ply"),
            stem_pattern=re.compile(r"(?P<speaker>[FM]\d+)_(?P<sentence>e(?P<number>\d+))"),
            example="F2_e01",
            protocol_name="BIWI-Test-A split",
            protocol=(
                SplitRule("train", _BIWI_SUBJECTS, range(1, 33)),
                SplitRule("val", _BIWI_SUBJECTS, range(33, 37)),
                SplitRule("test", _BIWI_SUBJECTS, range(37, 41)),
            ),
            native_fps=25.0,
        ),
        Layout(
            name="folder",
            description="own data (one folder per speaker)",
            discover=_discover_folder,
            load_templates=_folder_templates,
            topology_candidates=("template.obj", "template.ply"),
        ),
    )
}
