"""Platform fixtures: a local Ray per test module, the tiny corpus on S3, MLflow, a checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pyarrow.fs as pafs
import pytest
import ray
import torch

from mmtalker.checkpoint import save_checkpoint
from mmtalker.nn.mmtalker import MMTalker
from mmtalker.storage import S3Settings
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.tracking import prepare_tracking

if TYPE_CHECKING:
    from ray._private.worker import RayContext

#: Train V2 polls its workers every few seconds by default; tests want failures seen at once.
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ports() -> Callable[[], int]:
    """Free TCP ports on 127.0.0.1, one per call."""
    return free_port


@pytest.fixture(scope="session")
def small_job() -> dict[str, Any]:
    """Spec fields for a quick training job: a small MMTalker, short crops, 2 CPU workers.

    Shared by the session: tests build their specs from copies (``{**small_job, ...}``).
    """
    return {
        "model": {
            "kind": "mmtalker",
            "config": {
                "speech": {"dim": 32, "levels": 2, "n_mels": 32},
                "dim": 32, "heads": 2, "clusters": [48, 12], "basis": 16, "fourier_bands": 4,
                "head_hidden": 32,
            },
        },
        "train": {"epochs": 1, "batch_size": 4, "max_frames": 45, "warmup_steps": 2},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
    }  # fmt: skip


@pytest.fixture(scope="session")
def aws_environment(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """AWS variables for the moto server in os.environ, so Ray processes started later see them."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        **RAY_TEST_ENV,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def local_ray(aws_environment: dict[str, str]) -> Iterator[RayContext]:
    """A local Ray for one test module, on its own ports (other Ray instances may run).

    Four logical CPUs on two cores: two training workers and the data tasks beside them.
    Yields the context of ``ray.init``: ``f"http://{context.dashboard_url}"`` is its Jobs API.
    """
    # address="local": always a new cluster of our own, even where another `ray start` left its
    # address behind for "auto" to find.
    context = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        configure_logging=False,
    )
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus_s3(tiny_corpus: str, s3_endpoint: str) -> str:
    """The tiny corpus copied to a bucket on the moto server; returns its s3:// URI."""
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)  # fmt: skip
    settings = S3Settings(endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test")
    pafs.copy_files(
        str(Path(tiny_corpus).resolve()), f"{bucket}/tiny",
        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=settings.filesystem(),
    )  # fmt: skip
    return f"s3://{bucket}/tiny"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database whose schema is made once: making one takes ~8 s."""
    database = tmp_path_factory.mktemp("mlflow") / "store" / "mlflow.db"
    prepare_tracking(f"sqlite:///{database}", "template")
    return database


@pytest.fixture(scope="session")
def make_work_dir(mlflow_template: Path) -> Callable[[Path], Path]:
    """Makes a platform work folder (``folder / "work"``), its MLflow store already there.

    Every training job would otherwise spend its first seconds making the schema.
    """

    def make(folder: Path) -> Path:
        work = folder / "work"
        (work / "mlflow").mkdir(parents=True)
        shutil.copyfile(mlflow_template, work / "mlflow" / "mlflow.db")
        return work

    return make


@pytest.fixture
def work_dir(make_work_dir: Callable[[Path], Path], tmp_path: Path) -> Path:
    """This test's platform work folder (``tmp_path / "work"``), its MLflow store made."""
    return make_work_dir(tmp_path)


@pytest.fixture
def tracking_uri(work_dir: Path) -> str:
    """An empty MLflow store of this test's own: the one in ``work_dir``."""
    return PlatformSettings(work_dir=work_dir).tracking_uri


@pytest.fixture
def checkpoint_dir(small_model: MMTalker, small_face: tuple, tmp_path: Path) -> Path:
    """A small MMTalker checkpoint folder, with non-default sampler logits and scale."""
    small_model.displacement_scale.fill_(0.004)
    with torch.no_grad():
        small_model.sampler.logits.normal_()
    return save_checkpoint(tmp_path / "checkpoint", small_model, small_face[0], 30.0, 16000)
