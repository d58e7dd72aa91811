"""ARKit weights recovered by the solver, against the corpus's stored ground-truth weights.

Usage: python bench/arkit_recovery.py [--data work/datasets/demo] [--split test]
                                      [--checkpoint DIR] [--sequences 20]

An ICT corpus stores, per frame, the ARKit-52 weights that posed its vertices. Solving those
vertices back against the speaker's identity-adapted rig (the rig at the corpus's resolution)
measures the solver alone; with ``--checkpoint`` the model's predictions for the same speech are
solved too, on the corpus mesh and on the whole head (what ``mmtalker animate --formats arkit``
writes), which measures what a studio gets. Printed: mean absolute error per driven channel
(weights in [0, 1]), over all 52 channels, and the channels' mean ground-truth activity for scale.
A benchmark: it reports figures and never fails on them.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from mmtalker.checkpoint import load_checkpoint
from mmtalker.data.corpus_face import IctFace
from mmtalker.data.shards import open_dataset
from mmtalker.inference import animate, animate_face, face_of
from mmtalker.rig import ARKIT_NAMES, ArkitSolver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="work/datasets/demo")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--sequences", type=int, default=20)
    args = parser.parse_args()

    dataset = open_dataset(args.data)
    extra = dataset.manifest.extra
    face = IctFace(extra["synth"]["num_vertices"])
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None
    errors: dict[str, list[np.ndarray]] = {"solver on ground truth": []}
    if checkpoint is not None:
        errors |= {"model, corpus mesh": [], "model, whole head": []}
    truth_all = []
    for seq in itertools.islice(dataset.sequences(args.split), args.sequences):
        identity = np.asarray(extra["speakers"][seq.speaker]["identity"], np.float32)
        rig = face.rig.with_identity(identity)
        truth = seq.controls
        truth_all.append(truth)
        errors["solver on ground truth"].append(
            np.abs(ArkitSolver(rig).solve(seq.vertices) - truth)
        )
        if checkpoint is None:
            continue
        template = dataset.templates[seq.speaker]
        predicted = animate(
            seq.audio, template, checkpoint.model, sample_rate=seq.sample_rate,
            model_sample_rate=checkpoint.sample_rate, fps=seq.fps,
        )[: len(truth)]  # fmt: skip
        errors["model, corpus mesh"].append(np.abs(ArkitSolver(rig).solve(predicted) - truth))
        whole = animate_face(seq.audio, face_of(checkpoint, template), checkpoint,
                             sample_rate=seq.sample_rate)  # fmt: skip
        solved = ArkitSolver(whole.rig).solve(whole.vertices)[: len(truth)]
        errors["model, whole head"].append(np.abs(solved - truth))

    truth = np.concatenate(truth_all)
    driven = [i for i in range(len(ARKIT_NAMES)) if truth[:, i].max() > 0]
    print(f"{args.data} {args.split}: {len(truth_all)} sequences, {len(truth)} frames")
    header = f"{'channel':<20} {'GT mean':>8}" + "".join(f" {name[:22]:>22}" for name in errors)
    print(header)
    means = {name: np.concatenate(values).mean(axis=0) for name, values in errors.items()}
    for i in driven:
        row = f"{ARKIT_NAMES[i]:<20} {truth[:, i].mean():8.3f}"
        print(row + "".join(f" {means[name][i]:22.2e}" for name in errors))
    print(f"{'all 52 (MAE)':<20} {truth.mean():8.3f}" + "".join(
        f" {means[name].mean():22.2e}" for name in errors))  # fmt: skip
    print(f"{'driven (MAE)':<20} {truth[:, driven].mean():8.3f}" + "".join(
        f" {means[name][driven].mean():22.2e}" for name in errors))  # fmt: skip


if __name__ == "__main__":
    main()
