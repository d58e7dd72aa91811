"""Flite, a training-mix engine: real speech with phone timings in espeak-ng's IPA."""

from __future__ import annotations

import numpy as np
import pytest

from mmtalker.data.flite import FliteSynthesizer, read_phone_durations
from mmtalker.data.visemes import is_pause
from mmtalker.errors import SynthesisError


def test_phone_durations_parse_into_contiguous_ipa_phonemes() -> None:
    phonemes = read_phone_durations("pau:0.254 hh:0.296 ax:0.341 \n")
    assert [p.symbol for p in phonemes] == ["_", "h", "ə"]
    assert [(p.start, p.end) for p in phonemes] == [(0.0, 0.254), (0.254, 0.296), (0.296, 0.341)]
    with pytest.raises(SynthesisError, match="no IPA mapping"):
        read_phone_durations("qq:0.1")
    with pytest.raises(SynthesisError, match="bad end time"):
        read_phone_durations("pau:soon")
    with pytest.raises(SynthesisError, match="no phone timings"):
        read_phone_durations("")


@pytest.mark.parametrize("voice", ["awb", "rms"])
def test_flite_speaks_with_timings_that_cover_the_audio(voice: str) -> None:
    tts = FliteSynthesizer(sample_rate=16000)
    normal = tts.synthesize("She said maybe twice.", voice)
    slow = tts.synthesize("She said maybe twice.", voice, rate=120)
    for utterance in (normal, slow):
        assert utterance.sample_rate == 16000 and utterance.audio.dtype == np.float32
        assert np.abs(utterance.audio).max() > 0.05
        assert utterance.phonemes[-1].end == pytest.approx(utterance.duration, abs=0.05)
        assert any(not is_pause(p.symbol) for p in utterance.phonemes)
    assert slow.duration > 1.2 * normal.duration


def test_unknown_voice_empty_text_and_bad_rate_are_refused() -> None:
    tts = FliteSynthesizer()
    with pytest.raises(SynthesisError, match="unknown Flite voice"):
        tts.synthesize("Hello.", "slt")  # the held-out Festival voice's recordings
    with pytest.raises(SynthesisError, match="empty"):
        tts.synthesize("  ", "awb")
    with pytest.raises(SynthesisError, match="rate"):
        tts.synthesize("Hello.", "awb", rate=0)
