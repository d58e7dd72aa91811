"""Ray Data ingest: a dataset's Parquet shards streamed to training workers, batched by length.

The driver builds one Ray Dataset per split from the shard files (local or s3://); rows are
decoded to arrays in ``map_batches`` on the cluster, and Ray Train's streaming split hands each
worker an equal share, so no process ever holds the corpus. Each epoch takes the blocks in a new
order; workers shuffle rows in a buffer of references, then sort pools of rows by length
before cutting batches, which keeps padding small.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from mmtalker import storage
from mmtalker.data.grouping import LENGTH_POOL_BATCHES, similar_length_groups
from mmtalker.data.sequence import Sequence, displacement_squares
from mmtalker.data.shards import Dataset, table_to_sequences
from mmtalker.errors import DatasetError
from mmtalker.storage import S3Settings

#: Rows decoded at a time, one output block each: a few seconds of audio-mesh data, small
#: enough to stream.
DECODE_BATCH_ROWS = 8


def read_split(
    dataset: Dataset, split: str, s3: S3Settings | None = None, cache: bool = False
) -> ray.data.Dataset:
    """A Ray Dataset of one split's decoded sequences (arrays per row), block order shuffled.

    With ``cache`` the decoded rows are computed once into Ray's object store (spread over the
    cluster, spilled to disk past its memory) and each epoch only reshuffles their blocks:
    reading and decoding cost several times the training step on small machines.
    """
    uris = dataset.shard_uris(split)
    if not uris:
        raise DatasetError(
            f"{dataset.uri} has no shards for split {split!r}; "
            f"it has {sorted(dataset.manifest.splits)}"
        )
    resolved = [storage.resolve(uri, s3) for uri in uris]
    filesystem = resolved[0][0]
    # The manifest names every shard, so one task per shard reads it: read_parquet would list
    # the files again and read their footers on a pool of up to 32 new actor processes, which
    # took most of a small job's reading time.
    shards = ray.data.from_items(
        [{"path": path} for _, path in resolved], override_num_blocks=len(resolved)
    )
    decoded = shards.randomize_block_order().map_batches(
        functools.partial(read_shards, filesystem), batch_format="numpy", batch_size=1
    )
    return decoded.materialize().randomize_block_order() if cache else decoded


def read_shards(
    filesystem: pafs.FileSystem, shards: dict[str, np.ndarray]
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded rows of Parquet shards, ``DECODE_BATCH_ROWS`` at a time (see :func:`decode_rows`)."""
    for path in shards["path"]:
        with filesystem.open_input_file(str(path)) as source:
            for rows in pq.ParquetFile(source).iter_batches(batch_size=DECODE_BATCH_ROWS):
                yield decode_rows(pa.Table.from_batches([rows]))


def decode_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """Shard rows → arrays: audio (N,), vertices (T, V, 3) and phone labels (T,; empty when the
    corpus has none) per row, plus the metadata."""
    sequences = table_to_sequences(table)
    return {
        "sequence_id": np.array([s.sequence_id for s in sequences]),
        "speaker": np.array([s.speaker for s in sequences]),
        "sentence_id": np.array([s.sentence_id for s in sequences]),
        "fps": np.array([s.fps for s in sequences], np.float64),
        "sample_rate": np.array([s.sample_rate for s in sequences], np.int64),
        "audio": _ragged([s.audio for s in sequences]),
        "vertices": _ragged([s.vertices for s in sequences]),
        "phones": _ragged([np.zeros(0, np.int16) if s.phones is None else s.phones
                           for s in sequences]),
    }  # fmt: skip


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    # An object array of differently shaped arrays becomes Ray's variable-shaped tensor column.
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def rows_to_sequences(rows: dict[str, Any]) -> list[Sequence]:
    """A numpy batch of decoded rows (as ``iter_batches`` yields them) → sequences."""
    return [
        Sequence(
            sequence_id=str(rows["sequence_id"][i]),
            speaker=str(rows["speaker"][i]),
            sentence_id=str(rows["sentence_id"][i]),
            audio=rows["audio"][i],
            sample_rate=int(rows["sample_rate"][i]),
            vertices=rows["vertices"][i],
            fps=float(rows["fps"][i]),
            phones=rows["phones"][i] if len(rows["phones"][i]) else None,
        )
        for i in range(len(rows["sequence_id"]))
    ]


def epoch_batches(
    shard: ray.data.DataIterator, batch_size: int, shuffle_buffer: int, seed: int
) -> Iterator[list[Sequence]]:
    """One epoch of a worker's shard as batches of similar-length sequences, in random order.

    Rows arrive as whole blocks (block order is shuffled per epoch); ``shuffle_buffer`` rows
    beyond a pool are held back, and each pool of ``LENGTH_POOL_BATCHES`` batches is drawn at
    random from what is held, sorted by length and cut into batches. Ray Data's own local
    shuffle buffer would copy every drawn row's arrays (megabytes of vertices each) on a
    background thread that competes with training for the worker's CPU; drawing references
    here copies nothing.

    Equal shards give every worker the same number of batches, which DDP needs: each step is
    a collective, and a worker with one batch more would wait for the others forever. Pools
    are full but for the last, so equal row counts give equal batch counts.
    """
    rng = np.random.default_rng(seed)
    pool = batch_size * LENGTH_POOL_BATCHES
    held: list[Sequence] = []
    for rows in shard.iter_batches(batch_size=None, batch_format="numpy"):
        held += rows_to_sequences(rows)
        while len(held) >= pool + shuffle_buffer:
            yield from _shuffled_groups(_draw(held, pool, rng), batch_size, rng)
    while held:
        yield from _shuffled_groups(_draw(held, min(pool, len(held)), rng), batch_size, rng)


def _draw(held: list[Sequence], count: int, rng: np.random.Generator) -> list[Sequence]:
    """Remove ``count`` random items from ``held`` (order of the rest does not matter)."""
    drawn = []
    for _ in range(count):
        index = int(rng.integers(len(held)))
        held[index], held[-1] = held[-1], held[index]
        drawn.append(held.pop())
    return drawn


def _shuffled_groups(
    pool: list[Sequence], batch_size: int, rng: np.random.Generator
) -> Iterator[list[Sequence]]:
    groups = similar_length_groups(pool, batch_size)
    for index in rng.permutation(len(groups)):
        yield groups[index]


def training_displacement_scale(
    dataset: Dataset, data: ray.data.Dataset, templates: dict[str, np.ndarray]
) -> float:
    """The train split's RMS displacement: as the dataset recorded it when written, else
    measured over ``data`` (the split) in one distributed pass."""
    recorded = dataset.manifest.splits["train"].displacement_rms
    if recorded is None:
        return measure_displacement_scale(data, templates)
    return recorded or 1.0


def measure_displacement_scale(data: ray.data.Dataset, templates: dict[str, np.ndarray]) -> float:
    """RMS displacement from the neutral face over a split, in one distributed pass."""

    def sums(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        total, count = 0.0, 0
        for speaker, vertices in zip(rows["speaker"], rows["vertices"], strict=True):
            squares, values = displacement_squares(vertices, templates[str(speaker)])
            total, count = total + squares, count + values
        return {"total": np.array([total]), "count": np.array([count])}

    # One small row per batch comes back to the driver; the frames themselves never do.
    parts = data.map_batches(sums, batch_format="numpy").take_all()
    count = sum(int(p["count"]) for p in parts)
    if not count:
        raise DatasetError("the split holds no frames; check the dataset")
    return math.sqrt(sum(float(p["total"]) for p in parts) / count) or 1.0
