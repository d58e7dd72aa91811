"""Accuracy at equal training time, several seeds: MMTalker vs the FaceFormer-style baseline.

Usage: python bench/accuracy.py [--size bench|demo] [--face procedural|ict] [--data DIR]
                                [--budget-minutes 20] [--seeds 0,1,2] [--validations 10] [--jobs 2]
                                [--learning-rates mmtalker=0.005,faceformer=0.003]
                                [--augment '{"noise_probability": 0.25}']
                                [--losses '{"speech_motion_gradient": 0.1}']
                                [--out work/bench/accuracy] [--skip-train] [--no-proxies]

Protocol (the same for both models; every shared piece of machinery serves both):

* Each model trains on the train split of one synthetic corpus for the same wall-clock budget of
  *training* time (``TrainConfig.time_budget_s``); the learning-rate schedule (warmup, cosine
  decay to zero) is spread over that budget. Each model trains at its own peak learning rate
  (``LEARNING_RATES``: the best of 1e-3, 3e-3 and 5e-3 in 5-minute runs; the baseline got the
  rate with its better *test* score, the stronger baseline, as its val scores tied). Validation
  runs outside the budget, ten times (``TrainConfig.validations``), on the moving average of
  the weights (``TrainConfig.weight_average``), and the average with the best validation LVE is
  kept: model selection sees the val split only. The test split is scored once, at the end.
* Both models train with the same audio augmentation and losses: ``TrainConfig``'s defaults,
  or the ``AugmentConfig`` fields ``--augment`` and the ``LossConfig`` fields ``--losses``
  override (an ablation changes them for both).
* Every seed trains MMTalker and the baseline side by side, one process and one CPU thread each
  (``--jobs 2``), so both see the same machine load; with ``--jobs 1`` they take turns.
* The test split's speakers (voices and faces) and sentences are unseen in training. Besides it,
  the models are scored on proxies for speech they never heard: the same test speakers, faces,
  sentences and motion rules re-voiced by another speech engine (Festival's diphone and HTS
  voices, when Festival is installed), by espeak-ng's Klatt synthesiser (its variants are held
  out of every training pool), and the test audio degraded (noise, room, band limit, codec).

Printed: per seed and model LVE (x1e-5 m²), EVE (x1e-5 m²), MVE (mm), FDD and |FDD| (x1e-7 m²),
lip sync (Pearson r of the mouth opening), per-region mean errors (mm) and training steps; then
mean ± std over seeds, the ratios the targets refer to (MMTalker/baseline LVE per seed, EVE,
|split FDD| and mean per-sequence |FDD|), each test speaker's split FDD and lip sync, the proxy
table (LVE on each proxy, and each model's proxy LVE over its own test LVE), and MMTalker's
learnt sampling density on lips and eyes.
Everything goes to OUT/accuracy.json; checkpoints to OUT/seedS/KIND. A benchmark: it reports
figures and never fails on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from pydantic import BaseModel

from mmtalker.checkpoint import build_model, load_checkpoint, save_checkpoint
from mmtalker.data.augment import AugmentConfig, augment_audio
from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import MANIFEST, Dataset, open_dataset
from mmtalker.data.synth import (
    KLATT_VARIANTS,
    SYNTH_REVISION,
    Size,
    SynthConfig,
    synthesize_corpus,
)
from mmtalker.eval.metrics import MetricAccumulator
from mmtalker.geometry.uv import attach_uv
from mmtalker.losses import LossConfig
from mmtalker.nn.base import AnimationModel
from mmtalker.nn.mmtalker import MMTalker
from mmtalker.training import (
    TrainConfig,
    fit,
    model_for_dataset,
    predictions,
    training_templates,
)

KINDS = ("mmtalker", "faceformer")
#: Peak learning rate per model (see the module docstring for how they were chosen).
LEARNING_RATES = {"mmtalker": 5e-3, "faceformer": 3e-3}
#: Metric, printed label and scale (vertices in metres, as VOCASET's tables print them).
COLUMNS = (
    ("lve", "LVE e-5", 1e5),
    ("eve", "EVE e-5", 1e5),
    ("mve", "MVE mm", 1e3),
    ("fdd", "FDD e-7", 1e7),
    ("fdd_abs", "|FDD| e-7", 1e7),
    ("lip_sync", "sync r", 1.0),
)
REGIONS = ("mve_lips", "mve_eyes", "mve_upper_face", "mve_rest")
#: More epochs than any budget allows: the time budget is what ends training.
EPOCHS = 100_000
ConfigT = TypeVar("ConfigT", bound=BaseModel)
#: A fixed degradation for the "degraded audio" proxy: every effect, each drawn per clip.
DEGRADE = AugmentConfig(
    speed_probability=0.0,
    tilt_probability=1.0,
    band_probability=0.5,
    reverb_probability=0.5,
    noise_probability=1.0,
    snr_db=(10.0, 25.0),
    codec_probability=0.3,
)


def corpus_config(size: str, face: str) -> SynthConfig:
    """The synthetic corpus preset the benchmark trains on."""
    return SynthConfig.preset(cast(Size, size), face=face)


def ensure_corpus(config: SynthConfig, path: Path) -> Dataset:
    """Open the corpus at ``path``, synthesising it there first if absent; a corpus made with
    other settings (e.g. an older preset) or by an older generator (which includes every corpus
    made before phone labels) is refused rather than silently measured."""
    if (path / MANIFEST).is_file():
        dataset = open_dataset(str(path))
        stored = dataset.manifest.extra.get("synth")
        if stored is None or SynthConfig.model_validate(stored) != config:
            raise SystemExit(
                f"error: {path} was synthesised with other settings than this benchmark's "
                f"corpus; delete it (it is re-made) or pass --data with another folder"
            )
        revision = dataset.manifest.extra.get("synth_revision", 1)
        if revision != SYNTH_REVISION:
            raise SystemExit(
                f"error: {path} was synthesised by generator revision {revision}, not "
                f"{SYNTH_REVISION}, which makes other data; delete it (it is re-made)"
            )
        return dataset
    print(f"synthesising {path} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    manifest = synthesize_corpus(config, str(path))
    print(
        f"  {manifest.num_sequences} sequences, {manifest.audio_seconds / 60:.1f} min of "
        f"audio in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    return open_dataset(str(path))


def proxy_corpora(config: SynthConfig, data: Path) -> dict[str, Dataset]:
    """The test split re-voiced by voices no model trained on, synthesised beside the corpus."""
    voices = {
        "klatt": [f"espeak:{base}+{v}" for base in ("en-us", "en-gb") for v in KLATT_VARIANTS]
    }
    if shutil.which("festival"):
        voices["festival"] = ["festival:kal", "festival:slt"]
    else:
        print("festival not installed: the Festival proxy is skipped", file=sys.stderr)
    return {
        name: ensure_corpus(
            config.model_copy(update={"voices": chosen, "splits": ["test"]}),
            data.with_name(f"{data.name}-proxy-{name}"),
        )
        for name, chosen in voices.items()
    }


def degraded(sequences: list[Sequence]) -> list[Sequence]:
    """The sequences with their audio degraded, deterministically per sequence."""
    out = []
    for index, seq in enumerate(sequences):
        rng = np.random.default_rng([2024, index])
        audio = augment_audio(seq.audio, seq.sample_rate, DEGRADE, rng)
        out.append(dataclasses.replace(seq, audio=audio))
    return out


def train_one(
    kind: str, seed: int, data: Path, budget_minutes: float, validations: int,
    learning_rate: float, augment: AugmentConfig, losses: LossConfig, out: Path,
) -> None:  # fmt: skip
    """Worker: train one model within the budget, keep the best on val, save it with history."""
    torch.set_num_threads(1)
    dataset = open_dataset(str(data))
    config = TrainConfig(
        epochs=EPOCHS, time_budget_s=budget_minutes * 60, validations=validations, device="cpu",
        seed=seed, learning_rate=learning_rate, augment=augment, losses=losses,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_for_dataset(kind, {}, dataset, config.losses)
    last = time.perf_counter()

    def progress(step: int, total: int, logs: dict[str, float]) -> None:
        nonlocal last
        if time.perf_counter() - last >= 60:
            last = time.perf_counter()
            print(f"  {kind} seed {seed}: step {step}, loss {logs['loss']:.4f}", file=sys.stderr)

    started = time.perf_counter()
    history = fit(model, dataset, config, progress)
    info = {"history": history, "wall_seconds": time.perf_counter() - started}
    save_checkpoint(
        out, model, training_templates(dataset), dataset.manifest.fps,
        dataset.manifest.sample_rate, {"dataset": str(data), "train": config.model_dump(), **info},
    )  # fmt: skip


def learning_rates(text: str) -> dict[str, float]:
    """``kind=rate,...`` for every model kind the benchmark trains."""
    try:
        rates = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected kind=rate,... got {text!r}") from error
    if set(rates) != set(KINDS) or min(rates.values()) <= 0:
        raise argparse.ArgumentTypeError(f"give a positive rate for each of {', '.join(KINDS)}")
    return rates


def overrides(default: ConfigT) -> Callable[[str], ConfigT]:
    """An argument type: ``default`` with the fields of a JSON object replaced."""

    def parse(text: str) -> ConfigT:
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            return default.model_validate({**default.model_dump(), **fields})
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected a JSON object of {type(default).__name__} fields, got {text!r}: "
                + " ".join(str(error).split())
            ) from error

    return parse


def score_sets(
    model: AnimationModel, sets: dict[str, tuple[list[Sequence], dict[str, np.ndarray]]]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Metrics on every set, and each test speaker's signed FDD and lip sync from the same
    predictions: with few test speakers the split's values are mostly their speaking styles and
    voices (bench/ceiling.py)."""
    scores = {}
    test_speakers: dict[str, MetricAccumulator] = {}
    for name, (sequences, templates) in sets.items():
        overall = MetricAccumulator.for_topology(model.topology)
        for seq, template, predicted in predictions(model, sequences, templates):
            overall.add(predicted, seq.vertices, template)
            if name == "test":
                test_speakers.setdefault(
                    seq.speaker, MetricAccumulator.for_topology(model.topology)
                ).add(predicted, seq.vertices, template)
        scores[name] = overall.result().as_dict()
    per_speaker = {s: acc.result() for s, acc in sorted(test_speakers.items())}
    return scores, {s: {"fdd": r.fdd, "lip_sync": r.lip_sync} for s, r in per_speaker.items()}


def run_parallel(commands: list[list[str]], jobs: int) -> None:
    """Run commands, ``jobs`` at a time; fail loudly if any fails."""
    pending = list(commands)
    running: list[subprocess.Popen[bytes]] = []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0)))
        finished = running[0].wait()
        if finished != 0:
            raise SystemExit(f"worker failed ({finished}): {' '.join(map(str, running[0].args))}")
        running.pop(0)


def summary(values: list[float]) -> str:
    """``mean ± std`` (sample std over seeds)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="bench", choices=["bench", "demo"])
    parser.add_argument("--face", default="procedural", choices=["procedural", "ict"])
    parser.add_argument("--data", default=None, help="corpus folder (default work/datasets/...)")
    parser.add_argument("--budget-minutes", type=float, default=20.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--validations", type=int, default=10, help="val-split checks per run (outside the budget)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--learning-rates",
        type=learning_rates,
        default=LEARNING_RATES,
        help="peak learning rate per model, e.g. mmtalker=0.005,faceformer=0.003",
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--augment",
        type=overrides(defaults.augment),
        default=defaults.augment,
        help="AugmentConfig fields for both models, e.g. '{\"noise_probability\": 0.25}'",
    )
    parser.add_argument(
        "--losses",
        type=overrides(defaults.losses),
        default=defaults.losses,
        help="LossConfig fields for both models, e.g. '{\"speech_motion_gradient\": 0.1}'",
    )
    parser.add_argument("--out", default="work/bench/accuracy")
    parser.add_argument("--skip-train", action="store_true", help="score existing checkpoints")
    parser.add_argument(
        "--no-proxies", action="store_true", help="score the test split and degraded audio only"
    )
    parser.add_argument("--train-one", nargs=2, metavar=("KIND", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    suffix = "" if args.face == "procedural" else f"-{args.face}"
    data = Path(args.data or f"work/datasets/{args.size}{suffix}")
    out = Path(args.out)
    if args.train_one:
        kind, seed = args.train_one[0], int(args.train_one[1])
        train_one(
            kind, seed, data, args.budget_minutes, args.validations,
            args.learning_rates[kind], args.augment, args.losses, out / f"seed{seed}" / kind,
        )  # fmt: skip
        return

    config = corpus_config(args.size, args.face)
    dataset = ensure_corpus(config, data)
    proxies = {} if args.no_proxies else proxy_corpora(config, data)
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    if not args.skip_train:
        commands = [
            [sys.executable, __file__, "--train-one", kind, str(seed), "--data", str(data),
             "--budget-minutes", str(args.budget_minutes), "--validations",
             str(args.validations), "--out", str(out), "--learning-rates",
             ",".join(f"{k}={v}" for k, v in args.learning_rates.items()),
             "--augment", args.augment.model_dump_json(),
             "--losses", args.losses.model_dump_json()]
            for seed in seeds for kind in KINDS
        ]  # fmt: skip
        run_parallel(commands, args.jobs)

    # Every core, unless the caller pinned OMP_NUM_THREADS: two scorings side by side at a thread
    # per core each oversubscribed 2 cores and ran over ten times slower.
    threads = os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, int(threads)))
    test = list(dataset.sequences("test"))
    sets = {"test": (test, dataset.templates), "degraded": (degraded(test), dataset.templates)}
    sets.update({f"{n}": (list(d.sequences("test")), d.templates) for n, d in proxies.items()})
    train_templates = {s: dataset.templates[s] for s in dataset.manifest.splits["train"].speakers}
    topology = attach_uv(dataset.topology, np.mean(list(train_templates.values()), axis=0))
    static = build_model("static", {}, topology, train_templates)
    static_scores, static_by_speaker = score_sets(static, sets)
    results = {"static": static_scores}
    runs: dict[str, dict[int, dict[str, Any]]] = {kind: {} for kind in KINDS}
    density: dict[int, dict[str, float]] = {}
    for seed in seeds:
        for kind in KINDS:
            checkpoint = load_checkpoint(out / f"seed{seed}" / kind)
            print(f"scoring {kind} seed {seed} ...", file=sys.stderr, flush=True)
            scores, by_speaker = score_sets(checkpoint.model, sets)
            history = checkpoint.metadata["history"]
            runs[kind][seed] = {
                "scores": scores, "steps": history[-1]["steps"], "history": history,
                "by_speaker": by_speaker,
            }  # fmt: skip
            if kind == "mmtalker":
                sampler = cast(MMTalker, checkpoint.model).sampler
                density[seed] = {
                    region: sampler.density_ratio(topology.region(region))
                    for region in ("lips", "eyes")
                }

    splits = dataset.manifest.splits
    print(
        f"corpus {data}: {len(splits['train'].speakers)} training speakers, "
        f"{splits['train'].num_sequences} sequences ({splits['train'].audio_seconds / 60:.1f} min);"
        f" test: {len(splits['test'].speakers)} unseen speakers, {len(test)} sequences; "
        f"{topology.num_vertices} vertices. Budget {args.budget_minutes:g} min of training per "
        f"model (peak learning rates {args.learning_rates}), seeds {seeds}, {args.jobs} side by "
        f"side, load average at start {load:.1f}; augmentation {args.augment.model_dump_json()}; "
        f"losses {args.losses.model_dump_json()}"
    )
    header = f"{'model':<11}{'seed':>5}" + "".join(f"{label:>11}" for _, label, _ in COLUMNS)
    print("\ntest split\n" + header + "".join(f"{r[4:]:>11}" for r in REGIONS) + f"{'steps':>7}")

    def row(name: str, seed: str, scores: dict[str, float], steps: int | str) -> str:
        line = f"{name:<11}{seed:>5}" + "".join(
            f"{scores[key] * factor:>11.3f}" for key, _, factor in COLUMNS
        )
        return line + "".join(f"{scores[r] * 1e3:>11.3f}" for r in REGIONS) + f"{steps:>7}"

    print(row("static", "-", results["static"]["test"], "-"))
    for kind in KINDS:
        for seed in seeds:
            run = runs[kind][seed]
            print(row(kind, str(seed), run["scores"]["test"], run["steps"]))
    print("\nmean ± std over seeds (test split)")
    for kind in KINDS:
        cells = [
            summary([runs[kind][s]["scores"]["test"][key] * factor for s in seeds])
            for key, _, factor in COLUMNS
        ]
        labelled = [f"{label} {cell}" for (_, label, _), cell in zip(COLUMNS, cells, strict=True)]
        print(f"{kind:<11}" + "  ".join(labelled))

    def per_seed(key: str, absolute: bool = False) -> list[float]:
        def value(kind: str, seed: int) -> float:
            v = runs[kind][seed]["scores"]["test"][key]
            return abs(v) if absolute else v

        return [value("mmtalker", s) / value("faceformer", s) for s in seeds]

    ratios = {
        "lve_over_baseline": per_seed("lve"),
        "eve_over_baseline": per_seed("eve"),
        # |split FDD| (signed means can cancel over sequences) and the mean per-sequence |FDD|.
        "split_fdd_over_baseline": per_seed("fdd", absolute=True),
        "fdd_abs_over_baseline": per_seed("fdd_abs"),
        "lve_over_static": [
            runs["mmtalker"][s]["scores"]["test"]["lve"] / results["static"]["test"]["lve"]
            for s in seeds
        ],
        "lip_sync": [runs["mmtalker"][s]["scores"]["test"]["lip_sync"] for s in seeds],
    }
    print("\nper seed: " + ", ".join(f"{s}" for s in seeds))
    targets = {
        "lve_over_baseline": "<= 0.6", "eve_over_baseline": "<= 0.85",
        "split_fdd_over_baseline": "<= 1", "fdd_abs_over_baseline": "<= 1",
        "lve_over_static": "", "lip_sync": ">= 0.95",
    }  # fmt: skip
    for name, values in ratios.items():
        print(
            f"  MMTalker {name:<24}" + "".join(f"{v:8.3f}" for v in values) + f"   {targets[name]}"
        )

    print(
        "\nper test speaker: split FDD e-7 (0 is perfect; static = the truth's own dynamics) "
        "and lip sync r"
    )
    names = list(static_by_speaker)
    print(
        f"{'model':<11}{'seed':>5}"
        + "".join(f"{name + ' FDD':>13}" for name in names)
        + "".join(f"{name + ' sync':>13}" for name in names)
    )
    rows = [("static", "-", static_by_speaker)] + [
        (kind, str(seed), runs[kind][seed]["by_speaker"]) for kind in KINDS for seed in seeds
    ]
    for kind, seed, values in rows:
        print(
            f"{kind:<11}{seed:>5}"
            + "".join(f"{values[n]['fdd'] * 1e7:>13.2f}" for n in names)
            + "".join(f"{values[n]['lip_sync']:>13.3f}" for n in names)
        )

    print("\nunseen-voice proxies: LVE e-5 (mean ± std over seeds; x own test LVE)")
    for name in sets:
        cells = [f"static {results['static'][name]['lve'] * 1e5:.3f}"]
        for kind in KINDS:
            lve = [runs[kind][s]["scores"][name]["lve"] for s in seeds]
            own = [
                v / runs[kind][s]["scores"]["test"]["lve"] for s, v in zip(seeds, lve, strict=True)
            ]
            cells.append(
                f"{kind} {summary([v * 1e5 for v in lve])} (x{statistics.fmean(own):.2f}, "
                f"x{statistics.fmean(lve) / results['static'][name]['lve']:.2f} static)"
            )
        print(f"  {name:<10}" + "   ".join(cells))
    print(
        "\nMMTalker sampling density per unit area vs face average: "
        + ", ".join(
            f"seed {s}: lips {d['lips']:.2f} eyes {d['eyes']:.2f}" for s, d in density.items()
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "corpus": str(data), "size": args.size, "face": args.face,
        "budget_minutes": args.budget_minutes, "seeds": seeds, "jobs": args.jobs,
        "learning_rates": args.learning_rates, "augment": args.augment.model_dump(),
        "losses": args.losses.model_dump(),
        "load_average_at_start": load, "num_vertices": topology.num_vertices,
        "note": "metrics unscaled: metres (lve_l2, eve_l2, mve*), m² (lve, eve, fdd)",
        "static": results["static"], "static_by_speaker": static_by_speaker, "runs": runs,
        "ratios": ratios, "sampling_density": density,
    }  # fmt: skip
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    print(f"\ncheckpoints and accuracy.json in {out}")


if __name__ == "__main__":
    main()
