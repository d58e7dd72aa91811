"""Animation outputs: npz (always), glTF 2.0 binary with morph-target animation, OBJ sequences,
ARKit curves (Live Link Face CSV and JSON).

An animation is vertex positions (T, V, 3) float32 in metres at ``fps`` on a :class:`Topology`.
Given the speaker's rig (same vertices), ``arkit`` solves per-frame ARKit-52 weights against it
and ``glb`` becomes a rigged glTF: the rig's neutral with the 52 ARKit shapes as named morph
targets, animated by those weights.
Every file goes through :func:`mmtalker.storage.write_bytes` (temporary name, then a move), so a
crashed writer never leaves a half-written file under its final name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pygltflib

from mmtalker import storage
from mmtalker.data.sequence import Topology
from mmtalker.errors import ExportError
from mmtalker.rig.arkit import ARKIT_NAMES, LIVE_LINK_ROTATIONS, ArkitSolver, arkit_matrix
from mmtalker.rig.rig import Rig
from mmtalker.storage import S3Settings

#: Output formats; ``arkit`` needs the speaker's rig (``write_outputs(..., rig=...)``).
FORMATS = ("npz", "glb", "obj", "arkit")
_NO_RIG = (
    "format arkit needs the speaker's ARKit rig: animate with a model trained on the ICT face "
    "(mmtalker data synth --face ict)"
)
MAX_TARGETS = 64
#: Largest unexplained fraction of displacement energy a glTF export may leave (see to_glb).
TOLERANCE = 1e-4
# Extra random directions and power iterations of the range finder in _principal_axes.
_OVERSAMPLING, _POWER_ITERATIONS = 8, 2
# Clips up to this many frames take the Gram-matrix path of _principal_axes; eigenvalues below
# this fraction of the largest are dropped (their directions are numerically unreliable).
_GRAM_FRAMES, _GRAM_CUTOFF = 1024, 1e-10
_FLOAT, _UINT16, _UINT32 = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


@dataclass(frozen=True)
class Animation:
    """An animation read back from an ``.npz`` output."""

    vertices: np.ndarray
    fps: float
    topology_id: str
    faces: np.ndarray


def write_npz(
    vertices: np.ndarray,
    fps: float,
    topology: Topology,
    uri: str | Path,
    s3: S3Settings | None = None,
) -> None:
    """Write ``vertices``, ``fps``, ``topology_id`` and ``faces`` as one ``.npz``, atomically."""
    storage.write_bytes(uri, npz_bytes(vertices, fps, topology), s3)


def npz_bytes(vertices: np.ndarray, fps: float, topology: Topology) -> bytes:
    """The ``.npz`` file :func:`write_npz` writes, as bytes."""
    vertices = _checked_frames(vertices, topology)
    buffer = io.BytesIO()
    # Uncompressed: deflate saves ~15 % on float vertices but costs ~1 s per 10 s clip.
    np.savez(
        buffer,
        vertices=vertices,
        fps=np.float64(_checked_fps(fps)),
        topology_id=np.str_(topology.id),
        faces=topology.faces.astype(np.int32),
    )
    return buffer.getvalue()


def read_npz(uri: str | Path, s3: S3Settings | None = None) -> Animation:
    """Read an ``.npz`` written by :func:`write_npz` (plain arrays only, never pickles)."""
    payload = storage.read_bytes(uri, s3)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            return Animation(
                data["vertices"], float(data["fps"]), str(data["topology_id"]), data["faces"]
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{uri} is not an animation .npz: {exc}") from exc


def to_glb(
    vertices: np.ndarray,
    fps: float,
    topology: Topology,
    *,
    neutral: np.ndarray | None = None,
    max_targets: int = MAX_TARGETS,
) -> bytes:
    """A glTF 2.0 binary: one mesh at ``neutral`` (default: frame 0) and a morph-weight animation.

    Unexplained displacement energy ‖D − D̂‖²/‖D‖² ≤ 1e-4 (RMS error ≤ 1 % of RMS motion) unless
    ``max_targets`` modes cannot reach it; the attained value is in ``mesh.extras.relativeError``.
    """
    frames = _checked_frames(vertices, topology)
    morph = _morph(frames, neutral, max_targets)
    names = [f"mode_{k:02d}" for k in range(len(morph.targets))]
    return _glb(morph, names, _checked_fps(fps), topology)


def to_rigged_glb(
    arkit: np.ndarray,
    fps: float,
    rig: Rig,
    topology: Topology,
    vertices: np.ndarray | None = None,
) -> bytes:
    """A glTF 2.0 binary of ``rig``: its neutral mesh, the 52 ARKit shapes as morph targets named
    like ARKit (``mesh.extras.targetNames``, which Blender and three.js read), animated by the
    ARKit weights (T, 52). A channel the rig splits in halves moves both; one it lacks is a zero
    target. With the animation's ``vertices``, ``mesh.extras.relativeError`` is the fraction of
    their displacement energy the curves leave unexplained.
    """
    weights = _checked_arkit(arkit)
    _checked_rig(rig, topology)
    drives = (arkit_matrix(rig.shape_names) > 0).astype(np.float32)
    targets = (drives @ rig.shapes.reshape(rig.num_shapes, -1)).reshape(len(ARKIT_NAMES), -1, 3)
    error = None
    if vertices is not None:
        frames = _checked_frames(vertices, topology)
        if len(frames) != len(weights):
            raise ExportError(f"{len(weights)} frames of weights for {len(frames)} of vertices")
        d = (frames - rig.neutral).reshape(len(frames), -1)
        left = d.astype(np.float64) - weights @ targets.reshape(len(targets), -1)
        total = float(np.sum(d.astype(np.float64) ** 2))
        error = float(np.sum(left**2) / total) if total > 0 else 0.0
    morph = _Morph(rig.neutral, targets, weights, error)
    return _glb(morph, list(ARKIT_NAMES), _checked_fps(fps), topology)


def from_glb(data: bytes) -> tuple[np.ndarray, float]:
    """Decode the frames (T, V, 3) and fps of a ``.glb`` written by :func:`to_glb`."""
    try:
        gltf = pygltflib.GLTF2.load_from_bytes(data)
        blob = gltf.binary_blob()
        mesh = gltf.meshes[0]
        primitive = mesh.primitives[0]
        sampler = gltf.animations[0].samplers[0]
        fps = float(mesh.extras["fps"])
        base = _accessor(gltf, blob, primitive.attributes.POSITION)
        targets = np.stack([_accessor(gltf, blob, t["POSITION"]) for t in primitive.targets])
        times = _accessor(gltf, blob, sampler.input)
        weights = _accessor(gltf, blob, sampler.output).reshape(len(times), len(targets))
    except Exception as exc:  # pygltflib and numpy raise many unrelated types for bad files
        raise ExportError(f"not a morph-target animation written by mmtalker: {exc}") from exc
    motion = weights.astype(np.float64) @ targets.reshape(len(targets), -1)
    frames = base + motion.reshape(len(times), *base.shape)
    return frames.astype(np.float32), fps


def arkit_csv(arkit: np.ndarray, fps: float) -> bytes:
    """ARKit weights (T, 52) as a Live Link Face CSV: ``Timecode,BlendShapeCount,EyeBlinkLeft,…``.

    One row per frame; the timecode is ``HH:MM:SS:FF.mmm`` (FF the frame within the second at
    ``fps``, then its fraction); the head and eye rotation columns are 0.
    """
    weights, fps = _checked_arkit(arkit), _checked_fps(fps)
    columns = [n[0].upper() + n[1:] for n in ARKIT_NAMES] + list(LIVE_LINK_ROTATIONS)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["Timecode", "BlendShapeCount", *columns])
    zeros = ["0"] * len(LIVE_LINK_ROTATIONS)
    for t, row in enumerate(weights.tolist()):
        writer.writerow([_timecode(t, fps), len(columns), *(f"{x:.6f}" for x in row), *zeros])
    return text.getvalue().encode()


def arkit_json(arkit: np.ndarray, fps: float) -> bytes:
    """ARKit weights (T, 52) as JSON: ``{"fps": …, "names": [52 names], "weights": [[52] × T]}``."""
    weights, fps = _checked_arkit(arkit), _checked_fps(fps)
    rows = np.round(weights.astype(np.float64), 6).tolist()
    return json.dumps({"fps": fps, "names": list(ARKIT_NAMES), "weights": rows}).encode()


def _timecode(frame: int, fps: float) -> str:
    seconds, within = divmod(frame / fps, 1.0)
    part, whole = math.modf(within * fps + 1e-9)
    minutes, second = divmod(int(seconds), 60)
    hour, minute = divmod(minutes, 60)
    return f"{hour:02d}:{minute:02d}:{second:02d}:{int(whole):02d}.{int(part * 1000):03d}"


def to_obj_sequence(vertices: np.ndarray, topology: Topology) -> Iterator[tuple[str, bytes]]:
    """One Wavefront OBJ per frame as (``frame_00000.obj``, bytes), positions to 6 decimals."""
    frames = _checked_frames(vertices, topology)
    rows = "v %.6f %.6f %.6f\n" * topology.num_vertices
    faces = "".join(f"f {a} {b} {c}\n" for a, b, c in (topology.faces + 1).tolist()).encode()
    return (
        (f"frame_{t:05d}.obj", (rows % tuple(frame.ravel().tolist())).encode() + faces)
        for t, frame in enumerate(frames)
    )


def output_bytes(
    vertices: np.ndarray, fps: float, topology: Topology, fmt: str, rig: Rig | None = None
) -> bytes:
    """One animation as one file: ``npz``, ``glb`` (rigged when ``rig`` is given) or ``arkit``
    (the JSON of the solved ARKit weights; needs ``rig``)."""
    if fmt not in ("npz", "glb", "arkit"):
        raise ExportError(f"format {fmt!r} is not a single file; choose npz, glb or arkit")
    if fmt == "arkit" and rig is None:
        raise ExportError(_NO_RIG)
    frames, fps = _checked_frames(vertices, topology), _checked_fps(fps)
    if fmt == "npz":
        return npz_bytes(frames, fps, topology)
    arkit = _solved_arkit(frames, topology, rig)
    if fmt == "arkit" and arkit is not None:
        return arkit_json(arkit, fps)
    return _glb_bytes(frames, fps, topology, rig, arkit)


def write_outputs(
    vertices: np.ndarray,
    fps: float,
    topology: Topology,
    base_uri: str | Path,
    formats: set[str],
    s3: S3Settings | None = None,
    rig: Rig | None = None,
) -> dict[str, str]:
    """Write ``BASE.npz`` and the requested outputs; return format → URI.

    ``glb`` → ``BASE.glb`` (rigged with ARKit-named targets when ``rig`` is given, principal
    modes otherwise); ``obj`` → ``BASE_obj/``; ``arkit`` (needs ``rig``: the speaker's rig on
    the same vertices) → ``BASE_arkit.csv`` (Live Link Face layout, key ``arkit``) and
    ``BASE_arkit.json`` (key ``arkit_json``). The npz is written last, so its presence means
    every output of the animation is complete.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ExportError(
            f"unknown output formats {sorted(unknown)}; choose from {', '.join(FORMATS)}"
        )
    if "arkit" in formats and rig is None:
        raise ExportError(_NO_RIG)
    frames = _checked_frames(vertices, topology)
    fps = _checked_fps(fps)
    uris = {"npz": f"{base_uri}.npz"}
    arkit = _solved_arkit(frames, topology, rig) if formats & {"arkit", "glb"} else None
    if "glb" in formats:
        uris["glb"] = f"{base_uri}.glb"
        storage.write_bytes(uris["glb"], _glb_bytes(frames, fps, topology, rig, arkit), s3)
    if "obj" in formats:
        uris["obj"] = f"{base_uri}_obj/"
        _write_obj_folder(frames, fps, topology, uris["obj"], s3)
    if "arkit" in formats and arkit is not None:
        uris["arkit"], uris["arkit_json"] = f"{base_uri}_arkit.csv", f"{base_uri}_arkit.json"
        storage.write_bytes(uris["arkit"], arkit_csv(arkit, fps), s3)
        storage.write_bytes(uris["arkit_json"], arkit_json(arkit, fps), s3)
    write_npz(frames, fps, topology, uris["npz"], s3)
    return uris


def _solved_arkit(frames: np.ndarray, topology: Topology, rig: Rig | None) -> np.ndarray | None:
    """Per-frame ARKit weights against the speaker's rig; None without one."""
    if rig is None:
        return None
    _checked_rig(rig, topology)
    return ArkitSolver(rig).solve(frames)


def _glb_bytes(
    frames: np.ndarray, fps: float, topology: Topology, rig: Rig | None, arkit: np.ndarray | None
) -> bytes:
    """A rigged glTF when ARKit weights were solved, principal modes otherwise."""
    if rig is None or arkit is None:
        return to_glb(frames, fps, topology)
    return to_rigged_glb(arkit, fps, rig, topology, frames)


def _write_obj_folder(
    frames: np.ndarray, fps: float, topology: Topology, folder: str, s3: S3Settings | None
) -> None:
    names = []
    for name, payload in to_obj_sequence(frames, topology):
        storage.write_bytes(storage.join(folder, name), payload, s3)
        names.append(name)
    # Written after every frame: its presence marks the folder complete.
    marker = {"fps": fps, "topology_id": topology.id, "frames": names}
    storage.write_bytes(storage.join(folder, "sequence.json"), json.dumps(marker).encode(), s3)


def _checked_frames(vertices: np.ndarray, topology: Topology) -> np.ndarray:
    frames = np.asarray(vertices, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[1:] != (topology.num_vertices, 3) or len(frames) == 0:
        raise ExportError(
            f"vertices must be (T, {topology.num_vertices}, 3) with T ≥ 1 for this topology, "
            f"got {frames.shape}"
        )
    if not np.isfinite(frames).all():
        raise ExportError("vertices contain NaN or infinity")
    return frames


def _checked_rig(rig: Rig, topology: Topology) -> None:
    if rig.num_vertices != topology.num_vertices:
        raise ExportError(
            f"the rig has {rig.num_vertices} vertices but the animation's topology has "
            f"{topology.num_vertices}; give the rig of the animated mesh (e.g. the coarse rig "
            "for a coarse animation)"
        )


def _checked_arkit(arkit: np.ndarray) -> np.ndarray:
    weights = np.asarray(arkit, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != len(ARKIT_NAMES) or len(weights) == 0:
        raise ExportError(
            f"ARKit weights must be (T, {len(ARKIT_NAMES)}) with T ≥ 1, got {weights.shape}"
        )
    if not np.isfinite(weights).all():
        raise ExportError("ARKit weights contain NaN or infinity")
    return weights


def _checked_fps(fps: float) -> float:
    if not (math.isfinite(fps) and fps > 0):
        raise ExportError(f"fps must be a positive finite number, got {fps}")
    return float(fps)


@dataclass(frozen=True)
class _Morph:
    """Frame t ≈ ``base + weights[t] @ targets``; ``error`` is the unexplained energy fraction
    (None when the frames are not known).

    ``base`` is (V, 3), ``targets`` (K, V, 3) displacements, ``weights`` (T, K) in [-1, 1].
    """

    base: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    error: float | None


def _morph(frames: np.ndarray, neutral: np.ndarray | None, max_targets: int) -> _Morph:
    """Principal displacement modes of the frames from ``neutral`` (default: the first frame).

    K is the fewest modes leaving at most TOLERANCE of the displacement energy unexplained,
    capped by ``max_targets``; at least one mode is kept so the animation always exists.
    """
    if max_targets < 1:
        raise ExportError(f"max_targets must be at least 1, got {max_targets}")
    base = frames[0] if neutral is None else np.asarray(neutral, dtype=np.float32)
    if base.shape != frames.shape[1:] or not np.isfinite(base).all():
        raise ExportError(f"neutral must be finite with shape {frames.shape[1:]}, got {base.shape}")
    d = (frames.astype(np.float64) - base).reshape(len(frames), -1)
    axes = _principal_axes(d, min(max_targets + _OVERSAMPLING, *d.shape))
    w = d @ axes.T
    total = float(np.sum(d * d))
    # Axes are orthonormal, so what the first k leave out is exactly total - sum of w² so far.
    left = np.maximum(total - np.cumsum(np.sum(w * w, axis=0)), 0.0)
    k = min(max_targets, len(left), 1 + int(np.count_nonzero(left > TOLERANCE * total)))
    scale = np.abs(w[:, :k]).max(axis=0)
    weights = w[:, :k] / np.where(scale > 0, scale, 1.0)
    targets = (axes[:k] * scale[:, None]).reshape(k, *base.shape)
    error = float(left[k - 1] / total) if total > 0 else 0.0
    return _Morph(base, targets.astype(np.float32), weights.astype(np.float32), error)


def _principal_axes(d: np.ndarray, rank: int) -> np.ndarray:
    """Orthonormal rows (≤ rank, V·3) spanning the leading right singular vectors of ``d``."""
    if len(d) <= _GRAM_FRAMES:
        # Few frames: the exact eigenvectors of the (T, T) Gram matrix cost several times less
        # than the range finder (26 ms vs 210 ms for 5 s of a 3k-vertex face).
        values, vectors = np.linalg.eigh(d @ d.T)
        order = np.argsort(values)[::-1][:rank]
        keep = order[values[order] > _GRAM_CUTOFF * max(values.max(), 0.0)]
        if len(keep):
            return (vectors[:, keep].T @ d) / np.sqrt(values[keep])[:, None]
    # A randomized range finder (Halko et al. 2011): time and memory grow linearly with the
    # number of frames, where a full SVD of a minutes-long clip would not fit in memory.
    rng = np.random.default_rng(0)
    q = np.linalg.qr(d @ rng.standard_normal((d.shape[1], rank)))[0]
    for _ in range(_POWER_ITERATIONS):
        q = np.linalg.qr(d @ np.linalg.qr(d.T @ q)[0])[0]
    return np.linalg.svd(q.T @ d, full_matrices=False)[2]


class _Buffer:
    """The binary chunk under construction: one 4-byte-aligned bufferView per accessor."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[dict] = []
        self.accessors: list[dict] = []

    def add(
        self, array: np.ndarray, kind: str, target: int | None = None, bounds: bool = False
    ) -> int:
        """Append ``array`` (rows are elements) as an accessor of ``kind``; return its index."""
        view = {"buffer": 0, "byteOffset": len(self.data), "byteLength": array.nbytes}
        self.views.append(view if target is None else {**view, "target": target})
        self.data += array.tobytes() + bytes(-array.nbytes % 4)
        component = {"<f4": _FLOAT, "<u2": _UINT16, "<u4": _UINT32}[array.dtype.str]
        accessor = {
            "bufferView": len(self.views) - 1,
            "componentType": component,
            "count": len(array),
            "type": kind,
        }
        if bounds:
            rows = array.reshape(len(array), -1)
            accessor |= {"min": rows.min(axis=0).tolist(), "max": rows.max(axis=0).tolist()}
        self.accessors.append(accessor)
        return len(self.accessors) - 1


def _glb(morph: _Morph, names: list[str], fps: float, topology: Topology) -> bytes:
    buffer = _Buffer()
    index_type = "<u2" if topology.num_vertices < 65536 else "<u4"
    indices = buffer.add(topology.faces.ravel().astype(index_type), "SCALAR", _ELEMENT_ARRAY_BUFFER)
    position = buffer.add(morph.base.astype("<f4"), "VEC3", _ARRAY_BUFFER, bounds=True)
    targets = [buffer.add(t.astype("<f4"), "VEC3", _ARRAY_BUFFER, True) for t in morph.targets]
    times = (np.arange(len(morph.weights)) / fps).astype("<f4")
    sampler = {
        "input": buffer.add(times, "SCALAR", bounds=True),
        "output": buffer.add(morph.weights.ravel().astype("<f4"), "SCALAR"),
        "interpolation": "LINEAR",
    }
    primitive = {
        "attributes": {"POSITION": position},
        "indices": indices,
        "mode": 4,
        "targets": [{"POSITION": t} for t in targets],
    }
    mesh = {
        "name": "face",
        "primitives": [primitive],
        "weights": [0.0] * len(targets),
        "extras": {
            "targetNames": names,
            "fps": fps,
            "relativeError": morph.error,
            "topologyId": topology.id,
        },
    }
    gltf = {
        "asset": {"version": "2.0", "generator": "mmtalker"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "face", "mesh": 0}],
        "meshes": [mesh],
        "animations": [
            {
                "name": "speech",
                "samplers": [sampler],
                "channels": [{"sampler": 0, "target": {"node": 0, "path": "weights"}}],
            }
        ],
        "buffers": [{"byteLength": len(buffer.data)}],
        "bufferViews": buffer.views,
        "accessors": buffer.accessors,
    }
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    length = 12 + 8 + len(text) + 8 + len(buffer.data)
    return b"".join(
        [
            struct.pack("<4sII", b"glTF", 2, length),
            struct.pack("<I4s", len(text), b"JSON"),
            text,
            struct.pack("<I4s", len(buffer.data), b"BIN\0"),
            bytes(buffer.data),
        ]
    )


def _accessor(gltf: pygltflib.GLTF2, blob: bytes, index: int) -> np.ndarray:
    """The float rows of a tightly packed accessor."""
    accessor = gltf.accessors[index]
    view = gltf.bufferViews[accessor.bufferView]
    width = {"SCALAR": 1, "VEC3": 3}[accessor.type]
    start = (view.byteOffset or 0) + (accessor.byteOffset or 0)
    return np.frombuffer(blob, "<f4", accessor.count * width, start).reshape(accessor.count, width)
