"""Batch animation on real Ray Data and moto's S3 server: broken items, re-runs, a killed job."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
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
    MANIFEST_SCHEMA,
    PART_ROWS,
    BatchOutcome,
    ItemResult,
    ResultsWriter,
    animate_isolated,
    read_manifest,
    read_progress,
    run_animation,
)
from mmtalker_platform.decode import ItemInputs, ItemRecord, list_records, load_clips, record_uri
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
    model.displacement_scale.fill_(0.5)  # an untrained head starts next to the neutral face
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


def _keys(bucket: str, prefix: str, endpoint: str | None = None) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
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
    # Skipped rows name the outputs the first run wrote, every format of them.
    assert all(
        (rerun[r.item_id].npz_uri, rerun[r.item_id].glb_uri) == (r.npz_uri, r.glb_uri)
        for r in animated
    )


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
    # Parts of the results manifest written before the kill stay readable: finished items.
    survived = read_manifest(output, s3)
    assert {r.status for r in survived} <= {"animated"}
    assert len({r.index for r in survived}) == len(survived) <= done

    outcome = run_animation(_spec(uri, output, model_folder))
    assert (outcome.skipped, outcome.animated, outcome.failed) == (done, count - done, 0)
    rows = read_manifest(output, s3)
    assert sorted(r.item_id for r in rows) == [f"clip_{i:05d}" for i in range(count)]
    keys = _keys(bucket, "out-killed/")
    assert not [k for k in keys if k.endswith(".tmp") or "/." in k]
    assert len(_records(bucket, "out-killed/")) == count
    for row in rows:
        frames = read_npz(row.npz_uri, s3).vertices.shape[0]
        assert from_glb(storage.read_bytes(row.glb_uri, s3))[0].shape[0] == frames
        assert row.frames == (frames if row.status == "animated" else None)


def _records(bucket: str, prefix: str, endpoint: str | None = None) -> list[str]:
    """Item records (``_job/records/...json``)."""
    keys = _keys(bucket, prefix, endpoint)
    return [k for k in keys if "/_job/records/" in k and k.endswith(".json")]


def _stable_record_count(bucket: str, prefix: str) -> int:
    """Records once no actor of the killed job writes any more (Ray stops them shortly)."""
    count, since = -1, time.monotonic()
    while time.monotonic() - since < 3.0:
        current = len(_records(bucket, prefix))
        if current != count:
            count, since = current, time.monotonic()
        time.sleep(0.3)
    return count


def test_records_decide_done_for_exactly_these_inputs(local_ray: None, tmp_path: Path) -> None:
    """load_clips alone: an item is skipped only while a record holds its current inputs."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(1600, np.float32), 16000)
    out = str(tmp_path / "out")
    with storage.open_file(audio) as opened:
        identity = opened.stat.identity
    recorded = ItemInputs(
        item_id="a", audio_uri=str(audio), audio=identity, model="m", formats=["glb", "npz"],
        speaker="s0", template_uri="", template="",
    )  # fmt: skip
    record = ItemRecord(
        inputs=recorded, outputs={}, audio_seconds=0.1, frames=3, fps=30.0, topology_id="t",
        finished=datetime.now(UTC),
    )  # fmt: skip
    uri = record_uri(out, "a", recorded.fingerprint())
    storage.write_bytes(uri, record.model_dump_json().encode())
    # A stray file among the records is not a record.
    storage.write_bytes(str(Path(uri).with_name("notes.json")), b"[]")

    def status(**changes: object) -> tuple[str, list[str]]:
        batch = {
            "index": np.arange(1), "item_id": np.array(["a"]), "audio_uri": np.array([str(audio)]),
            "speaker": np.array([""]), "template_uri": np.array([""]), "error": np.array([""]),
            "audio_size": np.array([-1]), "audio_mtime_ns": np.array([-1]),
        }  # fmt: skip
        options: dict[str, object] = {
            "model_id": "m", "formats": ["npz"], "speaker": "s0", "overwrite": False, **changes
        }  # fmt: skip
        rows = load_clips(
            batch, output=out, sample_rate=16000, max_seconds=10.0, s3=S3Settings(),
            done=[list_records.remote(out, S3Settings())], **options,  # type: ignore[arg-type]
        )  # fmt: skip
        return str(rows["status"][0]), json.loads(rows["stale"][0])

    # The same inputs, with fewer formats than the record has: done.
    assert status() == ("skipped", [])
    # Another model version, speaker or format, or --overwrite: redone, its record replaced.
    changes = [{"model_id": "m2"}, {"speaker": "s1"}, {"formats": ["npz", "obj"]},
               {"overwrite": True}]  # fmt: skip
    for change in changes:
        assert status(**change) == ("pending", [recorded.fingerprint()]), change
    # The audio file rewritten: redone.
    sf.write(audio, np.zeros(3200, np.float32), 16000)
    assert status() == ("pending", [recorded.fingerprint()])


@pytest.fixture(scope="module")
def counted_s3(
    tmp_path_factory: pytest.TempPathFactory,
    ports: Callable[[], int],
    moto: Callable[..., AbstractContextManager[str]],
) -> Iterator[tuple[str, Path]]:
    """A moto server of this module's own whose request log is kept: (endpoint, log file)."""
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    with moto(ports(), log) as endpoint:
        yield endpoint, log


def _requests(log: Path, since: int) -> list[tuple[str, str]]:
    """(method, path) of every request the server logged after line ``since``."""
    # Colour codes aside: moto's server colours the request line of some answers (206, 404).
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()).splitlines()[since:]
    return [m.groups() for line in lines if (m := re.search(r'"([A-Z]+) (\S+) HTTP', line))]


def test_changed_inputs_are_redone_and_a_skip_costs_at_most_one_request(
    local_ray: None,
    counted_s3: tuple[str, Path],
    model_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, log = counted_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3 = S3Settings()
    bucket = f"counted-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    clips = write_speech_clips(f"s3://{bucket}/clips", 6, seed=7, containers=("wav",), s3=s3)
    ids = [Path(uri).stem for uri in clips]
    manifest = "audio\n" + "".join(f"clips/{Path(uri).name}\n" for uri in clips)
    storage.write_bytes(f"s3://{bucket}/list.csv", manifest.encode(), s3)
    output = f"s3://{bucket}/out"
    by_manifest = _spec(f"s3://{bucket}/list.csv", output, model_folder, formats=[])
    first = run_animation(by_manifest)
    assert (first.animated, first.skipped, first.failed) == (6, 0, 0)

    mark = len(log.read_text().splitlines())
    again = run_animation(by_manifest)
    assert (again.animated, again.skipped) == (0, 6)
    made = _requests(log, mark)
    # A manifest's item costs one HEAD of its audio; its record costs nothing (one listing of
    # the records decides for all).
    for item in ids:
        assert [m for m, path in made if item in path] == ["HEAD"], item
    assert len(made) <= len(ids) + 30, made

    # The same clips as a prefix: listed with their stat, so a skip costs no request at all.
    # One clip is rewritten: it alone is redone, its old record replaced.
    changed = write_speech_clips(f"s3://{bucket}/other", 1, seed=8, containers=("wav",), s3=s3)
    storage.write_bytes(clips[0], storage.read_bytes(changed[0], s3), s3)
    mark = len(log.read_text().splitlines())
    by_prefix = run_animation(_spec(f"s3://{bucket}/clips", output, model_folder, formats=[]))
    assert (by_prefix.animated, by_prefix.skipped, by_prefix.failed) == (1, 5, 0)
    made = _requests(log, mark)
    for item in ids[1:]:
        assert [path for _, path in made if item in path] == [], item
    # The changed clip is read with one HEAD (its stat, for the record) and one GET.
    assert [m for m, path in made if path.endswith(f"/{ids[0]}.wav")] == ["HEAD", "GET"]
    rows = {row.item_id: row for row in read_manifest(output, s3)}
    assert rows[ids[0]].status == "animated" and len(rows) == 6
    assert len(_records(bucket, "out/", endpoint)) == 6


def test_results_are_written_in_parts_while_the_job_runs(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    writer = ResultsWriter(output, S3Settings())
    rows = [
        ItemResult(
            index=i, item_id=f"item{i}", audio_uri=f"/a/{i}.wav", status="failed", error="bad"
        )
        for i in range(PART_ROWS + 5)
    ]
    for first in range(0, len(rows), 1000):
        chunk = [row.model_dump() for row in rows[first : first + 1000]]
        writer.add(pa.Table.from_pylist(chunk, schema=MANIFEST_SCHEMA))
    # A first part is out before the job ends: a driver killed now leaves these rows.
    assert read_manifest(output) == rows[:PART_ROWS]
    writer.close()
    assert read_manifest(output) == rows
    assert len(list((tmp_path / "out" / "_job" / "results").glob("part-*.parquet"))) == 2
    # A new run starts a new manifest: the folder holds one run's rows.
    ResultsWriter(output, S3Settings()).close()
    assert read_manifest(output) == []


def test_one_bad_clip_fails_alone_in_its_group(model_folder: Path, small_face: tuple) -> None:
    from mmtalker.checkpoint import load_checkpoint
    from mmtalker.inference import Face

    checkpoint = load_checkpoint(model_folder)
    template = next(iter(small_face[0].values()))
    tone = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    faces = [Face(template, 0), Face(template[:10], 0), Face(template, 1)]
    outcomes = animate_isolated(checkpoint, [tone, tone, tone[:7000]], faces)
    assert isinstance(outcomes[1], Exception)
    assert outcomes[0].vertices.shape == (15, len(template), 3)
    assert outcomes[2].vertices.shape[0] == 14
    assert outcomes[0].topology is checkpoint.topology and outcomes[0].rig is None


def test_arkit_curves_and_rigged_glb_for_every_item_of_a_catalog(
    local_ray: None, ict_checkpoint_dir: Path, model_folder: Path, tmp_path: Path
) -> None:
    from mmtalker.rig import ARKIT_NAMES, load_ict
    from mmtalker_platform.batch import BatchError

    clips = tmp_path / "clips"
    write_speech_clips(str(clips), 2, seed=5)
    output = str(tmp_path / "out")
    spec = _spec(str(clips), output, ict_checkpoint_dir, formats=["arkit", "glb"])
    outcome = run_animation(spec)
    assert (outcome.animated, outcome.failed) == (2, 0)
    head = load_ict()
    for row in read_manifest(output):
        assert row.arkit_uri == f"{output}/{row.item_id}_arkit.csv"
        lines = Path(row.arkit_uri).read_text().splitlines()
        assert lines[0].split(",")[:3] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft"]
        assert len(lines) == row.frames + 1
        curves = json.loads(Path(row.arkit_uri.replace(".csv", ".json")).read_text())
        weights = np.array(curves["weights"])
        assert (
            curves["names"] == list(ARKIT_NAMES)
            and weights.shape == (row.frames, 52)
            and weights.min() >= 0
            and weights.max() <= 1
        )
        # The outputs are on the whole head, and the glTF's morph targets carry ARKit names.
        assert read_npz(row.npz_uri).vertices.shape == (row.frames, head.num_vertices, 3)
        gltf = pygltflib.GLTF2.load_binary(row.glb_uri)
        assert set(ARKIT_NAMES) <= set(gltf.meshes[0].extras["targetNames"])
    # A model of its own mesh has no rig to solve against: the job refuses before it starts.
    with pytest.raises(BatchError, match="format arkit needs a model that animates the ICT head"):
        run_animation(_spec(str(clips), str(tmp_path / "other"), model_folder, formats=["arkit"]))
