"""End to end on real components: Ray Train (2 CPU workers), shards on S3, MLflow on sqlite."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from ray.util.state import list_actors

from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import TrainingOutcome, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _spec(job: dict[str, Any], name: str, data: str, storage: Path, epochs: int) -> TrainJobSpec:
    return TrainJobSpec.model_validate(
        {
            **job,
            "name": name,
            "data": data,
            "train": {**job["train"], "epochs": epochs},
            "checkpoint": {"storage": str(storage), "num_to_keep": 2},
            "max_failures": 2,
        }
    )


def _settings(tmp_path: Path) -> PlatformSettings:
    return PlatformSettings(work_dir=tmp_path / "work")


def test_two_workers_train_track_and_register(
    local_ray: None, tiny_corpus_s3: str, tmp_path: Path, small_job: dict[str, Any]
) -> None:
    settings = _settings(tmp_path)
    spec = _spec(small_job, "two-workers", tiny_corpus_s3, tmp_path / "runs", 2)
    outcome = run_training(spec, settings)
    assert outcome.epochs == 2 and outcome.resumes == 0
    assert outcome.test_metrics["test_lve"] > 0
    assert outcome.version.version == 1
    assert set(outcome.version.aliases) == {"candidate", "champion"}

    client = mlflow.MlflowClient(settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "4"
    history = client.get_metric_history(outcome.run_id, "val_lve")
    assert [m.step for m in history] == [1, 2]
    assert "test_lve" in run.data.metrics
    # Re-running the finished job under its name resumes from its last checkpoint: no epoch is
    # trained again (the new MLflow run logs none), the model is tested and registered again.
    again = run_training(spec, settings)
    assert again.epochs == 2 and again.version.version == 2
    assert again.run_id != outcome.run_id
    assert client.get_metric_history(again.run_id, "val_lve") == []
    assert again.test_metrics == outcome.test_metrics


def _kill_a_worker_after_the_first_checkpoint(storage: Path, done: threading.Event) -> list[int]:
    killed: list[int] = []
    while not done.is_set():
        if any(storage.glob("*/checkpoint_*")):
            workers = list_actors(
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return killed
        time.sleep(0.2)
    return killed


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    local_ray: None, tiny_corpus_s3: str, tmp_path: Path, small_job: dict[str, Any]
) -> None:
    storage = tmp_path / "runs"
    done = threading.Event()
    outcome: list[TrainingOutcome] = []

    def train() -> None:
        try:
            outcome.append(
                run_training(
                    _spec(small_job, "killed", tiny_corpus_s3, storage, 4), _settings(tmp_path)
                )
            )
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    killed = _kill_a_worker_after_the_first_checkpoint(storage, done)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert outcome and outcome[0].epochs == 4
    assert outcome[0].resumes == 1
