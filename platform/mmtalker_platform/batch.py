"""Batch animation of an audio catalog with Ray Data: catalog → decode → actor pool → outputs.

Nothing the driver holds grows with the catalog: one read task streams the catalog's items
(:mod:`mmtalker_platform.catalog`), decode tasks decide which items are done and read the audio
of the others (:mod:`mmtalker_platform.decode`), an actor pool animates and writes, and the
driver only tallies results and writes them out in parts. ``OUTPUT`` holds:

- ``<item_id>.npz`` (+ ``.glb``, ``_obj/``): an item's outputs;
- ``_job/records/``: the record of each finished item, written after its outputs and named by
  a fingerprint of everything they depend on, so a changed input is redone (see ``decode``);
- ``_job/results/part-NNNNN.parquet``: the results manifest, one row per catalog item of the
  latest run, written in parts while the job runs (a killed job keeps the parts it wrote).
  ``pyarrow.dataset.dataset(folder)`` or ``ray.data.read_parquet(folder)`` read it as one table;
- ``_job/progress.json``: the counts so far, rewritten every few seconds.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from pydantic import BaseModel
from ray.data import DataContext

from mmtalker import storage
from mmtalker.checkpoint import Checkpoint
from mmtalker.errors import MMTalkerError
from mmtalker.inference import (
    Animation,
    Clip,
    Face,
    animate_clips,
    animate_face,
    face_of,
    neutral_vertices,
)
from mmtalker.io.export import FORMATS, write_outputs
from mmtalker.storage import S3Settings
from mmtalker_platform.catalog import (
    CatalogError,
    CatalogSource,
    check_catalog,
    check_output_outside,
    empty_catalog_message,
    iter_catalog,
    within,
)
from mmtalker_platform.cluster import connect
from mmtalker_platform.decode import (
    JOB_FOLDER,
    PENDING,
    URI_COLUMNS,
    ItemInputs,
    ItemRecord,
    batch_columns,
    batch_rows,
    list_records,
    load_clips,
    reason,
    record_uri,
)
from mmtalker_platform.model_source import ModelSource, resolve_model
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import AnimateJobSpec

#: Catalog rows per decode batch; each batch is sorted by length, so the actors' batches
#: hold clips of similar length.
DECODE_ROWS = 32
#: CPUs a decode task reserves: decoding is lighter than the model and waits on storage.
#: Reserving other than the actors also keeps Ray Data from fusing decoding into the actors,
#: where it would run in turn with the model instead of beside it.
DECODE_CPUS = 0.5
#: Decode tasks at once per actor (at least two): decoding takes a tenth of the model's time,
#: and each task reads OPEN_THREADS files at once. More would start more worker processes,
#: each paying seconds of imports at the start of a job, for nothing.
DECODE_TASKS_PER_ACTOR = 1
#: Rows per actor call, in model batches: the actor groups the pending rows by length into
#: batches, so skipped and failed rows do not shrink them, and each call's records are
#: reported (and written to the results manifest) together.
ANIMATE_BATCHES = 2
#: Seconds between writes of the progress file.
PROGRESS_SECONDS = 2.0
#: A results part is written after this many rows, or seconds: the first after
#: PART_SECONDS, each next one after twice as long as the one before, at most PART_SECONDS_MAX.
#: A killed driver loses the rows of one part at most (their items stay done: a re-run skips
#: them), and a long job's parts stay few for readers.
PART_ROWS = 20_000
PART_SECONDS = 5.0
PART_SECONDS_MAX = 300.0
#: Ray Data block size of the pipeline: small, so catalog chunks flow on as they are listed
#: instead of gathering into one block of the whole catalog.
BLOCK_BYTES = 2 * 2**20
#: Templates (manifest ``template`` files) each actor keeps loaded, and their largest size.
TEMPLATE_CACHE = 64
TEMPLATE_MAX_BYTES = 64 * 2**20
Status = Literal["animated", "skipped", "failed"]


class BatchError(MMTalkerError):
    """A batch job cannot start (model, catalog, output) or its pipeline stopped."""


class ItemResult(BaseModel):
    """One row of the results manifest; ``index`` is the item's position in the catalog.

    Skipped rows name the outputs an earlier run wrote; their seconds and frames are in the
    item's record and in that run's manifest.
    """

    index: int
    item_id: str
    audio_uri: str
    status: Status
    audio_seconds: float | None = None
    frames: int | None = None
    npz_uri: str | None = None
    glb_uri: str | None = None
    obj_uri: str | None = None
    #: The Live Link Face CSV; the JSON of the same weights lies beside it (``_arkit.json``).
    arkit_uri: str | None = None
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
    progress: Callable[[int, int | None], None] | None = None,
) -> BatchOutcome:
    """Animate every item of the spec's catalog on the current Ray cluster (or a local one).

    ``progress`` gets the items done so far and the total once the catalog is fully listed.
    """
    settings = settings or PlatformSettings()
    s3 = settings.s3
    started = time.perf_counter()
    _check_allowed(spec)
    source = resolve_model(spec, settings)
    checkpoint = source.load()
    # An unknown default speaker fails the job at once.
    speaker = checkpoint.model.speakers[checkpoint.face(spec.speaker)[1]]
    if "arkit" in spec.formats and not whole_head(checkpoint):
        raise BatchError(
            f"format arkit needs a model that animates the ICT head; {source.model_id} animates "
            "its own mesh only (train on an ICT corpus: mmtalker data synth --face ict)"
        )
    check_output_outside(spec.catalog, spec.output, s3)
    check_catalog(spec.catalog, s3)
    connect(settings)
    results = ResultsWriter(spec.output, s3)
    tally = Tally()
    dataset = _pipeline(spec, source, checkpoint, speaker, s3)
    failure: BaseException | None = None
    last_progress = 0.0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            results.add(tally.add(manifest_rows(batch)))
            if progress is not None:
                progress(tally.done, None)
            if time.monotonic() - last_progress > PROGRESS_SECONDS:
                _write_progress(spec, source.model_id, tally, "running", s3)
                last_progress = time.monotonic()
    except BaseException as exc:  # whatever stopped the pipeline (Ctrl-C too): record, raise
        failure = exc
    cause = f"{type(failure).__name__}: {failure}" if failure else ""
    if failure is not None or tally.has_gaps():
        why = (
            f"the job stopped before this item was reported; a re-run finishes it ({cause})"
            if failure
            else "the pipeline returned no result for this item"
        )
        _fail_unreported(spec, s3, tally, results, why)
    results.close()
    tally.total = tally.done
    _write_progress(spec, source.model_id, tally, "failed" if failure else "finished", s3)
    if isinstance(failure, KeyboardInterrupt):
        raise failure
    if failure is not None:
        raise BatchError(
            f"the animation pipeline stopped ({cause}); results so far in {results.folder}"
        ) from failure
    if tally.done == 0:
        raise CatalogError(empty_catalog_message(spec.catalog))
    if progress is not None:
        progress(tally.done, tally.total)
    return BatchOutcome(
        total=tally.done,
        animated=tally.counts["animated"],
        skipped=tally.counts["skipped"],
        failed=tally.counts["failed"],
        audio_seconds=tally.audio_seconds,
        seconds=time.perf_counter() - started,
        model=source.model_id,
        manifest_uri=results.folder,
        example_outputs=tally.example,
    )


class Tally:
    """Counts of the results so far and which catalog entries have one (a bit per entry)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.done = 0
        self.total: int | None = None
        self.audio_seconds = 0.0
        self.example: dict[str, str] = {}
        self._seen = bytearray()

    def add(self, rows: pa.Table) -> pa.Table:
        """Count manifest rows; returns those of entries not reported before (a retried
        task can report an entry twice)."""
        fresh = [self._mark(int(index)) for index in rows["index"].to_pylist()]
        rows = rows.filter(pa.array(fresh, pa.bool_()))
        self.done += rows.num_rows
        self.counts.update(rows["status"].to_pylist())
        animated = rows.filter(pc.equal(rows["status"], "animated"))
        self.audio_seconds += pc.sum(animated["audio_seconds"]).as_py() or 0.0
        with_outputs = rows.filter(pc.is_valid(rows["npz_uri"]))
        if not self.example and with_outputs.num_rows:
            first = with_outputs.slice(0, 1).to_pylist()[0]
            self.example = {fmt: uri for fmt in FORMATS if (uri := first[f"{fmt}_uri"])}
        return rows

    def reported(self, index: int) -> bool:
        """Whether catalog entry ``index`` has its result."""
        byte, bit = divmod(index, 8)
        return byte < len(self._seen) and bool(self._seen[byte] >> bit & 1)

    def has_gaps(self) -> bool:
        """Whether an entry before the last reported one has no result."""
        last = next((i for i in range(len(self._seen) - 1, -1, -1) if self._seen[i]), -1)
        highest = -1 if last < 0 else last * 8 + self._seen[last].bit_length() - 1
        return self.done != highest + 1

    def _mark(self, index: int) -> bool:
        if self.reported(index):
            return False
        byte, bit = divmod(index, 8)
        if byte >= len(self._seen):
            self._seen.extend(bytes(max(byte + 1 - len(self._seen), len(self._seen))))
        self._seen[byte] |= 1 << bit
        return True


class ResultsWriter:
    """The results manifest, written as Parquet parts under ``OUTPUT/_job/results/``.

    Parts of an earlier run are deleted when a run starts: the folder holds one run's rows.
    Rows wait for their part as Arrow tables, a few hundred bytes each.
    """

    def __init__(self, output: str, s3: S3Settings) -> None:
        self.folder = storage.join(output, JOB_FOLDER, "results") + "/"
        self.s3 = s3
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.parts = 0
        self.written = time.monotonic()
        for uri in _part_uris(output, s3):
            storage.delete(uri, s3)

    def add(self, rows: pa.Table) -> None:
        """Buffer rows; a part is written once enough rows or seconds have gathered."""
        self.tables.append(rows)
        self.rows += rows.num_rows
        wait = min(PART_SECONDS * 2**self.parts, PART_SECONDS_MAX)
        if self.rows >= PART_ROWS or time.monotonic() - self.written >= wait:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next part."""
        if self.rows:
            buffer = io.BytesIO()
            pq.write_table(pa.concat_tables(self.tables), buffer)
            uri = storage.join(self.folder, f"part-{self.parts:05d}.parquet")
            storage.write_bytes(uri, buffer.getvalue(), self.s3)
            self.parts += 1
            self.tables, self.rows = [], 0
        self.written = time.monotonic()

    def close(self) -> None:
        """Write what is left."""
        self.flush()


def read_manifest(output: str, s3: S3Settings | None = None) -> list[ItemResult]:
    """The results manifest a job wrote under ``output``, in catalog order."""
    uris = _part_uris(output, s3)
    if not uris:
        return []
    fs, _ = storage.resolve(output, s3)
    paths = [storage.resolve(uri, s3)[1] for uri in uris]
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table()
    rows = [ItemResult.model_validate(row) for row in table.to_pylist()]
    return sorted(rows, key=lambda row: row.index)


def read_progress(output: str, s3: S3Settings | None = None) -> dict[str, Any] | None:
    """The progress file of the job writing to ``output`` (None before it wrote one)."""
    uri = storage.join(output, JOB_FOLDER, "progress.json")
    if not storage.is_file(uri, s3):
        return None
    return json.loads(storage.read_bytes(uri, s3))


MANIFEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("item_id", pa.string()),
        ("audio_uri", pa.string()),
        ("status", pa.string()),
        ("audio_seconds", pa.float64()),
        ("frames", pa.int64()),
        ("npz_uri", pa.string()),
        ("glb_uri", pa.string()),
        ("obj_uri", pa.string()),
        ("arkit_uri", pa.string()),
        ("error", pa.string()),
    ]
)


def _part_uris(output: str, s3: S3Settings | None) -> list[str]:
    folder = storage.join(output, JOB_FOLDER, "results")
    fs, path = storage.resolve(folder, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        storage.join(folder, info.base_name)
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    )


def _check_allowed(spec: AnimateJobSpec) -> None:
    allowed = spec.allowed_prefixes
    locations = {"catalog": spec.catalog, "output": spec.output, "checkpoint": spec.checkpoint}
    for field, location in locations.items() if allowed else ():
        if location is not None and not within(location, allowed):
            raise BatchError(
                f"{field} {location} is outside the locations this job may use: {allowed}"
            )


def _fail_unreported(
    spec: AnimateJobSpec, s3: S3Settings, tally: Tally, results: ResultsWriter, reason: str
) -> None:
    """A failed row for every catalog entry without a result, the catalog streamed again."""
    try:
        for chunk in iter_catalog(spec.catalog, s3, spec.allowed_prefixes):
            rows = [
                ItemResult(
                    index=item.index, item_id=item.item_id, audio_uri=item.audio_uri,
                    status="failed", error=reason,
                ).model_dump()
                for item in chunk
                if not tally.reported(item.index)
            ]  # fmt: skip
            if rows:
                results.add(tally.add(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)))
    except MMTalkerError:
        return  # the catalog itself is unreachable now: the rows written so far stand


def _pipeline(
    spec: AnimateJobSpec,
    source: ModelSource,
    checkpoint: Checkpoint,
    speaker: str,
    s3: S3Settings,
) -> ray.data.Dataset:
    formats = sorted({"npz", *spec.formats})
    gpu = spec.use_gpu if spec.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    done = list_records.remote(spec.output, s3)
    context = DataContext.get_current().copy()
    context.target_max_block_size = BLOCK_BYTES
    with DataContext.current(context):
        # The reader mostly waits on storage; holding a CPU for the whole job would starve
        # the decode tasks of small clusters. Its chunks are cut into decode-sized blocks, so
        # each decode task takes one batch and many run at once.
        items = ray.data.read_datasource(
            CatalogSource(spec.catalog, s3, spec.allowed_prefixes), num_cpus=0,
            override_num_blocks=1,
        ).repartition(target_num_rows_per_block=DECODE_ROWS)  # fmt: skip
        loaded = items.map_batches(
            load_clips,
            batch_size=DECODE_ROWS,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
            compute=ray.data.TaskPoolStrategy(max(2, DECODE_TASKS_PER_ACTOR * spec.actors)),
            fn_kwargs={
                "output": spec.output, "model_id": source.model_id, "formats": formats,
                "speaker": speaker, "overwrite": spec.overwrite, "sample_rate":
                checkpoint.sample_rate, "max_seconds": spec.max_seconds, "done": [done],
                "s3": s3,
            },
        )  # fmt: skip
        return loaded.map_batches(
            ClipAnimator,
            compute=ray.data.ActorPoolStrategy(size=spec.actors),
            batch_size=ANIMATE_BATCHES * spec.batch_size,
            batch_format="numpy",
            num_cpus=spec.cpus_per_actor,
            num_gpus=1 if gpu else 0,
            fn_constructor_kwargs={
                "source": [ray.put(source)],
                "model_id": source.model_id,
                "output": spec.output,
                "chunk_seconds": spec.chunk_seconds,
                "batch_size": spec.batch_size,
                "device": "cuda" if gpu else "cpu",
                "s3": s3,
            },
        )


class ClipAnimator:
    """An actor of the pool: holds the model once, animates batches and writes their outputs."""

    def __init__(
        self,
        source: list[Any],
        model_id: str,
        output: str,
        chunk_seconds: float,
        batch_size: int,
        device: str,
        s3: S3Settings,
    ) -> None:
        # The source travels as an object reference (one copy in the object store per node),
        # wrapped in a list so Ray Data passes the reference rather than resolving it.
        self.checkpoint = ray.get(source[0]).load(device)
        self.model_id, self.output = model_id, output
        self.chunk_seconds, self.batch_size, self.device, self.s3 = (
            chunk_seconds, batch_size, device, s3,
        )  # fmt: skip
        self.templates: dict[str, np.ndarray] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Animate the batch's pending rows; every row comes back with its final status."""
        rows = batch_rows(batch)
        pending = []
        for row in rows:
            if row["status"] != PENDING:
                continue
            try:
                pending.append((row, self._face(row)))
            except Exception as exc:  # one bad item is recorded, never fatal to the batch
                row.update(status="failed", error=reason(exc))
        outcomes = animate_isolated(
            self.checkpoint, [row["audio"] for row, _ in pending], [face for _, face in pending],
            chunk_seconds=self.chunk_seconds, max_batch=self.batch_size, device=self.device,
        )  # fmt: skip
        for (row, _), animation in zip(pending, outcomes, strict=True):
            try:
                if isinstance(animation, Exception):
                    raise animation
                self._write(row, animation)
            except Exception as exc:  # one bad item is recorded, never fatal to the batch
                row.update(status="failed", error=reason(exc))
        # Only what the results manifest holds travels on: the audio stays here.
        return batch_columns([{name: row[name] for name in MANIFEST_SCHEMA.names} for row in rows])

    def _face(self, row: dict[str, Any]) -> Face:
        inputs = ItemInputs.model_validate_json(row["inputs"])
        if inputs.template_uri:
            return face_of(self.checkpoint, self._template(inputs.template_uri))
        return face_of(self.checkpoint, *self.checkpoint.face(inputs.speaker))

    def _write(self, row: dict[str, Any], animation: Animation) -> None:
        inputs = ItemInputs.model_validate_json(row["inputs"])
        for stale in json.loads(row["stale"]):
            storage.delete(record_uri(self.output, inputs.item_id, stale), self.s3)
        vertices, topology = animation.vertices, animation.topology
        outputs = write_outputs(
            vertices, self.checkpoint.fps, topology, storage.join(self.output, inputs.item_id),
            set(inputs.formats), self.s3, rig=animation.rig,
        )  # fmt: skip
        record = ItemRecord(
            inputs=inputs, outputs=outputs, audio_seconds=row["audio_seconds"],
            frames=len(vertices), fps=self.checkpoint.fps, topology_id=topology.id,
            finished=datetime.now(UTC),
        )  # fmt: skip
        # Written after every output: its presence is what makes the item done.
        uri = record_uri(self.output, inputs.item_id, inputs.fingerprint())
        storage.write_bytes(uri, record.model_dump_json().encode(), self.s3)
        uris = {f"{fmt}_uri": uri for fmt, uri in outputs.items() if fmt in FORMATS}
        row.update(status="animated", frames=len(vertices), **uris)

    def _template(self, uri: str) -> np.ndarray:
        if uri not in self.templates:
            if len(self.templates) >= TEMPLATE_CACHE:
                self.templates.pop(next(iter(self.templates)))
            self.templates[uri] = load_template(uri, template_sizes(self.checkpoint), self.s3)
        return self.templates[uri]


def whole_head(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint animates the whole ICT head (and so can solve ARKit weights)."""
    return checkpoint.topology.display is not None and checkpoint.model.queries_points


def template_sizes(checkpoint: Checkpoint) -> tuple[int, ...]:
    """Vertex counts a neutral face for this checkpoint may have: its mesh's, and the head's."""
    sizes = (checkpoint.topology.num_vertices,)
    if whole_head(checkpoint):
        from mmtalker.rig.head import display_head

        sizes += (display_head(checkpoint.topology).num_vertices,)
    return sizes


def animate_isolated(
    checkpoint: Checkpoint,
    audios: list[np.ndarray],
    faces: list[Face],
    *,
    chunk_seconds: float = 20.0,
    max_batch: int = 16,
    device: str = "cpu",
) -> list[Animation | Exception]:
    """The animation of each clip (audio at the model's rate) on its face, or the exception it
    raised: one bad clip fails alone instead of taking its batch with it.

    Faces with a whole head are animated one by one (their points differ per person); the
    others in length-sorted padded batches, a failed batch retried clip by clip.
    """
    outcomes: list[Animation | Exception | None] = [None] * len(audios)
    batched = [i for i, face in enumerate(faces) if face.head is None]
    for i, face in enumerate(faces):
        if face.head is not None:
            try:
                outcomes[i] = animate_face(
                    audios[i], face, checkpoint, sample_rate=checkpoint.sample_rate,
                    chunk_seconds=chunk_seconds, device=device,
                )  # fmt: skip
            except Exception as exc:  # returned, not raised: the clip fails alone
                outcomes[i] = exc

    def run(group: list[int]) -> list[np.ndarray]:
        clips = [Clip(audios[i], faces[i].template, faces[i].speaker) for i in group]
        return animate_clips(
            clips, checkpoint.model, model_sample_rate=checkpoint.sample_rate,
            fps=checkpoint.fps, chunk_seconds=chunk_seconds, max_batch=max_batch, device=device,
        )  # fmt: skip

    try:
        results: list[np.ndarray | Exception] = list(run(batched))
    except Exception:  # find the clip that broke the group; each failure is returned, not raised
        results = []
        for i in batched:
            try:
                results.append(run([i])[0])
            except Exception as exc:
                results.append(exc)
    for i, result in zip(batched, results, strict=True):
        outcomes[i] = (
            result if isinstance(result, Exception)
            else Animation(result, checkpoint.topology, None)
        )  # fmt: skip
    return outcomes  # type: ignore[return-value]


def load_template(uri: str, sizes: tuple[int, ...], s3: S3Settings | None = None) -> np.ndarray:
    """A neutral face (V, 3) with V one of ``sizes`` (:func:`neutral_vertices`' formats)."""
    return neutral_vertices(storage.read_bytes(uri, s3, TEMPLATE_MAX_BYTES), uri, sizes)


def _write_progress(
    spec: AnimateJobSpec, model_id: str, tally: Tally, state: str, s3: S3Settings
) -> None:
    progress = {
        "name": spec.name, "state": state, "model": model_id, "total": tally.total,
        "done": tally.done, **{s: tally.counts[s] for s in ("animated", "skipped", "failed")},
        "updated": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    storage.write_bytes(
        storage.join(spec.output, JOB_FOLDER, "progress.json"), json.dumps(progress).encode(), s3
    )


def manifest_rows(batch: pa.Table) -> pa.Table:
    """The actors' rows as results manifest rows: placeholders for "none" become nulls."""
    columns = {}
    for field in MANIFEST_SCHEMA:
        column = batch[field.name]
        if field.name == "audio_seconds":
            column = pc.if_else(pc.is_nan(column), None, column)
        elif field.name == "frames":
            column = pc.if_else(pc.less(column, 0), None, column)
        elif field.name in URI_COLUMNS or field.name == "error":
            column = pc.if_else(pc.equal(column, ""), None, column)
        columns[field.name] = column.cast(field.type)
    return pa.table(columns, schema=MANIFEST_SCHEMA)
