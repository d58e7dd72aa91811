"""MLflow tracking helpers on a real sqlite store with local artifacts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mmtalker_platform.tracking import (
    JOB_TAG,
    TRUNCATED,
    TrackingError,
    default_artifact_location,
    finish_run,
    flatten_params,
    log_artifacts,
    log_metrics,
    prepare_tracking,
    start_or_resume_run,
)


def test_prepare_tracking_creates_the_store_and_keeps_artifacts_beside_it(
    mlflow_template: Path, tracking_uri: str, work_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    template = MlflowClient(f"sqlite:///{mlflow_template}").get_experiment_by_name("template")
    assert template is not None
    assert template.artifact_location == str(mlflow_template.parent / "artifacts")

    monkeypatch.chdir(tmp_path)
    experiment = prepare_tracking(tracking_uri, "exp")
    assert prepare_tracking(tracking_uri, "exp") == experiment
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "job", {})
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("a")
    log_artifacts(tracking_uri, run_id, tmp_path / "files", "out")
    stored = work_dir / "mlflow" / "artifacts" / run_id / "artifacts" / "out" / "a.txt"
    assert stored.read_text() == "a"
    assert not (tmp_path / "mlruns").exists()


def test_prepare_tracking_refuses_what_would_misplace_artifacts(tracking_uri: str) -> None:
    prepare_tracking(tracking_uri, "exp")
    with pytest.raises(TrackingError, match="cannot change"):
        prepare_tracking(tracking_uri, "exp", artifact_location="s3://bucket/elsewhere")
    with pytest.raises(TrackingError, match="give the experiment an artifact location"):
        default_artifact_location("postgresql+psycopg2://user@db.invalid/mlflow")
    assert default_artifact_location("http://mlflow:5000") is None


def test_params_are_flattened_to_dotted_keys() -> None:
    params = {
        "train": {"learning_rate": 0.003, "epochs": 2},
        "model": {"config": {"dim": 32, "clusters": [48, 12]}, "extra": {}},
        "name": "job",
        "note": None,
        "text": "x" * 7000,
    }
    flat = flatten_params(params)
    assert flat["train.learning_rate"] == "0.003" and flat["model.config.dim"] == "32"
    assert flat["model.config.clusters"] == "[48, 12]" and flat["model.extra"] == "{}"
    assert flat["note"] == "None" and flat["name"] == "job"
    assert len(flat["text"]) == 6000 and flat["text"].endswith(TRUNCATED)


def test_new_run_logs_flattened_params(tracking_uri: str) -> None:
    experiment = prepare_tracking(tracking_uri, "exp")
    many = {f"p{i}": i for i in range(150)}  # more than one log_batch call may carry
    run_id, resumed = start_or_resume_run(
        tracking_uri, experiment, "job", {"train": {"batch_size": 4}, **many}
    )
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert not resumed and run.info.run_name == "job" and run.data.tags[JOB_TAG] == "job"
    assert run.data.params["train.batch_size"] == "4" and run.data.params["p149"] == "149"


def test_resubmitted_job_resumes_its_unfinished_run(tracking_uri: str) -> None:
    client = MlflowClient(tracking_uri)
    experiment = prepare_tracking(tracking_uri, "exp")
    first, resumed = start_or_resume_run(tracking_uri, experiment, "it's", {"lr": 1})
    assert not resumed
    # A resumed run keeps its params: MLflow refuses to change a logged one.
    assert start_or_resume_run(tracking_uri, experiment, "it's", {"lr": 2}) == (first, True)
    other, resumed = start_or_resume_run(tracking_uri, experiment, "other", {})
    assert other != first and not resumed

    finish_run(tracking_uri, first, "FAILED")
    assert start_or_resume_run(tracking_uri, experiment, "it's", {}) == (first, True)
    assert client.get_run(first).info.status == "RUNNING"
    assert client.get_run(first).data.params == {"lr": "1"}

    finish_run(tracking_uri, first, "FINISHED")
    second, resumed = start_or_resume_run(tracking_uri, experiment, "it's", {"lr": 2})
    assert second != first and not resumed
    assert client.get_run(second).data.params == {"lr": "2"}


def test_metrics_are_logged_per_step_nan_included(tracking_uri: str) -> None:
    experiment = prepare_tracking(tracking_uri, "exp")
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "job", {})
    log_metrics(tracking_uri, run_id, {"loss": 0.5, "val_lve": 2e-5}, step=0)
    log_metrics(tracking_uri, run_id, {"loss": float("nan")}, step=1)
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1]
    assert history[0].value == 0.5 and math.isnan(history[1].value)


def test_logging_a_missing_folder_is_a_clear_error(tracking_uri: str, tmp_path: Path) -> None:
    experiment = prepare_tracking(tracking_uri, "exp")
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "job", {})
    with pytest.raises(TrackingError, match="not a folder"):
        log_artifacts(tracking_uri, run_id, tmp_path / "absent", "out")
