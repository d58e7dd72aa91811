"""Festival, the second speech engine: real speech with phone timings in espeak-ng's IPA."""

from __future__ import annotations

import numpy as np
import pytest

from mmtalker.data.festival import PHONES, FestivalSynthesizer, read_segments
from mmtalker.data.visemes import is_known, is_pause
from mmtalker.errors import SynthesisError


def test_segments_parse_into_contiguous_ipa_phonemes() -> None:
    text = "EST_File segment\nDataType ascii\n#\n0.1650 100 pau\n0.2100 100 dh\n0.3 100 ax\n"
    phonemes = read_segments(text)
    assert [p.symbol for p in phonemes] == ["_", "ð", "ə"]
    assert [(p.start, p.end) for p in phonemes] == [(0.0, 0.165), (0.165, 0.21), (0.21, 0.3)]
    with pytest.raises(SynthesisError, match="no IPA mapping"):
        read_segments("#\n0.1 100 qq\n")


def test_every_festival_phone_has_a_viseme() -> None:
    # No phone may fall through to the generic fallback shape.
    assert [name for name, symbol in PHONES.items() if not is_known(symbol)] == []
    assert not is_known("qq")


@pytest.mark.parametrize("voice", ["kal", "slt", "ked"])
def test_festival_speaks_with_timings_that_cover_the_audio(voice: str) -> None:
    tts = FestivalSynthesizer(sample_rate=16000)
    first, second = tts.synthesize_many(["Hello there.", 'She said "maybe" twice.'], voice)
    for utterance in (first, second):
        assert utterance.sample_rate == 16000 and utterance.audio.dtype == np.float32
        assert np.abs(utterance.audio).max() > 0.05
        assert utterance.phonemes[-1].end == pytest.approx(utterance.duration, abs=0.05)
        assert any(not is_pause(p.symbol) for p in utterance.phonemes)
    assert second.duration > first.duration


def test_unknown_voice_and_empty_text_are_refused() -> None:
    tts = FestivalSynthesizer()
    with pytest.raises(SynthesisError, match="unknown Festival voice"):
        tts.synthesize_many(["Hello."], "nope")
    with pytest.raises(SynthesisError, match="empty"):
        tts.synthesize_many(["  "], "kal")
