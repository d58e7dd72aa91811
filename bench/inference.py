"""Inference speed and memory on CPU: seconds of speech animated per wall second (x real time).

Usage: python bench/inference.py [--quick] [--seconds 60] [--faceformer-seconds 10]
                                 [--repeats 3] [--memory-minutes 10] [--threads N] [--json PATH]

Every figure goes through ``mmtalker.inference.animate`` (chunked, cross-faded, output arrays
included) on espeak-ng speech: one long utterance of sentences from the built-in list. Models are
untrained with the config training gives a new model on a corpus with phone labels (phone
readout and posteriors, register normalisation, MMTalker's Laplacian eigenfunctions; speed does
not depend on the weights) on procedural faces of about 5k and 20k vertices with their UV charts:

* MMTalker, light speech encoder (log-mel + dilated convolutions);
* MMTalker, a wav2vec2 *base-size* encoder (hidden 768, 12 layers, 12 heads, intermediate 3072,
  default convolutional feature extractor) with RANDOM weights, built with transformers and
  saved to a temporary folder: the speed of a real wav2vec2-base, not its features;
* the FaceFormer-style baseline (autoregressive, at most ``max_frames`` = 20 s at 30 fps), on a
  shorter clip (``--faceformer-seconds``); its cost grows faster than linearly with the length,
  so a short clip flatters it. MMTalker light is also timed on that same clip;
* multiresolution: MMTalker light built on the ~5k face, animating the points of that face's
  4x subdivision (one midpoint split: 4x the triangles, ~4x the points) instead of its
  vertices; the points' neutral positions are found from their UVs with ``locate_uv``.

Each case is warmed up once, then the median of ``--repeats`` timed runs is reported (one run for
the pretrained encoder, which is slow). Peak memory is the RSS high-water mark (VmHWM) of a fresh
subprocess that builds MMTalker light at ~5k vertices and animates a ``--memory-minutes`` clip,
its (T, V, 3) float32 output included; the mark before ``animate`` is shown too.

Wall time is the figure; CPU seconds of the process are printed beside it because on a shared
machine other work inflates wall time, badly so with several threads (each op waits for its
slowest thread): there, ``--threads 1`` gives steadier figures.

The project's speed targets refer to: MMTalker light at ~5k vertices >= 200x real time (on the
long clip); MMTalker light >= 20x the real-time factor of FaceFormer at ~5k vertices; a 10-minute
clip within 2 GB peak RSS (MMTalker light, ~5k vertices). ``--quick`` shortens every clip for a
smoke run; its figures are not the targets' figures. A benchmark: it never fails on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtalker.checkpoint import build_model
from mmtalker.data.espeak import EspeakSynthesizer
from mmtalker.data.face import make_template
from mmtalker.data.sequence import Topology
from mmtalker.data.synth import load_sentences
from mmtalker.data.visemes import PHONES
from mmtalker.geometry.uv import attach_uv, barycentric_interpolate, locate_uv, subdivide
from mmtalker.inference import animate
from mmtalker.nn.base import AnimationModel
from mmtalker.nn.mmtalker import PointSet
from mmtalker.training import new_model_config

SAMPLE_RATE = 16000
FPS = 30.0
#: wav2vec2-base's transformer; everything else (feature extractor) stays at the defaults.
BASE_SIZE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
SPEAKER = "face"


@dataclass
class Face:
    """A procedural neutral face with its UV chart."""

    vertices: np.ndarray
    topology: Topology


@dataclass
class Row:
    """One timed case."""

    model: str
    encoder: str
    points: int
    audio_s: float
    wall_s: float
    cpu_s: float
    runs: int
    parameters: int

    @property
    def rtf(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def cpu_rtf(self) -> float:
        return self.audio_s / self.cpu_s


def speech(seconds: float) -> np.ndarray:
    """One espeak-ng utterance of concatenated sentences, cut to ``seconds`` (16 kHz float32)."""
    sentences = load_sentences()
    tts = EspeakSynthesizer(sample_rate=SAMPLE_RATE)
    count = max(1, math.ceil(seconds / 2.5))
    while True:
        text = " ".join(sentences[i % len(sentences)] for i in range(count))
        audio = tts.synthesize(text).audio
        if len(audio) >= seconds * SAMPLE_RATE:
            return np.ascontiguousarray(audio[: round(seconds * SAMPLE_RATE)], dtype=np.float32)
        count = math.ceil(count * seconds * SAMPLE_RATE / len(audio) * 1.1) + 1


def make_face(num_vertices: int) -> Face:
    template = make_template(num_vertices)
    return Face(template.vertices, attach_uv(template.topology, template.vertices))


def make_model(kind: str, face: Face, speech_path: str | None = None) -> AnimationModel:
    """An untrained model of ``kind`` with the config training gives a new model on a corpus with
    phone labels (pretrained encoder if a path)."""
    pretrained = {"kind": "pretrained", "path": speech_path} if speech_path is not None else {}
    config = new_model_config(kind, {"speech": pretrained}, list(PHONES))
    return build_model(kind, config, face.topology, {SPEAKER: face.vertices}).eval()


def save_base_wav2vec2(directory: str) -> str:
    """A wav2vec2 base-size model with random weights, saved where the encoder can load it."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    Wav2Vec2Model(Wav2Vec2Config(**BASE_SIZE)).save_pretrained(directory)
    return directory


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_animate(
    model: AnimationModel, audio: np.ndarray, face: Face, repeats: int,
    points: PointSet | None = None,
) -> tuple[float, float, int]:  # fmt: skip
    """Median wall and process CPU seconds of ``animate`` after one warm-up run; points animated.

    CPU seconds are summed over the process's threads (idle-spinning ones included).
    """
    out = animate(audio, face.vertices, model, sample_rate=SAMPLE_RATE, fps=FPS, points=points)
    count = out.shape[1]
    del out
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu = time.perf_counter(), time.process_time()
        animate(audio, face.vertices, model, sample_rate=SAMPLE_RATE, fps=FPS, points=points)
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), count


def subdivided_points(face: Face) -> tuple[PointSet, float]:
    """The 4x subdivided face as a point set; neutral positions located through the UV chart.

    Returns the points and the largest distance (m) between the positions found from the UVs and
    the subdivision's own positions (midpoints lie on the triangles, so it is rounding only).
    """
    uv = face.topology.uv
    assert uv is not None
    faces = face.topology.faces
    positions, _, sub_uv = subdivide(face.vertices, faces, uv, iterations=1)
    face_index, bary = locate_uv(uv, faces, sub_uv)
    neutral = barycentric_interpolate(face.vertices, faces, face_index, bary).astype(np.float32)
    gap = float(np.linalg.norm(neutral - positions, axis=1).max())
    points = PointSet(
        uv=torch.from_numpy(np.ascontiguousarray(sub_uv, dtype=np.float32)),
        neutral=torch.from_numpy(neutral)[None],
        surface=(torch.from_numpy(face_index), torch.from_numpy(bary)),
    )
    return points, gap


def high_water_mark_kib() -> int:
    """Peak resident set size of this process so far, KiB (VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory_child(audio_path: str, num_vertices: int) -> None:
    """Run in a fresh process: animate the clip with MMTalker light, print peak RSS as JSON."""
    face = make_face(num_vertices)
    model = make_model("mmtalker", face)
    audio = np.load(audio_path)
    before = high_water_mark_kib()
    started = time.perf_counter()
    out = animate(audio, face.vertices, model, sample_rate=SAMPLE_RATE, fps=FPS)
    wall = time.perf_counter() - started
    after = high_water_mark_kib()
    report = {
        "vertices": int(out.shape[1]),
        "frames": int(out.shape[0]),
        "audio_s": len(audio) / SAMPLE_RATE,
        "wall_s": wall,
        "output_mib": out.nbytes / 2**20,
        "hwm_before_mib": before / 1024,
        "hwm_mib": after / 1024,
    }
    print(json.dumps(report))


def measure_memory(audio: np.ndarray, num_vertices: int, threads: int) -> dict[str, Any] | None:
    """Peak RSS of animating ``audio`` in a fresh subprocess; None (with its error) if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audio.npy")
        np.save(path, audio)
        command = [
            sys.executable, __file__, "--memory-child", path,
            "--memory-vertices", str(num_vertices), "--threads", str(threads),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"memory run failed ({result.returncode}):\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short clips, one run: smoke test")
    parser.add_argument("--seconds", type=float, default=60.0, help="clip for MMTalker")
    parser.add_argument("--faceformer-seconds", type=float, default=10.0)
    parser.add_argument("--memory-minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vertices", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-vertices", type=int, default=5000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.memory_vertices)
        return
    if args.quick:
        args.seconds, args.faceformer_seconds = 15.0, 5.0
        args.memory_minutes, args.repeats = 1.0, 1

    load = os.getloadavg()[0]
    memory_seconds = args.memory_minutes * 60
    started = time.perf_counter()
    long_audio = speech(max(args.seconds, args.faceformer_seconds, memory_seconds))
    print(
        f"espeak-ng: {len(long_audio) / SAMPLE_RATE:.0f} s of speech in "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    audio = long_audio[: round(args.seconds * SAMPLE_RATE)]
    short = long_audio[: round(args.faceformer_seconds * SAMPLE_RATE)]
    rows: list[Row] = []
    subdivision_gap = float("nan")

    def run(
        name: str, encoder: str, model: AnimationModel, clip: np.ndarray, face: Face,
        repeats: int, points: PointSet | None = None,
    ) -> None:  # fmt: skip
        print(f"timing {name} ({encoder}) ...", file=sys.stderr, flush=True)
        wall, cpu, count = time_animate(model, clip, face, repeats, points)
        rows.append(
            Row(name, encoder, count, len(clip) / SAMPLE_RATE, wall, cpu, repeats,
                parameter_count(model))
        )  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        print("building a random base-size wav2vec2 ...", file=sys.stderr, flush=True)
        base = save_base_wav2vec2(tmp)
        for n in args.vertices:
            face = make_face(n)
            light = make_model("mmtalker", face)
            run("MMTalker", "light", light, audio, face, args.repeats)
            run("MMTalker", "light", light, short, face, args.repeats)
            if n == args.vertices[0]:
                points, subdivision_gap = subdivided_points(face)
                run("MMTalker 4x subdiv.", "light", light, audio, face, args.repeats, points)
            del light
            pretrained = make_model("mmtalker", face, base)
            run("MMTalker", "w2v2-base*", pretrained, audio, face, 1)
            del pretrained
            faceformer = make_model("faceformer", face)
            run("FaceFormer", "light", faceformer, short, face, args.repeats)
            del faceformer

    print("measuring peak memory in a fresh process ...", file=sys.stderr, flush=True)
    memory = measure_memory(long_audio[: round(memory_seconds * SAMPLE_RATE)], 5000, args.threads)

    print(
        f"{args.threads} CPU threads ({len(os.sched_getaffinity(0))} cores), torch "
        f"{torch.__version__}; load average at start {load:.1f} (other work on the machine "
        "slows every figure)"
    )
    print(
        f"{'model':<20} {'encoder':<11} {'points':>7} {'audio s':>8} {'wall s':>8} "
        f"{'x realtime':>10} {'cpu s':>8} {'x per cpu':>9} {'runs':>4} {'params':>12}"
    )
    for r in rows:
        print(
            f"{r.model:<20} {r.encoder:<11} {r.points:>7} {r.audio_s:>8.1f} {r.wall_s:>8.3f} "
            f"{r.rtf:>10.1f} {r.cpu_s:>8.3f} {r.cpu_rtf:>9.1f} {r.runs:>4} {r.parameters:>12,}"
        )
    print(
        "x realtime: audio s per wall s (the figure); x per cpu: audio s per CPU s of this "
        "process, all threads summed: less sensitive to other load, pessimistic when threads spin"
    )
    print("* wav2vec2 base-size architecture with RANDOM weights: the speed of the real model.")
    print(
        f"4x subdivision: points located from their UVs lie within {subdivision_gap:.1e} m of the "
        "subdivided positions"
    )
    print()
    five = [r for r in rows if r.points == rows[0].points]
    light_long = next(r for r in five if r.model == "MMTalker" and r.encoder == "light")
    light_short = [r for r in five if r.model == "MMTalker" and r.encoder == "light"][-1]
    faceformer_5k = next(r for r in rows if r.model == "FaceFormer")
    summary: dict[str, Any] = {
        "mmtalker_light_rtf": light_long.rtf,
        "mmtalker_light_over_faceformer": light_long.rtf / faceformer_5k.rtf,
        "mmtalker_light_over_faceformer_same_clip": light_short.rtf / faceformer_5k.rtf,
        "memory": memory,
        "threads": args.threads,
        "load_average_at_start": load,
    }
    print(
        f"MMTalker light at {light_long.points} vertices: {light_long.rtf:.0f}x real time on "
        f"{light_long.audio_s:.0f} s  (target >= 200)"
    )
    print(
        f"MMTalker light RTF / FaceFormer RTF at {faceformer_5k.points} vertices: "
        f"{light_long.rtf / faceformer_5k.rtf:.1f} ({light_long.audio_s:.0f} s vs "
        f"{faceformer_5k.audio_s:.0f} s clips), {light_short.rtf / faceformer_5k.rtf:.1f} "
        f"(both {faceformer_5k.audio_s:.0f} s)  (target >= 20)"
    )
    if memory is not None:
        print(
            f"peak RSS, {memory['audio_s'] / 60:.1f}-min clip, MMTalker light, "
            f"{memory['vertices']} vertices: {memory['hwm_mib']:.0f} MiB "
            f"({memory['hwm_before_mib']:.0f} MiB before animate; output array "
            f"{memory['output_mib']:.0f} MiB; {memory['audio_s'] / memory['wall_s']:.0f}x real "
            "time)  (target: within 2 GB for 10 min)"
        )
    if args.json:
        summary["rows"] = [{**vars(r), "rtf": r.rtf, "cpu_rtf": r.cpu_rtf} for r in rows]
        summary["subdivision_gap_m"] = subdivision_gap
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
