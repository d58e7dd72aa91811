"""Catalog scale: a manifest of 10k and 100k items on moto's S3 server, mostly done before.

Usage: python bench/catalog_scale.py [--sizes 10000,100000] [--missing 0.02] [--pending 20]
                                     [--out work/bench/catalog_scale]

Per size, a bucket on a moto S3 server this script starts (its request log kept) holds a CSV
manifest of SIZE items: ``--missing`` of them name audio files that do not exist (they fail),
``--pending`` are tiny clips not done yet (animated), and the rest are tiny clips an earlier run
finished (their records are written here, as that run would have: the job skips them). The job
(``run_animation``, 1 actor, a small random model) runs in a driver process of its own on a
local Ray; the figures are:

* driver peak RSS (``ru_maxrss`` of that process) per size, and its growth from the smallest
  to the largest size (target: under 50 MB from 10k to 100k);
* S3 requests per skipped item, counted at the moto server from its request log (target <= 1:
  one HEAD of the item's audio file; the job's own files are a few requests in all);
* items per second through the skip path (the job's wall time over all items; it includes
  Ray Data start-up and the pending items).

A benchmark: it prints figures and never fails on them; it exits non-zero only when items go
unaccounted for (animated + skipped + failed != size).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import boto3
import numpy as np
import ray
import soundfile as sf
import torch

from mmtalker import storage
from mmtalker.checkpoint import save_checkpoint
from mmtalker.data.face import FaceShape, make_chart, warp
from mmtalker.geometry.uv import attach_uv
from mmtalker.nn.mmtalker import MMTalker, MMTalkerConfig
from mmtalker.nn.speech import SpeechConfig
from mmtalker.storage import S3Settings
from mmtalker_platform.batch import run_animation
from mmtalker_platform.decode import ItemInputs, ItemRecord, record_uri
from mmtalker_platform.model_source import resolve_model
from mmtalker_platform.settings import PlatformSettings
from mmtalker_platform.spec import AnimateJobSpec

#: Distinct tiny audio files the items share (an item's audio is one of them).
CLIPS = 16
KEYS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def small_checkpoint(folder: Path) -> Path:
    """A small random MMTalker on a 600-vertex procedural face: pending items animate fast."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    chart = make_chart(600)
    rng = np.random.default_rng(0)
    templates = {f"s{i}": warp(chart, FaceShape.sample(rng)) for i in range(2)}
    topology = attach_uv(chart.topology(), np.mean(list(templates.values()), axis=0))
    config = MMTalkerConfig(
        speech=SpeechConfig(dim=32, levels=2, n_mels=32), dim=32, heads=2, clusters=(48, 12),
        basis=16, fourier_bands=4, head_hidden=32,
    )  # fmt: skip
    return save_checkpoint(folder, MMTalker(config, topology, templates), templates, 30.0, 16000)


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port, every request logged to ``log``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
             str(port)], stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def requests_logged(log: Path) -> list[str]:
    """Method and path of every request in the moto log so far."""
    pattern = re.compile(r'"([A-Z]+) (\S+) HTTP')
    # Colour codes aside: moto's server colours the request line of some answers (206, 404).
    lines = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()).splitlines()
    return [" ".join(m.groups()) for line in lines if (m := pattern.search(line))]


def prepare(size: int, missing: float, pending: int, model: Path, s3: S3Settings) -> str:
    """A bucket with the manifest, the clips and the earlier run's records; the manifest URI."""
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, **KEYS)
    bucket = f"scale-{size}-{uuid.uuid4().hex[:6]}"
    client.create_bucket(Bucket=bucket)
    tone = (0.1 * np.sin(np.arange(3200) / 5)).astype(np.float32)  # 0.2 s at 16 kHz
    buffer = io.BytesIO()
    sf.write(buffer, tone, 16000, format="WAV", subtype="PCM_16")
    for clip in range(CLIPS):
        client.put_object(Bucket=bucket, Key=f"clips/c{clip:02d}.wav", Body=buffer.getvalue())
    missing_every = round(1 / missing) if missing > 0 else size + 1
    rows, done = ["id,audio"], []
    for index in range(size):
        item = f"item{index:07d}"
        if index % missing_every == missing_every - 1:
            rows.append(f"{item},missing/{item}.wav")
            continue
        rows.append(f"{item},clips/c{index % CLIPS:02d}.wav")
        if index >= pending:
            done.append((item, f"s3://{bucket}/clips/c{index % CLIPS:02d}.wav"))
    client.put_object(Bucket=bucket, Key="list.csv", Body="\n".join(rows).encode() + b"\n")
    output = f"s3://{bucket}/out"
    source = resolve_model(AnimateJobSpec(name="x", catalog="x", output="x",
                                          checkpoint=str(model)), PlatformSettings())  # fmt: skip
    speaker = source.load().model.speakers[0]
    identities = {}
    for clip in range(CLIPS):
        with storage.open_file(f"s3://{bucket}/clips/c{clip:02d}.wav", s3) as opened:
            identities[f"s3://{bucket}/clips/c{clip:02d}.wav"] = opened.stat.identity

    def record(entry: tuple[str, str]) -> None:
        item, audio = entry
        inputs = ItemInputs(
            item_id=item, audio_uri=audio, audio=identities[audio], model=source.model_id,
            formats=["npz"], speaker=speaker, template_uri="", template="",
        )  # fmt: skip
        body = ItemRecord(
            inputs=inputs, outputs={"npz": f"{output}/{item}.npz"}, audio_seconds=0.2, frames=6,
            fps=30.0, topology_id="bench", finished=datetime.now(UTC),
        ).model_dump_json()  # fmt: skip
        _, key = record_uri(output, item, inputs.fingerprint()).split(f"s3://{bucket}/", 1)
        client.put_object(Bucket=bucket, Key=key, Body=body.encode())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(record, done))
    return f"s3://{bucket}/list.csv"


def drive(spec_json: str) -> None:
    """The driver process: run the job, print its outcome and this process's peak RSS."""
    spec = AnimateJobSpec.model_validate_json(spec_json)
    outcome = run_animation(spec, PlatformSettings())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"outcome": outcome.model_dump(), "peak_rss_mb": peak_mb}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--missing", type=float, default=0.02, help="share of missing files")
    parser.add_argument("--pending", type=int, default=20, help="items not done before")
    parser.add_argument("--out", default="work/bench/catalog_scale")
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        drive(args.driver)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "moto-requests.log"
    load = os.getloadavg()
    server, endpoint = start_moto(log)
    try:
        results = measure(args, out, log, endpoint)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a loaded machine: moto holds every object in memory
            server.kill()
            server.wait()
    if len(results) > 1:
        growth = results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
        print(f"\ndriver peak RSS grows {growth:+.0f} MB from {results[0]['size']} to "
              f"{results[-1]['size']} items (target: under 50 MB)")  # fmt: skip
    print(
        "requests per skipped item include the job's own (catalog, records listing, "
        "results parts, progress) and the failed items' HEADs; target <= 1"
    )
    print(f"machine: {os.cpu_count()} cores; load average at start {load[0]:.1f} "
          f"(1 min), {load[1]:.1f} (5 min), after each size "
          f"{[round(r['load_average'], 1) for r in results]}; ray {ray.__version__}")  # fmt: skip
    accounted = all(
        r["outcome"]["animated"] + r["outcome"]["skipped"] + r["outcome"]["failed"] == r["size"]
        for r in results
    )
    return 0 if accounted and results else 1


def measure(args: argparse.Namespace, out: Path, log: Path, endpoint: str) -> list[dict]:
    """Per size: prepare the bucket, run the job in a driver process, count; print each row."""
    env = {
        **os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    os.environ.update(env)
    s3 = S3Settings()
    model = small_checkpoint(out / "model")
    print(f"\nmanifest catalogs on moto S3 ({args.missing:.0%} missing files, {args.pending} "
          "pending tiny clips, the rest done by an earlier run); 1 actor, small model")  # fmt: skip
    print(
        f"{'items':>8}{'anim.':>7}{'skip':>8}{'fail':>7}{'job s':>8}{'items/s':>9}"
        f"{'driver RSS MB':>15}{'S3 req':>9}{'req/skip':>10}  requests by method", flush=True
    )  # fmt: skip
    context = ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False,
                       configure_logging=False, logging_level="ERROR")  # fmt: skip
    env["RAY_ADDRESS"] = context.address_info["gcs_address"]
    results: list[dict] = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            print(f"preparing {size} items ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            manifest = prepare(size, args.missing, args.pending, model, s3)
            prepared = time.perf_counter() - started
            spec = AnimateJobSpec(
                name=f"scale-{size}", catalog=manifest, output=manifest.rsplit("/", 1)[0] + "/out",
                checkpoint=str(model.resolve()), actors=1,
            )  # fmt: skip
            mark = len(requests_logged(log))
            print(f"running the job on {size} items ...", file=sys.stderr, flush=True)
            driver = subprocess.run(
                [sys.executable, __file__, "--driver", spec.model_dump_json()],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if driver.returncode != 0:
                print(driver.stderr[-3000:], file=sys.stderr)
                break
            report = json.loads(driver.stdout.strip().splitlines()[-1])
            made = requests_logged(log)[mark:]
            r = {"size": size, "prepare_s": prepared, "requests": len(made),
                 "methods": {m: sum(x.startswith(m) for x in made)
                             for m in ("HEAD", "GET", "PUT", "POST", "DELETE")},
                 "load_average": os.getloadavg()[0], **report}  # fmt: skip
            results.append(r)
            (out / "catalog_scale.json").write_text(json.dumps(results, indent=2))
            o = r["outcome"]
            print(
                f"{size:>8}{o['animated']:>7}{o['skipped']:>8}{o['failed']:>7}"
                f"{o['seconds']:>8.1f}{size / o['seconds']:>9.0f}{r['peak_rss_mb']:>15.0f}"
                f"{r['requests']:>9}{r['requests'] / max(o['skipped'], 1):>10.2f}  {r['methods']}",
                flush=True,
            )  # fmt: skip
    finally:
        ray.shutdown()
    return results


if __name__ == "__main__":
    sys.exit(main())
