import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from mmtalker.data.corpus_face import IctFace
from mmtalker.data.shards import open_dataset
from mmtalker.data.synth import (
    SYNTH_REVISION,
    SynthConfig,
    Voices,
    assign_sentences,
    choose_voice,
    load_sentences,
    make_speakers,
    synthesize_corpus,
)
from mmtalker.errors import DatasetError
from mmtalker.rig import ARKIT_NAMES, arkit_to_rig


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
    assert len({s.voice for s in speakers}) == len(speakers) == 20
    assert len({s.shape.width for s in speakers}) == 20
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


def test_extra_training_speakers_keep_the_held_out_speakers_and_sentences() -> None:
    base = SynthConfig.preset("bench", extra_train_speakers=0)
    grown = SynthConfig.preset("bench")
    before, after = make_speakers(base), make_speakers(grown)
    assert after[:12] == before
    assert [s.split for s in after[12:]] == ["train"] * 8
    assert len({s.voice for s in after}) == 20
    total = len(load_sentences())
    plan_before, plan_after = (
        assign_sentences(c, s, total) for c, s in ((base, before), (grown, after))
    )
    held_out = [s.id for s in before if s.split != "train"]
    assert {k: plan_after[k] for k in held_out} == {k: plan_before[k] for k in held_out}
    assert all(len(plan_after[s.id]) == 160 for s in after[12:])
    with pytest.raises(ValueError, match="at most 48"):
        SynthConfig.preset("bench", extra_train_speakers=40)
    # Past 24 speakers the en-us voices come round again, the test speakers' among them.
    with pytest.raises(ValueError, match=r"held-out speakers' voices .*'en-us\+m6'"):
        SynthConfig.preset("bench", extra_train_speakers=23)


def test_config_rejects_too_few_training_speakers() -> None:
    with pytest.raises(ValueError, match="exceed"):
        SynthConfig(speakers=3, val_speakers=2, test_speakers=1)


def test_voice_mix_gives_training_speakers_other_voices_but_keeps_held_out_ones() -> None:
    config = SynthConfig.preset("tiny", voice_mix=0.5)
    speakers = make_speakers(config)
    voices = Voices(config.sample_rate)
    pool = voices.espeak_pool()
    assert len(pool) > 100
    variants = {voice.partition("+")[2] for voice in pool}
    assert not variants & voices.espeak.klatt_variants()
    assert not any("klatt" in voice or "whisper" in voice for voice in pool)
    for index, speaker in enumerate(speakers):
        choices = [choose_voice(config, speaker, index, k, pool) for k in range(40)]
        assert choices == [choose_voice(config, speaker, index, k, pool) for k in range(40)]
        own = sum(c.voice == f"espeak:{speaker.voice}" for c in choices)
        if speaker.split == "train":
            assert 8 <= own <= 32  # about half the sentences in the speaker's own voice
            assert len({c.voice for c in choices}) > 10
        else:
            assert own == 40  # held-out speakers are evaluated in their own voice


def test_engine_share_gives_only_training_speakers_other_engines() -> None:
    config = SynthConfig.preset(
        "tiny", engine_voices=["flite:awb", "festival:kal"], engine_share=0.3
    )
    pool = ["en-us+m1"]
    for index, speaker in enumerate(make_speakers(config)):
        engines = [choose_voice(config, speaker, index, k, pool).voice for k in range(60)]
        others = [v for v in engines if not v.startswith("espeak:")]
        if speaker.split == "train":
            assert 8 <= len(others) <= 30 and set(others) == {"flite:awb", "festival:kal"}
        else:
            assert others == []
    # Without other engines every sentence keeps the voice it had before they existed.
    plain = SynthConfig.preset("tiny", engine_share=0.0)
    speaker = make_speakers(plain)[0]
    assert [choose_voice(plain, speaker, 0, k, pool) for k in range(20)] == [
        choose_voice(plain.model_copy(update={"engine_voices": ["flite:awb"]}), speaker, 0, k, pool)
        for k in range(20)
    ]
    with pytest.raises(ValueError, match="needs engine_voices"):
        SynthConfig(engine_voices=[], engine_share=0.2)
    with pytest.raises(ValueError, match="voice_mix"):
        SynthConfig(engine_voices=["espeak:en-us"])
    with pytest.raises(ValueError, match="flite:NAME"):
        SynthConfig(engine_voices=["awb"])


def test_voices_override_revoices_only_the_chosen_splits(tmp_path: Path) -> None:
    base = SynthConfig.preset("tiny", speakers=4, sentences_per_speaker=2)
    voices = ["espeak:en-us+klatt3", "festival:kal"]
    proxy = base.model_copy(update={"voices": voices, "splits": ["test"]})
    synthesize_corpus(base, str(tmp_path / "a"))
    synthesize_corpus(proxy, str(tmp_path / "b"))
    original, revoiced = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert set(revoiced.manifest.splits) == {"test"}
    before = {s.sequence_id: s for s in original.sequences("test")}
    after = {s.sequence_id: s for s in revoiced.sequences("test")}
    assert sorted(before) == sorted(after)
    speaker = next(iter(after.values())).speaker
    np.testing.assert_array_equal(revoiced.templates[speaker], original.templates[speaker])
    for key, seq in after.items():
        # Same speaker, face and sentence; another voice, so other audio and timing.
        assert seq.text == before[key].text
        assert seq.audio.shape != before[key].audio.shape or not np.array_equal(
            seq.audio, before[key].audio
        )
    with pytest.raises(ValueError, match="espeak:VOICE"):
        SynthConfig(voices=["kal"])


def test_ict_corpus_stores_arkit_weights_that_reproduce_its_vertices(ict_corpus: str) -> None:
    ds = open_dataset(ict_corpus)
    assert ds.manifest.control_names == list(ARKIT_NAMES)
    rig = IctFace(600).rig
    for seq in ds.sequences():
        assert seq.controls is not None and seq.controls.shape == (seq.num_frames, 52)
        assert seq.controls.min() >= 0 and seq.controls.max() <= 1
        speaker_rig = rig.with_neutral(ds.templates[seq.speaker])
        rebuilt = speaker_rig.compose(arkit_to_rig(seq.controls, rig.shape_names))
        np.testing.assert_allclose(rebuilt, seq.vertices, atol=1e-6)
        # Speech opens the jaw, blinks close the eyes, and no unused channel moves.
        names = ds.manifest.control_names
        assert seq.controls[:, names.index("jawOpen")].max() > 0.1
        assert seq.controls[:, names.index("tongueOut")].max() == 0


def test_ict_speakers_are_distinct_identities_on_one_topology(ict_corpus: str) -> None:
    ds = open_dataset(ict_corpus)
    assert ds.topology.num_vertices == 600
    speakers = sorted(ds.templates)
    # Faces differ by centimetres between people, not by rounding.
    for a, b in itertools.pairwise(speakers):
        assert np.abs(ds.templates[a] - ds.templates[b]).max() > 0.003
    identities = {k: v["identity"] for k, v in ds.manifest.extra["speakers"].items()}
    assert all(len(w) == 100 for w in identities.values())
    # The generator's revision travels with the corpus, so older corpora can be recognised.
    assert ds.manifest.extra["synth_revision"] == SYNTH_REVISION
    assert set(ds.manifest.splits["test"].speakers).isdisjoint(ds.manifest.splits["train"].speakers)


def test_ict_corpus_is_deterministic(
    ict_corpus: str, ict_config: SynthConfig, tmp_path: Path
) -> None:
    again = synthesize_corpus(ict_config, str(tmp_path / "again"))
    assert [s.sha256 for s in again.shards] == [
        s.sha256 for s in open_dataset(ict_corpus).manifest.shards
    ]
    with pytest.raises(ValueError, match="9409"):
        SynthConfig(face="ict", num_vertices=20000)
