"""End to end on real components: Ray Train (2 CPU workers), shards on S3, MLflow on sqlite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest

from mmtalker.data.shards import open_dataset
from mmtalker_platform import registry
from mmtalker_platform.redaction import REDACTED
from mmtalker_platform.registry import EvaluationSet
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import RaySpec, TrainJobSpec
from mmtalker_platform.train import TrainingError, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Credentials as README tells users to pass them; no byte of them may reach MLflow.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-Value-9f2", "MLFLOW_TRACKING_TOKEN": "tok-Value-77a"}


def _spec(job: dict[str, Any], name: str, data: str, storage: Path, epochs: int) -> TrainJobSpec:
    return TrainJobSpec.model_validate(
        {
            **job,
            "name": name,
            "data": data,
            "train": {**job["train"], "epochs": epochs},
            "checkpoint": {"storage": str(storage), "num_to_keep": 2},
            "max_failures": 2,
        }
    )


def test_two_workers_train_track_and_register(
    local_ray: None,
    tiny_corpus_s3: str,
    tmp_path: Path,
    work_dir: Path,
    small_job: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = PlatformSettings(work_dir=work_dir)
    spec = _spec(small_job, "two-workers", tiny_corpus_s3, tmp_path / "runs", 2)
    env = {"env_vars": {**SECRETS, "AWS_REGION": "us-east-1"}}
    spec = spec.model_copy(update={"ray": RaySpec(runtime_env=env)})
    outcome = run_training(spec, settings)
    assert outcome.epochs == 2 and outcome.resumes == 0
    assert outcome.test_metrics["test_lve"] > 0
    assert outcome.version.version == 1
    assert set(outcome.version.aliases) == {"candidate", "champion"}
    assert outcome.version.tested_on == EvaluationSet.of(open_dataset(tiny_corpus_s3).manifest)
    # The driver tells the story: a line per stage and per epoch, read from MLflow.
    story = capsys.readouterr().out.splitlines()
    epochs = [line for line in story if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "train loss" in epochs[0] and "frames/s" in epochs[0] and "val LVE" in epochs[0]
    assert any(line.startswith("reading the training split of s3://") for line in story)

    client = mlflow.MlflowClient(settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "4"
    env_vars = "ray.runtime_env.env_vars"
    assert run.data.params[f"{env_vars}.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert run.data.params[f"{env_vars}.AWS_REGION"] == "us-east-1"
    _assert_no_secret_in(work_dir / "mlflow")  # database, params, tags, artifacts
    history = client.get_metric_history(outcome.run_id, "val_lve")
    assert [m.step for m in history] == [1, 2]
    assert "test_lve" in run.data.metrics
    # The test evaluation's report, beside the static baseline, is part of the run.
    report = {a.path for a in client.list_artifacts(outcome.run_id, "report")}
    assert report == {"report/report.html", "report/report_files"}
    files = {
        a.path.rsplit("/", 1)[1]
        for a in client.list_artifacts(outcome.run_id, "report/report_files")
    }
    assert "mmtalker_heatmap.png" in files and any(f.endswith(".mp4") for f in files)
    # Re-running the finished job under its name resumes from its last checkpoint, where no
    # epoch is left: nothing is trained and no duplicate version is registered.
    with pytest.raises(TrainingError, match="already trained all 2 epochs"):
        run_training(spec, settings)
    assert [v.version for v in registry.list_versions(settings.tracking_uri, "mmtalker")] == [1]
    # Raising the epoch count continues the same Ray Train run from epoch 2; with two
    # validations over 4 epochs, only epoch 4 validates (and checkpoints), every epoch prints.
    train = spec.train.model_copy(update={"epochs": 4, "validations": 2})
    capsys.readouterr()
    more = run_training(spec.model_copy(update={"train": train}), settings)
    assert more.epochs == 4 and more.version.version == 2
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in resumed] == ["epoch 3/4", "epoch 4/4"]
    assert "val LVE" not in resumed[0] and "val LVE" in resumed[1]
    assert [m.step for m in client.get_metric_history(more.run_id, "val_lve")] == [4]


def _assert_no_secret_in(folder: Path) -> None:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "train.yaml" for path in files)  # the spec, uploaded as job/
    for path in files:
        content = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in content, f"{secret} in {path}"
