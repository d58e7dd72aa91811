"""Padded tensor batches of sequences (the unit every model trains on)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

from mmtalker.data.augment import AugmentConfig, Crop, augment_audio, retime, speed_factor
from mmtalker.data.sequence import Sequence, frame_samples


@dataclass
class Batch:
    """Sequences padded to the longest; lengths say how much of each row is real."""

    audio: Tensor  # (B, N) float32 at the dataset's sample rate
    audio_lengths: Tensor  # (B,) long
    displacements: Tensor  # (B, T, V, 3) vertices minus the speaker's template
    frame_lengths: Tensor  # (B,) long
    templates: Tensor  # (B, V, 3)
    speakers: Tensor  # (B,) long index into the model's training speakers, -1 if unknown
    #: (B, T) long phone class per frame, -1 where unknown or padding; None when no sequence
    #: of the batch has phone labels.
    phones: Tensor | None = None

    @property
    def num_frames(self) -> int:
        return int(self.displacements.shape[1])

    def frame_mask(self) -> Tensor:
        """(B, T) True on real frames."""
        frames = torch.arange(self.num_frames, device=self.frame_lengths.device)
        return frames[None, :] < self.frame_lengths[:, None]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v if v is None else v.to(device) for k, v in moved.items()})


def collate(
    sequences: Seq[Sequence],
    templates: Mapping[str, np.ndarray],
    speaker_index: Mapping[str, int],
    max_frames: int | None = None,
    rng: np.random.Generator | None = None,
    augment: AugmentConfig | None = None,
) -> Batch:
    """Pad sequences into a batch, cropping each to at most ``max_frames`` (random window).

    Crops keep audio and frames aligned: the window starts on a frame boundary and takes the
    audio samples of exactly those frames, zero padded to whole frames where the audio ends
    first. ``augment`` alters each crop's audio (and, for speed perturbation, retimes audio and
    frames together); see :mod:`mmtalker.data.augment`.
    """
    rng = rng or np.random.default_rng(0)
    crops = []
    for seq in sequences:
        per_frame = seq.sample_rate / seq.fps
        factor = speed_factor(augment, rng) if augment is not None else 1.0
        # The window covers ``max_frames`` frames after retiming: factor times as many before.
        window = seq.num_frames if max_frames is None else math.ceil(max_frames * factor)
        start, frames = 0, seq.num_frames
        if frames > window:
            start = int(rng.integers(0, frames - window + 1))
            frames = window
        a0 = round(start * per_frame)
        a1 = min(len(seq.audio), round((start + frames) * per_frame))
        phones = None if seq.phones is None else seq.phones[start : start + frames]
        crop = Crop(seq.audio[a0:a1], seq.vertices[start : start + frames], phones)
        if factor != 1.0:
            length = min(max_frames or frames, int(frames / factor))
            crop = retime(crop, factor, max(length, 1), per_frame)
        crops.append((seq, crop))
    if augment is not None and augment.enabled:
        clean = [crop.audio for _, crop in crops]
        for row, (seq, crop) in enumerate(crops):
            # Background talk for the noise effect: another crop of the same batch.
            babble = clean[(row + 1) % len(clean)] if len(clean) > 1 else None
            noisy = augment_audio(crop.audio, seq.sample_rate, augment, rng, babble)
            crops[row] = (seq, replace(crop, audio=noisy))
    num_frames = max(len(crop.frames) for _, crop in crops)
    # Padding up to whole frames (marked as padding by ``audio_lengths``), as inference pads a
    # clip: a crop whose audio ends inside its last frame would otherwise be encoded with its
    # frames spread over too short a span.
    num_samples = max(
        max(len(crop.audio) for _, crop in crops),
        max(frame_samples(num_frames, seq.sample_rate / seq.fps) for seq, _ in crops),
    )
    num_vertices = crops[0][1].frames.shape[1]
    audio = np.zeros((len(crops), num_samples), np.float32)
    disp = np.zeros((len(crops), num_frames, num_vertices, 3), np.float32)
    tmpl = np.zeros((len(crops), num_vertices, 3), np.float32)
    phones = np.full((len(crops), num_frames), -1, np.int64)
    for row, (seq, crop) in enumerate(crops):
        audio[row, : len(crop.audio)] = crop.audio
        tmpl[row] = templates[seq.speaker]
        disp[row, : len(crop.frames)] = crop.frames - tmpl[row]
        if crop.phones is not None:
            phones[row, : len(crop.phones)] = crop.phones
    labelled = any(crop.phones is not None for _, crop in crops)
    return Batch(
        audio=torch.from_numpy(audio),
        audio_lengths=torch.tensor([len(crop.audio) for _, crop in crops]),
        displacements=torch.from_numpy(disp),
        frame_lengths=torch.tensor([len(crop.frames) for _, crop in crops]),
        templates=torch.from_numpy(tmpl),
        speakers=torch.tensor([speaker_index.get(seq.speaker, -1) for seq, _ in crops]),
        phones=torch.from_numpy(phones) if labelled else None,
    )
