"""Phoneme → viseme targets and Cohen–Massaro coarticulation curves."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from mmtalker.data.espeak import EspeakSynthesizer, Phoneme
from mmtalker.data.visemes import (
    PHONES,
    SPEECH_CHANNELS,
    articulation_curves,
    frame_phones,
    is_pause,
    is_vowel,
    phone_class,
    viseme,
)

CH = {name: k for k, name in enumerate(SPEECH_CHANNELS)}


@cache
def phonemes_of(text: str) -> tuple[Phoneme, ...]:
    return EspeakSynthesizer().synthesize(text).phonemes


def at_centres(phonemes, curves_rng=0, variability=0.0) -> np.ndarray:
    """Curve values at the centre of every phoneme (rows follow ``phonemes``)."""
    centres = np.array([0.5 * (ph.start + ph.end) for ph in phonemes])
    return articulation_curves(
        phonemes, centres, np.random.default_rng(curves_rng), variability=variability
    )


def shifted(phonemes, offset: float) -> list[Phoneme]:
    return [Phoneme(ph.symbol, ph.start + offset, ph.end + offset) for ph in phonemes]


# --- real espeak-ng utterances -----------------------------------------------------------------


def test_bilabials_close_the_lips_in_a_real_utterance() -> None:
    phonemes = phonemes_of("Bob bought a map")
    bilabials = [k for k, ph in enumerate(phonemes) if ph.symbol in ("b", "m", "p")]
    assert len(bilabials) >= 4  # b, b, b, m, p
    values = at_centres(phonemes)
    for k in bilabials:
        assert values[k, CH["lip_closure"]] > 0.8, (phonemes[k], values[k])
        assert values[k, CH["jaw_open"]] < 0.2
    # The open vowels between them open the jaw more than the bilabials do.
    vowels = [k for k, ph in enumerate(phonemes) if ph.symbol in ("ɑː", "æ", "ɔː")]
    assert vowels
    for k in vowels:
        assert values[k, CH["jaw_open"]] > 0.3, phonemes[k]
        assert values[k, CH["lip_closure"]] < max(values[bilabials, CH["lip_closure"]])


def test_bilabials_close_the_lips_with_the_default_jitter() -> None:
    phonemes = phonemes_of("Bob bought a map")
    bilabials = [k for k, ph in enumerate(phonemes) if ph.symbol in ("b", "m", "p")]
    for seed in range(5):
        values = at_centres(phonemes, curves_rng=seed, variability=0.08)
        assert (values[bilabials, CH["lip_closure"]] > 0.75).all(), seed


def test_u_in_who_rounds_the_lips() -> None:
    phonemes = phonemes_of("who")
    (u,) = [k for k, ph in enumerate(phonemes) if ph.symbol.startswith("u")]
    values = at_centres(phonemes)
    assert values[u, CH["lip_round"]] > 0.8
    assert values[u, CH["lip_spread"]] < 0.05
    assert values[u, CH["lip_closure"]] < 0.05


def test_real_utterance_curves_are_bounded_and_finite() -> None:
    phonemes = phonemes_of("Bob may move over the moon.")
    times = np.arange(0.0, phonemes[-1].end, 0.01)
    curves = articulation_curves(phonemes, times, np.random.default_rng(0))
    assert curves.shape == (len(times), len(SPEECH_CHANNELS))
    assert np.isfinite(curves).all()
    assert curves.min() >= 0.0 and curves.max() <= 1.1 + 1e-9
    # /v/ in "move" and "over" tucks the lower lip.
    vs = [0.5 * (ph.start + ph.end) for ph in phonemes if ph.symbol == "v"]
    assert len(vs) == 2
    for t in vs:
        assert curves[np.searchsorted(times, t), CH["labiodental"]] > 0.7


@pytest.mark.parametrize("text", ["Bob bought a map", "Bob may move over the moon."])
def test_silence_well_before_and_after_real_speech_is_rest(text: str) -> None:
    speech = shifted(phonemes_of(text), 1.0)
    end = speech[-1].end
    times = np.arange(0.0, end + 1.0, 0.01)
    curves = articulation_curves(speech, times, np.random.default_rng(0))
    np.testing.assert_allclose(curves[times < 0.5], 0.0, atol=0.02)
    np.testing.assert_allclose(curves[times > end + 0.5], 0.0, atol=0.02)


@pytest.mark.parametrize(
    "speech",
    [
        [Phoneme("ɑ", 1.0, 1.5)],
        [Phoneme("h", 1.0, 1.05), Phoneme("ɑː", 1.05, 1.4), Phoneme("t", 1.4, 1.45)],
    ],
    ids=["long-vowel", "hot"],
)
def test_silence_well_before_and_after_long_phonemes_is_rest(speech: list[Phoneme]) -> None:
    times = np.arange(0.0, 3.0, 0.01)
    curves = articulation_curves(speech, times, np.random.default_rng(0), variability=0.0)
    before = times < speech[0].start - 0.5
    after = times > speech[-1].end + 0.5
    np.testing.assert_allclose(curves[before | after], 0.0, atol=0.05)


# --- hand-made phoneme sequences ---------------------------------------------------------------


def test_bilabial_closes_the_lips_between_rounded_vowels() -> None:
    # "ooboo": the lips must close for /b/ whatever its neighbours do.
    phonemes = [Phoneme("u", 0.0, 0.15), Phoneme("b", 0.15, 0.22), Phoneme("u", 0.22, 0.4)]
    values = at_centres(phonemes)
    assert values[1, CH["lip_closure"]] > 0.8
    assert values[0, CH["lip_round"]] > 0.7 and values[2, CH["lip_round"]] > 0.7
    # ... and rounding carries over the /b/ (it is weak on the rounding channel).
    assert values[1, CH["lip_round"]] > 0.5


def test_labiodental_dominates_its_channel() -> None:
    phonemes = [Phoneme("ɑ", 0.0, 0.15), Phoneme("f", 0.15, 0.23), Phoneme("ɑ", 0.23, 0.4)]
    values = at_centres(phonemes)
    assert values[1, CH["labiodental"]] > 0.8
    assert values[0, CH["labiodental"]] < values[1, CH["labiodental"]]
    assert values[0, CH["jaw_open"]] > 0.5


def test_coarticulation_anticipates_rounding() -> None:
    # "too": the rounding of /u/ is already under way during /t/, but not at its full value.
    phonemes = [Phoneme("t", 0.0, 0.08), Phoneme("u", 0.08, 0.25)]
    values = at_centres(phonemes)
    t_round, u_round = values[0, CH["lip_round"]], values[1, CH["lip_round"]]
    assert 0.2 < t_round < u_round
    assert u_round > 0.8
    # Without the following /u/ the /t/ has no rounding at all.
    alone = at_centres([Phoneme("t", 0.0, 0.08), Phoneme("i", 0.08, 0.25)])
    assert alone[0, CH["lip_round"]] < 0.02
    # The /t/ of "tea" is spread instead.
    assert alone[0, CH["lip_spread"]] > 0.3


def test_curves_are_smooth_across_phoneme_boundaries() -> None:
    phonemes = phonemes_of("Bob may move over the moon.")
    times = np.arange(0.0, phonemes[-1].end, 0.001)
    curves = articulation_curves(phonemes, times, np.random.default_rng(0))
    # No jumps: at 1 ms steps no channel changes by more than 5 % of its range.
    assert np.abs(np.diff(curves, axis=0)).max() < 0.05


def test_empty_phoneme_list_is_rest() -> None:
    times = np.linspace(0.0, 1.0, 11)
    curves = articulation_curves([], times, np.random.default_rng(0))
    assert curves.shape == (11, len(SPEECH_CHANNELS))
    np.testing.assert_array_equal(curves, 0.0)


def test_zero_length_phonemes_are_handled() -> None:
    phonemes = [Phoneme("m", 0.1, 0.1), Phoneme("ɑ", 0.1, 0.3)]
    curves = articulation_curves(phonemes, np.linspace(0.0, 0.5, 51), np.random.default_rng(0))
    assert np.isfinite(curves).all()
    assert curves[10, CH["lip_closure"]] > 0.5


def test_variability_jitters_repeated_tokens_reproducibly() -> None:
    phonemes = phonemes_of("Bob bought a map")
    times = np.arange(0.0, phonemes[-1].end, 0.01)
    a = articulation_curves(phonemes, times, np.random.default_rng(1))
    b = articulation_curves(phonemes, times, np.random.default_rng(1))
    c = articulation_curves(phonemes, times, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    flat_a = articulation_curves(phonemes, times, np.random.default_rng(1), variability=0.0)
    flat_c = articulation_curves(phonemes, times, np.random.default_rng(2), variability=0.0)
    np.testing.assert_array_equal(flat_a, flat_c)
    # The jitter is small: a few percent of the channel range on average.
    assert np.abs(a - flat_a).mean() < 0.05


# --- symbol helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "symbol",
    [
        "_",
        "",
        "_:",
        "__",
        "_!",
        "ˈ_",
        "ː",
    ],
)
def test_pause_symbols(symbol: str) -> None:
    assert is_pause(symbol)
    target, dominance = viseme(symbol)
    np.testing.assert_array_equal(target, 0.0)
    assert (dominance > 0).all()


@pytest.mark.parametrize("symbol", ["a", "b", "ə", "_a", "t_"])
def test_non_pause_symbols(symbol: str) -> None:
    assert not is_pause(symbol)


@pytest.mark.parametrize("symbol", ["a", "uː", "ˈaɪ", "oːɹ", "ɔːɹ", "əl", "ɪə", "aɪɚ", "ᵻ"])
def test_vowels(symbol: str) -> None:
    assert is_vowel(symbol)


@pytest.mark.parametrize("symbol", ["b", "t", "ɹ", "ʃ", "_", "", "ŋ", "dʒ"])
def test_non_vowels(symbol: str) -> None:
    assert not is_vowel(symbol)


def test_stress_and_length_marks_do_not_change_the_viseme() -> None:
    for marked, plain in [("ˈuː", "u"), ("ˌɑː", "ɑ"), ("iː", "i"), ("n̩", "n"), ("ˈaɪ", "aɪ")]:
        for got, expected in zip(viseme(marked), viseme(plain), strict=True):
            np.testing.assert_array_equal(got, expected)


def test_diphthongs_and_r_coloured_vowels_resolve_to_the_longest_known_prefix() -> None:
    assert not np.array_equal(viseme("aɪ")[0], viseme("a")[0])
    np.testing.assert_array_equal(viseme("oːɹ")[0], viseme("o")[0])
    np.testing.assert_array_equal(viseme("aɪɚ")[0], viseme("aɪ")[0])
    np.testing.assert_array_equal(viseme("tʃ")[0], [0.15, 0.55, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("symbol", ["ʘ", "q", "x", "ʕ", "?"])
def test_unknown_symbols_map_to_a_neutral_weak_target(symbol: str) -> None:
    target, dominance = viseme(symbol)
    # No lip gesture at all, a half-open jaw, and only consonant-strength dominance.
    np.testing.assert_array_equal(target[1:], 0.0)
    assert 0.0 < target[CH["jaw_open"]] < 0.5
    np.testing.assert_array_equal(dominance, viseme("t")[1])
    # So an unknown sound between two vowels does not pull the lips anywhere.
    phonemes = [Phoneme("u", 0.0, 0.15), Phoneme(symbol, 0.15, 0.22), Phoneme("u", 0.22, 0.4)]
    values = at_centres(phonemes)
    assert values[1, CH["lip_round"]] > 0.5
    assert values[1, CH["lip_closure"]] == pytest.approx(0.0, abs=1e-9)


def test_every_viseme_target_is_in_range() -> None:
    symbols = [
        "a",
        "ɑ",
        "æ",
        "aɪ",
        "aʊ",
        "ɒ",
        "ɔ",
        "ɔɪ",
        "ʌ",
        "ɐ",
        "ə",
        "ɚ",
        "ɜ",
        "ɛ",
        "e",
        "eɪ",
        "eə",
        "ɪ",
        "ᵻ",
        "i",
        "iə",
        "ʊ",
        "u",
        "ʊə",
        "o",
        "oʊ",
        "əʊ",
    ]
    symbols += [
        "p",
        "b",
        "m",
        "f",
        "v",
        "w",
        "θ",
        "ð",
        "ʃ",
        "ʒ",
        "tʃ",
        "dʒ",
        "ɹ",
        "r",
        "s",
        "z",
        "t",
        "d",
        "ɾ",
        "n",
        "l",
        "k",
        "g",
        "ɡ",
        "ŋ",
        "h",
        "j",
        "ʔ",
    ]
    for symbol in symbols:
        target, dominance = viseme(symbol)
        assert target.shape == dominance.shape == (len(SPEECH_CHANNELS),)
        assert (target >= 0).all() and (target <= 1).all(), symbol
        assert (dominance > 0).all(), symbol
    for symbol in ("p", "b", "m"):
        assert viseme(symbol)[0][CH["lip_closure"]] == 1.0
    for symbol in ("f", "v"):
        assert viseme(symbol)[0][CH["labiodental"]] == 1.0


def test_phone_classes_name_every_table_entry_pauses_and_the_rest() -> None:
    assert PHONES[0] == "pause" and PHONES[-1] == "other" and len(set(PHONES)) == len(PHONES)
    assert phone_class("_:") == 0
    assert PHONES[phone_class("ˈaɪ")] == "aɪ"  # stress marks stripped, diphthong kept whole
    assert PHONES[phone_class("p")] == "p"
    assert PHONES[phone_class("x")] == "other"


def test_frame_phones_label_each_frame_by_the_phoneme_at_its_centre() -> None:
    phonemes = (Phoneme("m", 0.1, 0.2), Phoneme("a", 0.2, 0.5))
    labels = frame_phones(phonemes, 20, 10.0)  # frame k is centred on (k + 0.5) / 10 s
    names = [PHONES[k] for k in labels]
    assert names == ["pause", "m", "a", "a", "a"] + ["pause"] * 15
    assert labels.dtype == np.int16
