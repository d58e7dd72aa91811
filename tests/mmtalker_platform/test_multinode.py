"""Two worker nodes (ray.cluster_utils.Cluster): one training worker on each, checkpoints on S3."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec
from mmtalker_platform.train import run_training

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


def test_training_spans_two_nodes_with_s3_checkpoints(
    two_nodes: Cluster, tiny_corpus_s3: str, s3_endpoint: str, work_dir: Path,
    small_job: dict[str, Any],
) -> None:  # fmt: skip
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
        region_name="us-east-1",
    )  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    spec = TrainJobSpec.model_validate(
        {
            **small_job,
            "name": "two-nodes",
            "data": tiny_corpus_s3,
            "scaling": {"workers": 2, "resources_per_worker": {"trainer_slot": 1}},
            "checkpoint": {"storage": f"s3://{bucket}/runs"},
        }
    )
    outcome = run_training(spec, PlatformSettings(work_dir=work_dir))
    assert outcome.epochs == 1 and outcome.version.version == 1
    workers = list_actors(
        address=two_nodes.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert len({w.node_id for w in workers}) == 2
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any("/checkpoint_" in k and k.endswith("model/model.safetensors") for k in keys)
