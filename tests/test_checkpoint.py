import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtalker.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from mmtalker.nn.mmtalker import MMTalker


def test_round_trip_gives_identical_predictions(
    small_model: MMTalker, small_face: tuple, tmp_path: Path
) -> None:
    templates, _ = small_face
    small_model.displacement_scale.fill_(0.004)
    with torch.no_grad():
        small_model.sampler.logits.normal_()
    save_checkpoint(tmp_path / "ck", small_model, templates, 30.0, 16000, {"note": "x"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "model.safetensors", "templates.npz", "topology.npz",
    ]  # fmt: skip
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.fps == 30.0 and loaded.sample_rate == 16000 and loaded.metadata == {"note": "x"}
    assert loaded.topology.id == small_model.topology.id
    np.testing.assert_array_equal(loaded.topology.uv, small_model.topology.uv)
    audio = torch.randn(1, 16000) * 0.1
    face = torch.as_tensor(templates["s0"])[None]
    small_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.predict(audio, 30, face), small_model.predict(audio, 30, face)
        )
    assert float(loaded.model.displacement_scale) == pytest.approx(0.004)


def test_weights_file_is_safetensors_not_pickle(
    small_model: MMTalker, small_face: tuple, tmp_path: Path
) -> None:
    save_checkpoint(tmp_path, small_model, small_face[0], 30.0, 16000)
    header = (tmp_path / "model.safetensors").read_bytes()[:8]
    size = int.from_bytes(header, "little")
    meta = json.loads((tmp_path / "model.safetensors").read_bytes()[8 : 8 + size])
    assert "sampler.logits" in meta and "displacement_scale" in meta


def test_broken_checkpoints_give_clear_errors(
    small_model: MMTalker, small_face: tuple, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    # The folder above a checkpoint (a Ray Train checkpoint's) names the one inside it.
    save_checkpoint(tmp_path / "model", small_model, small_face[0], 30.0, 16000)
    with pytest.raises(
        CheckpointError,
        match=rf"missing .*\({re.escape(str(tmp_path / 'model'))} inside it is one\)",
    ):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, small_model, small_face[0], 30.0, 16000)
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["basis"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    # One line that says what does not fit and what to do.
    with pytest.raises(CheckpointError, match=r"other shapes head\..*retrain it") as error:
        load_checkpoint(tmp_path)
    assert "\n" not in str(error.value)
    config["config"]["no_such_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"no_such_option.*retrain it"):
        load_checkpoint(tmp_path)
    del config["config"]["no_such_option"]
    config["kind"] = "nonsense"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown model kind"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(tmp_path)


def test_static_baseline_predicts_the_template(small_face: tuple) -> None:
    templates, topology = small_face
    static = build_model("static", {}, topology, templates)
    out = static.predict(torch.zeros(1, 1000), 7, torch.as_tensor(templates["s0"])[None])
    assert out.shape == (1, 7, topology.num_vertices, 3) and not out.any()


def test_corrupt_weights_are_a_checkpoint_error(
    small_model: MMTalker, small_face: tuple, tmp_path: Path
) -> None:
    save_checkpoint(tmp_path, small_model, small_face[0], 30.0, 16000)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
