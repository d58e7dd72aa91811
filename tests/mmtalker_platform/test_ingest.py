"""Ray Data ingest of shards: decoded rows, equal streaming shares, length-grouped batches."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ray.data import DataIterator

from mmtalker.data.sequence import Sequence
from mmtalker.data.shards import MANIFEST, open_dataset
from mmtalker.storage import S3Settings
from mmtalker.training import displacement_scale, training_templates
from mmtalker_platform.datasets import epoch_batches, read_split, training_displacement_scale

pytestmark = pytest.mark.timeout(120)


def test_split_rows_decode_to_the_stored_sequences(local_ray: None, tiny_corpus_s3: str) -> None:
    dataset = open_dataset(tiny_corpus_s3, S3Settings())
    rows = read_split(dataset, "val", S3Settings()).take_all()
    expected = {s.sequence_id: s for s in dataset.sequences("val")}
    assert sorted(r["sequence_id"] for r in rows) == sorted(expected)
    for row in rows:
        seq = expected[row["sequence_id"]]
        np.testing.assert_array_equal(row["vertices"], seq.vertices)
        np.testing.assert_array_equal(row["audio"], seq.audio)
        np.testing.assert_array_equal(row["phones"], seq.phones)
        assert row["speaker"] == seq.speaker and row["sample_rate"] == seq.sample_rate


@pytest.mark.parametrize("cache", [False, True])
def test_streaming_shares_give_equal_length_grouped_batches(
    local_ray: None, tiny_corpus_s3: str, cache: bool
) -> None:
    dataset = open_dataset(tiny_corpus_s3, S3Settings())
    shares = read_split(dataset, "train", S3Settings(), cache).streaming_split(2, equal=True)

    def two_epochs(share: DataIterator) -> list[list[list[Sequence]]]:
        return [list(epoch_batches(share, 4, 16, seed)) for seed in (0, 1)]

    # Shares of a streaming split must be read concurrently, as training workers do.
    with ThreadPoolExecutor(2) as pool:
        epochs = list(pool.map(two_epochs, shares))
    seen = [s.sequence_id for share in epochs for batch in share[0] for s in batch]
    assert len(seen) == len(set(seen))  # nothing twice within an epoch
    assert len(seen) >= dataset.manifest.splits["train"].num_sequences - 1
    counts = [[len(epoch) for epoch in share] for share in epochs]
    assert counts[0] == counts[1]  # DDP needs the same number of steps on every worker
    for share in epochs:
        first, second = ([s.sequence_id for b in epoch for s in b] for epoch in share)
        assert first != second and sorted(first) == sorted(second)  # reshuffled per epoch
        for batch in share[0]:
            lengths = [s.num_frames for s in batch]
            assert max(lengths) - min(lengths) <= 0.5 * max(lengths)
            # Phone labels travel with their rows, for the phone loss of distributed training.
            assert all(s.phones is not None and len(s.phones) == s.num_frames for s in batch)


def test_displacement_scale_as_recorded_or_in_one_distributed_pass(
    local_ray: None, tiny_corpus: str, tmp_path: Path
) -> None:
    dataset = open_dataset(tiny_corpus)
    templates = training_templates(dataset)
    expected = displacement_scale(dataset.sequences("train"), templates)
    recorded = training_displacement_scale(dataset, read_split(dataset, "train"), templates)
    assert recorded == pytest.approx(expected, rel=1e-6)
    # A dataset written before the writer recorded the scale is measured instead.
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_corpus, legacy)
    manifest = json.loads((legacy / MANIFEST).read_text())
    for split in manifest["splits"].values():
        del split["displacement_rms"]
    (legacy / MANIFEST).write_text(json.dumps(manifest))
    old = open_dataset(str(legacy))
    assert old.manifest.splits["train"].displacement_rms is None
    measured = training_displacement_scale(old, read_split(old, "train"), templates)
    assert measured == pytest.approx(expected, rel=1e-6)
