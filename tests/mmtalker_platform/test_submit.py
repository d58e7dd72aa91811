"""`ray start --head` on 127.0.0.1, then `mmtalker submit` through the Ray Jobs API, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmtalker_platform import registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head_node(aws_environment: dict[str, str], ports: Callable[[], int]) -> Iterator[str]:
    """A Ray head started by the CLI on its own ports; yields its Jobs API URL."""
    dashboard, gcs, agent, client, metrics = (ports() for _ in range(5))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}", "--num-cpus=4", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _write_spec(project: Path, job: dict[str, Any], name: str, data: str) -> Path:
    spec = {
        **job,
        "name": name,
        "data": data,
        "checkpoint": {"storage": str(project / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}"},
    }
    project.mkdir(parents=True, exist_ok=True)
    path = project / "jobs" / "train.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def _submit(project: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mmtalker"), "submit", "jobs/train.yaml", "--address", url],
        cwd=project, capture_output=True, text=True, timeout=500,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip


def test_submit_runs_the_spec_on_the_cluster(
    head_node: str, tiny_corpus: str, tmp_path: Path, small_job: dict[str, Any]
) -> None:
    project = tmp_path / "project"
    _write_spec(project, small_job, "submitted", str(Path(tiny_corpus).resolve()))
    done = _submit(project, head_node)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted submitted-" in done.stdout and "SUCCEEDED" in done.stdout
    assert "registered mmtalker version 1" in done.stdout  # the job's own log, streamed back
    version = registry.show(f"sqlite:///{project / 'mlflow.db'}", "mmtalker@champion")
    assert version.version == 1 and version.metrics["lve"] > 0


def test_a_failing_job_exits_non_zero_with_its_status(
    head_node: str, tmp_path: Path, small_job: dict[str, Any]
) -> None:
    project = tmp_path / "project"
    _write_spec(project, small_job, "broken", str(tmp_path / "no-such-dataset"))
    done = _submit(project, head_node)
    assert done.returncode == 1
    assert "ended FAILED" in done.stderr and "no-such-dataset" in done.stdout
