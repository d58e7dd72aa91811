"""Evaluation reports: one HTML page a person can read and watch.

For each model on a split: the field's metrics, the same per speaker, the mean per-vertex error
by region and as a heatmap on the face, and comparison videos (ground truth | prediction |
error, with the audio) of the first held-out sequences with a still of each. Images and videos
go to ``<report>_files/`` beside the page, linked relatively, so the folder can be moved whole.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from mmtalker.data.sequence import REQUIRED_REGIONS, Sequence, Topology
from mmtalker.data.shards import Dataset
from mmtalker.errors import MMTalkerError
from mmtalker.eval.metrics import REPORTED, MetricAccumulator
from mmtalker.io.render import RenderConfig, Renderer, comparison_still, error_colors, save_png
from mmtalker.io.video import write_comparison
from mmtalker.nn.base import AnimationModel
from mmtalker.training import predictions


@dataclass
class ModelResult:
    """What the report shows of one model."""

    name: str
    scores: dict[str, float]
    speakers: dict[str, dict[str, float]]
    #: Mean per-vertex L2 error (metres) over every frame of the split.
    vertex_error: np.ndarray
    previews: list[tuple[str, str, str]] = field(default_factory=list)  # (sequence, mp4, png)


def write_report(
    dataset: Dataset,
    models: dict[str, AnimationModel],
    out: str | Path,
    *,
    split: str = "test",
    previews: int = 1,
    config: RenderConfig | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[ModelResult]:
    """Evaluate ``models`` on ``split``, write the HTML report to ``out``; return the results."""
    if not models:
        raise MMTalkerError("a report needs at least one model")
    out = Path(out)
    files = out.with_name(f"{out.stem}_files")
    files.mkdir(parents=True, exist_ok=True)
    sequences = list(dataset.sequences(split))  # refuses an unknown split
    results = []
    for name, model in models.items():
        if progress is not None:
            progress(f"evaluating {name} on {len(sequences)} {split} sequences")
        results.append(_evaluate(name, model, sequences, dataset, files, previews, config, device))
    topology = dataset.topology
    neutral = next(iter(dataset.templates.values()))
    renderer = Renderer(topology.faces, neutral, config)
    # One colour scale for every model, so their heatmaps compare at a glance.
    vmax = max(max(float(r.vertex_error.max()) for r in results), 1e-6)
    heatmaps = []
    for result in results:
        image = renderer.render(neutral, error_colors(result.vertex_error, vmax))
        heatmaps.append(save_png(image, files / f"{_slug(result.name)}_heatmap.png").name)
    regions = {r: topology.region(r) for r in REQUIRED_REGIONS}
    out.write_text(
        _html(dataset, split, len(sequences), results, heatmaps, regions, vmax, files.name),
        encoding="utf-8",
    )
    return results


def _evaluate(
    name: str,
    model: AnimationModel,
    sequences: list[Sequence],
    dataset: Dataset,
    files: Path,
    previews: int,
    config: RenderConfig | None,
    device: str | torch.device,
) -> ModelResult:
    topology = dataset.topology
    overall = MetricAccumulator.for_topology(topology)
    by_speaker: dict[str, MetricAccumulator] = {}
    error_sum = np.zeros(topology.num_vertices)
    frames = 0
    result = ModelResult(name, {}, {}, error_sum)
    for index, (seq, template, predicted) in enumerate(
        predictions(model, sequences, dataset.templates, device)
    ):
        overall.add(predicted, seq.vertices, template)
        by_speaker.setdefault(seq.speaker, MetricAccumulator.for_topology(topology)).add(
            predicted, seq.vertices, template
        )
        error = np.linalg.norm(predicted - seq.vertices, axis=-1)
        error_sum += error.sum(axis=0)
        frames += len(error)
        if index < previews:
            result.previews.append(_preview(name, seq, predicted, topology, files, config))
    result.scores = overall.result().as_dict()
    result.speakers = {s: acc.result().as_dict() for s, acc in sorted(by_speaker.items())}
    result.vertex_error = error_sum / max(frames, 1)
    return result


def _preview(
    name: str,
    seq: Sequence,
    predicted: np.ndarray,
    topology: Topology,
    files: Path,
    config: RenderConfig | None,
) -> tuple[str, str, str]:
    """A comparison video of one sequence and a still of its middle frame; their file names."""
    stem = f"{_slug(name)}_{_slug(seq.sequence_id)}"
    truth = seq.vertices.astype(np.float32)
    video = files / f"{stem}.mp4"
    write_comparison(
        truth, predicted, topology.faces, video, seq.fps,
        audio=(seq.audio, seq.sample_rate), config=config,
    )  # fmt: skip
    still = comparison_still(truth, predicted, topology.faces, config)
    return seq.sequence_id, video.name, save_png(still, files / f"{stem}.png").name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _html(
    dataset: Dataset,
    split: str,
    count: int,
    results: list[ModelResult],
    heatmaps: list[str],
    regions: dict[str, np.ndarray],
    vmax: float,
    folder: str,
) -> str:
    e = html.escape
    folder = e(quote(folder))
    labels = "".join(f"<th>{e(label)}</th>" for label, _ in REPORTED.values())

    def cells(scores: dict[str, float]) -> str:
        return "".join(
            f"<td>{scores[k] * f:.3f}</td>" if math.isfinite(scores[k]) else "<td>-</td>"
            for k, (_, f) in REPORTED.items()
        )

    rows = "".join(f"<tr><th>{e(r.name)}</th>{cells(r.scores)}</tr>" for r in results)
    region_head = "".join(f"<th>{e(name)}</th>" for name in regions)
    region_rows = "".join(
        f"<tr><th>{e(r.name)}</th>"
        + "".join(f"<td>{r.vertex_error[idx].mean() * 1e3:.3f}</td>" for idx in regions.values())
        + "</tr>"
        for r in results
    )
    speaker_rows = "".join(
        f"<tr><th>{e(r.name)}</th><th>{e(speaker)}</th>{cells(scores)}</tr>"
        for r in results
        for speaker, scores in r.speakers.items()
    )
    figures = "".join(
        f'<figure><img src="{folder}/{e(png)}" alt="error heatmap of {e(r.name)}">'
        f"<figcaption>{e(r.name)}</figcaption></figure>"
        for r, png in zip(results, heatmaps, strict=True)
    )
    videos = "".join(
        f'<figure><a href="{folder}/{e(mp4)}"><img src="{folder}/{e(png)}" '
        f'alt="{e(r.name)} on {e(seq)}"></a><video controls preload="none" '
        f'src="{folder}/{e(mp4)}"></video><figcaption>{e(r.name)}: {e(seq)} (ground truth | '
        "prediction | error)</figcaption></figure>"
        for r in results
        for seq, mp4, png in r.previews
    )
    speakers = ", ".join(dataset.manifest.splits[split].speakers)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MMTalker evaluation: {e(dataset.uri)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}figure{{display:inline-block;
margin:.5em;vertical-align:top}}img,video{{max-width:768px;display:block}}</style></head><body>
<h1>Evaluation</h1>
<p>Dataset <code>{e(dataset.uri)}</code>, split <b>{e(split)}</b>: {count} sequences, speakers
{e(speakers)}. Vertices in metres; the columns are scaled as the published tables print them.</p>
<h2>Metrics</h2><table><tr><th>model</th>{labels}</tr>{rows}</table>
<h2>Mean vertex error by region (mm)</h2>
<table><tr><th>model</th>{region_head}</tr>{region_rows}</table>
<h2>Error heatmaps</h2><p>Mean L2 error per vertex over every frame, from 0 (dark) to
{vmax * 1e3:.3g} mm (yellow), on one colour scale for all models.</p>{figures}
<h2>Previews</h2>{videos or "<p>none requested</p>"}
<h2>Per speaker</h2><table><tr><th>model</th><th>speaker</th>{labels}</tr>{speaker_rows}</table>
</body></html>
"""
