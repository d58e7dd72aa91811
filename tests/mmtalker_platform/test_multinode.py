"""Two worker nodes (ray.cluster_utils.Cluster): one training worker on each, checkpoints on S3,
and a worker killed mid-run that the job survives."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import TrainingOutcome, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


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


def test_training_spans_two_nodes_and_survives_a_killed_worker_with_s3_checkpoints(
    two_nodes: Cluster, tiny_corpus_s3: str, s3_endpoint: str, work_dir: Path,
    small_job: dict[str, Any],
) -> None:  # fmt: skip
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
        }
    )
    done = threading.Event()
    outcome: list[TrainingOutcome] = []

    def train() -> None:
        try:
            outcome.append(run_training(spec, PlatformSettings(work_dir=work_dir)))
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    killed = _kill_a_worker_mid_run(checkpoints, done)
    thread.join()
    assert killed, "the run ended before a worker could be killed"
    # Every epoch was trained once: the restarted workers resumed from the checkpoint on S3.
    assert outcome and outcome[0].epochs == 4 and outcome[0].resumes == 1
    assert outcome[0].version.version == 1
    assert len({node for _, node in _train_workers().values()}) == 2
    assert any("/checkpoint_" in k and k.endswith("model/model.safetensors") for k in keys())
