"""MLflow tracking: experiments, runs that resume by job name, params, metrics and artifacts.

Every helper takes the tracking URI explicitly and talks through ``MlflowClient(tracking_uri)``,
so nothing depends on MLflow's process-global state and a Ray worker needs only the URI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from mmtalker.errors import MMTalkerError

#: Run tag naming the job a run belongs to; a re-submitted job finds its run by it.
JOB_TAG = "mmtalker.job"
TRUNCATED = "...[truncated]"
RunStatus = Literal["FINISHED", "FAILED"]


class TrackingError(MMTalkerError):
    """The tracking store or a run cannot be used as asked."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, or None for any other URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])


def filter_literal(value: str) -> str:
    """``value`` quoted for an MLflow search filter (which has no escape for quotes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} holds both quote characters; MLflow cannot search for it")


def prepare_tracking(
    tracking_uri: str, experiment: str, artifact_location: str | None = None
) -> str:
    """Create the store and the experiment if missing (call from the driver); return its id.

    ``artifact_location`` applies to a new experiment; it defaults to
    :func:`default_artifact_location`.
    """
    database = sqlite_path(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        location = artifact_location or default_artifact_location(tracking_uri)
        return client.create_experiment(experiment, artifact_location=location)
    if existing.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {experiment!r} is deleted in {tracking_uri}; restore it with "
            f"`mlflow experiments restore --experiment-id {existing.experiment_id}` "
            "or choose another experiment name"
        )
    stored = existing.artifact_location.rstrip("/")
    if artifact_location and stored != artifact_location.rstrip("/"):
        raise TrackingError(
            f"experiment {experiment!r} keeps its artifacts in {stored}, not "
            f"{artifact_location}; an experiment's artifact location cannot change, so use "
            "that location or another experiment name"
        )
    return existing.experiment_id


def default_artifact_location(tracking_uri: str) -> str | None:
    """``artifacts/`` beside a sqlite database; None lets a tracking server use its own root."""
    database = sqlite_path(tracking_uri)
    if database is not None:
        return str(database.resolve().parent / "artifacts")
    if urlparse(tracking_uri).scheme.split("+")[0] in DATABASE_ENGINES:
        # MLflow would default to ./mlruns of whichever process creates the experiment.
        raise TrackingError(
            f"{tracking_uri} is a database: give the experiment an artifact location that "
            "every worker can reach (e.g. s3://bucket/mlflow)"
        )
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys; lists as JSON; values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = (
            json.dumps(value, default=str)
            if isinstance(value, list | tuple | Mapping)
            else str(value)
        )
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        flat[name] = text
    return flat


def start_or_resume_run(
    tracking_uri: str, experiment_id: str, job_name: str, params: Mapping[str, Any]
) -> tuple[str, bool]:
    """The unfinished run of ``job_name`` set running again, else a new run with ``params``.

    Returns ``(run_id, resumed)``. Params are logged on a new run only: MLflow refuses to
    change a logged param, and a resumed job keeps the configuration it started with.
    """
    client = MlflowClient(tracking_uri)
    unfinished = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = {filter_literal(job_name)} "
        "and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if unfinished:
        run_id = unfinished[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    run_id = client.create_run(
        experiment_id, run_name=job_name, tags={JOB_TAG: job_name}
    ).info.run_id
    entries = [Param(key, value) for key, value in flatten_params(params).items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    return run_id, False


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log metric values at ``step``, NaN included.

    MLflow 3.17 stores NaN on SQL stores and through a tracking server (and clamps ±inf to
    ±1.8e308); a NaN loss is how a diverged run shows, so it is logged, not dropped.
    """
    client = MlflowClient(tracking_uri)
    timestamp = int(time.time() * 1000)
    entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def log_artifacts(
    tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str
) -> None:
    """Upload the files of ``local_dir`` under ``artifact_path`` of the run's artifacts."""
    if not Path(local_dir).is_dir():
        raise TrackingError(f"cannot log artifacts from {local_dir}: not a folder")
    MlflowClient(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def finish_run(tracking_uri: str, run_id: str, status: RunStatus) -> None:
    """Mark a run as ended with ``status``."""
    MlflowClient(tracking_uri).set_terminated(run_id, status)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def metrics_at(
    tracking_uri: str, run_id: str, step: int, keys: tuple[str, ...]
) -> dict[str, float]:
    """The values of ``keys`` logged at ``step`` (keys not logged there are left out)."""
    client = MlflowClient(tracking_uri)
    return {
        key: metric.value
        for key in keys
        for metric in client.get_metric_history(run_id, key)
        if metric.step == step
    }


def metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    """The steps at which ``key`` was logged in a run (empty if never)."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted(m.step for m in history)
