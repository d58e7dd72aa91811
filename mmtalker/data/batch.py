"""Padded tensor batches of sequences, the unit every model trains on."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from mmtalker.data.sequence import Sequence


@dataclass
class Batch:
    """Sequences padded to the longest; lengths say how much of each row is real."""

    audio: Tensor  # (B, N) float32 at the dataset's sample rate
    audio_lengths: Tensor  # (B,) long
    displacements: Tensor  # (B, T, V, 3) vertices minus the speaker's template
    frame_lengths: Tensor  # (B,) long
    templates: Tensor  # (B, V, 3)
    speakers: Tensor  # (B,) long index into the model's training speakers, -1 if unknown

    @property
    def num_frames(self) -> int:
        return int(self.displacements.shape[1])

    def frame_mask(self) -> Tensor:
        """(B, T) True on real frames."""
        frames = torch.arange(self.num_frames, device=self.frame_lengths.device)
        return frames[None, :] < self.frame_lengths[:, None]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device."""
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(
    sequences: Seq[Sequence],
    templates: Mapping[str, np.ndarray],
    speaker_index: Mapping[str, int],
    max_frames: int | None = None,
    rng: np.random.Generator | None = None,
) -> Batch:
    """Pad sequences into a batch, cropping each to at most ``max_frames`` (random window).

    Crops keep audio and frames aligned: the window starts on a frame boundary and takes the
    audio samples of exactly those frames.
    """
    rng = rng or np.random.default_rng(0)
    crops = []
    for seq in sequences:
        start, frames = 0, seq.num_frames
        if max_frames is not None and frames > max_frames:
            start = int(rng.integers(0, frames - max_frames + 1))
            frames = max_frames
        per_frame = seq.sample_rate / seq.fps
        a0 = round(start * per_frame)
        a1 = min(len(seq.audio), round((start + frames) * per_frame))
        crops.append((seq, seq.vertices[start : start + frames], seq.audio[a0:a1]))
    num_frames = max(v.shape[0] for _, v, _ in crops)
    num_samples = max(len(a) for _, _, a in crops)
    num_vertices = crops[0][1].shape[1]
    audio = np.zeros((len(crops), num_samples), np.float32)
    disp = np.zeros((len(crops), num_frames, num_vertices, 3), np.float32)
    tmpl = np.zeros((len(crops), num_vertices, 3), np.float32)
    for row, (seq, verts, samples) in enumerate(crops):
        audio[row, : len(samples)] = samples
        tmpl[row] = templates[seq.speaker]
        disp[row, : len(verts)] = verts - tmpl[row]
    return Batch(
        audio=torch.from_numpy(audio),
        audio_lengths=torch.tensor([len(a) for _, _, a in crops]),
        displacements=torch.from_numpy(disp),
        frame_lengths=torch.tensor([len(v) for _, v, _ in crops]),
        templates=torch.from_numpy(tmpl),
        speakers=torch.tensor([speaker_index.get(seq.speaker, -1) for seq, _, _ in crops]),
    )
