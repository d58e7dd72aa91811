"""A training job end to end on real components: two worker nodes (ray.cluster_utils.Cluster)
with one training worker on each, shards and checkpoints on S3, MLflow on sqlite, a worker
killed mid-run that the job survives, and the finished job continued with more epochs.

The job runs once per module (a fixture): each test checks one part of what it left behind."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import mlflow
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from mmtalker.data.shards import open_dataset
from mmtalker_platform import registry
from mmtalker_platform.redaction import REDACTED
from mmtalker_platform.registry import EvaluationSet
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import TrainingError, TrainingOutcome, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Credentials as README tells users to pass them; no byte of them may reach MLflow.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-Value-9f2", "MLFLOW_TRACKING_TOKEN": "tok-Value-77a"}


@pytest.fixture(scope="module")
def two_nodes(aws_environment: dict[str, str]) -> Iterator[Cluster]:
    """A head for the driver and data tasks, and two nodes that each fit one training worker."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _train_workers(state: str | None = None) -> dict[str, tuple[int, str]]:
    """This cluster's Ray Train workers: actor id → (pid, node id)."""
    filters = [("class_name", "=", "RayTrainWorker")]
    if state:
        filters.append(("state", "=", state))
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, filters=filters, detail=True
    )
    return {actor.actor_id: (actor.pid, actor.node_id) for actor in actors}


def _kill_a_worker_mid_run(checkpoints: Callable[[], int], done: threading.Event) -> list[int]:
    """SIGKILL one of the run's training workers once a checkpoint is surely registered.

    The worker is found first (the state API is slow under load), then killed the moment the
    second checkpoint appears: a checkpoint's objects appear while it is uploaded, before Ray
    Train records it, so the first is on record by then.
    """
    pid = None
    while not done.is_set():
        if pid is None:
            alive = [p for p, _ in _train_workers("ALIVE").values()]
            pid = max(alive) if alive else None
        elif checkpoints() >= 2:
            os.kill(pid, signal.SIGKILL)
            return [pid]
        time.sleep(0.1)
    return []


@dataclass
class KilledWorkerRun:
    """What the module's training job left: its outcome, spec, settings, printed lines, the
    pids killed mid-run and the checkpoint objects on S3."""

    outcome: TrainingOutcome
    spec: TrainJobSpec
    settings: PlatformSettings
    story: list[str]
    killed: list[int]
    checkpoint_keys: list[str]


@pytest.fixture(scope="module")
def killed_worker_run(
    two_nodes: Cluster, tiny_corpus_s3: str, s3_endpoint: str, small_job: dict[str, Any],
    make_work_dir: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory,
) -> KilledWorkerRun:  # fmt: skip
    """Four epochs on the two nodes, one worker SIGKILLed once a checkpoint is on S3."""
    work_dir = make_work_dir(tmp_path_factory.mktemp("killed"))
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
        region_name="us-east-1",
    )  # fmt: skip
    s3.create_bucket(Bucket=bucket)

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def checkpoints() -> int:
        return len(
            {k.split("/checkpoint_")[1].split("/")[0] for k in keys() if "/checkpoint_" in k}
        )

    spec = TrainJobSpec.model_validate(
        {
            **small_job,
            "name": "two-nodes",
            "data": tiny_corpus_s3,
            "train": {**small_job["train"], "epochs": 4},
            "scaling": {"workers": 2, "resources_per_worker": {"trainer_slot": 1}},
            "checkpoint": {"storage": f"s3://{bucket}/runs", "num_to_keep": 2},
            "max_failures": 2,
            "ray": {"runtime_env": {"env_vars": {**SECRETS, "AWS_REGION": "us-east-1"}}},
        }
    )
    settings = PlatformSettings(work_dir=work_dir)
    done = threading.Event()
    outcome: list[TrainingOutcome] = []
    printed = io.StringIO()

    def train() -> None:
        try:
            outcome.append(run_training(spec, settings))
        finally:
            done.set()

    with contextlib.redirect_stdout(printed):
        thread = threading.Thread(target=train)
        thread.start()
        killed = _kill_a_worker_mid_run(checkpoints, done)
        thread.join()
    assert outcome, f"the job failed; it printed:\n{printed.getvalue()}"
    return KilledWorkerRun(
        outcome[0], spec, settings, printed.getvalue().splitlines(), killed, keys()
    )


def test_training_spans_two_nodes_and_survives_a_killed_worker_with_s3_checkpoints(
    killed_worker_run: KilledWorkerRun,
) -> None:
    run = killed_worker_run
    assert run.killed, "the run ended before a worker could be killed"
    # Every epoch was trained once: the restarted workers resumed from the checkpoint on S3.
    assert run.outcome.epochs == 4 and run.outcome.resumes == 1
    assert run.outcome.version.version == 1
    assert set(run.outcome.version.aliases) == {"candidate", "champion"}
    assert len({node for _, node in _train_workers().values()}) == 2
    assert any(
        "/checkpoint_" in k and k.endswith("model/model.safetensors") for k in run.checkpoint_keys
    )
    # The model folder the job reports is the registered checkpoint's, on S3.
    bucket, key = run.outcome.model.removeprefix("s3://").split("/", 1)
    assert run.spec.checkpoint.storage.startswith(f"s3://{bucket}/")
    assert f"{key}/model.safetensors" in run.checkpoint_keys


def test_the_driver_tells_the_story_and_mlflow_keeps_the_run_without_secrets(
    killed_worker_run: KilledWorkerRun, tiny_corpus_s3: str
) -> None:
    run = killed_worker_run
    # A line per stage and per epoch (read from MLflow as the workers log them), each epoch
    # once although a worker died and the group restarted.
    epochs = [line for line in run.story if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == [f"epoch {e}/4" for e in range(1, 5)]
    assert "train loss" in epochs[0] and "frames/s" in epochs[0] and "val LVE" in epochs[0]
    assert any(line.startswith("reading the training split of s3://") for line in run.story)
    outcome = run.outcome
    assert outcome.test_metrics["test_lve"] > 0
    assert outcome.version.tested_on == EvaluationSet.of(open_dataset(tiny_corpus_s3).manifest)

    client = mlflow.MlflowClient(run.settings.tracking_uri)
    record = client.get_run(outcome.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.params["train.batch_size"] == "4"
    env_vars = "ray.runtime_env.env_vars"
    assert record.data.params[f"{env_vars}.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert record.data.params[f"{env_vars}.AWS_REGION"] == "us-east-1"
    _assert_no_secret_in(run.settings.work_dir / "mlflow")  # database, params, tags, artifacts
    history = client.get_metric_history(outcome.run_id, "val_lve")
    assert {m.step for m in history} == {1, 2, 3, 4}
    assert "test_lve" in record.data.metrics
    # The test evaluation's report, beside the static baseline, is part of the run.
    report = {a.path for a in client.list_artifacts(outcome.run_id, "report")}
    assert report == {"report/report.html", "report/report_files"}
    files = {
        a.path.rsplit("/", 1)[1]
        for a in client.list_artifacts(outcome.run_id, "report/report_files")
    }
    assert "mmtalker_heatmap.png" in files and any(f.endswith(".mp4") for f in files)


def test_a_finished_job_is_not_rerun_but_continues_when_its_epochs_are_raised(
    killed_worker_run: KilledWorkerRun, capsys: pytest.CaptureFixture[str]
) -> None:
    run = killed_worker_run
    # Re-running the finished job under its name resumes from its last checkpoint, where no
    # epoch is left: nothing is trained and no duplicate version is registered.
    with pytest.raises(TrainingError, match="already trained all 4 epochs"):
        run_training(run.spec, run.settings)
    tracking_uri = run.settings.tracking_uri
    assert [v.version for v in registry.list_versions(tracking_uri, "mmtalker")] == [1]
    # Raising the epoch count continues the same Ray Train run from epoch 4; with two
    # validations over 6 epochs, only epoch 6 validates (and checkpoints), every epoch prints.
    train = run.spec.train.model_copy(update={"epochs": 6, "validations": 2})
    capsys.readouterr()
    more = run_training(run.spec.model_copy(update={"train": train}), run.settings)
    assert more.epochs == 6 and more.version.version == 2
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in resumed] == ["epoch 5/6", "epoch 6/6"]
    assert "val LVE" not in resumed[0] and "val LVE" in resumed[1]
    client = mlflow.MlflowClient(tracking_uri)
    assert [m.step for m in client.get_metric_history(more.run_id, "val_lve")] == [6]


def _assert_no_secret_in(folder: Path) -> None:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "train.yaml" for path in files)  # the spec, uploaded as job/
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in content, f"{secret} in {path}"
