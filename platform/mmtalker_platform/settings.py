"""Where the platform's services are: Ray, MLflow and object storage, from the environment.

Every field follows the variable its tool already reads (``RAY_ADDRESS``,
``MLFLOW_TRACKING_URI``, the ``AWS_*`` family through :class:`mmtalker.storage.S3Settings`), so a
shell configured for those tools configures the platform too. Unset, they give the embedded
defaults: a local Ray started on demand, MLflow on sqlite in the work folder, local storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmtalker.errors import MMTalkerError
from mmtalker.storage import S3Settings


class LocationError(MMTalkerError):
    """A job would write where its results do not survive it."""


def relative_path(location: str) -> str | None:
    """The relative local path a location names (``work``, ``sqlite:///m.db``), else None."""
    if location.startswith("sqlite:"):
        path = location.removeprefix("sqlite:").removeprefix("///").split("?")[0]
    elif location.startswith("file:"):
        path = urlparse(location).path
    elif "://" in location:
        return None
    else:
        path = location
    return None if Path(path).is_absolute() else path


class PlatformSettings(BaseSettings):
    """Addresses of Ray, MLflow and storage; ``MMTALKER_*`` variables for the platform's own."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    #: Work folder for the embedded defaults (sqlite database, local checkpoints).
    work_dir: Path = Field(
        default=Path("work"), validation_alias=AliasChoices("MMTALKER_WORK_DIR", "work_dir")
    )
    #: Ray cluster to join (``auto``, ``ray://host:10001``, ``host:6379``); None starts one.
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("RAY_ADDRESS", "ray_address")
    )
    #: Ray Jobs API (dashboard) URL for ``mmtalker submit``; defaults to the local dashboard.
    ray_dashboard: str = Field(
        default="http://127.0.0.1:8265",
        validation_alias=AliasChoices("MMTALKER_RAY_DASHBOARD", "ray_dashboard"),
    )
    #: Ray 2.60 turns token authentication on for clusters it starts. The embedded local cluster
    #: only listens on 127.0.0.1, so it runs with auth ``disabled`` unless this says ``token``;
    #: a client must use the same mode as its cluster.
    ray_auth_mode: Literal["disabled", "token"] = Field(
        default="disabled", validation_alias=AliasChoices("RAY_AUTH_MODE", "ray_auth_mode")
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri")
    )
    #: Ray's and the libraries' own logs on the terminal; otherwise they go to a file in
    #: ``WORK/logs`` and commands print one line per stage.
    verbose: bool = Field(
        default=False, validation_alias=AliasChoices("MMTALKER_VERBOSE", "verbose")
    )
    #: What Ray Jobs tells a job's entrypoint about its runtime environment (JSON); a
    #: ``working_dir`` in it means the job runs in a temporary unpacked copy of that folder.
    ray_job_config: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_JOB_CONFIG_JSON_ENV_VAR", "ray_job_config"),
    )

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: the configured one, or sqlite in the work folder."""
        if self.mlflow_tracking_uri:
            self.check_durable(self.mlflow_tracking_uri, "MLFLOW_TRACKING_URI")
            return self.mlflow_tracking_uri
        self.check_durable(str(self.work_dir), "MMTALKER_WORK_DIR")
        return f"sqlite:///{(self.work_dir / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def local_storage(self) -> Path:
        """Default root for Ray Train's checkpoints and results when a spec names none."""
        self.check_durable(str(self.work_dir), "MMTALKER_WORK_DIR")
        return (self.work_dir / "ray_results").resolve()

    @property
    def in_unpacked_working_dir(self) -> bool:
        """True in a Ray job started with a working directory: it runs in a temporary copy."""
        if not self.ray_job_config:
            return False
        return bool(json.loads(self.ray_job_config).get("runtime_env", {}).get("working_dir"))

    def check_durable(self, location: str, setting: str) -> None:
        """Refuse a relative ``location`` for results when the job runs in Ray's temporary copy
        of its working directory (deleted with the Ray session)."""
        path = relative_path(location)
        if path is None or not self.in_unpacked_working_dir:
            return
        raise LocationError(
            f"{setting} is {location!r}, relative to Ray's temporary copy of this job's working "
            f"directory ({Path.cwd()}), which is deleted with the Ray session; set it to an "
            "absolute path the cluster keeps or a URI (s3://..., a tracking server): in the "
            "spec, or for a variable through the runtime env's env_vars (mmtalker submit sets "
            "MMTALKER_WORK_DIR so)"
        )

    @property
    def s3(self) -> S3Settings:
        """Object-storage settings (endpoint and credentials from the ``AWS_*`` variables)."""
        return S3Settings()
