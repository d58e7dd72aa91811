"""The dataset format: Parquet shards of sequences plus ``dataset.json``, on a local path or S3.

Layout of a dataset folder (or prefix)::

    dataset.json            manifest (schema version, splits, counts, durations, checksums)
    topology.npz            faces, region masks, UV chart slot (plain arrays, no pickle)
    templates.npz           one neutral mesh (V, 3) per speaker
    {split}-{n:05d}.parquet sequences, one row each

``dataset.json`` is written last, so a folder without it is an unfinished dataset. Schema 2 adds
per-frame rig controls (e.g. ARKit weights, named by ``control_names``) to each row, schema 3
per-frame phone classes (named by ``phone_names``); datasets of older schemas (without them) are
still read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

import mmtalker
from mmtalker import storage
from mmtalker.data.sequence import Sequence, Topology, displacement_squares
from mmtalker.errors import DatasetError, MMTalkerError
from mmtalker.storage import S3Settings

SCHEMA_VERSION = 3
MANIFEST = "dataset.json"
TOPOLOGY_FILE = "topology.npz"
TEMPLATES_FILE = "templates.npz"
SPLITS = ("train", "val", "test")

#: One row per sequence; arrays are flattened float32 with their shapes in the count columns.
SHARD_SCHEMA = pa.schema(
    [
        ("sequence_id", pa.string()),
        ("speaker", pa.string()),
        ("sentence_id", pa.string()),
        ("text", pa.string()),
        ("split", pa.string()),
        ("topology_id", pa.string()),
        ("fps", pa.float32()),
        ("sample_rate", pa.int32()),
        ("num_frames", pa.int32()),
        ("num_vertices", pa.int32()),
        ("audio", pa.large_list(pa.float32())),
        ("vertices", pa.large_list(pa.float32())),
        ("num_controls", pa.int32()),
        ("controls", pa.large_list(pa.float32())),
        ("phones", pa.large_list(pa.int16())),
    ]
)
#: Columns older schemas' shards lack; rows without them have no controls or phones.
_OPTIONAL_COLUMNS = frozenset({"num_controls", "controls", "phones"})
#: Flattened array columns and the dtype of their values.
_ARRAY_COLUMNS = {
    "audio": np.float32, "vertices": np.float32, "controls": np.float32, "phones": np.int16,
}  # fmt: skip


class FileRef(BaseModel):
    file: str
    sha256: str
    bytes: int


class ShardInfo(FileRef):
    split: str
    num_sequences: int
    num_frames: int
    audio_seconds: float


class SplitInfo(BaseModel):
    speakers: list[str]
    sentences: list[str]
    num_sequences: int
    num_frames: int
    audio_seconds: float
    #: Root-mean-square displacement of the split's frames from their speakers' templates: the
    #: unit models learn displacements in. Recorded while writing, so training need not read the
    #: whole split to find it; None in datasets written before it was recorded.
    displacement_rms: float | None = None


class TopologyInfo(FileRef):
    id: str
    num_vertices: int
    num_faces: int
    regions: dict[str, int]
    has_uv: bool


class DatasetManifest(BaseModel):
    """The content of ``dataset.json``."""

    schema_version: Literal[1, 2, 3]
    name: str
    source: str
    created_by: str
    fps: float
    sample_rate: int
    topology: TopologyInfo
    templates: FileRef
    speakers: list[str]
    splits: dict[str, SplitInfo]
    shards: list[ShardInfo]
    #: Names of the per-frame controls stored with every sequence (empty: none).
    control_names: list[str] = []
    #: Names of the phone classes of the per-frame phone labels (empty: none).
    phone_names: list[str] = []
    extra: dict[str, Any] = {}

    @property
    def num_sequences(self) -> int:
        return sum(s.num_sequences for s in self.splits.values())

    @property
    def num_frames(self) -> int:
        return sum(s.num_frames for s in self.splits.values())

    @property
    def audio_seconds(self) -> float:
        return sum(s.audio_seconds for s in self.splits.values())


def sequences_to_table(sequences: list[Sequence], split: str, topology_id: str) -> pa.Table:
    """Encode sequences as rows of :data:`SHARD_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [] for name in SHARD_SCHEMA.names}
    for seq in sequences:
        columns["sequence_id"].append(seq.sequence_id)
        columns["speaker"].append(seq.speaker)
        columns["sentence_id"].append(seq.sentence_id)
        columns["text"].append(seq.text)
        columns["split"].append(split)
        columns["topology_id"].append(topology_id)
        columns["fps"].append(seq.fps)
        columns["sample_rate"].append(seq.sample_rate)
        columns["num_frames"].append(seq.num_frames)
        columns["num_vertices"].append(seq.num_vertices)
        columns["audio"].append(seq.audio)
        columns["vertices"].append(seq.vertices.reshape(-1))
        controls = seq.controls if seq.controls is not None else np.zeros((seq.num_frames, 0))
        columns["num_controls"].append(controls.shape[1])
        columns["controls"].append(controls.reshape(-1))
        columns["phones"].append(seq.phones if seq.phones is not None else np.zeros(0))
    arrays = [
        _flat_list_array(columns[name], _ARRAY_COLUMNS[name])
        if name in _ARRAY_COLUMNS
        else pa.array(columns[name])
        for name in SHARD_SCHEMA.names
    ]
    return pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)


def _flat_list_array(chunks: list[np.ndarray], dtype: type[np.generic]) -> pa.LargeListArray:
    # Building from one concatenated buffer avoids pyarrow's per-element Python conversion.
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([c.size for c in chunks], out=offsets[1:])
    values = np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def table_to_sequences(table: pa.Table) -> list[Sequence]:
    """Decode shard rows back into sequences (zero-copy views where pyarrow allows)."""
    missing = set(SHARD_SCHEMA.names) - set(table.column_names) - _OPTIONAL_COLUMNS
    if missing:
        raise DatasetError(f"shard rows lack the columns {sorted(missing)}; not an mmtalker shard")
    table = table.combine_chunks()
    arrays = {}
    for name in _ARRAY_COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name)
        chunk = (
            column.chunk(0) if column.num_chunks else pa.array([], SHARD_SCHEMA.field(name).type)
        )
        # Offsets index into the full values buffer, so this stays right for sliced arrays.
        arrays[name] = (chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=False))
    names = [n for n in SHARD_SCHEMA.names if n not in arrays and n in table.column_names]
    meta = table.select(names).to_pylist()
    out = []
    for i, row in enumerate(meta):
        values = {name: flat[start[i] : start[i + 1]] for name, (start, flat) in arrays.items()}
        controls = None
        if "controls" in values and row["num_controls"]:
            controls = values["controls"].reshape(row["num_frames"], row["num_controls"])
        phones = values.get("phones")
        out.append(
            Sequence(
                sequence_id=row["sequence_id"],
                speaker=row["speaker"],
                sentence_id=row["sentence_id"],
                text=row["text"],
                audio=values["audio"],
                sample_rate=row["sample_rate"],
                vertices=values["vertices"].reshape(row["num_frames"], row["num_vertices"], 3),
                fps=row["fps"],
                controls=controls,
                phones=phones if phones is not None and phones.size else None,
            )
        )
    return out


@dataclass
class _SplitBuffer:
    sequences: list[Sequence] = field(default_factory=list)
    nbytes: int = 0
    shards_written: int = 0
    displacement_squares: float = 0.0
    displacement_values: int = 0


class DatasetWriter:
    """Write sequences into shards; ``close()`` writes topology, templates and the manifest last.

    Use as a context manager. A dataset that raised midway has no ``dataset.json`` and is
    therefore never mistaken for a complete one.
    """

    def __init__(
        self,
        uri: str,
        *,
        name: str,
        source: str,
        topology: Topology,
        templates: Mapping[str, np.ndarray],
        fps: float,
        sample_rate: int,
        shard_megabytes: float = 128.0,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
        s3: S3Settings | None = None,
        control_names: list[str] | None = None,
        phone_names: list[str] | None = None,
    ) -> None:
        self.uri = uri
        self._control_names = list(control_names or [])
        self._phone_names = list(phone_names or [])
        self._s3 = s3
        manifest_uri = storage.join(uri, MANIFEST)
        if storage.exists(manifest_uri, s3):
            if not overwrite:
                raise DatasetError(f"{uri} already holds a dataset; pass overwrite to replace it")
            for ref in _load_manifest(uri, s3).shards:
                storage.delete(storage.join(uri, ref.file), s3)
            storage.delete(manifest_uri, s3)
        for speaker, tmpl in templates.items():
            if np.asarray(tmpl).shape != (topology.num_vertices, 3):
                raise DatasetError(
                    f"template of speaker {speaker!r} has shape {np.asarray(tmpl).shape}, "
                    f"expected ({topology.num_vertices}, 3)"
                )
        self._name, self._source, self._extra = name, source, extra or {}
        self._topology = topology
        self._templates = {k: np.asarray(v, dtype=np.float32) for k, v in templates.items()}
        self._fps, self._sample_rate = float(fps), int(sample_rate)
        self._shard_bytes = int(shard_megabytes * 2**20)
        self._buffers: dict[str, _SplitBuffer] = {}
        self._shards: list[ShardInfo] = []
        self._splits: dict[str, SplitInfo] = {}
        self._closed = False

    def add(self, sequence: Sequence, split: str) -> None:
        """Queue one sequence for a split; a shard is flushed once it reaches the target size."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use one of {SPLITS}")
        if sequence.num_vertices != self._topology.num_vertices:
            raise DatasetError(
                f"{sequence.sequence_id} has {sequence.num_vertices} vertices, the topology "
                f"{self._topology.num_vertices}"
            )
        if sequence.speaker not in self._templates:
            raise DatasetError(
                f"{sequence.sequence_id}: no template for speaker {sequence.speaker!r}"
            )
        controls = 0 if sequence.controls is None else sequence.controls.shape[1]
        if controls != len(self._control_names):
            raise DatasetError(
                f"{sequence.sequence_id} has {controls} controls per frame, this dataset names "
                f"{len(self._control_names)}"
            )
        if (sequence.phones is not None) != bool(self._phone_names) or (
            sequence.phones is not None and sequence.phones.max() >= len(self._phone_names)
        ):
            raise DatasetError(
                f"{sequence.sequence_id}: its phone labels do not fit this dataset's "
                f"{len(self._phone_names)} phone names; label every sequence with classes "
                "0..len(phone_names)-1, or none"
            )
        if abs(sequence.fps - self._fps) > 1e-6 or sequence.sample_rate != self._sample_rate:
            raise DatasetError(
                f"{sequence.sequence_id} is at {sequence.fps} fps / {sequence.sample_rate} Hz; "
                f"this dataset is {self._fps} fps / {self._sample_rate} Hz"
            )
        buffer = self._buffers.setdefault(split, _SplitBuffer())
        buffer.sequences.append(sequence)
        buffer.nbytes += sequence.audio.nbytes + sequence.vertices.nbytes
        squares, values = displacement_squares(sequence.vertices, self._templates[sequence.speaker])
        buffer.displacement_squares += squares
        buffer.displacement_values += values
        info = self._splits.setdefault(
            split,
            SplitInfo(speakers=[], sentences=[], num_sequences=0, num_frames=0, audio_seconds=0.0),
        )
        if sequence.speaker not in info.speakers:
            info.speakers.append(sequence.speaker)
        if sequence.sentence_id not in info.sentences:
            info.sentences.append(sequence.sentence_id)
        info.num_sequences += 1
        info.num_frames += sequence.num_frames
        info.audio_seconds += sequence.duration
        if buffer.nbytes >= self._shard_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        buffer = self._buffers[split]
        if not buffer.sequences:
            return
        table = sequences_to_table(buffer.sequences, split, self._topology.id)
        sink = io.BytesIO()
        # Several row groups per shard let readers stream a shard without holding it whole.
        pq.write_table(table, sink, compression="zstd", row_group_size=8)
        payload = sink.getvalue()
        filename = f"{split}-{buffer.shards_written:05d}.parquet"
        storage.write_bytes(storage.join(self.uri, filename), payload, self._s3)
        self._shards.append(
            ShardInfo(
                file=filename,
                sha256=hashlib.sha256(payload).hexdigest(),
                bytes=len(payload),
                split=split,
                num_sequences=len(buffer.sequences),
                num_frames=sum(s.num_frames for s in buffer.sequences),
                audio_seconds=sum(s.duration for s in buffer.sequences),
            )
        )
        buffer.shards_written += 1
        buffer.sequences, buffer.nbytes = [], 0

    def close(self) -> DatasetManifest:
        """Flush remaining shards and write topology, templates and ``dataset.json``."""
        if self._closed:
            raise DatasetError("dataset writer is already closed")
        for split, buffer in self._buffers.items():
            self._flush(split)
            self._splits[split].displacement_rms = math.sqrt(
                buffer.displacement_squares / buffer.displacement_values
            )
        if not self._shards:
            raise DatasetError(f"no sequences were written to {self.uri}; nothing to finish")
        topo = self._topology.to_npz()
        tmpl_buffer = io.BytesIO()
        np.savez_compressed(tmpl_buffer, **self._templates)
        tmpl = tmpl_buffer.getvalue()
        storage.write_bytes(storage.join(self.uri, TOPOLOGY_FILE), topo, self._s3)
        storage.write_bytes(storage.join(self.uri, TEMPLATES_FILE), tmpl, self._s3)
        manifest = DatasetManifest(
            schema_version=SCHEMA_VERSION,
            name=self._name,
            source=self._source,
            created_by=f"mmtalker {mmtalker.__version__}",
            fps=self._fps,
            sample_rate=self._sample_rate,
            topology=TopologyInfo(
                file=TOPOLOGY_FILE,
                sha256=hashlib.sha256(topo).hexdigest(),
                bytes=len(topo),
                id=self._topology.id,
                num_vertices=self._topology.num_vertices,
                num_faces=len(self._topology.faces),
                regions={k: int(v.size) for k, v in self._topology.regions.items()},
                has_uv=self._topology.uv is not None,
            ),
            templates=FileRef(
                file=TEMPLATES_FILE, sha256=hashlib.sha256(tmpl).hexdigest(), bytes=len(tmpl)
            ),
            speakers=sorted(self._templates),
            splits={k: self._splits[k] for k in SPLITS if k in self._splits},
            shards=self._shards,
            control_names=self._control_names,
            phone_names=self._phone_names,
            extra=self._extra,
        )
        storage.write_bytes(
            storage.join(self.uri, MANIFEST), manifest.model_dump_json(indent=2).encode(), self._s3
        )
        self._closed = True
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


def _load_manifest(uri: str, s3: S3Settings | None) -> DatasetManifest:
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.is_file(manifest_uri, s3):
        if storage.exists(uri, s3):
            raise DatasetError(
                f"{uri} has no {MANIFEST}: not an mmtalker dataset, or an unfinished one; "
                "create it with `mmtalker data synth` or `mmtalker data prepare`"
            )
        raise DatasetError(f"dataset not found: {uri}")
    try:
        return DatasetManifest.model_validate_json(storage.read_bytes(manifest_uri, s3))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DatasetError(
            f"{manifest_uri} is malformed at {where or 'top level'}: {first['msg']}"
        ) from exc


class Dataset:
    """A finished dataset, opened from its manifest; sequences are read shard by shard."""

    def __init__(self, uri: str, s3: S3Settings | None = None) -> None:
        self.uri = uri
        self._s3 = s3
        self.manifest = _load_manifest(uri, s3)
        self.topology = Topology.from_npz(self._read_checked(self.manifest.topology))
        with np.load(
            io.BytesIO(self._read_checked(self.manifest.templates)), allow_pickle=False
        ) as data:
            self.templates = {name: data[name] for name in data.files}

    def _read_checked(self, ref: FileRef) -> bytes:
        payload = storage.read_bytes(storage.join(self.uri, ref.file), self._s3)
        if hashlib.sha256(payload).hexdigest() != ref.sha256:
            raise DatasetError(
                f"{ref.file} in {self.uri} does not match its checksum in {MANIFEST}"
            )
        return payload

    def shard_uris(self, split: str | None = None) -> list[str]:
        """URIs of the shards of one split (or all), for readers such as Ray Data."""
        return [
            storage.join(self.uri, s.file) for s in self.manifest.shards if split in (None, s.split)
        ]

    def sequences(self, split: str | None = None) -> Iterator[Sequence]:
        """Stream sequences of one split (or all), a row group at a time."""
        if split is not None and split not in self.manifest.splits:
            raise DatasetError(
                f"{self.uri} has no split {split!r}; it has {sorted(self.manifest.splits)}"
            )
        for uri in self.shard_uris(split):
            fs, path = storage.resolve(uri, self._s3)
            try:
                parquet = pq.ParquetFile(fs.open_input_file(path))
                for group in range(parquet.num_row_groups):
                    yield from table_to_sequences(parquet.read_row_group(group))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DatasetError(f"cannot read shard {uri}: {exc}") from exc

    def verify(self) -> None:
        """Check every shard against its checksum in the manifest."""
        for ref in self.manifest.shards:
            self._read_checked(ref)


def open_dataset(uri: str, s3: S3Settings | None = None) -> Dataset:
    """Open a finished dataset, or raise :class:`DatasetError` saying why it is not one."""
    try:
        return Dataset(uri, s3)
    except MMTalkerError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot open dataset {uri}: {exc}") from exc
