"""Batches of similar-length sequences, so padding wastes little of a step.

numpy only: Ray Data's tasks and actors import this through the platform's dataset module, and
every such process would otherwise load torch and the audio augmentations first.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq

import numpy as np

from mmtalker.data.sequence import Sequence

#: Batches' worth of sequences sorted by length together before cutting batches.
LENGTH_POOL_BATCHES = 8


def length_batches(
    sequences: Seq[Sequence], batch_size: int, rng: np.random.Generator
) -> Iterator[list[Sequence]]:
    """Shuffled batches of similar length (little padding): sort within random pools."""
    order = rng.permutation(len(sequences))
    pool = batch_size * LENGTH_POOL_BATCHES
    groups = []
    for start in range(0, len(order), pool):
        chunk = [sequences[i] for i in order[start : start + pool]]
        groups += similar_length_groups(chunk, batch_size)
    for index in rng.permutation(len(groups)):
        yield groups[index]


def similar_length_groups(pool: Seq[Sequence], batch_size: int) -> list[list[Sequence]]:
    """A pool of sequences sorted by length and cut into batches (the last may be short)."""
    ordered = sorted(pool, key=lambda s: s.num_frames)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
