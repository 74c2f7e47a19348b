"""Uncertainty of HIH landmark predictions: per point, per face, per task, and the Label Studio scores.

Inputs are the decoder statistics of ``model.codec.decode`` (``FacePrediction.stats``, each (K,) per face or
(N, K) for a batch): ``integer_std`` (spread of the softmax of the integer heatmap, input pixels of the
model's face crop), ``integer_peak`` (its largest probability), ``decimal_std`` (spread of the 8x8 decimal
distribution, crop pixels), ``decimal_entropy`` (0-1), ``decimal_peak``.

The formula (``POINT_FORMULA``, ``FACE_AGGREGATE``)
---------------------------------------------------
- point:  ``u_k = sqrt(integer_std_k^2 + decimal_std_k^2)`` (crop px): the spread of the model's whole
  position distribution, integer pixel and sub-pixel cell together (as if independent);
- face:   ``U = mean of the 17 largest u_k`` (the 25 % least sure points, "top25");
- task:   the largest face ``U`` (+inf without a face: a human must look);
- scores: calibrated probabilities, logistic in ``ln u``, higher = more confident, fitted on the 100
  holdout faces (clean ground truth): region ``score`` = P(point error <= 5 % of the inter-ocular distance)
  (``POINT_CALIBRATION``); prediction ``score`` = P(face NME <= 5 %) (``FACE_CALIBRATION``) of the task's
  most uncertain face, 0 without a face. The fit is steep (U from 7.0 to 8.2 crop px spans the 10th-90th
  percentile; score 0.5 at U = 7.9) because the integer map's spread has a floor set by the width of its
  training label. Label Studio's ascending "prediction score" order and its uncertainty sampling therefore
  show the most doubtful tasks first; ``score_to_uncertainty`` inverts the prediction score exactly.

Why (``python benchmarks/bench_uncertainty.py select``; benchmarks/results/uncertainty_selection.json)
----------------------------------------------------------------------------------------------------
Chosen on TRAINING data only, never on the validation faces: the 100 300-W training faces that the default
model's run held out (``np.random.default_rng(0).permutation(2012)[:100]``) plus the 800 ytf/train frames
(never trained on), 5 folds (ytf grouped by person). Every per-point candidate (``POINT_CANDIDATES``) x
face aggregate (``FACE_AGGREGATES``) was scored by the Spearman correlation of face uncertainty with face
NME, per fold. Default model (weights/hih_cpu_300w, epoch 44; mean NME 4.07 % on the holdout faces, 6.70 %
on ytf); mean over folds (sd); hit10 = share of a fold's worst 10 % among its 10 % most uncertain; pt =
Spearman of point uncertainty with point error (all points pooled, error / inter-ocular distance):

    formula                                   Spearman       hit10   pt
    top25(integer_std)                        0.642 (0.042)  0.49    0.342
    top25(rss_std)            <- chosen       0.641 (0.042)  0.49    0.343
    top25(integer_std + decimal_std)          0.638 (0.043)  0.49    0.342
    top10(rss_std)                            0.628 (0.044)  0.48    0.343
    mean(integer_std)                         0.622 (0.042)  0.47    0.342
    mean(decimal_std)                         0.561 (0.068)  0.37    0.253
    mean(decimal_entropy)                     0.454 (0.076)  0.29    0.049
    baseline: -mean(integer_peak)             0.462 (0.077)  0.30    0.259
    top25(flip disagreement), 2nd pass        0.473 (0.092)  0.39    0.200
    fitted log-linear, 4 stats, out of fold   0.661 (0.046)  0.47    -
    fitted ln integer_std + ln integer_peak   0.658 (0.031)  0.49    -

Rule: among the unfitted formulas within one standard error (fold sd / sqrt 5) of the best Spearman, take
the one whose per-point uncertainty best predicts the per-point error (it also gives the regions' scores).
Findings: the integer map's spread carries almost all the signal; adding the decimal spread changes the
face ranking by about 0.001 (rss_std is picked by the rule from a tie, and is the natural total spread); the
decimal entropy, the decimal peak and either map's peak value are much weaker; the least sure quarter of the
points predicts the face's error better than the mean of all (errors concentrate on a few points: jaw,
occluded or blurred parts). Fitted log-linear combinations gained about 0.02 (half a fold sd) out of fold,
with weights that drift between training checkpoints (ln integer_std 2.7 at epoch 8, 4.8 at epoch 44) and
give a higher integer peak a higher uncertainty at a fixed spread, which has no clear reading: not adopted.
Flip-test disagreement (a second network pass) was weaker than the chosen formula and is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "STAT_FIELDS",
    "FACE_OK_NME",
    "POINT_OK_IOD",
    "loglinear_features",
    "POINT_CANDIDATES",
    "FACE_AGGREGATES",
    "point_uncertainty",
    "face_uncertainty",
    "task_uncertainty",
    "point_scores",
    "face_score",
    "task_score",
    "score_to_uncertainty",
    "score_face",
    "score_faces",
    "prediction_scores",
    "spearman",
    "worst_in_most_uncertain",
    "per_image_rows",
]

STAT_FIELDS = ("integer_peak", "integer_std", "decimal_entropy", "decimal_std", "decimal_peak")

_EPS = 1e-6


def _stat(stats: Mapping[str, Any], name: str) -> np.ndarray:
    if name not in stats:
        raise KeyError(f"decoder statistics lack {name!r} (have {', '.join(sorted(stats))})")
    return np.asarray(stats[name], dtype=np.float64)


# --------------------------------------------------------------------------------------- candidates
# Per-point uncertainty candidates, each (..., K) stats -> (..., K), larger = less sure. Units: input pixels
# of the model's face crop where the statistic is a spread; unitless otherwise.
POINT_CANDIDATES: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "integer_std": lambda s: _stat(s, "integer_std"),
    "decimal_std": lambda s: _stat(s, "decimal_std"),
    "sum_std": lambda s: _stat(s, "integer_std") + _stat(s, "decimal_std"),
    "rss_std": lambda s: np.hypot(_stat(s, "integer_std"), _stat(s, "decimal_std")),
    "decimal_entropy": lambda s: _stat(s, "decimal_entropy"),
    "1-decimal_peak": lambda s: 1.0 - _stat(s, "decimal_peak"),
    "1-integer_peak": lambda s: 1.0 - _stat(s, "integer_peak"),
    "-log_integer_peak": lambda s: -np.log(np.clip(_stat(s, "integer_peak"), _EPS, 1.0)),
    "integer_std*entropy": lambda s: _stat(s, "integer_std") * (0.5 + _stat(s, "decimal_entropy")),
    "integer_std/peak": lambda s: _stat(s, "integer_std") / np.clip(_stat(s, "integer_peak"), _EPS, 1.0),
}


LOGLINEAR_FEATURES = ("ln integer_std", "ln decimal_std", "decimal_entropy", "ln integer_peak")


def loglinear_features(stats: Mapping[str, Any]) -> np.ndarray:
    """(..., K, 4) per-point features, in ``LOGLINEAR_FEATURES`` order, of the fitted log-linear formulas
    that the selection benchmark compares with the simple ones."""
    return np.stack([
        np.log(np.clip(_stat(stats, "integer_std"), _EPS, None)),
        np.log(np.clip(_stat(stats, "decimal_std"), _EPS, None)),
        _stat(stats, "decimal_entropy"),
        np.log(np.clip(_stat(stats, "integer_peak"), _EPS, 1.0)),
    ], axis=-1)


def _top_mean(u: np.ndarray, frac: float) -> np.ndarray:
    k = max(1, int(round(u.shape[-1] * frac)))
    return np.sort(u, axis=-1)[..., -k:].mean(-1)


# Face aggregates (..., K) -> (...): how the points' uncertainties combine into one number per face.
FACE_AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda u: u.mean(-1),
    "rms": lambda u: np.sqrt((u**2).mean(-1)),
    "median": lambda u: np.median(u, -1),
    "geomean": lambda u: np.exp(np.log(np.clip(u, _EPS, None)).mean(-1)),
    "top10": lambda u: _top_mean(u, 0.10),
    "top25": lambda u: _top_mean(u, 0.25),
    "max": lambda u: u.max(-1),
}


# ------------------------------------------------------------------------------------------ metrics
def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two equal-length samples (NaN when either is constant)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two samples of the same length >= 2, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def worst_in_most_uncertain(uncertainty: np.ndarray, error: np.ndarray, frac: float = 0.10) -> float:
    """Of the ``frac`` faces with the largest error, the fraction that are among the ``frac`` most uncertain
    (1 = perfect, ``frac`` = random)."""
    u, e = np.asarray(uncertainty, dtype=np.float64), np.asarray(error, dtype=np.float64)
    k = max(1, int(round(len(e) * frac)))
    worst = set(np.argsort(-e, kind="mergesort")[:k].tolist())
    doubtful = set(np.argsort(-u, kind="mergesort")[:k].tolist())
    return len(worst & doubtful) / k


# ---------------------------------------------------------------------------------- chosen formula
POINT_FORMULA = "rss_std"
FACE_AGGREGATE = "top25"
# Scores are calibrated probabilities that the prediction needs no correction: a logistic in log uncertainty,
# P(ok) = 1 / (1 + exp(-(c0 + c1 * ln u))), fitted on the training pool (see the module docstring).
FACE_OK_NME = 0.05  # a face is "ok" when its inter-ocular NME is at most this
POINT_OK_IOD = 0.05  # a point is "ok" when its error is at most this share of the inter-ocular distance
FACE_CALIBRATION = (77.37, -37.41)  # (c0, c1) of the face/task score
POINT_CALIBRATION = (22.04, -11.07)  # (c0, c1) of the per-point (region) score


def point_uncertainty(stats: Mapping[str, Any]) -> np.ndarray:
    """Per-point uncertainty (..., K) from decoder statistics (each (..., K)); larger = less sure."""
    return POINT_CANDIDATES[POINT_FORMULA](stats)


def face_uncertainty(stats_or_points: Mapping[str, Any] | np.ndarray) -> np.ndarray | float:
    """Per-face uncertainty from decoder statistics or from per-point uncertainties (..., K) -> (...)."""
    u = point_uncertainty(stats_or_points) if isinstance(stats_or_points, Mapping) else np.asarray(
        stats_or_points, dtype=np.float64)
    out = FACE_AGGREGATES[FACE_AGGREGATE](u)
    return float(out) if np.ndim(out) == 0 else out


def task_uncertainty(face_uncertainties: Iterable[float]) -> float:
    """A task's uncertainty: its most uncertain face; +inf when it has no face (a human must look)."""
    vals = [float(v) for v in face_uncertainties]
    if not vals:
        return math.inf
    vals = [v if math.isfinite(v) else math.inf for v in vals]
    return max(vals)


_TIE_EPS = 1e-9  # weight of a strictly decreasing term: scores stay distinct where the logistic saturates


def _calibrated(u: np.ndarray, c0: float, c1: float) -> np.ndarray:
    """``(1 - 2 eps) sigmoid(c0 + c1 ln u) + eps / (1 + u)``: the calibrated probability, plus a term of
    weight 1e-9 that keeps the map strictly decreasing (hence invertible, and Label Studio's order exact)
    where the steep logistic rounds to 1 in floating point. In [0, 1]: 1 - 1e-9 at u = 0, 0 for +inf/NaN."""
    u = np.asarray(u, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = c0 + c1 * np.log(np.clip(u, 0.0, None))
        sig = np.where(u <= 0, 1.0, 1.0 / (1.0 + np.exp(-z)))
        s = (1.0 - 2.0 * _TIE_EPS) * sig + _TIE_EPS / (1.0 + np.clip(u, 0.0, None))
    return np.where(np.isfinite(u), s, 0.0)


def point_scores(point_unc: np.ndarray) -> np.ndarray:
    """Label Studio per-region scores [0, 1] (higher = more confident): the calibrated probability that the
    point is within ``POINT_OK_IOD`` of the inter-ocular distance of the truth; 0 for +inf/NaN."""
    return _calibrated(point_unc, *POINT_CALIBRATION)


def face_score(face_unc: float) -> float:
    """Score [0, 1] of a face's or task's uncertainty (higher = more confident): the calibrated probability
    that its NME is at most ``FACE_OK_NME``; 0 for +inf/NaN. Strictly decreasing in the uncertainty."""
    u = float(face_unc)
    if not math.isfinite(u):
        return 0.0
    u = max(u, 0.0)
    c0, c1 = FACE_CALIBRATION
    if u == 0:
        sig = 1.0
    else:
        z = c0 + c1 * math.log(u)
        sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return (1.0 - 2.0 * _TIE_EPS) * sig + _TIE_EPS / (1.0 + u)


def score_to_uncertainty(score: float) -> float:
    """Inverse of :func:`face_score` (by bisection; relative error below 1e-4 where the logistic saturates,
    far smaller elsewhere): +inf for a score of 0 or less, 0 for a score at or above ``face_score(0)``."""
    s = float(score)
    if not s > 0:
        return math.inf
    if s >= face_score(0.0):
        return 0.0
    lo, hi = -40.0, 40.0  # ln u
    if s >= face_score(math.exp(lo)):
        return 0.0
    if s <= face_score(math.exp(hi)):
        return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if face_score(math.exp(mid)) > s:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return math.exp((lo + hi) / 2)


def _face_point_uncertainty(face: Any) -> np.ndarray:
    stats = getattr(face, "stats", None) if not isinstance(face, Mapping) else face.get("stats")
    if not stats:
        raise ValueError("the face has no decoder statistics (FacePrediction.stats)")
    return point_uncertainty(stats)


def score_face(face: Any) -> Any:
    """Set a ``model.predictor.FacePrediction``'s ``point_uncertainty``, ``point_scores``, ``uncertainty`` and
    ``score`` from its decoder ``stats`` with the chosen formula (in place); returns the face."""
    pu = _face_point_uncertainty(face)
    face.point_uncertainty = pu
    face.point_scores = point_scores(pu)
    face.uncertainty = float(face_uncertainty(pu))
    face.score = face_score(face.uncertainty)
    return face


def score_faces(faces: Iterable[Any]) -> list[Any]:
    """:func:`score_face` on each face; returns them as a list."""
    return [score_face(f) for f in faces]


def task_score(faces: Sequence[Any]) -> float:
    """The Label Studio prediction ``score`` of a task's faces (0-1, higher = more confident): the score of
    its most uncertain face, 0 when it has no face. Label Studio's ascending "prediction score" ordering and
    its uncertainty sampling therefore show the most doubtful tasks first."""
    return face_score(task_uncertainty(float(face_uncertainty(_face_point_uncertainty(f))) for f in faces))


def prediction_scores(faces: Sequence[Any]) -> dict[str, Any]:
    """Everything the backend needs for one task: ``score`` (the prediction's), ``uncertainty`` (the
    task's, +inf without a face), and per face ``point_scores`` (K,) for the regions' ``score``."""
    per_face = [_face_point_uncertainty(f) for f in faces]
    u = task_uncertainty(float(face_uncertainty(p)) for p in per_face)
    return {"score": face_score(u), "uncertainty": u, "point_scores": [point_scores(p) for p in per_face],
            "face_uncertainty": [float(face_uncertainty(p)) for p in per_face]}


def per_image_rows(predictions: Sequence[Any], gts: Sequence[Any], scheme: str | int = "300w_68",
                   images: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"image", "nme", "uncertainty"}`` for ``hih-assist evaluate --per-image FILE.csv``.

    ``predictions[i]``: a ``FacePrediction`` (``.points``, ``.stats``), a dict with ``points`` and ``stats``
    (and optionally ``image``), or None when no face was found (nme NaN, uncertainty +inf). ``gts[i]``: a
    ``FaceRecord`` (``.points``, ``.image_path``) or a (K, 2) array. ``images`` names the rows (default: the
    record's path or the prediction's ``image``, else the index). NME is inter-ocular, a fraction."""
    from model.metrics import nme

    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions for {len(gts)} ground truths")
    rows = []
    for i, (pred, gt) in enumerate(zip(predictions, gts, strict=True)):
        gt_pts = np.asarray(getattr(gt, "points", gt), dtype=np.float64)
        if images is not None:
            name = str(images[i])
        elif getattr(gt, "image_path", None) is not None:
            name = str(gt.image_path)
        elif isinstance(pred, Mapping) and pred.get("image") is not None:
            name = str(pred["image"])
        else:
            name = str(i)
        if pred is None:
            rows.append({"image": name, "nme": float("nan"), "uncertainty": math.inf})
            continue
        pts = pred["points"] if isinstance(pred, Mapping) else pred.points
        e = float(nme(np.asarray(pts, dtype=np.float64), gt_pts, scheme))
        u = float(face_uncertainty(_face_point_uncertainty(pred)))
        rows.append({"image": name, "nme": e, "uncertainty": u})
    return rows
