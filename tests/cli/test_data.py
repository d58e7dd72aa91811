"""The installed ``mmtalker`` console script, run as a user would."""

import subprocess
import sys
from pathlib import Path

import pytest

MMTALKER = str(Path(sys.executable).with_name("mmtalker"))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MMTALKER, *args], capture_output=True, text=True, timeout=300, env=env)


def test_synth_tiny_then_info(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = _run("data", "synth", "--tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "vertices" in result.stdout
    info = _run("data", "info", str(out), "--verify")
    assert info.returncode == 0, info.stderr
    for word in ("speakers", "frames", " vertices", "train", "val", "test", "verified"):
        assert word in info.stdout


def test_synth_to_s3_via_standard_aws_variables(s3_env: dict[str, str], s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/tiny"
    result = _run("data", "synth", "--tiny", "--speakers", "3", "--out", uri, env=s3_env)
    assert result.returncode == 0, result.stderr
    info = _run("data", "info", uri, env=s3_env)
    assert info.returncode == 0 and "spk00" in info.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("data", "info", "/definitely/not/here"), "dataset not found"),
        (("data", "synth", "--size", "huge", "--out", "x"), "huge"),
        (("data", "synth", "--tiny", "--vertices", "10", "--out", "x"), "num_vertices"),
        (("data", "synth", "--tiny", "--engine-voices", "awb", "--out", "x"), "flite:NAME"),
        (("data", "prepare", "/definitely/not/here", "--out", "x"), "not"),
        (("data", "info", "gs://bucket/x"), "unsupported storage scheme"),
    ],
)
def test_bad_input_gives_one_line_error_without_traceback(
    args: tuple[str, ...], message: str
) -> None:
    result = _run(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.lower().startswith("error")


def test_malformed_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text('{"schema_version": 1, "name": 3}')
    result = _run("data", "info", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("evaluate", "--bogus"), "No such option: --bogus (see mmtalker evaluate --help)"),
        (("evaluate",), "Missing option '--data'"),
        (("data", "synth", "--size", "huge", "--out", "x"), "'huge' is not one of tiny"),
    ],
)
def test_command_line_errors_are_one_line(args: tuple[str, ...], expected: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr


def test_help_everywhere() -> None:
    for args in ((), ("data",), ("data", "synth"), ("data", "prepare"), ("data", "info")):
        result = _run(*args, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout
