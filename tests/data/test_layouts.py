"""Conversion of VOCASET, BIWI and own-data folders, built as tiny real corpora on disk."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import trimesh
from pydantic import ValidationError

from mmtalker.data.layouts import PrepareOptions, detect_layout, prepare_dataset
from mmtalker.data.shards import open_dataset
from mmtalker.errors import DatasetError

RATE = 22050
SECONDS = 0.5
TRAIN_SUBJECT = "FaceTalk_170725_00137_TA"
VAL_SUBJECT = "FaceTalk_170811_03275_TA"
TEST_SUBJECT = "FaceTalk_170809_00138_TA"


def _mesh() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=1)  # 42 vertices


def _masks() -> dict[str, list[int]]:
    return {"lips": [0, 1, 2], "eyes": [3, 4], "upper_face": [5, 6, 7]}


def _write_wav(path: Path, stereo: bool = False, seconds: float = SECONDS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(path, np.stack([tone, -tone], axis=1) if stereo else tone, RATE)


def _motion(frames: int, seed: int) -> np.ndarray:
    """(T, V, 3) float64 frames jittered around the mesh."""
    vertices = np.asarray(_mesh().vertices)
    return vertices + 0.01 * np.random.default_rng(seed).standard_normal((frames, *vertices.shape))


def _processed_corpus(
    root: Path, stems: dict[str, int], subjects: list[str], topology: str
) -> dict[str, np.ndarray]:
    """wav/, vertices_npy/ (T, V*3) with ``stems[stem]`` frames, templates.pkl and the topology."""
    meshes = {}
    for index, (stem, frames) in enumerate(sorted(stems.items())):
        _write_wav(root / "wav" / f"{stem}.wav", stereo=index == 0)
        meshes[stem] = _motion(frames, index)
        (root / "vertices_npy").mkdir(exist_ok=True)
        np.save(root / "vertices_npy" / f"{stem}.npy", meshes[stem].reshape(frames, -1))
    templates = {s: np.asarray(_mesh().vertices) + i for i, s in enumerate(subjects)}
    # As numpy 1 wrote it (FaceFormer's files): numpy 2 only aliases the numpy.core module names.
    raw = pickle.dumps(templates, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    (root / "templates.pkl").write_bytes(raw)
    (root / "templates").mkdir()
    _mesh().export(root / "templates" / topology)
    return meshes


def _vocaset(root: Path) -> dict[str, np.ndarray]:
    stems = {
        f"{TRAIN_SUBJECT}_sentence01": 32,  # 60 fps, two frames past the audio
        f"{TRAIN_SUBJECT}_sentence21": 30,
        f"{VAL_SUBJECT}_sentence05": 30,  # val subjects only use sentences 21-40
        f"{VAL_SUBJECT}_sentence22": 30,
        f"{TEST_SUBJECT}_sentence30": 30,
    }
    meshes = _processed_corpus(
        root, stems, [TRAIN_SUBJECT, VAL_SUBJECT, TEST_SUBJECT], "FLAME_sample.ply"
    )
    (root / "masks.json").write_text(json.dumps(_masks()))
    return meshes


def _regions(root: Path, eyes: bool = True) -> None:
    (root / "regions").mkdir()
    masks = _masks()
    (root / "regions" / "lve.txt").write_text(",".join(map(str, masks["lips"])))
    (root / "regions" / "fdd.txt").write_text(" ".join(map(str, masks["upper_face"])) + "\n")
    if eyes:
        (root / "regions" / "eve.txt").write_text("\n".join(map(str, masks["eyes"])))


def _by_id(uri: str) -> dict:
    return {s.sequence_id: s for s in open_dataset(uri).sequences()}


def test_vocaset_subsamples_to_30_fps_and_uses_the_faceformer_split(tmp_path: Path) -> None:
    root, out = tmp_path / "vocaset", str(tmp_path / "out")
    meshes = _vocaset(root)
    calls = []
    report = prepare_dataset(
        root, out, PrepareOptions(layout="vocaset"), progress=lambda d, t: calls.append((d, t))
    )
    manifest = report.manifest
    assert (manifest.fps, manifest.sample_rate, manifest.source) == (30.0, 16000, "vocaset")
    assert manifest.splits["train"].speakers == [TRAIN_SUBJECT]
    assert manifest.splits["train"].sentences == ["sentence01", "sentence21"]
    assert (manifest.splits["val"].speakers, manifest.splits["val"].sentences) == (
        [VAL_SUBJECT],
        ["sentence22"],
    )
    assert manifest.splits["test"].speakers == [TEST_SUBJECT]
    assert report.skipped == [
        (
            f"wav/{VAL_SUBJECT}_sentence05.wav",
            f"not in the FaceFormer VOCASET split ({VAL_SUBJECT}, sentence 5)",
        )
    ]
    assert calls[-1] == (5, 5)
    read = _by_id(out)
    first = read[f"{TRAIN_SUBJECT}_sentence01"]
    # 32 frames at 60 fps give 16 at 30 fps, trimmed to the 15 that 0.5 s of audio covers.
    np.testing.assert_allclose(
        first.vertices, meshes[f"{TRAIN_SUBJECT}_sentence01"][::2][:15], atol=1e-6
    )
    assert first.audio.dtype == np.float32 and first.audio.shape == (8000,)
    assert np.abs(first.audio).max() < 1e-3  # the stereo channels cancel in the mono mean
    assert read[f"{TRAIN_SUBJECT}_sentence21"].audio.std() > 0.1
    dataset = open_dataset(out)
    np.testing.assert_array_equal(dataset.topology.faces, _mesh().faces)
    np.testing.assert_array_equal(dataset.topology.region("eyes"), [3, 4])
    assert dataset.topology.region("face").size == 42
    np.testing.assert_allclose(dataset.templates[VAL_SUBJECT], _mesh().vertices + 1, atol=1e-6)
    assert sorted(dataset.templates) == sorted([TRAIN_SUBJECT, VAL_SUBJECT, TEST_SUBJECT])


def test_biwi_splits_by_sentence_at_25_fps(tmp_path: Path) -> None:
    root, out = tmp_path / "biwi", str(tmp_path / "out")
    stems = {"F2_e01": 13, "F2_e33": 13, "M3_e38": 14, "F1_e01": 13}
    meshes = _processed_corpus(root, stems, ["F2", "M3", "F1"], "BIWI.ply")
    _regions(root)
    report = prepare_dataset(root, out, PrepareOptions(layout="biwi"))
    splits = report.manifest.splits
    assert report.manifest.fps == 25.0
    assert (splits["train"].sentences, splits["val"].sentences, splits["test"].sentences) == (
        ["e01"],
        ["e33"],
        ["e38"],
    )
    assert splits["train"].speakers == splits["val"].speakers == ["F2"]
    assert [item for item, _ in report.skipped] == ["wav/F1_e01.wav"]
    assert "BIWI-Test-A" in report.skipped[0][1]
    read = _by_id(out)
    np.testing.assert_allclose(read["M3_e38"].vertices, meshes["M3_e38"][:13], atol=1e-6)
    np.testing.assert_array_equal(open_dataset(out).topology.region("lips"), [0, 1, 2])


def test_folder_layout_with_npy_and_obj_frames(tmp_path: Path) -> None:
    root, out = tmp_path / "own", str(tmp_path / "out")
    root.mkdir()
    _mesh().export(root / "template.ply")
    (root / "masks.json").write_text(json.dumps(_masks()))
    alice = _motion(12, 1)
    _write_wav(root / "alice" / "hello.wav", stereo=True, seconds=0.4)
    np.save(root / "alice" / "hello.npy", alice)
    bob_template = _mesh()
    bob_template.vertices += 0.5
    _write_wav(root / "bob" / "hi.wav", seconds=0.1)
    bob_template.export(root / "bob" / "template.obj")
    bob = _motion(4, 2)
    (root / "bob" / "hi").mkdir()
    for frame, vertices in enumerate(bob):
        # Unpadded numbers: frame_10 must not sort before frame_2.
        trimesh.Trimesh(vertices, _mesh().faces, process=False).export(
            root / "bob" / "hi" / f"frame_{frame * 5}.obj"
        )
    _write_wav(root / "note.wav", seconds=0.2)
    np.save(root / "note.npy", _motion(5, 3).reshape(5, -1))
    options = PrepareOptions(
        layout="folder", fps=20, val_speakers=["bob"], test_speakers=["default"]
    )
    report = prepare_dataset(root, out, options)
    assert report.skipped == []
    splits = report.manifest.splits
    assert (splits["train"].speakers, splits["val"].speakers, splits["test"].speakers) == (
        ["alice"],
        ["bob"],
        ["default"],
    )
    read = _by_id(out)
    assert set(read) == {"alice/hello", "bob/hi", "note"}
    np.testing.assert_allclose(read["alice/hello"].vertices, alice[:8], atol=1e-6)
    np.testing.assert_allclose(read["bob/hi"].vertices, bob[:2], atol=1e-6)
    assert read["note"].num_frames == 4 and read["note"].fps == 20.0
    dataset = open_dataset(out)
    np.testing.assert_allclose(dataset.templates["bob"], bob_template.vertices, atol=1e-6)
    np.testing.assert_allclose(dataset.templates["alice"], _mesh().vertices, atol=1e-6)


def test_bad_items_are_skipped_and_reported_while_the_rest_converts(tmp_path: Path) -> None:
    root, out = tmp_path / "vocaset", str(tmp_path / "out")
    _vocaset(root)
    (root / "wav" / f"{TRAIN_SUBJECT}_sentence02.wav").write_bytes(os.urandom(512))
    np.save(
        root / "vertices_npy" / f"{TRAIN_SUBJECT}_sentence02.npy", _motion(30, 5).reshape(30, -1)
    )
    _write_wav(root / "wav" / f"{TRAIN_SUBJECT}_sentence03.wav")
    _write_wav(root / "wav" / f"{TRAIN_SUBJECT}_sentence04.wav")
    np.save(root / "vertices_npy" / f"{TRAIN_SUBJECT}_sentence04.npy", np.zeros((30, 40 * 3)))
    np.save(root / "vertices_npy" / f"{TRAIN_SUBJECT}_sentence06.npy", np.zeros((30, 42 * 3)))
    nan = _motion(30, 7)
    nan[4, 4, 0] = np.nan  # an even frame, so the 60 -> 30 fps subsampling keeps it
    _write_wav(root / "wav" / f"{TRAIN_SUBJECT}_sentence07.wav")
    np.save(root / "vertices_npy" / f"{TRAIN_SUBJECT}_sentence07.npy", nan.reshape(30, -1))
    report = prepare_dataset(root, out, PrepareOptions(layout="vocaset"))
    reasons = dict(report.skipped)
    prefix = f"{TRAIN_SUBJECT}_sentence0"
    assert "unreadable wav" in reasons[f"wav/{prefix}2.wav"]
    assert reasons[f"wav/{prefix}3.wav"] == f"no mesh: expected vertices_npy/{prefix}3.npy"
    assert reasons[f"wav/{prefix}4.wav"] == "mesh has 40 vertices, the topology 42"
    assert reasons[f"vertices_npy/{prefix}6.npy"] == f"no audio: expected wav/{prefix}6.wav"
    assert "NaN" in reasons[f"wav/{prefix}7.wav"]
    assert report.manifest.num_sequences == 4
    assert len(_by_id(out)) == 4


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "vocaset"
    _vocaset(root)
    marker = tmp_path / "pwned"
    (root / "templates.pkl").write_bytes(pickle.dumps({TRAIN_SUBJECT: _Exploit(marker)}))
    with pytest.raises(DatasetError, match=r"refusing to unpickle (posix|nt)\.system"):
        prepare_dataset(root, str(tmp_path / "out"), PrepareOptions(layout="vocaset"))
    assert not marker.exists()


def test_setup_problems_raise_dataset_error(tmp_path: Path) -> None:
    options = PrepareOptions(layout="vocaset")
    with pytest.raises(DatasetError, match="corpus folder not found"):
        prepare_dataset(tmp_path / "nowhere", str(tmp_path / "out"), options)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no wav/ folder"):
        prepare_dataset(tmp_path / "empty", str(tmp_path / "out"), options)
    root = tmp_path / "vocaset"
    _vocaset(root)
    (root / "masks.json").unlink()
    with pytest.raises(DatasetError, match="no region masks"):
        prepare_dataset(root, str(tmp_path / "out"), options)
    _regions(root, eyes=False)
    with pytest.raises(DatasetError, match=r"no eve\.txt \(eyes vertex indices\)"):
        prepare_dataset(root, str(tmp_path / "out"), options)
    (root / "regions" / "eve.txt").write_text("3 4")
    (root / "templates" / "FLAME_sample.ply").unlink()
    with pytest.raises(DatasetError, match="pass --topology MESH"):
        prepare_dataset(root, str(tmp_path / "out"), options)
    assert not (tmp_path / "out").exists()


def test_a_corpus_without_a_single_usable_item_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "own"
    root.mkdir()
    _mesh().export(root / "template.obj")
    (root / "masks.json").write_text(json.dumps(_masks()))
    (root / "a.wav").write_bytes(b"not audio")
    np.save(root / "a.npy", _motion(3, 0))
    with pytest.raises(DatasetError, match=r"none of the 1 items .*a\.wav: unreadable wav"):
        prepare_dataset(root, str(tmp_path / "out"), PrepareOptions(layout="folder"))
    assert not (tmp_path / "out").exists()


def test_options_that_do_not_fit_the_layout_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="drop the fps option"):
        PrepareOptions(layout="vocaset", fps=60)
    with pytest.raises(ValidationError, match="BIWI-Test-A"):
        PrepareOptions(layout="biwi", val_speakers=["F2"])
    with pytest.raises(ValidationError, match="both val_speakers and test_speakers"):
        PrepareOptions(layout="folder", val_speakers=["a"], test_speakers=["a"])
    _write_wav(tmp_path / "alice" / "x.wav")
    with pytest.raises(DatasetError, match=r"\['carol'\] have no wav files"):
        prepare_dataset(
            tmp_path, str(tmp_path / "out"), PrepareOptions(layout="folder", val_speakers=["carol"])
        )


def test_detect_layout_from_file_names(tmp_path: Path) -> None:
    _write_wav(tmp_path / "v" / "wav" / f"{TRAIN_SUBJECT}_sentence01.wav", seconds=0.01)
    _write_wav(tmp_path / "b" / "wav" / "F2_e01.wav", seconds=0.01)
    _write_wav(tmp_path / "f" / "alice" / "hello.wav", seconds=0.01)
    assert [detect_layout(tmp_path / n) for n in "vbf"] == ["vocaset", "biwi", "folder"]
    with pytest.raises(DatasetError, match="not found"):
        detect_layout(tmp_path / "missing")
