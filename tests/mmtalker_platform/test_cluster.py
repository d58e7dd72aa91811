"""The capacity check on a fixed local cluster, alone and with autoscaler limits published."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import ray._raylet
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

from mmtalker_platform.cluster import ClusterError, check_capacity, cluster_limits

pytestmark = pytest.mark.timeout(300)


def test_a_fixed_cluster_refuses_jobs_it_can_never_run(local_ray: None) -> None:
    assert cluster_limits().ceiling["CPU"] == 4
    # Cached data is read before the workers start: they may take every CPU.
    check_capacity({"CPU": 1}, 4, streams_data=False)
    check_capacity({"CPU": 1}, 3, streams_data=True)
    # Streaming data needs a CPU beside the workers, or its tasks never run and the job hangs.
    with pytest.raises(
        ClusterError,
        match=r"4 training workers need 5 CPU \(with 1 CPU for "
        r"streaming data\), but the cluster has 4 CPU and no autoscaler",
    ):
        check_capacity({"CPU": 1}, 4, streams_data=True)
    with pytest.raises(ClusterError, match="need 5 CPU, but the cluster has 4 CPU"):
        check_capacity({"CPU": 1}, 5, streams_data=False)
    with pytest.raises(ClusterError, match="need 2 GPU, but the cluster has 0 GPU"):
        check_capacity({"CPU": 1, "GPU": 1}, 2, streams_data=False)


@pytest.fixture
def published_limits(local_ray: None) -> Iterator[None]:
    """Node groups with their most nodes, where Ray's autoscaler publishes them (GCS): the head
    (4 CPUs) and up to three 4-CPU workers, as the cluster launcher's config would give."""
    config = ClusterConfig(
        node_group_configs=[
            NodeGroupConfig(name="head", resources={"CPU": 4}, min_count=1, max_count=1),
            NodeGroupConfig(name="cpu", resources={"CPU": 4}, min_count=0, max_count=3),
        ]
    )
    gcs = ray._private.worker.global_worker.gcs_client
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    gcs.internal_kv_put(key, config.SerializeToString(), True, namespace)
    yield
    gcs.internal_kv_del(key, False, namespace)


def test_an_autoscaling_cluster_is_measured_by_what_it_can_grow_to(published_limits: None) -> None:
    assert cluster_limits().ceiling["CPU"] == 16
    check_capacity({"CPU": 2}, 6, streams_data=True)  # 13 CPUs: more than the nodes have now
    with pytest.raises(ClusterError, match=r"need 17 CPU .*can grow to at most 16 CPU"):
        check_capacity({"CPU": 2}, 8, streams_data=True)
