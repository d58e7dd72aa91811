"""Job specs: the pydantic-validated YAML files users submit (``jobs/train.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmtalker.checkpoint import MODELS
from mmtalker.errors import MMTalkerError
from mmtalker.training import TrainConfig


class SpecError(MMTalkerError):
    """A job spec file is missing, not YAML, or fails validation."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Which model to train: a kind from the model registry and its architecture overrides."""

    kind: str = "mmtalker"
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known(self) -> ModelSpec:
        if self.kind not in MODELS or self.kind == "static":
            trainable = sorted(k for k in MODELS if k != "static")
            raise ValueError(f"unknown model kind {self.kind!r}; trainable kinds: {trainable}")
        MODELS[self.kind].config_class.model_validate(self.config)
        return self


class ScalingSpec(_Strict):
    """Ray Train workers and what each one reserves."""

    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    #: Extra custom resources per worker (e.g. ``{"accelerator_type:H100": 0.01}``).
    resources_per_worker: dict[str, float] = {}


class CheckpointSpec(_Strict):
    """Where runs and checkpoints go; S3 (``s3://bucket/prefix``) is needed across nodes."""

    storage: str | None = None
    num_to_keep: int = Field(2, ge=1)


class MLflowSpec(_Strict):
    """Tracking: experiment name, registered model name, optional tracking URI override."""

    experiment: str = "mmtalker"
    registered_model: str = "mmtalker"
    tracking_uri: str | None = None


class RaySpec(_Strict):
    """How ``mmtalker submit`` packages the job for the Ray Jobs API."""

    runtime_env: dict[str, Any] = {}
    #: Paths left out of the uploaded working directory (gitignore syntax).
    excludes: list[str] = [".venv/", "work/", ".git/", "**/__pycache__/", "*.egg-info/"]
    #: CPUs reserved for the driver; 0 lets it share a node with training workers.
    entrypoint_num_cpus: float = Field(0.0, ge=0)


class TrainJobSpec(_Strict):
    """A training job: data, model, schedule, scaling, checkpoints, tracking and packaging."""

    kind: Literal["train"] = "train"
    #: The run's name: re-running a job with the same name resumes it from its last checkpoint.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    #: Dataset URI (a folder or s3:// prefix holding dataset.json).
    data: str
    model: ModelSpec = ModelSpec()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSpec = ScalingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    #: Worker failures survived per run; each resumes from the latest checkpoint.
    max_failures: int = Field(3, ge=-1)
    #: Rows held for per-epoch shuffling on each worker, on top of shuffled block order.
    shuffle_buffer: int = Field(64, ge=0)
    #: Keep the decoded training split in Ray's object store (spilled to disk past its memory)
    #: so epochs skip reading and decoding; turn off for corpora far beyond the cluster's disk.
    cache_data: bool = True
    mlflow: MLflowSpec = MLflowSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _epochs_bound_the_run(self) -> TrainJobSpec:
        # Every worker would have to stop at the same step; a wall-clock budget cannot promise
        # that, and a worker that stops alone leaves the others waiting in a collective.
        if self.train.time_budget_s is not None:
            raise ValueError("train.time_budget_s is for single-process training; use epochs")
        return self

    def inputs(self) -> dict[str, str | None]:
        """Locations the job reads, by spec field."""
        return {"data": self.data}

    def outputs(self) -> dict[str, str | None]:
        """Locations the job writes results to, by spec field (None: the settings' default)."""
        return {
            "checkpoint.storage": self.checkpoint.storage,
            "mlflow.tracking_uri": self.mlflow.tracking_uri,
        }


class ModelChoice(_Strict):
    """Which model animates: a registered version, or a checkpoint folder instead."""

    #: Registered model (``NAME@ALIAS``, ``NAME/VERSION``, ``NAME``), unless ``checkpoint``.
    model: str | None = "mmtalker@champion"
    #: A checkpoint folder to use instead of the registry.
    checkpoint: str | None = None
    #: MLflow tracking URI of the registry (default: MLFLOW_TRACKING_URI or the local sqlite).
    tracking_uri: str | None = None

    @model_validator(mode="after")
    def _one_model(self) -> ModelChoice:
        if self.checkpoint is not None:
            if "model" in self.model_fields_set and self.model is not None:
                raise ValueError("give model (a registry reference) or checkpoint, not both")
            self.model = None
        if self.model is None and self.checkpoint is None:
            raise ValueError("give model (a registry reference) or checkpoint (a folder)")
        return self


class AnimateJobSpec(ModelChoice):
    """A batch animation job: a catalog of audio, a model, outputs and the actor pool."""

    kind: Literal["animate"] = "animate"
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    #: A folder or s3:// prefix of audio files, or a .csv/.parquet manifest of audio URIs.
    catalog: str
    #: Folder or s3:// prefix for per-item outputs and the results manifest.
    output: str
    #: Output formats besides the npz that is always written.
    formats: list[Literal["npz", "glb", "obj", "arkit"]] = ["npz"]
    #: Training speaker whose face animates items that name no speaker or template.
    speaker: str | None = None
    #: Redo items that earlier runs finished (otherwise they are skipped).
    overwrite: bool = False
    #: Items longer than this are recorded as failed instead of animated.
    max_seconds: float = Field(600.0, gt=0)
    #: Model actors; each holds the model once and animates batches of clips.
    actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    #: One GPU per actor; null: when the cluster has GPUs.
    use_gpu: bool | None = None
    #: Clips per model call (similar lengths are padded into one batch).
    batch_size: int = Field(16, ge=1)
    #: Longer audio is animated in chunks of this length (bounds memory).
    chunk_seconds: float = Field(20.0, gt=2)
    #: Locations the job may read and write (s3:// prefixes, absolute paths), manifest rows
    #: included; empty: anywhere. Jobs submitted through Serve get its job_prefixes.
    allowed_prefixes: list[str] = []
    ray: RaySpec = RaySpec()

    def inputs(self) -> dict[str, str | None]:
        """Locations the job reads, by spec field."""
        return {"catalog": self.catalog, "checkpoint": self.checkpoint}

    def outputs(self) -> dict[str, str | None]:
        """Locations the job writes results to, by spec field."""
        return {"output": self.output}


JobSpec = TrainJobSpec | AnimateJobSpec
_KINDS: dict[str, type[TrainJobSpec] | type[AnimateJobSpec]] = {
    "train": TrainJobSpec,
    "animate": AnimateJobSpec,
}


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec; every problem is one :class:`SpecError` line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must be a YAML mapping of spec fields, got {type(raw).__name__}")
    kind = raw.get("kind", "train")
    if kind not in _KINDS:
        raise SpecError(f"{path}: kind {kind!r} is not one of {', '.join(_KINDS)}")
    try:
        return _KINDS[kind].model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SpecError(f"{path}: {problems}") from exc
