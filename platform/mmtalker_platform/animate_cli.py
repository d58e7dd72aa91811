"""``mmtalker animate``: one audio file in this process, or a whole catalog as a Ray Data job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmtalker.errors import MMTalkerError
from mmtalker.io.export import FORMATS

if TYPE_CHECKING:
    # Imported where used: the spec pulls in torch and torch-geometric (~8 s), which every
    # `mmtalker` invocation, --help included, would otherwise pay for.
    from mmtalker_platform.spec import AnimateJobSpec


def _formats(text: str) -> list[str]:
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(chosen) - set(FORMATS))
    if unknown:
        raise MMTalkerError(f"--formats {unknown} unknown; choose from {', '.join(FORMATS)}")
    return chosen


def animate_command(
    audio: Annotated[
        Path | None, typer.Argument(help="One speech file (wav, flac, ogg, mp3); or --catalog.")
    ] = None,
    catalog: Annotated[
        str | None,
        typer.Option(help="Folder or s3:// prefix of audio files, or a .csv/.parquet manifest."),
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="With --catalog: folder or s3:// prefix for the outputs.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="With AUDIO: output path; .npz (and .glb, _obj/, _arkit.csv) added."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Registered model: NAME@ALIAS, NAME/VERSION or NAME (latest)."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A checkpoint folder instead of --model.")
    ] = None,
    formats: Annotated[
        str,
        typer.Option(
            help="Outputs besides npz (comma list): glb, obj, arkit (ARKit-52 curves as a Live "
            "Link Face CSV and JSON; models of the ICT head, whose glb is then rigged)."
        ),
    ] = "npz",
    speaker: Annotated[
        str | None, typer.Option(help="Training speaker whose face to animate.")
    ] = None,
    template: Annotated[
        Path | None,
        typer.Option(
            help="With AUDIO: a neutral head to animate instead (OBJ/PLY/NPY; the model's mesh "
            "or, for ICT models, the whole ICT head); catalogs: a manifest template column."
        ),
    ] = None,
    identity: Annotated[
        int | None,
        typer.Option(help="With AUDIO and an ICT model: animate a random ICT person (a seed)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="With --catalog: redo items earlier runs finished.")
    ] = False,
    actors: Annotated[int, typer.Option(help="With --catalog: model actors.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Clips per model call.")] = 16,
    max_seconds: Annotated[float, typer.Option(help="Longer items fail.")] = 600.0,
    chunk_seconds: Annotated[float, typer.Option(help="Audio per chunk (bounds memory).")] = 20.0,
    gpu: Annotated[
        bool | None, typer.Option(help="Animate on CUDA GPUs (default: when the cluster has any).")
    ] = None,
    name: Annotated[str, typer.Option(help="With --catalog: the job's name.")] = "animate",
    allow: Annotated[
        list[str] | None,
        typer.Option(
            help="With --catalog: a location (s3:// prefix or absolute path) the job may read "
            "and write, manifest rows included; repeatable. Default: anywhere."
        ),
    ] = None,
) -> None:
    """Animate speech: one file here, or every item of a catalog on the Ray cluster."""
    chosen = _formats(formats)
    if catalog is None:
        if audio is None or out is None:
            raise MMTalkerError("give AUDIO and --out for one file, or --catalog and --output")
        face = {"speaker": speaker, "template": template, "identity": identity}
        _animate_one(audio, out, model, checkpoint, chosen, face, chunk_seconds, gpu)
        return
    if audio is not None or output is None:
        raise MMTalkerError("--catalog needs --output and no AUDIO argument")
    if template is not None or identity is not None:
        raise MMTalkerError(
            "--template and --identity animate one file; give a catalog's faces in its "
            "manifest's template column"
        )
    from mmtalker_platform.spec import AnimateJobSpec

    fields = {
        "name": name, "catalog": catalog, "output": output, "formats": chosen,
        "speaker": speaker, "overwrite": overwrite, "actors": actors, "batch_size": batch_size,
        "max_seconds": max_seconds, "chunk_seconds": chunk_seconds, "use_gpu": gpu,
        "allowed_prefixes": allow or [],
    }  # fmt: skip
    if checkpoint is not None:
        fields["checkpoint"] = str(checkpoint.resolve())
    if model is not None:
        fields["model"] = model
    run_batch(AnimateJobSpec.model_validate(fields))


def run_batch(spec: AnimateJobSpec) -> None:
    """Run an animation job spec here, with a progress bar; print counts and the manifest."""
    from tqdm import tqdm

    from mmtalker_platform.batch import run_animation

    bar = tqdm(desc=f"animate {spec.name}", unit="item", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int | None) -> None:
        # The catalog is streamed: its size is known once every item is listed.
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        outcome = run_animation(spec, progress=progress)
    typer.echo(
        f"{outcome.total} items with {outcome.model}: {outcome.animated} animated, "
        f"{outcome.skipped} skipped (done before), {outcome.failed} failed; "
        f"{outcome.audio_seconds:.0f} s of audio in {outcome.seconds:.0f} s"
    )
    for fmt, uri in outcome.example_outputs.items():
        typer.echo(f"{fmt:<4} e.g. {uri}")
    typer.echo(
        f"results manifest (one row per item; Parquet parts read as one table): "
        f"{outcome.manifest_uri}"
    )


def _animate_one(
    audio: Path,
    out: Path,
    model: str | None,
    checkpoint: Path | None,
    formats: list[str],
    face: dict[str, Any],
    chunk_seconds: float,
    gpu: bool | None,
) -> None:
    from mmtalker.checkpoint import load_checkpoint
    from mmtalker.cli.model import animate_file
    from mmtalker.inference import resolve_face

    if (model is None) == (checkpoint is None):
        raise MMTalkerError("give --model NAME@ALIAS or --checkpoint DIR (one of them)")
    import torch

    device = "cuda" if (torch.cuda.is_available() if gpu is None else gpu) else "cpu"
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint, device)
    else:
        from mmtalker_platform.registry import load

        loaded = load(model or "", device=device)
    line = animate_file(
        loaded, audio, out, face=resolve_face(loaded, **face), formats={"npz", *formats},
        chunk_seconds=chunk_seconds, device=device,
    )  # fmt: skip
    typer.echo(line)
