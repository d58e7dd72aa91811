"""``mmtalker serve`` as a real process: SIGTERM stops it as cleanly as Ctrl-C does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_sigterm_stops_the_server_and_the_ray_it_started(
    checkpoint_dir: Path, ports: Callable[[], int], tmp_path: Path
) -> None:
    port = ports()
    # A Ray of its own, in a short temporary folder (its socket paths must stay short).
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "mmtalker_platform.cli", "serve", "--checkpoint",
               str(checkpoint_dir), "--port", str(port)]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while not _healthy(port):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        started = psutil.Process(server.pid).children(recursive=True)
        names = {process.name() for process in started}
        assert {"raylet", "gcs_server", "ray::DashboardAgent"} <= names, names

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "SIGTERM: stopping mmtalker" in log.read_text()
        # Every process the server started ends with it: none keeps a port for the next Ray.
        deadline = time.monotonic() + 30
        while (alive := [p.name() for p in started if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive == []
    finally:
        if server.poll() is None:
            server.kill()
        for process in started:
            if _alive(process):
                process.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
