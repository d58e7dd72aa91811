"""Storage URIs (local paths, ``file://``, ``s3://``) mapped to pyarrow filesystems.

This lives in the library, not the platform, because the library's own data commands read and
write ``s3://`` datasets and the library must never import the platform.
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmtalker.errors import StorageError


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
        """A pyarrow S3 filesystem for these settings."""
        kwargs: dict[str, object] = {"region": self.region}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            if not parsed.scheme or not parsed.netloc:
                raise StorageError(
                    f"S3 endpoint {self.endpoint_url!r} is not a URL; use e.g. http://127.0.0.1:9000"
                )
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        if self.access_key_id and self.secret_access_key:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
            if self.session_token:
                kwargs["session_token"] = self.session_token
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


def exists(uri: str | Path, s3: S3Settings | None = None) -> bool:
    """Whether a file or folder exists at the URI."""
    fs, path = resolve(uri, s3)
    return _stat(fs, path, uri).type != pafs.FileType.NotFound


def is_file(uri: str | Path, s3: S3Settings | None = None) -> bool:
    """Whether a plain file exists at the URI."""
    fs, path = resolve(uri, s3)
    return _stat(fs, path, uri).type == pafs.FileType.File


def read_bytes(uri: str | Path, s3: S3Settings | None = None) -> bytes:
    """The whole content of the file at the URI."""
    fs, path = resolve(uri, s3)
    if _stat(fs, path, uri).type != pafs.FileType.File:
        raise StorageError(f"no such file: {uri}")
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


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
    if _stat(fs, path, uri).type == pafs.FileType.File:
        fs.delete_file(path)


def _stat(fs: pafs.FileSystem, path: str, uri: str | Path) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"cannot reach {uri}: {exc}") from exc
