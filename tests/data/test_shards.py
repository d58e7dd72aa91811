import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmtalker.data.face import make_template
from mmtalker.data.sequence import Sequence, Topology
from mmtalker.data.shards import DatasetWriter, open_dataset
from mmtalker.errors import DatasetError, TemplateError
from mmtalker.storage import S3Settings


def _sequences(n: int, num_vertices: int, rng: np.random.Generator) -> list[Sequence]:
    out = []
    for i in range(n):
        frames = 5 + i
        out.append(
            Sequence(
                sequence_id=f"spk{i % 2}_s{i}",
                speaker=f"spk{i % 2}",
                sentence_id=f"s{i}",
                text=f"sentence {i}",
                audio=rng.standard_normal(frames * 533).astype(np.float32),
                sample_rate=16000,
                vertices=rng.standard_normal((frames, num_vertices, 3)).astype(np.float32),
                fps=30.0,
            )
        )
    return out


def _write(
    uri: str, s3: S3Settings | None = None, shard_megabytes: float = 128.0
) -> list[Sequence]:
    template = make_template(600)
    rng = np.random.default_rng(0)
    seqs = _sequences(6, template.topology.num_vertices, rng)
    templates = {"spk0": template.vertices, "spk1": template.vertices + 0.01}
    with DatasetWriter(
        uri,
        name="t",
        source="test",
        topology=template.topology,
        templates=templates,
        fps=30.0,
        sample_rate=16000,
        shard_megabytes=shard_megabytes,
        s3=s3,
    ) as writer:
        for i, seq in enumerate(seqs):
            writer.add(seq, "train" if i < 4 else "test")
    return seqs


def _assert_same(read: list[Sequence], written: list[Sequence]) -> None:
    assert [s.sequence_id for s in read] == [s.sequence_id for s in written]
    for a, b in zip(read, written, strict=True):
        np.testing.assert_array_equal(a.vertices, b.vertices)
        np.testing.assert_array_equal(a.audio, b.audio)
        assert (a.speaker, a.sentence_id, a.text, a.fps) == (
            b.speaker,
            b.sentence_id,
            b.text,
            b.fps,
        )


def test_local_round_trip_with_several_shards(tmp_path: Path) -> None:
    written = _write(str(tmp_path / "ds"), shard_megabytes=0.05)
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.manifest.num_sequences == 6
    assert len(ds.manifest.shards) > 2
    assert ds.manifest.splits["train"].speakers == ["spk0", "spk1"]
    assert ds.manifest.splits["train"].num_frames == 5 + 6 + 7 + 8
    _assert_same(list(ds.sequences("train")) + list(ds.sequences("test")), written)
    assert ds.topology.id == make_template(600).topology.id
    np.testing.assert_allclose(ds.templates["spk1"], make_template(600).vertices + 0.01)
    ds.verify()


def test_round_trip_through_s3_server(s3_settings: S3Settings, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/datasets/tiny"
    written = _write(uri, s3_settings)
    ds = open_dataset(uri, s3_settings)
    ds.verify()
    _assert_same(list(ds.sequences()), written)
    assert all(u.startswith(f"s3://{s3_bucket}/datasets/tiny/") for u in ds.shard_uris())


def test_manifest_records_counts_durations_and_checksums(tmp_path: Path) -> None:
    _write(str(tmp_path / "ds"))
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["schema_version"] == 3
    assert manifest["topology"]["regions"].keys() >= {"lips", "eyes", "upper_face", "face"}
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    total = sum(s["audio_seconds"] for s in manifest["splits"].values())
    assert total == pytest.approx(sum(5 + i for i in range(6)) * 533 / 16000)


def test_manifest_records_each_splits_rms_displacement(tmp_path: Path) -> None:
    written = _write(str(tmp_path / "ds"))
    ds = open_dataset(str(tmp_path / "ds"))
    for split, seqs in (("train", written[:4]), ("test", written[4:])):
        disp = [s.vertices - ds.templates[s.speaker][None] for s in seqs]
        rms = np.sqrt(np.mean(np.concatenate([d.ravel() for d in disp]).astype(np.float64) ** 2))
        assert ds.manifest.splits[split].displacement_rms == pytest.approx(rms, rel=1e-9)


def test_corrupted_shard_fails_verification(tmp_path: Path) -> None:
    _write(str(tmp_path / "ds"))
    shard = next((tmp_path / "ds").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DatasetError, match="checksum"):
        open_dataset(str(tmp_path / "ds")).verify()


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "malformed"), ('{"schema_version": 7}', "malformed at schema_version")],
)
def test_malformed_manifest_gives_one_line_error(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(str(tmp_path))
    assert "\n" not in str(info.value)


def test_folder_without_manifest_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no dataset\.json"):
        open_dataset(str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(str(tmp_path / "nope"))


def test_existing_dataset_is_not_overwritten_by_default(tmp_path: Path) -> None:
    _write(str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match="already holds a dataset"):
        _write(str(tmp_path / "ds"))


def test_writer_rejects_inconsistent_sequences(tmp_path: Path) -> None:
    template = make_template(600)
    writer = DatasetWriter(
        str(tmp_path / "ds"),
        name="t",
        source="test",
        topology=template.topology,
        templates={"spk0": template.vertices},
        fps=30.0,
        sample_rate=16000,
    )
    rng = np.random.default_rng(0)
    good = _sequences(1, template.topology.num_vertices, rng)[0]
    with pytest.raises(DatasetError, match="split"):
        writer.add(good, "holdout")
    with pytest.raises(DatasetError, match="vertices"):
        writer.add(_sequences(1, 10, rng)[0], "train")
    with pytest.raises(DatasetError, match="no template"):
        writer.add(_sequences(2, template.topology.num_vertices, rng)[1], "train")
    with pytest.raises(DatasetError, match="no sequences"):
        writer.close()
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_sequence_and_topology_validation() -> None:
    with pytest.raises(DatasetError, match="NaN"):
        Sequence("x", "s", "t", np.array([np.nan], np.float32), 16000, np.zeros((1, 3, 3)), 30.0)
    with pytest.raises(DatasetError, match=r"\(T, V, 3\)"):
        Sequence("x", "s", "t", np.zeros(10), 16000, np.zeros((1, 3)), 30.0)
    regions = {name: [0] for name in ("lips", "eyes", "upper_face", "face")}
    with pytest.raises(TemplateError, match="outside"):
        Topology(np.array([[0, 1, 5]]), 3, regions)
    with pytest.raises(TemplateError, match="lacks the regions"):
        Topology(np.array([[0, 1, 2]]), 3, {"lips": [0]})
    topo = Topology(np.array([[0, 1, 2]]), 3, regions)
    assert Topology.from_npz(topo.to_npz()).id == topo.id


def test_per_frame_controls_round_trip_with_their_names(tmp_path: Path) -> None:
    template = make_template(600)
    rng = np.random.default_rng(1)
    seqs = [
        dataclasses.replace(s, controls=rng.uniform(0, 1, (s.num_frames, 4)).astype(np.float32))
        for s in _sequences(3, template.topology.num_vertices, rng)
    ]
    names = ["jawOpen", "mouthClose", "eyeBlinkLeft", "eyeBlinkRight"]
    templates = {"spk0": template.vertices, "spk1": template.vertices}
    with DatasetWriter(
        str(tmp_path / "ds"), name="c", source="test", topology=template.topology,
        templates=templates, fps=30.0, sample_rate=16000, control_names=names,
    ) as writer:  # fmt: skip
        for seq in seqs:
            writer.add(seq, "train")
        with pytest.raises(DatasetError, match="0 controls per frame"):
            writer.add(dataclasses.replace(seqs[0], controls=None), "train")
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.manifest.control_names == names
    for read, written in zip(ds.sequences("train"), seqs, strict=True):
        np.testing.assert_array_equal(read.controls, written.controls)


def test_schema_1_shards_without_controls_still_read(tmp_path: Path) -> None:
    seqs = _write(str(tmp_path / "ds"))
    # Rewrite one shard the way schema 1 wrote it: without the control (and phone) columns.
    shard = next((tmp_path / "ds").glob("train-*.parquet"))
    table = pq.read_table(shard).drop_columns(["num_controls", "controls", "phones"])
    pq.write_table(table, shard)
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    manifest["schema_version"] = 1
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(manifest))
    read = list(open_dataset(str(tmp_path / "ds")).sequences("train"))
    _assert_same(read, seqs[:4])
    assert all(s.controls is None for s in read)


def test_per_frame_phones_round_trip_with_their_names(tmp_path: Path) -> None:
    template = make_template(600)
    rng = np.random.default_rng(2)
    seqs = [
        dataclasses.replace(s, phones=rng.integers(0, 3, s.num_frames))
        for s in _sequences(3, template.topology.num_vertices, rng)
    ]
    templates = {"spk0": template.vertices, "spk1": template.vertices}
    with DatasetWriter(
        str(tmp_path / "ds"), name="p", source="test", topology=template.topology,
        templates=templates, fps=30.0, sample_rate=16000, phone_names=["pause", "a", "m"],
    ) as writer:  # fmt: skip
        for seq in seqs:
            writer.add(seq, "train")
        for bad in (None, np.full(seqs[0].num_frames, 3)):
            with pytest.raises(DatasetError, match="phone labels do not fit"):
                writer.add(dataclasses.replace(seqs[0], phones=bad), "train")
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.manifest.phone_names == ["pause", "a", "m"]
    for read, written in zip(ds.sequences("train"), seqs, strict=True):
        np.testing.assert_array_equal(read.phones, written.phones)
    with pytest.raises(DatasetError, match="phones must be 5 integer classes"):
        dataclasses.replace(seqs[0], phones=np.zeros(4, np.int64))


def test_schema_2_shards_without_phones_still_read(tmp_path: Path) -> None:
    seqs = _write(str(tmp_path / "ds"))
    shard = next((tmp_path / "ds").glob("train-*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["phones"]), shard)
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    manifest["schema_version"] = 2
    del manifest["phone_names"]
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(manifest))
    read = list(open_dataset(str(tmp_path / "ds")).sequences("train"))
    _assert_same(read, seqs[:4])
    assert all(s.phones is None for s in read)
