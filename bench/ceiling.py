"""The best scores an audio-driven model can reach on a synthetic corpus's test split.

Usage: python bench/ceiling.py [--size bench|demo] [--face procedural|ict] [--split test]

The corpus generator drives each face from the sentence (phoneme timing, prominence, pauses,
blinks) and from the speaker's *speaking style*: a gain per channel, drawn at random within
±25 % for every speaker, independent of the voice. A model of unseen test speakers can hear the
sentence but not the style, so its best prediction uses the population's mean gains (1). This
benchmark scores that predictor (``timing-exact, mean style``): every sentence-level detail
exact (even the random blinks), each channel divided by the speaker's gain. Its lip sync is the
ceiling for the lip-sync metric, and its FDD shows how much of the signed split FDD comes from
the test speakers' brow gains alone, per speaker and over the split. Each phoneme's viseme target
also varies at random (``articulation_curves``' ``variability``) and no audio reveals that
either: the third predictor (``... no token variation``) leaves it out of the speech channels,
the best an audio model can do on the lips. The static face is printed beside them. No
training; a few seconds of speech synthesis per speaker.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import cast

import numpy as np

from mmtalker.data import motion
from mmtalker.data.corpus_face import CorpusFace, SpeakerFace
from mmtalker.data.espeak import Utterance
from mmtalker.data.synth import (
    Size,
    Speaker,
    SynthConfig,
    Voices,
    assign_sentences,
    corpus_face,
    load_sentences,
    make_speakers,
    spoken_curves,
)
from mmtalker.data.visemes import SPEECH_CHANNELS, articulation_curves, frame_times
from mmtalker.eval.metrics import MetricAccumulator, fdd_sequence

PREDICTORS = {
    "static face": "static",
    "timing-exact, mean style": "mean",
    "... no token variation": "heard",
}
ROWS = (("lve", 1e5), ("eve", 1e5), ("mve", 1e3), ("fdd", 1e7), ("fdd_abs", 1e7), ("lip_sync", 1))


def spoken_split(
    config: SynthConfig, face: CorpusFace, split: str, per_speaker: int | None = None
) -> Iterator[tuple[Speaker, SpeakerFace, Utterance, np.ndarray]]:
    """The corpus's ``split`` sentences as synthesised on ``face`` (``corpus_face(config)``):
    speaker, their face, utterance and channel curves (frames, len(CHANNELS)); at most
    ``per_speaker`` sentences per speaker."""
    sentences = load_sentences(config.text_file)
    speakers = make_speakers(config)
    plan = assign_sentences(config, speakers, len(sentences))
    voices = Voices(config.sample_rate)
    for index, speaker in enumerate(speakers):
        if speaker.split != split:
            continue
        speaker_face = face.speaker(
            speaker.shape, np.asarray(speaker.identity) if speaker.identity else None
        )
        planned = plan[speaker.id][:per_speaker]
        for _, utterance, curves in spoken_curves(
            config, speaker, index, planned, sentences, voices
        ):
            yield speaker, speaker_face, utterance, curves


def main() -> None:
    """Score the timing-exact, mean-style predictors and the static face on one split."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", choices=["demo", "bench"])
    parser.add_argument("--face", default="procedural", choices=["procedural", "ict"])
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args()
    config = SynthConfig.preset(cast(Size, args.size), face=args.face)
    face = corpus_face(config)
    topology = face.topology
    scores = {name: MetricAccumulator.for_topology(topology) for name in PREDICTORS.values()}
    per_speaker: dict[str, list[float]] = {}
    brow_gains: dict[str, float] = {}
    for speaker, speaker_face, utterance, curves in spoken_split(config, face, args.split):
        gains = np.array([speaker.style.gains[name] for name in motion.CHANNELS])
        neutral = speaker_face.neutral
        truth = speaker_face.frames(curves)[0]
        mean = curves / gains
        mean_style = speaker_face.frames(mean)[0]
        scores["mean"].add(mean_style, truth, neutral)
        heard = mean.copy()
        heard[:, : len(SPEECH_CHANNELS)] = articulation_curves(
            utterance.phonemes, frame_times(len(curves), config.fps), np.random.default_rng(0), 0.0
        )
        scores["heard"].add(speaker_face.frames(heard)[0], truth, neutral)
        scores["static"].add(np.broadcast_to(neutral, truth.shape), truth, neutral)
        per_speaker.setdefault(speaker.id, []).append(
            fdd_sequence(mean_style, truth, neutral, topology.region("upper_face"))
        )
        brow_gains[speaker.id] = speaker.style.gains["brow_raise"]
    results = {name: acc.result().as_dict() for name, acc in scores.items()}
    print(f"{config.face} {args.size} corpus, {args.split} split, {len(per_speaker)} speakers")
    print("predictor                    " + " ".join(f"{key:>9s}" for key, _ in ROWS))
    for label, name in PREDICTORS.items():
        values = " ".join(f"{results[name][key] * scale:9.3f}" for key, scale in ROWS)
        print(f"{label:28s} {values}")
    print("units: LVE, EVE x1e-5; MVE mm; FDD, |FDD| x1e-7 (per-sequence |FDD| mean)")
    for speaker_id, values in per_speaker.items():
        print(
            f"  {speaker_id}: brow gain {brow_gains[speaker_id]:.2f}, "
            f"FDD of the mean-style predictor {np.mean(values) * 1e7:+.2f}"
        )


if __name__ == "__main__":
    main()
