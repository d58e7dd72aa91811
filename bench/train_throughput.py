"""Training throughput: the plain single-process loop vs Ray Train with 1 and 2 workers.

Usage: python bench/train_throughput.py [--data DIR] [--size demo|tiny] [--epochs 3]
                                        [--batch-size 8] [--out work/bench/train_throughput]

All three train MMTalker (default architecture) on the train split of the same corpus with the
same batch size and crop length, one torch thread per process (what Ray gives a 1-CPU worker):

* plain: ``mmtalker.training.Trainer`` over in-memory sequences, batched by length;
* Ray Train, 1 and 2 workers: the platform's job (``run_training``) on an embedded local Ray,
  shards streamed by Ray Data, DDP over gloo.

The figure is training frames per second (real, unpadded frames), over epochs after the first
(whose start-up the steady state should not carry). For Ray it is read from the per-epoch
metrics the job logs to MLflow, summed over workers. Job wall time (Ray start-up, data pass for
the displacement scale, validation, test scoring and registration) is printed beside it. The
ratios: Ray 1 worker / plain (the Ray overhead; target >= 0.85) and Ray 2 workers / Ray 1
worker (the scaling on this machine's cores). A benchmark: it prints figures, it never fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch

from mmtalker.data.batch import collate
from mmtalker.data.shards import MANIFEST, open_dataset
from mmtalker.data.synth import SynthConfig, synthesize_corpus
from mmtalker.training import (
    TrainConfig,
    Trainer,
    displacement_scale,
    length_batches,
    model_for_dataset,
    training_templates,
)
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import run_training


def plain_loop(data: str, config: TrainConfig) -> list[float]:
    """Frames per second of each epoch of the single-process loop."""
    dataset = open_dataset(data)
    train = list(dataset.sequences("train"))
    templates = training_templates(dataset)
    torch.manual_seed(config.seed)
    model = model_for_dataset("mmtalker", {}, dataset)
    model.displacement_scale.fill_(displacement_scale(train, templates))
    trainer = Trainer(model, config, config.epochs * len(train) // config.batch_size)
    speakers = {name: i for i, name in enumerate(model.speakers)}
    rng = np.random.default_rng(config.seed)
    rates = []
    for _ in range(config.epochs):
        started, frames = time.perf_counter(), 0
        for group in length_batches(train, config.batch_size, rng):
            batch = collate(group, templates, speakers, config.max_frames, rng)
            trainer.step(batch)
            frames += int(batch.frame_lengths.sum())
        rates.append(frames / (time.perf_counter() - started))
    return rates


def ray_job(data: str, config: TrainConfig, workers: int, work: Path) -> dict[str, Any]:
    """Frames per second of each epoch of the platform's job, and its wall time."""
    spec = TrainJobSpec(
        name=f"throughput-{workers}w-{int(time.time())}",
        data=str(Path(data).resolve()),
        train=config,
        scaling={"workers": workers, "cpus_per_worker": 1},
        checkpoint={"storage": str((work / "runs").resolve())},
        mlflow={"experiment": "throughput", "registered_model": "throughput"},
    )
    settings = PlatformSettings(work_dir=work)
    started = time.perf_counter()
    outcome = run_training(spec, settings)
    wall = time.perf_counter() - started
    history = mlflow.MlflowClient(settings.tracking_uri).get_metric_history(
        outcome.run_id, "train_frames_per_s"
    )
    return {"rates": [m.value for m in sorted(history, key=lambda m: m.step)], "wall_s": wall}


def steady(rates: list[float]) -> float:
    """Mean over epochs after the first (all of them when there is only one)."""
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--data", default=None, help="corpus folder (default work/datasets/SIZE)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--out", default="work/bench/train_throughput")
    args = parser.parse_args()
    # One thread per process everywhere: Ray sets OMP_NUM_THREADS=1 in 1-CPU workers.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    data = args.data or f"work/datasets/{args.size}"
    if not (Path(data) / MANIFEST).is_file():
        print(f"synthesising the {args.size} corpus into {data} ...", file=sys.stderr)
        synthesize_corpus(SynthConfig.preset(args.size), data)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device="cpu")
    out = Path(args.out)
    print("plain loop ...", file=sys.stderr, flush=True)
    plain = plain_loop(data, config)
    jobs = {}
    for workers in (1, 2):
        print(f"Ray Train, {workers} worker(s) ...", file=sys.stderr, flush=True)
        jobs[workers] = ray_job(data, config, workers, out / f"work-{workers}")
    ray.shutdown()

    rows = {"plain": steady(plain), "ray_1": steady(jobs[1]["rates"])}
    rows["ray_2"] = steady(jobs[2]["rates"])
    overhead = rows["ray_1"] / rows["plain"]
    scaling = rows["ray_2"] / rows["ray_1"]
    print(f"corpus {data}, {args.epochs} epochs, batch {args.batch_size}, 1 thread per process")
    print(f"{'run':<22}{'frames/s':>10}{'per epoch':>40}{'job wall s':>12}")
    print(f"{'plain loop':<22}{rows['plain']:>10.0f}{[round(r) for r in plain]!s:>40}")
    for workers in (1, 2):
        job = jobs[workers]
        per_epoch = str([round(r) for r in job["rates"]])
        print(
            f"{f'Ray Train {workers} worker(s)':<22}{rows[f'ray_{workers}']:>10.0f}"
            f"{per_epoch:>40}{job['wall_s']:>12.0f}"
        )
    print(f"\nRay 1 worker / plain loop   {overhead:.3f}  (target >= 0.85)")
    print(f"Ray 2 workers / 1 worker    {scaling:.3f}  (on {os.cpu_count()} cores)")
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "corpus": data, "epochs": args.epochs, "batch_size": args.batch_size,
        "plain": plain, "ray": jobs, "steady": rows, "overhead_ratio": overhead,
        "scaling_2_over_1": scaling,
    }  # fmt: skip
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
