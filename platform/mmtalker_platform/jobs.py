"""Submitting job specs to a Ray cluster through the Ray Jobs API, logs streamed back.

``mmtalker submit jobs/train.yaml`` is ``ray job submit --working-dir . -- mmtalker run
jobs/train.yaml`` plus the spec's runtime environment and excludes, a readable submission id,
and an exit status that follows the job's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from mmtalker.errors import MMTalkerError
from mmtalker_platform.redaction import redact_text
from mmtalker_platform.settings import PlatformSettings, relative_path
from mmtalker_platform.spec import JobSpec, load_spec

#: Seconds between status checks when the log stream ends before the job does.
POLL_SECONDS = 2.0


class JobError(MMTalkerError):
    """A job could not be submitted, or ended in a state other than SUCCEEDED."""


def entrypoint(spec_file: str) -> str:
    """The command the cluster runs for a spec (a path inside the working directory)."""
    return f"mmtalker run {shlex.quote(spec_file)}"


def runtime_env(spec: JobSpec, working_dir: Path, settings: PlatformSettings) -> dict[str, object]:
    """The job's runtime environment: the working directory (with excludes) and the spec's.

    The job runs in an unpacked copy of the working directory, so the platform's work folder
    (default MLflow database, local checkpoints) is pinned to the submitter's absolute one.
    """
    env: dict[str, Any] = {**spec.ray.runtime_env}
    env_vars = {"MMTALKER_WORK_DIR": str(settings.work_dir.resolve()), **env.get("env_vars", {})}
    return {
        "working_dir": str(working_dir), "excludes": spec.ray.excludes,
        **env, "env_vars": env_vars,
    }  # fmt: skip


def submit(
    spec_path: Path,
    address: str | None = None,
    settings: PlatformSettings | None = None,
    wait: bool = True,
    echo: Callable[[str], None] = print,
) -> str:
    """Submit a spec from the current directory; stream its logs and return its final status.

    With ``wait`` false, returns the submission id as soon as the cluster accepted the job.
    Everything echoed (the job's own log lines included) has credentials redacted.
    """
    settings = settings or PlatformSettings()
    spec = load_spec(spec_path)
    working_dir = Path.cwd()

    def say(text: str) -> None:
        echo(redact_text(text))

    try:
        relative = spec_path.resolve().relative_to(working_dir)
    except ValueError:
        raise JobError(
            f"{spec_path} is outside the working directory {working_dir}, which is what gets "
            "uploaded; run mmtalker submit from the project folder"
        ) from None
    for field, uri in {**spec.inputs(), **spec.outputs()}.items():
        if uri is not None and relative_path(uri) is not None:
            raise JobError(
                f"{field} {uri!r} is relative to this machine's folder, which the job does not "
                "run in; give an absolute path the cluster can reach, or a URI (s3://...)"
            )
    os.environ.setdefault("RAY_AUTH_MODE", settings.ray_auth_mode)
    url = address or settings.ray_dashboard
    try:
        client = JobSubmissionClient(url)
        submission_id = client.submit_job(
            entrypoint=entrypoint(relative.as_posix()),
            runtime_env=runtime_env(spec, working_dir, settings),
            submission_id=f"{spec.name}-{uuid.uuid4().hex[:8]}",
            entrypoint_num_cpus=spec.ray.entrypoint_num_cpus,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobError(redact_text(f"cannot submit to the Ray cluster at {url}: {exc}")) from exc
    say(f"submitted {submission_id} to {url}")
    if not wait:
        return submission_id
    try:
        asyncio.run(_stream_logs(client, submission_id, say))
    except (OSError, RuntimeError) as exc:  # aiohttp's errors derive from these
        say(f"log stream interrupted ({exc}); waiting for the job to end")
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        time.sleep(POLL_SECONDS)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        raise JobError(f"job {submission_id} ended {status.value}; see its logs above")
    return str(status.value)


async def _stream_logs(
    client: JobSubmissionClient, submission_id: str, echo: Callable[[str], None]
) -> None:
    async for lines in client.tail_job_logs(submission_id):
        echo(lines.rstrip("\n"))
