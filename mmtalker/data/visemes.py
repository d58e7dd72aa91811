"""Phonemes to articulation curves: viseme targets per IPA symbol, blended with coarticulation.

Coarticulation follows Cohen & Massaro's dominance model: every phoneme pulls each channel
towards its target with a dominance that decays away from the phoneme's centre, and the curve
is the dominance-weighted mean of the targets. Bilabials and labiodentals dominate the lip
channels strongly (the lips must close for /p b m/ whatever the neighbours), while vowel
rounding spreads over neighbouring consonants, as in real speech ("boot" rounds during /b/).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmtalker.data.espeak import Phoneme

#: Articulation channels driven by speech, in the column order of every curve array.
SPEECH_CHANNELS = ("jaw_open", "lip_round", "lip_spread", "lip_closure", "labiodental")

_VOWELS: dict[str, tuple[float, float, float]] = {
    # symbol: (jaw_open, lip_round, lip_spread)
    "a": (0.95, 0.0, 0.2),
    "ɑ": (1.0, 0.0, 0.0),
    "æ": (0.85, 0.0, 0.45),
    "aɪ": (0.85, 0.0, 0.3),
    "aʊ": (0.85, 0.35, 0.0),
    "ɒ": (0.75, 0.5, 0.0),
    "ɔ": (0.65, 0.65, 0.0),
    "ɔɪ": (0.6, 0.5, 0.15),
    "ʌ": (0.65, 0.0, 0.1),
    "ɐ": (0.55, 0.0, 0.1),
    "ə": (0.35, 0.0, 0.05),
    "ɚ": (0.35, 0.3, 0.0),
    "ɜ": (0.4, 0.2, 0.0),
    "ɛ": (0.55, 0.0, 0.5),
    "e": (0.45, 0.0, 0.55),
    "eɪ": (0.45, 0.0, 0.6),
    "eə": (0.5, 0.0, 0.3),
    "ɪ": (0.25, 0.0, 0.7),
    "ᵻ": (0.25, 0.0, 0.55),
    "i": (0.2, 0.0, 0.9),
    "iə": (0.3, 0.0, 0.5),
    "ʊ": (0.25, 0.8, 0.0),
    "u": (0.2, 1.0, 0.0),
    "ʊə": (0.3, 0.7, 0.0),
    "o": (0.45, 0.8, 0.0),
    "oʊ": (0.45, 0.8, 0.0),
    "əʊ": (0.4, 0.7, 0.0),
}

_CONSONANTS: dict[str, tuple[float, float, float, float, float]] = {
    # symbol: (jaw_open, lip_round, lip_spread, lip_closure, labiodental)
    "p": (0.0, 0.0, 0.0, 1.0, 0.0),
    "b": (0.0, 0.0, 0.0, 1.0, 0.0),
    "m": (0.0, 0.0, 0.0, 1.0, 0.0),
    "f": (0.1, 0.0, 0.0, 0.0, 1.0),
    "v": (0.1, 0.0, 0.0, 0.0, 1.0),
    "w": (0.1, 1.0, 0.0, 0.0, 0.0),
    "θ": (0.18, 0.0, 0.25, 0.0, 0.0),
    "ð": (0.18, 0.0, 0.25, 0.0, 0.0),
    "ʃ": (0.15, 0.6, 0.0, 0.0, 0.0),
    "ʒ": (0.15, 0.6, 0.0, 0.0, 0.0),
    "tʃ": (0.15, 0.55, 0.0, 0.0, 0.0),
    "dʒ": (0.15, 0.55, 0.0, 0.0, 0.0),
    "ɹ": (0.2, 0.4, 0.0, 0.0, 0.0),
    "r": (0.2, 0.35, 0.0, 0.0, 0.0),
    "s": (0.12, 0.0, 0.4, 0.0, 0.0),
    "z": (0.12, 0.0, 0.4, 0.0, 0.0),
    "t": (0.15, 0.0, 0.3, 0.0, 0.0),
    "d": (0.15, 0.0, 0.3, 0.0, 0.0),
    "ɾ": (0.2, 0.0, 0.25, 0.0, 0.0),
    "n": (0.15, 0.0, 0.25, 0.0, 0.0),
    "l": (0.22, 0.0, 0.2, 0.0, 0.0),
    "k": (0.25, 0.0, 0.1, 0.0, 0.0),
    "g": (0.25, 0.0, 0.1, 0.0, 0.0),
    "ɡ": (0.25, 0.0, 0.1, 0.0, 0.0),
    "ŋ": (0.2, 0.0, 0.1, 0.0, 0.0),
    "h": (0.3, 0.0, 0.0, 0.0, 0.0),
    "j": (0.15, 0.0, 0.5, 0.0, 0.0),
    "ʔ": (0.1, 0.0, 0.0, 0.0, 0.0),
}

#: Phone classes of the per-frame phone labels a corpus stores: pause, every vowel and consonant
#: with a viseme entry, and ``other`` for symbols without one.
PHONES = ("pause", *_VOWELS, *_CONSONANTS, "other")
_PHONE_INDEX = {name: index for index, name in enumerate(PHONES)}

_REST = np.zeros(len(SPEECH_CHANNELS))
_STRIP = str.maketrans("", "", "ˈˌːˑ̩̃-'")
# Dominance of a phoneme over each channel: lips win for bilabials/labiodentals, vowels own
# the jaw, other consonants are weak on every channel so vowel shapes carry through them.
_STRONG_LIPS = np.array([4.0, 0.4, 0.4, 8.0, 8.0])
_VOWEL = np.array([1.0, 1.0, 1.0, 2.0, 2.0])
_CONSONANT = np.array([0.5, 0.35, 0.35, 0.5, 0.5])
_PAUSE = np.full(len(SPEECH_CHANNELS), 0.8)


def is_pause(symbol: str) -> bool:
    """Whether an espeak-ng phoneme symbol stands for silence."""
    return symbol.translate(_STRIP) in ("", "_", "_:", "__", "_!")


def is_vowel(symbol: str) -> bool:
    """Whether an espeak-ng phoneme symbol is a vowel (or diphthong)."""
    clean = symbol.translate(_STRIP)
    return any(key in _VOWELS for key in (clean, clean[:2], clean[:1]) if key)


def is_known(symbol: str) -> bool:
    """Whether a phoneme symbol has its own viseme (a pause, or a vowel or consonant entry)."""
    return is_pause(symbol) or _entry(symbol) is not None


def _entry(symbol: str) -> str | None:
    """The vowel or consonant table key a non-pause symbol maps to (None: no entry)."""
    clean = symbol.translate(_STRIP)
    for key in (clean, clean[:2], clean[:1]):
        if key in _VOWELS or key in _CONSONANTS:
            return key
    return None


def viseme(symbol: str) -> tuple[np.ndarray, np.ndarray]:
    """Target (per channel) and dominance (per channel) for one IPA phoneme symbol."""
    if is_pause(symbol):
        return _REST, _PAUSE
    key = _entry(symbol)
    if key in _VOWELS:
        return np.array([*_VOWELS[key], 0.0, 0.0]), _VOWEL
    if key in _CONSONANTS:
        target = np.array(_CONSONANTS[key])
        lips = target[3] > 0 or target[4] > 0
        return target, _STRONG_LIPS if lips else _CONSONANT
    return np.array([0.3, 0.0, 0.0, 0.0, 0.0]), _CONSONANT


def phone_class(symbol: str) -> int:
    """Index in :data:`PHONES` of a phoneme symbol: its table entry, pause, or ``other``."""
    key = "pause" if is_pause(symbol) else _entry(symbol)
    return _PHONE_INDEX[key if key is not None else "other"]


def frame_times(num_frames: int, fps: float) -> np.ndarray:
    """The instant (s) each frame of a synthetic sequence stands for: its centre ``(k + 0.5) /
    fps``, as frame k covers ``[k, k + 1) / fps`` for the speech encoders' output frames too."""
    return (np.arange(num_frames) + 0.5) / fps


def frame_phones(phonemes: Sequence[Phoneme], num_frames: int, fps: float) -> np.ndarray:
    """Phone class (int16, :data:`PHONES`) of each frame: the phoneme spoken at its
    :func:`frame_times` instant; frames no phoneme covers (leading and trailing silence) are
    pauses."""
    times = frame_times(num_frames, fps)
    labels = np.zeros(num_frames, np.int16)
    for ph in phonemes:
        labels[(times >= ph.start) & (times < ph.end)] = phone_class(ph.symbol)
    return labels


def articulation_curves(
    phonemes: Sequence[Phoneme],
    times: np.ndarray,
    rng: np.random.Generator,
    variability: float = 0.08,
) -> np.ndarray:
    """Speech channel values (len(times), len(SPEECH_CHANNELS)) from timed phonemes.

    Each phoneme's target is jittered by ``variability`` so repeated phonemes are not identical,
    as no two real tokens are.
    """
    if not phonemes:
        return np.zeros((len(times), len(SPEECH_CHANNELS)))
    targets, dominance, centres, spans = [], [], [], []
    for ph in phonemes:
        target, dom = viseme(ph.symbol)
        targets.append(np.clip(target * (1.0 + variability * rng.standard_normal()), 0.0, 1.1))
        dominance.append(dom)
        centres.append(0.5 * (ph.start + ph.end))
        spans.append(max(ph.end - ph.start, 0.02))
    # Dominance falls off over about the phoneme's own length plus a fixed anticipation time.
    tau = 0.5 * np.asarray(spans) + 0.035
    # Silence before the first and after the last phoneme pulls the face back to rest; each
    # anchor falls off as slowly as the slowest phoneme and sits that far out, so not even a
    # long vowel outweighs it far from speech.
    widest = float(tau.max())
    targets += [_REST, _REST]
    dominance += [_PAUSE, _PAUSE]
    centres += [phonemes[0].start - widest, phonemes[-1].end + widest]
    tau = np.concatenate([tau, [widest, widest]])
    target = np.asarray(targets)
    dom = np.asarray(dominance)
    centre = np.asarray(centres)
    distance = np.abs(times[:, None] - centre[None, :]) / tau[None, :]
    weight = np.exp(-(distance**1.5))[:, :, None] * dom[None, :, :]
    return (weight * target[None]).sum(axis=1) / (weight.sum(axis=1) + 1e-9)
