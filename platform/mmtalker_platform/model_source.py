"""Which model a job or service animates with: a registry version or a checkpoint folder.

The driver reads the checkpoint's files once; actors and replicas get the bytes, so no worker
needs the registry, its credentials or the driver's filesystem.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from pydantic import BaseModel

from mmtalker.checkpoint import Checkpoint, load_checkpoint
from mmtalker.errors import MMTalkerError
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import ModelChoice


class ModelSource(BaseModel):
    """A checkpoint folder's files and an id naming exactly these weights."""

    model_id: str
    files: dict[str, bytes]

    def load(self, device: str = "cpu") -> Checkpoint:
        """The checkpoint these files hold, on ``device``."""
        with tempfile.TemporaryDirectory(prefix="mmtalker-model-") as tmp:
            for name, data in self.files.items():
                (Path(tmp) / name).write_bytes(data)
            return load_checkpoint(tmp, device)


def resolve_model(choice: ModelChoice, settings: PlatformSettings) -> ModelSource:
    """The files of the chosen registry version (``NAME/VERSION`` id) or checkpoint folder.

    A folder's id is a digest of its files, so a changed checkpoint is a different model.
    """
    if choice.checkpoint is not None:
        folder = Path(choice.checkpoint)
        if not (folder / "config.json").is_file():
            raise MMTalkerError(f"{folder} is not a checkpoint folder (no config.json)")
        files = _read_folder(folder)
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name])
        return ModelSource(model_id=f"checkpoint:{digest.hexdigest()[:16]}", files=files)
    # Imported here: MLflow takes seconds to import, and actors that load a ModelSource's
    # files never need it.
    from mmtalker_platform import registry

    tracking_uri = choice.tracking_uri or settings.tracking_uri
    info = registry.show(tracking_uri, choice.model or "")
    with tempfile.TemporaryDirectory(prefix="mmtalker-model-") as tmp:
        folder = registry.download(tracking_uri, f"{info.name}/{info.version}", Path(tmp))
        files = _read_folder(folder)
    return ModelSource(model_id=f"{info.name}/{info.version}", files=files)


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
