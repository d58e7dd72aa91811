"""The espeak-ng wrapper on the real libespeak-ng: audio, event timings, errors, determinism."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import pytest

from mmtalker.data.espeak import PAUSE, EspeakSynthesizer, Utterance
from mmtalker.errors import SynthesisError

HELLO = "Hello world, this is a test."


@pytest.fixture(scope="module")
def synth() -> EspeakSynthesizer:
    return EspeakSynthesizer(sample_rate=16000)


@pytest.fixture(scope="module")
def hello(synth: EspeakSynthesizer) -> Utterance:
    return synth.synthesize(HELLO)


def _rms(utterance: Utterance, start: float, end: float) -> float:
    segment = utterance.audio[int(start * utterance.sample_rate) : int(end * utterance.sample_rate)]
    return float(np.sqrt(np.mean(segment.astype(np.float64) ** 2))) if segment.size else 0.0


def test_audio_is_float32_mono_16k_plausible_and_not_silent(hello: Utterance) -> None:
    assert hello.sample_rate == 16000
    assert hello.audio.dtype == np.float32
    assert hello.audio.ndim == 1
    assert 1.0 <= hello.duration <= 4.0
    assert hello.duration == len(hello.audio) / 16000
    assert np.abs(hello.audio).max() <= 1.0
    assert _rms(hello, 0.0, hello.duration) > 0.02


def test_phonemes_are_contiguous_monotonic_and_end_with_the_audio(hello: Utterance) -> None:
    phonemes = hello.phonemes
    assert len(phonemes) > 10
    assert all(p.symbol for p in phonemes)
    assert all(0.0 <= p.start <= p.end <= hello.duration for p in phonemes)
    assert all(a.end == b.start for a, b in pairwise(phonemes))
    assert phonemes[0].start < 0.05  # espeak-ng starts with ~10 ms of silence, not more
    assert phonemes[-1].end == hello.duration
    spoken = [p.symbol for p in phonemes if p.symbol != PAUSE]
    assert spoken[:4] == ["h", "ə", "l", "oʊ"]


def test_pause_timings_match_silence_in_the_audio(hello: Utterance) -> None:
    # Real event timings: the pause after "world," is silent, the vowels are loud.
    inner_pauses = [p for p in hello.phonemes[:-1] if p.symbol == PAUSE]
    vowels = [p for p in hello.phonemes if p.symbol in ("oʊ", "ɜː", "ɛ")]
    assert inner_pauses and vowels
    assert all(p.end - p.start > 0.05 for p in inner_pauses)
    assert max(_rms(hello, p.start, p.end) for p in inner_pauses) < 0.005
    assert min(_rms(hello, p.start, p.end) for p in vowels) > 0.05


def test_words_follow_the_text_and_cover_their_phonemes(hello: Utterance) -> None:
    words = hello.words
    assert [w.text for w in words] == ["Hello", "world", "this", "is", "a", "test"]
    assert all(0.0 <= w.start < w.end <= hello.duration for w in words)
    assert all(a.end <= b.start for a, b in pairwise(words))
    for phoneme in hello.phonemes:
        if phoneme.symbol != PAUSE:
            assert any(w.start <= phoneme.start and phoneme.end <= w.end for w in words)


def test_words_map_back_to_the_text_tokens(synth: EspeakSynthesizer) -> None:
    # "123" is spoken as several words and "on the" is joined by espeak-ng; both map to the text.
    utterance = synth.synthesize("123 dogs sat on the mat, didn't they?")
    assert " ".join(w.text for w in utterance.words) == "123 dogs sat on the mat didn't they"
    assert utterance.words[0].end - utterance.words[0].start > 0.5
    assert all(a.end <= b.start for a, b in pairwise(utterance.words))


def test_bilabials_are_reported(synth: EspeakSynthesizer) -> None:
    symbols = [p.symbol for p in synth.synthesize("Bob might move").phonemes]
    assert any(s.startswith("b") for s in symbols)
    assert sum(s.startswith("m") for s in symbols) >= 2


def test_pitch_changes_the_audio(synth: EspeakSynthesizer) -> None:
    low = synth.synthesize(HELLO, pitch=20)
    high = synth.synthesize(HELLO, pitch=80)
    n = min(len(low.audio), len(high.audio))
    assert not np.array_equal(low.audio[:n], high.audio[:n])


def test_faster_rate_is_shorter(synth: EspeakSynthesizer) -> None:
    fast = synth.synthesize(HELLO, rate=300)
    slow = synth.synthesize(HELLO, rate=120)
    assert fast.duration < 0.75 * slow.duration
    assert fast.phonemes[-1].end == fast.duration


def test_same_call_gives_identical_audio_even_after_other_calls(synth: EspeakSynthesizer) -> None:
    # libespeak-ng carries pitch-flutter state between calls; the wrapper must reset it.
    first = synth.synthesize(HELLO, voice="en-us+f3")
    synth.synthesize("Something different in between.", voice="en-gb", pitch=70)
    second = synth.synthesize(HELLO, voice="en-us+f3")
    assert np.array_equal(first.audio, second.audio)
    assert first.phonemes == second.phonemes
    assert first.words == second.words


def test_one_instance_is_safe_from_several_threads(
    synth: EspeakSynthesizer, hello: Utterance
) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: synth.synthesize(HELLO), range(8)))
    assert all(np.array_equal(r.audio, hello.audio) for r in results)


def test_two_instances_agree(synth: EspeakSynthesizer, hello: Utterance) -> None:
    other = EspeakSynthesizer(sample_rate=16000)
    assert np.array_equal(other.synthesize(HELLO).audio, hello.audio)
    assert np.array_equal(synth.synthesize(HELLO).audio, hello.audio)


def test_timings_do_not_depend_on_the_output_rate(hello: Utterance) -> None:
    native = EspeakSynthesizer(sample_rate=22050).synthesize(HELLO)
    assert native.sample_rate == 22050
    assert abs(native.duration - hello.duration) < 1e-3
    assert [p.symbol for p in native.phonemes] == [p.symbol for p in hello.phonemes]
    assert [p.start for p in native.phonemes] == [p.start for p in hello.phonemes]


def test_voices_and_variants(synth: EspeakSynthesizer, hello: Utterance) -> None:
    voices = synth.voices()
    assert {"en", "en-us", "en-gb"} <= set(voices)
    assert all(v == "en" or v.startswith("en-") for v in voices)
    for voice in ("en-gb", "en+m2", "en-gb+klatt"):
        assert synth.synthesize(HELLO, voice=voice).duration > 1.0
    female = synth.synthesize(HELLO, voice="en-us+f3")
    n = min(len(female.audio), len(hello.audio))
    assert not np.array_equal(female.audio[:n], hello.audio[:n])


def test_klatt_variants_are_found_by_what_their_file_selects(synth: EspeakSynthesizer) -> None:
    klatt = synth.klatt_variants()
    assert {"klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6"} <= klatt <= synth.variants()
    assert not klatt & {"m1", "f2", "croak", "whisper"}
    # Debian's espeak-ng ships voices under other names that select the Klatt synthesiser too.
    assert {"adam", "david", "edward"} & synth.variants() <= klatt


@pytest.mark.parametrize("voice", ["xx-nonsense", "fr", "en-us+nonexistent", "en-us+", ""])
def test_unknown_voice_raises(synth: EspeakSynthesizer, voice: str) -> None:
    with pytest.raises(SynthesisError, match="unknown voice"):
        synth.synthesize(HELLO, voice=voice)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_raises(synth: EspeakSynthesizer, text: str) -> None:
    with pytest.raises(SynthesisError, match="empty"):
        synth.synthesize(text)


def test_text_without_speech_raises(synth: EspeakSynthesizer) -> None:
    with pytest.raises(SynthesisError, match="no speech"):
        synth.synthesize("...")


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 79}, {"rate": 451}, {"pitch": -1}, {"pitch": 100}, {"pitch_range": 100}],
)
def test_parameters_out_of_range_raise(synth: EspeakSynthesizer, kwargs: dict[str, int]) -> None:
    with pytest.raises(SynthesisError, match="must be an integer in"):
        synth.synthesize(HELLO, **kwargs)


def test_missing_library_says_how_to_install() -> None:
    with pytest.raises(SynthesisError, match="apt-get install espeak-ng"):
        EspeakSynthesizer(library="/nonexistent/libespeak-ng.so.1")
