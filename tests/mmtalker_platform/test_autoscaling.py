"""The capacity check on a cluster shaped like k8s/'s KubeRay one: head with no CPUs, autoscaler
v2 on, nodes named after their worker groups; Ray 2.60's autoscaler publishes no limits there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from mmtalker_platform.cluster import check_capacity, cluster_limits

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def kuberay_like(aws_environment: dict[str, str]) -> Iterator[Cluster]:
    """A head as KubeRay starts it for ``autoscalerOptions.version: v2`` (num-cpus 0,
    ``RAY_NODE_TYPE_NAME`` = its group); no node can be added here, but nothing says so."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "env_vars": {"RAY_NODE_TYPE_NAME": "headgroup"},
            "_system_config": {"enable_autoscaler_v2": True},
        },
    )
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_scaling_cluster_with_no_cpus_yet_accepts_training(kuberay_like: Cluster) -> None:
    limits = cluster_limits()
    assert limits.now.get("CPU", 0) == 0 and limits.ceiling is None
    check_capacity({"CPU": 1}, 2, streams_data=True)
    check_capacity({"CPU": 4, "GPU": 1}, 4, streams_data=False)
