"""Batch animation on real Ray Data and moto's S3 server: broken items, re-runs, a killed job."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pygltflib
import pytest
import ray
import soundfile as sf
import torch

from mmtalker import storage
from mmtalker.checkpoint import save_checkpoint
from mmtalker.data.clips import write_speech_clips
from mmtalker.io.export import from_glb, read_npz
from mmtalker.nn.mmtalker import MMTalker
from mmtalker.storage import S3Settings
from mmtalker_platform import registry
from mmtalker_platform.batch import (
    BatchOutcome,
    ItemResult,
    animate_isolated,
    load_clips,
    read_manifest,
    read_progress,
    run_animation,
)
from mmtalker_platform.spec import AnimateJobSpec
from mmtalker_platform.tracking import prepare_tracking, start_or_resume_run

pytestmark = pytest.mark.slow
FPS = 30.0
#: Items that must fail, and a word their recorded reason must contain.
BROKEN = {
    "empty": "empty",
    "notes.txt": "not an audio file",
    "garbage": "not a readable audio file",
    "nan": "NaN",
    "long": "over the limit of 12 s",
}


@pytest.fixture(scope="module")
def s3(aws_environment: dict[str, str]) -> S3Settings:
    return S3Settings()


@pytest.fixture(scope="module")
def bucket(aws_environment: dict[str, str]) -> str:
    name = f"catalog-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def model_folder(
    small_config: object, small_face: tuple, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A small MMTalker checkpoint whose output visibly moves (non-zero scale and weights)."""
    torch.manual_seed(0)
    templates, topology = small_face
    model = MMTalker(small_config, topology, templates)  # type: ignore[arg-type]
    model.displacement_scale.fill_(0.004)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "ck", model, templates, FPS, 16000)


def _audio(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def catalog(bucket: str, s3: S3Settings) -> str:
    """21 items on S3: 12 spoken clips (wav/flac/ogg, 8-44.1 kHz, some stereo), mp3, silence,
    a 10-sample clip, a truncated flac, and the broken ones of BROKEN."""
    uri = f"s3://{bucket}/catalog"
    speech = write_speech_clips(uri, 12, seed=3, s3=s3)
    tone = (0.3 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    nan = tone.copy()
    nan[100] = np.nan
    files = {
        "voice/tone.mp3": _audio(tone, 16000, "MP3"),
        "silence.wav": _audio(np.zeros(16000, np.float32), 16000, "WAV"),
        "blip.wav": _audio(tone[:10], 16000, "WAV"),
        "truncated.flac": storage.read_bytes(speech[1], s3)[:3000],
        "empty.wav": b"",
        "notes.txt": b"not audio",
        "garbage.wav": os.urandom(4000),
        "nan.wav": _audio(nan, 16000, "WAV", "FLOAT"),
        "long.wav": _audio(np.tile(tone, 13), 16000, "WAV"),
    }
    for name, data in files.items():
        storage.write_bytes(f"{uri}/{name}", data, s3)
    return uri


def _spec(catalog: str, output: str, model_folder: Path, **fields: object) -> AnimateJobSpec:
    return AnimateJobSpec.model_validate(
        {
            "name": "test", "catalog": catalog, "output": output,
            "checkpoint": str(model_folder), "formats": ["glb"], "max_seconds": 12.0,
            "batch_size": 4, **fields,
        }
    )  # fmt: skip


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _check_animation(row: ItemResult, s3: S3Settings, vertices: int) -> None:
    """The npz and glb of one animated item: frame count, vertex count, morph weights."""
    animation = read_npz(row.npz_uri, s3)
    frames = math.ceil(row.audio_seconds * FPS - 1e-9)
    assert animation.vertices.shape == (frames, vertices, 3) == (row.frames, vertices, 3)
    assert animation.fps == FPS and np.isfinite(animation.vertices).all()
    glb = storage.read_bytes(row.glb_uri, s3)
    decoded, fps = from_glb(glb)
    assert decoded.shape == animation.vertices.shape and fps == FPS
    motion = animation.vertices - animation.vertices[0]
    error = np.sum((decoded - animation.vertices) ** 2) / max(np.sum(motion**2), 1e-30)
    assert error <= 1e-3
    gltf = pygltflib.GLTF2.load_from_bytes(glb)
    weights = gltf.accessors[gltf.animations[0].samplers[0].output]
    targets = len(gltf.meshes[0].primitives[0].targets)
    assert weights.count == frames * targets and 1 <= targets <= 64


def test_catalog_on_s3_every_item_accounted_for_and_rerun_skips(
    local_ray: None, catalog: str, bucket: str, model_folder: Path, s3: S3Settings
) -> None:
    output = f"s3://{bucket}/out-main"
    spec = _spec(catalog, output, model_folder)
    outcome = run_animation(spec)
    rows = read_manifest(output, s3)
    assert outcome.total == len(rows) == 21
    assert sorted(r.item_id for r in rows) == sorted(
        [f"clip_{i:05d}" for i in range(12)]
        + ["voice/tone", "silence", "blip", "truncated", *BROKEN]
    )
    by_id = {r.item_id: r for r in rows}
    for item, word in BROKEN.items():
        assert by_id[item].status == "failed" and word in by_id[item].error, by_id[item]
        assert by_id[item].npz_uri is None
    # A truncated file is decoded as far as it goes, or fails with a reason: never dropped.
    truncated = by_id["truncated"]
    assert truncated.status == "animated" or truncated.error
    animated = [r for r in rows if r.status == "animated"]
    assert len(animated) == outcome.animated >= 15 and outcome.failed == 21 - len(animated)
    vertices = read_npz(animated[0].npz_uri, s3).vertices.shape[1]
    for row in animated:
        _check_animation(row, s3, vertices)
    silence = read_npz(by_id["silence"].npz_uri, s3).vertices
    assert by_id["blip"].frames == 1 and silence.shape[0] == 30
    keys = _keys(bucket, "out-main/")
    assert not [k for k in keys if k.endswith(".tmp") or "/." in k]
    assert len(_records(bucket, "out-main/")) == len(animated)
    progress = read_progress(output, s3)
    assert progress is not None and progress["state"] == "finished"
    assert (progress["total"], progress["animated"]) == (21, len(animated))

    again = run_animation(spec)
    assert (again.animated, again.skipped, again.failed) == (0, len(animated), outcome.failed)
    rerun = {r.item_id: r for r in read_manifest(output, s3)}
    assert rerun.keys() == by_id.keys()
    assert all(rerun[r.item_id].npz_uri == r.npz_uri for r in animated)


def test_manifest_catalog_with_speakers_templates_and_a_registry_model(
    local_ray: None,
    catalog: str,
    bucket: str,
    model_folder: Path,
    small_face: tuple,
    tracking_uri: str,
    s3: S3Settings,
) -> None:
    templates, _ = small_face
    experiment = prepare_tracking(tracking_uri, "exp")
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "registered", {})
    registry.register(tracking_uri, run_id, model_folder, "talker", {"lve": 1e-5})
    face = next(iter(templates.values())) + 0.01
    buffer = io.BytesIO()
    np.save(buffer, face)
    storage.write_bytes(f"s3://{bucket}/faces/shifted.npy", buffer.getvalue(), s3)
    speaker = sorted(templates)[1]
    manifest = (
        "audio,id,speaker,template\n"
        f"catalog/clip_00000.wav,first,{speaker},\n"
        f"s3://{bucket}/catalog/clip_00001.flac,second,,faces/shifted.npy\n"
        f"catalog/clip_00002.ogg,third,nobody,\n"
        ",fourth,,\n"
    )
    storage.write_bytes(f"s3://{bucket}/manifest.csv", manifest.encode(), s3)
    output = f"s3://{bucket}/out-manifest"
    spec = AnimateJobSpec(
        name="manifest", catalog=f"s3://{bucket}/manifest.csv", output=output,
        model="talker@champion", tracking_uri=tracking_uri, formats=["obj"],
    )  # fmt: skip
    outcome: BatchOutcome = run_animation(spec)
    assert outcome.model == "talker/1" and outcome.total == 4
    rows = {r.item_id: r for r in read_manifest(output, s3)}
    assert rows["first"].status == rows["second"].status == "animated"
    assert "nobody" in rows["third"].error and "no audio" in rows["fourth"].error
    second = read_npz(rows["second"].npz_uri, s3).vertices
    # Animated on the given face: every frame stays near the shifted template.
    assert (
        np.abs(second - face).max() < 0.05
        and np.abs(second.mean(axis=(0, 1)) - face.mean(0)).max() < 0.01
    )
    marker = json.loads(storage.read_bytes(rows["first"].obj_uri + "sequence.json", s3))
    assert len(marker["frames"]) == rows["first"].frames


def test_killed_job_rerun_does_every_item_exactly_once(
    local_ray: None, bucket: str, model_folder: Path, s3: S3Settings, tmp_path: Path
) -> None:
    uri = f"s3://{bucket}/many"
    count = len(write_speech_clips(uri, 40, seed=5, containers=("wav",), s3=s3))
    output = f"s3://{bucket}/out-killed"
    command = [
        sys.executable, "-m", "mmtalker_platform.cli", "animate", "--catalog", uri,
        "--output", output, "--checkpoint", str(model_folder), "--batch-size", "1",
        "--formats", "glb",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(_records(bucket, "out-killed/")) < 3:
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the job finished no item in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = _stable_record_count(bucket, "out-killed/")
    assert 3 <= done < count, "the job must be killed mid-run"

    outcome = run_animation(_spec(uri, output, model_folder))
    assert (outcome.skipped, outcome.animated, outcome.failed) == (done, count - done, 0)
    rows = read_manifest(output, s3)
    assert sorted(r.item_id for r in rows) == [f"clip_{i:05d}" for i in range(count)]
    keys = _keys(bucket, "out-killed/")
    assert not [k for k in keys if k.endswith(".tmp") or "/." in k]
    assert len(_records(bucket, "out-killed/")) == count
    for row in rows:
        assert read_npz(row.npz_uri, s3).vertices.shape[0] == row.frames
        assert from_glb(storage.read_bytes(row.glb_uri, s3))[0].shape[0] == row.frames


def _records(bucket: str, prefix: str) -> list[str]:
    """Item records (``<item>.json``), not the job's files or OBJ folders' sequence.json."""
    return [
        k for k in _keys(bucket, prefix)
        if k.endswith(".json") and "/_job/" not in k and "_obj/" not in k
    ]  # fmt: skip


def _stable_record_count(bucket: str, prefix: str) -> int:
    """Records once no actor of the killed job writes any more (Ray stops them shortly)."""
    count, since = -1, time.monotonic()
    while time.monotonic() - since < 3.0:
        current = len(_records(bucket, prefix))
        if current != count:
            count, since = current, time.monotonic()
        time.sleep(0.3)
    return count


def test_damaged_or_foreign_records_make_an_item_redone_not_a_crash(tmp_path: Path) -> None:
    """load_clips alone (no Ray): a record that is not ours never stops the pipeline."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(1600, np.float32), 16000)
    out = tmp_path / "out"
    out.mkdir()
    ids = ["list", "partial", "text", "good"]
    (out / "list.json").write_text("[]")
    (out / "partial.json").write_text('{"item_id": "partial", "model": "m"}')
    (out / "text.json").write_text("not json")
    good = {
        "item_id": "good", "audio_uri": str(audio), "model": "m", "formats": ["npz"],
        "outputs": {"npz": "x.npz"}, "audio_seconds": 0.1, "frames": 3, "fps": 30.0,
        "topology_id": "t", "finished": "2026-11-25T00:00:00+00:00",
    }  # fmt: skip
    (out / "good.json").write_text(json.dumps(good))
    batch = {
        "item_id": np.array(ids), "audio_uri": np.array([str(audio)] * 4),
        "speaker": np.array([""] * 4), "template_uri": np.array([""] * 4),
        "error": np.array([""] * 4), "index": np.arange(4),
    }  # fmt: skip
    rows = load_clips(
        batch, output=str(out), model_id="m", formats=["npz"], overwrite=False,
        sample_rate=16000, max_seconds=10.0, s3=S3Settings(),
    )  # fmt: skip
    status = dict(zip(rows["item_id"], rows["status"], strict=True))
    assert status == {"list": "pending", "partial": "pending", "text": "pending", "good": "skipped"}


def test_one_bad_clip_fails_alone_in_its_group(model_folder: Path, small_face: tuple) -> None:
    from mmtalker.checkpoint import load_checkpoint
    from mmtalker.inference import Clip

    checkpoint = load_checkpoint(model_folder)
    template = next(iter(small_face[0].values()))
    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    clips = [Clip(tone, template, 0), Clip(tone, template[:10], 0), Clip(tone[:7000], template, 1)]
    outcomes = animate_isolated(checkpoint, clips)
    assert isinstance(outcomes[1], Exception)
    assert outcomes[0].shape == (15, len(template), 3) and outcomes[2].shape[0] == 14
