"""Similar-length grouping of sequences into batches."""

import numpy as np

from mmtalker.data.grouping import length_batches
from mmtalker.data.shards import open_dataset


def test_length_batches_cover_everything_once(tiny_corpus: str) -> None:
    seqs = list(open_dataset(tiny_corpus).sequences("train"))
    groups = list(length_batches(seqs, 4, np.random.default_rng(0)))
    ids = sorted(s.sequence_id for g in groups for s in g)
    assert ids == sorted(s.sequence_id for s in seqs)
    assert all(len(g) <= 4 for g in groups)
