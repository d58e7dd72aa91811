"""Which articulations a model gets right: its predicted channel activations against the truth.

Usage: python bench/articulation.py --checkpoint DIR [--size bench|demo] [--split test]
                                    [--sentences 40] [--voices festival:kal,festival:slt]

A procedural corpus poses each frame as the speaker's neutral face plus a weighted sum of seven
channel shapes (jaw, lip rounding, spreading, closure, labiodental, blink, brow raise). The
model's predicted displacements are projected onto the speaker's shapes by least squares, which
recovers the truth's own weights exactly, and each channel's predicted weights are compared with
the truth's over the split's sentences (re-synthesised, so the corpus need not be on disk): the
Pearson r, the slope of prediction on truth (below 1: the model hedges) and both spreads. Lip
sync is lost where the mouth channels' r is low; the last column says how much each channel's
error adds to the error of the mouth opening that the lip-sync metric correlates (its covariance
with that error over the error's variance: the shares sum to 1 with what no channel explains).
A last line scores lip sync with the predicted opening shifted against the truth by a few frames:
a peak away from 0 would mean the model animates early or late. The lines after it correlate
the true and the predicted openings with the audio's loudness (log energy per frame) the same
way: a model that opens the mouth with loudness more than the truth does is guessing from level,
not from the phoneme. ``--voices`` re-voices the split (as the accuracy benchmark's proxies do),
to see which articulations an unheard engine costs.
A benchmark: it reports figures and never fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import numpy as np
import torch
from ceiling import spoken_split

from mmtalker.checkpoint import load_checkpoint
from mmtalker.data import motion
from mmtalker.data.sequence import pad_to_frames
from mmtalker.data.synth import Size, SynthConfig, corpus_face
from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import mouth_opening, pearson

OFFSETS = range(-2, 3)


def main() -> None:
    """Print each channel's r, slope and spreads, predicted against true weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--size", default="bench", choices=["demo", "bench"])
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--sentences", type=int, default=40, help="per speaker")
    parser.add_argument(
        "--voices", help="comma-separated voices replacing the speakers' own, e.g. festival:kal"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        model = load_checkpoint(args.checkpoint).model.eval()
    except MMTalkerError as error:
        raise SystemExit(f"error: {error}") from None
    voices = args.voices.split(",") if args.voices else None
    try:
        config = SynthConfig.preset(cast(Size, args.size), face="procedural", voices=voices)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    channels = np.eye(len(motion.CHANNELS))
    truths, predicted, openings, opening_pairs, loudness = [], [], [], [], []
    lips = model.topology.region("lips")
    index = {name: i for i, name in enumerate(model.speakers)}
    for speaker, face, utterance, curves in spoken_split(
        config, corpus_face(config), args.split, args.sentences
    ):
        if len(face.neutral) != model.topology.num_vertices:
            raise SystemExit(
                f"error: {args.checkpoint} animates {model.topology.num_vertices} vertices, the "
                f"procedural {args.size} corpus {len(face.neutral)}: pass a checkpoint trained "
                "on a procedural corpus, and that corpus's --size"
            )
        posed = face.frames(channels)[0]
        shapes = (posed - face.neutral).reshape(len(channels), -1)
        with torch.no_grad():
            displacements = model.predict(
                torch.as_tensor(
                    pad_to_frames(utterance.audio, len(curves), utterance.sample_rate / config.fps),
                    dtype=torch.float32,
                )[None],
                len(curves),
                torch.as_tensor(face.neutral, dtype=torch.float32)[None],
                torch.tensor([index.get(speaker.id, -1)]),
                torch.tensor([len(utterance.audio)]),
            )[0].numpy()
        weights = np.linalg.lstsq(shapes.T, displacements.reshape(len(curves), -1).T, rcond=None)
        truths.append(curves)
        predicted.append(weights[0].T)
        # The opening is linear in the displacements: each channel's weight moves it by the
        # opening of that channel's shape.
        openings.append(mouth_opening(posed, face.neutral, lips))
        opening_pairs.append(
            (mouth_opening(face.neutral + displacements, face.neutral, lips), curves @ openings[-1])
        )
        loudness.append(frame_log_energy(utterance.audio, len(curves)))
    truth, prediction = np.concatenate(truths), np.concatenate(predicted)
    opening_error = np.concatenate([p - t for p, t in opening_pairs])
    channel_errors = np.concatenate(
        [(p - t) * a for t, p, a in zip(truths, predicted, openings, strict=True)]
    )
    print(f"{args.checkpoint}: {args.split} split, {len(truth)} frames")
    print(f"{'channel':<14}{'r':>7}{'slope':>7}{'true sd':>9}{'pred sd':>9}{'opening err':>13}")
    for k, name in enumerate(motion.CHANNELS):
        r = np.corrcoef(truth[:, k], prediction[:, k])[0, 1]
        slope = np.polyfit(truth[:, k], prediction[:, k], 1)[0]
        share = np.cov(channel_errors[:, k], opening_error)[0, 1] / opening_error.var(ddof=1)
        print(
            f"{name:<14}{r:7.3f}{slope:7.2f}{truth[:, k].std():9.3f}{prediction[:, k].std():9.3f}"
            f"{share:13.3f}"
        )
    print(
        "lip sync, prediction k frames late:",
        ", ".join(f"{k:+d} {shifted_r(opening_pairs, k):.3f}" for k in OFFSETS),
    )
    for side, name in ((1, "truth"), (0, "prediction")):
        pairs = [(pair[side], energy) for pair, energy in zip(opening_pairs, loudness, strict=True)]
        print(
            f"loudness against the {name}'s opening k frames late:",
            ", ".join(f"{k:+d} {shifted_r(pairs, k):.3f}" for k in OFFSETS),
        )


def frame_log_energy(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Log mean square of the audio in each of ``num_frames`` equal spans, ``(num_frames,)``."""
    # Audio is many samples per frame, so every span is non-empty.
    edges = np.linspace(0, len(audio), num_frames + 1).round().astype(int)
    sums = np.add.reduceat(np.square(audio.astype(np.float64)), edges[:-1])
    return np.log(sums / np.diff(edges) + 1e-10)


def shifted_r(pairs: list[tuple[np.ndarray, np.ndarray]], k: int) -> float:
    """Pearson r over all frames of ``(late, reference)`` signal pairs, pairing each reference
    frame t with frame t + k of the other."""
    late = np.concatenate([a[max(k, 0) : len(a) + min(k, 0)] for a, _ in pairs])
    reference = np.concatenate([b[max(-k, 0) : len(b) + min(-k, 0)] for _, b in pairs])
    return pearson(late, reference)


if __name__ == "__main__":
    main()
