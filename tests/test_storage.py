from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mmtalker import storage
from mmtalker.errors import StorageError
from mmtalker.storage import S3Settings


def test_local_paths_and_file_uris_resolve_to_absolute_local_paths(tmp_path: Path) -> None:
    fs, path = storage.resolve(tmp_path / "a")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "a")
    assert storage.resolve(f"file://{tmp_path}/b")[1] == str(tmp_path / "b")


def test_s3_uri_resolves_bucket_and_key(s3_settings: S3Settings) -> None:
    fs, path = storage.resolve("s3://bucket/some/key/", s3_settings)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/key"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///nobucket", "hdfs://host/path"])
def test_unsupported_or_malformed_uris_raise_storage_error(uri: str) -> None:
    with pytest.raises(StorageError):
        storage.resolve(uri)


def test_settings_read_standard_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other tests may have exported the higher-priority variants for Ray processes.
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    settings = S3Settings()
    assert (settings.endpoint_url, settings.region) == ("http://127.0.0.1:9", "eu-west-1")
    assert (settings.access_key_id, settings.secret_access_key) == ("key", "secret")


def test_endpoint_without_scheme_is_rejected() -> None:
    with pytest.raises(StorageError, match="not a URL"):
        S3Settings(endpoint_url="127.0.0.1:9000").filesystem()


def test_join_keeps_scheme(tmp_path: Path) -> None:
    assert storage.join("s3://b/prefix", "x.parquet") == "s3://b/prefix/x.parquet"
    assert storage.join(str(tmp_path), "x") == str(tmp_path / "x")


def test_atomic_write_leaves_no_temporary_files_locally(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    storage.write_bytes(target, b"payload")
    assert storage.read_bytes(target) == b"payload"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    storage.delete(target)
    assert not storage.exists(target)


def test_round_trip_on_s3(s3_settings: S3Settings, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/dir/file.bin"
    assert not storage.exists(uri, s3_settings)
    storage.write_bytes(uri, b"hello", s3_settings)
    assert storage.is_file(uri, s3_settings)
    assert storage.read_bytes(uri, s3_settings) == b"hello"
    fs, path = storage.resolve(f"s3://{s3_bucket}/dir", s3_settings)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    assert names == ["file.bin"]


def test_reading_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(tmp_path / "missing")


def test_s3_filesystems_are_made_once_per_settings(s3_settings: S3Settings) -> None:
    # Making one sets up a new HTTP client: a catalog of millions of files must not.
    first, _ = storage.resolve("s3://bucket/a", s3_settings)
    again, _ = storage.resolve("s3://bucket/b", S3Settings(**s3_settings.model_dump()))
    assert first is again
    other = S3Settings(**{**s3_settings.model_dump(), "region": "eu-west-1"})
    assert storage.resolve("s3://bucket/a", other)[0] is not first


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_read_over_its_limit_is_refused_before_downloading(
    where: str, tmp_path: Path, s3_settings: S3Settings, s3_bucket: str
) -> None:
    uri = str(tmp_path / "big.bin") if where == "local" else f"s3://{s3_bucket}/big.bin"
    storage.write_bytes(uri, b"x" * 5000, s3_settings)
    with pytest.raises(StorageError, match="over the read limit"):
        storage.read_bytes(uri, s3_settings, max_bytes=4999)
    assert storage.read_bytes(uri, s3_settings, max_bytes=5000) == b"x" * 5000


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_opened_file_tells_the_stat_its_listing_tells(
    where: str, tmp_path: Path, s3_settings: S3Settings, s3_bucket: str
) -> None:
    folder = str(tmp_path) if where == "local" else f"s3://{s3_bucket}/dir"
    uri = storage.join(folder, "a.bin")
    storage.write_bytes(uri, b"hello", s3_settings)
    fs, path = storage.resolve(folder, s3_settings)
    (listed,) = fs.get_file_info(pafs.FileSelector(path))
    with storage.open_file(uri, s3_settings) as opened:
        # Equal stats let a listed file be judged unchanged without a request of its own.
        assert opened.stat == storage.FileStat.of(listed, fs)
        assert opened.stat.size == 5 and opened.stat.mtime_ns > 0
        assert opened.read() == b"hello"
    storage.write_bytes(uri, b"hello, again", s3_settings)
    with storage.open_file(uri, s3_settings) as rewritten:
        assert rewritten.stat.identity != opened.stat.identity
