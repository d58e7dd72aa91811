"""Quiet commands: Ray's and the libraries' logs go to a file, one line per stage on screen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# route_logs rewires the process's logging, so it runs in a process of its own.
SCRIPT = """
import logging, os, sys, warnings
import mlflow, ray.data
from mmtalker_platform.console import route_logs, stage
from mmtalker_platform.settings import PlatformSettings

default = ray.data.DataContext.get_current().enable_progress_bars
path = route_logs(PlatformSettings(work_dir=sys.argv[1], verbose=sys.argv[2] == "1"), "job")
logging.getLogger("ray.data").info("ray data says hello")
logging.getLogger("mlflow").warning("mlflow says hello")
warnings.warn("a library warns")
os.write(2, b"native code says hello\\n")  # as Ray's C++ core does
print("python stderr stays", file=sys.stderr)
with stage("reading"):
    pass
print(path, ray.data.DataContext.get_current().enable_progress_bars, default)
print(os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"))
"""


def _run(work: Path, verbose: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(work), "1" if verbose else "0"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@pytest.mark.timeout(240)
def test_library_logs_go_to_a_file_unless_verbose(tmp_path: Path) -> None:
    quiet = _run(tmp_path / "work", verbose=False)
    stage_line, result, mlflow_bars = quiet.stdout.splitlines()
    assert stage_line.startswith("reading ... ") and stage_line.endswith(" s")
    log_file, bars, _ = result.split()
    assert Path(log_file).parent == tmp_path / "work" / "logs" and bars == "False"
    assert mlflow_bars == "false"
    assert "hello" not in quiet.stderr and "warns" not in quiet.stderr
    assert "python stderr stays" in quiet.stderr
    logged = Path(log_file).read_text()
    assert all(
        text in logged
        for text in ("ray data says", "mlflow says", "a library warns", "native code says")
    )

    verbose = _run(tmp_path / "loud", verbose=True)
    # Verbose leaves Ray Data's own choice (it turns bars off by itself on CI terminals).
    path, bars, default = verbose.stdout.splitlines()[-2].split()
    assert path == "None" and bars == default
    assert "ray data says hello" in verbose.stderr and "mlflow says hello" in verbose.stderr
    assert "native code says hello" in verbose.stderr
    assert not (tmp_path / "loud").exists()
