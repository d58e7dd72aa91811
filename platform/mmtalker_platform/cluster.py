"""Joining a Ray cluster, or starting the embedded local one, with a deliberate auth mode."""

from __future__ import annotations

import os

import ray

from mmtalker.errors import MMTalkerError
from mmtalker_platform.settings import PlatformSettings

#: The embedded cluster declares this many logical CPUs per core: training workers reserve one
#: each, and data loading needs CPUs beside them, which a 2-core machine would not have left.
LOCAL_CPU_FACTOR = 2


class ClusterError(MMTalkerError):
    """The Ray cluster cannot run the job as specified."""


def connect(settings: PlatformSettings) -> None:
    """Join ``settings.ray_address`` (set by ``ray job submit`` too) or start a local Ray.

    Ray 2.60 enables token auth on clusters it starts; a client must use its cluster's mode.
    ``RAY_AUTH_MODE`` is set from the settings before Ray reads it, unless the environment
    already chose one (then the settings were read from it anyway).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", settings.ray_auth_mode)
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=LOCAL_CPU_FACTOR * (os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )


def check_capacity(workers: int, cpus_per_worker: float) -> None:
    """Fail fast when training workers would take every CPU: Ray Data's read and decode tasks
    then never get scheduled, and the job waits forever instead of erroring."""
    total = ray.cluster_resources().get("CPU", 0.0)
    needed = workers * cpus_per_worker
    if needed >= total:
        raise ClusterError(
            f"{workers} workers x {cpus_per_worker} CPU take all {total:g} CPUs of the cluster, "
            "leaving none for reading data; use fewer workers, a smaller "
            "scaling.cpus_per_worker, or more nodes"
        )
