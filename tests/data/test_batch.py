"""Batches: padding, cropping and alignment."""

import dataclasses

import numpy as np
import pytest

from mmtalker.data.batch import collate
from mmtalker.data.sequence import frame_samples
from mmtalker.data.shards import open_dataset
from mmtalker.data.visemes import PHONES


def test_collate_pads_crops_and_aligns(tiny_corpus: str) -> None:
    ds = open_dataset(tiny_corpus)
    seqs = list(ds.sequences("train"))[:3]
    batch = collate(seqs, ds.templates, {"spk00": 0}, max_frames=20, rng=np.random.default_rng(0))
    assert batch.displacements.shape[:2] == (3, 20)
    assert (batch.frame_lengths == 20).all()
    assert batch.audio.shape[1] == pytest.approx(20 * 16000 / 30, abs=2)
    assert batch.speakers.tolist() == [0 if s.speaker == "spk00" else -1 for s in seqs]
    whole = collate(seqs, ds.templates, {})
    first = seqs[0]
    np.testing.assert_allclose(
        whole.displacements[0, : first.num_frames].numpy(),
        first.vertices - ds.templates[first.speaker],
        atol=1e-7,
    )
    assert whole.frame_mask()[0].sum() == first.num_frames


def test_collate_crops_phone_labels_with_their_frames(tiny_corpus: str) -> None:
    ds = open_dataset(tiny_corpus)
    seqs = list(ds.sequences("train"))[:3]
    assert ds.manifest.phone_names == list(PHONES)
    whole = collate(seqs, ds.templates, {})
    for row, seq in enumerate(seqs):
        np.testing.assert_array_equal(whole.phones[row, : seq.num_frames].numpy(), seq.phones)
        assert (whole.phones[row, seq.num_frames :] == -1).all()
    crops = collate(seqs, ds.templates, {}, max_frames=20, rng=np.random.default_rng(3))
    for row, seq in enumerate(seqs):
        # Where the crop's frames start in the sequence, its labels start too.
        full = seq.vertices - ds.templates[seq.speaker]
        start = next(
            s
            for s in range(seq.num_frames - 19)
            if np.allclose(full[s : s + 20], crops.displacements[row].numpy(), atol=1e-7)
        )
        np.testing.assert_array_equal(crops.phones[row].numpy(), seq.phones[start : start + 20])
    unlabelled = [dataclasses.replace(seq, phones=None) for seq in seqs]
    assert collate(unlabelled, ds.templates, {}).phones is None


def test_collate_pads_audio_to_whole_frames(tiny_corpus: str) -> None:
    # Corpus audio ends inside its last frame; the encoders spread frames over the padded batch
    # length, so a batch's audio must span its frames exactly, the tail marked as padding.
    ds = open_dataset(tiny_corpus)
    seqs = list(ds.sequences("train"))[:3]
    batch = collate(seqs, ds.templates, {})
    per_frame = seqs[0].sample_rate / seqs[0].fps
    assert batch.audio.shape[1] == frame_samples(batch.num_frames, per_frame)
    assert batch.audio_lengths.tolist() == [s.audio.size for s in seqs]
    longest = max(range(len(seqs)), key=lambda i: seqs[i].num_frames)
    assert seqs[longest].audio.size < batch.audio.shape[1]
    assert (batch.audio[longest, seqs[longest].audio.size :] == 0).all()
