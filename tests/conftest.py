"""Shared fixtures: an S3 endpoint (moto's server on 127.0.0.1), a tiny corpus, small models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from mmtalker.data.face import FaceShape, make_chart, warp
from mmtalker.data.sequence import Topology
from mmtalker.data.synth import SynthConfig, synthesize_corpus
from mmtalker.geometry.uv import attach_uv
from mmtalker.nn.mmtalker import MMTalker, MMTalkerConfig
from mmtalker.nn.speech import SpeechConfig
from mmtalker.storage import S3Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_moto(port: int, log: Path | None = None) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:``port`` (its request log in ``log``) while the block runs;
    yields its URL."""
    server = Path(sys.executable).with_name("moto_server")
    sink = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=subprocess.STDOUT
    )
    try:
        # Its imports alone can take over 20 s on a loaded 2-core machine.
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if log is not None:
            sink.close()  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def moto() -> Callable[..., AbstractContextManager[str]]:
    """:func:`running_moto`, for tests that need a server of their own."""
    return running_moto


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server started for this test session."""
    with running_moto(_free_port()) as url:
        yield url


@pytest.fixture(scope="session")
def s3_settings(s3_endpoint: str) -> S3Settings:
    return S3Settings(
        endpoint_url=s3_endpoint, region="us-east-1", access_key_id="test", secret_access_key="test"
    )


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ``--tiny`` synthetic corpus, made once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    synthesize_corpus(SynthConfig.preset("tiny"), str(out))
    return str(out)


@pytest.fixture(scope="session")
def ict_config() -> SynthConfig:
    """The small ICT corpus of the tests: a 600-vertex face, four speakers, two sentences each."""
    return SynthConfig(
        face="ict", speakers=4, sentences_per_speaker=2, num_vertices=600, voice_mix=0.5
    )


@pytest.fixture(scope="session")
def ict_corpus(tmp_path_factory: pytest.TempPathFactory, ict_config: SynthConfig) -> str:
    """The corpus of ``ict_config``, made once per session (read-only for tests)."""
    out = tmp_path_factory.mktemp("corpus") / "ict"
    synthesize_corpus(ict_config, str(out))
    return str(out)


@pytest.fixture(scope="session")
def ict_checkpoint_dir(
    ict_corpus: str, small_config: MMTalkerConfig, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A small untrained MMTalker of the ICT test corpus (it animates the whole head), its output
    layer randomised so it moves the face."""
    from mmtalker.checkpoint import save_checkpoint
    from mmtalker.data.shards import open_dataset
    from mmtalker.training import model_for_dataset

    dataset = open_dataset(ict_corpus)
    torch.manual_seed(0)
    model = model_for_dataset("mmtalker", small_config.model_dump(), dataset)
    torch.nn.init.normal_(model.head.coefficients[-1].weight, std=0.5)
    templates = {s: dataset.templates[s] for s in model.speakers}
    manifest = dataset.manifest
    folder = tmp_path_factory.mktemp("ict-model") / "checkpoint"
    return save_checkpoint(folder, model, templates, manifest.fps, manifest.sample_rate)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Standard AWS variables pointing at the moto server, for code that reads the environment."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


@pytest.fixture(scope="session")
def small_config() -> MMTalkerConfig:
    """A tiny MMTalker architecture: fast enough for unit tests."""
    return MMTalkerConfig(
        speech=SpeechConfig(dim=32, levels=2, n_mels=32),
        dim=32, heads=2, clusters=(48, 12), basis=16, fourier_bands=4, head_hidden=32,
    )  # fmt: skip


@pytest.fixture(scope="session")
def small_face() -> tuple[dict[str, np.ndarray], Topology]:
    """Two speakers' neutral faces (600 vertices) and their topology with a UV chart."""
    chart = make_chart(600)
    rng = np.random.default_rng(0)
    templates = {f"s{i}": warp(chart, FaceShape.sample(rng)) for i in range(2)}
    reference = np.mean(list(templates.values()), axis=0)
    return templates, attach_uv(chart.topology(), reference)


@pytest.fixture
def small_model(
    small_config: MMTalkerConfig, small_face: tuple[dict[str, np.ndarray], Topology]
) -> MMTalker:
    torch.manual_seed(0)
    templates, topology = small_face
    return MMTalker(small_config, topology, templates)
