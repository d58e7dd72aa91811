"""Speech and phone timings from the Festival speech synthesis system: a second speech engine.

espeak-ng (formant synthesis) makes the training corpus; Festival's voices sound nothing like it
(``kal_diphone`` concatenates recorded diphones of a male US speaker, ``cmu_us_slt_arctic_hts``
is a statistical parametric voice of a female US speaker), so speech from Festival measures how
a model does on voices from an engine it never heard (``ked_diphone``, another male US diphone
voice, may join training instead). Festival runs as a batch process (Debian: ``apt-get install
festival festvox-kallpc16k festvox-us-slt-hts festvox-kdlpc16k``); one process speaks many
sentences. Its phone names (the US "radio" set) are mapped to the IPA symbols espeak-ng uses, so
the same viseme rules (:mod:`mmtalker.data.visemes`) time the face.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from mmtalker.data.espeak import Phoneme, Utterance
from mmtalker.errors import SynthesisError

#: Festival voices this adapter knows, by short name: (Scheme voice function, description).
VOICES = {
    "kal": ("voice_kal_diphone", "male US diphone voice (festvox-kallpc16k)"),
    "slt": ("voice_cmu_us_slt_arctic_hts", "female US HTS voice (festvox-us-slt-hts)"),
    # Not a proxy voice: a Festival voice training may hear (engine_voices) while kal and slt
    # stay unheard.
    "ked": ("voice_ked_diphone", "another male US diphone voice (festvox-kdlpc16k)"),
}

#: Festival's US phones (radio set) to the IPA symbols of espeak-ng's phoneme events.
PHONES = {
    "aa": "ɑː", "ae": "æ", "ah": "ʌ", "ao": "ɔː", "aw": "aʊ", "ax": "ə", "axr": "ɚ", "ay": "aɪ",
    "eh": "ɛ", "er": "ɜː", "ey": "eɪ", "ih": "ɪ", "iy": "iː", "ow": "oʊ", "oy": "ɔɪ", "uh": "ʊ",
    "uw": "uː", "b": "b", "ch": "tʃ", "d": "d", "dh": "ð", "dx": "ɾ", "el": "l", "em": "m",
    "en": "n", "f": "f", "g": "ɡ", "hh": "h", "jh": "dʒ", "k": "k", "l": "l", "m": "m", "n": "n",
    "ng": "ŋ", "nx": "ŋ", "p": "p", "r": "ɹ", "s": "s", "sh": "ʃ", "t": "t", "th": "θ", "v": "v",
    "w": "w", "y": "j", "z": "z", "zh": "ʒ", "pau": "_", "h#": "_", "brth": "_",
}  # fmt: skip

_INSTALL_HINT = (
    "install Festival and its voices: "
    "apt-get install festival festvox-kallpc16k festvox-us-slt-hts festvox-kdlpc16k"
)


class FestivalSynthesizer:
    """Speaks sentences with a Festival voice; audio resampled to ``sample_rate``."""

    def __init__(self, sample_rate: int = 16000, executable: str = "festival") -> None:
        path = shutil.which(executable)
        if path is None:
            raise SynthesisError(f"Festival ({executable}) is not installed; {_INSTALL_HINT}")
        self.executable = path
        self.sample_rate = sample_rate

    def synthesize_many(self, texts: Sequence[str], voice: str) -> list[Utterance]:
        """Speak each text with ``voice`` (a key of :data:`VOICES`), in one Festival process."""
        if voice not in VOICES:
            raise SynthesisError(f"unknown Festival voice {voice!r}; known: {', '.join(VOICES)}")
        if not texts:
            return []
        with tempfile.TemporaryDirectory(prefix="mmtalker-festival-") as folder:
            work = Path(folder)
            lines = [f"({VOICES[voice][0]})"]
            for index, text in enumerate(texts):
                if not text.strip():
                    raise SynthesisError(f"text {index} is empty; give at least one word to speak")
                quoted = text.replace("\\", " ").replace('"', " ")
                lines += [
                    f'(set! u (utt.synth (Utterance Text "{quoted}")))',
                    f'(utt.save.segs u "{work / f"{index}.segs"}")',
                    f'(utt.save.wave u "{work / f"{index}.wav"}" \'riff)',
                ]
            script = work / "speak.scm"
            script.write_text("\n".join(lines) + "\n", "utf-8")
            result = subprocess.run(
                [self.executable, "-b", str(script)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0 or not (work / f"{len(texts) - 1}.wav").is_file():
                detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SynthesisError(
                    f"Festival failed for voice {voice!r}: {detail[0]}; {_INSTALL_HINT}"
                )
            return [
                self._utterance(work / f"{i}.wav", work / f"{i}.segs") for i in range(len(texts))
            ]

    def _utterance(self, wave: Path, segments: Path) -> Utterance:
        audio = read_engine_wave(wave, self.sample_rate)
        return Utterance(audio, self.sample_rate, read_segments(segments.read_text("utf-8")), ())


def read_engine_wave(wave: Path, sample_rate: int) -> np.ndarray:
    """A speech engine's wav file as mono float32 in [-1, 1] at ``sample_rate``."""
    audio, rate = sf.read(wave, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)


def read_segments(text: str) -> tuple[Phoneme, ...]:
    """Phones of a Festival ``utt.save.segs`` file (``END 100 NAME`` per line after ``#``)."""
    phonemes: list[Phoneme] = []
    start = 0.0
    body = text.split("#", 1)[-1]
    for line in body.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        end, name = float(parts[0]), parts[2]
        if name not in PHONES:
            raise SynthesisError(f"Festival phone {name!r} has no IPA mapping; add it to PHONES")
        phonemes.append(Phoneme(PHONES[name], start, end))
        start = end
    if not phonemes:
        raise SynthesisError("Festival produced no phone timings")
    return tuple(phonemes)
