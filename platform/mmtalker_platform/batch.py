"""Batch animation of an audio catalog with Ray Data: list → decode → actor pool → outputs.

Each item ends as one row of the results manifest (``OUTPUT/_job/results.parquet``): animated,
skipped (finished by an earlier run with the same model and formats) or failed with the reason.
An item's outputs are ``OUTPUT/<item_id>.npz`` (+ ``.glb``, ``_obj/``) and, written last, its
record ``OUTPUT/<item_id>.json``: the record is what marks the item done, so a job killed at any
point and run again redoes only unfinished items. ``OUTPUT/_job/progress.json`` holds counts
while the job runs.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import trimesh
from pydantic import BaseModel, ValidationError

from mmtalker import storage
from mmtalker.checkpoint import Checkpoint
from mmtalker.errors import MMTalkerError
from mmtalker.inference import Clip, animate_clips, decode_audio, prepare_audio
from mmtalker.io.export import write_outputs
from mmtalker.storage import S3Settings
from mmtalker_platform.catalog import CatalogItem, check_output_outside, list_catalog
from mmtalker_platform.cluster import connect
from mmtalker_platform.model_source import ModelSource, resolve_model
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import AnimateJobSpec

JOB_FOLDER = "_job"
#: Catalog rows per decode task; each task sorts its rows by length, so the actors' batches
#: hold clips of similar length.
DECODE_ROWS = 32
#: Seconds between writes of the progress file.
PROGRESS_SECONDS = 2.0
#: Templates (manifest ``template`` files) each actor keeps loaded.
TEMPLATE_CACHE = 64
Status = Literal["animated", "skipped", "failed"]
_PENDING = "pending"


class BatchError(MMTalkerError):
    """A batch job cannot start (model, catalog, output) or its pipeline stopped."""


class ItemResult(BaseModel):
    """One row of the results manifest."""

    item_id: str
    audio_uri: str
    status: Status
    audio_seconds: float | None = None
    frames: int | None = None
    npz_uri: str | None = None
    glb_uri: str | None = None
    obj_uri: str | None = None
    error: str | None = None


class BatchOutcome(BaseModel):
    """What a batch job did: counts by status, audio animated, where the manifest is."""

    total: int
    animated: int
    skipped: int
    failed: int
    audio_seconds: float
    seconds: float
    model: str
    manifest_uri: str
    #: Format → URI of one finished item's outputs, to show where they are.
    example_outputs: dict[str, str] = {}


def run_animation(
    spec: AnimateJobSpec,
    settings: PlatformSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BatchOutcome:
    """Animate every item of the spec's catalog on the current Ray cluster (or a local one)."""
    settings = settings or PlatformSettings()
    s3 = settings.s3
    started = time.perf_counter()
    source = resolve_model(spec, settings)
    checkpoint = source.load()
    if spec.speaker is not None:
        checkpoint.face(spec.speaker)  # an unknown default speaker fails the job at once
    check_output_outside(spec.catalog, spec.output, s3)
    items = list_catalog(spec.catalog, s3)
    connect(settings)
    dataset = _pipeline(spec, items, source, checkpoint.sample_rate, s3)
    results: dict[int, ItemResult] = {}
    failure: BaseException | None = None
    last_write = 0.0
    try:
        for row in dataset.iter_rows():
            results[int(row["index"])] = ItemResult.model_validate(_clean(row))
            if progress is not None:
                progress(len(results), len(items))
            if time.monotonic() - last_write > PROGRESS_SECONDS:
                _write_progress(spec, source.model_id, len(items), results, "running", s3)
                last_write = time.monotonic()
    except BaseException as exc:  # whatever stopped the pipeline (Ctrl-C too): record, raise
        failure = exc
    cause = f"{type(failure).__name__}: {failure}" if failure else ""
    missing = (
        f"the job stopped before this item was reported; a re-run finishes it ({cause})"
        if failure
        else "the pipeline returned no result for this item"
    )
    rows = [
        results.get(index)
        or ItemResult(
            item_id=item.item_id, audio_uri=item.audio_uri, status="failed", error=missing
        )
        for index, item in enumerate(items)
    ]
    manifest_uri = write_manifest(spec.output, rows, s3)
    _write_progress(
        spec, source.model_id, len(items), results, "failed" if failure else "finished", s3
    )
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    if failure is not None:
        raise BatchError(
            f"the animation pipeline stopped ({cause}); results so far in {manifest_uri}"
        ) from failure
    counts = Counter(row.status for row in rows)
    return BatchOutcome(
        total=len(rows),
        animated=counts["animated"],
        skipped=counts["skipped"],
        failed=counts["failed"],
        audio_seconds=sum(r.audio_seconds or 0.0 for r in rows if r.status == "animated"),
        seconds=time.perf_counter() - started,
        model=source.model_id,
        manifest_uri=manifest_uri,
        example_outputs=next(
            (
                {f: uri for f in ("npz", "glb", "obj") if (uri := getattr(r, f"{f}_uri"))}
                for r in rows
                if r.npz_uri
            ),
            {},
        ),
    )


def write_manifest(output: str, rows: list[ItemResult], s3: S3Settings | None = None) -> str:
    """Write the results manifest (Parquet, one row per catalog item); return its URI."""
    table = pa.Table.from_pylist([row.model_dump() for row in rows], schema=_MANIFEST_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(output, JOB_FOLDER, "results.parquet")
    storage.write_bytes(uri, buffer.getvalue(), s3)
    return uri


def read_manifest(output: str, s3: S3Settings | None = None) -> list[ItemResult]:
    """The results manifest a job wrote under ``output``."""
    data = storage.read_bytes(storage.join(output, JOB_FOLDER, "results.parquet"), s3)
    return [ItemResult.model_validate(row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


def read_progress(output: str, s3: S3Settings | None = None) -> dict[str, Any] | None:
    """The progress file of the job writing to ``output`` (None before it wrote one)."""
    uri = storage.join(output, JOB_FOLDER, "progress.json")
    if not storage.is_file(uri, s3):
        return None
    return json.loads(storage.read_bytes(uri, s3))


_MANIFEST_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("audio_uri", pa.string()),
        ("status", pa.string()),
        ("audio_seconds", pa.float64()),
        ("frames", pa.int64()),
        ("npz_uri", pa.string()),
        ("glb_uri", pa.string()),
        ("obj_uri", pa.string()),
        ("error", pa.string()),
    ]
)


def _pipeline(
    spec: AnimateJobSpec,
    items: list[CatalogItem],
    source: ModelSource,
    sample_rate: int,
    s3: S3Settings,
) -> ray.data.Dataset:
    formats = sorted({"npz", *spec.formats})
    gpu = spec.use_gpu if spec.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    rows = [{**item.model_dump(), "index": index} for index, item in enumerate(items)]
    # Enough blocks that every actor gets work even on a small catalog.
    blocks = min(len(rows), max(2 * spec.actors, math.ceil(len(rows) / DECODE_ROWS)))
    loaded = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        load_clips,
        batch_size=DECODE_ROWS,
        batch_format="numpy",
        fn_kwargs={
            "output": spec.output,
            "model_id": source.model_id,
            "formats": formats,
            "overwrite": spec.overwrite,
            "sample_rate": sample_rate,
            "max_seconds": spec.max_seconds,
            "s3": s3,
        },
    )
    return loaded.map_batches(
        ClipAnimator,
        compute=ray.data.ActorPoolStrategy(size=spec.actors),
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_cpus=spec.cpus_per_actor,
        num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={
            "source": [ray.put(source)],
            "model_id": source.model_id,
            "output": spec.output,
            "formats": formats,
            "speaker": spec.speaker,
            "chunk_seconds": spec.chunk_seconds,
            "batch_size": spec.batch_size,
            "device": "cuda" if gpu else "cpu",
            "s3": s3,
        },
    )


def load_clips(
    batch: dict[str, np.ndarray],
    *,
    output: str,
    model_id: str,
    formats: list[str],
    overwrite: bool,
    sample_rate: int,
    max_seconds: float,
    s3: S3Settings,
) -> dict[str, np.ndarray]:
    """Catalog rows → decoded mono audio at the model's rate, or a skipped/failed status.

    Rows come back sorted by audio length, so consecutive rows make similar-length batches.
    """
    rows = []
    for row in _rows(batch):
        row.update(status=_PENDING, audio=np.zeros(0, np.float32), audio_seconds=math.nan,
                   frames=-1, outputs="{}")  # fmt: skip
        if row["error"]:
            row["status"] = "failed"
            rows.append(row)
            continue
        try:
            record = None if overwrite else _finished(row, output, model_id, formats, s3)
            if record is not None:
                row.update(status="skipped", audio_seconds=record.audio_seconds,
                           frames=record.frames, outputs=json.dumps(record.outputs))  # fmt: skip
            else:
                data = storage.read_bytes(row["audio_uri"], s3)
                samples, rate = decode_audio(data, max_seconds)
                row.update(
                    audio=prepare_audio(samples, rate, sample_rate),
                    audio_seconds=len(samples) / rate,
                )
        except Exception as exc:  # one bad item is recorded, never fatal to the batch
            row.update(status="failed", error=_reason(exc))
        rows.append(row)
    rows.sort(key=lambda r: len(r["audio"]))
    return _columns(rows)


class ClipAnimator:
    """An actor of the pool: holds the model once, animates batches and writes their outputs."""

    def __init__(
        self,
        source: list[Any],
        model_id: str,
        output: str,
        formats: list[str],
        speaker: str | None,
        chunk_seconds: float,
        batch_size: int,
        device: str,
        s3: S3Settings,
    ) -> None:
        # The source travels as an object reference (one copy in the object store per node),
        # wrapped in a list so Ray Data passes the reference rather than resolving it.
        self.checkpoint = ray.get(source[0]).load(device)
        self.model_id, self.output, self.formats = model_id, output, formats
        self.speaker = speaker or self.checkpoint.model.speakers[0]
        self.chunk_seconds, self.batch_size, self.device, self.s3 = (
            chunk_seconds, batch_size, device, s3,
        )  # fmt: skip
        self.templates: dict[str, np.ndarray] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Animate the batch's pending rows; every row comes back with its final status."""
        rows = _rows(batch)
        pending = []
        for row in rows:
            if row["status"] != _PENDING:
                continue
            try:
                pending.append((row, self._clip(row)))
            except Exception as exc:  # one bad item is recorded, never fatal to the batch
                row.update(status="failed", error=_reason(exc))
        for row, vertices in self._animate(pending):
            try:
                if isinstance(vertices, Exception):
                    raise vertices
                self._write(row, vertices)
            except Exception as exc:  # one bad item is recorded, never fatal to the batch
                row.update(status="failed", error=_reason(exc))
        for row in rows:
            row.pop("audio")
        return _columns(rows)

    def _clip(self, row: dict[str, Any]) -> Clip:
        if row["template_uri"]:
            return Clip(row["audio"], self._template(row["template_uri"]), -1)
        template, index = self.checkpoint.face(row["speaker"] or self.speaker)
        return Clip(row["audio"], template, index)

    def _animate(
        self, pending: list[tuple[dict[str, Any], Clip]]
    ) -> list[tuple[dict[str, Any], np.ndarray | Exception]]:
        outcomes = animate_isolated(
            self.checkpoint, [clip for _, clip in pending], chunk_seconds=self.chunk_seconds,
            max_batch=self.batch_size, device=self.device,
        )  # fmt: skip
        return list(zip((row for row, _ in pending), outcomes, strict=True))

    def _write(self, row: dict[str, Any], vertices: np.ndarray) -> None:
        base = storage.join(self.output, row["item_id"])
        topology = self.checkpoint.model.topology
        outputs = write_outputs(
            vertices, self.checkpoint.fps, topology, base, set(self.formats), self.s3
        )
        record = ItemRecord(
            item_id=row["item_id"], audio_uri=row["audio_uri"], model=self.model_id,
            formats=self.formats, outputs=outputs, audio_seconds=row["audio_seconds"],
            frames=len(vertices), fps=self.checkpoint.fps, topology_id=topology.id,
            finished=datetime.now(UTC),
        )  # fmt: skip
        # Written after every output: its presence is what makes the item done.
        storage.write_bytes(f"{base}.json", record.model_dump_json().encode(), self.s3)
        row.update(status="animated", frames=len(vertices), outputs=json.dumps(outputs))

    def _template(self, uri: str) -> np.ndarray:
        if uri not in self.templates:
            if len(self.templates) >= TEMPLATE_CACHE:
                self.templates.pop(next(iter(self.templates)))
            self.templates[uri] = load_template(uri, self.checkpoint.model.topology.num_vertices,
                                                self.s3)  # fmt: skip
        return self.templates[uri]


def animate_isolated(
    checkpoint: Checkpoint,
    clips: list[Clip],
    *,
    chunk_seconds: float = 20.0,
    max_batch: int = 16,
    device: str = "cpu",
) -> list[np.ndarray | Exception]:
    """Positions per clip, or the exception that clip raised: a group that fails is retried
    clip by clip, so one bad clip fails alone instead of taking its batch with it."""

    def run(group: list[Clip]) -> list[np.ndarray]:
        return animate_clips(
            group, checkpoint.model, model_sample_rate=checkpoint.sample_rate,
            fps=checkpoint.fps, chunk_seconds=chunk_seconds, max_batch=max_batch, device=device,
        )  # fmt: skip

    try:
        return list(run(clips))
    except Exception:  # find the clip that broke the group; each failure is returned, not raised
        outcomes: list[np.ndarray | Exception] = []
        for clip in clips:
            try:
                outcomes.append(run([clip])[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes


def load_template(uri: str, num_vertices: int, s3: S3Settings | None = None) -> np.ndarray:
    """A neutral face (V, 3) from ``.npy``, ``.npz`` (``vertices`` or ``template``), OBJ or PLY."""
    data = storage.read_bytes(uri, s3)
    suffix = Path(uri).suffix.lower()
    try:
        if suffix == ".npy":
            vertices = np.load(io.BytesIO(data), allow_pickle=False)
        elif suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                key = next(k for k in ("vertices", "template") if k in npz.files)
                vertices = npz[key]
        else:
            mesh = trimesh.load(io.BytesIO(data), file_type=suffix.lstrip("."), process=False)
            vertices = np.asarray(mesh.vertices)
    except (ValueError, KeyError, StopIteration, OSError) as exc:
        raise MMTalkerError(f"cannot read template {uri}: {exc}") from exc
    vertices = np.asarray(vertices, np.float32)
    if vertices.shape != (num_vertices, 3) or not np.isfinite(vertices).all():
        raise MMTalkerError(
            f"template {uri} must hold {num_vertices} finite vertices (the model's topology), "
            f"got shape {vertices.shape}"
        )
    return vertices


class ItemRecord(BaseModel):
    """``OUTPUT/<item_id>.json``, written after an item's outputs: the item is done."""

    item_id: str
    audio_uri: str
    model: str
    formats: list[str]
    outputs: dict[str, str]
    audio_seconds: float
    frames: int
    fps: float
    topology_id: str
    finished: datetime


def _finished(
    row: dict[str, Any], output: str, model_id: str, formats: list[str], s3: S3Settings
) -> ItemRecord | None:
    """The item's record when an earlier run finished it with this model and these formats."""
    uri = storage.join(output, f"{row['item_id']}.json")
    if not storage.is_file(uri, s3):
        return None
    try:
        record = ItemRecord.model_validate_json(storage.read_bytes(uri, s3))
    except ValidationError:
        return None  # not ours, or damaged: the item is redone and the record replaced
    same = (
        record.model == model_id
        and record.audio_uri == row["audio_uri"]
        and set(formats) <= set(record.formats)
    )
    return record if same else None


def _write_progress(
    spec: AnimateJobSpec,
    model_id: str,
    total: int,
    results: dict[int, ItemResult],
    state: str,
    s3: S3Settings,
) -> None:
    counts = Counter(r.status for r in results.values())
    progress = {
        "name": spec.name, "state": state, "model": model_id, "total": total,
        "done": len(results), **{s: counts[s] for s in ("animated", "skipped", "failed")},
        "updated": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    storage.write_bytes(
        storage.join(spec.output, JOB_FOLDER, "progress.json"), json.dumps(progress).encode(), s3
    )


def _reason(exc: Exception) -> str:
    """A one-line failure reason: our own errors speak for themselves, others name their type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MMTalkerError) else f"{type(exc).__name__}: {text}"


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {}
    for name in rows[0] if rows else ():
        values = [row[name] for row in rows]
        if name == "audio":
            # An object array of differently sized arrays: Ray's variable-shaped tensor column.
            column = np.empty(len(values), dtype=object)
            column[:] = values
        else:
            column = np.array(values)
        columns[name] = column
    return columns


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """A pipeline row → manifest fields (placeholders for "none" become None)."""
    outputs = json.loads(row["outputs"]) if row["outputs"] else {}
    seconds = float(row["audio_seconds"])
    frames = int(row["frames"])
    return {
        "item_id": str(row["item_id"]),
        "audio_uri": str(row["audio_uri"]),
        "status": str(row["status"]),
        "audio_seconds": None if math.isnan(seconds) else seconds,
        "frames": None if frames < 0 else frames,
        **{f"{fmt}_uri": outputs.get(fmt) for fmt in ("npz", "glb", "obj")},
        "error": str(row["error"]) or None,
    }
