"""Accuracy at equal training time: MMTalker vs the FaceFormer-style baseline vs the static face.

Usage: python bench/accuracy.py [--size bench|demo] [--data DIR] [--budget-minutes 20]
                                [--out work/bench/accuracy] [--threads N]

Both models train on the train split of one synthetic corpus for the same wall-clock budget
(``TrainConfig.time_budget_s`` with an epoch count too large to reach, so the budget is what
stops them; the per-epoch validation that ``fit`` runs counts against it), then they and the
static template are scored on the held-out test split, whose speakers (voices and faces) and
sentences are all unseen in training. The default corpus is the benchmark size at
work/datasets/bench, synthesised there if absent (about 2 minutes and 3 GB); ``--size demo``
uses the demo corpus instead (work/datasets/demo, synthesised likewise) for a quick check.
"train s" is ``fit``'s wall time: the budget plus the validation pass of the epoch the budget
ran out in, so it exceeds the budget (more for the autoregressive baseline, slower to validate).

A wall-clock budget measures the machine too: other work on it means fewer steps, and unequally
so if the load changes between the two models' turns (the load average at the start is printed).
On a shared machine with few cores, ``--threads 1`` can do several times more steps than one
thread per core, whose every op waits for its slowest thread.

Printed: per model LVE (x1e-5 m²), LVE-L2 (mm), EVE (x1e-5 m²), MVE (mm), FDD (x1e-7 m²),
training steps, training seconds and parameter count; then the ratios the project's accuracy
targets refer to, measured on the benchmark corpus at the default 20-minute budget:

* MMTalker LVE / FaceFormer LVE  (target <= 0.8)
* MMTalker LVE / static LVE      (target <= 0.3)
* MMTalker EVE / FaceFormer EVE  (target < 1: EVE better than FaceFormer)

and MMTalker's learnt sampling density per unit area on the lips and eyes relative to the face
average (1 = area-uniform). Checkpoints go to OUT/mmtalker and OUT/faceformer, the table to
OUT/accuracy.json. A benchmark: it reports figures and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from mmtalker.checkpoint import build_model, save_checkpoint
from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import MANIFEST, Dataset, open_dataset
from mmtalker.data.synth import Size, SynthConfig, synthesize_corpus
from mmtalker.geometry.uv import attach_uv
from mmtalker.nn.base import AnimationModel
from mmtalker.nn.mmtalker import MMTalker
from mmtalker.training import TrainConfig, evaluate, fit

#: Metric, printed label and the factor the published VOCASET tables print it with (metres).
COLUMNS = (
    ("lve", "LVE e-5", 1e5),
    ("lve_l2", "LVE-L2 mm", 1e3),
    ("eve", "EVE e-5", 1e5),
    ("mve", "MVE mm", 1e3),
    ("fdd", "FDD e-7", 1e7),
)
#: More epochs than any budget allows: the time budget is what ends training.
EPOCHS = 100_000
PROGRESS_EVERY_S = 60.0


def load_corpus(path: Path, size: str) -> Dataset:
    """Open the corpus at ``path``, synthesising the ``size`` preset there first if absent."""
    if not (path / MANIFEST).is_file():
        print(f"synthesising the {size} corpus into {path} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        manifest = synthesize_corpus(SynthConfig.preset(cast(Size, size)), str(path))
        print(
            f"  {manifest.num_sequences} sequences, {manifest.audio_seconds / 60:.1f} min of "
            f"audio in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    return open_dataset(str(path))


def parameter_count(model: torch.nn.Module) -> int:
    """Learnable parameters (for MMTalker this includes the sampler's per-triangle logits)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(name: str, model: AnimationModel, dataset: Dataset, config: TrainConfig) -> dict:
    """Fit within the budget; returns steps, seconds and the last epoch's record."""
    last = time.perf_counter()

    def progress(step: int, total: int, logs: dict[str, float]) -> None:
        nonlocal last
        if time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            print(f"  {name}: step {step}, loss {logs['loss']:.4f}", file=sys.stderr, flush=True)

    print(f"training {name} for {config.time_budget_s:.0f} s ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    history = fit(model, dataset, config, progress)
    seconds = time.perf_counter() - started
    return {"steps": int(history[-1]["steps"]), "seconds": seconds, "history": history}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=["bench", "demo"])
    parser.add_argument("--data", default=None, help="corpus folder (default work/datasets/SIZE)")
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--out", default="work/bench/accuracy")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = Path(args.data or f"work/datasets/{args.size}")

    dataset = load_corpus(data, args.size)
    load = os.getloadavg()[0]
    splits = dataset.manifest.splits
    train_templates = {s: dataset.templates[s] for s in splits["train"].speakers}
    topology = attach_uv(dataset.topology, np.mean(list(train_templates.values()), axis=0))
    config = TrainConfig(
        epochs=EPOCHS,
        batch_size=args.batch_size,
        time_budget_s=args.budget_minutes * 60,
        device="cpu",
        seed=args.seed,
    )
    test: list[Sequence] = list(dataset.sequences("test"))

    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, AnimationModel] = {}
    for kind in ("mmtalker", "faceformer"):
        torch.manual_seed(args.seed)
        model = build_model(kind, {}, topology, train_templates)
        run = train(kind, model, dataset, config)
        save_checkpoint(
            out / kind, model, train_templates, dataset.manifest.fps,
            dataset.manifest.sample_rate,
            {"dataset": str(data), "train": config.model_dump(), "history": run["history"]},
        )  # fmt: skip
        models[kind] = model
        rows[kind] = {
            "steps": run["steps"],
            "seconds": run["seconds"],
            "parameters": parameter_count(model),
        }
    models["static"] = build_model("static", {}, topology, train_templates)
    rows["static"] = {"steps": 0, "seconds": 0.0, "parameters": 0}
    for kind, model in models.items():
        print(f"evaluating {kind} on the test split ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rows[kind].update(evaluate(model, test, dataset.templates).as_dict())
        rows[kind]["eval_seconds"] = time.perf_counter() - started

    mmtalker = cast(MMTalker, models["mmtalker"])
    density = {
        region: mmtalker.sampler.density_ratio(topology.region(region))
        for region in ("lips", "eyes")
    }
    ratios = {
        "lve_mmtalker_over_faceformer": ratio(rows["mmtalker"]["lve"], rows["faceformer"]["lve"]),
        "lve_mmtalker_over_static": ratio(rows["mmtalker"]["lve"], rows["static"]["lve"]),
        "eve_mmtalker_over_faceformer": ratio(rows["mmtalker"]["eve"], rows["faceformer"]["eve"]),
        "eve_mmtalker_over_static": ratio(rows["mmtalker"]["eve"], rows["static"]["eve"]),
    }

    print(
        f"corpus {data} ({args.size}): {len(splits['train'].speakers)} training speakers, "
        f"{splits['train'].num_sequences} sequences, {splits['train'].audio_seconds / 60:.1f} min;"
        f" test: {len(splits['test'].speakers)} unseen speakers, {len(test)} sequences "
        f"({splits['test'].audio_seconds / 60:.1f} min); {topology.num_vertices} vertices"
    )
    print(
        f"budget {args.budget_minutes:g} min per model, {args.threads} CPU threads, load average "
        f"at start {load:.1f} (other work on the machine means fewer steps in the budget)"
    )
    header = f"{'model':<11}" + "".join(f"{label:>11}" for _, label, _ in COLUMNS)
    print(header + f"{'steps':>8}{'train s':>9}{'params':>11}")
    for kind, row in rows.items():
        line = f"{kind:<11}" + "".join(f"{row[key] * factor:>11.3f}" for key, _, factor in COLUMNS)
        print(line + f"{row['steps']:>8}{row['seconds']:>9.0f}{row['parameters']:>11,}")
    print()
    print(f"MMTalker LVE / FaceFormer LVE  {ratios['lve_mmtalker_over_faceformer']:6.3f}  (<= 0.8)")
    print(f"MMTalker LVE / static LVE      {ratios['lve_mmtalker_over_static']:6.3f}  (<= 0.3)")
    print(f"MMTalker EVE / FaceFormer EVE  {ratios['eve_mmtalker_over_faceformer']:6.3f}  (< 1)")
    print(f"MMTalker EVE / static EVE      {ratios['eve_mmtalker_over_static']:6.3f}")
    print(
        f"MMTalker sampling density per unit area vs face average: lips {density['lips']:.2f}, "
        f"eyes {density['eyes']:.2f}"
    )

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "corpus": str(data),
        "size": args.size,
        "budget_minutes": args.budget_minutes,
        "threads": args.threads,
        "load_average_at_start": load,
        "num_vertices": topology.num_vertices,
        "test_speakers": splits["test"].speakers,
        "note": "metrics unscaled: metres (lve_l2, eve_l2, mve), m² (lve, eve, fdd)",
        "printed_scale": {key: factor for key, _, factor in COLUMNS},
        "models": rows,
        "ratios": ratios,
        "sampling_density": density,
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    print(f"\ncheckpoints and accuracy.json in {out}")


if __name__ == "__main__":
    main()
