"""Where a checkpoint's upper-face dynamics deviation (FDD) comes from.

Usage: python bench/upper_face.py --checkpoint DIR [--data DIR] [--size bench|demo]

On a procedural corpus on disk (``--data``, made with that ``--size``), prints:

* the split FDD of the test split, divided between the brows (the upper face outside the eyes and
  lips) and the eyes within the upper face;
* on the val and the test split (each two held-out speakers, faces and voices), the brows'
  motion predicted against the truth's: the square root of the ratio of the two FDD statistics
  (mean over sentences of the per-vertex temporal std of the squared displacement norm), so 1
  means as much motion and 0.8 means 0.8 times the amplitude;
* every eighth test sentence animated on each speaker's neutral face: whether the brows'
  amplitude comes from the face or from the audio;
* the brow gains of the corpus's speakers (its speaking styles), training speakers' mean last.

A benchmark: it reports figures and never fails on them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import cast

import numpy as np
import torch

from mmtalker.checkpoint import load_checkpoint
from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import open_dataset
from mmtalker.data.synth import Size, SynthConfig, make_speakers
from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import motion_spread
from mmtalker.nn.base import AnimationModel
from mmtalker.training import predictions


def spreads(
    model: AnimationModel,
    sequences: list[Sequence],
    templates: dict[str, np.ndarray],
    parts: dict[str, np.ndarray],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per part and sequence, the truth's and the prediction's motion spread."""
    truth: dict[str, list[float]] = {name: [] for name in parts}
    predicted: dict[str, list[float]] = {name: [] for name in parts}
    for seq, template, vertices in predictions(model, sequences, templates):
        frames = min(len(vertices), len(seq.vertices))
        for name, idx in parts.items():
            truth[name].append(motion_spread(seq.vertices[:frames], template, idx))
            predicted[name].append(motion_spread(vertices[:frames], template, idx))
    return {name: (np.asarray(truth[name]), np.asarray(predicted[name])) for name in parts}


def main() -> None:
    """Print the FDD's parts, the brows' amplitude ratios, the face swap and the brow gains."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("work/datasets/bench"))
    parser.add_argument("--size", default="bench", choices=["demo", "bench"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        model = load_checkpoint(args.checkpoint).model.eval()
        dataset = open_dataset(str(args.data))
    except MMTalkerError as error:
        raise SystemExit(f"error: {error}") from None
    topology = model.topology
    upper, eyes, lips = (np.asarray(topology.region(n)) for n in ("upper_face", "eyes", "lips"))
    parts = {
        "brows": np.setdiff1d(upper, np.union1d(eyes, lips)),
        "eyes": np.intersect1d(upper, eyes),
    }
    test = list(dataset.sequences("test"))
    brows = {"brows": parts["brows"]}
    on_test = spreads(model, test, dataset.templates, parts)
    on_val = spreads(model, list(dataset.sequences("val")), dataset.templates, brows)
    print(f"{args.checkpoint} on {args.data}: split FDD x1e-7 of the test split, by part")
    for name, (truth, predicted) in on_test.items():
        # FDD averages over all upper-face vertices, so each part weighs by its vertex count.
        share = (truth - predicted).mean() * len(parts[name]) / len(upper)
        print(f"  {name:<6} {len(parts[name]):5d} vertices  {share * 1e7:7.2f}")
    print("brows' motion, predicted over true amplitude")
    for split, (truth, predicted) in (("val", on_val["brows"]), ("test", on_test["brows"])):
        print(f"  {split:<5} {np.sqrt(predicted.mean() / truth.mean()):.3f}")
    print("brow motion x1e-7 of every eighth test sentence's audio on each speaker's face")
    for speaker in sorted(dataset.templates):
        on_face = [dataclasses.replace(seq, speaker=speaker) for seq in test[::8]]
        _, predicted = spreads(model, on_face, dataset.templates, brows)["brows"]
        print(f"  {speaker}: {predicted.mean() * 1e7:.1f}")
    config = SynthConfig.preset(cast(Size, args.size), face="procedural")
    gains = {s.id: s.style.gains["brow_raise"] for s in make_speakers(config)}
    training = dataset.manifest.splits["train"].speakers
    print("brow gains: " + ", ".join(f"{s} {g:.2f}" for s, g in gains.items()))
    if set(training) <= set(gains):
        print(f"training speakers' mean: {np.mean([gains[s] for s in training]):.3f}")


if __name__ == "__main__":
    main()
