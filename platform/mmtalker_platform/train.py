"""Distributed training: Ray Train workers running the library's Trainer, MLflow from rank 0.

:func:`run_training` is the driver: it prepares tracking (the sqlite database is created here,
before any worker logs), measures the training data's displacement scale with one Ray Data
pass, runs a ``TorchTrainer`` whose workers stream their share of the shards, then scores the
final checkpoint on the test split and registers it. Every validation ends in a checkpoint (the
last epoch always validates), so a lost worker costs at most the epochs since; a job re-run
under the same name continues from its last checkpoint (Ray Train restores its run state from
the storage path), and one whose checkpoint holds every epoch is refused before workers start.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import typer
import yaml
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from mmtalker import storage
from mmtalker.checkpoint import build_model, load_checkpoint, save_checkpoint
from mmtalker.data.batch import collate
from mmtalker.data.shards import Dataset, open_dataset
from mmtalker.errors import MMTalkerError
from mmtalker.eval.report import write_report
from mmtalker.nn.base import AnimationModel
from mmtalker.storage import S3Settings
from mmtalker.training import Trainer, evaluate, model_for_dataset, training_templates
from mmtalker_platform import registry, tracking
from mmtalker_platform.cluster import check_capacity, connect
from mmtalker_platform.console import stage
from mmtalker_platform.datasets import epoch_batches, read_split, training_displacement_scale
from mmtalker_platform.redaction import redact
from mmtalker_platform.registry import EvaluationSet, ModelVersionInfo
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import TrainJobSpec

MODEL_DIR = "model"
STATE_FILE = "trainer.pt"
#: How often the driver looks in MLflow for epochs the workers finished.
EPOCH_POLL_SECONDS = 1.0
#: Metrics of an epoch's progress line.
EPOCH_LINE = ("train_loss", "train_frames_per_s", "val_lve")


class TrainingError(MMTalkerError):
    """A training run failed after its retries, or left no checkpoint."""


class WorkerConfig(BaseModel):
    """What every worker gets: the spec (redacted: Ray shows it on its dashboard) plus what the
    driver resolved for it."""

    spec: TrainJobSpec
    tracking_uri: str
    run_id: str
    displacement_scale: float


class TrainingOutcome(BaseModel):
    """The result of a training job: its MLflow run, checkpoint, test metrics and version."""

    run_id: str
    tracking_uri: str
    checkpoint: str
    #: The model folder inside ``checkpoint``: what ``--checkpoint`` of the CLI commands takes.
    model: str
    epochs: int
    resumes: int
    test_metrics: dict[str, float]
    version: ModelVersionInfo


def train_loop(raw: dict[str, Any]) -> None:
    """Ray Train worker: train this replica on its shard, report and checkpoint every epoch."""
    config = WorkerConfig.model_validate(raw)
    spec = config.spec
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    dataset = open_dataset(spec.data, S3Settings())
    templates = training_templates(dataset)
    torch.manual_seed(spec.train.seed)
    model = model_for_dataset(spec.model.kind, spec.model.config, dataset, spec.train.losses)
    model.displacement_scale.fill_(config.displacement_scale)
    per_worker = dataset.manifest.splits["train"].num_sequences // workers
    steps = math.ceil(per_worker / spec.train.batch_size) * spec.train.epochs
    trainer = Trainer(
        model, spec.train, steps, device=ray.train.torch.get_device(),
        wrap=lambda m: _data_parallel(m, not model.all_parameters_used),
    )  # fmt: skip
    epoch, resumes, step = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            epoch, step, resumes = _restore(Path(directory), trainer)
        resumes += 1
    shard = ray.train.get_dataset_shard("train")
    speaker_index = {name: i for i, name in enumerate(model.speakers)}
    rng = np.random.default_rng([spec.train.seed, epoch, rank])
    while epoch < spec.train.epochs:
        # Summed over workers: loss, batches, real frames trained, CPU seconds (all threads of
        # the worker: data loading included, waiting for a busy machine not).
        totals = torch.zeros(4, dtype=torch.float64)
        started, cpu_started = time.perf_counter(), time.process_time()
        seed = spec.train.seed * 1_000_003 + epoch * 1009 + rank
        # Distinct per rank and epoch: replicas must draw different surface points and dropout
        # masks, and a resumed run must not replay the first epoch's draws.
        torch.manual_seed(seed)
        for group in epoch_batches(shard, spec.train.batch_size, spec.shuffle_buffer, seed):
            batch = collate(
                group, templates, speaker_index, spec.train.max_frames, rng, spec.train.augment
            )
            totals[:3] += torch.tensor([trainer.step(batch)["loss"], 1, batch.frame_lengths.sum()])
            step += 1
        seconds = time.perf_counter() - started
        totals[3] = time.process_time() - cpu_started
        if torch.distributed.is_initialized():
            # NCCL only reduces tensors on the GPU; gloo takes them where they are.
            totals = totals.to(trainer.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        epoch += 1
        loss_sum, batches, frames, cpu_seconds = totals.tolist()
        metrics: dict[str, float] = {
            "epoch": epoch, "step": step, "resumes": resumes,
            "train_loss": loss_sum / batches if batches else float("nan"),
            "epoch_seconds": seconds, "train_frames_per_s": frames / seconds,
            "train_frames_per_cpu_s": frames / cpu_seconds,
        }  # fmt: skip
        # Validation and a checkpoint at `validations` epochs spread over the run (the last one
        # included): on a small corpus, validating every epoch doubled the demo's training time
        # while the other workers waited.
        every = math.ceil(spec.train.epochs / spec.train.validations)
        validate = epoch % every == 0 or epoch == spec.train.epochs
        if rank != 0:
            ray.train.report(metrics)
            continue
        if validate and "val" in dataset.manifest.splits:
            scores = evaluate(
                trainer.scored, dataset.sequences("val"), dataset.templates, trainer.device
            )
            metrics.update({f"val_{k}": float(v) for k, v in scores.as_dict().items()})
        tracking.log_metrics(config.tracking_uri, config.run_id, metrics, step=epoch)
        if not validate:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as directory:
            _save(Path(directory), trainer, dataset, templates, epoch, step, resumes, spec.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _data_parallel(model: torch.nn.Module, find_unused: bool) -> torch.nn.Module:
    # Buffers (mesh graph, pooling, masks) never change in training: broadcasting them before
    # every step would be pure traffic. Ray Train skips DDP itself for a single worker.
    kwargs = {"find_unused_parameters": find_unused, "broadcast_buffers": False}
    prepared = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # Once, though: a buffer each worker computes (the head's Laplacian eigenfunctions)
        # can differ in a mode's sign between machines, and every replica must read rank 0's.
        for buffer in prepared.buffers():
            if buffer.is_floating_point():
                torch.distributed.broadcast(buffer, src=0)
    return prepared


def _save(
    directory: Path, trainer: Trainer, dataset: Dataset, templates: dict[str, np.ndarray],
    epoch: int, step: int, resumes: int, job: str,
) -> None:  # fmt: skip
    manifest = dataset.manifest
    save_checkpoint(
        directory / MODEL_DIR, trainer.scored, templates, manifest.fps, manifest.sample_rate,
        {"job": job, "dataset": dataset.uri, "epoch": epoch},
    )  # fmt: skip
    state = {"trainer": trainer.state_dict(), "epoch": epoch, "step": step, "resumes": resumes}
    torch.save(state, directory / STATE_FILE)


def _restore(directory: Path, trainer: Trainer) -> tuple[int, int, int]:
    # The model folder holds the weights users get (the average); training resumes from the
    # state's own weights. weights_only: the state holds tensors and numbers, nothing else may
    # be unpickled.
    state = torch.load(directory / STATE_FILE, map_location=trainer.device, weights_only=True)
    trainer.load_state_dict(state["trainer"])
    return int(state["epoch"]), int(state["step"]), int(state["resumes"])


def _run_config(spec: TrainJobSpec, settings: PlatformSettings) -> ray.train.RunConfig:
    location = spec.checkpoint.storage or str(settings.local_storage)
    filesystem, path = storage.resolve(location, settings.s3)
    return ray.train.RunConfig(
        name=spec.name,
        storage_path=path,
        storage_filesystem=filesystem,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.checkpoint.num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
    )


def _checkpointed_epochs(run_config: ray.train.RunConfig) -> int:
    """Epochs done by the job's latest checkpoint in its storage folder; 0 for a new job."""
    folder = f"{run_config.storage_path}/{run_config.name}"
    try:
        result = ray.train.Result.from_path(
            folder, storage_filesystem=run_config.storage_filesystem
        )
    except RuntimeError:  # no such folder, or no Ray Train snapshot in it: nothing checkpointed
        return 0
    return int((result.metrics or {}).get("epoch", 0))


def _worker_resources(spec: TrainJobSpec) -> dict[str, float]:
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return resources


def _scaling(spec: TrainJobSpec) -> ray.train.ScalingConfig:
    return ray.train.ScalingConfig(
        num_workers=spec.scaling.workers,
        use_gpu=spec.scaling.use_gpu,
        resources_per_worker=_worker_resources(spec),
    )


def run_training(spec: TrainJobSpec, settings: PlatformSettings | None = None) -> TrainingOutcome:
    """Run a training job on the current Ray cluster: train, test, register.

    Prints a line per stage and per epoch (read from MLflow as the workers log them).
    Whatever the job records (run params, ``job/train.yaml``, the workers' config) is the
    spec with its credentials redacted.
    """
    settings = settings or PlatformSettings()
    if "://" not in spec.data:
        # Workers do not run in the driver's directory; across nodes a local path must be on
        # a shared filesystem (or the data on s3://) anyway.
        spec = spec.model_copy(update={"data": str(Path(spec.data).resolve())})
    # Where results go is settled first: a location that cannot keep them fails before Ray starts.
    tracking_uri = spec.mlflow.tracking_uri or settings.tracking_uri
    run_config = _run_config(spec, settings)
    if _checkpointed_epochs(run_config) >= spec.train.epochs:
        # Registering the finished run's weights again would only add a duplicate version;
        # asked before Ray Train starts workers to find out the same.
        raise TrainingError(
            f"job {spec.name!r} had already trained all {spec.train.epochs} epochs; nothing "
            "was trained or registered. Use a new name, or raise train.epochs to continue it"
        )
    connect(settings)
    check_capacity(_worker_resources(spec), spec.scaling.workers, streams_data=not spec.cache_data)
    dataset = open_dataset(spec.data, settings.s3)
    if "test" not in dataset.manifest.splits:
        raise TrainingError(f"{spec.data} has no test split to score the trained model on")
    experiment = tracking.prepare_tracking(tracking_uri, spec.mlflow.experiment)
    record = redact(spec)
    run_id, _ = tracking.start_or_resume_run(tracking_uri, experiment, spec.name, record)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "train.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        tracking.log_artifacts(tracking_uri, run_id, directory, "job")
    with stage(f"reading the training split of {spec.data}"):
        train_data = read_split(dataset, "train", settings.s3, cache=spec.cache_data)
        scale = training_displacement_scale(dataset, train_data, training_templates(dataset))
    backend = "nccl" if spec.scaling.use_gpu else "gloo"
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=WorkerConfig(
            spec=record, tracking_uri=tracking_uri, run_id=run_id, displacement_scale=scale
        ).model_dump(mode="json"),
        torch_config=ray.train.torch.TorchConfig(backend=backend),
        scaling_config=_scaling(spec),
        run_config=run_config,
        datasets={"train": train_data},
    )
    typer.echo(
        f"training {spec.name!r}: {spec.train.epochs} epochs on {spec.scaling.workers} "
        f"worker(s), MLflow run {run_id}"
    )
    try:
        with _epoch_lines(tracking_uri, run_id, spec.train.epochs):
            result = trainer.fit()
    except Exception as exc:
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise TrainingError(f"training job {spec.name!r} failed: {exc}") from exc
    if result.checkpoint is None:
        tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise TrainingError(f"training job {spec.name!r} finished without a checkpoint")
    with (
        stage("testing on the test split and registering"),
        result.checkpoint.as_directory() as directory,
    ):
        model_dir = Path(directory) / MODEL_DIR
        try:
            model = load_checkpoint(model_dir).model
            test = _test_report(model, dataset, tracking_uri, run_id)
            tracking.log_metrics(tracking_uri, run_id, test, step=spec.train.epochs)
            version = registry.register(
                tracking_uri, run_id, model_dir, spec.mlflow.registered_model,
                {k.removeprefix("test_"): v for k, v in test.items()},
                EvaluationSet.of(dataset.manifest),
            )  # fmt: skip
        except Exception as exc:  # the run must not stay RUNNING: mark it, then report
            tracking.finish_run(tracking_uri, run_id, "FAILED")
            raise TrainingError(f"testing or registering job {spec.name!r} failed: {exc}") from exc
    tracking.finish_run(tracking_uri, run_id, "FINISHED")
    return TrainingOutcome(
        run_id=run_id,
        tracking_uri=tracking_uri,
        checkpoint=_uri(result.checkpoint),
        model=f"{_uri(result.checkpoint)}/{MODEL_DIR}",
        epochs=int(result.metrics.get("epoch", 0)),
        resumes=int(result.metrics.get("resumes", 0)),
        test_metrics=test,
        version=version,
    )


def _uri(checkpoint: ray.train.Checkpoint) -> str:
    # Ray keeps a checkpoint's path relative to its filesystem: a bucket/key on S3.
    scheme = "s3://" if checkpoint.filesystem.type_name == "s3" else ""
    return f"{scheme}{checkpoint.path}"


@contextmanager
def _epoch_lines(tracking_uri: str, run_id: str, epochs: int) -> Iterator[None]:
    """While the block runs, print a line for each epoch the workers log to MLflow."""
    seen = set(tracking.metric_steps(tracking_uri, run_id, "epoch"))  # before a resume
    stop = threading.Event()

    def watch() -> None:
        while True:
            stopping = stop.wait(EPOCH_POLL_SECONDS)
            try:
                done = set(tracking.metric_steps(tracking_uri, run_id, "epoch")) - seen
                for epoch in sorted(done):
                    metrics = tracking.metrics_at(tracking_uri, run_id, epoch, EPOCH_LINE)
                    typer.echo(_epoch_line(epoch, epochs, metrics))
                    seen.add(epoch)
            except MlflowException:
                pass  # a busy store (sqlite locked by a worker's write): the next look catches up
            if stopping:
                return

    watcher = threading.Thread(target=watch, name="epoch-lines", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _epoch_line(epoch: int, epochs: int, metrics: dict[str, float]) -> str:
    line = (
        f"epoch {epoch}/{epochs}: train loss {metrics['train_loss']:.4f}, "
        f"{metrics['train_frames_per_s']:.0f} frames/s"
    )
    if "val_lve" in metrics:
        line += f", val LVE {metrics['val_lve'] * 1e5:.3f}e-5"
    return line


def _test_report(
    model: AnimationModel, dataset: Dataset, tracking_uri: str, run_id: str
) -> dict[str, float]:
    """Test metrics of the trained model; its evaluation report (beside the static baseline)
    goes to the run's artifacts under ``report/``."""
    baseline = build_model("static", {}, dataset.topology, dataset.templates)
    with tempfile.TemporaryDirectory() as directory:
        results = write_report(
            dataset, {model.kind: model, "static template": baseline},
            Path(directory) / "report.html",
        )  # fmt: skip
        tracking.log_artifacts(tracking_uri, run_id, directory, "report")
    return {f"test_{k}": float(v) for k, v in results[0].scores.items()}
