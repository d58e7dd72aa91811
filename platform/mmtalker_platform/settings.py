"""Where the platform's services are: Ray, MLflow and object storage, from the environment.

Every field follows the variable its tool already reads (``RAY_ADDRESS``,
``MLFLOW_TRACKING_URI``, the ``AWS_*`` family through :class:`mmtalker.storage.S3Settings`), so a
shell configured for those tools configures the platform too. Unset, they give the embedded
defaults: a local Ray started on demand, MLflow on sqlite in the work folder, local storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmtalker.storage import S3Settings


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

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: the configured one, or sqlite in the work folder."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.work_dir / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def local_storage(self) -> Path:
        """Default root for Ray Train's checkpoints and results when a spec names none."""
        return (self.work_dir / "ray_results").resolve()

    @property
    def s3(self) -> S3Settings:
        """Object-storage settings (endpoint and credentials from the ``AWS_*`` variables)."""
        return S3Settings()
