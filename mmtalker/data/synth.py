"""The synthetic speech–motion corpus: espeak-ng speech, phoneme-timed faces, speaker splits.

Every speaker has a voice (espeak-ng variant, pitch, rate), a face shape and a speaking style.
Speakers are split into train, val and test; the sentences are split too, and val/test speakers
only say sentences no training speaker says, so evaluation is on unseen voices, faces and text.
Everything is deterministic by seed: each sequence draws from its own generator keyed by
(seed, speaker, sentence), so results do not depend on generation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from mmtalker.data import face as F
from mmtalker.data import motion
from mmtalker.data.espeak import EspeakSynthesizer
from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import DatasetManifest, DatasetWriter
from mmtalker.errors import DatasetError
from mmtalker.storage import S3Settings

Size = Literal["tiny", "demo", "bench"]

_VARIANTS = ("m1", "f2", "m3", "f4", "m2", "f1", "m4", "f3", "m5", "f5", "m6", "m7")
_BASE_VOICES = ("en-us", "en-gb", "en-us", "en-gb-scotland")


class SynthConfig(BaseModel):
    """What to synthesise; :meth:`preset` gives the tiny, demo and benchmark sizes."""

    speakers: int = Field(8, ge=3, le=len(_VARIANTS) * len(_BASE_VOICES))
    val_speakers: int = Field(1, ge=1)
    test_speakers: int = Field(1, ge=1)
    sentences_per_speaker: int = Field(30, ge=1)
    heldout_sentences: float = Field(0.2, gt=0.0, lt=1.0)
    num_vertices: int = Field(3000, ge=F.MIN_VERTICES, le=F.MAX_VERTICES)
    fps: float = Field(30.0, gt=0)
    sample_rate: int = Field(16000, ge=8000)
    seed: int = 0
    text_file: str | None = None

    @model_validator(mode="after")
    def _enough_training_speakers(self) -> SynthConfig:
        if self.speakers - self.val_speakers - self.test_speakers < 1:
            raise ValueError("speakers must exceed val_speakers + test_speakers by at least one")
        return self

    @classmethod
    def preset(cls, size: Size, **overrides: object) -> SynthConfig:
        """The named corpus size with optional field overrides."""
        presets: dict[str, dict[str, object]] = {
            # Seconds to make: enough for shape, shard and quick-training tests.
            "tiny": dict(speakers=7, sentences_per_speaker=12, num_vertices=1000),
            # Minutes of audio: the demo and the CI training runs.
            "demo": dict(speakers=8, sentences_per_speaker=30, num_vertices=3000),
            # Over an hour of audio from 12 speakers: where accuracy is measured.
            "bench": dict(
                speakers=12,
                val_speakers=2,
                test_speakers=2,
                sentences_per_speaker=160,
                heldout_sentences=0.25,
                num_vertices=2500,
            ),
        }
        return cls(**{**presets[size], **overrides})


class Speaker(BaseModel):
    """One synthetic speaker: voice, face and speaking style."""

    id: str
    split: str
    voice: str
    pitch: int
    rate: int
    shape: F.FaceShape
    style: motion.SpeakingStyle


def load_sentences(text_file: str | None = None) -> list[str]:
    """The built-in sentence list, or one sentence per non-empty line of a UTF-8 text file."""
    if text_file is None:
        text = resources.files("mmtalker.data").joinpath("sentences.txt").read_text("utf-8")
    else:
        path = Path(text_file)
        if not path.is_file():
            raise DatasetError(f"sentence file not found: {path}")
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path} is not UTF-8 text: {exc}") from exc
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if len(sentences) < 2:
        raise DatasetError(
            f"need at least 2 sentences (some for training, some held out), got {len(sentences)}"
        )
    return sentences


def make_speakers(config: SynthConfig) -> list[Speaker]:
    """Deterministic speakers; the last ones are the val and test speakers."""
    speakers = []
    n_train = config.speakers - config.val_speakers - config.test_speakers
    for index in range(config.speakers):
        rng = np.random.default_rng([config.seed, index, 0])
        split = (
            "train"
            if index < n_train
            else "val"
            if index < n_train + config.val_speakers
            else "test"
        )
        base = _BASE_VOICES[(index // len(_VARIANTS)) % len(_BASE_VOICES)]
        speakers.append(
            Speaker(
                id=f"spk{index:02d}",
                split=split,
                voice=f"{base}+{_VARIANTS[index % len(_VARIANTS)]}",
                pitch=int(rng.integers(30, 71)),
                rate=int(rng.integers(145, 196)),
                shape=F.FaceShape.sample(rng),
                style=motion.SpeakingStyle.sample(rng),
            )
        )
    return speakers


def assign_sentences(
    config: SynthConfig, speakers: list[Speaker], total: int
) -> dict[str, list[int]]:
    """Sentence indices per speaker: training speakers from the training pool, others held out."""
    order = np.random.default_rng([config.seed, 1_000_003]).permutation(total)
    n_heldout = max(1, round(total * config.heldout_sentences))
    pools = {"train": order[n_heldout:], "heldout": order[:n_heldout]}
    plan = {}
    for index, speaker in enumerate(speakers):
        pool = pools["train" if speaker.split == "train" else "heldout"]
        count = min(config.sentences_per_speaker, len(pool))
        # Rotating the start spreads the speakers over the whole pool.
        start = (index * count) % len(pool)
        plan[speaker.id] = sorted(int(pool[(start + k) % len(pool)]) for k in range(count))
    return plan


def synthesize_corpus(
    config: SynthConfig,
    output: str,
    *,
    overwrite: bool = False,
    s3: S3Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetManifest:
    """Generate the corpus into a dataset at ``output`` (local path or ``s3://``)."""
    sentences = load_sentences(config.text_file)
    speakers = make_speakers(config)
    plan = assign_sentences(config, speakers, len(sentences))
    chart = F.make_chart(config.num_vertices)
    neutral = {s.id: F.warp(chart, s.shape) for s in speakers}
    tts = EspeakSynthesizer(sample_rate=config.sample_rate)
    total = sum(len(v) for v in plan.values())
    extra = {
        "synth": config.model_dump(),
        "speakers": {s.id: s.model_dump(exclude={"id"}) for s in speakers},
        "sentences": {
            f"sent{i:03d}": sentences[i] for i in sorted({i for v in plan.values() for i in v})
        },
    }
    writer = DatasetWriter(
        output,
        name=f"synthetic-{config.speakers}spk-{config.num_vertices}v-seed{config.seed}",
        source="synthetic",
        topology=chart.topology(),
        templates=neutral,
        fps=config.fps,
        sample_rate=config.sample_rate,
        overwrite=overwrite,
        extra=extra,
        s3=s3,
    )
    done = 0
    for index, speaker in enumerate(speakers):
        shapes = motion.blendshapes(chart, speaker.shape, neutral[speaker.id])
        for sentence in plan[speaker.id]:
            rng = np.random.default_rng([config.seed, index, sentence + 1])
            text = sentences[sentence]
            utterance = tts.synthesize(
                text, voice=speaker.voice, rate=speaker.rate, pitch=speaker.pitch
            )
            num_frames = math.ceil(utterance.duration * config.fps)
            curves = motion.channel_curves(
                utterance.phonemes,
                utterance.audio,
                utterance.sample_rate,
                num_frames,
                config.fps,
                speaker.style,
                text.rstrip().endswith("?"),
                rng,
            )
            writer.add(
                Sequence(
                    sequence_id=f"{speaker.id}_sent{sentence:03d}",
                    speaker=speaker.id,
                    sentence_id=f"sent{sentence:03d}",
                    text=text,
                    audio=utterance.audio,
                    sample_rate=utterance.sample_rate,
                    vertices=motion.animate(neutral[speaker.id], shapes, curves),
                    fps=config.fps,
                ),
                speaker.split,
            )
            done += 1
            if progress is not None:
                progress(done, total)
    return writer.close()
