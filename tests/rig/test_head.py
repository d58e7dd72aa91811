"""A model trained on a coarse ICT face animates the whole head: maps, identities, outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mmtalker.checkpoint import Checkpoint
from mmtalker.data.shards import open_dataset
from mmtalker.errors import MMTalkerError, RigError
from mmtalker.inference import animate, animate_face, resolve_face
from mmtalker.io.export import write_outputs
from mmtalker.nn.mmtalker import MMTalkerConfig
from mmtalker.rig import load_ict
from mmtalker.rig.head import STILL_PARTS, head_neutral, head_regions, head_template
from mmtalker.training import model_for_dataset

RATE = 16000


@pytest.fixture(scope="module")
def checkpoint(ict_corpus: str, small_config: MMTalkerConfig) -> Checkpoint:
    """An untrained small MMTalker on the 600-vertex ICT corpus, its output layer randomised
    so it moves the face."""
    dataset = open_dataset(ict_corpus)
    torch.manual_seed(0)
    model = model_for_dataset("mmtalker", small_config.model_dump(), dataset)
    torch.nn.init.normal_(model.head.coefficients[-1].weight, std=0.5)
    templates = {s: dataset.templates[s] for s in model.speakers}
    return Checkpoint(model.eval(), dataset.manifest.fps, dataset.manifest.sample_rate, templates)


def _speech(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


def test_identity_fitted_to_a_coarse_template_gives_that_persons_head(ict_corpus: str) -> None:
    dataset = open_dataset(ict_corpus)
    head = load_ict()
    for speaker, info in dataset.manifest.extra["speakers"].items():
        truth = head.with_identity(np.asarray(info["identity"], np.float32)).neutral
        fitted = head_neutral(dataset.topology, dataset.templates[speaker], head)
        assert np.abs(fitted - truth).max() < 2e-4  # float16 modes: well under a millimetre
        np.testing.assert_allclose(
            head_template(dataset.topology, truth, head), dataset.templates[speaker], atol=2e-4
        )


def test_the_whole_head_moves_where_the_model_mesh_moves(checkpoint: Checkpoint) -> None:
    face = resolve_face(checkpoint, speaker=checkpoint.model.speakers[0])
    assert face.head is not None
    head = load_ict()
    whole = animate_face(_speech(), face, checkpoint, sample_rate=RATE)
    assert whole.vertices.shape == (30, head.num_vertices, 3)
    assert whole.rig is not None and whole.rig.num_vertices == head.num_vertices
    # Eyeballs stay put; the face moves.
    for part in STILL_PARTS:
        still = slice(head.parts[part].vertices.start, head.parts[part].vertices.stop)
        assert (whole.vertices[:, still] == face.head[None, still]).all()
    assert np.abs(whole.vertices - face.head[None]).max() > 1e-4
    # Read back at the model's vertices, the head moves as the model's own mesh does.
    own = animate(
        _speech(), face.template, checkpoint.model, sample_rate=RATE, speaker=face.speaker
    )
    back = np.stack([head_template(checkpoint.topology, frame, head) for frame in whole.vertices])
    motion = own - face.template[None]
    error = np.linalg.norm(back - own, axis=-1).mean() / np.linalg.norm(motion, axis=-1).mean()
    assert error < 0.25


def test_vertices_off_the_skin_move_as_the_surface_point_they_lie_at(
    checkpoint: Checkpoint,
) -> None:
    # The mouth socket is read at the lip point it moves with: where it sits behind the skin
    # must not change how it moves (a query at its own place poked it through the skin).
    face = resolve_face(checkpoint, speaker=checkpoint.model.speakers[0])
    assert face.head is not None
    socket = head_regions(load_ict())["mouth_socket"]
    deeper = face.head.copy()
    deeper[socket, 2] -= 0.005
    moved = {
        name: animate_face(_speech(), replace(face, head=neutral), checkpoint, sample_rate=RATE)
        for name, neutral in (("as is", face.head), ("deeper", deeper))
    }
    motion = moved["as is"].vertices[:, socket] - face.head[None, socket]
    assert np.abs(motion).max() > 1e-4
    np.testing.assert_allclose(
        moved["deeper"].vertices[:, socket] - deeper[None, socket], motion, atol=1e-6
    )


def test_faces_by_identity_seed_and_by_mesh_file(checkpoint: Checkpoint, tmp_path: Path) -> None:
    head = load_ict()
    person = resolve_face(checkpoint, identity=7)
    np.testing.assert_allclose(person.head, head.identity(7).neutral, atol=1e-6)
    assert person.template.shape == (checkpoint.topology.num_vertices, 3)
    path = tmp_path / "me.obj"
    trimesh.Trimesh(person.head, head.faces, process=False).export(path)
    again = resolve_face(checkpoint, template=path)
    np.testing.assert_allclose(again.head, person.head, atol=1e-5)
    np.save(tmp_path / "coarse.npy", person.template)
    coarse = resolve_face(checkpoint, template=tmp_path / "coarse.npy")
    np.testing.assert_allclose(coarse.head, person.head, atol=2e-4)
    with pytest.raises(MMTalkerError, match="choose one face"):
        resolve_face(checkpoint, speaker="spk00", identity=3)
    np.save(tmp_path / "wrong.npy", np.zeros((123, 3), np.float32))
    with pytest.raises(MMTalkerError, match="123"):
        resolve_face(checkpoint, template=tmp_path / "wrong.npy")


def test_head_outputs_carry_arkit_curves_and_named_targets(
    checkpoint: Checkpoint, tmp_path: Path
) -> None:
    animation = animate_face(_speech(), resolve_face(checkpoint, identity=3), checkpoint)
    uris = write_outputs(
        animation.vertices, checkpoint.fps, animation.topology, tmp_path / "out",
        {"npz", "glb", "arkit"}, rig=animation.rig,
    )  # fmt: skip
    header = Path(uris["arkit"]).read_text().splitlines()[0].split(",")
    assert header[:3] == ["Timecode", "BlendShapeCount", "EyeBlinkLeft"]
    assert Path(uris["glb"]).stat().st_size > 0


def test_models_without_a_head_map_refuse_identities(small_model: torch.nn.Module) -> None:
    checkpoint = Checkpoint(small_model, 30.0, RATE, {"s0": np.zeros((600, 3), np.float32)})
    with pytest.raises(RigError, match="no map onto the ICT head"):
        resolve_face(checkpoint, identity=1)


def test_whole_head_previews_paint_lips_mouth_and_eyes() -> None:
    from mmtalker.io.render import Renderer, face_colors
    from mmtalker.rig.head import head_regions

    head = load_ict()
    regions = head_regions(head)
    assert {"lips", "eyes", "mouth_socket", "eyeball_left"} <= set(regions)
    colors = face_colors(head.neutral, regions).astype(int)
    skin, lip, mouth = (colors[regions[n]].mean(axis=0) for n in ("face", "lips", "mouth_socket"))
    assert lip[0] - lip[1] > skin[0] - skin[1] and mouth.sum() < skin.sum() / 2
    image = Renderer(head.faces, head.neutral, regions=regions).render(head.neutral)
    assert image.shape == (512, 512, 3) and image.std() > 10
