"""Uncertainty of HIH landmark predictions: per point, per face, per task, and the Label Studio scores.

PLACEHOLDER DOCSTRING: the chosen formula and the measurements are filled in below once measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "STAT_FIELDS",
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
POINT_FORMULA = "sum_std"
FACE_AGGREGATE = "mean"
POINT_SCALE_PX = 4.0  # point score = exp(-u / POINT_SCALE_PX)
FACE_SCALE_PX = 4.0  # face/task score = exp(-U / FACE_SCALE_PX)


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


def point_scores(point_unc: np.ndarray) -> np.ndarray:
    """Label Studio per-region scores (0-1], higher = more confident."""
    u = np.asarray(point_unc, dtype=np.float64)
    return np.where(np.isfinite(u), np.exp(-np.clip(u, 0.0, None) / POINT_SCALE_PX), 0.0)


def face_score(face_unc: float) -> float:
    """Score (0-1] of an uncertainty (face or task), higher = more confident; 0 for +inf/NaN."""
    u = float(face_unc)
    return math.exp(-max(u, 0.0) / FACE_SCALE_PX) if math.isfinite(u) else 0.0


def score_to_uncertainty(score: float) -> float:
    """Inverse of :func:`face_score` (+inf for a score of 0 or less)."""
    s = float(score)
    return -FACE_SCALE_PX * math.log(s) if s > 0 else math.inf
