"""The MLflow Model Registry of MMTalker checkpoints: register, list, resolve, promote, load.

A version's files are a checkpoint folder logged as plain run artifacts under ``model/`` (no
pickled code, no MLflow flavour); its test metrics are version tags ``metric.<name>`` and the
test set they were measured on ``dataset.name``/``dataset.fingerprint``, so a listing needs no
run lookups. References: ``NAME`` (latest), ``NAME@ALIAS``, ``NAME/VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from mmtalker.checkpoint import Checkpoint, load_checkpoint
from mmtalker.data.shards import DatasetManifest
from mmtalker.errors import MMTalkerError
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.tracking import filter_literal, log_artifacts, sqlite_path

MODEL_PATH = "model"
METRIC_TAG = "metric."
DATASET_TAG = "dataset."
CANDIDATE = "candidate"
CHAMPION = "champion"
_REF = re.compile(r"(?:models:/)?(?P<name>[^@/:]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[1-9]\d*))?")


class RegistryError(MMTalkerError):
    """A malformed or unknown model reference, an invalid name or alias, or no store to ask."""


class EvaluationSet(BaseModel):
    """What test metrics were measured on: a dataset's name and a fingerprint of its test split
    (shards, templates and topology), so only scores on the same data are compared."""

    name: str
    fingerprint: str

    @classmethod
    def of(cls, manifest: DatasetManifest, split: str = "test") -> EvaluationSet:
        """The test set of a dataset, from its manifest's checksums."""
        content = {
            "shards": sorted(s.sha256 for s in manifest.shards if s.split == split),
            "templates": manifest.templates.sha256,
            "topology": manifest.topology.model_dump(mode="json"),
        }
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return cls(name=manifest.name, fingerprint=digest[:12])

    def __str__(self) -> str:
        return f"{self.name}@{self.fingerprint}"


class ModelVersionInfo(BaseModel):
    """One registered model version with its aliases, test metrics and what it was tested on."""

    name: str
    version: int
    run_id: str | None
    aliases: list[str]
    metrics: dict[str, float]
    tested_on: EvaluationSet | None
    source: str
    created: datetime


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """Split ``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` into (name, alias, version)."""
    match = _REF.fullmatch(ref.strip())
    if match is None:
        raise RegistryError(
            f"malformed model reference {ref!r}; use NAME, NAME@ALIAS or NAME/VERSION "
            "(e.g. mmtalker@champion or mmtalker/3)"
        )
    version = match["version"]
    return match["name"], match["alias"], int(version) if version else None


def register(
    tracking_uri: str,
    run_id: str,
    checkpoint_dir: str | Path,
    name: str,
    metrics: Mapping[str, float],
    tested_on: EvaluationSet | None = None,
    better: str = "lve",
) -> ModelVersionInfo:
    """Log a checkpoint folder to the run and register it as a new version of ``name``.

    The new version becomes ``candidate``; it becomes ``champion`` too when there is none, or
    when the champion was tested on the same ``tested_on`` set and the new ``better`` metric
    (lower is better) beats it. Scores on other or unknown data never move the champion.
    """
    if better not in metrics:
        raise RegistryError(
            f"metrics {sorted(metrics)} lack {better!r}, the one that ranks versions"
        )
    load_checkpoint(checkpoint_dir)  # every registered version must load
    client = _client(tracking_uri)
    log_artifacts(tracking_uri, run_id, checkpoint_dir, MODEL_PATH)
    _ensure_registered_model(client, name)
    created = client.create_model_version(
        name,
        source=f"{client.get_run(run_id).info.artifact_uri}/{MODEL_PATH}",
        run_id=run_id,
        tags={
            **{f"{METRIC_TAG}{key}": str(float(value)) for key, value in metrics.items()},
            **(
                {f"{DATASET_TAG}{key}": value for key, value in tested_on.model_dump().items()}
                if tested_on
                else {}
            ),
        },
    )
    client.set_registered_model_alias(name, CANDIDATE, created.version)
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    current = None if champion is None else client.get_model_version(name, str(champion))
    if current is None or (
        tested_on is not None
        and _tested_on(current) == tested_on
        and _beats(metrics[better], _metrics(current).get(better))
    ):
        client.set_registered_model_alias(name, CHAMPION, created.version)
    return _info(created, client.get_registered_model(name))


def list_versions(tracking_uri: str, name: str | None = None) -> list[ModelVersionInfo]:
    """Versions of one registered model, or of all of them, newest first."""
    client = _client(tracking_uri)
    if name is None:
        models = _all_pages(lambda token: client.search_registered_models(page_token=token))
    else:
        models = [_registered_model(client, name)]
    infos = [
        _info(version, model)
        for model in models
        for version in _all_pages(
            lambda token, model=model: client.search_model_versions(
                f"name = {filter_literal(model.name)}", page_token=token
            )
        )
    ]
    return sorted(infos, key=lambda info: (info.created, info.name, info.version), reverse=True)


def show(tracking_uri: str, ref: str) -> ModelVersionInfo:
    """The version a reference resolves to."""
    client = _client(tracking_uri)
    return _info(*_resolve(client, ref))


def promote(tracking_uri: str, ref: str, alias: str = CHAMPION) -> ModelVersionInfo:
    """Point ``alias`` at the version ``ref`` resolves to, whatever its metrics."""
    client = _client(tracking_uri)
    version, _ = _resolve(client, ref)
    try:
        client.set_registered_model_alias(version.name, alias, version.version)
    except MlflowException as exc:
        raise RegistryError(f"cannot set alias {alias!r}: {exc.message}") from exc
    return _info(version, client.get_registered_model(version.name))


def download(tracking_uri: str, ref: str, dest: Path) -> Path:
    """Download the checkpoint folder of a version into ``dest``; returns it (``dest/model``)."""
    client = _client(tracking_uri)
    version, _ = _resolve(client, ref)
    uri = client.get_model_version_download_uri(version.name, version.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking_uri
    )
    return Path(local)


def load(ref: str, tracking_uri: str | None = None, device: str = "cpu") -> Checkpoint:
    """A ready model from the registry; ``metadata["registry"]`` records the resolved version."""
    uri = tracking_uri or PlatformSettings().tracking_uri
    info = show(uri, ref)
    # Download the version resolved above, so an alias moved meanwhile cannot mix versions.
    with tempfile.TemporaryDirectory(prefix="mmtalker-model-") as tmp:
        checkpoint = load_checkpoint(
            download(uri, f"{info.name}/{info.version}", Path(tmp)), device
        )
    checkpoint.metadata["registry"] = info.model_dump(mode="json")
    return checkpoint


def _client(tracking_uri: str) -> MlflowClient:
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise RegistryError(
            f"no MLflow database at {database}: train a model first, or point "
            "MLFLOW_TRACKING_URI (or --tracking-uri) at your tracking server"
        )
    return MlflowClient(tracking_uri)


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in client.search_registered_models(max_results=50))
    known = f"registered: {', '.join(names)}" if names else "none is registered yet"
    raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}; {known}")


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"invalid model name {name!r}: {exc.message}") from exc
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)


def _resolve(client: MlflowClient, ref: str) -> tuple[ModelVersion, RegisteredModel]:
    name, alias, number = parse_ref(ref)
    model = _registered_model(client, name)
    aliases = {key: int(value) for key, value in model.aliases.items()}
    if alias is not None:
        if alias not in aliases:
            known = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"model {name!r} has no alias {alias!r}; its aliases: {known}")
        number = aliases[alias]
    if number is None:
        latest = client.search_model_versions(
            f"name = {filter_literal(name)}", max_results=1, order_by=["version_number DESC"]
        )
        if not latest:
            raise RegistryError(f"model {name!r} has no versions yet")
        return latest[0], model
    try:
        return client.get_model_version(name, str(number)), model
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    numbers = sorted(
        int(v.version) for v in client.search_model_versions(f"name = {filter_literal(name)}")
    )
    raise RegistryError(
        f"model {name!r} has no version {number}; its versions: "
        f"{', '.join(map(str, numbers)) or 'none'}"
    )


def _info(version: ModelVersion, model: RegisteredModel) -> ModelVersionInfo:
    # search_model_versions leaves ModelVersion.aliases empty in MLflow 3.17; the registered
    # model's alias map is complete.
    number = int(version.version)
    return ModelVersionInfo(
        name=version.name,
        version=number,
        run_id=version.run_id,
        aliases=sorted(a for a, v in model.aliases.items() if int(v) == number),
        metrics=_metrics(version),
        tested_on=_tested_on(version),
        source=version.source,
        created=datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC),
    )


def _metrics(version: ModelVersion) -> dict[str, float]:
    return {
        key.removeprefix(METRIC_TAG): float(value)
        for key, value in version.tags.items()
        if key.startswith(METRIC_TAG)
    }


def _tested_on(version: ModelVersion) -> EvaluationSet | None:
    # Versions registered before test sets were recorded have none: nothing compares to them.
    fields = {
        key.removeprefix(DATASET_TAG): value
        for key, value in version.tags.items()
        if key.startswith(DATASET_TAG)
    }
    return (
        EvaluationSet.model_validate(fields)
        if fields.keys() == EvaluationSet.model_fields.keys()
        else None
    )


def _beats(new: float, current: float | None) -> bool:
    # A champion without a finite score (NaN, or never scored) must not block every successor.
    return math.isfinite(new) and (current is None or not math.isfinite(current) or new < current)


def _all_pages(fetch: Callable[[str | None], Any]) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items
