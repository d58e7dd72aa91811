"""Joining a Ray cluster, or starting the embedded local one, with a deliberate auth mode."""

from __future__ import annotations

import os
from collections.abc import Mapping

import ray
import ray._private.state
from pydantic import BaseModel
from ray.autoscaler._private.util import format_readonly_node_type
from ray.autoscaler.v2.sdk import get_cluster_status
from ray.autoscaler.v2.utils import is_autoscaler_v2

from mmtalker.errors import MMTalkerError
from mmtalker_platform.settings import PlatformSettings

#: The embedded cluster declares this many logical CPUs per core: training workers reserve one
#: each, and data loading needs CPUs beside them, which a 2-core machine would not have left.
LOCAL_CPU_FACTOR = 2
#: Ray Data's read and decode tasks take a CPU each. Data that streams during training needs
#: one beside the workers' CPUs, or those tasks never start and the job waits forever.
DATA_TASK_CPUS = 1.0


class ClusterError(MMTalkerError):
    """The Ray cluster cannot run the job as specified."""


class ClusterLimits(BaseModel):
    """The cluster's resources now, and the most it can grow to (None: no limit is known)."""

    now: dict[str, float]
    ceiling: dict[str, float] | None


def connect(settings: PlatformSettings) -> None:
    """Join ``settings.ray_address`` (set by ``ray job submit`` too) or start a local Ray.

    Ray 2.60 enables token auth on clusters it starts; a client must use its cluster's mode.
    ``RAY_AUTH_MODE`` is set from the settings before Ray reads it, unless the environment
    already chose one (then the settings were read from it anyway).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", settings.ray_auth_mode)
    # Quiet unless verbose: the workers' and actors' output stays in Ray's own log files.
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=settings.verbose)
    else:
        # "local": a cluster of our own, never one a stray `ray start` left its address for.
        ray.init(
            address="local",
            num_cpus=LOCAL_CPU_FACTOR * (os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=settings.verbose,
        )


def session_logs() -> str:
    """Where the connected Ray session keeps its workers' and actors' output (on its nodes)."""
    # Ray exposes the folder only on its node object; the dashboard and `ray logs` read it too.
    return ray._private.worker._global_node.get_logs_dir_path()


def cluster_limits() -> ClusterLimits:
    """Resources of the connected cluster now and the most its autoscaler may add.

    The ceiling is the autoscaler's published cluster config where there is one (what Ray
    Train and Ray Data read too); else unknown when an autoscaler v2 runs with named node
    groups (KubeRay, which publishes no config in Ray 2.60); else what the nodes have now.
    """
    now = {key: float(value) for key, value in ray.cluster_resources().items()}
    published = ray._private.state.state.get_max_resources_from_cluster_config()
    if published:
        keys = now.keys() | published.keys()
        return ClusterLimits(
            now=now, ceiling={k: max(now.get(k, 0.0), float(published.get(k, 0))) for k in keys}
        )
    return ClusterLimits(now=now, ceiling=None if _autoscaler_adds_nodes() else now)


def _autoscaler_adds_nodes() -> bool:
    if not is_autoscaler_v2(fetch_from_server=True):
        return False
    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    # A cluster without a node provider (plain `ray start`) runs the autoscaler read-only, and
    # it names each node's type after the node; KubeRay names them after worker groups.
    return any(
        node.ray_node_type_name
        and node.ray_node_type_name != format_readonly_node_type(node.node_id)
        for node in status.active_nodes + status.idle_nodes
    )


def check_capacity(
    resources_per_worker: Mapping[str, float], workers: int, streams_data: bool
) -> None:
    """Refuse a job the cluster can never run: its training workers, plus a CPU for Ray Data's
    tasks when data streams during training (cached data is read before the workers start).

    An autoscaling cluster is measured by what it can grow to; one whose limit is unknown is
    trusted to add the nodes.
    """
    needed = {key: amount * workers for key, amount in resources_per_worker.items()}
    if streams_data:
        needed["CPU"] = needed.get("CPU", 0.0) + DATA_TASK_CPUS
    limits = cluster_limits()
    if limits.ceiling is None:
        return
    short = {k: v for k, v in needed.items() if v > limits.ceiling.get(k, 0.0) + 1e-9}
    if not short:
        return
    grows = limits.ceiling != limits.now
    asked = ", ".join(f"{v:g} {k}" for k, v in short.items())
    has = ", ".join(f"{limits.ceiling.get(k, 0.0):g} {k}" for k in short)
    data = f" (with {DATA_TASK_CPUS:g} CPU for streaming data)" if streams_data else ""
    raise ClusterError(
        f"{workers} training workers need {asked}{data}, but the cluster "
        f"{'can grow to at most' if grows else 'has'} {has}"
        f"{'' if grows else ' and no autoscaler to add nodes'}; use fewer workers or smaller "
        "scaling resources" + (", set cache_data: true" if streams_data else "") + ", or add nodes"
    )
