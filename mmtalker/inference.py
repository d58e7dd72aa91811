"""Animate speech of any length: fixed-size overlapping chunks, linearly cross-faded.

Time and memory are linear in the audio length and bounded per chunk: the face state (mesh
tokens and point basis) is prepared once, then each chunk of ``chunk_seconds`` is animated on
its own, and consecutive chunks overlap by ``overlap_seconds`` over which their outputs are
blended with linear weights so no seam shows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr
import torch

from mmtalker.data.sequence import frame_samples, pad_to_frames
from mmtalker.errors import AudioError, AudioTooLongError, MMTalkerError
from mmtalker.nn.base import AnimationModel

if TYPE_CHECKING:
    from mmtalker.checkpoint import Checkpoint
    from mmtalker.data.sequence import Topology
    from mmtalker.rig.rig import Rig


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk and overlap lengths in frames."""

    chunk: int
    overlap: int

    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """(start, stop) frame windows covering ``num_frames``, each overlapping the previous.

        The fewest windows of at most ``chunk`` frames, of near-equal length: no short tail
        chunk, whose per-chunk feature normalisation would see too little speech.
        """
        if num_frames <= self.chunk:
            return [(0, num_frames)]
        count = math.ceil((num_frames - self.overlap) / (self.chunk - self.overlap))
        step = (num_frames - self.overlap) / count
        starts = [round(i * step) for i in range(count)]
        stops = [start + self.overlap for start in starts[1:]] + [num_frames]
        return list(zip(starts, stops, strict=True))


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples (N,) or (N, channels) as float32 and the sample rate of an audio file."""
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio {path}: {exc}") from exc
    return audio, int(rate)


def decode_audio(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Samples and sample rate of an encoded file's bytes (wav, flac, ogg, mp3; by content).

    With ``max_seconds``, longer audio is refused from its header, before decoding: a few MiB
    of compressed silence can hold hours of samples.
    """
    if not data:
        raise AudioError("the file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as file:
            rate = file.samplerate
            limit = None if max_seconds is None else math.floor(max_seconds * rate) + 1
            if limit is not None and file.frames > limit:
                raise AudioTooLongError(
                    f"audio is {file.frames / rate:.1f} s, over the limit of {max_seconds:g} s"
                )
            # Reading at most one sample past the limit also bounds formats whose header
            # understates their length.
            audio = file.read(-1 if limit is None else limit, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's own words, without the "Error opening <BytesIO object at 0x...>" prefix.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise AudioError(f"not a readable audio file (wav, flac, ogg or mp3): {reason}") from exc
    if limit is not None and len(audio) >= limit:
        raise AudioTooLongError(f"audio is over the limit of {max_seconds:g} s")
    return audio, int(rate)


def prepare_audio(audio: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 at ``target_rate``: channels (N, C) averaged, then resampled."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1 or audio.size == 0:
        raise AudioError(f"audio must be non-empty (N,) or (N, channels), got {audio.shape}")
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    if sample_rate != target_rate:
        audio = soxr.resample(audio, sample_rate, target_rate).astype(np.float32)
    return audio


@dataclass(frozen=True)
class Clip:
    """One clip to animate: mono samples at the model's rate, a neutral face, a speaker index."""

    audio: np.ndarray
    template: np.ndarray
    speaker: int = -1


@torch.no_grad()
def animate_clips(
    clips: Sequence[Clip],
    model: AnimationModel,
    *,
    model_sample_rate: int = 16000,
    fps: float = 30.0,
    chunk_seconds: float = 20.0,
    overlap_seconds: float = 1.0,
    max_batch: int = 16,
    length_tolerance: float = 0.25,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """Vertex positions (T_i, V, 3) for each clip, as :func:`animate` gives them one by one.

    Clips that fit one chunk run together, padded, in groups of similar length (the longest at
    most ``1 + length_tolerance`` times the shortest): one model call per group is ~1.6× faster
    than one per clip on a CPU. Longer clips are animated alone, chunk by chunk.
    """
    limit = round(chunk_seconds * model_sample_rate)
    results: list[np.ndarray | None] = [None] * len(clips)
    group: list[int] = []

    def flush() -> None:
        outputs = _animate_group([clips[i] for i in group], model, model_sample_rate, fps, device)
        for index, output in zip(group, outputs, strict=True):
            results[index] = output
        group.clear()

    for index in sorted(range(len(clips)), key=lambda i: len(clips[i].audio)):
        clip = clips[index]
        if len(clip.audio) > limit:
            results[index] = animate(
                clip.audio, clip.template, model, sample_rate=model_sample_rate,
                model_sample_rate=model_sample_rate, fps=fps, chunk_seconds=chunk_seconds,
                overlap_seconds=overlap_seconds, speaker=clip.speaker, device=device,
            )  # fmt: skip
            continue
        shortest = len(clips[group[0]].audio) if group else 0
        if group and (
            len(group) >= max_batch or len(clip.audio) > (1 + length_tolerance) * shortest
        ):
            flush()
        group.append(index)
    if group:
        flush()
    return results  # type: ignore[return-value]


def _animate_group(
    clips: list[Clip],
    model: AnimationModel,
    sample_rate: int,
    fps: float,
    device: str | torch.device,
) -> list[np.ndarray]:
    """Animate clips of similar length as one padded batch; positions (T_i, V, 3) per clip."""
    lengths = [len(clip.audio) for clip in clips]
    frames = [math.ceil(n / sample_rate * fps) for n in lengths]
    # Padded to whole frames, as animate() pads a clip: speech features then map onto frames
    # at the same rate for every clip of the group as for the clip alone.
    audio = torch.zeros(len(clips), max(frame_samples(max(frames), sample_rate / fps), *lengths))
    for row, clip in enumerate(clips):
        audio[row, : len(clip.audio)] = torch.from_numpy(np.asarray(clip.audio, np.float32))
    templates = torch.from_numpy(np.stack([np.asarray(c.template, np.float32) for c in clips]))
    model = model.to(device).eval()
    state = model.prepare(
        templates.to(device), torch.tensor([c.speaker for c in clips], device=device)
    )
    out = templates[:, None].expand(-1, max(frames), -1, -1).clone()
    audio_lengths = torch.tensor(lengths, device=device)
    frame_lengths = torch.tensor(frames, device=device)
    if torch.device(device).type == "cpu":
        model.animate(audio, max(frames), state, out, audio_lengths, frame_lengths)
    else:
        out += model.animate(
            audio.to(device), max(frames), state, None, audio_lengths, frame_lengths
        ).cpu()
    return [out[row, :count].numpy() for row, count in enumerate(frames)]


@torch.no_grad()
def animate(
    audio: np.ndarray,
    template: np.ndarray,
    model: AnimationModel,
    *,
    sample_rate: int = 16000,
    model_sample_rate: int = 16000,
    fps: float = 30.0,
    chunk_seconds: float = 20.0,
    overlap_seconds: float = 1.0,
    points: object = None,
    speaker: int = -1,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Vertex positions (T, V, 3) (or (T, P, 3) for a ``points`` set) for speech on a face.

    ``template`` is the neutral face (V, 3); ``speaker`` indexes the model's training speakers
    (-1: unknown). T = ceil(duration × fps).
    """
    plan = ChunkPlan(round(chunk_seconds * fps), round(overlap_seconds * fps))
    if plan.overlap < 0 or plan.chunk <= 2 * plan.overlap:
        raise MMTalkerError(
            f"chunks of {chunk_seconds} s must exceed twice the {overlap_seconds} s overlap "
            f"at {fps:g} fps (got {plan.chunk} and {plan.overlap} frames)"
        )
    samples = prepare_audio(audio, sample_rate, model_sample_rate)
    model = model.to(device).eval()
    num_frames = math.ceil(len(samples) / model_sample_rate * fps)
    face = torch.as_tensor(np.asarray(template, np.float32), device=device)[None]
    state = model.prepare(face, torch.tensor([speaker], device=device), points)
    base = np.asarray(template, np.float32) if points is None else points.neutral[0].cpu().numpy()
    # One output buffer, filled with the neutral face, that chunks add their displacements into
    # (on CPU): for long clips it is the largest array, and every extra pass over it costs about
    # as much as the model's last layer.
    neutral = torch.from_numpy(base)
    out = neutral.expand(num_frames, *base.shape).clone()
    in_place = torch.device(device).type == "cpu"
    per_frame = model_sample_rate / fps
    # Zero padding up to whole frames, marked as padding, so the last frame's speech features
    # sit at the same rate as every other frame's.
    padded = pad_to_frames(samples, num_frames, per_frame)
    for start, stop in plan.windows(num_frames):
        first, last = round(start * per_frame), round(stop * per_frame)
        audio_t = torch.from_numpy(padded[first:last])[None].to(device)
        valid = max(1, min(len(samples), last) - first)
        lengths = torch.tensor([valid], device=device) if valid < last - first else None
        blend = min(plan.overlap, stop - start) if start > 0 else 0
        previous = out[start : start + blend].clone()
        window = out[start:stop]
        window[:blend] = neutral
        if in_place:
            model.animate(audio_t, stop - start, state, window[None], lengths)
        else:
            window += model.animate(audio_t, stop - start, state, None, lengths)[0].cpu()
        if blend:
            # Linear cross-fade over the overlap: the previous chunk fades out as this one fades in.
            ramp = (torch.arange(1, blend + 1, dtype=torch.float32) / (blend + 1))[:, None, None]
            window[:blend] = torch.lerp(previous, window[:blend], ramp)
    return out.numpy()


@dataclass(frozen=True)
class Face:
    """Who speaks: a neutral face on the model's mesh, a training speaker's index (-1: none),
    and, for models that can animate the whole ICT head, that person's head (V_head, 3)."""

    template: np.ndarray
    speaker: int = -1
    head: np.ndarray | None = None


@dataclass(frozen=True)
class Animation:
    """Animated vertices, the mesh they are on, and the rig they can be solved against."""

    vertices: np.ndarray
    topology: Topology
    rig: Rig | None


def animate_face(
    audio: np.ndarray,
    face: Face,
    checkpoint: Checkpoint,
    *,
    sample_rate: int = 16000,
    chunk_seconds: float = 20.0,
    device: str | torch.device = "cpu",
) -> Animation:
    """Animate ``face`` with a checkpoint: the whole head when the face has one, else the model's
    own mesh; with the speaker's rig when the mesh is the ICT head's (for ARKit outputs)."""
    model, topology = checkpoint.model, checkpoint.topology
    options = dict(
        sample_rate=sample_rate, model_sample_rate=checkpoint.sample_rate, fps=checkpoint.fps,
        chunk_seconds=chunk_seconds, speaker=face.speaker, device=device,
    )  # fmt: skip
    if face.head is None:
        vertices = animate(audio, face.template, model, **options)  # type: ignore[arg-type]
        return Animation(vertices, topology, None)
    from mmtalker.nn.mmtalker import PointSet
    from mmtalker.rig.head import assemble, display_head, head_points, head_topology

    head = display_head(topology)
    located = head_points(topology, face.head, head)
    points = PointSet(
        torch.from_numpy(located.uv).to(device),
        torch.from_numpy(located.positions)[None].to(device),
        (torch.from_numpy(located.triangles), torch.from_numpy(located.barycentric)),
    )
    moving = animate(audio, face.template, model, points=points, **options)  # type: ignore[arg-type]
    vertices = assemble(topology, face.head, moving - located.positions[None])
    return Animation(vertices, head_topology(head), head.with_neutral(face.head))


def resolve_face(
    checkpoint: Checkpoint,
    speaker: str | None = None,
    template: str | Path | None = None,
    identity: int | None = None,
) -> Face:
    """The face to animate: a training ``speaker`` (default the first), a neutral mesh file
    (OBJ/PLY/NPY, on the model's mesh or, for models mapped onto the ICT head, the whole head),
    or a random ICT person drawn by ``identity`` seed. Models that can be queried at any point of
    their chart and are mapped onto the ICT head get the person's whole head too."""
    given = {"speaker": speaker, "template": template, "identity": identity}
    chosen = [name for name, value in given.items() if value is not None]
    if len(chosen) > 1:
        raise MMTalkerError(f"choose one face: {' and '.join(chosen)} were all given")
    topology = checkpoint.topology
    head = None
    if topology.display is not None or identity is not None:
        from mmtalker.rig.head import display_head

        head = display_head(topology)
    index = -1
    if identity is not None and head is not None:
        person = head.identity(identity).neutral
    elif template is not None:
        counts = (topology.num_vertices,) + (() if head is None else (head.num_vertices,))
        person = _mesh_vertices(Path(template), counts)
    else:
        person, index = checkpoint.face(speaker)
    return face_of(checkpoint, person, index)


def face_of(checkpoint: Checkpoint, person: np.ndarray, speaker: int = -1) -> Face:
    """The face of a neutral mesh (V, 3), on the model's mesh or, for models mapped onto the ICT
    head, the whole head; ``speaker`` indexes the model's training speakers (-1: none)."""
    topology = checkpoint.topology
    if topology.display is None:
        return Face(person, speaker)
    from mmtalker.rig.head import display_head, head_neutral, head_template

    head = display_head(topology)
    if len(person) == head.num_vertices:
        whole, neutral = person, head_template(topology, person, head)
    else:
        whole, neutral = head_neutral(topology, person, head), person
    return Face(neutral, speaker, whole if checkpoint.model.queries_points else None)


def _mesh_vertices(path: Path, counts: tuple[int, ...]) -> np.ndarray:
    """Vertex positions (V, 3) of a neutral mesh file whose vertex count is one of ``counts``."""
    if not path.is_file():
        raise MMTalkerError(f"template mesh not found: {path}")
    return neutral_vertices(path.read_bytes(), str(path), counts)


def neutral_vertices(data: bytes, name: str, counts: tuple[int, ...]) -> np.ndarray:
    """Vertex positions (V, 3) of a neutral face file's bytes (``.npy``; ``.npz`` with
    ``vertices`` or ``template``; OBJ, PLY), checked to have one of ``counts`` vertices."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".npy":
            vertices = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                key = next(k for k in ("vertices", "template") if k in npz.files)
                vertices = npz[key]
        else:
            import trimesh

            mesh = trimesh.load(
                io.BytesIO(data), file_type=suffix.lstrip("."), force="mesh", process=False,
                maintain_order=True,
            )  # fmt: skip
            vertices = np.asarray(mesh.vertices)
    except Exception as exc:  # trimesh and numpy raise many unrelated types for bad files
        raise MMTalkerError(f"cannot read template mesh {name}: {exc}") from exc
    vertices = np.asarray(vertices, np.float32)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) not in counts:
        raise MMTalkerError(
            f"{name} has vertices {vertices.shape}; a neutral head for this model needs "
            f"{' or '.join(map(str, counts))} vertices in its topology's order"
        )
    if not np.isfinite(vertices).all():
        raise MMTalkerError(f"{name} has NaN or infinite vertex positions")
    return vertices
