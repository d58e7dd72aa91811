"""Hand-computed checks of the evaluation metrics, plus a cross-check against the reference code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmtalker.eval.metrics import (
    MetricAccumulator,
    Metrics,
    evaluate_sequences,
    fdd_sequence,
    lip_vertex_error_per_frame,
    mean_vertex_error_per_frame,
    mouth_opening,
    pearson,
)

# Three-vertex toy topology: vertices 0 and 1 are the lips, vertex 2 is the eye / upper face.
LIPS = np.array([0, 1])
EYES = np.array([2])
UPPER = np.array([2])


def _seq_a() -> tuple[np.ndarray, np.ndarray]:
    """One frame; errors v0 (1,0,0), v1 (0,2,0), v2 (0,0,10) -> squared 1, 4, 100."""
    gt = np.zeros((1, 3, 3))
    pred = np.array([[[1.0, 0, 0], [0, 2, 0], [0, 0, 10]]])
    return pred, gt


def _seq_b() -> tuple[np.ndarray, np.ndarray]:
    """Three frames, eye vertex exact; lip errors squared: f0 (2, 0), f1 (9, 0), f2 (0, 0)."""
    gt = np.zeros((3, 3, 3))
    pred = np.zeros((3, 3, 3))
    pred[0, 0] = [1, 1, 0]  # squared 2, L2 sqrt(2)
    pred[1, 0] = [2, 2, 1]  # squared 9, L2 3
    return pred, gt


def test_lve_is_max_over_lips_per_frame() -> None:
    pred, gt = _seq_a()
    # max(1, 4) = 4; the 100 on vertex 2 is outside the lips and must not count.
    np.testing.assert_array_equal(lip_vertex_error_per_frame(pred, gt, LIPS), [4.0])
    pred, gt = _seq_b()
    np.testing.assert_array_equal(lip_vertex_error_per_frame(pred, gt, LIPS), [2.0, 9.0, 0.0])


def test_lve_pools_frames_across_sequences() -> None:
    metrics = evaluate_sequences(
        [(*_seq_a(), np.zeros((3, 3))), (*_seq_b(), np.zeros((3, 3)))], LIPS, EYES, UPPER
    )
    # Pooled frames [4, 2, 9, 0]: (4 + 2 + 9 + 0) / 4 = 3.75.
    assert metrics.lve == pytest.approx(3.75, rel=1e-15)
    # The mean of per-sequence means would be (4 + 11/3) / 2 = 3.8333..., which is not LVE.
    assert metrics.lve != pytest.approx((4.0 + 11.0 / 3.0) / 2.0)
    assert metrics.num_frames == 4
    assert metrics.num_sequences == 2


def test_lve_non_squared_variant() -> None:
    pred, gt = _seq_b()
    # Per-frame max L2: sqrt(2), 3, 0.
    np.testing.assert_allclose(
        lip_vertex_error_per_frame(pred, gt, LIPS, squared=False), [math.sqrt(2), 3.0, 0.0]
    )
    metrics = evaluate_sequences(
        [(*_seq_a(), np.zeros((3, 3))), (*_seq_b(), np.zeros((3, 3)))], LIPS, EYES, UPPER
    )
    # Pooled [2, sqrt(2), 3, 0]: (5 + 1.4142135623730951) / 4 = 1.6035533905932737.
    assert metrics.lve_l2 == pytest.approx(1.6035533905932737, rel=1e-15)


def test_eve_uses_eye_region() -> None:
    metrics = evaluate_sequences(
        [(*_seq_a(), np.zeros((3, 3))), (*_seq_b(), np.zeros((3, 3)))], LIPS, EYES, UPPER
    )
    # Eye vertex 2 errs only in sequence A: squared [100, 0, 0, 0] -> 25; L2 [10, 0, 0, 0] -> 2.5.
    assert metrics.eve == pytest.approx(25.0, rel=1e-15)
    assert metrics.eve_l2 == pytest.approx(2.5, rel=1e-15)


def test_mve_mean_l2_over_all_vertices_and_pooled_frames() -> None:
    pred, gt = _seq_a()
    # L2 per vertex 1, 2, 10 -> 13 / 3.
    np.testing.assert_allclose(mean_vertex_error_per_frame(pred, gt), [13.0 / 3.0])
    pred, gt = _seq_b()
    # f0: (sqrt(2) + 0 + 0) / 3, f1: (3 + 0 + 0) / 3 = 1, f2: 0.
    np.testing.assert_allclose(mean_vertex_error_per_frame(pred, gt), [math.sqrt(2) / 3, 1, 0])
    metrics = evaluate_sequences(
        [(*_seq_a(), np.zeros((3, 3))), (*_seq_b(), np.zeros((3, 3)))], LIPS, EYES, UPPER
    )
    # (13/3 + sqrt(2)/3 + 1 + 0) / 4 = (13 + 1.4142135623730951 + 3) / 12 = 1.4511844635310913.
    assert metrics.mve == pytest.approx(1.4511844635310913, rel=1e-15)


def _moving(template: np.ndarray, offsets: list[float], vertex: int) -> np.ndarray:
    """Frames equal to ``template`` except ``vertex`` shifted by ``offsets[t]`` along x."""
    frames = np.repeat(template[None], len(offsets), axis=0)
    frames[:, vertex, 0] += offsets
    return frames


TEMPLATE = np.array([[0.0, 0, 0], [0, 1, 0], [1, 0, 0]])


def test_fdd_positive_when_prediction_is_static() -> None:
    gt = _moving(TEMPLATE, [0.0, 2.0], vertex=2)
    pred = np.repeat(TEMPLATE[None], 2, axis=0)
    # gt motion of vertex 2 is 0 then 2 (template subtracted, so its x = 1 does not count);
    # squared norms [0, 4], population std 2 (ddof=1 would give 2.83; the std of the plain
    # norms [0, 2] would give 1). Static pred: std 0. FDD = 2 - 0 = 2.
    assert fdd_sequence(pred, gt, TEMPLATE, UPPER) == pytest.approx(2.0, rel=1e-15)
    # Upper region {1, 2}: vertex 1 is still (std 0), so mean over vertices (2 + 0) / 2 = 1.
    assert fdd_sequence(pred, gt, TEMPLATE, np.array([1, 2])) == pytest.approx(1.0, rel=1e-15)
    # Swapping roles flips the sign.
    assert fdd_sequence(gt, pred, TEMPLATE, UPPER) == pytest.approx(-2.0, rel=1e-15)


def test_fdd_signed_and_absolute_over_sequences() -> None:
    still = np.repeat(TEMPLATE[None], 4, axis=0)
    seq1 = (still[:2], _moving(TEMPLATE, [0.0, 2.0], vertex=2), TEMPLATE)  # FDD +2 (see above)
    # gt still; pred squared norms [0, 1, 0, 1]: mean 0.5, std 0.5. FDD = 0 - 0.5 = -0.5.
    seq2 = (_moving(TEMPLATE, [0.0, 1.0, 0.0, 1.0], vertex=2), still, TEMPLATE)
    metrics = evaluate_sequences([seq1, seq2], LIPS, EYES, UPPER)
    # Signed: (2 - 0.5) / 2 = 0.75. Absolute: (2 + 0.5) / 2 = 1.25.
    assert metrics.fdd == pytest.approx(0.75, rel=1e-15)
    assert metrics.fdd_abs == pytest.approx(1.25, rel=1e-15)


def test_truncates_to_shorter_sequence() -> None:
    gt = np.zeros((3, 3, 3))
    pred = np.zeros((5, 3, 3))
    pred[:, 0, 0] = [1, 2, 3, 100, 100]  # the 100s lie beyond gt's end and must be ignored
    # Squared lip errors of the first three frames: 1, 4, 9.
    np.testing.assert_array_equal(lip_vertex_error_per_frame(pred, gt, LIPS), [1.0, 4.0, 9.0])
    # Same when the prediction is the shorter one.
    np.testing.assert_array_equal(lip_vertex_error_per_frame(gt, pred, LIPS), [1.0, 4.0, 9.0])
    metrics = evaluate_sequences([(pred, gt, np.zeros((3, 3)))], LIPS, EYES, UPPER)
    assert metrics.num_frames == 3
    assert metrics.lve == pytest.approx(14.0 / 3.0, rel=1e-15)  # (1 + 4 + 9) / 3


def test_accumulator_matches_evaluate_sequences_and_as_dict() -> None:
    acc = MetricAccumulator(LIPS, EYES, UPPER)
    acc.add(*_seq_a(), np.zeros((3, 3)))
    acc.add(*_seq_b(), np.zeros((3, 3)))
    result = acc.result()
    assert isinstance(result, Metrics)
    assert result.as_dict()["lve"] == pytest.approx(3.75)
    assert set(result.as_dict()) == {
        "lve", "lve_l2", "eve", "eve_l2", "mve", "fdd", "fdd_abs", "lip_sync", "mve_lips",
        "mve_eyes", "mve_upper_face", "mve_rest", "num_sequences", "num_frames",
    }  # fmt: skip


# Four lip vertices: two on the upper lip (y = +1), two on the lower lip (y = -1); vertex 4 is
# an eye, vertex 5 belongs to no region (the "rest").
MOUTH_TEMPLATE = np.array([[-1.0, 1, 0], [1, 1, 0], [-1, -1, 0], [1, -1, 0], [0, 5, 0], [0, -5, 0]])
MOUTH_LIPS = np.array([0, 1, 2, 3])


def _mouth(openings: list[float]) -> np.ndarray:
    """Frames whose lower lip drops by each opening (upper lip still), everything else neutral."""
    frames = np.repeat(MOUTH_TEMPLATE[None], len(openings), axis=0)
    frames[:, 2:4, 1] -= np.asarray(openings)[:, None]
    return frames


def test_mouth_opening_is_the_lip_gap_relative_to_neutral() -> None:
    np.testing.assert_allclose(mouth_opening(_mouth([0.0, 0.5, 2.0]), MOUTH_TEMPLATE, MOUTH_LIPS),
                               [0.0, 0.5, 2.0])  # fmt: skip
    # Pressed lips (lower lip pushed up) give a negative opening; sideways motion none.
    pressed = _mouth([-0.25])
    pressed[0, :4, 0] += 3.0
    np.testing.assert_allclose(mouth_opening(pressed, MOUTH_TEMPLATE, MOUTH_LIPS), [-0.25])
    # A face moved up as a whole does not open its mouth.
    np.testing.assert_allclose(
        mouth_opening(MOUTH_TEMPLATE[None] + [0, 7, 0], MOUTH_TEMPLATE, MOUTH_LIPS), [0.0]
    )


def test_lip_sync_is_pearson_of_the_openings_over_the_split() -> None:
    truth = [0.0, 1.0, 2.0, 1.0, 0.0]
    acc = MetricAccumulator(MOUTH_LIPS, np.array([4]), np.array([4]))
    # Half the amplitude but perfectly in time: correlation 1 (LVE sees the amplitude error).
    acc.add(_mouth([0.5 * t for t in truth]), _mouth(truth), MOUTH_TEMPLATE)
    assert acc.result().lip_sync == pytest.approx(1.0)
    # A mouth that opens when the truth closes anti-correlates; pooled over both sequences the
    # correlation is that of the concatenated series.
    acc.add(_mouth([2.0 - t for t in truth]), _mouth(truth), MOUTH_TEMPLATE)
    pred = np.array([0.5 * t for t in truth] + [2.0 - t for t in truth])
    assert acc.result().lip_sync == pytest.approx(pearson(pred, np.array(truth * 2)))
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.ones(3), np.array([1.0, 2.0, 3.0])))


def test_region_errors_split_lips_eyes_upper_face_and_rest() -> None:
    gt = MOUTH_TEMPLATE[None]
    pred = gt.copy()
    pred[0, 0] += [3.0, 4.0, 0.0]  # lip error 5 on one of four lip vertices
    pred[0, 4] += [0.0, 0.0, 2.0]  # eye (and upper face) error 2
    pred[0, 5] += [1.0, 0.0, 0.0]  # rest error 1
    scores = evaluate_sequences([(pred, gt, MOUTH_TEMPLATE)], MOUTH_LIPS, [4], [4])
    assert scores.mve_lips == pytest.approx(1.25)
    assert scores.mve_eyes == pytest.approx(2.0)
    assert scores.mve_upper_face == pytest.approx(2.0)
    assert scores.mve_rest == pytest.approx(1.0)
    assert scores.mve == pytest.approx(8.0 / 6.0)


def test_per_frame_functions_accept_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    pred, gt = _seq_b()
    out = lip_vertex_error_per_frame(torch.from_numpy(pred), torch.from_numpy(gt), LIPS)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), [2.0, 9.0, 0.0])
    out = lip_vertex_error_per_frame(
        torch.from_numpy(pred), torch.from_numpy(gt), LIPS, squared=False
    )
    np.testing.assert_allclose(out.numpy(), [math.sqrt(2), 3.0, 0.0])
    out = mean_vertex_error_per_frame(torch.from_numpy(pred), torch.from_numpy(gt))
    np.testing.assert_allclose(out.numpy(), [math.sqrt(2) / 3, 1, 0])
    with pytest.raises(TypeError):
        mean_vertex_error_per_frame(torch.from_numpy(pred), gt)


@pytest.mark.parametrize(
    ("pred_shape", "gt_shape", "message"),
    [
        ((2, 3, 3), (2, 4, 3), "vertices"),
        ((2, 3, 2), (2, 3, 2), r"\(T, V, 3\)"),
        ((2, 9), (2, 9), r"\(T, V, 3\)"),
        ((0, 3, 3), (0, 3, 3), "no frames"),
    ],
)
def test_shape_errors(pred_shape: tuple, gt_shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mean_vertex_error_per_frame(np.zeros(pred_shape), np.zeros(gt_shape))


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (np.array([], dtype=int), "empty"),
        (np.array([0, 3]), "outside"),
        (np.array([-1]), "outside"),
        (np.array([True, False, True]), "integer"),
    ],
)
def test_region_errors(region: np.ndarray, message: str) -> None:
    pred, gt = _seq_a()
    with pytest.raises(ValueError, match=message):
        lip_vertex_error_per_frame(pred, gt, region)
    with pytest.raises(ValueError, match=message):
        evaluate_sequences([(pred, gt, np.zeros((3, 3)))], region, EYES, UPPER)


def test_nan_and_template_errors() -> None:
    pred, gt = _seq_a()
    bad = pred.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lip_vertex_error_per_frame(bad, gt, LIPS)
    with pytest.raises(ValueError, match="NaN"):
        fdd_sequence(pred, gt, np.full((3, 3), np.nan), UPPER)
    with pytest.raises(ValueError, match="template"):
        fdd_sequence(pred, gt, np.zeros((4, 3)), UPPER)


def test_empty_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="no sequences"):
        evaluate_sequences([], LIPS, EYES, UPPER)


def _codetalker_reference(seqs, mouth_map, eye_map, upper_map):
    """Loop transcription of CodeTalker main/cal_metric.py, with FaceDiffuser's MVE and |FDD|."""
    vertices_gt_all, vertices_pred_all = [], []
    motion_std_difference, abs_motion_std_difference = [], []
    for vertices_pred, vertices_gt, template in seqs:
        vertices_pred = vertices_pred[: vertices_gt.shape[0], :, :]
        vertices_gt = vertices_gt[: vertices_pred.shape[0], :, :]
        motion_pred = vertices_pred - template.reshape(1, -1, 3)
        motion_gt = vertices_gt - template.reshape(1, -1, 3)
        vertices_gt_all.extend(list(vertices_gt))
        vertices_pred_all.extend(list(vertices_pred))
        stds = []
        for motion in (motion_gt, motion_pred):
            L2_dis_upper = np.array([np.square(motion[:, v, :]) for v in upper_map])
            L2_dis_upper = np.transpose(L2_dis_upper, (1, 0, 2))
            L2_dis_upper = np.sum(L2_dis_upper, axis=2)
            L2_dis_upper = np.std(L2_dis_upper, axis=0)
            stds.append(np.mean(L2_dis_upper))
        motion_std_difference.append(stds[0] - stds[1])
        abs_motion_std_difference.append(np.abs(stds[0] - stds[1]))
    vertices_gt_all = np.array(vertices_gt_all)
    vertices_pred_all = np.array(vertices_pred_all)

    def region_max(region):
        d = np.array(
            [np.square(vertices_gt_all[:, v, :] - vertices_pred_all[:, v, :]) for v in region]
        )
        d = np.transpose(d, (1, 0, 2))
        d = np.sum(d, axis=2)
        return np.max(d, axis=1)

    return {
        "lve": np.mean(region_max(mouth_map)),
        "lve_l2": np.mean(np.sqrt(region_max(mouth_map))),
        "eve": np.mean(region_max(eye_map)),
        "mve": np.mean(np.linalg.norm(vertices_gt_all - vertices_pred_all, axis=2)),
        "fdd": sum(motion_std_difference) / len(motion_std_difference),
        "fdd_abs": sum(abs_motion_std_difference) / len(motion_std_difference),
        "num_frames": len(vertices_gt_all),
    }


def test_matches_reference_loop_on_random_data() -> None:
    rng = np.random.default_rng(0)
    num_vertices = 40
    lips = rng.choice(num_vertices, size=7, replace=False)
    eyes = rng.choice(num_vertices, size=5, replace=False)
    upper = rng.choice(num_vertices, size=12, replace=False)
    seqs = []
    for length, extra in [(11, 1), (5, 0), (17, -2)]:
        template = rng.normal(size=(num_vertices, 3))
        gt = template + 0.01 * rng.normal(size=(length, num_vertices, 3))
        pred = template + 0.01 * rng.normal(size=(length + extra, num_vertices, 3))
        seqs.append((pred, gt, template))
    expected = _codetalker_reference(seqs, lips, eyes, upper)
    got = evaluate_sequences(seqs, lips, eyes, upper).as_dict()
    assert got["num_frames"] == expected["num_frames"] == 11 + 5 + 15
    for key in ("lve", "lve_l2", "eve", "mve", "fdd", "fdd_abs"):
        assert got[key] == pytest.approx(expected[key], rel=1e-10), key
