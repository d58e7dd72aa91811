"""Checkpoints: safetensors weights + config JSON + topology + templates, loaded without pickle.

A checkpoint folder holds ``model.safetensors`` (the state dict), ``config.json`` (model kind,
its config, frame rate, sample rate, training speakers and free-form metadata),
``topology.npz`` (faces, regions, UV chart) and ``templates.npz`` (training speakers' neutral
faces). Nothing is unpickled: weights are tensors, the rest is JSON or plain arrays.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmtalker.data.sequence import Topology
from mmtalker.errors import MMTalkerError
from mmtalker.nn.base import AnimationModel
from mmtalker.nn.baselines import StaticTemplate
from mmtalker.nn.faceformer import FaceFormer
from mmtalker.nn.mmtalker import MMTalker

FORMAT_VERSION = 1
MODELS: dict[str, type[AnimationModel]] = {
    m.kind: m for m in (MMTalker, FaceFormer, StaticTemplate)
}


class CheckpointError(MMTalkerError):
    """A checkpoint folder is missing, incomplete or does not match the code."""


class CheckpointInfo(BaseModel):
    """The content of ``config.json``."""

    format: int
    kind: str
    config: dict[str, Any]
    fps: float
    sample_rate: int
    speakers: list[str]
    metadata: dict[str, Any] = {}


@dataclass
class Checkpoint:
    """A loaded model with what it needs to animate: rates, topology and speakers' faces."""

    model: AnimationModel
    fps: float
    sample_rate: int
    templates: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return self.model.topology

    def face(self, speaker: str | None = None) -> tuple[np.ndarray, int]:
        """A training speaker's neutral face and index (default: the first speaker)."""
        name = speaker or self.model.speakers[0]
        if name not in self.templates:
            raise CheckpointError(
                f"unknown speaker {name!r}; this model has {', '.join(self.model.speakers)}"
            )
        return self.templates[name], self.model.speakers.index(name)


def build_model(
    kind: str, config: dict[str, Any] | BaseModel, topology: Topology,
    templates: dict[str, np.ndarray],
) -> AnimationModel:  # fmt: skip
    """Construct a model of a registered kind from its config (dict or pydantic model)."""
    if kind not in MODELS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(MODELS)}")
    cls = MODELS[kind]
    parsed = config if isinstance(config, BaseModel) else cls.config_class.model_validate(config)
    return cls(parsed, topology, templates)


def save_checkpoint(
    directory: str | Path, model: AnimationModel, templates: dict[str, np.ndarray], fps: float,
    sample_rate: int, metadata: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write a checkpoint folder (created if needed); files are replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = CheckpointInfo(
        format=FORMAT_VERSION, kind=model.kind, config=model.config.model_dump(mode="json"),
        fps=fps, sample_rate=sample_rate, speakers=model.speakers, metadata=metadata or {},
    )  # fmt: skip
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arrays = io.BytesIO()
    np.savez_compressed(arrays, **{s: templates[s] for s in model.speakers})
    outputs = {
        "model.safetensors": None,
        "config.json": info.model_dump_json(indent=2).encode(),
        "topology.npz": model.topology.to_npz(),
        "templates.npz": arrays.getvalue(),
    }
    for name, payload in outputs.items():
        tmp = directory / f".{name}.tmp"
        if payload is None:
            save_file(state, str(tmp))
        else:
            tmp.write_bytes(payload)
        tmp.replace(directory / name)
    return directory


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc']))}: {error['msg']}"


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint`."""
    directory = Path(directory)
    missing = [
        n for n in ("model.safetensors", "config.json", "topology.npz", "templates.npz")
        if not (directory / n).is_file()
    ]  # fmt: skip
    if missing:
        # A Ray Train checkpoint keeps the model in a subfolder; name it rather than leave the
        # user to guess.
        inner = sorted(path.parent for path in directory.glob("*/model.safetensors"))
        hint = f" ({inner[0]} inside it is one)" if inner else ""
        raise CheckpointError(
            f"{directory} is not a checkpoint: missing {', '.join(missing)}{hint}"
        )
    try:
        info = CheckpointInfo.model_validate_json((directory / "config.json").read_bytes())
    except ValidationError as exc:
        raise CheckpointError(
            f"{directory}/config.json is malformed: {exc.errors()[0]['msg']}"
        ) from exc
    if info.format != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {info.format} is not {FORMAT_VERSION}")
    topology = Topology.from_npz((directory / "topology.npz").read_bytes())
    try:
        with np.load(directory / "templates.npz", allow_pickle=False) as data:
            templates = {name: data[name] for name in data.files}
        weights = load_file(str(directory / "model.safetensors"))
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as exc:
        raise CheckpointError(f"{directory} holds a corrupt file: {exc}") from exc
    try:
        model = build_model(info.kind, info.config, topology, templates)
    except ValidationError as exc:
        raise CheckpointError(
            f"{directory} holds a {info.kind} config this version cannot build "
            f"({_first_error(exc)}); it was saved by another mmtalker version: retrain it"
        ) from exc
    expected, found = model.state_dict(), set(weights)
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    wrong = [k for k in sorted(found & set(expected)) if weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected),
                                 ("other shapes", wrong)) if names
        )  # fmt: skip
        raise CheckpointError(
            f"weights in {directory} do not fit this version's {info.kind} model ({detail}); "
            "it was saved by another mmtalker version: retrain it"
        )
    model.load_state_dict(weights)
    model.to(device).eval()
    return Checkpoint(model, info.fps, info.sample_rate, templates, info.metadata)
