import io
import itertools
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from mmtalker.errors import AudioError, MMTalkerError
from mmtalker.inference import ChunkPlan, Clip, animate, animate_clips, decode_audio, prepare_audio
from mmtalker.nn.mmtalker import MMTalker


def test_chunk_windows_cover_every_frame_with_overlap() -> None:
    plan = ChunkPlan(chunk=100, overlap=10)
    assert plan.windows(60) == [(0, 60)]
    for frames in (101, 191, 192, 1000, 1234):
        windows = plan.windows(frames)
        assert windows[0][0] == 0 and windows[-1][1] == frames
        assert len(windows) == math.ceil((frames - 10) / 90)
        lengths = [stop - start for start, stop in windows]
        assert max(lengths) <= 100 and max(lengths) - min(lengths) <= 1
        for (_, a1), (b0, _) in itertools.pairwise(windows):
            assert b0 == a1 - 10


def test_short_audio_is_one_chunk_and_frames_follow_the_duration(
    small_model: MMTalker, small_face: tuple
) -> None:
    template = small_face[0]["s0"]
    audio = np.random.default_rng(0).standard_normal(16000 * 2 + 100).astype(np.float32) * 0.1
    out = animate(audio, template, small_model, fps=30.0)
    assert out.shape == (61, small_face[1].num_vertices, 3)  # ceil(2.00625 s x 30)
    small_model.eval()
    # The model sees the audio zero-padded to whole frames (61 x 533.3 samples), marked as padding.
    padded = np.zeros(round(61 * 16000 / 30), np.float32)
    padded[: len(audio)] = audio
    with torch.no_grad():
        state = small_model.prepare(torch.as_tensor(template)[None])
        disp = small_model.animate(
            torch.from_numpy(padded)[None], 61, state, audio_lengths=torch.tensor([len(audio)])
        )
    np.testing.assert_allclose(out, template + disp[0].numpy(), atol=1e-6)


def test_long_audio_is_chunked_and_cross_faded(small_model: MMTalker, small_face: tuple) -> None:
    template = small_face[0]["s0"]
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(16000 * 9).astype(np.float32) * 0.1
    chunked = animate(audio, template, small_model, chunk_seconds=3.0, overlap_seconds=0.5)
    assert chunked.shape == (270, small_face[1].num_vertices, 3)
    assert np.isfinite(chunked).all()
    # Far from any seam, a chunk sees the same audio as the whole clip would at that time
    # only locally; the result stays close to the one-pass animation's scale.
    whole = animate(audio, template, small_model, chunk_seconds=60.0)
    assert np.abs(chunked - template).mean() == pytest.approx(
        np.abs(whole - template).mean(), rel=0.5
    )
    # No jumps at the seams: frame-to-frame change there is like elsewhere.
    steps = np.abs(np.diff(chunked - template, axis=0)).max(axis=(1, 2))
    assert steps.max() < 5 * np.median(steps) + 1e-9


def test_audio_preparation() -> None:
    stereo = np.stack([np.ones(4800), -np.ones(4800)], axis=1).astype(np.float32)
    mono = prepare_audio(stereo, 48000, 16000)
    assert mono.shape == (1600,) and np.abs(mono).max() < 1e-3
    with pytest.raises(AudioError, match="NaN"):
        prepare_audio(np.array([0.0, np.nan]), 16000, 16000)
    with pytest.raises(AudioError, match="non-empty"):
        prepare_audio(np.zeros(0), 16000, 16000)
    with pytest.raises(MMTalkerError, match="twice the"):
        animate(np.zeros(100), np.zeros((3, 3)), None, chunk_seconds=1.0, overlap_seconds=0.5)  # type: ignore[arg-type]


def test_clips_animated_in_groups_equal_clips_animated_alone(
    small_model: MMTalker, small_face: tuple
) -> None:
    templates = list(small_face[0].values())
    rng = np.random.default_rng(2)
    # Similar lengths share a padded group; 3.5 s exceeds the 3 s chunk and runs alone, chunked.
    lengths = [16000, 17000, 15500, 56000, 5000, 400]
    clips = [
        Clip((rng.standard_normal(n) * 0.1).astype(np.float32), templates[i % 2], i % 2)
        for i, n in enumerate(lengths)
    ]
    grouped = animate_clips(clips, small_model, chunk_seconds=3.0, overlap_seconds=0.5)
    for clip, out in zip(clips, grouped, strict=True):
        alone = animate(
            clip.audio, clip.template, small_model, speaker=clip.speaker, chunk_seconds=3.0,
            overlap_seconds=0.5,
        )  # fmt: skip
        assert out.shape == (math.ceil(len(clip.audio) / 16000 * 30), *clip.template.shape)
        motion = np.abs(alone - clip.template).max()
        assert motion > 0
        np.testing.assert_allclose(out, alone, atol=1e-3 * motion)
    assert animate_clips([], small_model) == []


def test_decode_audio_reads_bytes_by_content() -> None:
    tone = np.sin(np.arange(8000) / 10).astype(np.float32) * 0.5
    for fmt in ("WAV", "FLAC", "OGG"):
        buffer = io.BytesIO()
        sf.write(buffer, np.stack([tone, tone], axis=1), 22050, format=fmt)
        audio, rate = decode_audio(buffer.getvalue())
        assert rate == 22050 and audio.shape[-1] == 2
    with pytest.raises(AudioError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="not a readable audio file"):
        decode_audio(b"this is text, not sound")


def test_decode_audio_refuses_long_audio_before_decoding_it() -> None:
    # An hour of FLAC silence is ~170 KiB: decoding it first would allocate 230 MB.
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000 * 3600, np.float32), 16000, format="FLAC")
    with pytest.raises(AudioError, match=r"3600\.0 s, over the limit of 60 s"):
        decode_audio(buffer.getvalue(), max_seconds=60)
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(32000, np.float32), 16000, format="WAV")
    audio, rate = decode_audio(buffer.getvalue(), max_seconds=2.0)
    assert audio.shape == (32000,) and rate == 16000
