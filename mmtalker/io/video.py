"""Preview videos: H.264 MP4 with an optional AAC audio track, through imageio-ffmpeg's binary.

Frames are streamed to one ffmpeg process as they come, so a clip of any length never sits in
memory. The file appears under its final name only once ffmpeg has finished it successfully.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import IO, NamedTuple

import imageio_ffmpeg
import numpy as np
import soundfile

from mmtalker.errors import VideoError
from mmtalker.io.render import Regions, RenderConfig, Renderer, comparison_frames

#: A sound file ffmpeg can read, or mono/multichannel samples with their rate in Hz.
Audio = str | Path | tuple[np.ndarray, int]

# x264 at this preset encodes a 512×512 preview several times faster than rendering it.
_PRESET = "veryfast"
_STDERR_TAIL = 2000


class VideoInfo(NamedTuple):
    """What :func:`probe_video` finds in a file."""

    frames: int
    fps: float
    width: int
    height: int
    has_audio: bool


def write_video(
    frames: Iterable[np.ndarray],
    fps: float,
    path: str | Path,
    audio: Audio | None = None,
    *,
    crf: int = 20,
) -> int:
    """Encode (H, W, 3) uint8 RGB frames as H.264 (yuv420p) MP4; return the frame count.

    Odd widths or heights get one repeated edge column or row (yuv420p needs even sizes).
    ``audio`` is muxed as AAC. ``crf`` is x264's quality: lower is better and larger (0–51).
    """
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"fps must be a positive finite number, got {fps}")
    if not 0 <= crf <= 51:
        raise VideoError(f"crf must be between 0 and 51, got {crf}")
    path = Path(path)
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise VideoError("no frames to write; give at least one frame")
    shape = _checked_frame(first, None, 0).shape
    height, width = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tempfile.TemporaryDirectory(prefix="mmtalker-video-") as scratch:
        inputs = ["-i", str(_audio_file(audio, Path(scratch)))] if audio is not None else []
        codecs = ["-c:a", "aac", "-b:a", "160k"] if audio is not None else ["-an"]
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", str(Fraction(fps).limit_denominator(1001)), "-i", "-", *inputs,
            "-map", "0:v:0", *(["-map", "1:a:0"] if audio is not None else []),
            "-c:v", "libx264", "-preset", _PRESET, "-crf", str(crf), "-pix_fmt", "yuv420p",
            *codecs, "-movflags", "+faststart", "-f", "mp4", str(temporary),
        ]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        # stderr goes to a file: a pipe nobody reads while frames are written could fill up
        # and stall ffmpeg.
        with open(Path(scratch) / "ffmpeg.log", "w+b") as log:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=log)
            try:
                count = _feed(process, itertools.chain([first], iterator), shape, log)
                if process.wait() != 0:
                    raise VideoError(f"ffmpeg could not write {path}: {_tail(log)}")
            except BaseException:
                process.kill()
                with contextlib.suppress(BrokenPipeError):
                    process.stdin.close()
                process.wait()
                temporary.unlink(missing_ok=True)
                raise
    os.replace(temporary, path)
    return count


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate, size and whether an audio stream is present, read by ffmpeg."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    # Copying the video stream to the null muxer counts its frames without decoding them.
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path),
        "-map", "0:v:0", "-c", "copy", "-f", "null", "-",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    log = result.stderr
    video = re.search(r"Stream #[^\n]*?: Video: [^\n]*?, (\d+)x(\d+)\b[^\n]*?, ([\d.]+) fps", log)
    frames = re.findall(r"frame=\s*(\d+)", log)
    if result.returncode != 0 or video is None or not frames:
        raise VideoError(f"{path} is not a readable video: {log[-_STDERR_TAIL:].strip()}")
    width, height, fps = video.groups()
    has_audio = re.search(r"Stream #[^\n]*?: Audio:", log) is not None
    return VideoInfo(int(frames[-1]), float(fps), int(width), int(height), has_audio)


def write_animation(
    vertices: np.ndarray,
    faces: np.ndarray,
    path: str | Path,
    fps: float,
    audio: Audio | None = None,
    *,
    config: RenderConfig | None = None,
    neutral: np.ndarray | None = None,
    regions: Regions | None = None,
) -> int:
    """Render an animation (T, V, 3) to an MP4, framed on ``neutral`` (default: frame 0).

    ``regions`` (e.g. ``topology.regions``) colour the face and frame it as a close-up.
    """
    frames = np.asarray(vertices, dtype=np.float32)
    if frames.ndim != 3 or len(frames) == 0:
        raise VideoError(f"vertices must be (T, V, 3) with T ≥ 1, got {frames.shape}")
    renderer = Renderer(faces, frames[0] if neutral is None else neutral, config, regions=regions)
    return write_video((renderer.render(frame) for frame in frames), fps, path, audio)


def write_comparison(
    truth: np.ndarray,
    prediction: np.ndarray,
    faces: np.ndarray,
    path: str | Path,
    fps: float,
    audio: Audio | None = None,
    *,
    config: RenderConfig | None = None,
    vmax: float | None = None,
    regions: Regions | None = None,
) -> int:
    """An MP4 of ground truth | prediction | error heatmap, all framed on the truth's frame 0.

    See :func:`mmtalker.io.render.comparison_frames` for the error and its colour scale;
    ``regions`` colour the face panels and frame all three as a close-up.
    """
    truth = np.asarray(truth, dtype=np.float32)
    if truth.ndim != 3 or len(truth) == 0:
        raise VideoError(f"truth must be (T, V, 3) with T ≥ 1, got {truth.shape}")
    renderer = Renderer(faces, truth[0], config, regions=regions)
    return write_video(comparison_frames(truth, prediction, renderer, vmax), fps, path, audio)


def _feed(
    process: subprocess.Popen,
    frames: Iterable[np.ndarray],
    shape: tuple[int, ...],
    log: IO[bytes],
) -> int:
    """Write every frame to ffmpeg's stdin, then close it; return how many were written."""
    count = 0
    try:
        for index, frame in enumerate(frames):
            frame = _checked_frame(frame, shape, index)
            if shape[0] % 2 or shape[1] % 2:
                frame = np.pad(frame, ((0, shape[0] % 2), (0, shape[1] % 2), (0, 0)), mode="edge")
            process.stdin.write(np.ascontiguousarray(frame).data)
            count += 1
        process.stdin.close()
    except BrokenPipeError:
        process.wait()
        raise VideoError(f"ffmpeg stopped after {count} frames: {_tail(log)}") from None
    return count


def _checked_frame(frame: np.ndarray, shape: tuple[int, ...] | None, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
        raise VideoError(
            f"frame {index} must be an (H, W, 3) uint8 RGB image, got {frame.shape} {frame.dtype}"
        )
    if shape is not None and frame.shape != shape:
        raise VideoError(
            f"frame {index} is {frame.shape}, frame 0 was {shape}; every frame needs one size"
        )
    return frame


def _audio_file(audio: Audio, scratch: Path) -> Path:
    """A sound file for ffmpeg: the given one, or the samples written to a WAV in ``scratch``."""
    if isinstance(audio, str | Path):
        if not Path(audio).is_file():
            raise VideoError(f"audio file not found: {audio}")
        return Path(audio)
    samples, rate = audio
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim not in (1, 2) or samples.size == 0 or not np.isfinite(samples).all():
        raise VideoError(
            f"audio samples must be non-empty and finite, (N,) or (N, channels), "
            f"got {samples.shape}"
        )
    if not (isinstance(rate, int | np.integer) and rate > 0):
        raise VideoError(f"audio sample rate must be a positive integer in Hz, got {rate}")
    wav = scratch / "audio.wav"
    soundfile.write(wav, samples, int(rate), subtype="FLOAT")
    return wav


def _tail(log: IO[bytes]) -> str:
    """The end of ffmpeg's log, where it says what went wrong."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-_STDERR_TAIL:].strip() or "(ffmpeg printed nothing)"
