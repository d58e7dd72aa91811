"""Animate speech of any length: fixed-size overlapping chunks, linearly cross-faded.

Time and memory are linear in the audio length and bounded per chunk: the face state (mesh
tokens and point basis) is prepared once, then each chunk of ``chunk_seconds`` is animated on
its own, and consecutive chunks overlap by ``overlap_seconds`` over which their outputs are
blended with linear weights so no seam shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from mmtalker.errors import AudioError, MMTalkerError
from mmtalker.nn.base import AnimationModel


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
    for start, stop in plan.windows(num_frames):
        chunk = samples[round(start * per_frame) : round(stop * per_frame)]
        audio_t = torch.from_numpy(np.ascontiguousarray(chunk))[None].to(device)
        blend = min(plan.overlap, stop - start) if start > 0 else 0
        previous = out[start : start + blend].clone()
        window = out[start:stop]
        window[:blend] = neutral
        if in_place:
            model.animate(audio_t, stop - start, state, window[None])
        else:
            window += model.animate(audio_t, stop - start, state)[0].cpu()
        if blend:
            # Linear cross-fade over the overlap: the previous chunk fades out as this one fades in.
            ramp = (torch.arange(1, blend + 1, dtype=torch.float32) / (blend + 1))[:, None, None]
            window[:blend] = torch.lerp(previous, window[:blend], ramp)
    return out.numpy()
