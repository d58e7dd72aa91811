import math
from pathlib import Path

import numpy as np
import pytest

from mmtalker.data.shards import open_dataset
from mmtalker.data.synth import (
    SynthConfig,
    assign_sentences,
    load_sentences,
    make_speakers,
    synthesize_corpus,
)
from mmtalker.errors import DatasetError


def test_tiny_corpus_has_speaker_splits_and_held_out_sentences(tiny_corpus: str) -> None:
    m = open_dataset(tiny_corpus).manifest
    assert set(m.splits) == {"train", "val", "test"}
    speakers = [set(s.speakers) for s in m.splits.values()]
    assert sum(len(s) for s in speakers) == len(set.union(*speakers)) == 7
    train_sentences = set(m.splits["train"].sentences)
    for split in ("val", "test"):
        assert train_sentences.isdisjoint(m.splits[split].sentences)
    assert m.fps == 30.0 and m.sample_rate == 16000


def test_sequences_are_16k_float32_at_30_fps_and_time_aligned(tiny_corpus: str) -> None:
    ds = open_dataset(tiny_corpus)
    for seq in ds.sequences():
        assert seq.audio.dtype == np.float32 and seq.sample_rate == 16000
        assert np.abs(seq.audio).max() > 0.05
        assert seq.num_frames == math.ceil(seq.duration * 30)
        assert seq.vertices.shape[1:] == (ds.topology.num_vertices, 3)


def test_every_region_moves(tiny_corpus: str) -> None:
    """Lips move most, and eyes and the upper face move too, so their metrics mean something."""
    ds = open_dataset(tiny_corpus)
    peak = dict.fromkeys(("lips", "eyes", "upper_face"), 0.0)
    for seq in ds.sequences():
        motion = np.linalg.norm(seq.vertices - ds.templates[seq.speaker][None], axis=2)
        for name in peak:
            peak[name] = max(peak[name], float(motion[:, ds.topology.region(name)].max()))
    assert peak["lips"] > 0.008  # metres: the jaw opens the lips by more than 8 mm
    assert peak["eyes"] > 0.005  # a blink moves the upper lid by several millimetres
    assert peak["upper_face"] > 0.002  # brows rise with prosody


def test_generation_is_deterministic_by_seed(tmp_path: Path) -> None:
    config = SynthConfig.preset("tiny", speakers=3, sentences_per_speaker=2)
    a = synthesize_corpus(config, str(tmp_path / "a"))
    b = synthesize_corpus(config, str(tmp_path / "b"))
    c = synthesize_corpus(config.model_copy(update={"seed": 1}), str(tmp_path / "c"))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]


def test_speakers_differ_in_voice_face_and_style() -> None:
    speakers = make_speakers(SynthConfig.preset("bench"))
    assert len({s.voice for s in speakers}) == len(speakers) == 12
    assert len({s.shape.width for s in speakers}) == 12
    assert [s.split for s in speakers].count("test") == 2


def test_bench_preset_plans_over_an_hour_of_speech() -> None:
    config = SynthConfig.preset("bench")
    plan = assign_sentences(config, make_speakers(config), len(load_sentences()))
    # espeak-ng speaks a built-in sentence in about 2.5 s on average at these rates.
    assert sum(len(v) for v in plan.values()) * 2.5 > 3600
    assert config.speakers >= 8


def test_user_text_file(tmp_path: Path) -> None:
    text = tmp_path / "lines.txt"
    text.write_text("Hello there.\n\nMany mumbling mice.\nWho knew?\n", "utf-8")
    assert load_sentences(str(text)) == ["Hello there.", "Many mumbling mice.", "Who knew?"]
    (tmp_path / "one.txt").write_text("Only one.\n")
    with pytest.raises(DatasetError, match="at least 2"):
        load_sentences(str(tmp_path / "one.txt"))
    with pytest.raises(DatasetError, match="not found"):
        load_sentences(str(tmp_path / "missing.txt"))


def test_config_rejects_too_few_training_speakers() -> None:
    with pytest.raises(ValueError, match="exceed"):
        SynthConfig(speakers=3, val_speakers=2, test_speakers=1)
