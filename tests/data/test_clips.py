"""Speech-clip catalogs: real espeak-ng speech in the promised containers, rates and channels."""

from pathlib import Path

import pytest
import soundfile as sf

from mmtalker.data.clips import SAMPLE_RATES, write_speech_clips
from mmtalker.errors import DatasetError


def test_clips_cycle_containers_rates_and_channels(tmp_path: Path) -> None:
    uris = write_speech_clips(str(tmp_path), 6, seed=1)
    assert [Path(u).name for u in uris] == [
        f"clip_{i:05d}.{ext}" for i, ext in enumerate(["wav", "flac", "ogg"] * 2)
    ]
    for index, uri in enumerate(uris):
        info = sf.info(uri)
        assert info.samplerate == SAMPLE_RATES[index % len(SAMPLE_RATES)]
        assert info.channels == (2 if index % 3 == 2 else 1)
        assert info.duration > 0.5
    # A pure function of (seed, index): the same call writes the same audio.
    again = write_speech_clips(str(tmp_path / "again"), 2, seed=1)
    assert (tmp_path / "again" / "clip_00000.wav").read_bytes() == Path(uris[0]).read_bytes()
    assert len(again) == 2


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="count >= 1"):
        write_speech_clips(str(tmp_path), 0)
    with pytest.raises(DatasetError, match="containers"):
        write_speech_clips(str(tmp_path), 2, containers=("aiff",))
