"""Audio catalogs: prefixes and manifests list every entry once, unusable ones with a reason."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmtalker import storage
from mmtalker.storage import S3Settings
from mmtalker_platform.catalog import (
    CatalogError,
    check_catalog,
    check_output_outside,
    iter_catalog,
    list_catalog,
    within,
)


def _touch(path: Path, data: bytes = b"RIFF") -> None:
    # Listing never decodes: any bytes do, only names and suffixes matter.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prefix_lists_nested_audio_with_relative_ids(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    for name in ("b.wav", "spk1/utt 1.flac", "spk1/deep/x.MP3", "spk2/y.ogg", "notes.txt"):
        _touch(root / name)
    items = {item.item_id: item for item in list_catalog(str(root))}
    assert sorted(items) == ["b", "notes.txt", "spk1/deep/x", "spk1/utt_1", "spk2/y"]
    # Ids keep the folders (outputs mirror the catalog) but lose the audio extension.
    assert items["spk1/deep/x"].audio_uri == str(root / "spk1/deep/x.MP3")
    assert items["spk1/utt_1"].audio_uri == str(root / "spk1/utt 1.flac")
    assert all(items[i].error == "" for i in ("b", "spk1/deep/x", "spk1/utt_1", "spk2/y"))
    # A non-audio file is listed, not dropped: the results manifest must account for it.
    assert "not an audio file (.txt)" in items["notes.txt"].error


def test_prefix_ignores_hidden_files_and_folders(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    for name in ("a.wav", ".DS_Store", ".cache/b.wav", "d/.e.wav", "_take2.wav"):
        _touch(root / name)
    # Dotfiles are editor/OS debris; a leading "_" is a real file whose output name drops it.
    items = list_catalog(str(root))
    assert [item.item_id for item in items] == ["take2", "a"]
    assert all(item.error == "" for item in items)


def test_ids_never_leave_the_output_folder(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,id\na.wav,x/../../../etc/evil\nb.wav,..\nc.wav,./_job/x\n")
    ids = [item.item_id for item in list_catalog(str(manifest))]
    assert ids == ["x/etc/evil", "item", "job/x"]


def test_same_stem_twice_marks_the_second_as_duplicate(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    _touch(root / "a.wav")
    _touch(root / "a.flac")
    first, second = list_catalog(str(root))
    # Both would write a.npz; the first in path order keeps the id, the other fails.
    assert first.item_id == second.item_id == "a"
    assert first.audio_uri.endswith("a.flac") and first.error == ""
    assert second.audio_uri.endswith("a.wav")
    assert second.error == "duplicate item id 'a' (catalog entry 0 has it)"
    assert (first.index, second.index) == (0, 1)


def test_empty_or_missing_prefix_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="holds no files"):
        list_catalog(str(tmp_path / "empty"))
    with pytest.raises(CatalogError, match="holds no files"):
        list_catalog(str(tmp_path / "missing"))


def test_csv_manifest_resolves_relative_paths_and_keeps_empty_rows(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    manifest = folder / "list.csv"
    manifest.write_text(
        "audio,id,speaker,template\n"
        "clips/a.wav,,s0,faces/s0.npy\n"
        "/data/b.flac,my item 2,s1,\n"
        "s3://bucket/c.wav,,,s3://bucket/face.obj\n"
        ",lost,s0,\n"
    )
    a, b, c, empty = list_catalog(str(manifest))
    # Relative paths are relative to the manifest's folder, not to the working directory.
    assert a.model_dump() == {
        "index": 0, "audio_stat": None, "item_id": "a", "audio_uri": str(folder / "clips/a.wav"),
        "speaker": "s0", "template_uri": str(folder / "faces/s0.npy"), "error": "",
    }  # fmt: skip
    assert (b.item_id, b.audio_uri, b.speaker, b.template_uri) == (
        "my_item_2",
        "/data/b.flac",
        "s1",
        "",
    )
    assert (c.item_id, c.audio_uri, c.template_uri) == (
        "c",
        "s3://bucket/c.wav",
        "s3://bucket/face.obj",
    )
    # A row without audio is an item with an error, never silently dropped.
    assert (
        empty.item_id == "lost"
        and empty.audio_uri == ""
        and empty.error == "manifest row 4 has no audio URI"
    )


def test_parquet_manifest_with_ids_speakers_and_templates(tmp_path: Path) -> None:
    manifest = tmp_path / "m" / "list.parquet"
    manifest.parent.mkdir()
    table = pa.table(
        {
            "Audio": ["x/one.wav", None, "two.flac", "x/one.wav"],  # column names ignore case
            "id": [None, "gone", "", None],
            "speaker": ["s0", "s1", None, "s1"],
            "template": ["faces/s0.npy", None, "/faces/t.npy", None],
        }
    )
    pq.write_table(table, manifest)
    one, missing, two, again = list_catalog(str(manifest))
    folder = manifest.parent
    assert one.model_dump() == {
        "index": 0, "audio_stat": None, "item_id": "one", "audio_uri": str(folder / "x/one.wav"),
        "speaker": "s0", "template_uri": str(folder / "faces/s0.npy"), "error": "",
    }  # fmt: skip
    assert (missing.item_id, missing.error) == ("gone", "manifest row 2 has no audio URI")
    assert (two.item_id, two.speaker, two.template_uri, two.error) == (
        "two",
        "",
        "/faces/t.npy",
        "",
    )
    # The same file listed twice would be animated twice into one output: marked duplicate.
    assert again.item_id == "one" and "duplicate item id" in again.error


def test_manifest_audio_column_may_be_named_uri(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri\ns3://b/k/a.wav\n\n")
    # Without an id column, the id comes from the file name; blank lines are no rows.
    (item,) = list_catalog(str(manifest))
    assert (item.item_id, item.audio_uri, item.error) == ("a", "s3://b/k/a.wav", "")


def test_csv_manifest_keeps_ids_and_speakers_as_written(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("audio,id,speaker\n/a/x.wav,0007,01\n")
    # Ids name output files and speakers must match the model's: both are text, not numbers.
    (item,) = list_catalog(str(manifest))
    assert (item.item_id, item.speaker) == ("0007", "01")


def test_manifest_without_audio_column_is_an_error(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,speaker\na.wav,s0\n")
    with pytest.raises(CatalogError, match="needs an audio URI column"):
        list_catalog(str(manifest))


def test_unreadable_or_empty_manifest_is_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="cannot read catalog manifest"):
        list_catalog(str(broken))
    empty = tmp_path / "empty.csv"
    empty.write_text("audio,id\n")
    with pytest.raises(CatalogError, match="has no rows"):
        list_catalog(str(empty))


def test_output_inside_the_catalog_prefix_is_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    # Outputs inside the prefix would be listed as catalog items by the next run.
    for inside in (catalog, catalog / "out", catalog / "a" / "b"):
        with pytest.raises(CatalogError, match="lies inside the catalog"):
            check_output_outside(str(catalog), str(inside))
    # A sibling whose name merely starts with the catalog's is outside.
    check_output_outside(str(catalog), str(tmp_path / "catalog-out"))
    check_output_outside(str(catalog), str(tmp_path / "out"))
    # A manifest is a file: its folder may hold the outputs.
    check_output_outside(str(tmp_path / "list.csv"), str(tmp_path / "out"))


def test_output_inside_an_s3_prefix_is_refused(s3_settings: S3Settings) -> None:
    with pytest.raises(CatalogError, match="lies inside the catalog"):
        check_output_outside("s3://bucket/audio", "s3://bucket/audio/out", s3_settings)
    check_output_outside("s3://bucket/audio", "s3://bucket/audio-out", s3_settings)
    check_output_outside("s3://bucket/audio", "/tmp/out", s3_settings)  # another filesystem


def test_s3_prefix_and_manifest_on_the_moto_server(
    s3_endpoint: str, aws_environment: dict[str, str], s3_settings: S3Settings
) -> None:
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
        region_name="us-east-1",
    )  # fmt: skip
    bucket = f"catalog-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    for key in ("audio/s0/a.wav", "audio/s1/b.flac", "audio/readme.md", "audio/.hidden.wav"):
        client.put_object(Bucket=bucket, Key=key, Body=b"RIFF")
    client.put_object(Bucket=bucket, Key="lists/m.csv", Body=b"audio,id\nclips/z.wav,zed\n")

    items = list_catalog(f"s3://{bucket}/audio", s3_settings)
    assert [(i.item_id, i.audio_uri, bool(i.error)) for i in items] == [
        ("readme.md", f"s3://{bucket}/audio/readme.md", True),
        ("s0/a", f"s3://{bucket}/audio/s0/a.wav", False),
        ("s1/b", f"s3://{bucket}/audio/s1/b.flac", False),
    ]
    # Settings from the AWS_* variables (as a Ray worker would have them) list the same items.
    assert list_catalog(f"s3://{bucket}/audio") == items
    # What the listing tells of each file is what opening it tells: a listed item is decided
    # done or not without a request of its own.
    for item in items:
        with storage.open_file(item.audio_uri, s3_settings) as opened:
            assert item.audio_stat == opened.stat and opened.stat.size == 4
    (manifest_item,) = list_catalog(f"s3://{bucket}/lists/m.csv", s3_settings)
    assert (manifest_item.item_id, manifest_item.audio_uri) == (
        "zed",
        f"s3://{bucket}/lists/clips/z.wav",
    )
    with pytest.raises(CatalogError, match="holds no files"):
        list_catalog(f"s3://{bucket}/nothing-here", s3_settings)


def test_a_csv_manifest_is_streamed_in_chunks(tmp_path: Path) -> None:
    manifest = tmp_path / "big.csv"
    rows = "".join(f"clips/{i}.wav,item{i}\n" for i in range(2500))
    # A broken byte far past the first chunk: a streamed manifest yields items before it.
    manifest.write_bytes(f"audio,id\n{rows}".encode() + b"\xff\xfe,x\n")
    chunks = iter_catalog(str(manifest), chunk=1000)
    first = next(chunks)
    assert [item.index for item in first] == list(range(1000))
    assert (first[-1].item_id, first[-1].audio_uri) == ("item999", str(tmp_path / "clips/999.wav"))
    with pytest.raises(CatalogError, match="cannot read catalog manifest"):
        list(chunks)


def test_items_outside_the_allowed_locations_fail(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "audio,template\n"
        "clips/a.wav,\n"
        "/etc/b.wav,\n"
        "clips/c.wav,/elsewhere/face.npy\n"
        "clips/../../d.wav,\n"
        "s3://other/e.wav,\n"
    )
    first, *outside = list_catalog(str(manifest), allowed=[f"{tmp_path}/"])
    assert first.error == ""
    wheres = ["/etc/b.wav", "/elsewhere/face.npy", "..", "s3://"]
    for item, where in zip(outside, wheres, strict=True):
        assert "outside the locations this job may read" in item.error and where in item.error
    # Without limits every location is allowed.
    assert all(item.error == "" for item in list_catalog(str(manifest)))


def test_within_matches_whole_path_segments() -> None:
    prefixes = ["s3://bucket/audio/", "/data"]
    assert within("s3://bucket/audio/a.wav", prefixes) and within("/data/x/y.wav", prefixes)
    assert within("/data", prefixes)
    assert not within("s3://bucket/audio-private/a.wav", prefixes)
    assert not within("/data/../etc/passwd", prefixes) and not within("/database", prefixes)


def test_unreadable_catalogs_fail_before_any_job_starts(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="holds no files"):
        check_catalog(str(tmp_path / "missing"))
    with pytest.raises(CatalogError, match="no such file"):
        check_catalog(str(tmp_path / "missing.csv"))
    (tmp_path / "list.csv").write_text("file\na.wav\n")
    with pytest.raises(CatalogError, match="needs an audio URI column"):
        check_catalog(str(tmp_path / "list.csv"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.wav").write_bytes(b"RIFF")
    check_catalog(str(tmp_path / "folder"))
