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
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.swa_utils import AveragedModel

from mmtalker.checkpoint import MODELS, build_model
from mmtalker.data.augment import AugmentConfig
from mmtalker.data.batch import Batch, collate
from mmtalker.data.grouping import length_batches
from mmtalker.data.sequence import Sequence, displacement_squares, pad_to_frames
from mmtalker.data.shards import Dataset
from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import MetricAccumulator, Metrics
from mmtalker.geometry.uv import attach_uv
from mmtalker.losses import LossConfig
from mmtalker.nn.base import AnimationModel
from mmtalker.nn.mmtalker import SPECTRAL_FEATURES
from mmtalker.nn.speech import LIGHT_WIDTH_PER_FEATURE, REGISTER_HZ, SpeechConfig


class TrainConfig(BaseModel):
    """How to train: schedule, batching, precision and device."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    max_frames: int = Field(90, ge=8)
    #: Peak rate of the warmup + cosine schedule: 3e-3 beat 1e-3 for both MMTalker and the
    #: FaceFormer-style baseline in 5-minute runs on the bench corpus; the warmup and gradient
    #: clipping keep it stable.
    learning_rate: float = Field(3e-3, gt=0)
    sampler_learning_rate: float = Field(0.03, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    #: Training time (validation excluded) after which training stops; the learning-rate
    #: schedule is then spread over this time instead of over ``epochs``.
    time_budget_s: float | None = Field(None, gt=0)
    #: Validations spread evenly over the time budget, or over the epochs of a Ray Train job
    #: (which checkpoints at each); the last one at the end.
    validations: int = Field(10, ge=1)
    #: Decay per step of the moving average of the weights that validation scores and training
    #: keeps (0: the raw weights). Averaging smooths the late steps' noise: with it, MMTalker's
    #: test LVE over three 20-minute bench seeds spread ±0.008 instead of ±0.046, and its
    #: errors on unseen speech engines fell 8-12%.
    weight_average: float = Field(0.995, ge=0, lt=1)
    losses: LossConfig = LossConfig()
    #: Audio augmentation of training crops (speed, filters, room, noise, codec, gain).
    augment: AugmentConfig = AugmentConfig()


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


def training_templates(dataset: Dataset) -> dict[str, np.ndarray]:
    """Neutral faces of the training split's speakers: the speakers a model is built for."""
    return {s: dataset.templates[s] for s in dataset.manifest.splits["train"].speakers}


def model_for_dataset(
    kind: str, config: dict[str, Any], dataset: Dataset, losses: LossConfig | None = None
) -> AnimationModel:
    """A fresh model for a dataset's topology and training speakers.

    A topology stored without a UV chart gets one, computed on the training speakers' mean
    face (deterministic, so every distributed worker builds the same model). A light speech
    encoder normalises high voices' register (``speech.register_hz``, default ``REGISTER_HZ``),
    has ``LIGHT_WIDTH_PER_FEATURE`` channels per feature (``speech.width``) and runs its deeper
    stages at lower rates (``speech.multirate``). With a phone loss (``losses.phones``) and a
    dataset with phone labels, the speech encoder gets a phone readout whose posteriors the
    decoder reads too (unless the config sets ``speech.phone_features``). An MMTalker head
    reads ``SPECTRAL_FEATURES`` Laplacian eigenfunctions. What the config sets wins.
    """
    with_phones = losses is not None and losses.phones > 0
    config = new_model_config(kind, config, dataset.manifest.phone_names if with_phones else [])
    templates = training_templates(dataset)
    topology = dataset.topology
    if topology.uv is None:
        topology = attach_uv(topology, np.mean(list(templates.values()), axis=0))
    return build_model(kind, config, topology, templates)


def new_model_config(kind: str, config: dict[str, Any], phones: list[str]) -> dict[str, Any]:
    """A new model's config: ``config`` over the defaults only new models get (speech settings,
    an MMTalker head's eigenfunctions); ``phones`` names the phone readout's classes, if any."""
    fields = MODELS[kind].config_class.model_fields if kind in MODELS else {}
    if "speech" in fields:
        config = {**config, "speech": new_speech_config(config.get("speech", {}), phones)}
    if "spectral_features" in fields:
        config = {"spectral_features": SPECTRAL_FEATURES, **config}
    return config


def new_speech_config(speech: dict[str, Any], phones: list[str]) -> dict[str, Any]:
    """A new model's speech settings: ``speech`` over the defaults that only new models get."""
    defaults: dict[str, Any] = {}
    if speech.get("kind", "light") == "light":
        width = int(LIGHT_WIDTH_PER_FEATURE * speech.get("dim", SpeechConfig().dim))
        defaults |= {"register_hz": REGISTER_HZ, "width": width, "multirate": True}
    if phones:
        defaults["phone_features"] = True
    speech = {**defaults, **speech}
    return {**speech, "phone_classes": len(phones)} if phones else speech


def displacement_scale(sequences: Iterable[Sequence], templates: dict[str, np.ndarray]) -> float:
    """Root-mean-square displacement from the neutral face over the given sequences."""
    total, count = 0.0, 0
    for seq in sequences:
        squares, values = displacement_squares(seq.vertices, templates[seq.speaker])
        total, count = total + squares, count + values
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
        self.total_steps = max(total_steps, 1)
        self.steps_done = 0
        self._base_rates = [group["lr"] for group in self.optimizer.param_groups]
        # Loss scaling is only needed for fp16; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        decay = config.weight_average
        # Copied before any data-parallel wrapper can attach its hooks to the parameters.
        self.average = (
            AveragedModel(self.module, multi_avg_fn=partial(_moving_average, decay))
            if decay
            else None
        )
        self.model = wrap(self.module) if wrap is not None else self.module

    @property
    def scored(self) -> AnimationModel:
        """The weights to validate, checkpoint and keep: the moving average, when there is one."""
        return self.module if self.average is None else self.average.module

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def learning_rate_factor(self, progress: float | None = None) -> float:
        """Linear warmup over ``warmup_steps`` (at most a tenth of the schedule), then a cosine
        decay to zero.

        ``progress`` is the fraction of the schedule done (e.g. of a time budget); by default the
        fraction of ``total_steps`` taken.
        """
        warmup = min(self.config.warmup_steps, self.total_steps // 10)
        if self.steps_done < warmup:
            return (self.steps_done + 1) / warmup
        if progress is None:
            progress = (self.steps_done - warmup) / max(self.total_steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def step(self, batch: Batch, progress: float | None = None) -> dict[str, float]:
        """One optimisation step; returns the loss and its named parts.

        ``progress`` (0–1) places the step on the learning-rate schedule, for training bounded by
        time rather than by a step count; see :meth:`learning_rate_factor`.
        """
        factor = self.learning_rate_factor(progress)
        for group, rate in zip(self.optimizer.param_groups, self._base_rates, strict=True):
            group["lr"] = rate * factor
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
        self.steps_done += 1
        if self.average is not None:
            self.average.update_parameters(self.module)
        return {"objective": loss.item(), "grad_norm": norm.item(), **logs}

    def state_dict(self) -> dict[str, Any]:
        """The training weights, their moving average, optimizer, schedule and loss-scaler state
        (tensors and numbers only), for resuming."""
        return {
            "weights": self.module.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_done": self.steps_done,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if "weights" not in state:
            raise MMTalkerError(
                "this training state predates weight averaging and cannot be resumed; "
                "start the job under a new name"
            )
        try:
            self.module.load_state_dict(state["weights"])
        except RuntimeError as error:
            raise MMTalkerError(
                "this training state was written by a model of another shape (e.g. one from "
                "before the head read Laplacian eigenfunctions, model.config.spectral_features: "
                "0 then) and cannot be resumed; start the job under a new name or set the "
                f"config it had ({str(error).splitlines()[0]})"
            ) from error
        if self.average is not None:
            if state["average"] is None:
                raise MMTalkerError(
                    "this training state has no weight average but the config asks for one; "
                    "resume with train.weight_average: 0 or start the job under a new name"
                )
            self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.scaler.load_state_dict(state["scaler"])


def _moving_average(
    decay: float, average: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor
) -> None:
    """``average`` moves towards ``current`` by ``1 - decay``; the decay ramps up over the first
    steps (as ``(1 + n) / (10 + n)``) so the random initial weights are soon forgotten."""
    updates = int(count)
    torch._foreach_lerp_(average, current, 1 - min(decay, (1 + updates) / (10 + updates)))


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
        padded = pad_to_frames(seq.audio, seq.num_frames, seq.sample_rate / seq.fps)
        audio = torch.tensor(padded, device=device)[None]
        lengths = torch.tensor([seq.audio.size], device=device)
        tmpl = torch.tensor(template, device=device)[None]
        speaker = torch.tensor([index.get(seq.speaker, -1)], device=device)
        disp = model.predict(audio, seq.num_frames, tmpl, speaker, lengths)[0].float().cpu().numpy()
        yield seq, template, template[None] + disp


def fit(
    model: AnimationModel,
    dataset: Dataset,
    config: TrainConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train on the train split, validate, keep the weights that score best on val; returns the
    validation records.

    Without ``time_budget_s`` training runs ``epochs`` and validates after each; with it, the
    budget bounds training time alone (validation runs outside it) and the schedule follows the
    budget. The model ends with the (averaged) weights of the best validation LVE (the last ones
    without a val split). Sequences are held in memory: the single-process path for corpora that
    fit.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train = list(dataset.sequences("train"))
    val = list(dataset.sequences("val")) if "val" in dataset.manifest.splits else []
    templates = dataset.templates
    model.displacement_scale.fill_(displacement_scale(train, templates))
    speaker_index = {name: i for i, name in enumerate(model.speakers)}
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    trainer = Trainer(model, config, total)
    budget = config.time_budget_s
    checkpoints = (
        [budget * (i + 1) / config.validations for i in range(config.validations)] if budget else []
    )
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    trained, step, epoch, losses = 0.0, 0, 0, []

    def validate() -> None:
        nonlocal best
        record = {"epoch": epoch, "steps": step, "train_seconds": trained,
                  "train_loss": float(np.mean(losses)) if losses else float("nan")}  # fmt: skip
        losses.clear()
        if val:
            scores = evaluate(trainer.scored, val, templates, trainer.device).as_dict()
            record.update({f"val_{k}": v for k, v in scores.items()})
            if best is None or scores["lve"] < best[0]:
                best = (
                    scores["lve"],
                    {k: v.detach().clone() for k, v in trainer.scored.state_dict().items()},
                )
        history.append(record)

    while (budget is None and epoch < config.epochs) or (budget is not None and checkpoints):
        for group in length_batches(train, config.batch_size, rng):
            started = time.perf_counter()
            batch = collate(group, templates, speaker_index, config.max_frames, rng, config.augment)
            fraction = trained / budget if budget else None
            losses.append(trainer.step(batch, fraction)["loss"])
            trained += time.perf_counter() - started
            step += 1
            if progress is not None:
                progress(step, total, {"loss": losses[-1]})
            while checkpoints and trained >= checkpoints[0]:
                checkpoints.pop(0)
                validate()
            if budget is not None and not checkpoints:
                break
        epoch += 1
        if budget is None:
            validate()
    model.load_state_dict(best[1] if best is not None else trainer.scored.state_dict())
    return history
