"""Preview videos: MP4 round trips through ffmpeg (frames, size, rate, audio) and clear failures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile

from mmtalker.data import motion
from mmtalker.data.face import FaceShape, FaceTemplate, make_chart, warp
from mmtalker.errors import MMTalkerError, VideoError
from mmtalker.io.render import RenderConfig, Renderer
from mmtalker.io.video import (
    probe_video,
    write_animation,
    write_comparison,
    write_video,
)

CONFIG = RenderConfig(width=96, height=112)
RATE = 16000


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, FaceTemplate]:
    """Half a second at 30 fps of a 600-vertex face opening its jaw steadily, and the face."""
    chart = make_chart(600)
    neutral = warp(chart, FaceShape())
    jaw = motion.blendshapes(chart, FaceShape(), neutral)[motion.CHANNELS.index("jaw_open")]
    opening = np.linspace(0.0, 1.0, 15)[:, None, None]
    return (neutral + opening * jaw).astype(np.float32), FaceTemplate(neutral, chart.topology())


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def gradients(count: int, height: int, width: int) -> list[np.ndarray]:
    """Smooth frames that x264 keeps almost exactly, each a little brighter than the last."""
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3))
    return [(base + 3 * k).astype(np.uint8) for k in range(count)]


def decode(path: Path) -> np.ndarray:
    """Every frame of a video as (T, H, W, 3) uint8 RGB."""
    info = probe_video(path)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-i", str(path)]
    raw = subprocess.run(
        [*command, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def test_frames_and_audio_round_trip(tmp_path: Path) -> None:
    frames = gradients(12, 48, 64)
    path = tmp_path / "clip.mp4"
    assert write_video(iter(frames), 24.0, path, audio=(tone(0.5), RATE)) == 12
    assert probe_video(path) == (12, 24.0, 64, 48, True)
    decoded = decode(path)
    assert decoded.shape == (12, 48, 64, 3)
    assert np.abs(decoded.astype(int) - np.stack(frames)).mean() < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_audio_file_and_silent_video(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, tone(0.3), RATE)
    write_video(gradients(5, 32, 32), 25.0, tmp_path / "a.mp4", audio=wav)
    write_video(gradients(5, 32, 32), 29.97, tmp_path / "b.mp4")
    assert probe_video(tmp_path / "a.mp4").has_audio
    assert probe_video(tmp_path / "b.mp4") == (5, 29.97, 32, 32, False)


def test_odd_sizes_are_padded_to_even(tmp_path: Path) -> None:
    write_video(gradients(3, 31, 45), 30.0, tmp_path / "odd.mp4")
    info = probe_video(tmp_path / "odd.mp4")
    assert (info.width, info.height, info.frames) == (46, 32, 3)


@pytest.mark.parametrize("with_regions", [False, True])
def test_animation_video_shows_the_rendered_face(
    clip: tuple[np.ndarray, FaceTemplate], tmp_path: Path, with_regions: bool
) -> None:
    vertices, face = clip
    regions = face.topology.regions if with_regions else None
    path = tmp_path / "face.mp4"
    write_animation(
        vertices, face.topology.faces, path, 30.0, (tone(0.5), RATE), config=CONFIG,
        regions=regions,
    )  # fmt: skip
    assert probe_video(path) == (15, 30.0, 96, 112, True)
    renderer = Renderer(face.topology.faces, vertices[0], CONFIG, regions=regions)
    rendered = renderer.render(vertices[7])
    decoded = decode(path)[7].astype(int)
    assert np.abs(decoded - rendered).mean() < 4
    # With regions the face is skin-coloured (red above blue), otherwise grey.
    face_pixels = decoded[(rendered != CONFIG.background).any(axis=2)]
    warmth = (face_pixels[:, 0] - face_pixels[:, 2]).mean()
    assert warmth > 40 if with_regions else abs(warmth) < 15


@pytest.mark.parametrize("with_regions", [False, True])
def test_comparison_video_is_three_panels_wide(
    clip: tuple[np.ndarray, FaceTemplate], tmp_path: Path, with_regions: bool
) -> None:
    truth, face = clip
    prediction = truth[::-1].copy()  # the jaw closing instead: equal at the middle frame only
    path = tmp_path / "compare.mp4"
    write_comparison(
        truth, prediction, face.topology.faces, path, 30.0, (tone(0.5), RATE), config=CONFIG,
        regions=face.topology.regions if with_regions else None,
    )  # fmt: skip
    assert probe_video(path) == (15, 30.0, 3 * 96, 112, True)
    frames = decode(path).astype(int)
    heat = frames[:, 30:, 2 * 96 :]  # the heatmap panel below its label
    # Viridis runs from violet to yellow: green rises with the error, which vanishes mid-clip.
    moved = np.abs(heat[0] - heat[7]).sum(axis=-1) > 60
    assert moved.sum() > 50
    assert heat[0][moved][:, 1].mean() > heat[7][moved][:, 1].mean() + 60


def test_bad_frames_fail_clearly_and_leave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.mp4"
    with pytest.raises(VideoError, match="no frames"):
        write_video([], 30.0, path)
    with pytest.raises(VideoError, match="every frame needs one size"):
        write_video([*gradients(2, 32, 32), *gradients(1, 32, 48)], 30.0, path)
    with pytest.raises(VideoError, match="uint8"):
        write_video([np.zeros((32, 32, 3), np.float32)], 30.0, path)
    with pytest.raises(VideoError, match="fps"):
        write_video(gradients(1, 32, 32), 0.0, path)
    assert list(tmp_path.iterdir()) == []


def test_bad_audio_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "bad.mp4"
    with pytest.raises(VideoError, match="not found"):
        write_video(gradients(2, 32, 32), 30.0, path, audio=tmp_path / "missing.wav")
    with pytest.raises(VideoError, match="finite"):
        write_video(gradients(2, 32, 32), 30.0, path, audio=(np.full(100, np.nan), RATE))
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not a sound file at all" * 10)
    with pytest.raises(VideoError, match="ffmpeg"):
        write_video(gradients(30, 32, 32), 30.0, path, audio=garbage)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.wav"]


def test_probe_refuses_what_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="not found"):
        probe_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("hello")
    with pytest.raises(VideoError, match="not a readable video"):
        probe_video(text)
    assert issubclass(VideoError, MMTalkerError)
