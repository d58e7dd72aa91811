"""Batch animation throughput: plain in-process loops vs the Ray Data job with 1 and 2 actors.

Usage: python bench/batch_throughput.py [--clips 1000] [--checkpoint DIR] [--formats npz,glb]
                                        [--batch-size 16] [--actors-list 1,2]
                                        [--serve-requests 64] [--serve-concurrency 1,8]
                                        [--overload 4] [--overload-seconds 20]
                                        [--out work/bench/batch_throughput]

Every run animates the same catalog of ``--clips`` espeak-ng speech clips (wav/flac/ogg, mixed
sample rates, some stereo; made once under ``work/bench/catalog-N/``) and writes the same
outputs (npz, plus ``--formats``) into a fresh folder under ``--out``, deleted after the run
unless ``--keep-outputs`` (~3 MB per clip); the figures also go to ``OUT/batch_throughput.json``:

* plain loop: one torch thread; per clip read bytes, ``decode_audio``, ``prepare_audio``,
  ``animate``, ``write_outputs``: what a hand-rolled script does;
* plain batched loop: one torch thread; decode every clip, sort by length, ``animate_clips`` on
  ``--batch-size`` clips at a time, write. The Ray job batches by length too, so this is the
  fairer baseline;
* Ray job: the platform's ``run_animation`` (Ray Data: ``load_clips`` decode, a pool of 1-CPU
  model actors, per-item records and the results manifest), ``overwrite`` on;
* Serve: the Serve application on 127.0.0.1, one median-length clip POSTed to ``/v1/animate``
  ``--serve-requests`` times at each ``--serve-concurrency``: requests per second and p50/p99
  latency (dynamic batching groups concurrent requests); then, for ``--overload-seconds``,
  requests sent on a clock at ``--overload`` times the best rate measured: the share shed with
  503 (and with ``Retry-After``), other 5xx (there should be none), and p50/p99 latency of the
  accepted requests, which the bounded queues keep from growing with the overload.

The figure is seconds of audio animated per wall second. The plain loops load the model before
the clock starts; the Ray job's wall time covers everything after Ray start-up (model read,
actor start, pipeline, manifest), and the start-up of the local Ray is timed apart. The model is
MMTalker with the default config for the demo dataset's topology and RANDOM weights unless
``--checkpoint``: speed does not depend on the weights. Targets, against the plain batched
loop on a 2-core machine: >= 0.8x per actor, >= 1.3x with 2 actors; and every catalog item
accounted for (animated + skipped + failed == total). A benchmark: it prints figures; it exits
non-zero only when items go unaccounted for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import soundfile as sf
import torch

from mmtalker.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mmtalker.data.clips import CONTAINERS, write_speech_clips
from mmtalker.data.shards import MANIFEST, open_dataset
from mmtalker.data.synth import SynthConfig, synthesize_corpus
from mmtalker.inference import Clip, animate, animate_clips, decode_audio, prepare_audio
from mmtalker.io.export import write_outputs
from mmtalker.training import model_for_dataset, training_templates
from mmtalker_platform.batch import run_animation
from mmtalker_platform.cluster import connect
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import AnimateJobSpec

#: Targets against the plain batched loop: per actor, and with two actors.
TARGET_PER_ACTOR, TARGET_TWO_ACTORS = 0.8, 1.3


@dataclass
class Run:
    """One timed run over the catalog."""

    name: str
    total: int
    animated: int
    skipped: int
    failed: int
    audio_s: float
    wall_s: float
    #: Seconds until the first results reached the driver and the items they held (Ray jobs):
    #: the start-up (worker processes, imports, model load) as against the work that follows.
    first_s: float = 0.0
    first_items: int = 0

    @property
    def rate(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def steady_rate(self) -> float:
        """Audio seconds per second once results flow (items after the first results)."""
        items = self.total - self.first_items
        if not self.first_s or items <= 0:
            return self.rate
        return self.audio_s / self.total * items / (self.wall_s - self.first_s)

    @property
    def accounted(self) -> int:
        return self.animated + self.skipped + self.failed


def catalog(count: int, root: Path) -> list[Path]:
    """The ``count``-clip catalog under ``root``, written unless already complete."""
    folder = root / f"catalog-{count}"
    clips = sorted(p for p in folder.glob("clip_*") if p.suffix.lstrip(".") in CONTAINERS)
    if len(clips) == count:
        return clips
    # Writes are atomic, but a catalog cut short may also hold clips of another count: redo it.
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    print(f"writing {count} speech clips into {folder} ...", file=sys.stderr, flush=True)
    write_speech_clips(str(folder), count)
    print(f"  done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return sorted(folder.glob("clip_*"))


def random_checkpoint(root: Path, data: str = "work/datasets/demo") -> Path:
    """A default-config MMTalker with random (seeded) weights for the demo dataset's topology."""
    folder = root / "model-random"
    if (folder / "config.json").is_file():
        return folder
    if not (Path(data) / MANIFEST).is_file():
        print(f"synthesising the demo corpus into {data} ...", file=sys.stderr, flush=True)
        synthesize_corpus(SynthConfig.preset("demo"), data)
    dataset = open_dataset(data)
    torch.manual_seed(0)
    model = model_for_dataset("mmtalker", {}, dataset)
    manifest = dataset.manifest
    templates = training_templates(dataset)
    return save_checkpoint(folder, model, templates, manifest.fps, manifest.sample_rate)


def fresh(folder: Path) -> Path:
    """An empty output folder, so every run writes (and is timed writing) every output."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def plain_loop(clips: list[Path], ckpt: Checkpoint, out: Path, formats: set[str]) -> Run:
    """One clip at a time, as a hand-rolled script would do it."""
    speaker = ckpt.model.speakers[0]
    template, rate = ckpt.templates[speaker], ckpt.sample_rate
    audio_s, started = 0.0, time.perf_counter()
    for path in clips:
        samples, source_rate = decode_audio(path.read_bytes())
        audio_s += len(samples) / source_rate
        mono = prepare_audio(samples, source_rate, rate)
        vertices = animate(mono, template, ckpt.model, sample_rate=rate, model_sample_rate=rate,
                           fps=ckpt.fps, speaker=0)  # fmt: skip
        write_outputs(vertices, ckpt.fps, ckpt.topology, str(out / path.stem), formats)
    wall = time.perf_counter() - started
    return Run("plain loop", len(clips), len(clips), 0, 0, audio_s, wall)


def batched_loop(
    clips: list[Path], ckpt: Checkpoint, out: Path, formats: set[str], batch_size: int
) -> Run:
    """Decode everything, sort by length, animate ``batch_size`` clips per ``animate_clips``."""
    template, rate = ckpt.templates[ckpt.model.speakers[0]], ckpt.sample_rate
    audio_s, started = 0.0, time.perf_counter()
    decoded = []
    for path in clips:
        samples, source_rate = decode_audio(path.read_bytes())
        audio_s += len(samples) / source_rate
        decoded.append((path, Clip(prepare_audio(samples, source_rate, rate), template, 0)))
    decoded.sort(key=lambda item: len(item[1].audio))
    # Batch by batch, not the whole catalog at once: outputs (T, V, 3) of 1000 clips would not
    # fit in memory together.
    for first in range(0, len(decoded), batch_size):
        group = decoded[first : first + batch_size]
        outputs = animate_clips([c for _, c in group], ckpt.model, model_sample_rate=rate,
                                fps=ckpt.fps, max_batch=batch_size)  # fmt: skip
        for (path, _), vertices in zip(group, outputs, strict=True):
            write_outputs(vertices, ckpt.fps, ckpt.topology, str(out / path.stem), formats)
    wall = time.perf_counter() - started
    return Run(f"plain batched ({batch_size})", len(clips), len(clips), 0, 0, audio_s, wall)


def ray_job(
    folder: Path, model: Path, out: Path, formats: list[str], actors: int, batch_size: int
) -> tuple[Run, float]:
    """The platform's batch job; its counts, and its wall time as the caller sees it."""
    spec = AnimateJobSpec(
        name=f"bench-{actors}a", catalog=str(folder.resolve()), output=str(out.resolve()),
        checkpoint=str(model.resolve()), formats=formats, overwrite=True, actors=actors,
        batch_size=batch_size,
    )  # fmt: skip
    first: list[tuple[float, int]] = []

    def progress(done: int, total: int | None) -> None:
        if not first:
            first.append((time.perf_counter(), done))

    started = time.perf_counter()
    outcome = run_animation(spec, PlatformSettings(), progress=progress)
    wall = time.perf_counter() - started
    run = Run(f"Ray job, {actors} actor(s)", outcome.total, outcome.animated, outcome.skipped,
              outcome.failed, outcome.audio_seconds, outcome.seconds, first[0][0] - started,
              first[0][1])  # fmt: skip
    return run, wall


@dataclass
class ServeRun:
    """Online requests at one concurrency: throughput and latency percentiles."""

    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_batch: int


@dataclass
class OverloadRun:
    """Open-loop load at a multiple of the measured capacity: what is shed and how fast the rest."""

    rate: float
    seconds: float
    sent: int
    accepted: int
    shed: int
    shed_with_retry_after: int
    other_5xx: int
    p50_ms: float
    p99_ms: float


def serve_runs(
    model: Path, clip: Path, count: int, levels: list[int], overload: float, seconds: float
) -> tuple[list[ServeRun], OverloadRun]:
    """POST /v1/animate ``count`` times per concurrency level against a local Serve app, then
    for ``seconds`` at ``overload`` times the best rate measured (requests sent on a clock,
    whatever the answers: the load does not slow down when the server does)."""
    import requests
    from ray import serve

    from mmtalker_platform.serve import ServeConfig, build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ServeConfig(checkpoint=str(model.resolve()), max_batch_size=8)),
        name="bench", route_prefix="/",
    )  # fmt: skip
    url, body = f"http://127.0.0.1:{port}/v1/animate", clip.read_bytes()

    def one(_: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = requests.post(url, data=body, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - started, int(response.headers["X-Batch-Size"])

    def timed(due: float) -> tuple[float, int, bool]:
        time.sleep(max(0.0, due - time.perf_counter()))
        started = time.perf_counter()
        response = requests.post(url, data=body, timeout=300)
        retry = "Retry-After" in response.headers
        return time.perf_counter() - started, response.status_code, retry

    runs = []
    try:
        for _ in range(3):  # warm-up: first calls pay for lazy initialisation
            one(0)
        for level in levels:
            started = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                results = list(pool.map(one, range(count)))
            wall = time.perf_counter() - started
            latency = np.array([r[0] for r in results]) * 1000
            runs.append(ServeRun(
                level, count, count / wall, float(np.percentile(latency, 50)),
                float(np.percentile(latency, 99)), max(r[1] for r in results),
            ))  # fmt: skip
        rate = overload * max(run.rps for run in runs)
        start = time.perf_counter() + 0.5
        dues = [start + i / rate for i in range(int(rate * seconds))]
        # One thread per request in flight: a bounded pool would slow the load down with the
        # server, which is what an overload test must not do.
        with ThreadPoolExecutor(min(len(dues), 512)) as pool:
            answers = list(pool.map(timed, dues))
    finally:
        serve.shutdown()
    accepted = np.array([a[0] for a in answers if a[1] == 200] or [math.nan]) * 1000
    shed = [a for a in answers if a[1] == 503]
    return runs, OverloadRun(
        rate, seconds, len(answers), sum(a[1] == 200 for a in answers), len(shed),
        sum(a[2] for a in shed), sum(a[1] >= 500 and a[1] != 503 for a in answers),
        float(np.percentile(accepted, 50)), float(np.percentile(accepted, 99)),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--checkpoint", default=None, help="model folder (default: random)")
    parser.add_argument("--formats", default="npz", help="comma-separated: npz, glb, obj")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors-list", default="1,2")
    parser.add_argument("--out", default="work/bench/batch_throughput")
    parser.add_argument("--keep-outputs", action="store_true", help="else deleted after each run")
    parser.add_argument("--serve-requests", type=int, default=64, help="per concurrency level")
    parser.add_argument("--serve-concurrency", default="1,8")
    parser.add_argument("--overload", type=float, default=4.0, help="x the measured capacity")
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    args = parser.parse_args()
    # One thread in the driver's plain loops, as Ray gives each 1-CPU actor.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    formats = sorted({"npz", *args.formats.split(",")} - {""})
    actors_list = [int(a) for a in args.actors_list.split(",")]
    out = Path(args.out)
    load = os.getloadavg()[0]
    clips = catalog(args.clips, Path("work/bench"))
    model = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path("work/bench"))
    ckpt = load_checkpoint(model)

    def finish(folder: Path) -> None:
        if not args.keep_outputs:  # 1000 clips of npz are ~3 GB per run at ~3k vertices
            shutil.rmtree(folder, ignore_errors=True)

    runs: list[Run] = []
    print("plain loop ...", file=sys.stderr, flush=True)
    runs.append(plain_loop(clips, ckpt, fresh(out / "plain"), set(formats)))
    finish(out / "plain")
    print("plain batched loop ...", file=sys.stderr, flush=True)
    runs.append(batched_loop(clips, ckpt, fresh(out / "batched"), set(formats), args.batch_size))
    finish(out / "batched")
    started = time.perf_counter()
    connect(PlatformSettings())
    startup = time.perf_counter() - started
    outer: dict[str, float] = {}
    for actors in actors_list:
        print(f"Ray job, {actors} actor(s) ...", file=sys.stderr, flush=True)
        folder = fresh(out / f"ray-{actors}a")
        run, wall = ray_job(clips[0].parent, model, folder, formats, actors, args.batch_size)
        runs.append(run)
        outer[run.name] = wall
        finish(folder)
    # A median-length clip: what one online request typically carries.
    clip = sorted(clips, key=lambda c: sf.info(c).duration)[len(clips) // 2]
    print("Serve ...", file=sys.stderr, flush=True)
    levels = [int(c) for c in args.serve_concurrency.split(",")]
    online, overload = serve_runs(
        model, clip, args.serve_requests, levels, args.overload, args.overload_seconds
    )
    ray.shutdown()

    plain, batched = runs[0], runs[1]

    def ok(run: Run) -> bool:
        return run.accounted == run.total == len(clips)

    weights = "RANDOM weights (speed only)" if not args.checkpoint else "its own weights"
    print(
        f"\n{len(clips)} clips in {clips[0].parent} ({plain.audio_s:.0f} s of audio); model "
        f"{model} with {weights}; {ckpt.topology.num_vertices} vertices; formats {formats}; "
        f"batch {args.batch_size}"
    )
    print(
        f"{'run':<24}{'items':>7}{'anim.':>7}{'skip':>6}{'fail':>6}{'wall s':>9}"
        f"{'audio s/s':>11}{'x plain':>9}{'x batched':>11}"
    )
    for r in runs:
        print(
            f"{r.name:<24}{r.total:>7}{r.animated:>7}{r.skipped:>6}{r.failed:>6}"
            f"{r.wall_s:>9.1f}{r.rate:>11.1f}{r.rate / plain.rate:>9.2f}"
            f"{r.rate / batched.rate:>11.2f}"
        )
    print(f"\nRay start-up (connect, not in the job walls above): {startup:.1f} s")
    for r in runs[2:]:
        print(
            f"{r.name}: job's own wall {r.wall_s:.1f} s, run_animation as called "
            f"{outer[r.name]:.1f} s; {r.rate / plain.rate:.2f}x plain loop, "
            f"{r.rate / batched.rate:.2f}x batched loop  (target >= "
            f"{TARGET_TWO_ACTORS if '2 actor' in r.name else TARGET_PER_ACTOR}x batched loop)"
        )
        print(
            f"  start-up until the first results: {r.first_s:.1f} s ({r.first_items} items); "
            f"after it {r.steady_rate:.1f} audio s/s = {r.steady_rate / batched.rate:.2f}x "
            "batched loop"
        )
        print(
            f"  items accounted for: {r.animated}+{r.skipped}+{r.failed} = {r.accounted} of "
            f"{r.total} ({len(clips)} clips){'' if ok(r) else '  <-- NOT ALL ACCOUNTED FOR'}"
        )
    print(
        f"\nServe on 127.0.0.1: POST /v1/animate with {clip.name} "
        f"({sf.info(clip).duration:.1f} s of audio), npz answers, max_batch_size 8"
    )
    print(f"{'concurrency':>11}{'requests':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}")
    for o in online:
        print(
            f"{o.concurrency:>11}{o.requests:>10}{o.rps:>8.1f}{o.p50_ms:>9.0f}{o.p99_ms:>9.0f}"
            f"{o.max_batch:>7}"
        )
    print(
        f"\nat {args.overload:g}x capacity ({overload.rate:.1f} requests/s for "
        f"{overload.seconds:g} s, sent on a clock): {overload.sent} sent, {overload.accepted} "
        f"answered 200, {overload.shed} shed with 503 ({overload.shed / overload.sent:.0%}; "
        f"{overload.shed_with_retry_after} with Retry-After), {overload.other_5xx} other 5xx; "
        f"accepted p50 {overload.p50_ms:.0f} ms, p99 {overload.p99_ms:.0f} ms"
    )
    print(
        f"\nmachine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s) in the plain loops, "
        f"ray {ray.__version__}; load average at start {load:.1f} (other work slows every "
        "figure)"
    )
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "clips": len(clips), "formats": formats, "batch_size": args.batch_size,
        "ray_startup_s": startup, "load_average": load,
        "runs": [{**asdict(r), "rate": r.rate, "steady_rate": r.steady_rate} for r in runs],
        "serve": [asdict(o) for o in online], "overload": asdict(overload),
    }  # fmt: skip
    (out / "batch_throughput.json").write_text(json.dumps(report, indent=2))
    return 0 if all(ok(r) for r in runs[2:]) else 1


if __name__ == "__main__":
    sys.exit(main())
