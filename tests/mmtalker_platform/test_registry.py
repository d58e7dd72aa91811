"""The model registry on a real MLflow store: register, aliases, resolution, download, load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmtalker.checkpoint import CheckpointError, load_checkpoint
from mmtalker.data.shards import open_dataset
from mmtalker_platform import registry
from mmtalker_platform.registry import EvaluationSet, RegistryError
from mmtalker_platform.tracking import prepare_tracking, start_or_resume_run

DEMO = EvaluationSet(name="demo", fingerprint="0123456789ab")


def _register(
    tracking_uri: str,
    checkpoint: Path,
    name: str,
    lve: float,
    tested_on: EvaluationSet | None = DEMO,
) -> registry.ModelVersionInfo:
    experiment = prepare_tracking(tracking_uri, "exp")
    run_id, _ = start_or_resume_run(tracking_uri, experiment, f"{name}-{lve}-{tested_on}", {})
    metrics = {"lve": lve, "mve": 1e-3}
    return registry.register(tracking_uri, run_id, checkpoint, name, metrics, tested_on)


def test_candidate_always_moves_champion_only_when_lve_improves(
    tracking_uri: str, checkpoint_dir: Path
) -> None:
    good = _register(tracking_uri, checkpoint_dir, "talker", 2e-5)
    assert good.version == 1 and good.aliases == ["candidate", "champion"]
    assert good.metrics == {"lve": 2e-5, "mve": 1e-3}

    worse = _register(tracking_uri, checkpoint_dir, "talker", 3e-5)
    assert worse.version == 2 and worse.aliases == ["candidate"]
    assert registry.show(tracking_uri, "talker@champion").version == 1

    better = _register(tracking_uri, checkpoint_dir, "talker", 1e-5)
    assert better.version == 3 and better.aliases == ["candidate", "champion"]
    assert registry.show(tracking_uri, "talker/1").aliases == []
    assert better.source.endswith(f"{better.run_id}/artifacts/model")
    assert better.tested_on == DEMO


def test_champion_moves_only_on_a_better_score_on_the_same_test_set(
    tracking_uri: str, checkpoint_dir: Path, tiny_corpus: str
) -> None:
    tiny = EvaluationSet.of(open_dataset(tiny_corpus).manifest)
    first = _register(tracking_uri, checkpoint_dir, "talker", 2e-5, tiny)
    assert first.aliases == ["candidate", "champion"] and first.tested_on == tiny
    # A far lower LVE measured on other data says nothing about which model is better.
    other = _register(tracking_uri, checkpoint_dir, "talker", 1e-6, DEMO)
    assert other.aliases == ["candidate"]
    unknown = _register(tracking_uri, checkpoint_dir, "talker", 1e-6, None)
    assert unknown.aliases == ["candidate"] and unknown.tested_on is None
    assert registry.show(tracking_uri, "talker@champion").version == 1
    better = _register(tracking_uri, checkpoint_dir, "talker", 1e-5, tiny)
    assert better.aliases == ["candidate", "champion"]


def test_the_test_set_fingerprint_follows_the_test_split_only(tiny_corpus: str) -> None:
    manifest = open_dataset(tiny_corpus).manifest
    tiny = EvaluationSet.of(manifest)
    assert tiny.name == manifest.name and len(tiny.fingerprint) == 12

    def changed(split: str) -> EvaluationSet:
        shards = [
            s.model_copy(update={"sha256": "f" * 64}) if s.split == split else s
            for s in manifest.shards
        ]
        return EvaluationSet.of(manifest.model_copy(update={"shards": shards}))

    assert changed("train") == tiny
    assert changed("test").fingerprint != tiny.fingerprint


def test_a_nan_champion_is_replaced_and_a_nan_candidate_never_wins(
    tracking_uri: str, checkpoint_dir: Path
) -> None:
    _register(tracking_uri, checkpoint_dir, "talker", float("nan"))
    assert registry.show(tracking_uri, "talker@champion").version == 1
    _register(tracking_uri, checkpoint_dir, "talker", 3e-5)
    assert registry.show(tracking_uri, "talker@champion").version == 2
    _register(tracking_uri, checkpoint_dir, "talker", float("nan"))
    assert registry.show(tracking_uri, "talker@champion").version == 2


def test_list_versions_newest_first_with_aliases(tracking_uri: str, checkpoint_dir: Path) -> None:
    _register(tracking_uri, checkpoint_dir, "talker", 2e-5)
    _register(tracking_uri, checkpoint_dir, "other", 5e-5)
    _register(tracking_uri, checkpoint_dir, "talker", 3e-5)
    listed = registry.list_versions(tracking_uri)
    assert [(v.name, v.version, v.aliases) for v in listed] == [
        ("talker", 2, ["candidate"]),
        ("other", 1, ["candidate", "champion"]),
        ("talker", 1, ["champion"]),
    ]
    assert [v.version for v in registry.list_versions(tracking_uri, "talker")] == [2, 1]
    assert listed[0].metrics["lve"] == 3e-5


def test_promote_moves_an_alias_without_looking_at_metrics(
    tracking_uri: str, checkpoint_dir: Path
) -> None:
    _register(tracking_uri, checkpoint_dir, "talker", 1e-5)
    _register(tracking_uri, checkpoint_dir, "talker", 9e-5)
    promoted = registry.promote(tracking_uri, "talker/2")
    assert promoted.version == 2 and promoted.aliases == ["candidate", "champion"]
    assert registry.show(tracking_uri, "talker@champion").version == 2
    assert registry.promote(tracking_uri, "talker/1", "production").aliases == ["production"]
    with pytest.raises(RegistryError, match="cannot set alias 'v1'"):
        registry.promote(tracking_uri, "talker", "v1")


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("talker", ("talker", None, None)),
        ("talker@champion", ("talker", "champion", None)),
        ("talker/12", ("talker", None, 12)),
        ("models:/my-model@prod_2", ("my-model", "prod_2", None)),
    ],
)
def test_parse_ref(ref: str, parsed: tuple) -> None:
    assert registry.parse_ref(ref) == parsed


@pytest.mark.parametrize("ref", ["", "talker@", "talker/", "talker/0", "talker/v2", "a@b/3", "@x"])
def test_parse_ref_rejects_malformed_references(ref: str) -> None:
    with pytest.raises(RegistryError, match="NAME@ALIAS or NAME/VERSION"):
        registry.parse_ref(ref)


def test_resolution_errors_say_what_exists(tracking_uri: str, checkpoint_dir: Path) -> None:
    _register(tracking_uri, checkpoint_dir, "talker", 1e-5)
    _register(tracking_uri, checkpoint_dir, "talker", 2e-5)
    assert registry.show(tracking_uri, "talker").version == 2
    with pytest.raises(RegistryError, match=r"no registered model 'nope'.*registered: talker"):
        registry.show(tracking_uri, "nope@champion")
    with pytest.raises(RegistryError, match=r"no alias 'prod'.*@candidate -> 2, @champion -> 1"):
        registry.show(tracking_uri, "talker@prod")
    with pytest.raises(RegistryError, match="no version 7; its versions: 1, 2"):
        registry.show(tracking_uri, "talker/7")
    with pytest.raises(RegistryError, match="no MLflow database"):
        registry.list_versions(tracking_uri.replace("mlflow.db", "absent.db"))


def test_register_refuses_unusable_input(
    tracking_uri: str, checkpoint_dir: Path, tmp_path: Path
) -> None:
    experiment = prepare_tracking(tracking_uri, "exp")
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "job", {})
    with pytest.raises(RegistryError, match="lack 'lve'"):
        registry.register(tracking_uri, run_id, checkpoint_dir, "talker", {"mve": 1.0})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        registry.register(tracking_uri, run_id, tmp_path / "empty", "talker", {"lve": 1.0})
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.register(tracking_uri, run_id, checkpoint_dir, "a:b", {"lve": 1.0})
    assert registry.list_versions(tracking_uri) == []


def test_load_gives_a_model_predicting_like_the_original(
    tracking_uri: str, checkpoint_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(tracking_uri, checkpoint_dir, "talker", 1e-5)
    folder = registry.download(tracking_uri, "talker@champion", tmp_path / "download")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "templates.npz", "topology.npz",
    ]  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    loaded = registry.load("talker@champion")
    assert loaded.metadata["registry"]["version"] == 1
    _assert_same_predictions(loaded.model, load_checkpoint(checkpoint_dir).model, loaded.templates)


def test_register_and_load_with_artifacts_on_s3(
    tracking_uri: str,
    checkpoint_dir: Path,
    s3_env: dict[str, str],
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    location = f"s3://{s3_bucket}/mlflow"
    experiment = prepare_tracking(tracking_uri, "s3", artifact_location=location)
    run_id, _ = start_or_resume_run(tracking_uri, experiment, "job", {})
    info = registry.register(tracking_uri, run_id, checkpoint_dir, "talker", {"lve": 1e-5})
    assert info.source == f"{location}/{run_id}/artifacts/model"
    loaded = registry.load("talker/1", tracking_uri)
    _assert_same_predictions(loaded.model, load_checkpoint(checkpoint_dir).model, loaded.templates)


def _assert_same_predictions(model, reference, templates: dict) -> None:
    audio = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    face = torch.as_tensor(templates["s0"])[None]
    with torch.no_grad():
        torch.testing.assert_close(
            model.predict(audio, 30, face), reference.predict(audio, 30, face)
        )
