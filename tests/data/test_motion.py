"""Articulation blendshapes on the procedural face, blink/brow curves and their composition."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from pydantic import ValidationError

from mmtalker.data import face as F
from mmtalker.data import motion as M
from mmtalker.data.espeak import EspeakSynthesizer, Phoneme
from mmtalker.data.visemes import SPEECH_CHANNELS, frame_times

NUM_VERTICES = 2000
CH = {name: k for k, name in enumerate(M.CHANNELS)}


@cache
def chart() -> F.FaceChart:
    return F.make_chart(NUM_VERTICES)


def speaker(shape: F.FaceShape | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Neutral vertices (V, 3) and blendshapes (C, V, 3) of one speaker on the shared chart."""
    return _speaker((shape or F.FaceShape()).model_dump_json())


@cache
def _speaker(shape_json: str) -> tuple[np.ndarray, np.ndarray]:
    shape = F.FaceShape.model_validate_json(shape_json)
    neutral = F.warp(chart(), shape)
    return neutral, M.blendshapes(chart(), shape, neutral)


@cache
def utterance(text: str):
    return EspeakSynthesizer().synthesize(text)


def rim_loops() -> list[np.ndarray]:
    """Boundary loops' vertex sets, from edges used by one triangle only."""
    faces = chart().faces
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    rim = unique[counts == 1]
    # Union-find over rim edges.
    parent = {v: v for v in np.unique(rim).tolist()}

    def root(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in rim.tolist():
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for v in parent:
        groups.setdefault(root(v), []).append(v)
    return [np.array(sorted(g)) for g in groups.values()]


def opening_rim(cx: float, cy: float) -> np.ndarray:
    """Vertices of the boundary loop of the opening centred at (cx, cy) on the chart."""
    xy = chart().xy
    (loop,) = [
        loop for loop in rim_loops() if np.hypot(*(xy[loop].mean(axis=0) - (cx, cy))) < 0.003
    ]
    return loop


def opening_height(positions: np.ndarray, rim: np.ndarray, cx: float, cy: float, half: float):
    """Upper-rim y minus lower-rim y at the same x, sampled over |x - cx| <= half.

    The rim is split into its two lids/lips by canonical y; each is interpolated along x.
    """
    xy = chart().xy
    xs = np.linspace(cx - half, cx + half, 9)

    def side(vertices: np.ndarray) -> np.ndarray:
        order = np.argsort(positions[vertices, 0])
        return np.interp(xs, positions[vertices[order], 0], positions[vertices[order], 1])

    upper, lower = rim[xy[rim, 1] > cy], rim[xy[rim, 1] < cy]
    assert len(upper) >= 2 and len(lower) >= 2
    return side(upper) - side(lower)


def apply(channel: str, activation: float = 1.0, shape: F.FaceShape | None = None) -> np.ndarray:
    neutral, shapes = speaker(shape)
    curves = np.zeros((1, len(M.CHANNELS)))
    curves[0, CH[channel]] = activation
    return M.animate(neutral, shapes, curves)[0]


# --- blendshapes -------------------------------------------------------------------------------


def test_blendshapes_shape_and_dtype() -> None:
    neutral, shapes = speaker()
    assert (*SPEECH_CHANNELS, "blink", "brow_raise") == M.CHANNELS
    assert shapes.shape == (len(M.CHANNELS), len(neutral), 3)
    assert shapes.dtype == np.float32
    assert np.isfinite(shapes).all()
    # Each channel moves something by at least a millimetre and nothing by more than 3 cm.
    for k, name in enumerate(M.CHANNELS):
        peak = np.linalg.norm(shapes[k], axis=1).max()
        assert 1e-3 < peak < 0.03, (name, peak)


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_blink_closes_each_eye(side: float) -> None:
    neutral, _ = speaker()
    cx = side * F.EYE_X
    rim = opening_rim(cx, F.EYE_Y)
    half = 0.4 * F.EYE_HALF_WIDTH
    rest = opening_height(neutral, rim, cx, F.EYE_Y, half)
    closed = opening_height(apply("blink"), rim, cx, F.EYE_Y, half)
    assert rest.min() > 0.006  # the eye is open at rest (EYE_UPPER + EYE_LOWER ~ 1 cm)
    assert np.abs(closed).max() < 5e-4
    assert np.abs(closed).max() < 0.15 * rest.min()
    half_closed = opening_height(apply("blink", 0.5), rim, cx, F.EYE_Y, half)
    np.testing.assert_allclose(half_closed, 0.5 * (rest + closed), atol=1e-6)


@pytest.mark.parametrize(
    "shape",
    [
        F.FaceShape(height=1.15, width=0.9, eye_spacing=1.1),
        F.FaceShape(eye_size=1.2),
        F.FaceShape(eye_size=0.8),
        F.FaceShape.sample(np.random.default_rng(0)),
    ],
    ids=["taller-narrower", "big-eyes", "small-eyes", "sampled-seed0"],
)
def test_blink_closes_the_eyes_of_other_speakers(shape: F.FaceShape) -> None:
    neutral, _ = speaker(shape)
    blinked = apply("blink", shape=shape)
    for side in (-1.0, 1.0):
        cx = side * F.EYE_X
        rim = opening_rim(cx, F.EYE_Y)
        # On a warped face, compare lids at the same canonical x: sample rim x from the neutral.
        xs_half = 0.4 * F.EYE_HALF_WIDTH * shape.width
        centre = float(neutral[rim, 0].mean())
        rest = opening_height(neutral, rim, centre, F.EYE_Y, xs_half)
        closed = opening_height(blinked, rim, centre, F.EYE_Y, xs_half)
        assert rest.min() > 0.005
        assert np.abs(closed).max() < 5e-4, (side, closed)


def test_lip_closure_closes_the_mouth_slit() -> None:
    neutral, _ = speaker()
    rim = opening_rim(0.0, F.MOUTH_Y)
    half = 0.4 * F.MOUTH_HALF_WIDTH
    rest = opening_height(neutral, rim, 0.0, F.MOUTH_Y, half)
    closed = opening_height(apply("lip_closure"), rim, 0.0, F.MOUTH_Y, half)
    assert rest[4] == pytest.approx(2 * F.MOUTH_GAP, abs=2e-4)
    assert abs(closed[4]) < 0.15 * rest[4]
    assert np.abs(closed).max() < 3e-4


def test_jaw_open_opens_the_mouth_and_moves_the_lower_lip() -> None:
    neutral, _ = speaker()
    opened = apply("jaw_open")
    rim = opening_rim(0.0, F.MOUTH_Y)
    rest = opening_height(neutral, rim, 0.0, F.MOUTH_Y, 0.005)
    wide = opening_height(opened, rim, 0.0, F.MOUTH_Y, 0.005)
    assert wide[4] - rest[4] > 0.008
    xy = chart().xy
    central = rim[np.abs(xy[rim, 0]) < 0.01]
    upper, lower = central[xy[central, 1] > F.MOUTH_Y], central[xy[central, 1] < F.MOUTH_Y]
    upper_move = np.linalg.norm(opened[upper] - neutral[upper], axis=1).max()
    lower_move = np.linalg.norm(opened[lower] - neutral[lower], axis=1).min()
    assert lower_move > 0.008
    assert upper_move < 0.15 * lower_move
    # The jaw swings down (and its front forward, as it rotates about a pivot behind the face).
    assert (opened[lower, 1] < neutral[lower, 1] - 0.008).all()


def test_jaw_open_leaves_the_forehead_and_eyes_still() -> None:
    neutral, shapes = speaker()
    upper = chart().regions["upper_face"]
    assert np.abs(shapes[CH["jaw_open"], upper]).max() < 1e-4
    moved = apply("jaw_open")
    chin = np.abs(chart().xy[:, 1] - F.CHIN_Y) < 0.005
    assert (moved[chin, 1] < neutral[chin, 1] - 0.005).all()


def test_brow_raise_lifts_brows_and_leaves_the_chin() -> None:
    neutral, shapes = speaker()
    xy = chart().xy
    brows = (np.abs(xy[:, 1] - F.BROW_Y) < 0.003) & (np.abs(xy[:, 0]) < 0.06)
    assert brows.sum() > 5
    lift = apply("brow_raise")[brows] - neutral[brows]
    assert lift[:, 1].min() > 0.0045
    assert lift[:, 1].max() < 0.0055
    np.testing.assert_allclose(lift[:, [0, 2]], 0.0, atol=1e-7)
    chin = xy[:, 1] < F.CHIN_Y + 0.01
    assert np.abs(shapes[CH["brow_raise"], chin]).max() < 1e-6
    lips = chart().regions["lips"]
    assert np.abs(shapes[CH["brow_raise"], lips]).max() < 1e-6


def mouth_corners() -> np.ndarray:
    rim = opening_rim(0.0, F.MOUTH_Y)
    x = chart().xy[rim, 0]
    return np.array([rim[np.argmin(x)], rim[np.argmax(x)]])


def test_lip_round_pulls_corners_in_and_lips_forward() -> None:
    neutral, _ = speaker()
    rounded = apply("lip_round")
    corners = mouth_corners()
    inward = np.abs(neutral[corners, 0]) - np.abs(rounded[corners, 0])
    assert (inward > 0.003).all()
    # Both corners stay on their own side: the mouth does not fold through the midline.
    assert np.sign(rounded[corners, 0]).tolist() == [-1.0, 1.0]
    rim = opening_rim(0.0, F.MOUTH_Y)
    central = rim[np.abs(chart().xy[rim, 0]) < 0.01]
    assert (rounded[central, 2] - neutral[central, 2] > 0.005).all()


def test_lip_spread_pushes_corners_out_and_up() -> None:
    neutral, _ = speaker()
    spread = apply("lip_spread")
    corners = mouth_corners()
    outward = np.abs(spread[corners, 0]) - np.abs(neutral[corners, 0])
    assert (outward > 0.002).all()
    assert (spread[corners, 1] > neutral[corners, 1]).all()
    rim = opening_rim(0.0, F.MOUTH_Y)
    central = rim[np.abs(chart().xy[rim, 0]) < 0.01]
    assert (spread[central, 2] < neutral[central, 2]).all()  # flattened against the teeth


def test_labiodental_tucks_the_lower_lip_up_and_back() -> None:
    neutral, _ = speaker()
    tucked = apply("labiodental")
    rim = opening_rim(0.0, F.MOUTH_Y)
    xy = chart().xy
    lower = rim[(np.abs(xy[rim, 0]) < 0.01) & (xy[rim, 1] < F.MOUTH_Y)]
    assert (tucked[lower, 1] - neutral[lower, 1] > 0.002).all()
    assert (tucked[lower, 2] - neutral[lower, 2] < -0.004).all()


def test_blendshapes_scale_with_face_size_and_stay_on_the_face() -> None:
    base = speaker()[1]
    wide = F.FaceShape(width=1.2, height=0.8)
    scaled = speaker(wide)[1]
    # x and y displacements follow the face size; depth does not depend on width/height.
    nonzero = np.abs(base[..., 0]) > 1e-5
    nonzero_y = np.abs(base[..., 1]) > 1e-5
    np.testing.assert_allclose(scaled[..., 0][nonzero] / base[..., 0][nonzero], 1.2, rtol=1e-4)
    np.testing.assert_allclose(scaled[..., 1][nonzero_y] / base[..., 1][nonzero_y], 0.8, rtol=1e-4)
    # The sides of the face between eyes and mouth belong to no articulator: they stay put.
    outline = max(rim_loops(), key=len)
    y = chart().xy[outline, 1]
    sides = outline[(y > F.NOSE_TIP_Y) & (y < F.EYE_Y)]
    assert len(sides) >= 4
    assert np.abs(base[:, sides]).max() < 2e-4


# --- curves ------------------------------------------------------------------------------------


def test_blink_curve_reaches_one_and_stays_in_range() -> None:
    times = np.arange(0.0, 10.0, 0.001)
    style = M.SpeakingStyle(blinks_per_second=1.5)
    curve = M.blink_curve(times, [], style, np.random.default_rng(0))
    assert curve.shape == times.shape
    assert curve.min() >= 0.0 and curve.max() <= 1.0
    assert curve.max() == pytest.approx(1.0)
    assert (curve == 0).mean() > 0.3  # eyes are open most of the time


def test_blink_curve_without_blinks_or_pauses_is_zero() -> None:
    times = np.arange(0.0, 5.0, 1 / 30)
    style = M.SpeakingStyle(blinks_per_second=0.0)
    curve = M.blink_curve(times, [], style, np.random.default_rng(0))
    np.testing.assert_array_equal(curve, 0.0)
    assert M.blink_curve(np.zeros(0), [], style, np.random.default_rng(0)).shape == (0,)


def test_blink_curve_blinks_at_pauses_with_the_documented_timing() -> None:
    times = np.arange(0.0, 3.0, 0.001)
    style = M.SpeakingStyle(blinks_per_second=0.0)
    # Each pause blinks with probability 0.6; with 30 pauses at 1.0 s at least one does.
    curve = M.blink_curve(times, [1.0] * 30, style, np.random.default_rng(0))
    np.testing.assert_array_equal(curve[times < 1.0], 0.0)
    at = lambda t: float(np.interp(t, times, curve))  # noqa: E731
    assert at(1.035) == pytest.approx(0.5, abs=0.02)  # closing takes 70 ms
    assert at(1.085) == pytest.approx(1.0)  # shut until 100 ms
    assert at(1.16) == pytest.approx(0.5, abs=0.02)  # reopening over 120 ms
    np.testing.assert_array_equal(curve[times > 1.221], 0.0)


def test_brow_curve_rises_at_the_end_of_questions() -> None:
    times = np.arange(0.0, 2.0, 1 / 30)
    energy = np.zeros_like(times)
    phonemes = [Phoneme("h", 0.1, 0.2), Phoneme("u", 0.2, 0.5)]
    statement = M.brow_curve(times, phonemes, energy, question=False)
    question = M.brow_curve(times, phonemes, energy, question=True)
    np.testing.assert_array_equal(statement, 0.0)
    assert question[-1] == pytest.approx(0.6)
    early = times < times[-1] - 0.5
    np.testing.assert_array_equal(question[early], 0.0)
    assert (np.diff(question) >= 0).all()


def test_brow_curve_bumps_on_the_most_prominent_vowels() -> None:
    times = np.arange(0.0, 3.0, 0.01)
    # Equally loud vowels; the long one is the most prominent (prominence ~ loudness * sqrt(dur)).
    phonemes = [
        Phoneme("t", 0.2, 0.3),
        Phoneme("ɪ", 0.3, 0.4),
        Phoneme("ɑː", 1.3, 1.6),
        Phoneme("ə", 2.5, 2.6),
    ]
    quiet = M.brow_curve(times, phonemes, np.zeros_like(times), question=False)
    np.testing.assert_array_equal(quiet, 0.0)
    loud = M.brow_curve(times, phonemes, np.full_like(times, 0.5), question=False)
    assert times[np.argmax(loud)] == pytest.approx(1.45, abs=0.011)
    assert loud.max() == pytest.approx(0.25 * 0.5 + 0.8 * 0.5, abs=1e-3)
    # The short vowels far from it get no bump: only the energy term remains there.
    assert loud[np.searchsorted(times, 0.35)] == pytest.approx(0.125, abs=1e-3)
    assert loud[np.searchsorted(times, 2.55)] == pytest.approx(0.125, abs=1e-3)
    assert M.brow_curve(times, [], np.ones_like(times), question=True).max() <= 1.2


def test_brow_curve_bumps_on_a_real_utterance() -> None:
    utt = utterance("Bob may move over the moon.")
    times = np.arange(0.0, utt.duration, 1 / 30)
    energy = M.frame_energy(utt.audio, utt.sample_rate, times)
    brow = M.brow_curve(times, utt.phonemes, energy, question=False)
    assert brow.shape == times.shape
    assert np.isfinite(brow).all() and brow.min() >= 0.0 and brow.max() <= 1.2
    # Some vowel is prominent enough to raise the brows well beyond the loudness term.
    assert (brow - 0.25 * energy).max() > 0.3


def test_channel_curves_on_a_real_utterance() -> None:
    utt = utterance("Bob may move over the moon.")
    fps = 30.0
    num_frames = int(np.ceil(utt.duration * fps))
    style = M.SpeakingStyle()
    args = (utt.phonemes, utt.audio, utt.sample_rate, num_frames, fps, style, False)
    curves = M.channel_curves(*args, np.random.default_rng(0))
    assert curves.shape == (num_frames, len(M.CHANNELS))
    assert np.isfinite(curves).all()
    assert curves.min() >= 0.0 and curves.max() <= 1.25
    # Five bilabials: the lips close at some frame; the jaw opens for the vowels.
    assert curves[:, CH["lip_closure"]].max() > 0.8
    assert curves[:, CH["jaw_open"]].max() > 0.3
    assert curves[:, CH["lip_round"]].max() > 0.5  # "move", "moon"
    assert curves[:, CH["labiodental"]].max() > 0.5  # /v/ in "move", "over"
    again = M.channel_curves(*args, np.random.default_rng(0))
    np.testing.assert_array_equal(curves, again)


def test_channel_curves_sample_each_frame_at_its_centre() -> None:
    # Frame k stands for [k, k + 1) / fps, as its phone label and the models' output frames do.
    utt = utterance("Bob may move over the moon.")
    fps, num_frames = 30.0, int(np.ceil(utt.duration * 30.0))
    args = (utt.phonemes, utt.audio, utt.sample_rate, num_frames, fps, M.SpeakingStyle(), False)
    curves = M.channel_curves(*args, np.random.default_rng(5))
    centres = (np.arange(num_frames) + 0.5) / fps
    np.testing.assert_array_equal(frame_times(num_frames, fps), centres)
    speech = M.articulation_curves(utt.phonemes, centres, np.random.default_rng(5))
    np.testing.assert_array_equal(curves[:, : len(SPEECH_CHANNELS)], speech)


def test_channel_curves_apply_the_style_gains() -> None:
    utt = utterance("Bob may move over the moon.")
    fps, num_frames = 25.0, int(np.ceil(utt.duration * 25.0))
    plain = M.SpeakingStyle()
    gains = dict(plain.gains, jaw_open=1.25, lip_round=0.75)
    styled = M.SpeakingStyle(gains=gains)
    common = (utt.phonemes, utt.audio, utt.sample_rate, num_frames, fps)
    a = M.channel_curves(*common, plain, True, np.random.default_rng(7))
    b = M.channel_curves(*common, styled, True, np.random.default_rng(7))
    np.testing.assert_allclose(b[:, CH["jaw_open"]], 1.25 * a[:, CH["jaw_open"]])
    np.testing.assert_allclose(b[:, CH["lip_round"]], 0.75 * a[:, CH["lip_round"]])
    np.testing.assert_array_equal(b[:, CH["lip_closure"]], a[:, CH["lip_closure"]])


def test_speaking_style_validation_and_sampling() -> None:
    with pytest.raises(ValidationError):
        M.SpeakingStyle(blinks_per_second=2.0)
    with pytest.raises(ValidationError):
        M.SpeakingStyle(blinks_per_second=-0.1)
    style = M.SpeakingStyle.sample(np.random.default_rng(0))
    assert set(style.gains) == set(M.CHANNELS)
    assert all(0.75 <= g <= 1.25 for g in style.gains.values())
    assert 0.2 <= style.blinks_per_second <= 0.45


def test_frame_energy_peaks_at_the_loud_part() -> None:
    sr = 16000
    audio = np.zeros(sr * 2, dtype=np.float32)
    audio[sr : sr + sr // 2] = 0.5 * np.sin(np.arange(sr // 2) * 0.3)
    times = np.arange(0.0, 2.0, 0.04)
    energy = M.frame_energy(audio, sr, times)
    assert energy.max() == pytest.approx(1.0, abs=1e-6)
    assert energy[times < 0.9].max() < 1e-6
    assert energy[(times > 1.1) & (times < 1.4)].min() > 0.9


def test_animate_is_neutral_plus_weighted_blendshapes() -> None:
    utt = utterance("Bob may move over the moon.")
    neutral, shapes = speaker()
    fps = 30.0
    num_frames = int(np.ceil(utt.duration * fps))
    curves = M.channel_curves(
        utt.phonemes,
        utt.audio,
        utt.sample_rate,
        num_frames,
        fps,
        M.SpeakingStyle(),
        False,
        np.random.default_rng(1),
    )
    curves = np.vstack([np.zeros((1, len(M.CHANNELS))), curves, np.eye(len(M.CHANNELS))])
    frames = M.animate(neutral, shapes, curves)
    assert frames.shape == (len(curves), len(neutral), 3)
    assert np.isfinite(frames).all()
    np.testing.assert_array_equal(frames[0], neutral)  # all curves 0: exactly the neutral face
    for k in range(len(M.CHANNELS)):  # one channel at 1: neutral plus that blendshape
        np.testing.assert_allclose(frames[-len(M.CHANNELS) + k], neutral + shapes[k], atol=1e-7)
    t = 1 + num_frames // 2
    expected = neutral + np.tensordot(curves[t], shapes, axes=1)
    np.testing.assert_allclose(frames[t], expected, atol=1e-6)
    # The speaking frames move the lips, and the forehead only as much as the brows allow.
    forehead = chart().xy[:, 1] > F.BROW_Y
    assert np.abs(frames[:, forehead][..., [0, 2]] - neutral[forehead][:, [0, 2]]).max() < 1e-5
    lips = chart().regions["lips"]
    assert np.abs(frames[1:-7, lips] - neutral[lips]).max() > 0.005
