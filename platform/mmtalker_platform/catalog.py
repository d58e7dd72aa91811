"""Audio catalogs: a prefix of audio files, or a manifest (CSV or Parquet) of audio URIs.

Every file under a prefix (hidden dot-files aside) and every manifest row becomes exactly one
:class:`CatalogItem`, including the ones that cannot be animated (a text file, a row without
audio, a duplicate id, a location the job may not read): those carry the reason, so the results
manifest accounts for all.

A catalog is streamed, never held whole: :func:`iter_catalog` yields chunks of items as it lists
a prefix folder by folder or reads a manifest in blocks, and :class:`CatalogSource` feeds those
chunks to Ray Data. What grows with the catalog is one small entry per item id in the reader
(to find duplicates) and, for a prefix, the listing of the folder being read: put millions of
files in several folders, or list them in a manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from mmtalker import storage
from mmtalker.errors import MMTalkerError
from mmtalker.storage import FileStat, S3Settings

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Manifest columns: the audio URI (required), an item id, a training speaker, a template mesh.
AUDIO_COLUMNS = ("audio", "uri", "path")
#: Items per chunk a catalog is streamed in.
CHUNK_ITEMS = 1024
#: Bytes fetched per request when streaming a CSV manifest.
CSV_READ_BYTES = 4 * 2**20
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


class CatalogError(MMTalkerError):
    """A catalog cannot be listed or read: missing, empty, or a manifest without audio column."""


class CatalogItem(BaseModel):
    """One catalog entry; ``error`` is set when it is known unusable before decoding.

    ``index`` is the entry's position in the catalog. A prefix listing also tells the audio
    file's stat, so deciding whether the item is done costs no request.
    """

    index: int
    item_id: str
    audio_uri: str
    speaker: str = ""
    template_uri: str = ""
    error: str = ""
    audio_stat: FileStat | None = None


def iter_catalog(
    uri: str,
    s3: S3Settings | None = None,
    allowed: Iterable[str] = (),
    chunk: int = CHUNK_ITEMS,
) -> Iterator[list[CatalogItem]]:
    """The items of a catalog in chunks: a manifest file (``.csv``/``.parquet``) or a prefix.

    With ``allowed`` prefixes, items whose audio or template lies elsewhere fail.
    """
    allowed = list(allowed)
    entries = _manifest_items(uri, s3) if is_manifest(uri) else _prefix_items(uri, s3)
    seen: dict[int, int] = {}
    batch: list[CatalogItem] = []
    for item in entries:
        batch.append(_checked(item, seen, allowed))
        if len(batch) >= chunk:
            yield batch
            batch = []
    if batch:
        yield batch


def list_catalog(
    uri: str, s3: S3Settings | None = None, allowed: Iterable[str] = ()
) -> list[CatalogItem]:
    """Every item of a catalog at once: for small catalogs and tests; jobs stream them."""
    items = [item for chunk in iter_catalog(uri, s3, allowed) for item in chunk]
    if not items:
        raise CatalogError(empty_catalog_message(uri))
    return items


def check_catalog(uri: str, s3: S3Settings | None = None) -> None:
    """Fail fast on a catalog that cannot be read, before a job starts streaming it.

    Costs a request or two: a manifest's header is read, a prefix's first level listed.
    """
    if is_manifest(uri):
        items = _manifest_items(uri, s3)
        next(items, None)
        items.close()
        return
    fs, root = storage.resolve(uri, s3)
    if not _list_folder(fs, root, uri):
        raise CatalogError(empty_catalog_message(uri))


def is_manifest(uri: str) -> bool:
    """Whether the catalog URI names a manifest file rather than a prefix of audio files."""
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def empty_catalog_message(uri: str) -> str:
    """What to say about a catalog without a single item."""
    if is_manifest(uri):
        return f"manifest {uri} has no rows"
    return (
        f"catalog {uri} holds no files; give a folder or s3:// prefix of audio files, "
        "or a .csv/.parquet manifest"
    )


def within(location: str, prefixes: Iterable[str]) -> bool:
    """Whether ``location`` lies under one of ``prefixes`` (a location with ``..`` never does)."""
    if ".." in location.split("/"):
        return False
    return any(
        location == prefix.rstrip("/") or location.startswith(prefix.rstrip("/") + "/")
        for prefix in prefixes
    )


def check_output_outside(catalog: str, output: str, s3: S3Settings | None = None) -> None:
    """Refuse an output inside a catalog prefix: outputs would become catalog items next run."""
    catalog_fs, catalog_path = storage.resolve(catalog, s3)
    output_fs, output_path = storage.resolve(output, s3)
    if is_manifest(catalog) or type(catalog_fs) is not type(output_fs):
        return
    if output_path == catalog_path or output_path.startswith(catalog_path.rstrip("/") + "/"):
        raise CatalogError(
            f"output {output} lies inside the catalog {catalog}; write outputs elsewhere"
        )


class CatalogSource(Datasource):
    """Ray Data source of a catalog: one read task streams its items in chunks."""

    def __init__(self, uri: str, s3: S3Settings, allowed: list[str]) -> None:
        super().__init__()
        self.uri, self.s3, self.allowed = uri, s3, allowed

    def estimate_inmemory_data_size(self) -> int | None:
        """Unknown until listed."""
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        """One task: a prefix is listed and a manifest read in order, or ids could collide."""
        uri, s3, allowed = self.uri, self.s3, self.allowed

        def read() -> Iterator[pa.Table]:
            for items in iter_catalog(uri, s3, allowed):
                yield catalog_table(items)

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, metadata)]


def catalog_table(items: list[CatalogItem]) -> pa.Table:
    """Catalog items as an Arrow table (a file's stat as size and mtime, -1 when unknown)."""
    return pa.table(
        {
            "index": pa.array([i.index for i in items], pa.int64()),
            "item_id": [i.item_id for i in items],
            "audio_uri": [i.audio_uri for i in items],
            "speaker": [i.speaker for i in items],
            "template_uri": [i.template_uri for i in items],
            "error": [i.error for i in items],
            "audio_size": pa.array([i.audio_stat.size if i.audio_stat else -1 for i in items]),
            "audio_mtime_ns": pa.array(
                [i.audio_stat.mtime_ns if i.audio_stat else -1 for i in items], pa.int64()
            ),
        }
    )


def _checked(item: CatalogItem, seen: dict[int, int], allowed: list[str]) -> CatalogItem:
    """The item, failed when it reads where it may not or an earlier item took its id."""
    if item.error:
        return item
    for location in (item.audio_uri, item.template_uri) if allowed else ():
        if location and not within(location, allowed):
            reason = f"{location} is outside the locations this job may read: {allowed}"
            return item.model_copy(update={"error": reason})
    # Two items with one id would write the same outputs; the first one keeps the id.
    key = int.from_bytes(hashlib.blake2b(item.item_id.encode(), digest_size=8).digest())
    first = seen.setdefault(key, item.index)
    if first != item.index:
        reason = f"duplicate item id {item.item_id!r} (catalog entry {first} has it)"
        return item.model_copy(update={"error": reason})
    return item


def _prefix_items(uri: str, s3: S3Settings | None) -> Iterator[CatalogItem]:
    fs, root = storage.resolve(uri, s3)
    for index, info in enumerate(_walk(fs, root, uri)):
        relative = posixpath.relpath(info.path, root)
        suffix = PurePosixPath(relative).suffix.lower()
        error = (
            ""
            if suffix in AUDIO_SUFFIXES
            else f"not an audio file ({suffix or 'no extension'}); catalogs hold "
            + ", ".join(s.lstrip(".") for s in AUDIO_SUFFIXES)
        )
        yield CatalogItem(
            index=index, item_id=_item_id(relative), audio_uri=storage.join(uri, relative),
            error=error, audio_stat=FileStat.of(info, fs),
        )  # fmt: skip


def _walk(fs: pafs.FileSystem, folder: str, uri: str) -> Iterator[pafs.FileInfo]:
    """Files under ``folder`` in path order, one folder's listing in memory at a time."""
    for info in sorted(_list_folder(fs, folder, uri), key=lambda i: i.path):
        if info.base_name.startswith("."):
            continue
        if info.type == pafs.FileType.Directory:
            yield from _walk(fs, info.path, uri)
        elif info.type == pafs.FileType.File:
            yield info


def _list_folder(fs: pafs.FileSystem, folder: str, uri: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError as exc:
        raise CatalogError(f"cannot list catalog {uri}: {exc}") from exc


def _manifest_items(uri: str, s3: S3Settings | None) -> Iterator[CatalogItem]:
    rows = _manifest_rows(uri, s3)
    names = next(rows)
    columns = {name.lower(): name for name in names}
    audio_column = next((columns[c] for c in AUDIO_COLUMNS if c in columns), None)
    if audio_column is None:
        raise CatalogError(
            f"manifest {uri} has columns {names}; it needs an audio URI column "
            f"named one of {', '.join(AUDIO_COLUMNS)} (optional: id, speaker, template)"
        )
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    for index, row in enumerate(rows):
        number = index + 1
        audio = _text(row.get(audio_column))
        given_id = _text(row.get(columns.get("id", "")))
        item_id = given_id or (_item_id(PurePosixPath(audio).name) if audio else f"row-{number}")
        template = _text(row.get(columns.get("template", "")))
        yield CatalogItem(
            index=index,
            item_id=_item_id(item_id) if given_id else item_id,
            audio_uri=_absolute(audio, base) if audio else "",
            speaker=_text(row.get(columns.get("speaker", ""))),
            template_uri=_absolute(template, base) if template else "",
            error="" if audio else f"manifest row {number} has no audio URI",
        )


def _manifest_rows(uri: str, s3: S3Settings | None) -> Iterator[Any]:
    """The manifest's column names, then its rows as mappings, read block by block."""
    fs, path = storage.resolve(uri, s3)
    try:
        if uri.lower().endswith(".parquet"):
            with fs.open_input_file(path) as source:
                parquet = pq.ParquetFile(source)
                yield parquet.schema_arrow.names
                for batch in parquet.iter_batches(batch_size=CHUNK_ITEMS):
                    yield from batch.to_pylist()
            return
        stream = fs.open_input_stream(path, buffer_size=CSV_READ_BYTES)
        # Python's reader keeps every cell as written: type inference would turn an id
        # "0007" into 7 and a speaker "01" into 1.
        with io.TextIOWrapper(stream, encoding="utf-8-sig", newline="") as text:
            reader = csv.DictReader(text)
            yield list(reader.fieldnames or [])
            yield from reader
    except FileNotFoundError as exc:
        raise CatalogError(f"cannot read catalog manifest {uri}: no such file") from exc
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CatalogError(f"cannot read catalog manifest {uri}: {exc}") from exc


def _item_id(relative: str) -> str:
    """Output name of an item: its relative path without the audio extension, made URI-safe.

    Every segment is a plain name: no ``..`` (outputs stay inside the output folder), and no
    leading ``.`` or ``_`` (hidden outputs; ``_job/`` holds the job's own files).
    """
    path = PurePosixPath(relative)
    stem = str(path.with_suffix("")) if path.suffix.lower() in AUDIO_SUFFIXES else str(path)
    parts = [_UNSAFE.sub("_", part).lstrip("._") for part in stem.split("/")]
    return "/".join(part for part in parts if part) or "item"


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _absolute(target: str, base: str) -> str:
    """A manifest entry: URIs and absolute paths as given, relative paths from its folder."""
    if "://" in target or target.startswith("/"):
        return target
    return storage.join(base, target)
