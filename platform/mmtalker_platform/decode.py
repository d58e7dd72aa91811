"""The decode stage of batch animation: which catalog items are done, and the audio of the rest.

An item's record (``OUTPUT/_job/records/<h>/<hash>-<fingerprint>.json``, written after its
outputs) is named by a fingerprint of everything the outputs depend on: the item, its audio
file's size and modification time, the model version, the formats, the speaker or template
file. One listing of the records (:func:`list_records`) decides for a whole catalog which items
are done for their current inputs; a skipped item then costs at most the HEAD request that
tells its audio file's size and time (none when a prefix listing told them).

This module is all that decode tasks import: storage and audio decoding, not the model, whose
graph libraries take seconds to import in every worker process a job starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
from pydantic import BaseModel

from mmtalker import storage
from mmtalker.errors import MMTalkerError
from mmtalker.inference import decode_audio, prepare_audio
from mmtalker.io.export import FORMATS
from mmtalker.storage import FileStat, S3Settings

JOB_FOLDER = "_job"
#: Status of a row that still needs the model.
PENDING = "pending"
#: Concurrent opens and downloads per decode task (S3 requests wait on the network).
OPEN_THREADS = 16
#: Bytes allowed per second of ``max_seconds``: 48 kHz stereo float32, the largest common
#: uncompressed layout. A larger file is refused before it is downloaded.
AUDIO_BYTES_PER_SECOND = 48_000 * 2 * 4
URI_COLUMNS = [f"{fmt}_uri" for fmt in FORMATS]
_RECORD_NAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{16})\.json")


class ItemInputs(BaseModel):
    """Everything an item's outputs depend on; its digest names the item's record."""

    item_id: str
    audio_uri: str
    #: The audio file's ``SIZE-MTIME`` (:attr:`FileStat.identity`): a rewritten file differs.
    audio: str
    model: str
    formats: list[str]
    #: The training speaker whose face is animated, or empty when a template file is.
    speaker: str
    template_uri: str
    template: str

    def fingerprint(self) -> str:
        """16 hex digits naming exactly these inputs."""
        return hashlib.blake2b(self.model_dump_json().encode(), digest_size=8).hexdigest()


class ItemRecord(BaseModel):
    """An item's record, written after its outputs: the item is done for these inputs."""

    inputs: ItemInputs
    outputs: dict[str, str]
    audio_seconds: float
    frames: int
    fps: float
    topology_id: str
    finished: datetime


@ray.remote(num_cpus=0)
def list_records(output: str, s3: S3Settings) -> tuple[np.ndarray, np.ndarray]:
    """The records under ``OUTPUT/_job/records/``: item hashes and fingerprints, sorted.

    One listing per shard folder (a sixteenth of the records each); the arrays take 16 bytes
    per finished item.
    """
    fs, root = storage.resolve(storage.join(output, JOB_FOLDER, "records"), s3)
    items: list[np.ndarray] = []
    prints: list[np.ndarray] = []
    for shard in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if shard.type != pafs.FileType.Directory:
            continue
        names = (i.base_name for i in fs.get_file_info(pafs.FileSelector(shard.path)))
        pairs = [match.groups() for name in names if (match := _RECORD_NAME.fullmatch(name))]
        items.append(np.array([int(h, 16) for h, _ in pairs], np.uint64))
        prints.append(np.array([int(f, 16) for _, f in pairs], np.uint64))
    keys = np.concatenate(items) if items else np.zeros(0, np.uint64)
    values = np.concatenate(prints) if prints else np.zeros(0, np.uint64)
    order = np.lexsort((values, keys))
    return keys[order], values[order]


class DoneIndex:
    """Lookup in :func:`list_records`' arrays: the fingerprints recorded for an item."""

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray]) -> None:
        self.keys, self.values = arrays

    def fingerprints(self, item_id: str) -> set[str]:
        """Hex fingerprints of the item's records."""
        key = np.uint64(int(_item_hash(item_id), 16))
        first = np.searchsorted(self.keys, key, side="left")
        last = np.searchsorted(self.keys, key, side="right")
        return {f"{int(value):016x}" for value in self.values[first:last]}


def record_uri(output: str, item_id: str, fingerprint: str) -> str:
    """Where an item's record for the inputs with this fingerprint lives."""
    key = _item_hash(item_id)
    return storage.join(output, JOB_FOLDER, "records", key[0], f"{key}-{fingerprint}.json")


def _item_hash(item_id: str) -> str:
    return hashlib.blake2b(item_id.encode(), digest_size=8).hexdigest()


def output_uris(output: str, item_id: str, formats: Iterable[str]) -> dict[str, str]:
    """Format → URI of an item's outputs, named as :func:`write_outputs` names them."""
    base = storage.join(output, item_id)
    names = {
        "npz": f"{base}.npz", "glb": f"{base}.glb", "obj": f"{base}_obj/",
        "arkit": f"{base}_arkit.csv",
    }  # fmt: skip
    return {fmt: names[fmt] for fmt in formats}


def load_clips(
    batch: dict[str, np.ndarray],
    *,
    output: str,
    model_id: str,
    formats: list[str],
    speaker: str,
    overwrite: bool,
    sample_rate: int,
    max_seconds: float,
    done: list[Any],
    s3: S3Settings,
) -> dict[str, np.ndarray]:
    """Catalog rows → decoded mono audio at the model's rate, or a skipped/failed status.

    An item whose record has its current fingerprint is skipped: a listed file costs no
    request, a manifest's file one HEAD. Rows come back sorted by audio length, so consecutive
    rows make similar-length batches.
    """
    index = DoneIndex(ray.get(done[0]))
    loader = _Loader(output, model_id, formats, speaker, overwrite, max_seconds, index, s3)
    rows = batch_rows(batch)
    for row in rows:
        row.update(status=PENDING, audio=np.zeros(0, np.float32), audio_seconds=math.nan,
                   frames=-1, inputs="", stale="[]", **dict.fromkeys(URI_COLUMNS, ""))  # fmt: skip
    with ThreadPoolExecutor(OPEN_THREADS) as pool:
        fetched = list(pool.map(loader.fetch, rows))
    for row, data in zip(rows, fetched, strict=True):
        if data is None:
            continue
        try:
            samples, rate = decode_audio(data, max_seconds)
            row.update(audio=prepare_audio(samples, rate, sample_rate),
                       audio_seconds=len(samples) / rate)  # fmt: skip
        except Exception as exc:  # one bad item is recorded, never fatal to the batch
            row.update(status="failed", error=reason(exc))
    rows.sort(key=lambda r: len(r["audio"]))
    return batch_columns(rows)


class _Loader:
    """One decode task's view of the job: decides skip or fetch for each row."""

    def __init__(
        self,
        output: str,
        model_id: str,
        formats: list[str],
        speaker: str,
        overwrite: bool,
        max_seconds: float,
        index: DoneIndex,
        s3: S3Settings,
    ) -> None:
        self.output, self.model_id, self.formats, self.speaker = output, model_id, formats, speaker
        self.overwrite, self.index, self.s3 = overwrite, index, s3
        self.max_bytes = math.ceil(max_seconds * AUDIO_BYTES_PER_SECOND) + 2**20
        self.templates: dict[str, str] = {}

    def fetch(self, row: dict[str, Any]) -> bytes | None:
        """The audio bytes of a pending row; None once the row is skipped or failed."""
        if row["error"]:
            row["status"] = "failed"
            return None
        try:
            listed = (
                FileStat(size=int(row["audio_size"]), mtime_ns=int(row["audio_mtime_ns"]))
                if row["audio_size"] >= 0
                else None
            )
            if listed is not None and self._skipped(row, listed):
                return None
            with storage.open_file(row["audio_uri"], self.s3) as audio:
                if listed is None and self._skipped(row, audio.stat):
                    return None
                self._pending(row, audio.stat)
                return audio.read(self.max_bytes)
        except Exception as exc:  # one bad item is recorded, never fatal to the batch
            row.update(status="failed", error=reason(exc))
            return None

    def _inputs(self, row: dict[str, Any], audio: FileStat, formats: list[str]) -> ItemInputs:
        template_uri = str(row["template_uri"])
        return ItemInputs(
            item_id=str(row["item_id"]), audio_uri=str(row["audio_uri"]), audio=audio.identity,
            model=self.model_id, formats=formats,
            speaker="" if template_uri else str(row["speaker"]) or self.speaker,
            template_uri=template_uri,
            template=self._template(template_uri) if template_uri else "",
        )  # fmt: skip

    def _skipped(self, row: dict[str, Any], audio: FileStat) -> bool:
        """Mark the row skipped when a record has its fingerprint for these or more formats."""
        recorded = self.index.fingerprints(str(row["item_id"]))
        if self.overwrite or not recorded:
            return False
        extra = [f for f in FORMATS if f not in self.formats]
        for count in range(len(extra) + 1):
            for more in itertools.combinations(extra, count):
                formats = sorted([*self.formats, *more])
                if self._inputs(row, audio, formats).fingerprint() in recorded:
                    outputs = output_uris(self.output, str(row["item_id"]), formats)
                    row.update(status="skipped", **{f"{f}_uri": u for f, u in outputs.items()})
                    return True
        return False

    def _pending(self, row: dict[str, Any], audio: FileStat) -> None:
        inputs = self._inputs(row, audio, self.formats)
        # Records of other inputs go before the outputs are replaced, or one could pass for
        # the new outputs if the inputs came back.
        stale = sorted(self.index.fingerprints(inputs.item_id))
        row.update(inputs=inputs.model_dump_json(), stale=json.dumps(stale))

    def _template(self, uri: str) -> str:
        if uri not in self.templates:
            with storage.open_file(uri, self.s3) as template:
                self.templates[uri] = template.stat.identity
        return self.templates[uri]


def reason(exc: Exception) -> str:
    """A one-line failure reason: our own errors speak for themselves, others name their type."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, MMTalkerError) else f"{type(exc).__name__}: {text}"


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data batch of columns as a list of row dicts."""
    names = list(batch)
    return [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def batch_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts as a Ray Data batch of columns (``audio``: arrays of different lengths)."""
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
