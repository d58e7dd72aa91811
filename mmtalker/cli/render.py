"""``mmtalker render``: preview videos of animations, or of a model against the ground truth."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from mmtalker.errors import MMTalkerError

if TYPE_CHECKING:
    from mmtalker.io.render import RenderConfig


def render_command(
    animation: Annotated[
        Path | None, typer.Argument(help="An animation .npz (what mmtalker animate writes).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The .mp4 to write.")] = Path(
        "preview.mp4"
    ),
    audio: Annotated[
        Path | None, typer.Option(help="Speech for the sound track (the animated audio).")
    ] = None,
    compare: Annotated[
        bool, typer.Option(help="Ground truth | prediction | error of a dataset sequence.")
    ] = False,
    data: Annotated[str | None, typer.Option(help="With --compare: dataset URI.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="With --compare: the model's checkpoint folder.")
    ] = None,
    sequence: Annotated[
        str | None, typer.Option(help="With --compare: sequence id (default: the split's first).")
    ] = None,
    split: Annotated[str, typer.Option(help="With --compare: split to take it from.")] = "test",
    width: Annotated[int, typer.Option(help="Frame width in pixels (per panel).")] = 512,
    height: Annotated[int, typer.Option(help="Frame height in pixels.")] = 512,
    yaw: Annotated[
        float | None,
        typer.Option(help="Turn the face left/right, degrees (default 0; 15 in a face close-up)."),
    ] = None,
    pitch: Annotated[
        float | None,
        typer.Option(help="Tilt the face up/down, degrees (default 0; -5 in a face close-up)."),
    ] = None,
    shading: Annotated[
        Literal["gouraud", "flat"], typer.Option(help="Smooth or flat shading.")
    ] = "gouraud",
    still: Annotated[
        Path | None, typer.Option(help="Also save the middle frame as this PNG.")
    ] = None,
) -> None:
    """Render a preview MP4 (H.264, with the audio) on the CPU: no GPU or display needed."""
    from mmtalker.io.render import RenderConfig

    config = RenderConfig(width=width, height=height, yaw=yaw, pitch=pitch, shading=shading)
    started = time.perf_counter()
    if compare:
        if animation is not None or data is None or checkpoint is None:
            raise MMTalkerError("--compare takes --data and --checkpoint, and no ANIMATION")
        frames = _compare(data, checkpoint, sequence, split, out, config, still)
    elif animation is None:
        raise MMTalkerError("give an ANIMATION .npz, or --compare --data D --checkpoint C")
    else:
        frames = _render(animation, audio, out, config, still)
    elapsed = time.perf_counter() - started
    typer.echo(
        f"wrote {out}: {frames} frames in {elapsed:.1f} s "
        f"({frames / max(elapsed, 1e-9):.0f} frames/s)" + (f"; still {still}" if still else "")
    )


def _render(
    animation: Path, audio: Path | None, out: Path, config: RenderConfig, still: Path | None
) -> int:
    from mmtalker.io.export import read_npz
    from mmtalker.io.render import Renderer, save_png
    from mmtalker.io.video import write_animation
    from mmtalker.rig import load_ict
    from mmtalker.rig.head import head_regions, head_topology

    clip = read_npz(animation)
    head = load_ict()
    # Whole-head animations (of ICT models) are painted by part: skin, lips, mouth, eyes.
    regions = head_regions(head) if clip.topology_id == head_topology(head).id else None
    frames = write_animation(
        clip.vertices, clip.faces, out, clip.fps, audio, config=config, regions=regions
    )
    if still is not None:
        renderer = Renderer(clip.faces, clip.vertices[0], config, regions=regions)
        save_png(renderer.render(clip.vertices[len(clip.vertices) // 2]), still)
    return frames


def _compare(
    data: str,
    checkpoint: Path,
    sequence: str | None,
    split: str,
    out: Path,
    config: RenderConfig,
    still: Path | None,
) -> int:
    from mmtalker.cli.model import load_for_dataset
    from mmtalker.data.shards import open_dataset
    from mmtalker.io.render import comparison_still, save_png
    from mmtalker.io.video import write_comparison
    from mmtalker.training import predictions

    dataset = open_dataset(data)
    # Dataset.sequences refuses an unknown split.
    chosen = next((s for s in dataset.sequences(split) if sequence in (None, s.sequence_id)), None)
    if chosen is None:
        raise MMTalkerError(f"no sequence {sequence!r} in the {split} split of {data}")
    loaded = load_for_dataset(checkpoint, dataset)
    _, _, predicted = next(predictions(loaded.model, [chosen], dataset.templates))
    truth, faces, regions = chosen.vertices, dataset.topology.faces, dataset.topology.regions
    frames = write_comparison(
        truth, predicted, faces, out, chosen.fps, (chosen.audio, chosen.sample_rate),
        config=config, regions=regions,
    )  # fmt: skip
    if still is not None:
        save_png(comparison_still(truth, predicted, faces, config, regions=regions), still)
    typer.echo(f"sequence {chosen.sequence_id} of speaker {chosen.speaker}")
    return frames
