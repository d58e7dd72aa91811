"""Preview rendering speed on CPU: frames/s at 512×512, alone and with H.264 + AAC encoding.

Usage: python bench/render.py [--seconds 10] [--vertices 3000] [--size 512 512] [--cores 1]
                              [--repeats 3] [--shading gouraud] [--face procedural]

The face is the procedural template at ``--vertices`` (about 5,700 triangles at 3,000 vertices)
animated by its jaw, lip and blink blendshapes, or with ``--face ict`` the ICT head (17,202
vertices, 34,332 triangles, whatever ``--vertices`` says) animated by its jawOpen, mouthFunnel,
mouthPucker, mouthSmile and eyeBlink shapes, for ``--seconds`` at 30 fps. The process is pinned
to ``--cores`` cores before anything runs, and ffmpeg, its child, inherits that, so ``--cores 1``
measures rendering and encoding sharing one core. Rows:

* render: ``Renderer.render`` alone, frame by frame, one grey, the whole mesh framed;
* preview: the same with the topology's regions: face colours and a close-up of lips and eyes;
* render + encode: ``write_animation`` to an MP4 with an audio track (rendering, x264 and AAC);
* comparison: ``write_comparison``, three panels (truth | prediction | error heatmap) per frame.

The last two use the regions, as ``mmtalker render`` does.

Each row is the median of ``--repeats`` runs, with the best run beside it: on a shared machine
other work slows some runs, and the best is the closest to what an idle core does. CPU seconds
(this process and ffmpeg together) are printed too. The real-time factor is video seconds made
per wall second at 30 fps. A benchmark: it never fails on its figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmtalker.data import motion
from mmtalker.data.face import FaceShape, make_chart, warp
from mmtalker.data.sequence import Topology
from mmtalker.io.render import RenderConfig, Renderer
from mmtalker.io.video import write_animation, write_comparison
from mmtalker.rig import face_regions, load_ict

FPS, SAMPLE_RATE = 30.0, 16000
ICT_SPEECH = ("jawOpen", "mouthFunnel", "mouthPucker", "mouthSmile_L", "mouthSmile_R")
ICT_BLINK = ("eyeBlink_L", "eyeBlink_R")


def talking_curves(seconds: float, channels: int, blinks: list[int]) -> np.ndarray:
    """(T, channels) weights in [0, 1] on slow sinusoids, the ``blinks`` channels every 3 s."""
    t = np.arange(round(seconds * FPS)) / FPS
    rates = np.linspace(1.3, 4.1, channels)
    curves = 0.5 + 0.5 * np.sin(2 * np.pi * rates * t[:, None])
    curves[:, blinks] = ((t % 3.0) < 0.15)[:, None]
    return curves


def demo_clip(num_vertices: int, seconds: float) -> tuple[np.ndarray, Topology]:
    """The procedural face talking-like: its speech blendshapes and blinks."""
    chart = make_chart(num_vertices)
    shape = FaceShape()
    neutral = warp(chart, shape)
    shapes = motion.blendshapes(chart, shape, neutral)
    curves = talking_curves(seconds, len(shapes), [motion.CHANNELS.index("blink")])
    return motion.animate(neutral, shapes, curves), chart.topology()


def ict_clip(seconds: float) -> tuple[np.ndarray, Topology]:
    """The ICT head talking-like; its regions are its parts and its face area's regions."""
    rig = load_ict()
    names = ICT_SPEECH + ICT_BLINK
    curves = talking_curves(seconds, len(names), [names.index(n) for n in ICT_BLINK])
    weights = np.zeros((len(curves), rig.num_shapes), dtype=np.float32)
    weights[:, [rig.shape_index(n) for n in names]] = curves
    weights[:, rig.shape_index("jawOpen")] *= 0.5
    parts = {name: part.vertices for name, part in rig.parts.items()}
    # The face part comes first, so its region indices are the head's.
    regions = {**parts, **face_regions(rig.subset("face"))}
    return rig.compose(weights), Topology(rig.faces, rig.num_vertices, regions)


def render_all(renderer: Renderer, vertices: np.ndarray) -> None:
    """Every frame rendered and dropped, as a video writer consumes them."""
    for frame in vertices:
        renderer.render(frame)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median and best wall seconds of ``repeats`` runs, and median CPU seconds."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = cpu_seconds(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), min(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--vertices", type=int, default=3000)
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("W", "H"))
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shading", choices=["gouraud", "flat"], default="gouraud")
    parser.add_argument("--face", choices=["procedural", "ict"], default="procedural")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[-args.cores :]
    os.sched_setaffinity(0, cores)

    if args.face == "ict":
        vertices, topology = ict_clip(args.seconds)
    else:
        vertices, topology = demo_clip(args.vertices, args.seconds)
    regions = topology.regions
    config = RenderConfig(width=args.size[0], height=args.size[1], shading=args.shading)
    renderer = Renderer(topology.faces, vertices[0], config)
    setup = time.perf_counter()
    preview = Renderer(topology.faces, vertices[0], config, regions=regions)
    setup = time.perf_counter() - setup
    t = np.arange(round(args.seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = ((0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), SAMPLE_RATE)
    prediction = vertices + np.float32(5e-4) * np.sin(np.arange(len(vertices)))[:, None, None]
    renderer.render(vertices[0])  # warm-up

    with tempfile.TemporaryDirectory() as scratch:
        video = Path(scratch) / "preview.mp4"
        runs = {
            "render": lambda: render_all(renderer, vertices),
            "preview": lambda: render_all(preview, vertices),
            "render + encode": lambda: write_animation(
                vertices, topology.faces, video, FPS, audio, config=config, regions=regions
            ),
            "comparison": lambda: write_comparison(
                vertices,
                prediction,
                topology.faces,
                video,
                FPS,
                audio,
                config=config,
                regions=regions,
            ),
        }
        results = {name: timed(run, args.repeats) for name, run in runs.items()}
        mib = video.stat().st_size / 2**20

    frames = len(vertices)
    print(
        f"{topology.num_vertices} vertices, {len(topology.faces)} triangles, {frames} frames "
        f"({args.seconds:g} s at {FPS:g} fps), {config.width}x{config.height}, {args.shading}, "
        f"pinned to {len(cores)} core(s), load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'':<16} {'fps':>7} {'best fps':>9} {'x real time':>12} {'CPU ms/frame':>13} "
        f"{'wall ms/frame':>14}"
    )
    for name, (wall, best, cpu) in results.items():
        print(
            f"{name:<16} {frames / wall:>7.1f} {frames / best:>9.1f} {frames / wall / FPS:>12.2f} "
            f"{1000 * cpu / frames:>13.1f} {1000 * wall / frames:>14.1f}"
        )
    print(f"comparison MP4: {mib:.2f} MiB for {args.seconds:g} s")
    print(f"preview set-up (face colours, close-up framing): {1000 * setup:.0f} ms")


if __name__ == "__main__":
    main()
