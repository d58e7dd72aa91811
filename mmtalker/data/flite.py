"""Speech and phone timings from Flite (CMU's small synthesiser): voices for the training mix.

espeak-ng's formant synthesis alone teaches a model one engine's acoustics. Flite's ``awb``
(Scottish male) and ``rms`` (US male) are clustergen voices, statistical parametric models of
recorded speakers, so mixing them into training shows a model speech that was once a person's.
Flite prints its phone end times (``-psdur``) in the same US "radio" phone set as Festival, so
the same IPA mapping and viseme rules time the face. Debian: ``apt-get install flite``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from mmtalker.data.espeak import Phoneme, Utterance
from mmtalker.data.festival import PHONES, read_engine_wave
from mmtalker.errors import SynthesisError

#: Flite voices this adapter offers. ``kal``/``kal16`` and ``slt`` are left out on purpose: they
#: are built from the same recordings as Festival's voices that speak the unseen-voice test set.
VOICES = {"awb": "Scottish male clustergen voice", "rms": "US male clustergen voice"}

_INSTALL_HINT = "install Flite: apt-get install flite"
#: espeak-ng's default rate in words per minute: a rate maps to Flite's duration stretch.
_NEUTRAL_RATE = 175


class FliteSynthesizer:
    """Speaks sentences with a Flite voice; audio resampled to ``sample_rate``."""

    def __init__(self, sample_rate: int = 16000, executable: str = "flite") -> None:
        path = shutil.which(executable)
        if path is None:
            raise SynthesisError(f"Flite ({executable}) is not installed; {_INSTALL_HINT}")
        self.executable = path
        self.sample_rate = sample_rate

    def synthesize(self, text: str, voice: str, rate: int = _NEUTRAL_RATE) -> Utterance:
        """Speak ``text`` with ``voice`` (a key of :data:`VOICES`) at ``rate`` words per minute."""
        if voice not in VOICES:
            raise SynthesisError(f"unknown Flite voice {voice!r}; known: {', '.join(VOICES)}")
        if not text.strip():
            raise SynthesisError("text is empty; give at least one word to speak")
        if rate <= 0:
            raise SynthesisError(f"rate must be positive words per minute, got {rate}")
        with tempfile.TemporaryDirectory(prefix="mmtalker-flite-") as folder:
            wave = Path(folder) / "speech.wav"
            result = subprocess.run(
                [
                    self.executable,
                    "-voice",
                    voice,
                    "--setf",
                    f"duration_stretch={_NEUTRAL_RATE / rate:.4f}",
                    "-psdur",
                    "-t",
                    text,
                    "-o",
                    str(wave),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0 or not wave.is_file():
                detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SynthesisError(f"Flite failed for voice {voice!r}: {detail[0]}")
            audio = read_engine_wave(wave, self.sample_rate)
        return Utterance(audio, self.sample_rate, read_phone_durations(result.stdout), ())


def read_phone_durations(text: str) -> tuple[Phoneme, ...]:
    """Phones of Flite's ``-psdur`` output: ``NAME:END`` pairs separated by spaces."""
    phonemes: list[Phoneme] = []
    start = 0.0
    for token in text.split():
        name, sep, end_text = token.rpartition(":")
        if not sep:
            continue
        if name not in PHONES:
            raise SynthesisError(f"Flite phone {name!r} has no IPA mapping; add it to PHONES")
        try:
            end = float(end_text)
        except ValueError as exc:
            raise SynthesisError(f"Flite phone {name!r} has a bad end time {end_text!r}") from exc
        phonemes.append(Phoneme(PHONES[name], start, end))
        start = end
    if not phonemes:
        raise SynthesisError("Flite produced no phone timings")
    return tuple(phonemes)
