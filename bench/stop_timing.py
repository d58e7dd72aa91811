"""Where each speech engine's phone labels put stop consonants against the sound of the stop.

Usage: python bench/stop_timing.py [--sentences 40] [--voices espeak:en-us+m6,flite:awb,...]

A stop is a silent closure followed by a burst. The corpus times every viseme from the engine's
phone labels, and a closure target at the middle of a /p b/ label, so where an engine starts
that label decides whether the truth's lips close in the silence or after the burst. For each
voice and class of consonant this prints, averaged over all its tokens, the time of the energy
minimum (the closure) and of the steepest rise (the burst) relative to the label's start, and
the labels' mean length. Labels that start at the closure put the minimum and the rise after 0;
labels that start at the burst put them at or before 0. /m/ closes the lips too but is voiced
throughout, so it shows where the labels put a closure without a silence. No training; seconds
of synthesis.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np

from mmtalker.data.espeak import Utterance
from mmtalker.data.synth import VoiceChoice, Voices, load_sentences
from mmtalker.errors import MMTalkerError

SAMPLE_RATE = 16000
HOP_MS = 5
WINDOW_MS = 100
CLASSES = {"p b": ("p", "b"), "t d": ("t", "d"), "k g": ("k", "ɡ"), "m": ("m",)}


def log_energy(utterance: Utterance) -> np.ndarray:
    """Log RMS energy of the utterance's audio in consecutive ``HOP_MS`` frames."""
    hop = SAMPLE_RATE * HOP_MS // 1000
    audio = utterance.audio.astype(np.float64)
    frames = len(audio) // hop
    return np.log(np.sqrt((audio[: frames * hop].reshape(frames, hop) ** 2).mean(1)) + 1e-5)


def label_profile(spoken: list[tuple[Utterance, np.ndarray]], symbols: tuple[str, ...]) -> str:
    """The mean log-energy around the labelled starts of ``symbols`` over (utterance, its
    :func:`log_energy`) pairs: its minimum, steepest rise and the labels' length, in ms."""
    reach = WINDOW_MS // HOP_MS
    profiles, lengths = [], []
    for utterance, energy in spoken:
        for phoneme in utterance.phonemes:
            start = int(phoneme.start * 1000 / HOP_MS)
            if phoneme.symbol in symbols and reach <= start < len(energy) - reach:
                profiles.append(energy[start - reach : start + reach + 1])
                lengths.append(phoneme.end - phoneme.start)
    if not profiles:
        return "no tokens"
    mean = np.mean(profiles, axis=0)
    times = (np.arange(len(mean)) - reach) * HOP_MS
    rise = times[np.argmax(np.diff(mean)) + 1]
    return (
        f"{len(profiles):4d} tokens, minimum at {times[np.argmin(mean)]:+4d} ms, "
        f"rise at {rise:+4d} ms, labels {1000 * np.mean(lengths):3.0f} ms"
    )


def main() -> None:
    """Print each voice's stop timing per consonant class."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--voices", help="comma-separated engine:voice (default: one per engine)")
    args = parser.parse_args()
    voices = (
        args.voices.split(",")
        if args.voices
        else ["espeak:en-us+m6", "flite:awb"]
        + (["festival:kal"] if shutil.which("festival") else [])
    )
    texts = dict(enumerate(load_sentences()[: args.sentences]))
    engines = Voices(SAMPLE_RATE)
    for voice in voices:
        try:
            utterances = engines.speak(texts, {key: VoiceChoice(voice=voice) for key in texts})
        except MMTalkerError as error:
            raise SystemExit(f"error: {voice}: {error}") from None
        spoken = [(utterance, log_energy(utterance)) for utterance in utterances.values()]
        for name, symbols in CLASSES.items():
            print(f"{voice:<18} {'/' + name + '/':<7} {label_profile(spoken, symbols)}")


if __name__ == "__main__":
    main()
