"""Training pieces shared by the single-process loop and distributed workers.

:class:`Trainer` owns the optimisation of one model replica (AdamW, warmup + cosine schedule,
gradient clipping, mixed precision on GPU); it takes batches from anywhere, so a Ray Train
worker can feed it its dataset shard unchanged. :func:`fit` is the single-process loop over a
dataset; :func:`evaluate` scores a split with the field's metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mmtalker.checkpoint import build_model
from mmtalker.data.batch import Batch, collate
from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import Dataset
from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import MetricAccumulator, Metrics
from mmtalker.geometry.uv import attach_uv
from mmtalker.losses import LossConfig
from mmtalker.nn.base import AnimationModel


class TrainConfig(BaseModel):
    """How to train: schedule, batching, precision and device."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    max_frames: int = Field(90, ge=8)
    learning_rate: float = Field(1e-3, gt=0)
    sampler_learning_rate: float = Field(0.03, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    time_budget_s: float | None = Field(None, gt=0)
    losses: LossConfig = LossConfig()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise MMTalkerError("device 'cuda' requested but no CUDA device is available; use cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: mixed precision only on GPU (bf16 where supported, else fp16)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def length_batches(
    sequences: Seq[Sequence], batch_size: int, rng: np.random.Generator
) -> Iterator[list[Sequence]]:
    """Shuffled batches of similar length (little padding): sort within random pools."""
    order = rng.permutation(len(sequences))
    pool = batch_size * 8
    groups = []
    for start in range(0, len(order), pool):
        chunk = [sequences[i] for i in order[start : start + pool]]
        groups += similar_length_groups(chunk, batch_size)
    for index in rng.permutation(len(groups)):
        yield groups[index]


def similar_length_groups(pool: Seq[Sequence], batch_size: int) -> list[list[Sequence]]:
    """A pool of sequences sorted by length and cut into batches (the last may be short)."""
    ordered = sorted(pool, key=lambda s: s.num_frames)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def training_templates(dataset: Dataset) -> dict[str, np.ndarray]:
    """Neutral faces of the training split's speakers: the speakers a model is built for."""
    return {s: dataset.templates[s] for s in dataset.manifest.splits["train"].speakers}


def model_for_dataset(kind: str, config: dict[str, Any], dataset: Dataset) -> AnimationModel:
    """A fresh model for a dataset's topology and training speakers.

    A topology stored without a UV chart gets one, computed on the training speakers' mean
    face (deterministic, so every distributed worker builds the same model).
    """
    templates = training_templates(dataset)
    topology = dataset.topology
    if topology.uv is None:
        topology = attach_uv(topology, np.mean(list(templates.values()), axis=0))
    return build_model(kind, config, topology, templates)


def displacement_scale(sequences: Iterable[Sequence], templates: dict[str, np.ndarray]) -> float:
    """Root-mean-square displacement from the neutral face over the given sequences."""
    total, count = 0.0, 0
    for seq in sequences:
        disp = seq.vertices - templates[seq.speaker][None]
        total += float(np.square(disp, dtype=np.float64).sum())
        count += disp.size
    return math.sqrt(total / max(count, 1)) or 1.0


class Trainer:
    """Optimises one model replica; ``step`` takes any :class:`Batch`.

    ``wrap`` (e.g. Ray Train's ``prepare_model``) wraps the model for data parallelism after
    the optimizer's parameter groups are made; ``device`` overrides ``config.device`` (a
    distributed worker's own GPU).
    """

    def __init__(
        self,
        model: AnimationModel,
        config: TrainConfig,
        total_steps: int,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.device = device or resolve_device(config.device)
        self.module = model.to(self.device)
        self.dtype = autocast_dtype(config.precision, self.device)
        groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "rest": [], "sampler": []}
        for name, param in model.named_parameters():
            key = (
                "sampler" if name.startswith("sampler.") else "decay" if param.dim() > 1 else "rest"
            )
            groups[key].append(param)
        # The sampler's logits get their own, larger step: Adam moves each by about the learning
        # rate per step, and the density must shift by whole units within a short training.
        self._network = groups["decay"] + groups["rest"]
        self._sampler = groups["sampler"]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": groups["decay"], "weight_decay": config.weight_decay},
                {"params": groups["rest"]},
                {"params": groups["sampler"], "lr": config.sampler_learning_rate},
            ],
            lr=config.learning_rate,
            weight_decay=0.0,
        )
        warmup = max(config.warmup_steps, 1)
        total = max(total_steps, warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        # Loss scaling is only needed for fp16; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.model = wrap(self.module) if wrap is not None else self.module

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step; returns the loss and its named parts."""
        self.model.train()
        batch = batch.to(self.device)
        with self._autocast():
            loss, logs = self.model(batch, self.config.losses)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # The sampler's score-function gradient is clipped on its own, so neither side's spikes
        # rescale the other's step.
        norm = torch.nn.utils.clip_grad_norm_(self._network, self.config.grad_clip)
        if self._sampler:
            torch.nn.utils.clip_grad_norm_(self._sampler, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"objective": loss.item(), "grad_norm": norm.item(), **logs}

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule and loss-scaler state (tensors and numbers only), for resuming."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def evaluate(
    model: AnimationModel,
    sequences: Iterable[Sequence],
    templates: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
) -> Metrics:
    """Score a model on sequences (whole utterances) with LVE, EVE, MVE and FDD."""
    acc = MetricAccumulator.for_topology(model.topology)
    for seq, template, predicted in predictions(model, sequences, templates, device):
        acc.add(predicted, seq.vertices, template)
    return acc.result()


@torch.no_grad()
def predictions(
    model: AnimationModel,
    sequences: Iterable[Sequence],
    templates: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Sequence, np.ndarray, np.ndarray]]:
    """(sequence, its speaker's template, predicted vertices (T, V, 3)) for each sequence."""
    model.eval()
    index = {name: i for i, name in enumerate(model.speakers)}
    for seq in sequences:
        template = templates[seq.speaker]
        audio = torch.tensor(seq.audio, device=device)[None]
        tmpl = torch.tensor(template, device=device)[None]
        speaker = torch.tensor([index.get(seq.speaker, -1)], device=device)
        disp = model.predict(audio, seq.num_frames, tmpl, speaker)[0].float().cpu().numpy()
        yield seq, template, template[None] + disp


def fit(
    model: AnimationModel,
    dataset: Dataset,
    config: TrainConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train on the dataset's train split, validate each epoch; returns per-epoch records.

    Sequences are held in memory: this is the single-process path for corpora that fit.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = list(dataset.sequences("train"))
    val = list(dataset.sequences("val")) if "val" in dataset.manifest.splits else []
    templates = dataset.templates
    model.displacement_scale.fill_(displacement_scale(train, templates))
    speaker_index = {name: i for i, name in enumerate(model.speakers)}
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    trainer = Trainer(model, config, steps_per_epoch * config.epochs)
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(config.epochs):
        losses = []
        for group in length_batches(train, config.batch_size, rng):
            batch = collate(group, templates, speaker_index, config.max_frames, rng)
            losses.append(trainer.step(batch)["loss"])
            step += 1
            if progress is not None:
                progress(step, steps_per_epoch * config.epochs, {"loss": losses[-1]})
            if config.time_budget_s and time.perf_counter() - started > config.time_budget_s:
                break
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "steps": step}
        if val:
            record.update(
                {
                    f"val_{k}": v
                    for k, v in evaluate(model, val, templates, trainer.device).as_dict().items()
                }
            )
        history.append(record)
        if config.time_budget_s and time.perf_counter() - started > config.time_budget_s:
            break
    return history
