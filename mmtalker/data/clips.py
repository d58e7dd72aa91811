"""Speech-clip catalogs for batch animation: espeak-ng sentences written as audio files.

Clips vary the way real catalogs do (voice, speaking rate, sample rate, channels and container)
so demos, tests and benchmarks exercise decoding and resampling, not one happy path.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import soundfile as sf
import soxr

from mmtalker import storage
from mmtalker.data.espeak import EspeakSynthesizer
from mmtalker.data.synth import load_sentences
from mmtalker.errors import DatasetError
from mmtalker.storage import S3Settings

#: Containers, their soundfile format and subtype.
CONTAINERS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
SAMPLE_RATES = (16000, 22050, 44100, 8000)
_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f2", "en-us+m7")


def write_speech_clips(
    out: str,
    count: int,
    *,
    seed: int = 0,
    containers: tuple[str, ...] = ("wav", "flac", "ogg"),
    s3: S3Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write ``count`` spoken sentences as ``clip_00000.<ext>`` under ``out``; return their URIs.

    Clip ``i`` is a pure function of ``(seed, i)``: every third is stereo, sample rates cycle
    through :data:`SAMPLE_RATES` and containers through ``containers``.
    """
    unknown = set(containers) - set(CONTAINERS)
    if count < 1 or not containers or unknown:
        raise DatasetError(
            f"need count >= 1 and containers from {sorted(CONTAINERS)}, got {count} and "
            f"{list(containers)}"
        )
    sentences = load_sentences()
    synthesizer = EspeakSynthesizer(sample_rate=16000)
    uris = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        text = " ".join(rng.choice(sentences, size=int(rng.integers(1, 3)), replace=False))
        speech = synthesizer.synthesize(
            text, voice=_VOICES[index % len(_VOICES)], rate=int(rng.integers(140, 200))
        )
        rate = SAMPLE_RATES[index % len(SAMPLE_RATES)]
        audio = soxr.resample(speech.audio, speech.sample_rate, rate).astype(np.float32)
        if index % 3 == 2:
            audio = np.stack([audio, 0.8 * audio], axis=1)
        container = containers[index % len(containers)]
        fmt, subtype = CONTAINERS[container]
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(audio, -1, 1), rate, format=fmt, subtype=subtype)
        uri = storage.join(out, f"clip_{index:05d}.{container}")
        storage.write_bytes(uri, buffer.getvalue(), s3)
        uris.append(uri)
        if progress is not None:
            progress(index + 1, count)
    return uris
