"""Exports: npz round trips (local and S3), glTF morph-target animation, OBJ sequences."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pygltflib
import pytest
import trimesh

from mmtalker import storage
from mmtalker.data.face import FaceTemplate, make_template
from mmtalker.data.sequence import Topology
from mmtalker.errors import MMTalkerError
from mmtalker.io.export import (
    ExportError,
    arkit_csv,
    arkit_json,
    from_glb,
    npz_bytes,
    output_bytes,
    read_npz,
    to_glb,
    to_obj_sequence,
    to_rigged_glb,
    write_npz,
    write_outputs,
)
from mmtalker.rig import ARKIT_NAMES, Rig, arkit_to_rig, face_topology, load_ict
from mmtalker.rig.coarse import coarse_face
from mmtalker.storage import S3Settings

FPS = 30.0


@pytest.fixture(scope="module")
def face() -> FaceTemplate:
    return make_template(600)


def motion(face: FaceTemplate, frames: int = 60, modes: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth motion: ``modes`` sinusoidal displacement fields (~mm) plus 1 µm noise."""
    rng = np.random.default_rng(seed)
    xyz = face.vertices
    centres = xyz[rng.choice(len(xyz), modes)]
    bumps = np.exp(-np.sum((xyz[None] - centres[:, None]) ** 2, -1) / (2 * 0.02**2))
    fields = 2e-3 * bumps[..., None] * rng.standard_normal((modes, 1, 3))
    t = np.arange(frames) / FPS
    curves = np.sin(2 * np.pi * rng.uniform(0.3, 3, modes) * t[:, None] + rng.uniform(0, 6, modes))
    moved = xyz + np.einsum("tk,kvc->tvc", curves, fields)
    return (moved + 1e-6 * rng.standard_normal(moved.shape)).astype(np.float32)


def energy_error(decoded: np.ndarray, frames: np.ndarray, neutral: np.ndarray) -> float:
    """Unexplained fraction of the displacement energy, as to_glb documents it."""
    d = frames.astype(np.float64) - neutral
    return float(np.sum((decoded - frames.astype(np.float64)) ** 2) / np.sum(d * d))


def floats(gltf: pygltflib.GLTF2, index: int) -> np.ndarray:
    accessor = gltf.accessors[index]
    view = gltf.bufferViews[accessor.bufferView]
    width = {"SCALAR": 1, "VEC3": 3}[accessor.type]
    flat = np.frombuffer(gltf.binary_blob(), "<f4", accessor.count * width, view.byteOffset)
    return flat.reshape(accessor.count, width)


def test_npz_round_trip_local(face: FaceTemplate, tmp_path: Path) -> None:
    frames = motion(face)
    write_npz(frames, FPS, face.topology, tmp_path / "a.npz")
    back = read_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.vertices, frames)
    assert back.vertices.dtype == np.float32 and back.faces.dtype == np.int32
    np.testing.assert_array_equal(back.faces, face.topology.faces)
    assert (back.fps, back.topology_id) == (FPS, face.topology.id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_npz_round_trip_s3(face: FaceTemplate, s3_bucket: str, s3_settings: S3Settings) -> None:
    frames = motion(face, frames=5)
    uri = f"s3://{s3_bucket}/out/a.npz"
    write_npz(frames, FPS, face.topology, uri, s3_settings)
    back = read_npz(uri, s3_settings)
    np.testing.assert_array_equal(back.vertices, frames)
    assert (back.fps, back.topology_id) == (FPS, face.topology.id)


def test_glb_is_a_valid_morph_animation(face: FaceTemplate) -> None:
    frames = motion(face)
    data = to_glb(frames, FPS, face.topology)
    magic, version, length = struct.unpack_from("<4sII", data)
    json_length, json_type = struct.unpack_from("<I4s", data, 12)
    bin_length, bin_type = struct.unpack_from("<I4s", data, 20 + json_length)
    assert (magic, version, length, json_type, bin_type) == (
        b"glTF",
        2,
        len(data),
        b"JSON",
        b"BIN\0",
    )
    assert json_length % 4 == 0 and bin_length % 4 == 0
    assert length == 28 + json_length + bin_length

    gltf = pygltflib.GLTF2.load_from_bytes(data)
    assert gltf.asset.version == "2.0"
    assert gltf.scenes[gltf.scene].nodes == [0] and gltf.nodes[0].mesh == 0
    assert gltf.buffers[0].byteLength == len(gltf.binary_blob()) == bin_length
    for view in gltf.bufferViews:
        assert view.byteOffset % 4 == 0 and view.byteOffset + view.byteLength <= bin_length

    (mesh,) = gltf.meshes
    (primitive,) = mesh.primitives
    indices = gltf.accessors[primitive.indices]
    assert indices.componentType == pygltflib.UNSIGNED_SHORT
    view = gltf.bufferViews[indices.bufferView]
    stored = np.frombuffer(gltf.binary_blob(), "<u2", indices.count, view.byteOffset)
    np.testing.assert_array_equal(stored.reshape(-1, 3), face.topology.faces)

    positions = [primitive.attributes.POSITION] + [t["POSITION"] for t in primitive.targets]
    for index in positions:
        accessor = gltf.accessors[index]
        values = floats(gltf, index)
        assert accessor.count == face.topology.num_vertices
        assert accessor.min == values.min(axis=0).tolist()
        assert accessor.max == values.max(axis=0).tolist()
    np.testing.assert_array_equal(floats(gltf, primitive.attributes.POSITION), frames[0])

    k = len(primitive.targets)
    assert 1 <= k <= 4
    assert mesh.weights == [0.0] * k and len(mesh.extras["targetNames"]) == k
    (animation,) = gltf.animations
    (sampler,) = animation.samplers
    (channel,) = animation.channels
    assert (channel.target.node, channel.target.path, sampler.interpolation) == (
        0,
        "weights",
        "LINEAR",
    )
    times = floats(gltf, sampler.input)[:, 0]
    np.testing.assert_allclose(times, np.arange(len(frames)) / FPS, rtol=1e-6)
    assert np.all(np.diff(times) > 0)
    time_accessor = gltf.accessors[sampler.input]
    assert (time_accessor.min, time_accessor.max) == ([times[0]], [times[-1]])
    assert gltf.accessors[sampler.output].count == len(frames) * k
    assert np.abs(floats(gltf, sampler.output)).max() <= 1.0


@pytest.mark.parametrize("count", [75, 1100])  # the Gram-matrix and the range-finder path
def test_glb_reproduces_every_frame(face: FaceTemplate, count: int) -> None:
    frames = motion(face, frames=count)
    decoded, fps = from_glb(to_glb(frames, FPS, face.topology))
    assert decoded.shape == frames.shape and fps == FPS
    assert energy_error(decoded, frames, frames[0]) <= 1e-4


def test_glb_rests_on_a_given_neutral(face: FaceTemplate) -> None:
    frames = motion(face)
    data = to_glb(frames, FPS, face.topology, neutral=face.vertices)
    gltf = pygltflib.GLTF2.load_from_bytes(data)
    base = floats(gltf, gltf.meshes[0].primitives[0].attributes.POSITION)
    np.testing.assert_array_equal(base, face.vertices.astype(np.float32))
    decoded, _ = from_glb(data)
    assert energy_error(decoded, frames, face.vertices) <= 1e-4


def test_single_frame_and_still_animations_round_trip(face: FaceTemplate) -> None:
    one = motion(face, frames=1)
    still = np.repeat(face.vertices[None], 3, axis=0).astype(np.float32)
    for frames in (one, still):
        decoded, fps = from_glb(to_glb(frames, FPS, face.topology))
        np.testing.assert_array_equal(decoded, frames)
        assert fps == FPS


def test_motion_richer_than_max_targets_reports_its_error(face: FaceTemplate) -> None:
    frames = motion(face, frames=60, modes=12, seed=1)
    data = to_glb(frames, FPS, face.topology, max_targets=5)
    gltf = pygltflib.GLTF2.load_from_bytes(data)
    assert len(gltf.meshes[0].primitives[0].targets) == 5
    reported = gltf.meshes[0].extras["relativeError"]
    measured = energy_error(from_glb(data)[0], frames, frames[0])
    d = (frames.astype(np.float64) - frames[0]).reshape(len(frames), -1)
    singular = np.linalg.svd(d, compute_uv=False)
    best = float(np.sum(singular[5:] ** 2) / np.sum(singular**2))
    assert reported > 1e-4
    assert measured == pytest.approx(reported, rel=1e-3)
    assert reported == pytest.approx(best, rel=1e-2)


def test_obj_sequence(face: FaceTemplate) -> None:
    frames = motion(face, frames=4)
    files = list(to_obj_sequence(frames, face.topology))
    assert [name for name, _ in files] == [f"frame_{t:05d}.obj" for t in range(4)]
    lines = files[2][1].decode().splitlines()
    v = np.array([line.split()[1:] for line in lines if line.startswith("v ")], dtype=np.float64)
    f = np.array([line.split()[1:] for line in lines if line.startswith("f ")], dtype=np.int64)
    np.testing.assert_allclose(v, frames[2], atol=5e-7)
    np.testing.assert_array_equal(f - 1, face.topology.faces)
    assert len(lines) == len(v) + len(f)
    mesh = trimesh.load(io.BytesIO(files[2][1]), file_type="obj", process=False)
    assert len(mesh.vertices) == face.topology.num_vertices
    np.testing.assert_array_equal(mesh.faces, face.topology.faces)


def test_write_outputs_writes_requested_files_in_order(
    face: FaceTemplate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = motion(face, frames=3)
    written: list[str] = []
    write_bytes = storage.write_bytes

    def recording(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
        written.append(Path(uri).name)
        write_bytes(uri, data, s3)

    monkeypatch.setattr(storage, "write_bytes", recording)
    base = tmp_path / "clip"
    uris = write_outputs(frames, FPS, face.topology, base, {"glb", "obj"})
    assert uris == {"npz": f"{base}.npz", "glb": f"{base}.glb", "obj": f"{base}_obj/"}
    frame_names = [f"frame_{t:05d}.obj" for t in range(3)]
    assert written == ["clip.glb", *frame_names, "sequence.json", "clip.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.glb", "clip.npz", "clip_obj"]
    assert sorted(p.name for p in (tmp_path / "clip_obj").iterdir()) == [
        *frame_names,
        "sequence.json",
    ]
    marker = json.loads((tmp_path / "clip_obj" / "sequence.json").read_text())
    assert marker == {"fps": FPS, "topology_id": face.topology.id, "frames": frame_names}
    assert from_glb(Path(uris["glb"]).read_bytes())[0].shape == frames.shape


def test_write_outputs_to_s3(face: FaceTemplate, s3_bucket: str, s3_settings: S3Settings) -> None:
    frames = motion(face, frames=2)
    uris = write_outputs(
        frames, FPS, face.topology, f"s3://{s3_bucket}/x/clip", {"obj"}, s3_settings
    )
    fs = s3_settings.filesystem()
    keys = {i.path for i in fs.get_file_info(pafs.FileSelector(s3_bucket, recursive=True))}
    objs = {f"{s3_bucket}/x/clip_obj/{n}" for n in ("frame_00000.obj", "frame_00001.obj")}
    expected = {f"{s3_bucket}/x/clip.npz", f"{s3_bucket}/x/clip_obj/sequence.json", *objs}
    assert keys - {f"{s3_bucket}/x", f"{s3_bucket}/x/clip_obj"} == expected
    assert set(uris) == {"npz", "obj"}
    np.testing.assert_array_equal(read_npz(uris["npz"], s3_settings).vertices, frames)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v[0], "must be (T, 600, 3)"),
        (lambda v: v[:, :-1], "must be (T, 600, 3)"),
        (lambda v: v[:0], "T ≥ 1"),
        (lambda v: np.where(np.arange(3)[None, None] == 1, np.nan, v), "NaN"),
    ],
)
def test_bad_vertices_are_rejected(
    face: FaceTemplate,
    tmp_path: Path,
    change: Callable[[np.ndarray], np.ndarray],
    message: str,
) -> None:
    frames = change(motion(face, frames=2))
    for export in (
        lambda: write_npz(frames, FPS, face.topology, tmp_path / "a.npz"),
        lambda: to_glb(frames, FPS, face.topology),
        lambda: to_obj_sequence(frames, face.topology),
        lambda: write_outputs(frames, FPS, face.topology, tmp_path / "b", {"glb"}),
    ):
        with pytest.raises(ExportError, match=re.escape(message)):
            export()
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_rejected(face: FaceTemplate, tmp_path: Path) -> None:
    frames = motion(face, frames=2)
    with pytest.raises(ExportError, match="npz, glb, obj, arkit") as info:
        write_outputs(frames, FPS, face.topology, tmp_path / "b", {"glb", "fbx"})
    assert isinstance(info.value, MMTalkerError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and "fbx" in str(info.value)
    for fps in (0.0, float("nan"), -30.0):
        with pytest.raises(ExportError, match="fps"):
            to_glb(frames, fps, face.topology)
    with pytest.raises(ExportError, match="neutral"):
        to_glb(frames, FPS, face.topology, neutral=face.vertices[:-1])
    with pytest.raises(ExportError, match="max_targets"):
        to_glb(frames, FPS, face.topology, max_targets=0)
    with pytest.raises(ExportError, match="not a morph-target animation"):
        from_glb(b"not a glb file")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ExportError, match=r"not an animation \.npz"):
        read_npz(tmp_path / "bad.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


# ARKit outputs on a real rig: the ICT face area at 300 vertices, one speaker's identity.
LIVE_LINK_HEADER = (
    "Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,EyeLookInLeft,EyeLookOutLeft,"
    "EyeLookUpLeft,EyeSquintLeft,EyeWideLeft,EyeBlinkRight,EyeLookDownRight,EyeLookInRight,"
    "EyeLookOutRight,EyeLookUpRight,EyeSquintRight,EyeWideRight,JawForward,JawRight,JawLeft,"
    "JawOpen,MouthClose,MouthFunnel,MouthPucker,MouthRight,MouthLeft,MouthSmileLeft,"
    "MouthSmileRight,MouthFrownLeft,MouthFrownRight,MouthDimpleLeft,MouthDimpleRight,"
    "MouthStretchLeft,MouthStretchRight,MouthRollLower,MouthRollUpper,MouthShrugLower,"
    "MouthShrugUpper,MouthPressLeft,MouthPressRight,MouthLowerDownLeft,MouthLowerDownRight,"
    "MouthUpperUpLeft,MouthUpperUpRight,BrowDownLeft,BrowDownRight,BrowInnerUp,BrowOuterUpLeft,"
    "BrowOuterUpRight,CheekPuff,CheekSquintLeft,CheekSquintRight,NoseSneerLeft,NoseSneerRight,"
    "TongueOut,HeadYaw,HeadPitch,HeadRoll,LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,"
    "RightEyePitch,RightEyeRoll"
)
VALIDATOR = Path(sys.prefix) / "node_modules" / "gltf-validator"


@pytest.fixture(scope="module")
def speaker() -> Rig:
    return coarse_face(load_ict(), 300).rig.identity(seed=4)


@pytest.fixture(scope="module")
def speaker_topology(speaker: Rig) -> Topology:
    return face_topology(speaker)


def arkit_curves(frames: int, seed: int = 0) -> np.ndarray:
    """Smooth ARKit curves in [0, 1] on a few channels, 0 elsewhere (tongueOut always 0)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None] / FPS
    curves = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 2, 52) * t + rng.uniform(0, 6, 52))
    curves *= rng.uniform(size=52) < 0.3
    curves[:, ARKIT_NAMES.index("jawOpen")] = np.linspace(0, 1, frames)
    curves[:, -1] = 0.0
    return curves.astype(np.float32)


def khronos_issues(data: bytes) -> dict:
    """The Khronos glTF validator's ``issues`` report on a .glb (npm's gltf-validator)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Khronos glTF validator cannot run")
    if not VALIDATOR.is_dir():
        pytest.fail(
            f"npm is installed but the Khronos glTF validator is not in {VALIDATOR}: run "
            "`make setup`, which installs it there"
        )
    script = (
        "const v = require(process.argv[1]);"
        "v.validateBytes(new Uint8Array(require('fs').readFileSync(0)))"
        ".then(r => console.log(JSON.stringify(r.issues)))"
        ".catch(e => { console.error(String(e)); process.exit(1); });"
    )
    done = subprocess.run(
        ["node", "-e", script, str(VALIDATOR)], input=data, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_arkit_csv_has_the_live_link_face_layout() -> None:
    curves = arkit_curves(40)
    rows = list(csv.reader(io.StringIO(arkit_csv(curves, FPS).decode())))
    assert ",".join(rows[0]) == LIVE_LINK_HEADER
    assert len(rows) == 1 + len(curves) and {len(r) for r in rows} == {63}
    assert [r[0] for r in rows[1:3]] == ["00:00:00:00.000", "00:00:00:01.000"]
    assert [r[0] for r in rows[30:33]] == ["00:00:00:29.000", "00:00:01:00.000", "00:00:01:01.000"]
    assert {r[1] for r in rows[1:]} == {"61"}
    weights = np.array([r[2:54] for r in rows[1:]], dtype=np.float64)
    np.testing.assert_allclose(weights, curves, atol=5e-7)
    assert {v for r in rows[1:] for v in r[54:]} == {"0"}
    hour = list(csv.reader(io.StringIO(arkit_csv(arkit_curves(3662), 1.0).decode())))
    assert hour[-1][0] == "01:01:01:00.000"
    quarter = list(csv.reader(io.StringIO(arkit_csv(arkit_curves(3), 40.0).decode())))
    assert [r[0] for r in quarter[1:]] == ["00:00:00:00.000", "00:00:00:01.000", "00:00:00:02.000"]


def test_arkit_json_holds_fps_names_and_weights() -> None:
    curves = arkit_curves(12)
    payload = json.loads(arkit_json(curves, FPS))
    assert payload["fps"] == FPS and payload["names"] == list(ARKIT_NAMES)
    np.testing.assert_allclose(payload["weights"], curves, atol=5e-7)
    with pytest.raises(ExportError, match=r"\(T, 52\)"):
        arkit_json(curves[:, :51], FPS)


def test_rigged_glb_has_named_arkit_targets_and_validates(
    speaker: Rig, speaker_topology: Topology
) -> None:
    curves = arkit_curves(45)
    frames = speaker.compose(arkit_to_rig(curves, speaker.shape_names))
    data = to_rigged_glb(curves, FPS, speaker, speaker_topology, frames)
    gltf = pygltflib.GLTF2.load_from_bytes(data)
    (mesh,) = gltf.meshes
    assert mesh.extras["targetNames"] == list(ARKIT_NAMES)
    assert len(mesh.primitives[0].targets) == 52 and mesh.weights == [0.0] * 52
    assert mesh.extras["relativeError"] < 1e-10
    np.testing.assert_array_equal(
        floats(gltf, mesh.primitives[0].attributes.POSITION), speaker.neutral
    )
    assert not floats(gltf, mesh.primitives[0].targets[-1]["POSITION"]).any()  # tongueOut
    (sampler,) = gltf.animations[0].samplers
    assert gltf.accessors[sampler.output].count == 45 * 52
    np.testing.assert_allclose(floats(gltf, sampler.input)[:, 0], np.arange(45) / FPS, rtol=1e-6)
    decoded, fps = from_glb(data)
    assert fps == FPS
    np.testing.assert_allclose(decoded, frames, atol=1e-6)
    issues = khronos_issues(data)
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"]


def test_write_outputs_solves_arkit_against_the_rig(
    speaker: Rig, speaker_topology: Topology, tmp_path: Path
) -> None:
    curves = arkit_curves(30)
    frames = speaker.compose(arkit_to_rig(curves, speaker.shape_names))
    base = tmp_path / "clip"
    uris = write_outputs(frames, FPS, speaker_topology, base, {"arkit", "glb"}, rig=speaker)
    assert uris == {
        "npz": f"{base}.npz",
        "glb": f"{base}.glb",
        "arkit": f"{base}_arkit.csv",
        "arkit_json": f"{base}_arkit.json",
    }
    solved = np.array(json.loads(Path(uris["arkit_json"]).read_text())["weights"])
    np.testing.assert_allclose(solved, curves, atol=2e-3)
    rows = Path(uris["arkit"]).read_text().splitlines()
    assert rows[0] == LIVE_LINK_HEADER and len(rows) == 31
    rigged = pygltflib.GLTF2.load_from_bytes(Path(uris["glb"]).read_bytes())
    assert rigged.meshes[0].extras["targetNames"] == list(ARKIT_NAMES)
    np.testing.assert_allclose(from_glb(Path(uris["glb"]).read_bytes())[0], frames, atol=1e-4)
    # Without a rig, glb keeps its principal modes.
    plain = write_outputs(frames, FPS, speaker_topology, tmp_path / "plain", {"glb"})
    names = pygltflib.GLTF2.load_from_bytes(Path(plain["glb"]).read_bytes()).meshes[0].extras
    assert names["targetNames"][0] == "mode_00"


def test_single_file_outputs_are_what_write_outputs_writes(
    speaker: Rig, speaker_topology: Topology, tmp_path: Path
) -> None:
    frames = speaker.compose(arkit_to_rig(arkit_curves(12), speaker.shape_names))
    uris = write_outputs(frames, FPS, speaker_topology, tmp_path / "c", {"arkit"}, rig=speaker)
    arkit = output_bytes(frames, FPS, speaker_topology, "arkit", speaker)
    assert arkit == Path(uris["arkit_json"]).read_bytes()
    npz = output_bytes(frames, FPS, speaker_topology, "npz")
    assert npz == npz_bytes(frames, FPS, speaker_topology)
    rigged = pygltflib.GLTF2.load_from_bytes(
        output_bytes(frames, FPS, speaker_topology, "glb", speaker)
    )
    assert rigged.meshes[0].extras["targetNames"] == list(ARKIT_NAMES)
    with pytest.raises(ExportError, match="format arkit needs the speaker's ARKit rig"):
        output_bytes(frames, FPS, speaker_topology, "arkit")
    with pytest.raises(ExportError, match="not a single file"):
        output_bytes(frames, FPS, speaker_topology, "obj")


def test_arkit_output_needs_the_rig_of_the_animated_mesh(
    face: FaceTemplate, speaker: Rig, tmp_path: Path
) -> None:
    frames = motion(face, frames=2)
    with pytest.raises(ExportError, match="format arkit needs the speaker's ARKit rig"):
        write_outputs(frames, FPS, face.topology, tmp_path / "a", {"arkit"})
    with pytest.raises(ExportError, match="the rig has 300 vertices but the animation's"):
        write_outputs(frames, FPS, face.topology, tmp_path / "b", {"arkit"}, rig=speaker)
    assert list(tmp_path.iterdir()) == []
