"""Training-time audio augmentation: deterministic by seed, aligned, and each effect real."""

from __future__ import annotations

import numpy as np
import pytest

from mmtalker.data.augment import AugmentConfig, Crop, augment_audio, retime, speed_factor
from mmtalker.data.batch import collate
from mmtalker.data.sequence import Sequence

RATE = 16000
EVERYTHING = AugmentConfig(
    tilt_probability=1.0, band_probability=1.0, reverb_probability=1.0, noise_probability=1.0,
    codec_probability=1.0,
)  # fmt: skip


def _speech(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Voiced-speech-like audio: a 150 Hz pulse train through a 'formant' resonance, gated."""
    t = np.arange(int(seconds * RATE)) / RATE
    pulses = (np.sin(2 * np.pi * 150 * t) > 0.99).astype(float)
    formant = np.exp(-t[:200] * 800) * np.sin(2 * np.pi * 700 * t[:200])
    voiced = np.convolve(pulses, formant)[: len(t)] * (np.sin(2 * np.pi * 2 * t) > 0)
    noise = np.random.default_rng(seed).standard_normal(len(t)) * 1e-3
    return (0.5 * voiced / np.abs(voiced).max() + noise).astype(np.float32)


def test_augmentation_is_deterministic_by_seed() -> None:
    audio = _speech()
    first = augment_audio(audio, RATE, EVERYTHING, np.random.default_rng(7), _speech(seed=1))
    second = augment_audio(audio, RATE, EVERYTHING, np.random.default_rng(7), _speech(seed=1))
    other = augment_audio(audio, RATE, EVERYTHING, np.random.default_rng(8), _speech(seed=1))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and first.shape == audio.shape
    assert np.isfinite(first).all() and np.abs(first).max() <= 1.0


def test_disabled_augmentation_leaves_audio_alone() -> None:
    audio = _speech()
    out = augment_audio(audio, RATE, AugmentConfig(enabled=False), np.random.default_rng(0))
    np.testing.assert_array_equal(out, audio)
    assert speed_factor(AugmentConfig(enabled=False), np.random.default_rng(0)) == 1.0


def test_each_effect_changes_the_sound() -> None:
    audio = _speech()
    off = dict.fromkeys(
        ("tilt_probability", "band_probability", "reverb_probability", "noise_probability",
         "codec_probability"), 0.0,
    )  # fmt: skip
    for effect in off:
        config = AugmentConfig(**{**off, effect: 1.0}, gain_db=(0.0, 0.0))
        out = augment_audio(audio, RATE, config, np.random.default_rng(3))
        # Every effect alters the waveform by a clearly audible amount, but keeps it speech-sized.
        change = np.sqrt(np.mean((out - audio) ** 2) / np.mean(audio**2))
        assert 0.01 < change < 3.0, effect
    codec = AugmentConfig(**{**off, "codec_probability": 1.0}, gain_db=(0.0, 0.0))
    narrow = augment_audio(audio, RATE, codec, np.random.default_rng(0))
    spectrum = np.abs(np.fft.rfft(narrow)) ** 2
    freqs = np.fft.rfftfreq(len(narrow), 1 / RATE)
    # Telephone-rate mu-law: almost nothing left above 4 kHz.
    assert spectrum[freqs > 4200].sum() < 0.02 * spectrum.sum()


@pytest.mark.parametrize("factor", [1.25, 0.8])
def test_retiming_keeps_audio_and_frames_aligned(factor: float) -> None:
    # A face whose only vertex follows the audio's sample index at each frame's centre: after
    # retiming, frame k must still show the audio found at its own centre.
    per_frame = RATE / 30
    audio = np.arange(90 * per_frame, dtype=np.float32)
    frames = ((np.arange(90) + 0.5) * per_frame)[:, None, None] * np.ones((1, 1, 3), np.float32)
    out = retime(Crop(audio, frames.astype(np.float32)), factor, 60, per_frame)
    assert out.frames.shape == (60, 1, 3)
    assert len(out.audio) == round(60 * per_frame)
    centres = (np.arange(60) + 0.5) * per_frame
    heard = np.interp(centres, np.arange(len(out.audio)), out.audio)
    np.testing.assert_allclose(out.frames[1:, 0, 0], heard[1:], rtol=1e-4)


def test_collate_with_speed_perturbation_is_seeded_and_within_max_frames() -> None:
    rng = np.random.default_rng(0)
    sequences = [
        Sequence(f"s{i}", "spk", "sent", _speech(3.0, seed=i), RATE,
                 rng.standard_normal((90, 4, 3)).astype(np.float32), 30.0)
        for i in range(3)
    ]  # fmt: skip
    templates = {"spk": np.zeros((4, 3), np.float32)}
    config = AugmentConfig(speed_probability=1.0)
    a = collate(sequences, templates, {"spk": 0}, 40, np.random.default_rng(1), config)
    b = collate(sequences, templates, {"spk": 0}, 40, np.random.default_rng(1), config)
    assert a.num_frames <= 40
    np.testing.assert_array_equal(a.audio.numpy(), b.audio.numpy())
    np.testing.assert_array_equal(a.displacements.numpy(), b.displacements.numpy())
    # Audio covers exactly the frames of each crop.
    np.testing.assert_allclose(
        a.audio_lengths.numpy(), np.round(a.frame_lengths.numpy() * RATE / 30), atol=1
    )


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="snr_db"):
        AugmentConfig(snr_db=(30.0, 5.0))
    with pytest.raises(ValueError, match="speed_range"):
        AugmentConfig(speed_range=(0.0, 1.0))


def test_retimed_phone_labels_follow_their_frames() -> None:
    per_frame = RATE / 30
    frames = np.arange(90, dtype=np.float32)[:, None, None] * np.ones((1, 1, 3), np.float32)
    crop = Crop(np.zeros(round(90 * per_frame), np.float32), frames, np.arange(90, dtype=np.int16))
    out = retime(crop, 1.25, 60, per_frame)
    # Labels are classes: each is the one of the source frame nearest the retimed frame.
    np.testing.assert_array_equal(out.phones, np.rint(out.frames[:, 0, 0]))
