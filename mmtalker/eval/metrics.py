"""Evaluation metrics for speech-driven 3D face animation, computed as the published tables do.

The definitions follow the reference scoring scripts that produced the numbers everyone compares
against: CodeTalker ``main/cal_metric.py`` (LVE, FDD) and FaceDiffuser
``evaluation/compute_objective_metrics.py`` (MVE, absolute FDD), which SelfTalk and later work
reuse. FaceFormer released no scoring script; its paper's LVE (after MeshTalk) is the same formula.

* **LVE** (lip vertex error): per frame, the maximum over lip vertices of the *squared* L2 error
  (sum over xyz of squared differences); then the mean over all frames of the split, pooled across
  sequences (a long sequence weighs more than a short one; it is not a mean of per-sequence
  means). ``lve_l2`` is the same with the plain L2 distance (``sqrt`` of the per-frame maximum).
* **EVE** (eye vertex error): LVE's formula on the eye-region vertices.
* **MVE** (mean vertex error): mean over all pooled frames and all vertices of the L2 distance.
* **FDD** (upper-face dynamics deviation): per sequence and separately for ground truth and
  prediction, motion = vertices - template; per upper-face vertex the squared L2 norm of the
  motion over time (T, V_upper); its standard deviation over time (population, ``ddof=0``);
  mean over vertices. The sequence value is ``std_gt - std_pred`` (positive: prediction too
  still). The split FDD is the mean over sequences; ``fdd_abs`` the mean of ``|value|``.
* **Lip sync** (``lip_sync``): how well the mouth opens and closes with the speech, as a person
  judges it. Per frame the *mouth opening* is measured on the lip region alone, so it works on
  any topology: the region's vertices are split at the median height (+y is up, the convention
  of VOCASET, BIWI and our corpora) of the speaker's neutral lips into an upper and a lower half,
  and the opening is the mean height of the upper half minus that of the lower half, relative to
  the same on the neutral face (metres: 0 at rest, positive when the lips part, negative when
  they press). ``lip_sync`` is the Pearson correlation of the predicted and the ground-truth
  opening over all frames of the split, pooled like LVE (1 is perfect; NaN if either opening is
  constant).
* **Per-region error** (``mve_lips``, ``mve_eyes``, ``mve_upper_face``, ``mve_rest``): MVE's
  formula (mean L2 distance) over the vertices of one region; ``rest`` is every vertex in none of
  the lips, eyes and upper face.

Units: errors are in the units of the input vertices, squared for LVE, EVE and FDD (FDD is a
standard deviation of squared distances) and plain for ``lve_l2``, ``eve_l2`` and MVE. Nothing
is rescaled here. Published tables print scaled numbers: VOCASET (vertices in metres) prints
LVE x1e-5 and FDD x1e-7; BIWI (vertices in mm) prints LVE x1e-4 and FDD x1e-5. The papers
label these "mm" although LVE and FDD are squared distances.

Length mismatch: a prediction and its ground truth may differ by a frame or two (audio framing).
Both are truncated to the shorter length before scoring, as FaceDiffuser does (CodeTalker only
cuts the prediction to the ground-truth length, which gives the same result whenever the
prediction is the longer one). All numpy arithmetic is in float64; the reference scripts run in
the dtype of the saved arrays (usually float32), so LVE/EVE/MVE differ from them by about 1e-7
relative and FDD, a difference of two close numbers, by up to about 1e-4 relative.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmtalker.data.sequence import Topology

__all__ = [
    "MetricAccumulator",
    "Metrics",
    "evaluate_sequences",
    "fdd_sequence",
    "lip_vertex_error_per_frame",
    "mean_vertex_error_per_frame",
    "motion_spread",
    "mouth_opening",
    "pearson",
]


def _is_torch(x: Any) -> bool:
    # Checked by module name so that numpy-only callers never import torch.
    return type(x).__module__.split(".")[0] == "torch"


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a float array, could not convert: {exc}") from exc


def _check_vertices(x: Any, name: str) -> None:
    shape = tuple(x.shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"{name} must have shape (T, V, 3), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} has no frames")
    if shape[1] == 0:
        raise ValueError(f"{name} has no vertices")
    finite = bool(x.isfinite().all()) if _is_torch(x) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")


def _prepare_pair(pred: Any, gt: Any) -> tuple[Any, Any]:
    """Validate a (pred, gt) pair and truncate both to the shorter length."""
    if _is_torch(pred) != _is_torch(gt):
        raise TypeError("pred and gt must both be numpy arrays or both be torch tensors")
    if not _is_torch(pred):
        pred, gt = _as_numpy(pred, "pred"), _as_numpy(gt, "gt")
    _check_vertices(pred, "pred")
    _check_vertices(gt, "gt")
    if pred.shape[1] != gt.shape[1]:
        raise ValueError(
            f"pred has {pred.shape[1]} vertices but gt has {gt.shape[1]}; "
            "they must share one topology"
        )
    num_frames = min(pred.shape[0], gt.shape[0])
    return pred[:num_frames], gt[:num_frames]


def _check_region(region: Any, num_vertices: int, name: str) -> np.ndarray:
    """Validate vertex indices: non-empty, 1-D, integer and inside ``0..num_vertices-1``."""
    idx = np.asarray(region)
    if idx.ndim != 1:
        raise ValueError(f"{name} region must be a 1-D array of vertex indices, got {idx.shape}")
    if idx.size == 0:
        raise ValueError(f"{name} region is empty")
    if not np.issubdtype(idx.dtype, np.integer):
        # A boolean mask would otherwise be read as indices 0 and 1.
        raise ValueError(
            f"{name} region must hold integer vertex indices, got dtype {idx.dtype} "
            "(convert a boolean mask with np.flatnonzero)"
        )
    # Negative indices would silently wrap around in numpy, so they are rejected too.
    if idx.min() < 0 or idx.max() >= num_vertices:
        raise ValueError(
            f"{name} region indexes vertices outside 0..{num_vertices - 1} "
            f"(min {idx.min()}, max {idx.max()})"
        )
    return idx.astype(np.int64, copy=False)


def _region_index(region: np.ndarray, like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.as_tensor(region, device=like.device)
    return region


def lip_vertex_error_per_frame(pred: Any, gt: Any, region: Any, squared: bool = True) -> Any:
    """Per frame, the max over ``region`` vertices of the squared L2 error (or L2 if not squared).

    Inputs are (T, V, 3) numpy arrays or torch tensors, truncated to the shorter length; (T,) out.
    """
    pred, gt = _prepare_pair(pred, gt)
    idx = _region_index(_check_region(region, pred.shape[1], "lip"), pred)
    diff = pred[:, idx] - gt[:, idx]
    per_vertex = (diff * diff).sum(-1)
    worst = per_vertex.amax(-1) if _is_torch(per_vertex) else per_vertex.max(-1)
    if squared:
        return worst
    # sqrt is monotonic, so sqrt of the max squared error equals the max L2 error.
    return worst.sqrt() if _is_torch(worst) else np.sqrt(worst)


def mean_vertex_error_per_frame(pred: Any, gt: Any) -> Any:
    """Per frame, the mean over all vertices of the L2 distance; (T, V, 3) in, (T,) out.

    Works on numpy arrays or torch tensors; both are truncated to the shorter length.
    """
    pred, gt = _prepare_pair(pred, gt)
    diff = pred - gt
    per_vertex = (diff * diff).sum(-1)
    dist = per_vertex.sqrt() if _is_torch(per_vertex) else np.sqrt(per_vertex)
    return dist.mean(-1)


def mouth_opening(vertices: Any, template: Any, lips: Any) -> np.ndarray:
    """Per-frame mouth opening (T,) on the lip region, relative to the neutral ``template``.

    See the module docstring: upper minus lower half's mean height, halves split at the median
    height of the neutral lips; constant 0 for lips without height spread. Vertices (T, V, 3),
    template (V, 3), lips: vertex indices.
    """
    vertices, template = _as_numpy(vertices, "vertices"), _as_numpy(template, "template")
    _check_vertices(vertices, "vertices")
    idx = _check_region(lips, vertices.shape[1], "lip")
    height = template[idx, 1]
    upper = height > np.median(height)
    if not upper.any():
        # Flat lips have no upper and lower half: the opening is undefined, reported as constant
        # (so ``lip_sync`` is NaN) rather than failing a whole evaluation.
        return np.zeros(len(vertices))
    y = vertices[:, idx, 1] - height
    return y[:, upper].mean(axis=1) - y[:, ~upper].mean(axis=1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long series; NaN when either is constant."""
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else float("nan")


def motion_spread(vertices: np.ndarray, template: np.ndarray, idx: np.ndarray) -> float:
    """FDD's statistic of one sequence: mean over vertices ``idx`` of the std over time of the
    squared motion norm; vertices (T, V, 3), template (V, 3)."""
    motion = vertices[:, idx] - template[idx]
    # CodeTalker takes the std of the *squared* displacement norm, not of the norm itself.
    squared_norm = np.square(motion).sum(axis=2)
    return float(np.std(squared_norm, axis=0).mean())


def fdd_sequence(pred: Any, gt: Any, template: Any, upper_region: Any) -> float:
    """Signed upper-face dynamics deviation of one sequence (CodeTalker): ``std_gt - std_pred``.

    ``template`` is the (V, 3) neutral face of the subject; positive means the prediction is
    stiller than the ground truth. Units: squared vertex units.
    """
    pred, gt = _prepare_pair(_as_numpy(pred, "pred"), _as_numpy(gt, "gt"))
    template = _as_numpy(template, "template")
    num_vertices = pred.shape[1]
    if template.shape != (num_vertices, 3):
        raise ValueError(f"template must have shape ({num_vertices}, 3), got {template.shape}")
    if not np.isfinite(template).all():
        raise ValueError("template contains NaN or infinite values")
    idx = _check_region(upper_region, num_vertices, "upper")
    return motion_spread(gt, template, idx) - motion_spread(pred, template, idx)


@dataclass(frozen=True)
class Metrics:
    """Split-level scores; see the module docstring for definitions and units (none rescaled)."""

    lve: float
    lve_l2: float
    eve: float
    eve_l2: float
    mve: float
    fdd: float
    fdd_abs: float
    lip_sync: float
    mve_lips: float
    mve_eyes: float
    mve_upper_face: float
    mve_rest: float
    num_sequences: int
    num_frames: int

    def as_dict(self) -> dict[str, float | int]:
        """The scores as a plain ``{name: value}`` dict, e.g. for logging."""
        return {
            "lve": self.lve,
            "lve_l2": self.lve_l2,
            "eve": self.eve,
            "eve_l2": self.eve_l2,
            "mve": self.mve,
            "fdd": self.fdd,
            "fdd_abs": self.fdd_abs,
            "lip_sync": self.lip_sync,
            "mve_lips": self.mve_lips,
            "mve_eyes": self.mve_eyes,
            "mve_upper_face": self.mve_upper_face,
            "mve_rest": self.mve_rest,
            "num_sequences": self.num_sequences,
            "num_frames": self.num_frames,
        }


@dataclass
class MetricAccumulator:
    """Collects sequences of a split one at a time and scores them with :meth:`result`.

    ``lips``, ``eyes`` and ``upper`` are integer vertex index arrays of the shared topology.
    """

    lips: np.ndarray
    eyes: np.ndarray
    upper: np.ndarray
    _lip_sq: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _eye_sq: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _region_error: dict[str, list[np.ndarray]] = field(default_factory=dict, init=False, repr=False)
    _opening: list[tuple[np.ndarray, np.ndarray]] = field(
        default_factory=list, init=False, repr=False
    )
    _fdd: list[float] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def for_topology(cls, topology: Topology) -> MetricAccumulator:
        """An accumulator on the topology's lips, eyes and upper-face regions."""
        return cls(topology.region("lips"), topology.region("eyes"), topology.region("upper_face"))

    def __post_init__(self) -> None:
        # Emptiness and dtype are checked now; the index range needs V, known at the first add.
        for name in ("lips", "eyes", "upper"):
            setattr(self, name, _check_region(getattr(self, name), np.iinfo(np.int64).max, name))

    def _regions(self, num_vertices: int) -> dict[str, np.ndarray]:
        """Vertex sets of the per-region errors: all, lips, eyes, upper face and the rest."""
        inside = np.zeros(num_vertices, bool)
        inside[np.concatenate([self.lips, self.eyes, self.upper])] = True
        return {
            "all": np.arange(num_vertices), "lips": self.lips, "eyes": self.eyes,
            "upper_face": self.upper, "rest": np.flatnonzero(~inside),
        }  # fmt: skip

    def add(self, pred: Any, gt: Any, template: Any) -> None:
        """Score one sequence: (T, V, 3) prediction and ground truth, (V, 3) template."""
        pred, gt = _prepare_pair(_as_numpy(pred, "pred"), _as_numpy(gt, "gt"))
        num_vertices = pred.shape[1]
        for name in ("lips", "eyes", "upper"):
            _check_region(getattr(self, name), num_vertices, name)
        fdd = fdd_sequence(pred, gt, template, self.upper)
        # Only the squared per-frame maxima are kept; the L2 variant is their square root.
        self._lip_sq.append(lip_vertex_error_per_frame(pred, gt, self.lips))
        self._eye_sq.append(lip_vertex_error_per_frame(pred, gt, self.eyes))
        distance = np.sqrt(np.square(pred - gt).sum(axis=-1))
        for name, idx in self._regions(num_vertices).items():
            if len(idx):
                self._region_error.setdefault(name, []).append(distance[:, idx].mean(axis=1))
        self._opening.append(
            (mouth_opening(pred, template, self.lips), mouth_opening(gt, template, self.lips))
        )
        self._fdd.append(fdd)

    def result(self) -> Metrics:
        """Pool the frames of all added sequences (LVE, EVE, MVE, lip sync) and average FDD per
        sequence."""
        if not self._fdd:
            raise ValueError("no sequences were added; there is nothing to score")
        lip_sq = np.concatenate(self._lip_sq)
        eye_sq = np.concatenate(self._eye_sq)
        fdd = np.asarray(self._fdd)

        def region(name: str) -> float:
            parts = self._region_error.get(name)
            return float(np.concatenate(parts).mean()) if parts else float("nan")

        predicted, truth = (np.concatenate(side) for side in zip(*self._opening, strict=True))
        return Metrics(
            lve=float(lip_sq.mean()),
            lve_l2=float(np.sqrt(lip_sq).mean()),
            eve=float(eye_sq.mean()),
            eve_l2=float(np.sqrt(eye_sq).mean()),
            mve=region("all"),
            fdd=float(fdd.mean()),
            fdd_abs=float(np.abs(fdd).mean()),
            lip_sync=pearson(predicted, truth),
            mve_lips=region("lips"),
            mve_eyes=region("eyes"),
            mve_upper_face=region("upper_face"),
            mve_rest=region("rest"),
            num_sequences=len(self._fdd),
            num_frames=len(lip_sq),
        )


def evaluate_sequences(
    pairs: Iterable[tuple[Any, Any, Any]], lips: Any, eyes: Any, upper: Any
) -> Metrics:
    """Score a split given ``(pred, gt, template)`` triples; see :class:`MetricAccumulator`."""
    acc = MetricAccumulator(lips, eyes, upper)
    for pred, gt, template in pairs:
        acc.add(pred, gt, template)
    return acc.result()


#: How the published tables print each metric (vertices in metres): (label, factor).
REPORTED = {
    "lve": ("LVE x1e-5", 1e5),
    "lve_l2": ("LVE-L2 mm", 1e3),
    "eve": ("EVE x1e-5", 1e5),
    "mve": ("MVE mm", 1e3),
    "fdd": ("FDD x1e-7", 1e7),
    "fdd_abs": ("|FDD| x1e-7", 1e7),
    "lip_sync": ("lip sync r", 1.0),
}


def format_scores(scores: dict[str, float]) -> str:
    """Scores as the field's tables print them: ``LVE x1e-5 3.141  LVE-L2 mm 1.234 ...``."""
    return "  ".join(f"{label} {scores[k] * factor:.3f}" for k, (label, factor) in REPORTED.items())
