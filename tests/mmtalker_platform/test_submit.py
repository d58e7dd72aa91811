"""`ray start --head` on 127.0.0.1, then `mmtalker submit` and `ray job submit` through the Ray
Jobs API, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmtalker.checkpoint import load_checkpoint
from mmtalker_platform import registry
from mmtalker_platform.jobs import JobError, submit
from mmtalker_platform.redaction import REDACTED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    """This process's environment (the session's AWS and Ray test variables included), with
    the venv's commands first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _stop_session(session: int) -> None:
    """End every process of one `ray start`: they share its session. `ray stop` would end
    every Ray on the machine, other people's included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
        pids = [int(p) for p, s in (line.split() for line in ps.splitlines()) if int(s) == session]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(3 if pids and sig == signal.SIGTERM else 0)


@pytest.fixture(scope="module")
def head_node(aws_environment: dict[str, str], ports: Callable[[], int]) -> Iterator[str]:
    """A Ray head started by the CLI on its own ports; yields its Jobs API URL.

    Its temporary folder is its own (short: socket paths are limited), so its
    ``ray_current_cluster`` file never sends another process's ``ray.init()`` to it.
    """
    dashboard, gcs, agent, client, metrics = (ports() for _ in range(5))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}", "--num-cpus=4", "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    start = subprocess.Popen(
        command, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert start.wait(timeout=120) == 0, "ray start failed"
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def job(small_job: dict[str, Any]) -> dict[str, Any]:
    """The small job on one worker: what these tests check is the submission, and a second
    worker only adds process start-up on a small machine (two workers: test_multinode)."""
    return {**small_job, "scaling": {"workers": 1, "cpus_per_worker": 1}}


def _write_spec(
    project: Path, job: dict[str, Any], name: str, data: str, tracking_uri: str
) -> Path:
    spec = {
        **job,
        "name": name,
        "data": data,
        "checkpoint": {"storage": str(project / "runs")},
        "mlflow": {"tracking_uri": tracking_uri},
    }
    project.mkdir(parents=True, exist_ok=True)
    path = project / "jobs" / "train.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(project: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=project, capture_output=True, text=True, timeout=500, env=_env()
    )


def _submit(project: Path, url: str) -> subprocess.CompletedProcess[str]:
    return _run(project, str(BIN / "mmtalker"), "submit", "jobs/train.yaml", "--address", url)


def test_submit_runs_the_spec_on_the_cluster(
    head_node: str, tiny_corpus: str, tmp_path: Path, tracking_uri: str, job: dict[str, Any]
) -> None:
    project = tmp_path / "project"
    _write_spec(project, job, "submitted", str(Path(tiny_corpus).resolve()), tracking_uri)
    done = _submit(project, head_node)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted submitted-" in done.stdout and "SUCCEEDED" in done.stdout
    assert "registered mmtalker version 1" in done.stdout  # the job's own log, streamed back
    version = registry.show(tracking_uri, "mmtalker@champion")
    assert version.version == 1 and version.metrics["lve"] > 0


def test_a_failing_job_exits_non_zero_with_its_status(
    head_node: str, tmp_path: Path, tracking_uri: str, job: dict[str, Any]
) -> None:
    project = tmp_path / "project"
    _write_spec(project, job, "broken", str(tmp_path / "no-such-dataset"), tracking_uri)
    done = _submit(project, head_node)
    assert done.returncode == 1
    assert "ended FAILED" in done.stderr and "no-such-dataset" in done.stdout


def test_ray_job_submit_never_leaves_results_in_the_unpacked_working_dir(
    head_node: str, tiny_corpus: str, tmp_path: Path, work_dir: Path, job: dict[str, Any]
) -> None:
    """As README documents it: the default spec with only the data changed. The job runs in
    Ray's temporary copy of the project, so the relative default work folder is refused until
    MMTALKER_WORK_DIR names a lasting one; then the user's `mmtalker models list` sees it."""
    project = work_dir.parent  # the work folder is the project's default one, "work"
    spec = {**job, "name": "raw", "data": str(Path(tiny_corpus).resolve())}
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "train.yaml").write_text(yaml.safe_dump(spec))
    raw = [str(BIN / "ray"), "job", "submit", "--address", head_node, "--working-dir", "."]
    entrypoint = ["--", "mmtalker", "run", "jobs/train.yaml"]

    refused = _run(project, *raw, *entrypoint)
    assert refused.returncode == 1
    assert "error: MMTALKER_WORK_DIR is 'work', relative to Ray's temporary copy" in refused.stdout
    assert "env_vars" in refused.stdout

    env = json.dumps({"env_vars": {"MMTALKER_WORK_DIR": str(work_dir)}})
    done = _run(project, *raw, "--runtime-env-json", env, *entrypoint)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(work_dir.glob("ray_results/raw/checkpoint_*/model/model.safetensors"))
    # The model folder it prints is one the CLI's --checkpoint options load.
    printed = next(line for line in done.stdout.splitlines() if line.startswith("model "))
    assert load_checkpoint(printed.split()[1]).model.kind == "mmtalker"
    # The job's log is a short story; Ray's own logs are in a file it names.
    assert "epoch 1/1: train loss" in done.stdout
    assert f"logs         {work_dir}/logs/" in done.stdout
    assert "TrainController" not in done.stdout and "Execution plan" not in done.stdout
    listed = _run(project, str(BIN / "mmtalker"), "models", "list")
    assert listed.stdout.splitlines()[1].split()[:3] == ["mmtalker", "1", "candidate,champion"]


def test_submit_echoes_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "train.yaml").write_text(yaml.safe_dump({"name": "n", "data": "s3://b/d"}))
    monkeypatch.chdir(project)
    lines: list[str] = []
    # Nothing listens on port 9: the submission fails, and its message must not show the token.
    with pytest.raises(JobError) as error:
        submit(Path("jobs/train.yaml"), "http://ops:t0ps3cret@127.0.0.1:9", echo=lines.append)
    assert "t0ps3cret" not in str(error.value) + "".join(lines)
    assert f"ops:{REDACTED}@127.0.0.1:9" in str(error.value)
