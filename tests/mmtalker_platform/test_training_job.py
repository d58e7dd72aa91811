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
import ray
from ray.util.state import list_actors

from mmtalker.data.shards import open_dataset
from mmtalker_platform import registry
from mmtalker_platform.redaction import REDACTED
from mmtalker_platform.registry import EvaluationSet
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import RaySpec, TrainJobSpec
from mmtalker_platform.train import TrainingError, TrainingOutcome, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Credentials as README tells users to pass them; no byte of them may reach MLflow.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-Value-9f2", "MLFLOW_TRACKING_TOKEN": "tok-Value-77a"}


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


def test_two_workers_train_track_and_register(
    local_ray: None,
    tiny_corpus_s3: str,
    tmp_path: Path,
    work_dir: Path,
    small_job: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = PlatformSettings(work_dir=work_dir)
    spec = _spec(small_job, "two-workers", tiny_corpus_s3, tmp_path / "runs", 2)
    env = {"env_vars": {**SECRETS, "AWS_REGION": "us-east-1"}}
    spec = spec.model_copy(update={"ray": RaySpec(runtime_env=env)})
    outcome = run_training(spec, settings)
    assert outcome.epochs == 2 and outcome.resumes == 0
    assert outcome.test_metrics["test_lve"] > 0
    assert outcome.version.version == 1
    assert set(outcome.version.aliases) == {"candidate", "champion"}
    assert outcome.version.tested_on == EvaluationSet.of(open_dataset(tiny_corpus_s3).manifest)
    # The driver tells the story: a line per stage and per epoch, read from MLflow.
    story = capsys.readouterr().out.splitlines()
    epochs = [line for line in story if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "train loss" in epochs[0] and "frames/s" in epochs[0] and "val LVE" in epochs[0]
    assert any(line.startswith("reading the training split of s3://") for line in story)

    client = mlflow.MlflowClient(settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "4"
    env_vars = "ray.runtime_env.env_vars"
    assert run.data.params[f"{env_vars}.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert run.data.params[f"{env_vars}.AWS_REGION"] == "us-east-1"
    _assert_no_secret_in(work_dir / "mlflow")  # database, params, tags, artifacts
    history = client.get_metric_history(outcome.run_id, "val_lve")
    assert [m.step for m in history] == [1, 2]
    assert "test_lve" in run.data.metrics
    # The test evaluation's report, beside the static baseline, is part of the run.
    report = {a.path for a in client.list_artifacts(outcome.run_id, "report")}
    assert report == {"report/report.html", "report/report_files"}
    files = {
        a.path.rsplit("/", 1)[1]
        for a in client.list_artifacts(outcome.run_id, "report/report_files")
    }
    assert "mmtalker_heatmap.png" in files and any(f.endswith(".mp4") for f in files)
    # Re-running the finished job under its name resumes from its last checkpoint, where no
    # epoch is left: nothing is trained and no duplicate version is registered.
    with pytest.raises(TrainingError, match="already trained all 2 epochs"):
        run_training(spec, settings)
    assert [v.version for v in registry.list_versions(settings.tracking_uri, "mmtalker")] == [1]
    # Raising the epoch count continues the same Ray Train run from epoch 2; with two
    # validations over 4 epochs, only epoch 4 validates (and checkpoints), every epoch prints.
    train = spec.train.model_copy(update={"epochs": 4, "validations": 2})
    capsys.readouterr()
    more = run_training(spec.model_copy(update={"train": train}), settings)
    assert more.epochs == 4 and more.version.version == 2
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in resumed] == ["epoch 3/4", "epoch 4/4"]
    assert "val LVE" not in resumed[0] and "val LVE" in resumed[1]
    assert [m.step for m in client.get_metric_history(more.run_id, "val_lve")] == [4]


def _assert_no_secret_in(folder: Path) -> None:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "train.yaml" for path in files)  # the spec, uploaded as job/
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in content, f"{secret} in {path}"


def _train_workers(state: str | None = None) -> dict[str, int]:
    filters = [("class_name", "=", "RayTrainWorker")]
    if state:
        filters.append(("state", "=", state))
    # This cluster's own address: other Ray instances on the machine make "auto" ambiguous.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters)
    return {actor.actor_id: actor.pid for actor in actors}


def _kill_a_worker_mid_run(storage: Path, done: threading.Event, earlier: set[str]) -> list[int]:
    """SIGKILL one of this run's training workers once a checkpoint is surely registered.

    The worker is found first (the state API is slow under load), then killed the moment the
    second checkpoint folder appears: a folder appears while it is uploaded, before Ray Train
    records it, so the first is on record by then. Workers of earlier runs are left out:
    their processes may live on as idle Ray workers.
    """
    pid = None
    while not done.is_set():
        if pid is None:
            current = [p for a, p in _train_workers("ALIVE").items() if a not in earlier]
            pid = max(current) if current else None
        elif len(list(storage.glob("*/checkpoint_*"))) >= 2:
            os.kill(pid, signal.SIGKILL)
            return [pid]
        time.sleep(0.05)
    return []


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    local_ray: None, tiny_corpus_s3: str, tmp_path: Path, work_dir: Path,
    small_job: dict[str, Any],
) -> None:  # fmt: skip
    storage = tmp_path / "runs"
    done = threading.Event()
    outcome: list[TrainingOutcome] = []

    def train() -> None:
        try:
            outcome.append(
                run_training(
                    _spec(small_job, "killed", tiny_corpus_s3, storage, 8),
                    PlatformSettings(work_dir=work_dir),
                )
            )
        finally:
            done.set()

    earlier = set(_train_workers())
    thread = threading.Thread(target=train)
    thread.start()
    killed = _kill_a_worker_mid_run(storage, done, earlier)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    assert outcome and outcome[0].epochs == 8
    assert outcome[0].resumes == 1
