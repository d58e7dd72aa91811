"""Face motion for the synthetic corpus: articulation blendshapes on the procedural face chart,
blinks and prosody-driven brows, composed into vertex sequences.

Every blendshape is a displacement field (V, 3) in metres defined on the canonical chart of
:mod:`mmtalker.data.face`, scaled to the speaker's face size, so it exists at any resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from mmtalker.data import face as F
from mmtalker.data.espeak import Phoneme
from mmtalker.data.visemes import (
    SPEECH_CHANNELS,
    articulation_curves,
    frame_times,
    is_pause,
    is_vowel,
)

#: All channels, speech first (in :data:`SPEECH_CHANNELS` order), then the upper face.
CHANNELS = (*SPEECH_CHANNELS, "blink", "brow_raise")

JAW_PIVOT_Y, JAW_PIVOT_Z, JAW_MAX_ANGLE = -0.02, -0.10, 0.14


class SpeakingStyle(BaseModel):
    """How strongly a speaker articulates, and how often they blink."""

    gains: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(CHANNELS, 1.0))
    blinks_per_second: float = Field(0.3, ge=0.0, le=1.5)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SpeakingStyle:
        """A random style: each channel gain within ±25 %, 0.2–0.45 blinks per second."""
        gains = {name: float(rng.uniform(0.75, 1.25)) for name in CHANNELS}
        return cls(gains=gains, blinks_per_second=float(rng.uniform(0.2, 0.45)))


def _logistic(t: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(t, -60, 60)))


def blendshapes(chart: F.FaceChart, shape: F.FaceShape, neutral: np.ndarray) -> np.ndarray:
    """Displacement fields (len(CHANNELS), V, 3) of a speaker's face at full activation."""
    x, y = chart.xy[:, 0], chart.xy[:, 1]
    z = neutral[:, 2]
    ax = np.abs(x)
    mw = F.MOUTH_HALF_WIDTH
    lateral = np.exp(-0.5 * (x / (0.9 * mw)) ** 4)
    above = y >= F.MOUTH_Y
    # Lip weights are one-sided so the two lips of the slit can move apart.
    upper_lip = lateral * np.exp(-0.5 * ((y - F.MOUTH_Y) / 0.009) ** 2) * above
    lower_lip = lateral * np.exp(-0.5 * ((y - F.MOUTH_Y) / 0.011) ** 2) * ~above
    lips = upper_lip + lower_lip
    mouth_area = np.exp(-0.5 * ((y - F.MOUTH_Y) / 0.014) ** 2) * np.exp(
        -0.5 * (x / (1.5 * mw)) ** 2
    )
    shapes = np.zeros((len(CHANNELS), len(x), 3))

    # Jaw: a rotation of the lower face about a pivot behind it; sharp at the slit, soft on
    # the cheeks, fading towards the face's sides.
    softness = 0.00015 + 0.012 * F.smoothstep((ax - 0.8 * mw) / 0.03)
    jaw = _logistic((F.MOUTH_Y - y) / softness) * F.smoothstep((0.08 - ax) / 0.03)
    shapes[0, :, 1] = -JAW_MAX_ANGLE * (z - JAW_PIVOT_Z) * jaw + 0.0015 * upper_lip
    shapes[0, :, 2] = JAW_MAX_ANGLE * (y - JAW_PIVOT_Y) * jaw
    # Rounding: corners in, lips forward and slightly apart.
    shapes[1, :, 0] = -0.35 * x * mouth_area
    shapes[1, :, 1] = 0.001 * upper_lip - 0.001 * lower_lip
    shapes[1, :, 2] = 0.007 * lips
    # Spreading: corners out and up, lips flattened against the teeth.
    shapes[2, :, 0] = 0.18 * x * mouth_area
    shapes[2, :, 1] = 0.002 * np.clip(ax / mw, 0, 1.2) ** 2 * mouth_area
    shapes[2, :, 2] = -0.002 * lips
    # Closure: both lips meet over the slit and press.
    shapes[3, :, 1] = -F.MOUTH_GAP * upper_lip + F.MOUTH_GAP * lower_lip
    shapes[3, :, 2] = -0.0015 * lips
    # Labiodental: the lower lip tucks up and back under the upper teeth.
    shapes[4, :, 1] = 0.0025 * lower_lip + 0.0008 * upper_lip
    shapes[4, :, 2] = -0.005 * lower_lip
    # Blink: the upper lid drops onto the rising lower lid.
    for side in (-1.0, 1.0):
        ex = side * F.EYE_X
        u = np.clip((x - ex) / F.EYE_HALF_WIDTH, -1.0, 1.0)
        arch = np.sqrt(1.0 - u**2) * np.exp(-0.5 * ((x - ex) / (1.2 * F.EYE_HALF_WIDTH)) ** 8)
        rim_up = F.EYE_Y + F.EYE_UPPER * arch
        rim_low = F.EYE_Y - F.EYE_LOWER * arch
        lid_up = np.exp(-0.5 * (np.maximum(y - rim_up, 0) / 0.004) ** 2) * (y >= F.EYE_Y)
        lid_low = np.exp(-0.5 * (np.maximum(rim_low - y, 0) / 0.003) ** 2) * (y < F.EYE_Y)
        shapes[5, :, 1] += -(F.EYE_UPPER + 0.7 * F.EYE_LOWER) * arch * lid_up
        shapes[5, :, 1] += 0.3 * F.EYE_LOWER * arch * lid_low
        shapes[5, :, 2] += 0.002 * arch * lid_up
    # Brow raise: brows lift most, the forehead follows, the upper lids a little.
    spread = np.where(y >= F.BROW_Y, 0.035, 0.012)
    shapes[6, :, 1] = 0.005 * np.exp(-0.5 * ((y - F.BROW_Y) / spread) ** 2) * (ax < 0.07)
    # The fields above live on the canonical chart; carrying the displaced points through the
    # speaker's warp keeps them right on every face (a blink still shuts bigger eyes).
    rest = F.warp_xy(chart.xy, shape)
    for channel in shapes:
        channel[:, :2] = F.warp_xy(chart.xy + channel[:, :2], shape) - rest
    return shapes.astype(np.float32)


def blink_curve(
    times: np.ndarray, pauses: Sequence[float], style: SpeakingStyle, rng: np.random.Generator
) -> np.ndarray:
    """Blink activation over time: random blinks plus likely ones at speech pauses."""
    duration = float(times[-1]) if len(times) else 0.0
    count = rng.poisson(style.blinks_per_second * max(duration, 0.0))
    onsets = list(rng.uniform(0.0, max(duration - 0.2, 0.0), size=count))
    onsets += [p for p in pauses if rng.random() < 0.6]
    curve = np.zeros_like(times)
    for onset in onsets:
        # Lids close fast (70 ms), stay shut briefly (30 ms) and reopen slower (120 ms).
        t = times - onset
        closing = np.clip(t / 0.07, 0, 1)
        opening = np.clip(1.0 - (t - 0.1) / 0.12, 0, 1)
        curve = np.maximum(curve, np.where(t < 0.07, closing, opening) * (t >= 0))
    return curve


def brow_curve(
    times: np.ndarray, phonemes: Sequence[Phoneme], energy: np.ndarray, question: bool
) -> np.ndarray:
    """Brow raise from prosody: bumps on prominent vowels, plus a little of the loudness.

    espeak-ng's phoneme events carry no stress marks, so prominence is read off the audio as
    stress is heard: the loudest, longest third of the vowels. Questions end with a rising
    brow, as their intonation rises.
    """
    curve = 0.25 * energy
    vowels = [ph for ph in phonemes if is_vowel(ph.symbol) and ph.end > ph.start]
    if vowels:
        centres = np.array([0.5 * (ph.start + ph.end) for ph in vowels])
        loudness = np.interp(centres, times, energy)
        prominence = loudness * np.sqrt([ph.end - ph.start for ph in vowels])
        threshold = np.quantile(prominence, 2.0 / 3.0)
        for centre, loud, score in zip(centres, loudness, prominence, strict=True):
            if score >= threshold:
                curve = curve + 0.8 * loud * np.exp(-0.5 * ((times - centre) / 0.1) ** 2)
    if question and len(times):
        curve = curve + 0.6 * F.smoothstep((times - (times[-1] - 0.5)) / 0.4)
    return np.clip(curve, 0.0, 1.2)


def frame_energy(audio: np.ndarray, sample_rate: int, times: np.ndarray) -> np.ndarray:
    """Smoothed RMS loudness at the frame times, normalised to a peak of 1."""
    window = int(0.05 * sample_rate)
    centres = np.clip((times * sample_rate).astype(int), 0, len(audio) - 1)
    padded = np.pad(audio.astype(np.float64) ** 2, window)
    cumulative = np.concatenate([[0.0], np.cumsum(padded)])
    rms = np.sqrt((cumulative[centres + 2 * window] - cumulative[centres]) / (2 * window))
    return rms / (rms.max() + 1e-9)


def channel_curves(
    phonemes: Sequence[Phoneme],
    audio: np.ndarray,
    sample_rate: int,
    num_frames: int,
    fps: float,
    style: SpeakingStyle,
    question: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """All channel activations (num_frames, len(CHANNELS)) for one utterance and speaker, each
    frame at its :func:`frame_times` instant."""
    # The phone labels are taken at the same instants; sampled at k / fps instead, the motion
    # led them and the speech encoders' output frames by half a frame.
    times = frame_times(num_frames, fps)
    speech = articulation_curves(phonemes, times, rng)
    pauses = [ph.start for ph in phonemes if is_pause(ph.symbol) and ph.end - ph.start > 0.12]
    blink = blink_curve(times, pauses, style, rng)
    brow = brow_curve(times, phonemes, frame_energy(audio, sample_rate, times), question)
    curves = np.concatenate([speech, blink[:, None], brow[:, None]], axis=1)
    return curves * np.array([style.gains[name] for name in CHANNELS])


def animate(neutral: np.ndarray, shapes: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """Vertex positions (T, V, 3) = neutral + sum over channels of activation × blendshape."""
    flat = curves.astype(np.float32) @ shapes.reshape(len(shapes), -1)
    return neutral[None] + flat.reshape(len(curves), *neutral.shape)
