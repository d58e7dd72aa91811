"""``mmtalker models list|show|promote`` on the composed command, against a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmtalker.cli.data import run
from mmtalker_platform import registry
from mmtalker_platform.cli import app
from mmtalker_platform.registry import EvaluationSet
from mmtalker_platform.tracking import prepare_tracking, start_or_resume_run


@pytest.fixture
def talker(tracking_uri: str, checkpoint_dir: Path) -> str:
    """Registry with model ``talker``: versions 1 (champion, LVE 2e-5) and 2 (candidate)."""
    experiment = prepare_tracking(tracking_uri, "exp")
    tested_on = EvaluationSet(name="demo", fingerprint="0123456789ab")
    for lve in (2e-5, 3e-5):
        run_id, _ = start_or_resume_run(tracking_uri, experiment, f"job-{lve}", {})
        metrics = {"lve": lve, "fdd": 4e-7, "mve": 1.5e-3, "eve": 6e-5}
        registry.register(tracking_uri, run_id, checkpoint_dir, "talker", metrics, tested_on)
    return tracking_uri


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, ["models", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_list_prints_an_aligned_table_with_scaled_metrics(talker: str) -> None:
    header, newest, oldest = _invoke("list", "--tracking-uri", talker).splitlines()
    assert header.split()[:5] == ["name", "version", "aliases", "LVE", "x1e-5"]
    assert newest.split()[:8] == [
        "talker", "2", "candidate", "3.000", "4.000", "1.500", "6.000", "demo@0123456789ab",
    ]  # fmt: skip
    assert oldest.split()[:3] == ["talker", "1", "champion"]
    assert header.index("tested on") == newest.index("demo@0123456789ab")
    assert header.index("run") == newest.index(newest.split()[8])


def test_show_resolves_an_alias(talker: str) -> None:
    output = _invoke("show", "talker@champion", "--tracking-uri", talker)
    row = output.splitlines()[1].split()
    assert row[:4] == ["talker", "1", "champion", "2.000"]
    assert "source  " in output and "/artifacts/model" in output


def test_promote_points_the_alias_at_the_version(talker: str) -> None:
    output = _invoke("promote", "talker/2", "--tracking-uri", talker)
    assert output.startswith("talker@champion -> version 2")
    assert registry.show(talker, "talker@champion").version == 2


def test_list_on_an_empty_registry_says_so(tracking_uri: str) -> None:
    assert _invoke("list", "--tracking-uri", tracking_uri).startswith("no registered model")


def test_unknown_model_is_a_one_line_error(
    talker: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", talker)
    assert run(app, ["models", "show", "nope@champion"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no registered model 'nope'") and "talker" in err
    assert err.count("\n") == 1
