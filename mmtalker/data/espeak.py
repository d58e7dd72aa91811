"""English speech from libespeak-ng with the phoneme and word timings it reports itself.

Times come from espeak-ng's PHONEME/WORD events (sample positions in the generated audio).
"""

from __future__ import annotations

import _ctypes
import bisect
import ctypes
import ctypes.util
import locale
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import soxr

from mmtalker.errors import SynthesisError

#: Symbol of a pause; espeak-ng reports pauses as phoneme events with an empty IPA name.
PAUSE = "_"

RATE_LIMITS = (80, 450)  # words per minute, the range speak_lib.h documents
PITCH_LIMITS = (0, 99)
PITCH_RANGE_LIMITS = (0, 99)

# Constants from espeak-ng's speak_lib.h (API revision 12), which is not installed here.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_PHONEME_IPA = 0x0002
_INITIALIZE_DONT_EXIT = 0x8000  # without it a missing espeak-ng-data calls exit() in the library
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_EE_OK = 0

_INSTALL_HINT = "install espeak-ng, e.g. `apt-get install espeak-ng`"
_PUNCTUATION = "\"'`.,;:!?()[]{}<>«»“”‘’„…-–—/\\*_"


class _EventId(ctypes.Union):
    _fields_ = (
        ("number", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("string", ctypes.c_char * 8),  # phoneme name, NUL-terminated unless all 8 bytes are used
    )


class _Event(ctypes.Structure):
    """espeak_EVENT: 40 bytes on x86-64, ``user_data`` at offset 24 and ``id`` at 32."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters (code points) of the text
        ("length", ctypes.c_int),  # word length in characters, WORD events only
        ("audio_position", ctypes.c_int),  # milliseconds, truncated
        ("sample", ctypes.c_int),  # sample index in the message's audio at the native rate
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    )


class _Voice(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_char_p),
        # (priority byte, NUL-terminated code) pairs ended by a zero byte, so not a c_char_p
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    )


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True)
class Phoneme:
    """One phoneme (IPA, as espeak-ng names it) or a pause (``PAUSE``), in seconds."""

    symbol: str
    start: float
    end: float


@dataclass(frozen=True)
class Word:
    """One whitespace-separated word of the input text and when its phonemes are spoken."""

    text: str
    start: float
    end: float


@dataclass(frozen=True, eq=False)
class Utterance:
    """Synthesised audio with its phoneme and word timings; compare audio with numpy, not ==."""

    audio: np.ndarray
    sample_rate: int
    phonemes: tuple[Phoneme, ...]
    words: tuple[Word, ...]

    @property
    def duration(self) -> float:
        """Length of ``audio`` in seconds."""
        return len(self.audio) / self.sample_rate


@dataclass(frozen=True)
class _RawEvent:
    kind: int
    sample: int
    text_position: int
    length: int
    symbol: str


class EspeakSynthesizer:
    """Speech + phoneme timings from libespeak-ng. libespeak-ng keeps process-wide state, so one
    instance serialises its calls with a lock; two instances must not be used from two threads at
    once (they share the process's LC_CTYPE and libc rand(), which espeak-ng changes)."""

    def __init__(self, sample_rate: int = 16000, library: str | None = None) -> None:
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise SynthesisError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        self.sample_rate = sample_rate
        self._lock = threading.Lock()
        self._libc = ctypes.CDLL(None)
        source = _locate_library(library, self._libc)
        # libespeak-ng keeps synthesis state in static variables that no API call resets (pitch
        # flutter phase, glottal cycle count, gain control): a repeated call gives audibly equal
        # but not identical audio, and lengths differ by a few samples. So each instance works on
        # a private copy of the library, loaded afresh for every call (~2-3 ms): every call then
        # behaves like the first in a new process, and no other espeak user shares the state.
        # Repeated espeak_Initialize on one loaded copy is harmless but does not reset that state.
        # The reload leaves ~3 KB per call that espeak_Terminate does not free (measured on 1.51).
        self._source = source
        self._tmpdir = tempfile.mkdtemp(prefix="mmtalker-espeak-")
        self._finalizer = weakref.finalize(self, _remove_copy, self._tmpdir, os.getpid())
        self._library_path = os.path.join(self._tmpdir, os.path.basename(source))
        shutil.copyfile(source, self._library_path)
        with self._lock, self._loaded() as (lib, native_rate):
            self._native_rate = native_rate
            self._voice_ids = _english_voices(lib)
            self._variants = _variants(lib)
        if not self._voice_ids:
            raise SynthesisError(f"espeak-ng lists no English voices; {_INSTALL_HINT}")

    def voices(self) -> list[str]:
        """English voice names accepted by ``synthesize``; each may take a ``+variant`` suffix."""
        return sorted(self._voice_ids)

    def variants(self) -> frozenset[str]:
        """Installed voice variants (``m1``, ``f3``, ``klatt``...), the ``+variant`` suffixes."""
        return frozenset(self._variants)

    def klatt_variants(self) -> frozenset[str]:
        """Variants whose file selects espeak-ng's Klatt synthesiser (``klatt``, ``adam``...)."""
        return frozenset(name for name, klatt in self._variants.items() if klatt)

    def synthesize(
        self,
        text: str,
        voice: str = "en-us",
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
    ) -> Utterance:
        """Speak ``text`` (UTF-8, plain text) and return the audio with its phoneme/word timings."""
        _check_range("rate", rate, RATE_LIMITS)
        _check_range("pitch", pitch, PITCH_LIMITS)
        _check_range("pitch_range", pitch_range, PITCH_RANGE_LIMITS)
        if not isinstance(text, str) or not text.strip():
            raise SynthesisError("text is empty; give at least one word to speak")
        # espeak_Synth reads a C string; a space keeps the character positions of later words.
        text = text.replace("\x00", " ")
        voice_id = self._resolve_voice(voice)
        with self._lock:
            samples, events = self._synthesize_native(text, voice_id, rate, pitch, pitch_range)
        if samples.size == 0 or not any(e.symbol for e in events if e.kind == _EVENT_PHONEME):
            # Punctuation-only text gives a few ms of silence and a pause; nothing to animate.
            raise SynthesisError(f"espeak-ng produced no speech for {text[:60]!r}")
        return self._utterance(text, samples, events)

    @contextmanager
    def _loaded(self) -> Iterator[tuple[ctypes.CDLL, int]]:
        """Load and initialise the private library copy; terminate and unload it afterwards."""
        saved_ctype = locale.setlocale(locale.LC_CTYPE)
        try:
            if not os.path.exists(self._library_path):  # e.g. a tmp cleaner removed it
                os.makedirs(self._tmpdir, exist_ok=True)
                shutil.copyfile(self._source, self._library_path)
            lib = ctypes.CDLL(self._library_path, mode=os.RTLD_LOCAL)
        except OSError as exc:
            raise SynthesisError(
                f"cannot load the copy of libespeak-ng at {self._library_path} ({exc}); if the "
                "temporary directory is mounted noexec, point TMPDIR at one that is not"
            ) from exc
        initialised = False
        try:
            _declare(lib)
            options = _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA | _INITIALIZE_DONT_EXIT
            native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options)
            initialised = True
            if native_rate <= 0:
                raise SynthesisError(
                    f"espeak_Initialize failed ({native_rate}); is espeak-ng-data installed? "
                    f"{_INSTALL_HINT}"
                )
            yield lib, native_rate
        finally:
            if initialised:
                lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
            # espeak_Initialize switches LC_CTYPE to C.UTF-8 for the whole process.
            if locale.setlocale(locale.LC_CTYPE) != saved_ctype:
                locale.setlocale(locale.LC_CTYPE, saved_ctype)

    def _synthesize_native(
        self, text: str, voice_id: str, rate: int, pitch: int, pitch_range: int
    ) -> tuple[np.ndarray, list[_RawEvent]]:
        """Run one synthesis; return int16 samples at the native rate and the raw events."""
        chunks: list[bytes] = []
        events: list[_RawEvent] = []
        errors: list[BaseException] = []

        def on_audio(wav: ctypes.Array, count: int, event_list: ctypes.Array) -> int:
            try:
                if wav and count > 0:
                    chunks.append(ctypes.string_at(wav, count * ctypes.sizeof(ctypes.c_short)))
                index = 0
                while event_list and event_list[index].type != _EVENT_LIST_TERMINATED:
                    event = event_list[index]
                    if event.type in (_EVENT_PHONEME, _EVENT_WORD):
                        events.append(_raw_event(event))
                    index += 1
            except BaseException as exc:  # an exception must not unwind through C frames
                errors.append(exc)
                return 1  # abort synthesis
            return 0

        # Kept in a local for the whole call; the library is unloaded before it goes away.
        callback = _SynthCallback(on_audio)
        with self._loaded() as (lib, native_rate):
            if native_rate != self._native_rate:
                raise SynthesisError(
                    f"espeak-ng changed its sample rate from {self._native_rate} to {native_rate}"
                )
            lib.espeak_SetSynthCallback(callback)
            status = lib.espeak_SetVoiceByName(voice_id.encode())
            current = lib.espeak_GetCurrentVoice()
            # espeak-ng silently drops an unknown variant, so compare what it actually loaded.
            loaded = current.contents.identifier if current else None
            if status != _EE_OK or loaded != voice_id.encode():
                raise SynthesisError(f"espeak-ng could not load voice {voice_id!r} ({status})")
            for parameter, value in (
                (_PARAM_RATE, rate),
                (_PARAM_PITCH, pitch),
                (_PARAM_RANGE, pitch_range),
            ):
                if lib.espeak_SetParameter(parameter, value, 0) != _EE_OK:
                    raise SynthesisError(f"espeak-ng rejected parameter {parameter} = {value}")
            # Breathy variants (+f3, +whisper, ...) draw noise from libc rand(); 1 is glibc's
            # default seed, so this also matches a fresh process.
            self._libc.srand(1)
            data = text.encode("utf-8")
            status = lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            if status == _EE_OK:
                status = lib.espeak_Synchronize()
        del callback
        if errors:
            raise SynthesisError(f"reading espeak-ng output failed: {errors[0]!r}") from errors[0]
        if status != _EE_OK:
            raise SynthesisError(f"espeak_Synth failed with status {status}")
        return np.frombuffer(b"".join(chunks), dtype=np.int16), events

    def _resolve_voice(self, voice: str) -> str:
        """Map ``'en-us'`` / ``'en-us+f3'`` to the voice file espeak-ng loads by name."""
        base, plus, variant = str(voice).partition("+")
        identifier = self._voice_ids.get(base.strip().lower())
        if identifier is None:
            raise SynthesisError(
                f"unknown voice {voice!r}; English voices are {', '.join(self.voices())}, "
                "optionally with a variant such as 'en-us+f3', 'en+m2' or 'en-gb+klatt'"
            )
        if not plus:
            return identifier
        variant = variant.strip()
        if not variant or (self._variants and variant not in self._variants):
            known = [
                v for v in ("m1", "m2", "m3", "f1", "f2", "f3", "klatt") if v in self._variants
            ]
            raise SynthesisError(
                f"unknown voice variant {variant!r} in {voice!r}; e.g. {', '.join(known)} "
                f"({len(self._variants)} variants installed)"
            )
        return f"{identifier}+{variant}"

    def _utterance(self, text: str, samples: np.ndarray, events: list[_RawEvent]) -> Utterance:
        audio = samples.astype(np.float32) / np.float32(32768.0)
        if self.sample_rate != self._native_rate:
            audio = soxr.resample(audio, self._native_rate, self.sample_rate)
        # Resampling can overshoot full scale by a hair.
        audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)
        duration = len(audio) / self.sample_rate
        phonemes, words = _timings(text, events, self._native_rate, duration)
        return Utterance(audio, self.sample_rate, phonemes, words)


def _remove_copy(tmpdir: str, owner_pid: int) -> None:
    # A forked child inherits the finaliser but must not delete the parent's copy.
    if os.getpid() == owner_pid:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check_range(name: str, value: int, limits: tuple[int, int]) -> None:
    low, high = limits
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SynthesisError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _locate_library(library: str | None, libc: ctypes.CDLL) -> str:
    """Return the real path of libespeak-ng, loading it once to let the dynamic linker search."""
    name = library or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(name)
        address = ctypes.cast(lib.espeak_Initialize, ctypes.c_void_p).value
    except (OSError, AttributeError) as exc:
        raise SynthesisError(
            f"cannot load libespeak-ng from {name!r} ({exc}); {_INSTALL_HINT}"
        ) from exc
    try:
        if os.path.isfile(name):
            return os.path.realpath(name)
        info = _DlInfo()
        libc.dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
        if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            raise SynthesisError(f"cannot find the file of {name!r}; pass library=<full path>")
        return os.path.realpath(os.fsdecode(info.dli_fname))
    finally:
        _ctypes.dlclose(lib._handle)


def _declare(lib: ctypes.CDLL) -> None:
    """Give ctypes the C signatures, so pointers and sizes are not truncated to int."""
    c_int, c_uint, c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
    signatures = {
        "espeak_Initialize": ((c_int, c_int, c_char_p, c_int), c_int),
        "espeak_SetSynthCallback": ((_SynthCallback,), None),
        "espeak_SetVoiceByName": ((c_char_p,), c_int),
        "espeak_GetCurrentVoice": ((), ctypes.POINTER(_Voice)),
        "espeak_ListVoices": (
            (ctypes.POINTER(_Voice),),
            ctypes.POINTER(ctypes.POINTER(_Voice)),
        ),
        "espeak_SetParameter": ((c_int, c_int, c_int), c_int),
        "espeak_Synth": (
            (
                c_char_p,
                ctypes.c_size_t,
                c_uint,
                c_int,
                c_uint,
                c_uint,
                ctypes.POINTER(c_uint),
                ctypes.c_void_p,
            ),
            c_int,
        ),
        "espeak_Synchronize": ((), c_int),
        "espeak_Terminate": ((), c_int),
        "espeak_Info": ((ctypes.POINTER(c_char_p),), c_char_p),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype


def _english_voices(lib: ctypes.CDLL) -> dict[str, str]:
    """Map each English language code to the voice espeak-ng ranks first for it."""
    best: dict[str, tuple[int, int, str]] = {}
    voices = lib.espeak_ListVoices(None)
    index = 0
    while voices[index]:
        voice = voices[index].contents
        identifier = voice.identifier.decode()
        address = voice.languages
        while address:
            priority = ctypes.c_ubyte.from_address(address).value
            if priority == 0:
                break
            raw = ctypes.string_at(address + 1)
            address += 2 + len(raw)
            code = raw.decode("utf-8", "replace").lower()
            if code == "en" or code.startswith("en-"):
                # Lower priority numbers are preferred, ties go to the earlier voice; this gives
                # the same choice as espeak-ng's own ranking (en -> gmw/en, en-us -> gmw/en-US).
                best[code] = min(
                    best.get(code, (priority, index, identifier)), (priority, index, identifier)
                )
        index += 1
    return {code: identifier for code, (_, _, identifier) in best.items()}


def _variants(lib: ctypes.CDLL) -> dict[str, bool]:
    """The voice variants in espeak-ng-data/voices/!v, each with whether it selects the Klatt
    synthesiser (empty if the folder cannot be read)."""
    data_path = ctypes.c_char_p()
    lib.espeak_Info(ctypes.byref(data_path))
    if not data_path.value:
        return {}
    folder = os.path.join(os.fsdecode(data_path.value), "voices", "!v")
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    return {name: _selects_klatt(os.path.join(folder, name)) for name in names}


def _selects_klatt(path: str) -> bool:
    """Whether a variant file has a ``klatt`` line (any but ``klatt 0``): espeak-ng then renders
    the voice with its Klatt formant synthesiser instead of its own, whatever the variant's name."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError:
        return False
    for line in lines:
        words = line.split("//", 1)[0].split()
        if words[:1] == ["klatt"]:
            # espeak-ng sets source 1 (impulsive) before reading the numbers, so a bare keyword
            # selects Klatt too.
            return words[1:2] != ["0"]
    return False


def _raw_event(event: _Event) -> _RawEvent:
    symbol = ""
    if event.type == _EVENT_PHONEME:
        symbol = event.id.string.split(b"\0", 1)[0].decode("utf-8", "replace")
    return _RawEvent(event.type, event.sample, event.text_position, event.length, symbol)


def _timings(
    text: str, events: list[_RawEvent], native_rate: int, duration: float
) -> tuple[tuple[Phoneme, ...], tuple[Word, ...]]:
    """Phonemes and words from the PHONEME and WORD events, in the order espeak-ng sent them."""
    tokens = [(match.start(), match.end()) for match in re.finditer(r"\S+", text)]
    token_starts = [start for start, _ in tokens]
    # Each WORD event opens a group; the phoneme events after it (up to the next WORD event)
    # are that word's. A word-final phoneme can share its sample with the next WORD event, but
    # it is sent before it, so stream order (which always agreed with the phonemes'
    # text_position on 320 test sentences) assigns it correctly where times cannot.
    groups: list[tuple[int | None, int, int, float]] = []  # (token, position, length, time)
    marks: list[tuple[float, str, int | None]] = []  # (start, symbol, group)
    for event in events:
        if event.kind == _EVENT_WORD:
            if event.length <= 0:
                continue  # seen after a clause-final pause: a repeat of the next word's number
            position = event.text_position - 1
            found = bisect.bisect_right(token_starts, position) - 1
            token = found if found >= 0 and position < tokens[found][1] else None
            # One token can give several WORD events ("123" -> "one hundred and twenty three"),
            # and spoken-out symbols can point between tokens ("😀" -> "grinning face").
            previous = groups[-1][0] if groups else None
            if not groups or (token is not None and (previous is None or token > previous)):
                time = min(event.sample / native_rate, duration)
                groups.append((token, position, event.length, time))
            continue
        start = min(event.sample / native_rate, duration)
        if marks:
            start = max(start, marks[-1][0])  # never observed, but a backwards step breaks ends
        # Pauses come as events with an empty IPA name. They are kept, not dropped, because
        # they end the preceding phoneme: without them it would stretch over the silence.
        symbol = event.symbol or PAUSE
        if symbol == PAUSE and marks and marks[-1][1] == PAUSE:
            continue  # a clause ends with two pause events (short + long); one pause covers both
        marks.append((start, symbol, len(groups) - 1 if groups else None))

    phonemes: list[Phoneme] = []
    spans: dict[int, tuple[float, float]] = {}
    for index, (start, symbol, group) in enumerate(marks):
        end = marks[index + 1][0] if index + 1 < len(marks) else duration
        if symbol == PAUSE:
            if end > start:  # the last pause event sits exactly at the end of the audio
                phonemes.append(Phoneme(PAUSE, start, end))
            continue
        phonemes.append(Phoneme(symbol, start, end))
        if group is not None:
            spans[group] = (spans.get(group, (start, end))[0], end)

    words = []
    for index, (token, position, length, time) in enumerate(groups):
        if token is None:
            raw = text[position : position + length]
        else:
            # espeak-ng joins some function words to the word before ("on the", "than a") and
            # sends no WORD event for them, so a word runs up to the next group's token.
            next_token = next((g[0] for g in groups[index + 1 :] if g[0] is not None), None)
            last = len(tokens) - 1 if next_token is None else max(token, next_token - 1)
            raw = text[tokens[token][0] : tokens[last][1]]
        word = raw.strip().strip(_PUNCTUATION) or raw.strip()
        if index in spans:
            start, end = spans[index]
        else:  # a word without phonemes: zero length, where espeak-ng placed it
            start = end = time
        words.append(Word(word, start, end))
    return tuple(phonemes), tuple(words)
