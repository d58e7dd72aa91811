"""Speech branch: hierarchical speech features resampled to the mesh frame rate.

An encoder turns a batch of 16 kHz waveforms into ``levels`` feature sequences, shallow/fine
first and deep/coarse last, each ``(B, num_frames, dim)``. Two encoders share that contract:

* :class:`LightSpeechEncoder` — log-mel spectrogram, convolutions along its frequency axis and
  a stack of dilated 1-D convolutions in time, trained from scratch; the fast CPU and real-time
  path. Apart from the per-utterance normalisation of the log-mel bands, every operation has a
  finite receptive field (level ``i`` sees about ``±blocks_per_level * 4**(i+1) * 20 ms``,
  whether its stage runs at 50 Hz or, with ``multirate``, at ``50 / 2**i`` Hz), so streaming it
  only needs running band statistics and that much look-ahead.
* :class:`PretrainedSpeechEncoder` — a transformers wav2vec2 / HuBERT / WavLM model loaded from
  a local directory (never from a hub), selected hidden layers projected to ``dim``.

Time alignment: feature frame ``i`` and output frame ``j`` are both cell-centred, i.e. they stand
for the intervals ``[i, i+1) * hop`` and ``[j, j+1) * duration / num_frames`` — the convention of
``F.interpolate(mode="linear", align_corners=False)``. ``duration`` is the padded batch length,
so in a padded batch the valid frames of a shorter utterance line up with the same utterance
encoded alone whenever ``num_frames`` is proportional to the audio length.
"""

from __future__ import annotations

import contextlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mmtalker.errors import MMTalkerError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: Pretrained backbones this encoder understands (``model_type`` in the model's config.json).
SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
#: Overlap between consecutive chunks of long audio for the pretrained encoder; features are
#: cross-faded linearly over it.
CHUNK_OVERLAP_SECONDS = 1.0

_WINDOW_SECONDS = 0.025
_HOP_SECONDS = 0.010
_LOG_FLOOR = 1e-6
# Wav2Vec2FeatureExtractor's epsilon, so normalised input matches what the backbone was trained on.
_NORM_EPS = 1e-7


class SpeechConfig(BaseModel):
    """Which speech encoder to build and the shape of the features it returns."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["light", "pretrained"] = "light"
    #: Local folder of a transformers wav2vec2 / HuBERT / WavLM model (config.json + weights).
    path: str | None = None
    #: Hidden-state indices (0: convolutional features); default: ``levels`` spread over the
    #: upper half of the layers, the last layer last.
    layers: list[int] | None = None
    levels: int = Field(3, ge=1, le=6)
    dim: int = Field(128, ge=1)
    #: Pretrained: no gradients into the backbone (the projections still train).
    freeze: bool = True
    sample_rate: int = Field(16000, ge=8000)
    n_mels: int = Field(64, ge=8, le=128)
    #: Light encoder: dilated blocks per level. Three name the phone better than one (the
    #: readout: 85% against 84% of espeak-ng test frames, 76% against 73% of Klatt speech's),
    #: and the decoders read the phone: in 20 minutes MMTalker's LVE fell on the test split and
    #: on every unseen-voice proxy despite ~15% fewer steps, inference ~15% slower
    #: (docs/accuracy.md). Checkpoints from before store 1 and load as they were.
    blocks_per_level: int = Field(3, ge=1, le=8)
    #: Light encoder: channels of two convolutions along the mel axis before the stem (0: none),
    #: for a formant pattern another voice shifts in frequency. 8 fits the training speakers
    #: better (MMTalker's best val LVE 0.40-0.46 vs 0.46-0.48 in 20 min) but not unseen ones
    #: (test LVE 0.227 vs 0.225 over three seeds; its steps are slower) and weakens the
    #: baseline (0.74 vs 0.55), so it is off by default.
    frequency_channels: int = Field(0, ge=0, le=64)
    #: Pretrained: longer audio runs in chunks of at most this, overlapping by 1 s.
    max_chunk_seconds: float = Field(20.0, ge=2 * CHUNK_OVERLAP_SECONDS)
    #: Phone classes of a linear readout from the features (0: none), trained by the phone loss
    #: (``losses.phones``) on corpora with phone labels; training sets it from the dataset.
    phone_classes: int = Field(0, ge=0)
    #: With a phone readout: its phone posteriors, projected, are added to the deepest level, so
    #: the motion decoder reads which phone is spoken (a phonetic posteriorgram, as voice
    #: conversion uses for speaker independence). Off in checkpoints from before it existed.
    phone_features: bool = False
    #: Light encoder: voices pitched above this (Hz) have their spectrum moved down before the
    #: log-mel, every frequency scaled by ``(register_hz / pitch) ** (1/3)`` down to 0.8, so a
    #: woman's formants meet a man's (vocal-tract-length normalisation); lower voices are left
    #: as they are. None: off, as in checkpoints from before it existed; new models get
    #: ``REGISTER_HZ`` (``training.model_for_dataset``; docs/accuracy.md).
    register_hz: float | None = Field(None, gt=0)
    #: Light encoder: channels of the stem and the dilated blocks, which the level heads project
    #: to ``dim`` (None: ``dim``, as in checkpoints from before it existed). New models get 1.5
    #: per feature (``training.model_for_dataset``): with ``multirate``, 192 for 128 features
    #: lowered both models' val and test LVE over three seeds (docs/accuracy.md).
    width: int | None = Field(None, ge=1)
    #: Light encoder: stage ``i`` runs at ``50 / 2**i`` Hz (each stage halves its input by
    #: averaging frame pairs, and its dilations halve with it, so every level sees as far as
    #: before), which cuts the dilated blocks' work by ~40% for three levels and pays for most
    #: of ``width``. Off in checkpoints from before it existed; new models get it.
    multirate: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SpeechConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError(
                "kind='pretrained' needs path: the local folder of a wav2vec2/HuBERT/WavLM model"
            )
        if self.kind == "pretrained" and self.register_hz is not None:
            raise ValueError(
                "register_hz applies to the light encoder's log-mel; a pretrained backbone "
                "reads the waveform, so leave it unset"
            )
        if self.kind == "pretrained" and self.multirate:
            raise ValueError(
                "multirate sets the light encoder's stage rates; a pretrained backbone has its "
                "own frame rate, so leave it off"
            )
        if self.kind == "pretrained" and self.width is not None:
            raise ValueError(
                "width sets the light encoder's channels; a pretrained backbone has its own "
                "hidden size, so leave it unset"
            )
        if self.layers is not None:
            if len(self.layers) != self.levels:
                raise ValueError(
                    f"layers has {len(self.layers)} entries but levels={self.levels}; "
                    "give one hidden-state index per level"
                )
            if any(a > b for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError(f"layers must be sorted shallow to deep, got {self.layers}")
            if self.layers[0] < 0:
                raise ValueError(f"layers are hidden-state indices >= 0, got {self.layers}")
        return self


class SpeechEncoder(nn.Module, ABC):
    """Waveforms ``(B, N)`` to ``levels`` feature sequences ``(B, num_frames, dim)``, deep last."""

    config: SpeechConfig

    @abstractmethod
    def forward(
        self, audio: Tensor, num_frames: int, audio_lengths: Tensor | None = None
    ) -> list[Tensor]:
        """Encode float audio at ``config.sample_rate``; ``audio_lengths`` gives valid samples."""


def build_speech_encoder(config: SpeechConfig) -> SpeechEncoder:
    """The encoder ``config.kind`` names."""
    if config.kind == "light":
        return LightSpeechEncoder(config)
    return PretrainedSpeechEncoder(config)


class PhoneReadout(nn.Module):
    """Per-frame phone logits ``(B, T, phone_classes)`` from all levels' features, concatenated;
    with ``phone_features`` their posteriors also feed the deepest level."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.dim * config.levels, config.phone_classes)
        self.feedback = (
            nn.Linear(config.phone_classes, config.dim) if config.phone_features else None
        )

    def forward(
        self, levels: list[Tensor], motion_gradient: float = 1.0
    ) -> tuple[list[Tensor], Tensor]:
        """The levels the motion decoder reads, and the phone logits; the motion losses'
        gradients reach the encoder through those levels scaled by ``motion_gradient``."""
        logits = self.linear(torch.cat(levels, dim=-1))
        if motion_gradient != 1.0:
            levels = [scale_gradient(level, motion_gradient) for level in levels]
        if self.feedback is None:
            return levels, logits
        # Detached, so the posteriors stay the phone loss's alone: the motion losses shape how
        # they are read, not what they say.
        posteriors = torch.softmax(logits.detach(), dim=-1)
        return [*levels[:-1], levels[-1] + self.feedback(posteriors)], logits


def phone_readout(config: SpeechConfig) -> PhoneReadout | None:
    """The readout ``config.phone_classes`` asks for, if any."""
    return PhoneReadout(config) if config.phone_classes else None


def read_phones(
    readout: PhoneReadout | None, levels: list[Tensor], motion_gradient: float = 1.0
) -> tuple[list[Tensor], Tensor | None]:
    """The levels a motion decoder reads in training, and the phone logits (None: no readout);
    with a readout, ``motion_gradient`` scales the motion losses' gradients into the encoder."""
    return (levels, None) if readout is None else readout(levels, motion_gradient)


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged forward; its gradient multiplied by ``scale`` backward."""
    return x * scale + x.detach() * (1.0 - scale)


def decoder_levels(readout: PhoneReadout | None, levels: list[Tensor]) -> list[Tensor]:
    """The levels a motion decoder reads at inference: the readout runs only if it feeds them."""
    if readout is None or readout.feedback is None:
        return levels
    return readout(levels)[0]


def resample_frames(features: Tensor, num_frames: int, span: float) -> Tensor:
    """Linearly resample cell-centred frames ``(B, T, C)`` covering ``span`` frame periods.

    Same mapping as ``F.interpolate(mode="linear", align_corners=False)``, which it equals when
    ``span == T``; ``span < T`` when the last feature frame only partly covers the audio.
    """
    length = features.shape[1]
    step = span / num_frames
    pos = (torch.arange(num_frames, device=features.device) + 0.5) * step
    pos = (pos - 0.5).clamp(0, length - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=length - 1)
    weight = (pos - lo).to(features.dtype)[None, :, None]
    return torch.lerp(features[:, lo], features[:, hi], weight)


def _check_inputs(audio: Tensor, num_frames: int, audio_lengths: Tensor | None) -> Tensor:
    """Validate a batch and return the valid length of every item, ``(B,)`` int64."""
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio must be (batch, samples) with both > 0, got {tuple(audio.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    batch, samples = audio.shape
    if audio_lengths is None:
        return torch.full((batch,), samples, dtype=torch.long, device=audio.device)
    if audio_lengths.shape != (batch,):
        raise ValueError(
            f"audio_lengths must be ({batch},), one length per item, "
            f"got {tuple(audio_lengths.shape)}"
        )
    lengths = audio_lengths.to(device=audio.device, dtype=torch.long)
    if bool((lengths < 1).any()) or bool((lengths > samples).any()):
        raise ValueError(f"audio_lengths must lie in 1..{samples}, got {lengths.tolist()}")
    return lengths


#: New light encoders' ``register_hz``: about the training voices' median pitch (117 Hz).
REGISTER_HZ = 120.0
#: New light encoders' ``width`` per feature channel (192 for 128; docs/accuracy.md).
LIGHT_WIDTH_PER_FEATURE = 1.5
#: Formants scale about as the cube root of the pitch between voices (women's lie some 17%
#: above men's at 1.8 times the pitch); the warp stays within these factors. Raising low voices
#: too (up to 1.25) cost the espeak-ng test split in a screen (LVE 0.171 and 0.158 against
#: 0.152 and 0.155 on two seeds; docs/accuracy.md).
_REGISTER_EXPONENT = 1.0 / 3.0
_REGISTER_LIMITS = (0.8, 1.0)
#: Pitch tracking: 40 ms frames every 20 ms of audio decimated to a quarter of its rate (a
#: tenth of the light encoder's time where the full rate took four times it), 60-400 Hz,
#: voiced where the normalised autocorrelation peaks above 0.6 and the frame is within 30 dB
#: of the loudest.
_PITCH_DECIMATION = 4
_PITCH_HOP_SECONDS = 0.020
_PITCH_WINDOW_SECONDS = 0.040
_PITCH_RANGE_HZ = (60.0, 400.0)
_VOICING_THRESHOLD = 0.6
_MIN_VOICED_FRAMES = 5
#: A periodic frame correlates as well at two or three periods as at one: the period is the
#: first local maximum within this share of the highest (else a 300 Hz voice can read 100 Hz).
_OCTAVE_TOLERANCE = 0.8


def _autocorrelation(x: Tensor, lags: int) -> Tensor:
    """The first ``lags`` lags of the autocorrelation along the last axis; zero-padding to twice
    that length keeps the FFT's correlation linear, not circular."""
    return torch.fft.irfft(torch.fft.rfft(x, n=2 * lags).abs().square(), n=2 * lags)[..., :lags]


def voice_pitch(audio: Tensor, lengths: Tensor, sample_rate: int) -> Tensor:
    """Median pitch (Hz) of each item's voiced frames ``(B,)``, NaN where fewer than five frames
    are voiced; autocorrelation per frame, divided by the window's own to unbias long lags."""
    audio = F.avg_pool1d(_zero_padding(audio, lengths)[:, None], _PITCH_DECIMATION, ceil_mode=True)
    audio = audio[:, 0]
    lengths = -(-lengths // _PITCH_DECIMATION)
    rate = sample_rate / _PITCH_DECIMATION
    win, hop = round(_PITCH_WINDOW_SECONDS * rate), round(_PITCH_HOP_SECONDS * rate)
    audio = F.pad(audio, (0, max(0, win - audio.shape[1])))
    frames = audio.unfold(1, win, hop)
    window = torch.hann_window(win, device=audio.device)
    frames = (frames - frames.mean(-1, keepdim=True)) * window
    own = _autocorrelation(window, win)
    lags = _autocorrelation(frames, win) / own.clamp_min(1e-3 * own[0])
    low, high = (round(rate / hz) for hz in reversed(_PITCH_RANGE_HZ))
    norm = lags[..., low:high] / lags[..., :1].clamp_min(1e-12)
    peak = norm.amax(-1, keepdim=True)
    local = F.pad(norm[..., 1:-1] >= norm[..., :-2], (1, 1)) & F.pad(
        norm[..., 1:-1] >= norm[..., 2:], (1, 1)
    )
    lag = (local & (norm >= _OCTAVE_TOLERANCE * peak)).float().argmax(-1)
    peak = peak[..., 0]
    energy = lags[..., 0]
    whole = torch.arange(frames.shape[1], device=audio.device)[None] * hop + win <= lengths[:, None]
    loud = energy > 1e-3 * (energy * whole).amax(-1, keepdim=True)
    voiced = whole & loud & (peak > _VOICING_THRESHOLD)
    pitch = torch.where(voiced, rate / (lag + low).float(), torch.nan)
    median = pitch.nanmedian(dim=-1).values
    return torch.where(voiced.sum(-1) >= _MIN_VOICED_FRAMES, median, torch.nan)


def register_factor(pitch: Tensor, register_hz: float) -> Tensor:
    """The frequency scale ``(B,)`` that moves voices of ``pitch`` down towards ``register_hz``
    (1 for lower voices and where the pitch is unknown)."""
    factor = (register_hz / pitch) ** _REGISTER_EXPONENT
    return torch.nan_to_num(factor, nan=1.0).clamp(*_REGISTER_LIMITS)


def warp_matrix(bins: int, factor: Tensor) -> Tensor:
    """Linear maps ``(B, bins, bins)`` that move each frequency f of a power spectrum to
    ``factor * f`` per item (``matrix @ power``), linearly interpolated; bins whose source lies
    past Nyquist become 0."""
    source = torch.arange(bins, device=factor.device)[None] / factor[:, None].float()
    low = source.floor().long().clamp(max=bins - 1)
    high = (low + 1).clamp(max=bins - 1)
    # Past the last bin both ends are that bin, so the weight's overshoot there changes nothing.
    weight = source - low
    inside = (source <= bins - 1).float()
    matrix = torch.zeros(factor.shape[0], bins, bins, device=factor.device)
    matrix.scatter_add_(2, low[..., None], ((1 - weight) * inside)[..., None])
    return matrix.scatter_add_(2, high[..., None], (weight * inside)[..., None])


def _mask(lengths: Tensor, size: int) -> Tensor:
    """``(B, size)`` float mask, 1 on the first ``lengths[b]`` positions."""
    return (torch.arange(size, device=lengths.device)[None] < lengths[:, None]).float()


def _zero_padding(audio: Tensor, lengths: Tensor) -> Tensor:
    """``audio`` with every sample past its item's length set to 0."""
    # A full-length batch (the common real-time case) skips a pass over every sample.
    if bool((lengths == audio.shape[1]).all()):
        return audio
    return audio * _mask(lengths, audio.shape[1])


def _standardize(x: Tensor, mask: Tensor) -> Tensor:
    """Zero mean, unit variance over the last axis where ``mask`` is 1; masked entries become 0."""
    count = mask.sum(-1, keepdim=True)
    mean = (x * mask).sum(-1, keepdim=True) / count
    var = ((x - mean) ** 2 * mask).sum(-1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + _NORM_EPS) * mask


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 20.0) -> Tensor:
    """Triangular HTK-mel filters up to Nyquist, ``(n_fft // 2 + 1, n_mels)`` float32."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(
        np.linspace(to_mel(np.array(f_min)), to_mel(np.array(sample_rate / 2)), n_mels + 2)
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (center - lower)
    falling = (upper - freqs[:, None]) / (upper - center)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32))


class _DepthwiseDilated(nn.Module):
    """Per-channel 3-tap convolution ``w0 x[t-d] + w1 x[t] + w2 x[t+d] + b``, zero padded."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        bound = 1 / math.sqrt(3)  # nn.Conv1d's default for a 3-tap depthwise kernel
        self.weight = nn.Parameter(torch.empty(width, 3, 1).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(width, 1))

    def forward(self, x: Tensor) -> Tensor:
        # torch runs a dilated depthwise conv1d through its im2col path, whose large temporary
        # buffers cost page faults on every call; three shifted multiply-adds are several times
        # faster and allocate nothing but the output.
        d = self.dilation
        out = torch.addcmul(self.bias, self.weight[:, 1], x)
        out[..., d:] += self.weight[:, 0] * x[..., :-d]
        out[..., :-d] += self.weight[:, 2] * x[..., d:]
        return out


class _DilatedBlock(nn.Module):
    """Two depthwise-separable 3-tap convolutions, dilations ``d`` and ``2d``, with a residual."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        # Depthwise temporal + pointwise channel mixing costs a third of a full convolution,
        # which is what keeps the encoder far faster than real time on a CPU core.
        self.temporal1 = _DepthwiseDilated(width, dilation)
        self.mix1 = nn.Conv1d(width, width, 1)
        self.temporal2 = _DepthwiseDilated(width, 2 * dilation)
        self.mix2 = nn.Conv1d(width, width, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # Masking before every temporal convolution keeps padding frames at exactly zero (the
        # biases would otherwise fill them), so a padded utterance sees what the zero padding of
        # an unpadded one shows and batching does not change its features.
        h = self.mix1(F.gelu(self.temporal1(x))) * mask
        h = self.mix2(F.gelu(self.temporal2(h)))
        return (x + h) * mask


class _FrequencyConvolution(nn.Module):
    """Two convolutions along the mel axis only (kernels 5 and 3, the first with stride 2), so
    each frame's spectrum becomes ``channels`` maps of ``ceil(n_mels / 2)`` bands."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, channels, (5, 1), stride=(2, 1), padding=(2, 0))
        self.second = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))

    def forward(self, logmel: Tensor) -> Tensor:
        """``(B, n_mels, T)`` to ``(B, channels * ceil(n_mels / 2), T)``."""
        x = self.second(F.gelu(self.first(logmel[:, None])))
        return F.gelu(x).flatten(1, 2)


class LightSpeechEncoder(SpeechEncoder):
    """Log-mel (25 ms window, 10 ms hop), convolutions along its mel axis, then dilated
    convolutions in time at 50 Hz; level i after the ``k = blocks_per_level`` blocks of stage i.

    Stage ``i``'s blocks use dilations ``4**i`` and ``2 * 4**i`` (20 ms frames), so level ``i``
    sees about ``±k * (4**(i+1) - 1) * 20 ms`` plus the stem's 15 ms: for k = 1, 75 ms, 315 ms,
    1.3 s; for k = 3, 195 ms, 915 ms, 3.8 s. With ``multirate`` stage ``i`` runs at
    ``50 / 2**i`` Hz with dilations ``2**i`` and ``2 * 2**i``: the same reach in seconds (plus
    the pooled frames' width).
    """

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.config = config
        self.win = round(_WINDOW_SECONDS * config.sample_rate)
        self.hop = round(_HOP_SECONDS * config.sample_rate)
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer(
            "mel", mel_filterbank(config.sample_rate, self.win, config.n_mels).T, persistent=False
        )
        # Stride 2 halves the work of everything after it; 50 Hz is the rate of wav2vec2 too.
        # Output frame k covers log-mel frames 2k-1 .. 2k+2, centred like the 20 ms cell it is.
        self.frequency = (
            _FrequencyConvolution(config.frequency_channels) if config.frequency_channels else None
        )
        bands = config.frequency_channels * -(-config.n_mels // 2) or config.n_mels
        width = config.width or config.dim
        self.stem = nn.Conv1d(bands, width, 4, stride=2)
        per_level = config.blocks_per_level
        # A stage at half the rate needs half the dilation to reach as far in seconds.
        base = 2 if config.multirate else 4
        self.blocks = nn.ModuleList(
            _DilatedBlock(width, base ** (i // per_level)) for i in range(config.levels * per_level)
        )
        self.heads = nn.ModuleList(nn.Linear(width, config.dim) for _ in range(config.levels))

    def log_mel(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """Log-mel ``(B, n_mels, ceil(N / hop))``, standardised per utterance, 0 past the end."""
        samples = audio.shape[1]
        audio = _zero_padding(audio, lengths)
        # Frame i is centred on sample (i + 0.5) * hop, so ceil(N / hop) frames tile the audio.
        left = (self.win - self.hop) // 2
        right = self.win - self.hop - left + (-samples % self.hop)
        spec = torch.stft(
            F.pad(audio, (left, right)),
            n_fft=self.win,
            hop_length=self.hop,
            window=self.window,
            center=False,
            return_complex=True,
        )
        power = spec.real**2 + spec.imag**2
        mel = self.mel
        if self.config.register_hz is not None:
            pitch = voice_pitch(audio, lengths, self.config.sample_rate)
            factor = register_factor(pitch, self.config.register_hz)
            # The warp is linear and fixed per item, so it folds into the mel filters: one small
            # product per item instead of an interpolation of every frame's spectrum.
            mel = mel @ warp_matrix(power.shape[1], factor).to(power.dtype)
        logmel = torch.log(torch.matmul(mel, power) + _LOG_FLOOR)
        mask = _mask(-(-lengths // self.hop), logmel.shape[-1])[:, None]
        return _standardize(logmel, mask)

    def forward(
        self, audio: Tensor, num_frames: int, audio_lengths: Tensor | None = None
    ) -> list[Tensor]:
        """Encode float audio at ``config.sample_rate``; ``audio_lengths`` gives valid samples."""
        lengths = _check_inputs(audio, num_frames, audio_lengths)
        x = self.log_mel(audio.float(), lengths)
        if self.frequency is not None:
            # The biases would fill the padding frames; zeroing them keeps batching invisible.
            x = self.frequency(x) * _mask(-(-lengths // self.hop), x.shape[-1])[:, None]
        x = self.stem(F.pad(x, (1, 1 + x.shape[-1] % 2)))
        lengths = -(-lengths // (2 * self.hop))
        mask = _mask(lengths, x.shape[-1])[:, None]
        x = x * mask
        span = audio.shape[1] / (2 * self.hop)
        levels = []
        per_level = self.config.blocks_per_level
        for stage, head in enumerate(self.heads):
            if stage and self.config.multirate:
                x, lengths = _halve_rate(x, lengths)
                mask = _mask(lengths, x.shape[-1])[:, None]
                span /= 2
            for block in self.blocks[stage * per_level : (stage + 1) * per_level]:
                x = block(x, mask)
            # One zero frame past the end is what a longer item's padding shows, so output
            # frames beyond the last feature frame's centre (a stage slower than the output)
            # read the same alone as in a padded batch.
            features = F.pad(x, (0, 1)).transpose(1, 2)
            levels.append(head(resample_frames(features, num_frames, span)))
        return levels


def _halve_rate(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Average frame pairs of ``(B, C, T)`` (cell ``k`` covers frames ``2k`` and ``2k + 1``),
    with the valid lengths at the new rate."""
    # Frames past an item's end are zero, so a padded item pools exactly as it does alone.
    x = F.pad(x, (0, x.shape[-1] % 2))
    return (x[..., 0::2] + x[..., 1::2]) * 0.5, -(-lengths // 2)


def _receptive_field(kernels: list[int], strides: list[int]) -> int:
    """Samples seen by one output frame of a stack of strided convolutions."""
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def _model_directory(path: str) -> Path:
    """The model folder ``path`` names, checked to hold a config.json."""
    directory = Path(path).expanduser()
    hint = (
        "download the model (e.g. `huggingface-cli download facebook/wav2vec2-base-960h "
        "--local-dir DIR`) on a machine with internet access and set speech.path to that folder"
    )
    if not directory.exists():
        raise MMTalkerError(f"speech model folder {directory} does not exist; {hint}")
    if not directory.is_dir():
        raise MMTalkerError(f"speech model path {directory} is not a folder; {hint}")
    if not (directory / "config.json").is_file():
        raise MMTalkerError(f"speech model folder {directory} has no config.json; {hint}")
    return directory


class PretrainedSpeechEncoder(SpeechEncoder):
    """A local wav2vec2 / HuBERT / WavLM model; hidden layers ``config.layers`` projected to dim.

    Input conventions come from the folder's ``preprocessor_config.json`` (``do_normalize``,
    ``return_attention_mask``) when present; otherwise from ``feat_extract_norm`` in config.json:
    "layer" models were trained on normalised audio with padding masks, "group" models on raw
    audio without (their group norm spans the whole input, so padding in a batch leaks into it).
    Audio longer than ``max_chunk_seconds`` runs in chunks overlapping by 1 s whose features are
    cross-faded, so activation memory is bounded by the chunk when the backbone is frozen.
    """

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        # Imported here: transformers takes seconds to import and the light encoder never needs it.
        from transformers import AutoConfig, AutoModel

        if config.path is None:
            raise MMTalkerError(
                "the pretrained speech encoder needs speech.path, a local model folder"
            )
        self.config = config
        directory = _model_directory(config.path)
        try:
            model_config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MMTalkerError(f"cannot read {directory / 'config.json'}: {exc}") from exc
        if model_config.model_type not in SUPPORTED_MODEL_TYPES:
            raise MMTalkerError(
                f"{directory} holds a {model_config.model_type!r} model; the speech encoder takes "
                f"one of {list(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            self.backbone = AutoModel.from_pretrained(
                directory, local_files_only=True, dtype=torch.float32
            )
        except OSError as exc:
            raise MMTalkerError(
                f"cannot load the weights in {directory}: {exc}; the folder needs the model "
                "weights (model.safetensors or pytorch_model.bin) next to config.json"
            ) from exc

        depth = model_config.num_hidden_layers
        self.layers = config.layers or _default_layers(depth, config.levels)
        if self.layers[-1] > depth:
            raise MMTalkerError(
                f"layers {self.layers} exceed the {depth} layers of {directory}; "
                f"hidden-state indices run from 0 (convolutional features) to {depth}"
            )
        self.normalize, self.use_attention_mask = _input_conventions(directory, model_config)
        rate = _preprocessor(directory).get("sampling_rate", config.sample_rate)
        if rate != config.sample_rate:
            raise MMTalkerError(
                f"{directory} expects {rate} Hz audio but speech.sample_rate is "
                f"{config.sample_rate}; set speech.sample_rate to {rate}"
            )
        self.stride = math.prod(model_config.conv_stride)
        field = _receptive_field(list(model_config.conv_kernel), list(model_config.conv_stride))
        # Padding by (field - stride) makes ceil(N / stride) frames, frame i centred on sample
        # (i + 0.5) * stride, the same cell-centred layout as the light encoder.
        self.context = max(field - self.stride, 0)
        self.min_valid = field
        self.chunk = max(int(config.max_chunk_seconds * config.sample_rate) // self.stride, 1)
        self.overlap = max(round(CHUNK_OVERLAP_SECONDS * config.sample_rate / self.stride), 1)
        self.projections = nn.ModuleList(
            nn.Linear(model_config.hidden_size, config.dim) for _ in self.layers
        )
        if config.freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> PretrainedSpeechEncoder:
        """Set training mode; a frozen backbone stays in eval mode (no dropout, no masking)."""
        super().train(mode)
        if self.config.freeze:
            self.backbone.eval()
        return self

    def forward(
        self, audio: Tensor, num_frames: int, audio_lengths: Tensor | None = None
    ) -> list[Tensor]:
        """Encode float audio at ``config.sample_rate``; ``audio_lengths`` gives valid samples."""
        lengths = _check_inputs(audio, num_frames, audio_lengths)
        audio = _zero_padding(audio.float(), lengths)
        if self.normalize:
            audio = _standardize(audio, _mask(lengths, audio.shape[1]))
        with torch.no_grad() if self.config.freeze else contextlib.nullcontext():
            hidden = self._hidden_states(audio, lengths)
        span = audio.shape[1] / self.stride
        return [
            projection(resample_frames(h, num_frames, span))
            for projection, h in zip(self.projections, hidden, strict=True)
        ]

    def _hidden_states(self, audio: Tensor, lengths: Tensor) -> list[Tensor]:
        """Selected hidden states ``(B, ceil(N / stride), H)``, chunked and cross-faded."""
        frames = -(-audio.shape[1] // self.stride)
        left = self.context // 2
        right = self.context - left + frames * self.stride - audio.shape[1]
        padded = F.pad(audio, (left, right))
        # Everything up to the frame boundary after the last sample is valid, so exactly
        # ceil(length / stride) frames count as speech.
        valid = -(-lengths // self.stride) * self.stride + self.context
        if frames <= self.chunk:
            return self._run(padded, valid)
        step = self.chunk - self.overlap
        ramp = (torch.arange(self.overlap, device=audio.device) + 0.5) / self.overlap
        out = [
            audio.new_zeros(audio.shape[0], frames, self.backbone.config.hidden_size)
            for _ in self.layers
        ]
        for start in range(0, frames - self.overlap, step):
            stop = min(start + self.chunk, frames)
            begin = start * self.stride
            piece = padded[:, begin : stop * self.stride + self.context]
            hidden = self._run(piece, valid - begin)
            weight = torch.ones(stop - start, device=audio.device)
            if start > 0:
                weight[: self.overlap] = ramp
            if stop < frames:
                weight[-self.overlap :] = 1 - ramp
            for acc, h in zip(out, hidden, strict=True):
                acc[:, start:stop] += h * weight[None, :, None]
        return out

    def _run(self, piece: Tensor, valid: Tensor) -> list[Tensor]:
        """The backbone's selected hidden states for one stretch of (padded) audio."""
        mask = None
        if self.use_attention_mask:
            # A chunk can lie wholly in one item's padding; at least one frame stays valid so the
            # attention has something to attend to (those frames are padding and never used).
            valid = valid.clamp(self.min_valid, piece.shape[1])
            mask = _mask(valid, piece.shape[1]).long()
        output = self.backbone(piece, attention_mask=mask, output_hidden_states=True)
        return [output.hidden_states[i].float() for i in self.layers]


def _default_layers(depth: int, levels: int) -> list[int]:
    """``levels`` hidden-state indices evenly spaced over the upper half, the last layer last."""
    return [int(i) for i in np.linspace(depth, math.ceil(depth / 2), levels).round()[::-1]]


def _preprocessor(directory: Path) -> dict:
    """The folder's feature-extractor settings, empty when it has none."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MMTalkerError(f"cannot read {path}: {exc}; fix or delete the file") from exc


def _input_conventions(directory: Path, model_config: PretrainedConfig) -> tuple[bool, bool]:
    """Whether the model expects normalised input, and an attention mask over padding."""
    layer_norm = getattr(model_config, "feat_extract_norm", "group") == "layer"
    preprocessor = _preprocessor(directory)
    return (
        bool(preprocessor.get("do_normalize", layer_norm)),
        bool(preprocessor.get("return_attention_mask", layer_norm)),
    )
