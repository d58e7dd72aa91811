import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtalker.checkpoint import load_checkpoint, save_checkpoint
from mmtalker.data.batch import Batch, collate
from mmtalker.data.face import make_template
from mmtalker.data.shards import open_dataset
from mmtalker.data.synth import SynthConfig, synthesize_corpus
from mmtalker.errors import MMTalkerError, TemplateError
from mmtalker.losses import LossConfig
from mmtalker.nn.faceformer import (
    FaceFormer,
    FaceFormerConfig,
    alibi_slopes,
    alignment_mask,
    periodic_bias_mask,
)
from mmtalker.nn.speech import SpeechConfig
from mmtalker.training import TrainConfig, Trainer

SAMPLES_PER_FRAME = 16000 // 30
TEMPLATE = make_template(600)


def _config(**overrides: object) -> FaceFormerConfig:
    fields: dict[str, object] = dict(
        speech=SpeechConfig(dim=32, levels=2, n_mels=16),
        dim=32,
        heads=2,
        ff_dim=64,
        period=4,
        max_frames=40,
    )
    return FaceFormerConfig(**(fields | overrides))


def _model(**overrides: object) -> FaceFormer:
    torch.manual_seed(0)
    templates = {"a": TEMPLATE.vertices, "b": TEMPLATE.vertices * 1.01}
    return FaceFormer(_config(**overrides), TEMPLATE.topology, templates)


def _randomise_output(model: FaceFormer) -> None:
    """Give the zero-initialised motion decoder weights so outputs carry information."""
    torch.nn.init.normal_(model.motion_decoder.weight, std=0.1)


def _batch(frames: int = 12, batch: int = 2) -> Batch:
    rng = np.random.default_rng(0)
    vertices = TEMPLATE.topology.num_vertices
    disp = 0.01 * rng.standard_normal((batch, frames, vertices, 3)).astype(np.float32)
    return Batch(
        audio=torch.from_numpy(rng.standard_normal((batch, frames * SAMPLES_PER_FRAME)))
        .float()
        .mul(0.1),
        audio_lengths=torch.tensor([frames * SAMPLES_PER_FRAME, (frames - 3) * SAMPLES_PER_FRAME]),
        displacements=torch.from_numpy(disp).cumsum(1),
        frame_lengths=torch.tensor([frames, frames - 3]),
        templates=torch.from_numpy(np.stack([TEMPLATE.vertices] * batch)),
        speakers=torch.tensor([0, 1]),
    )


def test_config_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match=r"speech\.dim"):
        FaceFormerConfig(dim=64)
    with pytest.raises(ValueError, match="divisible"):
        FaceFormerConfig(speech=SpeechConfig(dim=30), dim=30, heads=4)


def test_masks_follow_faceformer() -> None:
    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert len(alibi_slopes(6)) == 6
    bias = periodic_bias_mask(2, 7, 3)
    assert torch.isinf(bias[:, 2, 3:]).all() and not torch.isinf(bias[:, 2, :3]).any()
    # Distances 0..2 share a bias, 3..5 the next step: -slope * floor(distance / period).
    slope = alibi_slopes(2)[0]
    assert bias[0, 6].tolist() == [-2 * slope] + [-slope] * 3 + [0.0] * 3
    cross = alignment_mask(4)
    assert (cross.diagonal() == 0).all() and torch.isinf(cross).sum() == 12


def test_fresh_model_predicts_the_template() -> None:
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        out = model.predict(batch.audio, 12, batch.templates, batch.speakers)
    assert out.shape == (2, 12, 600, 3)
    assert torch.count_nonzero(out) == 0


def test_training_loss_shapes_and_gradients() -> None:
    model = _model()
    loss, logs = model.training_loss(_batch(), LossConfig())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(logs) == {"loss", "position", "velocity", "lip_max"}
    loss.backward()
    assert model.motion_decoder.weight.grad.abs().sum() > 0
    # Only the deepest speech level is used: DDP must be told to look for unused parameters.
    unused = {n for n, p in model.named_parameters() if p.grad is None}
    levels = model.config.speech.levels
    assert unused == {
        f"speech.heads.{i}.{w}" for i in range(levels - 1) for w in ("weight", "bias")
    }
    assert not model.all_parameters_used


def test_self_attention_is_causal() -> None:
    model = _model(layers=2).eval()
    _randomise_output(model)
    batch = _batch()
    with torch.no_grad():
        features = model.audio_features(batch.audio, 12)
        style = model.styles(batch.speakers, 2)
        motion = batch.displacements / model.displacement_scale
        changed = motion.clone()
        changed[:, 5] += 1.0
        before, after = (
            model.teacher_forced(features, motion, style),
            model.teacher_forced(features, changed, style),
        )
    # Frame 5's motion is the decoder input of frame 6.
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_cross_attention_is_aligned() -> None:
    model = _model(layers=2).eval()
    _randomise_output(model)
    batch = _batch()
    with torch.no_grad():
        features = model.audio_features(batch.audio, 12)
        style = model.styles(batch.speakers, 2)
        motion = batch.displacements / model.displacement_scale
        changed = features.clone()
        changed[:, 5] += 1.0
        before, after = (
            model.teacher_forced(features, motion, style),
            model.teacher_forced(changed, motion, style),
        )
    torch.testing.assert_close(before[:, :5], after[:, :5])
    # Frame 5 hears the change; with two layers, later frames see it through frame 5's state.
    assert not torch.allclose(before[:, 5], after[:, 5])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_autoregressive_inference_matches_teacher_forcing_on_its_own_output() -> None:
    model = _model().eval()
    _randomise_output(model)
    batch = _batch()
    with torch.no_grad():
        style = model.prepare(batch.templates, batch.speakers)
        animated = model.animate(batch.audio, 12, style) / model.displacement_scale
        forced = model.teacher_forced(model.audio_features(batch.audio, 12), animated, style)
    torch.testing.assert_close(animated, forced, rtol=1e-4, atol=1e-5)


def test_unknown_speakers_get_the_mean_style() -> None:
    model = _model().eval()
    _randomise_output(model)
    batch = _batch()
    with torch.no_grad():
        styles = model.styles(torch.tensor([-1, 1]), 2)
        out = model.predict(batch.audio, 8, batch.templates, torch.tensor([-1, -1]))
        unconditioned = model.predict(batch.audio, 8, batch.templates)
    torch.testing.assert_close(styles[0], model.style_embedding.weight.mean(0))
    torch.testing.assert_close(styles[1], model.style_embedding.weight[1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, unconditioned)
    batch.speakers = torch.tensor([-1, 0])
    loss, _ = model.training_loss(batch, LossConfig())
    assert torch.isfinite(loss)


def test_adam_steps_reduce_the_loss() -> None:
    model = _model(dropout=0.0)
    batch = _batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = model.training_loss(batch, LossConfig())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_too_many_frames_is_a_clear_error() -> None:
    model = _model().eval()
    batch = _batch(frames=41)
    with pytest.raises(MMTalkerError, match="at most 40 frames"):
        model.predict(batch.audio, 41, batch.templates)
    with pytest.raises(MMTalkerError, match="at most 40 frames"):
        model.training_loss(batch, LossConfig())


def test_other_point_sets_are_refused() -> None:
    model = _model()
    with pytest.raises(TemplateError, match="fixed vertex set"):
        model.prepare(_batch().templates, points=object())
    with pytest.raises(TemplateError, match="600"):
        model.prepare(torch.zeros(1, 500, 3))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model().eval()
    _randomise_output(model)
    templates = {"a": TEMPLATE.vertices, "b": TEMPLATE.vertices * 1.01}
    save_checkpoint(tmp_path / "ckpt", model, templates, fps=30.0, sample_rate=16000)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    batch = _batch(frames=6)
    with torch.no_grad():
        expected = model.predict(batch.audio, 6, batch.templates, batch.speakers)
        torch.testing.assert_close(
            loaded.predict(batch.audio, 6, batch.templates, batch.speakers), expected
        )


def test_trainer_steps_on_a_synthetic_corpus(tmp_path: Path) -> None:
    config = SynthConfig.preset("tiny", speakers=3, sentences_per_speaker=2)
    synthesize_corpus(config, str(tmp_path / "corpus"))
    dataset = open_dataset(str(tmp_path / "corpus"))
    train = list(dataset.sequences("train"))
    torch.manual_seed(0)
    model = FaceFormer(_config(max_frames=64), dataset.topology, dataset.templates)
    speaker_index = {name: i for i, name in enumerate(model.speakers)}
    trainer = Trainer(model, TrainConfig(device="cpu", max_frames=48, batch_size=2), 3)
    for step in range(3):
        rng = np.random.default_rng(step)
        batch = collate(train[:2], dataset.templates, speaker_index, 48, rng)
        logs = trainer.step(batch)
        assert {"position", "velocity"} <= set(logs)
        assert all(np.isfinite(value) for value in logs.values())


@pytest.mark.parametrize("phone_features", [False, True])
def test_phone_readout_adds_the_phone_loss_and_reaches_every_level(phone_features: bool) -> None:
    speech = SpeechConfig(
        dim=32, levels=2, n_mels=16, phone_classes=5, phone_features=phone_features
    )
    model = _model(speech=speech)
    batch = dataclasses.replace(_batch(), phones=torch.randint(-1, 5, (2, 12)))
    objective, logs = model.training_loss(batch, LossConfig(phones=0.5))
    assert logs["phones"] > 0
    assert objective.item() == pytest.approx(logs["loss"] + 0.5 * logs["phones"], rel=1e-5)
    objective.backward()
    # The readout reads every level, so the shallow levels' heads are trained too (and with
    # phone features, the decoder's reading of the posteriors).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert (model.phone_readout.feedback is not None) == phone_features


def test_speech_motion_gradient_reaches_the_speech_encoder() -> None:
    model = _model(speech=SpeechConfig(dim=32, levels=2, n_mels=16, phone_classes=5))
    _randomise_output(model)
    for scale in (0.0, 1.0):
        model.zero_grad()
        config = LossConfig(phones=0.0, speech_motion_gradient=scale)
        model.training_loss(_batch(), config)[0].backward()
        grads = [p.grad for p in model.speech.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == (scale > 0)
    assert model.motion_gradient(LossConfig()) == 1.0
