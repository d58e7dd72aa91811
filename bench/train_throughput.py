"""Training throughput: the plain single-process loop vs Ray Train with 1 and 2 workers.

Usage: python bench/train_throughput.py [--data DIR] [--size demo|tiny] [--epochs 3]
                                        [--batch-size 8] [--out work/bench/train_throughput]

All three train MMTalker (default architecture) on the train split of the same corpus with the
same batch size and crop length, one torch thread per process (what Ray gives a 1-CPU worker):

* plain: ``mmtalker.training.Trainer`` over in-memory sequences, batched by length;
* Ray Train, 1 and 2 workers: the platform's job (``run_training``) on an embedded local Ray,
  shards streamed by Ray Data, DDP over gloo.

The figures are training frames (real, unpadded) per wall-clock second and per CPU second of
the training processes (every thread: data loading included), over epochs after the first
(whose start-up the steady state should not carry). For Ray they are read from the per-epoch
metrics the job logs to MLflow, summed over workers. Job wall time (Ray start-up, data pass for
the displacement scale, validation, test scoring and registration) is printed beside them, and
the load average around each run: on a shared machine the wall-clock ratio only means
something between runs under similar load, while the CPU-second ratio is what the platform
itself costs. The ratios: Ray 1 worker / plain (the Ray overhead; target >= 0.9) and Ray 2
workers / Ray 1 worker (the scaling on this machine's cores). A benchmark: it prints figures,
it never fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray
import torch

from mmtalker.data.batch import collate
from mmtalker.data.grouping import length_batches
from mmtalker.data.shards import MANIFEST, open_dataset
from mmtalker.data.synth import SynthConfig, synthesize_corpus
from mmtalker.training import (
    TrainConfig,
    Trainer,
    displacement_scale,
    model_for_dataset,
    training_templates,
)
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import run_training


def plain_loop(data: str, config: TrainConfig) -> dict[str, Any]:
    """Frames per wall-clock and per CPU second of each epoch of the single-process loop."""
    dataset = open_dataset(data)
    train = list(dataset.sequences("train"))
    templates = training_templates(dataset)
    torch.manual_seed(config.seed)
    model = model_for_dataset("mmtalker", {}, dataset)
    model.displacement_scale.fill_(displacement_scale(train, templates))
    trainer = Trainer(model, config, config.epochs * len(train) // config.batch_size)
    speakers = {name: i for i, name in enumerate(model.speakers)}
    rng = np.random.default_rng(config.seed)
    rates, cpu_rates = [], []
    for _ in range(config.epochs):
        started, cpu_started, frames = time.perf_counter(), time.process_time(), 0
        for group in length_batches(train, config.batch_size, rng):
            batch = collate(group, templates, speakers, config.max_frames, rng, config.augment)
            trainer.step(batch)
            frames += int(batch.frame_lengths.sum())
        rates.append(frames / (time.perf_counter() - started))
        cpu_rates.append(frames / (time.process_time() - cpu_started))
    return {"rates": rates, "cpu_rates": cpu_rates}


def ray_job(data: str, config: TrainConfig, workers: int, work: Path) -> dict[str, Any]:
    """Frames per wall-clock and CPU second of each epoch of the platform's job, its wall time."""
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
    client = mlflow.MlflowClient(settings.tracking_uri)

    def history(key: str) -> list[float]:
        metrics = client.get_metric_history(outcome.run_id, key)
        return [m.value for m in sorted(metrics, key=lambda m: m.step)]

    return {
        "rates": history("train_frames_per_s"),
        "cpu_rates": history("train_frames_per_cpu_s"),
        "wall_s": wall,
    }


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s figures with the 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    figures = run()
    return {**figures, "load": [before, os.getloadavg()[0]]}


def steady(rates: list[float]) -> float:
    """Mean over epochs after the first (all of them when there is only one)."""
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="demo", choices=["demo", "tiny"])
    parser.add_argument("--data", default=None, help="corpus folder (default work/datasets/SIZE)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--workers", default="1,2", help="Ray Train worker counts to run")
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
    counts = [int(n) for n in args.workers.split(",")]
    print("plain loop ...", file=sys.stderr, flush=True)
    runs = {"plain": measured(lambda: plain_loop(data, config))}
    for workers in counts:
        print(f"Ray Train, {workers} worker(s) ...", file=sys.stderr, flush=True)
        runs[f"ray_{workers}"] = measured(
            lambda workers=workers: ray_job(data, config, workers, out / f"work-{workers}")
        )
    ray.shutdown()

    steady_rates = {
        name: {"wall": steady(run["rates"]), "cpu": steady(run["cpu_rates"])}
        for name, run in runs.items()
    }
    print(f"corpus {data}, {args.epochs} epochs, batch {args.batch_size}, 1 thread per process")
    print(f"{'run':<22}{'frames/s':>9}{'per CPU s':>10}{'per epoch (wall)':>28}{'job s':>7}  load")
    for name, run in runs.items():
        label = "plain loop" if name == "plain" else f"Ray Train {name[4:]} worker(s)"
        wall = f"{run['wall_s']:.0f}" if "wall_s" in run else "-"
        print(
            f"{label:<22}{steady_rates[name]['wall']:>9.0f}{steady_rates[name]['cpu']:>10.0f}"
            f"{[round(r) for r in run['rates']]!s:>28}{wall:>7}"
            f"  {run['load'][0]:.1f} -> {run['load'][1]:.1f}"
        )
    ratios = {}
    if "ray_1" in runs:
        for kind in ("wall", "cpu"):
            ratios[f"ray_1/plain ({kind})"] = (
                steady_rates["ray_1"][kind] / steady_rates["plain"][kind]
            )
    if "ray_1" in runs and "ray_2" in runs:
        ratios["ray_2/ray_1 (wall)"] = steady_rates["ray_2"]["wall"] / steady_rates["ray_1"]["wall"]
    print()
    for name, ratio in ratios.items():
        print(f"{name:<22}{ratio:>9.3f}")
    print(f"(target ray_1/plain >= 0.9; {os.cpu_count()} cores)")
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "corpus": data, "epochs": args.epochs, "batch_size": args.batch_size, "runs": runs,
        "steady": steady_rates, "ratios": ratios,
    }  # fmt: skip
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
