"""Job specs: the shipped spec validates; bad files give one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmtalker.cli.data import run
from mmtalker_platform.cli import app
from mmtalker_platform.jobs import JobError, submit
from mmtalker_platform.spec import AnimateJobSpec, SpecError, TrainJobSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_train_spec_is_valid() -> None:
    spec = load_spec(ROOT / "jobs" / "train.yaml")
    assert spec.scaling.workers == 2 and spec.model.kind == "mmtalker"
    assert ".venv/" in spec.ray.excludes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\n", r"data: Field required"),
        ("name: x\ndata: d\nscaling: {workers: 0}\n", r"scaling\.workers: .*greater than"),
        ("name: x\ndata: d\ntrain: {epochs: 2, learning_rat: 1}\n", r"train\.learning_rat"),
        ("name: x\ndata: d\nmodel: {kind: transformer}\n", r"unknown model kind 'transformer'"),
        ("name: x\ndata: d\nmodel: {config: {dim: 30}}\n", r"model: .*speech\.dim"),
        ("name: 'bad name'\ndata: d\n", r"name: String should match"),
        ("name: x\ndata: d\ntrain: {time_budget_s: 60}\n", r"time_budget_s is for single"),
        ("- a list\n", r"must be a YAML mapping"),
        ("name: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_specs_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_a_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "nope.yaml")


def test_the_cli_reports_a_bad_spec_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("name: x\ndata: d\nscaling: {workers: -1}\n")
    assert run(app, ["run", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scaling.workers" in err


def test_specs_round_trip_through_their_json_form() -> None:
    spec = TrainJobSpec(name="a", data="s3://bucket/data")
    assert TrainJobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert CliRunner().invoke(app, ["run", "--help"]).exit_code == 0


def test_the_shipped_animate_spec_is_valid() -> None:
    spec = load_spec(ROOT / "jobs" / "animate.yaml")
    assert isinstance(spec, AnimateJobSpec)
    assert spec.model == "mmtalker@champion" and spec.checkpoint is None
    assert set(spec.formats) == {"npz", "glb", "arkit"} and spec.actors == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: animate\nname: x\noutput: o\n", r"catalog: Field required"),
        ("kind: animate\nname: x\ncatalog: c\noutput: o\nformats: [fbx]\n", r"formats\.0"),
        ("kind: animate\nname: x\ncatalog: c\noutput: o\nactors: 0\n", r"actors: .*greater"),
        (
            "kind: animate\nname: x\ncatalog: c\noutput: o\nmodel: m@a\ncheckpoint: /ck\n",
            r"not both",
        ),
        ("kind: animate\nname: x\ncatalog: c\noutput: o\nmodel: null\n", r"give model"),
        ("kind: render\nname: x\n", r"kind 'render' is not one of train, animate"),
    ],
)
def test_bad_animate_specs_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "animate.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_a_checkpoint_replaces_the_default_model() -> None:
    spec = AnimateJobSpec(name="a", catalog="s3://b/c", output="s3://b/o", checkpoint="ck")
    assert spec.model is None and spec.checkpoint == "ck"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("catalog: audio/\noutput: s3://b/o\n", "catalog 'audio/' is relative"),
        ("catalog: s3://b/a\noutput: s3://b/o\ncheckpoint: ck\n", "checkpoint 'ck' is relative"),
    ],
)
def test_submit_refuses_paths_relative_to_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "animate.yaml"
    spec.write_text("kind: animate\nname: x\n" + fields)
    with pytest.raises(JobError, match=message):
        submit(spec, "http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("checkpoint: {storage: runs}\n", "checkpoint.storage 'runs' is relative"),
        ("mlflow: {tracking_uri: 'sqlite:///m.db'}\n", "mlflow.tracking_uri 'sqlite:///m.db'"),
    ],
)
def test_submit_refuses_train_outputs_relative_to_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "train.yaml"
    spec.write_text("name: x\ndata: s3://b/d\n" + fields)
    with pytest.raises(JobError, match=message):
        submit(spec, "http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ndata: /data\n", "MMTALKER_WORK_DIR is 'work', relative to Ray's temporary"),
        ("name: x\ndata: /d\ncheckpoint: {storage: runs}\n", "checkpoint.storage is 'runs'"),
        ("kind: animate\nname: x\ncatalog: /c\noutput: out\n", "output is 'out', relative"),
    ],
)
def test_a_job_in_rays_unpacked_working_dir_refuses_relative_result_locations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    """What `ray job submit --working-dir` gives the entrypoint: results written relative to
    the unpacked copy would vanish with the Ray session."""
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.delenv("MMTALKER_WORK_DIR", raising=False)
    # Verbose: a quiet `mmtalker run` would rewire this (pytest's) process's logging.
    monkeypatch.setenv("MMTALKER_VERBOSE", "1")
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    assert run(app, ["run", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "work").exists()
