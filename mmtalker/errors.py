"""Exceptions raised by the model library; each message says what was wrong and how to fix it."""


class MMTalkerError(Exception):
    """Base class for every error the library raises on purpose."""


class SynthesisError(MMTalkerError):
    """Speech synthesis (espeak-ng) failed or was asked for something impossible."""


class TemplateError(MMTalkerError):
    """A face template or its region masks are missing or malformed."""


class DatasetError(MMTalkerError):
    """A dataset folder, shard or manifest is missing, malformed or inconsistent."""


class StorageError(MMTalkerError):
    """A storage URI cannot be resolved or accessed."""


class AudioError(MMTalkerError):
    """Audio is unreadable, empty or not finite."""


class AudioTooLongError(AudioError):
    """Audio is longer than the caller accepts."""


class RenderError(MMTalkerError, ValueError):
    """A mesh, colour array, image or render setting cannot be rendered as given."""


class VideoError(MMTalkerError):
    """A video cannot be written or read: bad frames or audio, or ffmpeg failed."""


class ExportError(MMTalkerError, ValueError):
    """An animation cannot be exported or read back: bad shape, values, format or file."""


class RigError(MMTalkerError, ValueError):
    """A rig, its asset, or the weights or vertices given to it are missing or malformed."""
