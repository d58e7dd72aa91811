"""``mmtalker train``, ``evaluate`` and ``animate`` through the installed console script."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from mmtalker.data.shards import open_dataset
from mmtalker.io.export import from_glb
from mmtalker.io.video import probe_video

MMTALKER = str(Path(sys.executable).with_name("mmtalker"))
SMALL = {
    "model": {
        "speech": {"dim": 32, "levels": 2, "n_mels": 32},
        "dim": 32, "heads": 2, "clusters": [48, 12], "basis": 16, "fourier_bands": 4,
        "head_hidden": 32,
    },
    "train": {"batch_size": 4, "learning_rate": 0.003, "warmup_steps": 5},
}  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MMTALKER, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ck")
    config = folder / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    result = _run(
        "train", "--data", tiny_corpus, "--out", str(folder / "mmtalker"), "--config", str(config),
        "--epochs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trained mmtalker" in result.stdout and "LVE" in result.stdout
    return folder / "mmtalker"


def test_evaluate_prints_one_table_with_baselines(tiny_corpus: str, checkpoint: Path) -> None:
    result = _run("evaluate", "--data", tiny_corpus, "--checkpoint", str(checkpoint), "--baselines")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert all(k in header for k in ("LVE", "EVE", "MVE", "FDD"))
    assert any(line.startswith("static template") for line in lines)
    assert any(line.startswith("mmtalker (") for line in lines)


def test_animate_writes_a_mesh_sequence(tiny_corpus: str, checkpoint: Path, tmp_path: Path) -> None:
    seq = next(open_dataset(tiny_corpus).sequences("test"))
    wav = tmp_path / "speech.wav"
    stereo = np.stack([seq.audio, seq.audio], axis=1)
    sf.write(wav, stereo, 16000)
    out = tmp_path / "out.npz"
    result = _run(
        "animate", str(wav), "--checkpoint", str(checkpoint), "--out", str(out), "--formats", "glb"
    )
    assert result.returncode == 0, result.stderr
    with np.load(out, allow_pickle=False) as data:
        assert data["vertices"].shape == (seq.num_frames, seq.num_vertices, 3)
        assert float(data["fps"]) == 30.0 and data["faces"].shape[1] == 3
        frames, fps = from_glb((tmp_path / "out.glb").read_bytes())
        assert frames.shape == data["vertices"].shape and fps == 30.0
    assert "real time" in result.stdout


def test_animate_an_ict_person_as_arkit_curves_and_a_rigged_glb(
    ict_checkpoint_dir: Path, tmp_path: Path
) -> None:
    from mmtalker.rig import ARKIT_NAMES, load_ict

    wav = tmp_path / "speech.wav"
    sf.write(wav, (0.3 * np.sin(np.arange(16000) / 9)).astype(np.float32), 16000)
    out = tmp_path / "person"
    result = _run(
        "animate", str(wav), "--checkpoint", str(ict_checkpoint_dir), "--out", str(out),
        "--formats", "arkit,glb", "--identity", "7",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "person.npz", allow_pickle=False) as data:
        assert data["vertices"].shape == (30, load_ict().num_vertices, 3)
    header = (tmp_path / "person_arkit.csv").read_text().splitlines()[0].split(",")
    assert header[2:54] == [name[0].upper() + name[1:] for name in ARKIT_NAMES]
    assert (tmp_path / "person_arkit.json").is_file() and (tmp_path / "person.glb").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("animate", "/no/such.wav", "--checkpoint", "/no/ck", "--out", "x.npz"),
            "not a checkpoint",
        ),
        (("animate", "x.wav", "--out", "x.npz"), "give --model NAME@ALIAS or --checkpoint"),
        (("animate", "--catalog", "/no/audio"), "--catalog needs --output"),
        (("animate", "x.wav", "--out", "x", "--formats", "fbx"), "--formats ['fbx'] unknown"),
        (("evaluate", "--data", "/no/data"), "dataset not found"),
        (("render", "-o", "x.mp4"), "give an ANIMATION .npz"),
        (("render", "--compare", "--data", "d", "-o", "x.mp4"), "--compare takes --data and"),
        (("train", "--data", "/no/data", "--out", "x", "--model", "static"), "--model"),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreadable_audio(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    result = _run(
        "animate", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.npz")
    )
    assert result.returncode == 1 and "cannot read audio" in result.stderr


def test_evaluate_writes_an_html_report(tiny_corpus: str, checkpoint: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    result = _run(
        "evaluate", "--data", tiny_corpus, "--checkpoint", str(checkpoint), "--baselines",
        "--report", str(report),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    page = report.read_text()
    assert all(text in page for text in ("LVE x1e-5", "static template", "Per speaker", "<video"))
    files = tmp_path / "report_files"
    assert (files / "static_template_heatmap.png").is_file()
    sequence = next(open_dataset(tiny_corpus).sequences("test"))
    video = probe_video(next(files.glob("mmtalker*.mp4")))
    assert video.frames == sequence.num_frames and video.has_audio and video.width == 3 * 512


def test_render_an_animation_with_its_audio(
    tiny_corpus: str, checkpoint: Path, tmp_path: Path
) -> None:
    seq = next(open_dataset(tiny_corpus).sequences("test"))
    wav = tmp_path / "speech.wav"
    sf.write(wav, seq.audio, 16000)
    assert _run("animate", str(wav), "--checkpoint", str(checkpoint), "--out",
                str(tmp_path / "anim.npz")).returncode == 0  # fmt: skip
    preview, still = tmp_path / "preview.mp4", tmp_path / "still.png"
    result = _run(
        "render", str(tmp_path / "anim.npz"), "--audio", str(wav), "-o", str(preview),
        "--width", "160", "--height", "192", "--still", str(still),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = probe_video(preview)
    assert (info.frames, info.width, info.height, info.has_audio) == (
        seq.num_frames,
        160,
        192,
        True,
    )
    with Image.open(still) as image:
        assert image.size == (160, 192)


def test_render_compares_a_model_with_the_ground_truth(
    tiny_corpus: str, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "compare.mp4"
    result = _run(
        "render", "--compare", "--data", tiny_corpus, "--checkpoint", str(checkpoint),
        "-o", str(out), "--width", "96", "--height", "128",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = probe_video(out)
    first = next(open_dataset(tiny_corpus).sequences("test"))
    assert (info.frames, info.width, info.height) == (first.num_frames, 3 * 96, 128)
    assert info.has_audio and first.sequence_id in result.stdout
