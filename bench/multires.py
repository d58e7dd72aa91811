"""Multiresolution on the ICT head: a model trained on a coarse face animates the full face.

Usage: python bench/multires.py [--coarse 2500] [--budget-minutes 10] [--seed 0] [--jobs 2]
                                [--out work/bench/multires]

Two ICT corpora with the same speakers, sentences, voices and ARKit curves differ only in the
face's resolution: the full face area (9,409 vertices) and a coarse version (``--coarse``
vertices on the same surface). MMTalker trains on each for the same wall-clock budget
(``--jobs 2``: side by side, one thread each); both are then scored on the *full-resolution*
test split. The coarse model is queried at the full face's vertices through its UV chart
(the paper's claim: one model learnt on the continuous surface animates any resolution); the
full model animates its own vertices. The coarse model's score on its own mesh is printed too,
and the static face as the reference. Checkpoints and multires.json go to OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmtalker.checkpoint import build_model, load_checkpoint, save_checkpoint
from mmtalker.data.shards import MANIFEST, open_dataset
from mmtalker.data.synth import ICT_FACE_VERTICES, SynthConfig, synthesize_corpus
from mmtalker.eval.metrics import MetricAccumulator
from mmtalker.inference import Face, animate_face
from mmtalker.rig.head import display_head, head_template
from mmtalker.training import TrainConfig, evaluate, fit, model_for_dataset, training_templates

COLUMNS = (("lve", "LVE e-5", 1e5), ("mve", "MVE mm", 1e3), ("lip_sync", "sync r", 1.0),
           ("mve_lips", "lips mm", 1e3), ("mve_eyes", "eyes mm", 1e3))  # fmt: skip


def corpus(vertices: int, root: Path) -> Path:
    """The demo-sized ICT corpus at ``vertices`` (synthesised if absent)."""
    path = root / f"ict-{vertices}v"
    if not (path / MANIFEST).is_file():
        started = time.perf_counter()
        config = SynthConfig.preset("demo", num_vertices=vertices)
        manifest = synthesize_corpus(config, str(path))
        size = sum(s.bytes for s in manifest.shards) / 2**20
        print(
            f"{path}: {manifest.num_sequences} sequences, {vertices} vertices, {size:.0f} MiB in "
            f"{time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    return path


def train_one(data: Path, out: Path, budget_minutes: float, seed: int) -> None:
    """Worker: train MMTalker within the budget on one corpus; save the best-on-val weights."""
    torch.set_num_threads(1)
    dataset = open_dataset(str(data))
    torch.manual_seed(seed)
    config = TrainConfig(
        epochs=100_000, time_budget_s=budget_minutes * 60, validations=4, device="cpu", seed=seed
    )
    model = model_for_dataset("mmtalker", {}, dataset, config.losses)
    history = fit(model, dataset, config)
    save_checkpoint(
        out, model, training_templates(dataset), dataset.manifest.fps,
        dataset.manifest.sample_rate, {"history": history, "dataset": str(data)},
    )  # fmt: skip


def full_resolution_scores(checkpoint_dir: Path, full: Path) -> dict[str, float]:
    """Scores of a checkpoint trained on a coarse face, queried at the full face's vertices,
    on the full-resolution test split (each test speaker's whole head from their identity)."""
    checkpoint = load_checkpoint(checkpoint_dir)
    dataset = open_dataset(str(full))
    head = display_head(checkpoint.topology)
    speakers = dataset.manifest.extra["speakers"]
    acc = MetricAccumulator.for_topology(dataset.topology)
    for seq in dataset.sequences("test"):
        whole = head.with_identity(np.asarray(speakers[seq.speaker]["identity"], np.float32))
        face = Face(head_template(checkpoint.topology, whole.neutral, head), -1, whole.neutral)
        animation = animate_face(seq.audio, face, checkpoint, sample_rate=seq.sample_rate)
        acc.add(
            animation.vertices[:, :ICT_FACE_VERTICES], seq.vertices, dataset.templates[seq.speaker]
        )
    return acc.result().as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coarse", type=int, default=2500)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default="work/datasets")
    parser.add_argument("--out", default="work/bench/multires")
    parser.add_argument("--train-one", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one:
        train_one(Path(args.train_one[0]), Path(args.train_one[1]), args.budget_minutes, args.seed)
        return
    out = Path(args.out)
    coarse, full = corpus(args.coarse, Path(args.data)), corpus(ICT_FACE_VERTICES, Path(args.data))
    runs = {"coarse": (coarse, out / "coarse"), "full": (full, out / "full")}
    procs = []
    for data, target in runs.values():
        command = [
            sys.executable, __file__, "--train-one", str(data), str(target),
            "--budget-minutes", str(args.budget_minutes), "--seed", str(args.seed),
        ]  # fmt: skip
        procs.append(subprocess.Popen(command))
        if args.jobs < 2:
            procs[-1].wait()
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"training failed: {proc.args}")
    torch.set_num_threads(2)
    full_data = open_dataset(str(full))
    coarse_data = open_dataset(str(coarse))
    static = build_model(
        "static", {}, full_data.topology, training_templates(full_data)
    )  # fmt: skip
    test = list(full_data.sequences("test"))
    rows = {
        "static (full face)": evaluate(static, test, full_data.templates).as_dict(),
        "trained at full resolution": evaluate(
            load_checkpoint(out / "full").model, test, full_data.templates
        ).as_dict(),
        f"trained at {args.coarse} vertices, animating the full face": full_resolution_scores(
            out / "coarse", full
        ),
        f"trained at {args.coarse} vertices, on its own mesh": evaluate(
            load_checkpoint(out / "coarse").model, coarse_data.sequences("test"),
            coarse_data.templates,
        ).as_dict(),
    }  # fmt: skip
    steps = {name: load_checkpoint(out / name).metadata["history"][-1]["steps"] for name in runs}
    print(f"test split of the ICT demo corpus; {args.budget_minutes:g} min of training each; "
          f"steps: coarse {steps['coarse']}, full {steps['full']}")  # fmt: skip
    width = max(len(name) for name in rows)
    print(f"{'':<{width}}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS))
    for name, scores in rows.items():
        print(f"{name:<{width}}" + "".join(f"{scores[k] * f:>10.3f}" for k, _, f in COLUMNS))
    out.mkdir(parents=True, exist_ok=True)
    (out / "multires.json").write_text(json.dumps({"rows": rows, "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
