"""Synthetic corpus generation speed: audio seconds made per wall second, per corpus size.

Usage: python bench/corpus.py [--sizes tiny demo] [--out work/bench]
The bench size (over an hour of audio) takes minutes and gigabytes; ask for it explicitly.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from mmtalker.data.synth import SynthConfig, synthesize_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo", "bench"]
    )
    parser.add_argument("--out", default="work/bench/corpus")
    args = parser.parse_args()
    print(
        f"{'size':<6} {'speakers':>8} {'seqs':>6} {'vertices':>8} {'audio min':>9} "
        f"{'wall s':>7} {'audio s/s':>9} {'MiB':>8}"
    )
    for size in args.sizes:
        out = Path(args.out) / size
        shutil.rmtree(out, ignore_errors=True)
        config = SynthConfig.preset(size)
        started = time.perf_counter()
        m = synthesize_corpus(config, str(out))
        wall = time.perf_counter() - started
        mib = sum(s.bytes for s in m.shards) / 2**20
        print(
            f"{size:<6} {len(m.speakers):>8} {m.num_sequences:>6} {m.topology.num_vertices:>8} "
            f"{m.audio_seconds / 60:>9.1f} {wall:>7.1f} {m.audio_seconds / wall:>9.1f} {mib:>8.1f}"
        )


if __name__ == "__main__":
    main()
