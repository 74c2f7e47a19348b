"""Uncertainty of HIH landmark predictions: per point, per face, per task, and the Label Studio scores.

Inputs are the decoder statistics of ``model.codec.decode`` as ``FacePrediction.stats`` holds them (each (K,)
per face or (N, K) for a batch): ``integer_std`` (spread of the softmax of the integer heatmap, input pixels
of the model's face crop), ``integer_peak`` (its largest probability), ``decimal_std`` (spread of the 8x8
decimal distribution, crop pixels), ``decimal_entropy`` (0-1), ``decimal_peak``; and ``crop_points`` ((K, 2)
or (N, K, 2): the points in the input crop as a fraction of its side).

The formula
-----------
- point:  ``u_k = sqrt(integer_std_k^2 + decimal_std_k^2)`` (crop px, ``POINT_FORMULA``): the spread of the
  model's whole position distribution, integer pixel and sub-pixel cell together (as if independent);
- face:   the *predicted inter-ocular NME* (a fraction; 0.05 = 5 %) of ``active_learning.error_model``: a
  log-linear model of the least sure quarter of the points' spread (``top25(u)``) and of the inter-ocular
  distance in the crop, fitted on augmented training faces. With the shipped fit it is
  ``NME_hat ~ top25(u)^2.1 / iod^0.5``: the spread grows with the error, and NME divides a pixel error by the
  inter-ocular distance, which shrinks in the crop as the head turns;
- task:   the largest face uncertainty (+inf without a face: a human must look);
- scores: calibrated probabilities, higher = more confident: region ``score`` = P(point error <= 5 % of the
  inter-ocular distance), logistic in ``ln u_k`` (``POINT_CALIBRATION``, fitted on the 100 training-holdout
  faces); prediction ``score`` = P(face NME <= 5 %) of the task's most uncertain face, logistic in
  ``ln NME_hat`` (``face_calibration`` in ``error_model.json``, fitted on the same holdout faces), 0 without
  a face. Label Studio's ascending "prediction score" order and its uncertainty sampling therefore show the
  most doubtful tasks first; ``score_to_uncertainty`` inverts the prediction score exactly.

Why (``python benchmarks/bench_uncertainty.py select`` and ``... fit``; benchmarks/results/)
----------------------------------------------------------------------------------------------
Chosen on TRAINING data only, never on the validation faces: the selection faces are the 100 300-W training
faces that the default model's run held out (``np.random.default_rng(0).permutation(2012)[:100]``) plus the
800 ytf/train frames (never trained on), in 5 folds (ytf grouped by person). Each fold is scored by the mean
of its two domains' Spearman correlations of face uncertainty with face NME (its 20 300-W faces, its 160 ytf
frames: pooled, ytf would outvote 300-W 8 to 1). Default model (weights/hih_cpu_300w); mean over folds (sd);
"pooled" is the fold Spearman over both domains together, "300-W" and "ytf" each domain whole:

    face uncertainty                                    params  by domain      pooled  300-W  ytf
    error model, face: spread + iod            <- chosen     3  0.755 (0.059)  0.709   0.821  0.721
    error model, face: spreads + peak + iod                  8  0.737 (0.050)  0.709   0.788  0.706
    error model, point: point spread + iod                  70  0.736 (0.076)  0.732   0.777  0.732
    error model, face: all statistics + iod                 10  0.731 (0.068)  0.713   0.779  0.711
    previous: top25(rss_std), crop px                        -  0.721 (0.034)  0.641   0.809  0.664
    baseline: -mean(integer_peak)                            -  0.537 (0.069)  0.462   0.665  0.437

The error models are fitted on the shipped network's own 300-W training faces under the training
augmentation (3 crops a face, mean NME 4.7 %), so the selection faces stay out of every fit; the rule keeps
the model with the fewest fitted parameters (then the strongest ridge) within one standard error (fold sd /
sqrt 5) of the best score. The point model (one intercept a landmark) ranks ytf better but 300-W worse.
The per-point formula is the one ``select`` picked before (among spreads, entropies and peaks, aggregated
several ways: the integer map's spread carries almost all the signal; the decimal spread adds its sub-pixel
part; entropy and peak values are much weaker; flip-test disagreement, a second pass, was weaker too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from active_learning import error_model

__all__ = [
    "STAT_FIELDS",
    "FACE_OK_NME",
    "POINT_OK_IOD",
    "loglinear_features",
    "POINT_CANDIDATES",
    "FACE_AGGREGATES",
    "point_uncertainty",
    "face_uncertainty",
    "face_calibration",
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

STAT_FIELDS = error_model.STAT_FIELDS
_stat = error_model.stat
_EPS = 1e-6


# --------------------------------------------------------------------------------------- candidates
# Per-point uncertainty candidates, each (..., K) stats -> (..., K), larger = less sure. Units: input pixels
# of the model's face crop where the statistic is a spread; unitless otherwise.
POINT_CANDIDATES: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "integer_std": lambda s: _stat(s, "integer_std"),
    "decimal_std": lambda s: _stat(s, "decimal_std"),
    "sum_std": lambda s: _stat(s, "integer_std") + _stat(s, "decimal_std"),
    "rss_std": error_model.rss_std,
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


# Face aggregates (..., K) -> (...): how the points' uncertainties combine into one number per face.
FACE_AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda u: u.mean(-1),
    "rms": lambda u: np.sqrt((u**2).mean(-1)),
    "median": lambda u: np.median(u, -1),
    "geomean": lambda u: np.exp(np.log(np.clip(u, _EPS, None)).mean(-1)),
    "top10": lambda u: error_model.top_mean(u, 0.10),
    "top25": lambda u: error_model.top_mean(u, 0.25),
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
# Scores are calibrated probabilities that the prediction needs no correction (see the module docstring).
FACE_OK_NME = 0.05  # a face is "ok" when its inter-ocular NME is at most this
POINT_OK_IOD = 0.05  # a point is "ok" when its error is at most this share of the inter-ocular distance
POINT_CALIBRATION = (22.04, -11.07)  # (c0, c1) of the per-point (region) score, logistic in ln u_k


def point_uncertainty(stats: Mapping[str, Any]) -> np.ndarray:
    """Per-point uncertainty (..., K) from decoder statistics (each (..., K)), crop px; larger = less sure."""
    return POINT_CANDIDATES[POINT_FORMULA](stats)


def face_uncertainty(stats: Mapping[str, Any]) -> np.ndarray | float:
    """Per-face uncertainty: the predicted inter-ocular NME (fraction) of faces whose stats are (..., K) (and
    ``crop_points`` (..., K, 2)); (...) -> a float for one face. Larger = less sure."""
    if not isinstance(stats, Mapping):
        raise TypeError("face_uncertainty needs the decoder statistics (a mapping), not point uncertainties")
    out = error_model.load().predict_nme(stats)
    return float(out) if np.ndim(out) == 0 else out


def face_calibration() -> tuple[float, float]:
    """(c0, c1) of the face score, P(NME <= FACE_OK_NME) = sigmoid(c0 + c1 ln NME_hat), from the shipped fit."""
    cal = error_model.read_document_cached()["face_calibration"]
    return float(cal["c0"]), float(cal["c1"])


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
    c0, c1 = face_calibration()
    if u == 0:
        sig = 1.0
    else:
        z = c0 + c1 * math.log(u)
        sig = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return (1.0 - 2.0 * _TIE_EPS) * sig + _TIE_EPS / (1.0 + u)


def score_to_uncertainty(score: float) -> float:
    """Inverse of :func:`face_score` (by bisection; relative error below 1e-4 where the logistic saturates,
    from a predicted NME of 0.1 % up, far smaller elsewhere): +inf for a score of 0 or less, 0 for a score at
    or above ``face_score(0)``."""
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


def _face_stats(face: Any) -> Mapping[str, Any]:
    stats = getattr(face, "stats", None) if not isinstance(face, Mapping) else face.get("stats")
    if not stats:
        raise ValueError("the face has no decoder statistics (FacePrediction.stats)")
    return stats


def score_face(face: Any) -> Any:
    """Set a ``model.predictor.FacePrediction``'s ``point_uncertainty`` (crop px), ``point_scores``,
    ``uncertainty`` (predicted NME) and ``score`` from its ``stats`` with the chosen formula (in place)."""
    stats = _face_stats(face)
    pu = point_uncertainty(stats)
    face.point_uncertainty = pu
    face.point_scores = point_scores(pu)
    face.uncertainty = float(face_uncertainty(stats))
    face.score = face_score(face.uncertainty)
    return face


def score_faces(faces: Iterable[Any]) -> list[Any]:
    """:func:`score_face` on each face; returns them as a list."""
    return [score_face(f) for f in faces]


def task_score(faces: Sequence[Any]) -> float:
    """The Label Studio prediction ``score`` of a task's faces (0-1, higher = more confident): the score of
    its most uncertain face, 0 when it has no face. Label Studio's ascending "prediction score" ordering and
    its uncertainty sampling therefore show the most doubtful tasks first."""
    return face_score(task_uncertainty(float(face_uncertainty(_face_stats(f))) for f in faces))


def prediction_scores(faces: Sequence[Any]) -> dict[str, Any]:
    """Everything the backend needs for one task: ``score`` (the prediction's), ``uncertainty`` (the
    task's predicted NME, +inf without a face), per face ``point_scores`` (K,) for the regions' ``score``
    and ``face_uncertainty`` (predicted NME)."""
    stats = [_face_stats(f) for f in faces]
    per_face = [float(face_uncertainty(s)) for s in stats]
    u = task_uncertainty(per_face)
    return {"score": face_score(u), "uncertainty": u,
            "point_scores": [point_scores(point_uncertainty(s)) for s in stats], "face_uncertainty": per_face}


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
        u = float(face_uncertainty(_face_stats(pred)))
        rows.append({"image": name, "nme": e, "uncertainty": u})
    return rows
