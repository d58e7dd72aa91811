"""Training-time audio augmentation: models must learn mouths from speech, not one engine's sound.

Every training crop can be altered the ways real recordings differ from clean synthetic speech:

* **speed** — the crop is resampled by a factor, which moves pitch, formants (the vocal tract's
  apparent length) and tempo together, as Kaldi's speed perturbation does; the face frames are
  retimed by the same factor, so audio and motion stay aligned;
* **spectral tilt and band limits** — microphones, rooms and telephone lines colour the spectrum;
* **reverberation** — a synthetic room impulse response (exponentially decaying noise with a
  random decay time and a direct path);
* **noise** — white, pink or brown noise, or *babble* (another crop of the batch, quietly), at a
  random signal-to-noise ratio;
* **codec** — 8-bit mu-law at 8 kHz, the sound of telephony and of many cheap codecs;
* **gain** — recordings come at any level.

Each effect is drawn independently with its own probability from the caller's generator, so a
batch is a pure function of the seed. Effects run on the CPU (numpy/scipy FFTs) on ~3 s crops: a
few milliseconds per crop, small beside a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import fft


class AugmentConfig(BaseModel):
    """Which augmentations a training crop gets and how strong; ``enabled: false``: none."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    speed_probability: float = Field(0.5, ge=0, le=1)
    speed_range: tuple[float, float] = (0.85, 1.15)
    tilt_probability: float = Field(0.5, ge=0, le=1)
    #: Spectral tilt in dB per octave around 1 kHz.
    tilt_db_per_octave: float = Field(4.0, ge=0)
    band_probability: float = Field(0.3, ge=0, le=1)
    reverb_probability: float = Field(0.3, ge=0, le=1)
    #: Decay time (RT60) of the synthetic room, seconds.
    reverb_seconds: tuple[float, float] = (0.1, 0.7)
    noise_probability: float = Field(0.5, ge=0, le=1)
    snr_db: tuple[float, float] = (5.0, 35.0)
    codec_probability: float = Field(0.15, ge=0, le=1)
    gain_db: tuple[float, float] = (-20.0, 6.0)

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        for name in ("speed_range", "reverb_seconds", "snr_db", "gain_db"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {low, high}")
        if self.speed_range[0] <= 0:
            raise ValueError(f"speed_range must be positive, got {self.speed_range}")
        return self


@dataclass(frozen=True)
class Crop:
    """Aligned training material: audio samples, the face frames (T, V, 3) they drive and, when
    known, the phone class of each frame (T,)."""

    audio: np.ndarray
    frames: np.ndarray
    phones: np.ndarray | None = None


def speed_factor(config: AugmentConfig, rng: np.random.Generator) -> float:
    """The speed factor of one crop (1 when speed perturbation is not drawn)."""
    if not config.enabled or rng.random() >= config.speed_probability:
        return 1.0
    return float(rng.uniform(*config.speed_range))


def retime(crop: Crop, factor: float, num_frames: int, samples_per_frame: float) -> Crop:
    """Play ``crop`` ``factor`` times faster: ``num_frames`` frames and their audio samples.

    Frames and audio are resampled linearly on one time axis, so a phoneme and the mouth shape it
    drives move together; phone labels, being classes, take the nearest frame's.
    """
    frames, audio = crop.frames, crop.audio
    # Frame k stands for its centre, (k + 0.5) frame periods into the crop (``frame_times``):
    # that instant was (k + 0.5) * factor periods into the source, the centre of source frame
    # (k + 0.5) * factor - 0.5.
    index = np.clip((np.arange(num_frames) + 0.5) * factor - 0.5, 0, len(frames) - 1)
    low = np.floor(index).astype(int)
    high = np.minimum(low + 1, len(frames) - 1)
    weight = (index - low).astype(np.float32)[:, None, None]
    retimed = frames[low] * (1 - weight) + frames[high] * weight
    length = min(round(num_frames * samples_per_frame), int(len(audio) / factor))
    positions = np.arange(length) * factor
    samples = np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)
    phones = None if crop.phones is None else crop.phones[np.rint(index).astype(int)]
    return Crop(samples, retimed.astype(np.float32), phones)


def augment_audio(
    audio: np.ndarray,
    sample_rate: int,
    config: AugmentConfig,
    rng: np.random.Generator,
    babble: np.ndarray | None = None,
) -> np.ndarray:
    """The crop with the drawn effects applied (filtering, room, noise, codec, gain), float32.

    ``babble`` is other speech that may be mixed in quietly as background talk.
    """
    if not config.enabled or len(audio) == 0:
        return audio
    x = audio.astype(np.float64)
    tilt, band = rng.random() < config.tilt_probability, rng.random() < config.band_probability
    if tilt or band:
        x = _filter(x, sample_rate, config.tilt_db_per_octave * tilt, band, rng)
    if rng.random() < config.reverb_probability:
        x = _reverberate(x, sample_rate, rng.uniform(*config.reverb_seconds), rng)
    if rng.random() < config.noise_probability:
        x = _add_noise(x, rng.uniform(*config.snr_db), rng, babble)
    if rng.random() < config.codec_probability:
        x = _mu_law_8k(x, sample_rate)
    x = x * 10 ** (rng.uniform(*config.gain_db) / 20)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def _filter(
    x: np.ndarray, sample_rate: int, max_tilt: float, band: bool, rng: np.random.Generator
) -> np.ndarray:
    """A random spectral tilt (up to ``max_tilt`` dB/octave) and optionally a band limit."""
    size = fft.next_fast_len(len(x), real=True)
    spectrum = fft.rfft(x, size)
    freqs = fft.rfftfreq(size, 1 / sample_rate)
    octaves = np.log2(np.maximum(freqs, 20.0) / 1000.0)
    gain_db = rng.uniform(-1, 1) * max_tilt * octaves
    if band:
        low = rng.uniform(50, 400)
        high = rng.uniform(2500, sample_rate / 2)
        # Fourth-order-like roll-offs: 24 dB per octave outside the band.
        gain_db = gain_db - 24 * np.maximum(np.log2(low / np.maximum(freqs, 1.0)), 0)
        gain_db = gain_db - 24 * np.maximum(np.log2(np.maximum(freqs, 1.0) / high), 0)
    return fft.irfft(spectrum * 10 ** (gain_db / 20), n=size)[: len(x)]


def _reverberate(
    x: np.ndarray, sample_rate: int, rt60: float, rng: np.random.Generator
) -> np.ndarray:
    """Convolve with a synthetic room: a direct path plus exponentially decaying noise."""
    length = int(rt60 * sample_rate)
    t = np.arange(length) / sample_rate
    response = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
    response *= rng.uniform(0.3, 1.0) / np.sqrt(np.square(response).sum())
    response[0] = 1.0
    # The convolution by FFT here, not scipy.signal's: importing scipy.signal costs ~1 s in every
    # process that loads a model, augmenting or not.
    size = fft.next_fast_len(len(x) + length - 1, real=True)
    wet = fft.irfft(fft.rfft(x, size) * fft.rfft(response, size), size)[: len(x)]
    return wet * np.sqrt(np.square(x).sum() / max(np.square(wet).sum(), 1e-12))


def _add_noise(
    x: np.ndarray, snr_db: float, rng: np.random.Generator, babble: np.ndarray | None
) -> np.ndarray:
    """Mix in white, pink, brown or babble noise at ``snr_db``."""
    kinds = ["white", "pink", "brown"] + (["babble"] if babble is not None and len(babble) else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "babble" and babble is not None:
        noise = np.resize(babble.astype(np.float64), len(x))
    else:
        size = fft.next_fast_len(len(x), real=True)
        exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
        spectrum = fft.rfft(rng.standard_normal(size))
        freqs = np.maximum(fft.rfftfreq(size), 1.0 / size)
        noise = fft.irfft(spectrum / freqs**exponent, n=size)[: len(x)]
    signal = np.square(x).mean()
    power = np.square(noise).mean()
    if signal <= 0 or power <= 0:
        return x
    return x + noise * np.sqrt(signal / power / 10 ** (snr_db / 10))


def _mu_law_8k(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Down to 8 kHz, 8-bit mu-law and back: telephone bandwidth and quantisation noise."""
    if sample_rate <= 8000:
        return x
    step = sample_rate / 8000
    narrow = np.interp(np.arange(0, len(x), step), np.arange(len(x)), x)
    scale = max(np.abs(narrow).max(), 1e-9)
    mu = 255.0
    encoded = np.sign(narrow / scale) * np.log1p(mu * np.abs(narrow / scale)) / np.log1p(mu)
    decoded = np.sign(encoded) * np.expm1(np.abs(np.round(encoded * 127) / 127) * np.log1p(mu))
    return np.interp(np.arange(len(x)), np.arange(0, len(x), step), decoded / mu * scale)
