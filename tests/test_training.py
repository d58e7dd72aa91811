import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtalker.checkpoint import build_model, load_checkpoint, save_checkpoint
from mmtalker.data.batch import Batch, collate
from mmtalker.data.sequence import frame_samples
from mmtalker.data.shards import open_dataset
from mmtalker.errors import MMTalkerError
from mmtalker.geometry.uv import attach_uv
from mmtalker.inference import animate
from mmtalker.losses import LossConfig
from mmtalker.nn.mmtalker import SPECTRAL_FEATURES, MMTalkerConfig
from mmtalker.nn.speech import REGISTER_HZ
from mmtalker.training import (
    TrainConfig,
    Trainer,
    autocast_dtype,
    displacement_scale,
    evaluate,
    fit,
    model_for_dataset,
    new_model_config,
    new_speech_config,
    predictions,
    training_templates,
)


def test_precision_is_full_on_cpu() -> None:
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is None


def test_short_training_beats_the_static_template(
    tiny_corpus: str, small_config: MMTalkerConfig
) -> None:
    """The acceptance check of the model: held-out speaker and sentences, validation LVE."""
    torch.manual_seed(0)
    ds = open_dataset(tiny_corpus)
    train = {s: ds.templates[s] for s in ds.manifest.splits["train"].speakers}
    topology = attach_uv(ds.topology, np.mean(list(train.values()), axis=0))
    model = build_model("mmtalker", small_config, topology, train)
    static = build_model("static", {}, topology, train)
    config = TrainConfig(epochs=12, batch_size=4, learning_rate=3e-3, warmup_steps=10)
    history = fit(model, ds, config)
    baseline = evaluate(static, ds.sequences("val"), ds.templates)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_lve"] < 0.7 * baseline.lve
    assert history[-1]["val_mve"] < 0.75 * baseline.mve
    # The learnt sampler concentrates where the error is: on the lips.
    assert model.sampler.density_ratio(topology.region("lips")) > 2.0


def _fixed_batch_trainer(
    tiny_corpus: str, small_model: torch.nn.Module, weight_average: float = 0.995
) -> tuple[Trainer, Batch]:
    """A trainer of a small MMTalker and one batch of two training sequences to step it on."""
    ds = open_dataset(tiny_corpus)
    seqs = list(ds.sequences("train"))[:2]
    # A model built on the tiny corpus' topology, not the fixture's face.
    train = {s: ds.templates[s] for s in ds.manifest.splits["train"].speakers}
    topology = attach_uv(ds.topology, np.mean(list(train.values()), axis=0))
    torch.manual_seed(0)
    model = build_model("mmtalker", small_model.config, topology, train)
    model.displacement_scale.fill_(displacement_scale(seqs, ds.templates))
    config = TrainConfig(learning_rate=3e-3, warmup_steps=1, weight_average=weight_average)
    return Trainer(model, config, total_steps=30), collate(seqs, ds.templates, {}, max_frames=30)


def test_trainer_steps_reduce_the_loss_on_a_fixed_batch(
    tiny_corpus: str, small_model: torch.nn.Module
) -> None:
    trainer, batch = _fixed_batch_trainer(tiny_corpus, small_model)
    first = trainer.step(batch)
    for _ in range(15):
        last = trainer.step(batch)
    assert last["loss"] < first["loss"]
    assert np.isfinite(last["grad_norm"])


def test_the_scored_weights_are_a_moving_average_of_the_training_weights(
    tiny_corpus: str, small_model: torch.nn.Module
) -> None:
    trainer, batch = _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.5)
    expected = None
    for updates in range(4):
        trainer.step(batch)
        current = [p.detach().clone() for p in trainer.module.parameters()]
        # The decay ramps up as (1 + n) / (10 + n) towards 0.5; the first update copies.
        decay = min(0.5, (1 + updates) / (10 + updates))
        expected = (
            current
            if expected is None
            else [a + (1 - decay) * (c - a) for a, c in zip(expected, current, strict=True)]
        )
    scored = list(trainer.scored.parameters())
    assert all(torch.allclose(s, e, atol=1e-6) for s, e in zip(scored, expected, strict=True))
    assert not all(torch.equal(s, c) for s, c in zip(scored, current, strict=True))
    plain, _ = _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.0)
    assert plain.scored is plain.module


def test_a_resumed_trainer_continues_the_weights_and_their_average(
    tiny_corpus: str, small_model: torch.nn.Module
) -> None:
    first, batch = _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.9)
    for _ in range(3):
        first.step(batch)
    # Through a file, as workers checkpoint it: tensors and numbers only.
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    second, _ = _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.9)
    second.load_state_dict(state)
    for trainer in (first, second):
        torch.manual_seed(1)
        trainer.step(batch)
    for a, b in ((first.module, second.module), (first.scored, second.scored)):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(MMTalkerError, match="predates weight averaging"):
        second.load_state_dict({k: v for k, v in state.items() if k != "weights"})
    with pytest.raises(MMTalkerError, match="model of another shape"):
        extra = {**state["weights"], "spectral": torch.ones(3)}
        second.load_state_dict({**state, "weights": extra})
    plain, _ = _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.0)
    with pytest.raises(MMTalkerError, match="no weight average"):
        _fixed_batch_trainer(tiny_corpus, small_model, weight_average=0.9)[0].load_state_dict(
            plain.state_dict()
        )


def test_new_light_encoders_get_the_new_defaults_unless_the_config_says_otherwise(
    tiny_corpus: str, tmp_path: Path
) -> None:
    dataset = open_dataset(tiny_corpus)
    speech = {"dim": 32, "levels": 2, "n_mels": 32}
    config = {"speech": speech, "dim": 32, "heads": 2}
    model = model_for_dataset("faceformer", config, dataset)
    assert model.config.speech.register_hz == REGISTER_HZ
    assert (model.config.speech.width, model.config.speech.multirate) == (48, True)
    off = {**config, "speech": {**speech, "register_hz": None, "width": None, "multirate": False}}
    stated = model_for_dataset("faceformer", off, dataset).config.speech
    assert (stated.register_hz, stated.width, stated.multirate) == (None, None, False)
    assert new_speech_config({}, [])["width"] == 192
    # A checkpoint's config is rebuilt as stored: it keeps the option, and one written before
    # the option existed (no such key) loads without it.
    folder = save_checkpoint(tmp_path / "ck", model, training_templates(dataset), 30.0, 16000)
    assert load_checkpoint(folder).model.config.speech.register_hz == REGISTER_HZ
    stored = json.loads((folder / "config.json").read_text())
    del stored["config"]["speech"]["register_hz"]
    (folder / "config.json").write_text(json.dumps(stored))
    assert load_checkpoint(folder).model.config.speech.register_hz is None
    assert new_speech_config({"kind": "pretrained", "path": "wavlm"}, []) == {
        "kind": "pretrained",
        "path": "wavlm",
    }


def test_new_mmtalker_heads_read_the_eigenfunctions_unless_the_config_says_otherwise(
    tiny_corpus: str, small_config: MMTalkerConfig, tmp_path: Path
) -> None:
    dataset = open_dataset(tiny_corpus)
    config = small_config.model_dump(exclude={"spectral_features"})
    model = model_for_dataset("mmtalker", config, dataset)
    assert model.config.spectral_features == SPECTRAL_FEATURES
    off = model_for_dataset("mmtalker", {**config, "spectral_features": 0}, dataset)
    assert off.spectral is None
    # Only a head that reads them gets the option (the baseline's config has no such field).
    assert "spectral_features" not in new_model_config("faceformer", {}, [])
    # The eigenfunctions travel with the weights, and a checkpoint from before they existed
    # (no such key) loads without them.
    folder = save_checkpoint(tmp_path / "ck", model, training_templates(dataset), 30.0, 16000)
    torch.testing.assert_close(load_checkpoint(folder).model.spectral, model.spectral)
    folder = save_checkpoint(tmp_path / "old", off, training_templates(dataset), 30.0, 16000)
    stored = json.loads((folder / "config.json").read_text())
    del stored["config"]["spectral_features"]
    (folder / "config.json").write_text(json.dumps(stored))
    assert load_checkpoint(folder).model.spectral is None


def test_a_phone_loss_gives_models_of_labelled_corpora_a_phone_readout(
    tiny_corpus: str, small_config: MMTalkerConfig
) -> None:
    dataset = open_dataset(tiny_corpus)
    configs = {
        # Left unset, so that the phone loss's default (the decoder reads the posteriors) applies.
        "mmtalker": small_config.model_dump(exclude={"speech": {"phone_features"}}),
        "faceformer": {"speech": {"dim": 32, "levels": 2, "n_mels": 32}, "dim": 32, "heads": 2},
    }
    for kind, config in configs.items():
        model = model_for_dataset(kind, config, dataset, LossConfig())
        assert model.config.speech.phone_classes == len(dataset.manifest.phone_names)
        assert model.phone_readout.feedback is not None
        # The decoder reads the posteriors unless the config says otherwise.
        speech = {**config["speech"], "phone_features": False}
        model = model_for_dataset(kind, {**config, "speech": speech}, dataset, LossConfig())
        assert model.phone_readout.feedback is None
        assert model_for_dataset(kind, config, dataset, LossConfig(phones=0)).phone_readout is None
    # A corpus without phone labels trains without the readout, phone loss or not.
    dataset.manifest = dataset.manifest.model_copy(update={"phone_names": []})
    model = model_for_dataset("mmtalker", configs["mmtalker"], dataset, LossConfig(phones=0.2))
    assert model.phone_readout is None


def test_evaluation_predicts_what_animation_delivers(
    tiny_corpus: str, small_config: MMTalkerConfig
) -> None:
    # The scores must be those of the faces users get: both pad a clip's audio to whole frames,
    # and without that padding the frames' speech features come from earlier in the clip.
    dataset = open_dataset(tiny_corpus)
    torch.manual_seed(0)
    model = model_for_dataset("mmtalker", small_config.model_dump(), dataset)
    torch.nn.init.normal_(model.head.coefficients[-1].weight, std=0.5)
    seq = next(
        s
        for s in dataset.sequences("test")
        if s.audio.size < frame_samples(s.num_frames, s.sample_rate / s.fps) - 50
    )
    template = dataset.templates[seq.speaker]
    _, _, predicted = next(predictions(model, [seq], dataset.templates))
    delivered = animate(
        seq.audio, template, model, sample_rate=seq.sample_rate,
        model_sample_rate=seq.sample_rate, fps=seq.fps,
    )  # fmt: skip
    assert predicted.shape == delivered.shape == seq.vertices.shape
    np.testing.assert_allclose(predicted, delivered, atol=1e-5)
    with torch.no_grad():
        unpadded = model.predict(
            torch.tensor(seq.audio)[None], seq.num_frames, torch.tensor(template)[None]
        )[0].numpy()
    assert np.abs(template + unpadded - predicted).max() > 1e-4
