"""``mmtalker train`` and ``mmtalker evaluate``, and one-file animation: the single-process
model commands (the platform runs the same pieces on a Ray cluster).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import REPORTED, format_scores

if TYPE_CHECKING:
    from mmtalker.checkpoint import Checkpoint
    from mmtalker.data.shards import Dataset
    from mmtalker.inference import Face


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MMTalkerError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict) or not set(data) <= {"model", "train"}:
        raise MMTalkerError(f"{path} must be a mapping with optional 'model' and 'train' sections")
    return data


def train(
    data: Annotated[str, typer.Option(help="Dataset folder or s3:// URI.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    model: Annotated[str, typer.Option(help="mmtalker or faceformer.")] = "mmtalker",
    config: Annotated[
        Path | None, typer.Option(help="YAML with 'model' and 'train' sections.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (overrides the config).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per batch.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Train a model on a dataset in this process and write a checkpoint."""
    from tqdm import tqdm

    from mmtalker.checkpoint import MODELS, save_checkpoint
    from mmtalker.data.shards import open_dataset
    from mmtalker.training import TrainConfig, evaluate, fit, model_for_dataset, training_templates

    if model not in MODELS or model == "static":
        raise MMTalkerError(f"--model must be mmtalker or faceformer, got {model!r}")
    settings = _read_config(config)
    overrides = {
        k: v
        for k, v in dict(
            epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            time_budget_s=time_budget, device=device,
        ).items()
        if v is not None
    }  # fmt: skip
    train_config = TrainConfig.model_validate({**settings.get("train", {}), **overrides})
    dataset = open_dataset(data)
    network = model_for_dataset(model, settings.get("model", {}), dataset, train_config.losses)
    train_templates = training_templates(dataset)
    bar = tqdm(desc=f"train {model}", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int, logs: dict[str, float]) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")

    started = time.perf_counter()
    with bar:
        history = fit(network, dataset, train_config, progress)
    elapsed = time.perf_counter() - started
    test = None
    if "test" in dataset.manifest.splits:
        device = next(network.parameters()).device
        test = evaluate(network, dataset.sequences("test"), dataset.templates, device).as_dict()
    save_checkpoint(
        out, network, train_templates, dataset.manifest.fps, dataset.manifest.sample_rate,
        {"dataset": data, "train": train_config.model_dump(), "history": history, "test": test,
         "seconds": elapsed},
    )  # fmt: skip
    last = history[-1]
    typer.echo(f"trained {model} for {last['steps']} steps in {elapsed:.0f} s -> {out}")
    if test is not None:
        typer.echo("test  " + format_scores(test))


def evaluate_command(
    data: Annotated[str, typer.Option(help="Dataset folder or s3:// URI.")],
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="Checkpoint folder (repeatable).")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="Add the static-template baseline.")] = False,
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON.")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Also write an HTML report: heatmaps, per speaker, preview videos."),
    ] = None,
    previews: Annotated[int, typer.Option(help="Preview videos per model in the report.")] = 1,
) -> None:
    """Score checkpoints (and baselines) on a split: LVE, EVE, MVE, FDD side by side."""
    from mmtalker.checkpoint import build_model
    from mmtalker.data.shards import open_dataset
    from mmtalker.training import evaluate

    dataset = open_dataset(data)
    if split not in dataset.manifest.splits:
        raise MMTalkerError(
            f"{data} has no split {split!r}; it has {sorted(dataset.manifest.splits)}"
        )
    models = []
    if baselines:
        models.append(
            ("static template", build_model("static", {}, dataset.topology, dataset.templates))
        )
    for folder in checkpoint or []:
        loaded = load_for_dataset(folder, dataset)
        models.append((f"{loaded.model.kind} ({folder.name})", loaded.model))
    if not models:
        raise MMTalkerError("nothing to evaluate: give --checkpoint DIR and/or --baselines")
    if report is not None:
        from mmtalker.eval.report import write_report

        results = write_report(dataset, dict(models), report, split=split, previews=previews)
        rows = {result.name: result.scores for result in results}
    else:
        rows = {
            name: evaluate(network, dataset.sequences(split), dataset.templates).as_dict()
            for name, network in models
        }
    width = max(len(n) for n in rows) + 2
    speakers = ", ".join(dataset.manifest.splits[split].speakers)
    typer.echo(f"{split} split of {data} (speakers {speakers}); vertices in metres")
    typer.echo("model".ljust(width) + "".join(label.rjust(13) for label, _ in REPORTED.values()))
    for name, scores in rows.items():
        typer.echo(
            name.ljust(width) + "".join(f"{scores[k] * f:13.3f}" for k, (_, f) in REPORTED.items())
        )
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2))
    if report is not None:
        typer.echo(f"report: {report} (images and videos in {report.stem}_files/)")


def load_for_dataset(folder: Path, dataset: Dataset) -> Checkpoint:
    """A checkpoint, refused unless it was trained on the dataset's topology."""
    from mmtalker.checkpoint import load_checkpoint

    loaded = load_checkpoint(folder)
    if loaded.topology.id != dataset.topology.id:
        raise MMTalkerError(f"{folder} was trained on another topology than {dataset.uri}")
    return loaded


def animate_file(
    checkpoint: Checkpoint,
    audio: Path,
    out: Path,
    *,
    face: Face | None = None,
    formats: set[str] | None = None,
    chunk_seconds: float = 20.0,
    device: str = "cpu",
) -> str:
    """Animate one audio file; write ``OUT.npz`` (+ ``.glb``, ``_obj/``, ``_arkit.csv/.json``);
    return a summary line. ``face`` defaults to the first training speaker's."""
    from mmtalker.inference import animate_face, load_audio, resolve_face
    from mmtalker.io.export import write_outputs

    samples, rate = load_audio(audio)
    started = time.perf_counter()
    animation = animate_face(
        samples, face or resolve_face(checkpoint), checkpoint, sample_rate=rate,
        chunk_seconds=chunk_seconds, device=device,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    base = out.with_suffix("") if out.suffix in (".npz", ".glb") else out
    uris = write_outputs(
        animation.vertices, checkpoint.fps, animation.topology, base, formats or {"npz"},
        rig=animation.rig,
    )  # fmt: skip
    seconds = len(samples) / rate
    frames, vertices = animation.vertices.shape[:2]
    return (
        f"wrote {', '.join(uris.values())}: {frames} frames x {vertices} vertices for "
        f"{seconds:.1f} s of audio in {elapsed:.2f} s ({seconds / max(elapsed, 1e-9):.0f}x real "
        "time)"
    )
