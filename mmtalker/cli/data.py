"""Command-line interface of the model library: ``mmtalker data ...``.

The platform composes these commands into the full ``mmtalker`` command; :func:`run` is the
boundary that turns every expected error into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from tqdm import tqdm

from mmtalker.errors import MMTalkerError

data_app = typer.Typer(help="Make, convert and inspect datasets.", no_args_is_help=True)


def _progress_bar(description: str) -> tuple[tqdm, Callable[[int, int], None]]:
    bar = tqdm(desc=description, unit="seq", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


@data_app.command("synth")
def synth(
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output dataset: a folder or s3:// URI.")
    ] = "",
    tiny: Annotated[bool, typer.Option("--tiny", help="Seconds-sized corpus for tests.")] = False,
    size: Annotated[str, typer.Option(help="Preset size: tiny, demo or bench.")] = "demo",
    speakers: Annotated[int | None, typer.Option(help="Number of speakers.")] = None,
    sentences_per_speaker: Annotated[
        int | None, typer.Option(help="Sentences per speaker.")
    ] = None,
    vertices: Annotated[
        int | None, typer.Option(help="Face mesh vertex count (500–60000).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Random seed; the corpus is a pure function of it.")
    ] = 0,
    text: Annotated[
        Path | None, typer.Option(help="Sentences, one per line (default: built-in).")
    ] = None,
    face: Annotated[
        str | None,
        typer.Option(
            help="ict (the ICT human head driven through ARKit shapes; demo and bench default) "
            "or procedural (a parametric mannequin; tiny default)."
        ),
    ] = None,
    voice_mix: Annotated[
        float | None,
        typer.Option(help="Share of training sentences spoken by another espeak-ng voice."),
    ] = None,
    engine_share: Annotated[
        float | None,
        typer.Option(
            help="Share of training sentences spoken by another engine (--engine-voices)."
        ),
    ] = None,
    engine_voices: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated voices of those engines (default flite:awb,flite:rms; "
            "festival:ked also works)."
        ),
    ] = None,
    extra_train_speakers: Annotated[
        int | None,
        typer.Option(help="Training speakers added without changing the val and test ones."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")] = False,
) -> None:
    """Synthesise a speech-motion corpus: espeak-ng (and Flite) speech, phoneme-timed faces."""
    from mmtalker.data.synth import SynthConfig, synthesize_corpus

    chosen = "tiny" if tiny else size
    if chosen not in ("tiny", "demo", "bench"):
        raise typer.BadParameter(f"{chosen!r} is not one of tiny, demo, bench", param_hint="--size")
    if face not in (None, "ict", "procedural"):
        raise typer.BadParameter(f"{face!r} is not one of ict, procedural", param_hint="--face")
    overrides = {
        key: value
        for key, value in dict(
            speakers=speakers,
            sentences_per_speaker=sentences_per_speaker,
            num_vertices=vertices,
            text_file=str(text) if text else None,
            face=face,
            voice_mix=voice_mix,
            engine_share=engine_share,
            engine_voices=engine_voices.split(",") if engine_voices else None,
            extra_train_speakers=extra_train_speakers,
        ).items()
        if value is not None
    }
    config = SynthConfig.preset(chosen, seed=seed, **overrides)  # type: ignore[arg-type]
    target = out or f"work/datasets/synthetic-{chosen}"
    started = time.perf_counter()
    bar, update = _progress_bar(f"synth {chosen}")
    with bar:
        manifest = synthesize_corpus(config, target, overwrite=overwrite, progress=update)
    elapsed = time.perf_counter() - started
    typer.echo(
        f"wrote {target}: {manifest.num_sequences} sequences, "
        f"{manifest.audio_seconds / 60:.1f} min of audio in {elapsed:.1f} s"
    )
    _print_info(target)


@data_app.command("prepare")
def prepare(
    root: Annotated[Path, typer.Argument(help="Corpus folder (VOCASET, BIWI or own data).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output dataset: folder or s3:// URI.")],
    layout: Annotated[
        str | None, typer.Option(help="vocaset, biwi or folder (default: guess).")
    ] = None,
    topology: Annotated[
        Path | None, typer.Option(help="Mesh file (OBJ/PLY) giving the faces.")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option(help="JSON file {region: [vertex indices]}.")
    ] = None,
    fps: Annotated[
        float | None, typer.Option(help="Mesh frame rate (own data; default 30).")
    ] = None,
    val_speakers: Annotated[
        str, typer.Option(help="Comma-separated val speakers (own data).")
    ] = "",
    test_speakers: Annotated[
        str, typer.Option(help="Comma-separated test speakers (own data).")
    ] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at --out.")] = False,
) -> None:
    """Convert a VOCASET, BIWI or own-data folder into shards."""
    from mmtalker.data.layouts import PrepareOptions, detect_layout, prepare_dataset

    options = PrepareOptions(
        layout=layout or detect_layout(root),
        topology=str(topology) if topology else None,
        masks=str(masks) if masks else None,
        fps=fps,
        val_speakers=[s for s in val_speakers.split(",") if s],
        test_speakers=[s for s in test_speakers.split(",") if s],
    )
    bar, update = _progress_bar(f"prepare {options.layout}")
    with bar:
        report = prepare_dataset(root, out, options, overwrite=overwrite, progress=update)
    for item, reason in report.skipped:
        typer.echo(f"skipped {item}: {reason}", err=True)
    typer.echo(
        f"wrote {out}: {report.manifest.num_sequences} sequences, {len(report.skipped)} skipped"
    )
    _print_info(out)


@data_app.command("clips")
def clips(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder or s3:// prefix to write.")],
    count: Annotated[int, typer.Option(help="Number of clips.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed; clip i depends only on it.")] = 0,
    containers: Annotated[
        str, typer.Option(help="Comma-separated containers to cycle: wav, flac, ogg.")
    ] = "wav,flac,ogg",
) -> None:
    """Write spoken sentences (espeak-ng) to animate: mixed rates, channels and formats."""
    from mmtalker.data.clips import write_speech_clips

    bar, update = _progress_bar("clips")
    with bar:
        uris = write_speech_clips(
            out, count, seed=seed, containers=tuple(c for c in containers.split(",") if c),
            progress=update,
        )  # fmt: skip
    typer.echo(f"wrote {len(uris)} clips under {out}")


@data_app.command("info")
def info(
    uri: Annotated[str, typer.Argument(help="Dataset folder or s3:// URI.")],
    verify: Annotated[bool, typer.Option(help="Check every shard's checksum.")] = False,
) -> None:
    """Print speakers, hours, frames, vertex count and splits of a dataset."""
    _print_info(uri, verify=verify)


def _print_info(uri: str, verify: bool = False) -> None:
    from mmtalker.data.shards import open_dataset

    dataset = open_dataset(uri)
    if verify:
        dataset.verify()
    m = dataset.manifest
    topo = m.topology
    regions = ", ".join(f"{k} {v}" for k, v in topo.regions.items())
    lines = [
        f"dataset   {m.name}  ({m.source}, schema {m.schema_version}, {m.created_by})",
        f"location  {uri}",
        f"audio     {m.audio_seconds / 3600:.3f} h  ({m.sample_rate} Hz)",
        f"frames    {m.num_frames}  at {m.fps:g} fps",
        f"mesh      {topo.num_vertices} vertices, {topo.num_faces} faces, topology {topo.id}",
        f"regions   {regions}; UV chart: {'yes' if topo.has_uv else 'no'}",
        f"speakers  {len(m.speakers)}: {', '.join(m.speakers)}",
        f"per frame {len(m.control_names)} rig controls, {len(m.phone_names)} phone classes",
        f"shards    {len(m.shards)} ({sum(s.bytes for s in m.shards) / 2**20:.1f} MiB)"
        + ("; checksums verified" if verify else ""),
        f"{'split':<6} {'speakers':>8} {'sentences':>9} {'sequences':>9} {'minutes':>8} "
        f"{'frames':>8}",
    ]
    for name, split in m.splits.items():
        lines.append(
            f"{name:<6} {len(split.speakers):>8} {len(split.sentences):>9} "
            f"{split.num_sequences:>9} {split.audio_seconds / 60:>8.2f} {split.num_frames:>8}"
        )
    typer.echo("\n".join(lines))


def run(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a CLI app; expected errors become one ``error: ...`` line on stderr and exit status 1
    (2 for a command line that does not parse)."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as exc:
        # Usage errors (an unknown option, a missing or malformed value) come from the click that
        # typer vendors, whose classes are private: read them by what they carry.
        message = getattr(exc, "format_message", exc.__str__)()
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "mmtalker"
        typer.echo(f"error: {message} (see {command} --help)", err=True)
        return int(getattr(exc, "exit_code", 2))
    except (MMTalkerError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or exc.title
        typer.echo(f"error: invalid {where}: {first['msg']}", err=True)
        return 1
    return code if isinstance(code, int) else 0
