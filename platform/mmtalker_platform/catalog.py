"""Audio catalogs: a prefix of audio files, or a manifest (CSV or Parquet) of audio URIs.

Every file under a prefix (hidden dot-files aside) and every manifest row becomes exactly one
:class:`CatalogItem`, including the ones that cannot be animated (a text file, a row without
audio, a duplicate id): those carry the reason, so the results manifest accounts for all.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel

from mmtalker import storage
from mmtalker.errors import MMTalkerError
from mmtalker.storage import S3Settings

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Manifest columns: the audio URI (required), an item id, a training speaker, a template mesh.
AUDIO_COLUMNS = ("audio", "uri", "path")
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


class CatalogError(MMTalkerError):
    """A catalog cannot be listed or read: missing, empty, or a manifest without audio column."""


class CatalogItem(BaseModel):
    """One catalog entry; ``error`` is set when it is known unusable before decoding."""

    item_id: str
    audio_uri: str
    speaker: str = ""
    template_uri: str = ""
    error: str = ""


def list_catalog(uri: str, s3: S3Settings | None = None) -> list[CatalogItem]:
    """The items of a catalog: a manifest file (``.csv``/``.parquet``) or a prefix of files."""
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        items = _manifest_items(uri, s3)
    else:
        items = _prefix_items(uri, s3)
    return _mark_duplicates(items)


def check_output_outside(catalog: str, output: str, s3: S3Settings | None = None) -> None:
    """Refuse an output inside a catalog prefix: outputs would become catalog items next run."""
    catalog_fs, catalog_path = storage.resolve(catalog, s3)
    output_fs, output_path = storage.resolve(output, s3)
    if catalog.lower().endswith(MANIFEST_SUFFIXES) or type(catalog_fs) is not type(output_fs):
        return
    if output_path == catalog_path or output_path.startswith(catalog_path.rstrip("/") + "/"):
        raise CatalogError(
            f"output {output} lies inside the catalog {catalog}; write outputs elsewhere"
        )


def _prefix_items(uri: str, s3: S3Settings | None) -> list[CatalogItem]:
    fs, root = storage.resolve(uri, s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise CatalogError(f"cannot list catalog {uri}: {exc}") from exc
    items = []
    for info in sorted(infos, key=lambda i: i.path):
        relative = posixpath.relpath(info.path, root)
        if info.type != pafs.FileType.File or _hidden(relative):
            continue
        suffix = PurePosixPath(relative).suffix.lower()
        error = (
            ""
            if suffix in AUDIO_SUFFIXES
            else f"not an audio file ({suffix or 'no extension'}); catalogs hold "
            + ", ".join(s.lstrip(".") for s in AUDIO_SUFFIXES)
        )
        items.append(
            CatalogItem(
                item_id=_item_id(relative), audio_uri=storage.join(uri, relative), error=error
            )
        )
    if not items:
        raise CatalogError(
            f"catalog {uri} holds no files; give a folder or s3:// prefix of audio files, "
            "or a .csv/.parquet manifest"
        )
    return items


def _manifest_items(uri: str, s3: S3Settings | None) -> list[CatalogItem]:
    try:
        data = storage.read_bytes(uri, s3)
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            names, rows = table.column_names, table.to_pylist()
        else:
            # Python's reader keeps every cell as written: type inference would turn an id
            # "0007" into 7 and a speaker "01" into 1.
            reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
            rows = list(reader)
            names = list(reader.fieldnames or [])
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CatalogError(f"cannot read catalog manifest {uri}: {exc}") from exc
    columns = {name.lower(): name for name in names}
    audio_column = next((columns[c] for c in AUDIO_COLUMNS if c in columns), None)
    if audio_column is None:
        raise CatalogError(
            f"manifest {uri} has columns {names}; it needs an audio URI column "
            f"named one of {', '.join(AUDIO_COLUMNS)} (optional: id, speaker, template)"
        )
    base = _parent(uri)
    items = []
    for number, row in enumerate(rows, start=1):
        audio = _text(row.get(audio_column))
        given_id = _text(row.get(columns.get("id", "")))
        item_id = given_id or (_item_id(PurePosixPath(audio).name) if audio else f"row-{number}")
        items.append(
            CatalogItem(
                item_id=_item_id(item_id) if given_id else item_id,
                audio_uri=_absolute(audio, base) if audio else "",
                speaker=_text(row.get(columns.get("speaker", ""))),
                template_uri=_absolute(t, base)
                if (t := _text(row.get(columns.get("template", ""))))
                else "",
                error="" if audio else f"manifest row {number} has no audio URI",
            )
        )
    if not items:
        raise CatalogError(f"manifest {uri} has no rows")
    return items


def _mark_duplicates(items: list[CatalogItem]) -> list[CatalogItem]:
    # Two items with one id would write the same outputs; the first one keeps the id.
    seen: dict[str, CatalogItem] = {}
    marked = []
    for item in items:
        first = seen.setdefault(item.item_id, item)
        if first is not item and not item.error:
            item = item.model_copy(
                update={"error": f"duplicate item id {item.item_id!r} (first: {first.audio_uri})"}
            )
        marked.append(item)
    return marked


def _item_id(relative: str) -> str:
    """Output name of an item: its relative path without the audio extension, made URI-safe.

    Every segment is a plain name: no ``..`` (outputs stay inside the output folder), and no
    leading ``.`` or ``_`` (hidden outputs; ``_job/`` holds the job's own files).
    """
    path = PurePosixPath(relative)
    stem = str(path.with_suffix("")) if path.suffix.lower() in AUDIO_SUFFIXES else str(path)
    parts = [_UNSAFE.sub("_", part).lstrip("._") for part in stem.split("/")]
    return "/".join(part for part in parts if part) or "item"


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _absolute(target: str, base: str) -> str:
    """A manifest entry: URIs and absolute paths as given, relative paths from its folder."""
    if "://" in target or target.startswith("/"):
        return target
    return storage.join(base, target)
