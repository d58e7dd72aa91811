"""Storage URIs (local paths, ``file://``, ``s3://``) mapped to pyarrow filesystems.

This lives in the library, not the platform, because the library's own data commands read and
write ``s3://`` datasets and the library must never import the platform.

Request costs on S3, which decide how a catalog of millions of files performs: a filesystem is
made once per settings and reused (making one sets up a new HTTP client); :func:`open_file` is
one HEAD (size, modification time) and reading it one GET; a small write is one PUT.
"""

from __future__ import annotations

import functools
import posixpath
import uuid
from datetime import datetime
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmtalker.errors import StorageError

#: S3 filesystems kept for reuse, one per distinct endpoint and credentials.
FILESYSTEM_CACHE = 8


class S3Settings(BaseSettings):
    """S3 endpoint and credentials; every field follows the standard AWS environment variables."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    region: str = Field(
        default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    access_key_id: str | None = Field(default=None, validation_alias="AWS_ACCESS_KEY_ID")
    secret_access_key: str | None = Field(default=None, validation_alias="AWS_SECRET_ACCESS_KEY")
    session_token: str | None = Field(default=None, validation_alias="AWS_SESSION_TOKEN")

    def filesystem(self) -> pafs.S3FileSystem:
        """The pyarrow S3 filesystem for these settings, shared by every caller that has them."""
        return _s3_filesystem(
            self.endpoint_url, self.region, self.access_key_id, self.secret_access_key,
            self.session_token,
        )  # fmt: skip


@functools.lru_cache(maxsize=FILESYSTEM_CACHE)
def _s3_filesystem(
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None,
) -> pafs.S3FileSystem:
    # Delayed open: a small object is then one PUT instead of a three-request multipart upload.
    kwargs: dict[str, object] = {"region": region, "allow_delayed_open": True}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if not parsed.scheme or not parsed.netloc:
            raise StorageError(
                f"S3 endpoint {endpoint_url!r} is not a URL; use e.g. http://127.0.0.1:9000"
            )
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if access_key_id and secret_access_key:
        kwargs["access_key"] = access_key_id
        kwargs["secret_key"] = secret_access_key
        if session_token:
            kwargs["session_token"] = session_token
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | Path, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(filesystem, path)``; local paths become absolute."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{text!r} has no bucket; write s3://BUCKET/PREFIX")
        key = parsed.path.strip("/")
        path = f"{parsed.netloc}/{key}" if key else parsed.netloc
        return (s3 or S3Settings()).filesystem(), path
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), str(Path(parsed.path).resolve())
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"unsupported storage scheme in {text!r}; use a local path or s3://")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def join(uri: str | Path, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    text = str(uri)
    if "://" in text:
        return posixpath.join(text, *parts)
    return str(Path(text, *parts))


class FileStat(BaseModel):
    """Size and modification time of a stored file: together, which version of it this is.

    S3 reports modification times in whole seconds, so they are kept to the second there.
    """

    size: int
    mtime_ns: int

    @property
    def identity(self) -> str:
        """``SIZE-MTIME``: changes whenever the file is rewritten (or, on S3, replaced)."""
        return f"{self.size}-{self.mtime_ns}"

    @classmethod
    def of(cls, info: pafs.FileInfo, fs: pafs.FileSystem) -> FileStat:
        """The stat of a listed or looked-up file."""
        mtime_ns = info.mtime_ns or 0
        if isinstance(fs, pafs.S3FileSystem):
            mtime_ns -= mtime_ns % 1_000_000_000
        return cls(size=info.size or 0, mtime_ns=mtime_ns)


class OpenFile:
    """A file opened for reading, its stat known; nothing is downloaded until :meth:`read`."""

    def __init__(self, uri: str | Path, s3: S3Settings | None = None) -> None:
        self.uri = str(uri)
        fs, path = resolve(uri, s3)
        try:
            # On S3 the open is the HEAD request that tells size and modification time.
            self._stream = fs.open_input_file(path)
            if isinstance(fs, pafs.S3FileSystem):
                self.stat = _s3_stat(self._stream)
            else:
                self.stat = FileStat.of(fs.get_file_info(path), fs)
        except FileNotFoundError as exc:
            raise StorageError(f"no such file: {uri}") from exc
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from exc

    def read(self, max_bytes: int | None = None) -> bytes:
        """The whole content, refused before downloading when it is over ``max_bytes``."""
        if max_bytes is not None and self.stat.size > max_bytes:
            raise StorageError(
                f"{self.uri} is {self.stat.size / 2**20:.1f} MiB, over the read limit of "
                f"{max_bytes / 2**20:.1f} MiB"
            )
        try:
            return self._stream.read()
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri}: {exc}") from exc

    def close(self) -> None:
        """Release the stream."""
        self._stream.close()

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _s3_stat(stream: pa.NativeFile) -> FileStat:
    metadata = stream.metadata()
    modified = metadata.get("Last-Modified", b"").decode()
    seconds = int(datetime.fromisoformat(modified).timestamp()) if modified else 0
    return FileStat(size=stream.size(), mtime_ns=seconds * 1_000_000_000)


def open_file(uri: str | Path, s3: S3Settings | None = None) -> OpenFile:
    """Open a file for reading (one HEAD request on S3); raises if it does not exist."""
    return OpenFile(uri, s3)


def exists(uri: str | Path, s3: S3Settings | None = None) -> bool:
    """Whether a file or folder exists at the URI."""
    fs, path = resolve(uri, s3)
    return _stat(fs, path, uri).type != pafs.FileType.NotFound


def is_file(uri: str | Path, s3: S3Settings | None = None) -> bool:
    """Whether a plain file exists at the URI."""
    fs, path = resolve(uri, s3)
    return _stat(fs, path, uri).type == pafs.FileType.File


def read_bytes(
    uri: str | Path, s3: S3Settings | None = None, max_bytes: int | None = None
) -> bytes:
    """The whole content of the file at the URI, refused unread when over ``max_bytes``."""
    with open_file(uri, s3) as file:
        return file.read(max_bytes)


def write_bytes(uri: str | Path, data: bytes, s3: S3Settings | None = None) -> None:
    """Write a file atomically: readers never see a half-written file under the final name.

    Locally a temporary sibling is written, then moved onto the name. An S3 object appears
    only once its upload completes, so it is written in place: a move there is a copy, and a
    writer killed between the two would leave its temporary object behind.
    """
    fs, path = resolve(uri, s3)
    in_place = isinstance(fs, pafs.S3FileSystem)
    parent, name = posixpath.split(path)
    target = path if in_place else posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        if not in_place:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(target) as stream:
            stream.write(pa.py_buffer(data))
        if not in_place:
            fs.move(target, path)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}") from exc


def delete(uri: str | Path, s3: S3Settings | None = None) -> None:
    """Delete the file at the URI if it exists."""
    fs, path = resolve(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot delete {uri}: {exc}") from exc


def _stat(fs: pafs.FileSystem, path: str, uri: str | Path) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"cannot reach {uri}: {exc}") from exc
