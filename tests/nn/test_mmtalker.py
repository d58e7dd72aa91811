import dataclasses

import numpy as np
import pytest
import torch

from mmtalker.data.batch import Batch
from mmtalker.errors import TemplateError
from mmtalker.geometry.uv import locate_uv, subdivide
from mmtalker.losses import LossConfig
from mmtalker.nn.fusion import DualCrossAttentionFusion
from mmtalker.nn.gcn import MeshEncoder, farthest_point_clusters, mesh_edges
from mmtalker.nn.mmtalker import MMTalker, MMTalkerConfig, PointSet
from mmtalker.nn.speech import SpeechConfig


def _batch(templates: dict[str, np.ndarray], frames: int = 12) -> Batch:
    torch.manual_seed(1)
    faces = torch.as_tensor(np.stack(list(templates.values())))
    num_vertices = faces.shape[1]
    return Batch(
        audio=torch.randn(2, frames * 533) * 0.1,
        audio_lengths=torch.tensor([frames * 533, frames * 533 - 2000]),
        displacements=torch.randn(2, frames, num_vertices, 3) * 0.003,
        frame_lengths=torch.tensor([frames, frames - 4]),
        templates=faces,
        speakers=torch.tensor([0, 1]),
    )


def test_predict_shapes_and_units(small_model: MMTalker, small_face: tuple) -> None:
    templates, topology = small_face
    batch = _batch(templates)
    out = small_model.eval().predict(batch.audio, 12, batch.templates)
    assert out.shape == (2, 12, topology.num_vertices, 3)
    assert torch.isfinite(out).all()


def test_a_fresh_model_starts_next_to_the_neutral_face(
    small_model: MMTalker, small_face: tuple
) -> None:
    # No ripples over the face at the start: displacements are a small fraction of the data's
    # typical displacement (the model's unit).
    batch = _batch(small_face[0])
    out = small_model.eval().predict(batch.audio, 12, batch.templates)
    assert 0 < out.abs().max() < 0.1 * small_model.displacement_scale


def test_training_loss_reaches_every_part_and_the_sampler(
    small_model: MMTalker, small_face: tuple
) -> None:
    # From the neutral start only the output layer learns at first; once it has moved (one
    # optimiser step), the loss reaches every part.
    torch.nn.init.normal_(small_model.head.coefficients[-1].weight, std=0.1)
    loss, logs = small_model.train().training_loss(_batch(small_face[0]), LossConfig(points=64))
    loss.backward()
    assert set(logs) >= {"loss", "position", "velocity", "coverage"}
    for name in ("speech", "mesh", "fusion", "head"):
        grads = [p.grad for n, p in small_model.named_parameters() if n.startswith(name + ".")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert small_model.sampler.logits.grad.abs().sum() > 0
    # DistributedDataParallel requires a gradient for every parameter, every step.
    assert [n for n, p in small_model.named_parameters() if p.grad is None] == []


def test_padding_frames_do_not_change_the_loss(small_model: MMTalker, small_face: tuple) -> None:
    small_model.eval()
    batch = _batch(small_face[0])
    torch.manual_seed(5)
    first = small_model.training_loss(batch, LossConfig(points=64))[1]["loss"]
    batch.displacements[1, 8:] = 1.0  # beyond frame_lengths[1] = 8
    torch.manual_seed(5)
    second = small_model.training_loss(batch, LossConfig(points=64))[1]["loss"]
    assert first == pytest.approx(second, rel=1e-5)


def test_prepared_state_is_reused_across_chunks(small_model: MMTalker, small_face: tuple) -> None:
    templates = small_face[0]
    batch = _batch(templates)
    small_model.eval()
    state = small_model.prepare(batch.templates)
    with torch.no_grad():
        direct = small_model.predict(batch.audio, 12, batch.templates)
        reused = small_model.animate(batch.audio, 12, state)
    torch.testing.assert_close(direct, reused)
    assert state.basis.shape[::2] == (2, 3 * small_face[1].num_vertices)


def test_point_set_at_the_vertices_equals_the_vertex_prediction(
    small_model: MMTalker, small_face: tuple
) -> None:
    templates, topology = small_face
    batch = _batch(templates)
    small_model.eval()
    points = PointSet(torch.as_tensor(topology.uv), batch.templates)
    with torch.no_grad():
        at_points = small_model.animate(
            batch.audio, 12, small_model.prepare(batch.templates, None, points)
        )
        at_vertices = small_model.predict(batch.audio, 12, batch.templates)
    torch.testing.assert_close(at_points, at_vertices)


@pytest.mark.parametrize("spectral", [0, 8])
def test_animates_a_subdivided_mesh(
    small_config: MMTalkerConfig, small_face: tuple, spectral: int
) -> None:
    """A model of the base mesh drives a 4x subdivided one; its base vertices move alike (with
    eigenfunctions in the head: read on the triangle each point lies on)."""
    templates, topology = small_face
    torch.manual_seed(0)
    config = small_config.model_copy(update={"spectral_features": spectral})
    model = MMTalker(config, topology, templates).eval()
    torch.nn.init.normal_(model.head.coefficients[-1].weight, std=0.5)
    template = templates["s0"]
    vertices, faces, uv = subdivide(template, topology.faces, topology.uv, iterations=1)
    assert len(faces) == 4 * len(topology.faces)
    face_index, bary = locate_uv(topology.uv, topology.faces, uv)
    base = torch.as_tensor(template)[None]
    points = PointSet(torch.as_tensor(uv), torch.as_tensor(vertices)[None])
    audio = torch.randn(1, 8000) * 0.1
    with torch.no_grad():
        fine = model.animate(audio, 15, model.prepare(base, None, points))
        coarse = model.predict(audio, 15, base)
    assert fine.shape == (1, 15, len(vertices), 3)
    torch.testing.assert_close(fine[:, :, : topology.num_vertices], coarse, rtol=1e-4, atol=1e-7)
    assert len(face_index) == len(vertices) and np.allclose(bary.sum(1), 1)
    # A point set that names its triangles is read there, without locating it again.
    surface = (torch.from_numpy(face_index), torch.from_numpy(bary))
    elsewhere = (torch.zeros_like(surface[0]), surface[1])
    with torch.no_grad():
        named, moved = (
            model.animate(audio, 15, model.prepare(base, None, located))
            for located in (dataclasses.replace(points, surface=at) for at in (surface, elsewhere))
        )
    torch.testing.assert_close(named, fine)
    assert spectral == 0 or not torch.allclose(moved, fine)


def test_a_spectral_head_keeps_and_learns_from_its_eigenfunctions(
    small_config: MMTalkerConfig, small_face: tuple
) -> None:
    templates, topology = small_face
    model = MMTalker(small_config.model_copy(update={"spectral_features": 8}), topology, templates)
    assert model.spectral.shape == (topology.num_vertices, 8)
    assert "spectral" in model.state_dict()
    torch.nn.init.normal_(model.head.coefficients[-1].weight, std=0.5)
    loss, _ = model.train().training_loss(_batch(templates), LossConfig(points=64))
    loss.backward()
    assert model.head.point_mlp[0].weight.grad[:, -8:].abs().sum() > 0
    base = torch.as_tensor(templates["s0"])[None]
    with pytest.raises(ValueError, match="reads 8 spectral features"):
        model.head.point_basis(torch.as_tensor(topology.uv), base)


def test_requires_a_uv_chart(small_config: MMTalkerConfig, small_face: tuple) -> None:
    templates, topology = small_face
    bare = type(topology)(topology.faces, topology.num_vertices, topology.regions)
    with pytest.raises(TemplateError, match="UV chart"):
        MMTalker(small_config, bare, templates)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"speech\.dim"):
        MMTalkerConfig(dim=64)
    with pytest.raises(ValueError, match="divisible"):
        MMTalkerConfig(dim=30, heads=4, speech=SpeechConfig(dim=30))


def test_mesh_hierarchy(small_face: tuple) -> None:
    templates, topology = small_face
    edges = mesh_edges(topology.faces)
    assert edges.shape[0] == 2 and (edges[0] != edges[1]).all()
    clusters = farthest_point_clusters(topology.uv, 12)
    assert set(clusters) == set(range(12))
    encoder = MeshEncoder(topology.faces, topology.uv, 16, (40, 10), blocks=1)
    tokens = encoder(torch.as_tensor(np.stack(list(templates.values()))) * 10)
    assert tokens.shape == (2, 10, 16)
    assert not torch.allclose(tokens[0], tokens[1])  # different faces, different tokens


def test_fusion_ignores_padding_frames() -> None:
    torch.manual_seed(0)
    fusion = DualCrossAttentionFusion(16, levels=2, heads=2, kernel=5, dropout=0.0).eval()
    levels = [torch.randn(1, 10, 16) for _ in range(2)]
    mesh = torch.randn(1, 6, 16)
    padded = [torch.cat([x, torch.randn(1, 10, 16) * 5], dim=1) for x in levels]
    padding = torch.arange(20)[None] >= 10
    with torch.no_grad():
        alone = fusion(levels, mesh, None)
        batched = fusion(padded, mesh, padding)
    torch.testing.assert_close(batched[:, :10], alone, rtol=1e-4, atol=1e-5)


def test_mesh_tokens_are_encoded_once_per_distinct_face(
    small_model: MMTalker, small_face: tuple
) -> None:
    faces = torch.as_tensor(np.stack(list(small_face[0].values())))
    repeated = faces[[0, 1, 0, 0, 1]]
    calls = []
    hook = small_model.mesh.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    with torch.no_grad():
        state = small_model.eval().prepare(repeated)
    hook.remove()
    assert [len(c) for c in calls] == [2]
    with torch.no_grad():
        single = small_model.prepare(faces[[1]])
    torch.testing.assert_close(state.tokens[4], single.tokens[0])


def test_animate_adds_into_a_given_buffer(small_model: MMTalker, small_face: tuple) -> None:
    batch = _batch(small_face[0])
    small_model.eval()
    with torch.no_grad():
        state = small_model.prepare(batch.templates)
        plain = small_model.animate(batch.audio, 12, state)
        out = torch.ones_like(plain)
        returned = small_model.animate(batch.audio, 12, state, out)
    assert returned is out
    torch.testing.assert_close(out, plain + 1)


def _with_phones(config: MMTalkerConfig, face: tuple, phone_features: bool = False) -> MMTalker:
    """A small MMTalker whose speech encoder has a 5-phone readout."""
    templates, topology = face
    speech = config.speech.model_copy(update={"phone_classes": 5, "phone_features": phone_features})
    torch.manual_seed(0)
    return MMTalker(config.model_copy(update={"speech": speech}), topology, templates)


def test_phone_readout_trains_the_speech_features(
    small_config: MMTalkerConfig, small_face: tuple
) -> None:
    model = _with_phones(small_config, small_face)
    batch = dataclasses.replace(_batch(small_face[0]), phones=torch.randint(-1, 5, (2, 12)))
    loss, logs = model.train().training_loss(batch, LossConfig(points=64, phones=1.0))
    loss.backward()
    assert logs["phones"] > 0
    assert model.phone_readout.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.speech.parameters())
    model.zero_grad()
    # A batch without labels adds nothing, yet keeps the readout in the graph (for DDP).
    loss, logs = model.training_loss(dataclasses.replace(batch, phones=None), LossConfig(points=64))
    loss.backward()
    assert logs["phones"] == 0
    assert model.phone_readout.linear.weight.grad is not None


def test_phone_features_reach_the_motion_in_training_and_inference(
    small_config: MMTalkerConfig, small_face: tuple
) -> None:
    model = _with_phones(small_config, small_face, phone_features=True)
    batch = _batch(small_face[0])
    loss, _ = model.train().training_loss(batch, LossConfig(points=64, phones=0.0))
    loss.backward()
    assert model.phone_readout.feedback.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        state = model.prepare(batch.templates)
        before = model.animate(batch.audio, 12, state)
        model.phone_readout.feedback.bias.add_(1.0)
        after = model.animate(batch.audio, 12, state)
    assert not torch.allclose(before, after)


def test_speech_motion_gradient_reaches_the_speech_encoder(
    small_config: MMTalkerConfig, small_face: tuple
) -> None:
    model = _with_phones(small_config, small_face)
    batch = _batch(small_face[0])
    for scale in (0.0, 1.0):
        model.zero_grad()
        config = LossConfig(points=64, phones=0.0, speech_motion_gradient=scale)
        model.train().training_loss(batch, config)[0].backward()
        grads = [p.grad for p in model.speech.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == (scale > 0)


def test_speech_motion_gradient_defaults_to_the_models_own(
    small_config: MMTalkerConfig, small_face: tuple
) -> None:
    model = MMTalker(small_config, small_face[1], small_face[0])
    assert model.motion_gradient(LossConfig()) == MMTalker.speech_motion_gradient < 1
    assert model.motion_gradient(LossConfig(speech_motion_gradient=1.0)) == 1.0
