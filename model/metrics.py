"""Face alignment metrics: NME, failure rate, CED curve and its exact AUC, and a CED plot.

Coordinate convention: points are float arrays (..., K, 2), x to the right, y down, 0-based pixel-centre
coordinates (the centre of the top-left pixel is (0, 0)). NMEs are fractions (0.04 means 4 %).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .schemes import LandmarkScheme, get_scheme

__all__ = ["nme", "failure_rate", "auc", "ced_curve", "summarize", "plot_ced"]


def _normaliser(gt: np.ndarray, scheme: LandmarkScheme, norm: str | tuple[int, int]) -> np.ndarray:
    """Per-face normalising distance (N,) from ground truth (N, K, 2)."""
    if isinstance(norm, str):
        if norm == "interocular":
            pair = scheme.interocular
        elif norm == "interpupil":
            if scheme.interpupil is None:
                raise ValueError(f"scheme {scheme.name} has no pupil points: use norm='interocular'")
            pair = scheme.interpupil
        elif norm == "box":
            span = gt.max(axis=1) - gt.min(axis=1)
            return np.sqrt(span[:, 0] * span[:, 1])
        else:
            raise ValueError(f"unknown norm {norm!r}: use 'interocular', 'interpupil', 'box' or (i, j)")
    else:
        pair = tuple(int(i) for i in norm)
        if len(pair) != 2 or not all(0 <= i < scheme.num_points for i in pair):
            raise ValueError(f"norm {norm!r} must be two point indices in [0, {scheme.num_points})")
    return np.linalg.norm(gt[:, pair[0]] - gt[:, pair[1]], axis=-1)


def _checked_normaliser(gt: np.ndarray, scheme: LandmarkScheme, norm: str | tuple[int, int]) -> np.ndarray:
    """:func:`_normaliser`, or a ValueError when it is zero or not finite for some face."""
    d = _normaliser(gt, scheme, norm)
    if not (np.isfinite(d).all() and (d > 0).all()):
        raise ValueError("the normalising distance is zero or not finite for some face")
    return d


def nme(
    pred: np.ndarray,
    gt: np.ndarray,
    scheme: LandmarkScheme | str | int,
    norm: str | tuple[int, int] = "interocular",
    visible: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised mean error per face, as a fraction (0.04 = 4 %).

    ``pred`` and ``gt`` are (N, K, 2) or (K, 2) points in the same coordinates (0-based pixel-centre, x right,
    y down; any common frame works since the metric is translation-invariant). For each face: the mean over
    points of the Euclidean error, divided by the ground-truth distance between the normaliser points:
    ``"interocular"`` (outer eye corners), ``"interpupil"`` (ValueError if the scheme has no pupils),
    ``"box"`` (sqrt of the area of the ground-truth points' bounding box) or a pair of point indices.
    ``visible`` ((N, K) or (K,) bool) restricts the mean to visible points. Returns (N,), or a 0-d array for
    a single (K, 2) face.
    """
    scheme = get_scheme(scheme)
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ in shape")
    single = g.ndim == 2
    if single:
        p, g = p[None], g[None]
    if g.ndim != 3 or g.shape[-1] != 2 or g.shape[1] != scheme.num_points:
        raise ValueError(
            f"points must be (N, {scheme.num_points}, 2) or ({scheme.num_points}, 2), got {gt.shape}"
        )
    err = np.linalg.norm(p - g, axis=-1)  # (N, K)
    if visible is None:
        mean_err = err.mean(axis=1)
    else:
        vis = np.broadcast_to(np.asarray(visible, dtype=bool), err.shape)
        count = vis.sum(axis=1)
        if (count == 0).any():
            raise ValueError("a face has no visible points")
        mean_err = np.where(vis, err, 0.0).sum(axis=1) / count
    out = mean_err / _checked_normaliser(g, scheme, norm)
    return out[0] if single else out


def point_errors(pred: np.ndarray, gt: np.ndarray, scheme: LandmarkScheme | str | int) -> np.ndarray:
    """(N, K) Euclidean error of each point over its face's ground-truth inter-ocular distance (fraction).

    ``pred`` and ``gt`` are (N, K, 2) points in the same pixels (0-based pixel-centre); the mean over K is the
    inter-ocular ``nme``.
    """
    scheme = get_scheme(scheme)
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or g.ndim != 3 or g.shape[1:] != (scheme.num_points, 2):
        raise ValueError(f"need pred and gt (N, {scheme.num_points}, 2), got {p.shape} and {g.shape}")
    return np.linalg.norm(p - g, axis=-1) / _checked_normaliser(g, scheme, "interocular")[:, None]


def _check_nmes(nmes: np.ndarray) -> np.ndarray:
    e = np.asarray(nmes, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no NME values")
    if not np.isfinite(e).all() or (e < 0).any():
        raise ValueError("NME values must be finite and non-negative")
    return e


def failure_rate(nmes: np.ndarray, threshold: float = 0.10) -> float:
    """Fraction of faces whose NME is above ``threshold`` (a fraction, e.g. 0.10 for FR@10 %)."""
    return float(np.mean(_check_nmes(nmes) > threshold))


def auc(nmes: np.ndarray, threshold: float = 0.10) -> float:
    """Area under the CED curve from 0 to ``threshold``, divided by ``threshold`` (so in [0, 1]).

    Exact: the CED is a step function (fraction of faces with NME <= e), and each face contributes
    ``max(0, threshold - nme)`` to the integral, so AUC = mean(max(0, threshold - nme)) / threshold.
    """
    if threshold <= 0:
        raise ValueError("threshold must be positive")
    e = _check_nmes(nmes)
    return float(np.mean(np.clip(threshold - e, 0.0, None)) / threshold)


def ced_curve(nmes: np.ndarray, threshold: float = 0.10, num: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: ``x`` = ``num`` NME values from 0 to ``threshold``, ``y`` = fraction
    of faces with NME <= x."""
    e = np.sort(_check_nmes(nmes))
    x = np.linspace(0.0, threshold, num)
    y = np.searchsorted(e, x, side="right") / e.size
    return x, y


def summarize(nmes: np.ndarray, threshold: float = 0.10) -> dict[str, float]:
    """``{"n", "nme", "fr", "auc"}`` for a set of per-face NMEs (fractions)."""
    e = _check_nmes(nmes)
    return {
        "n": float(e.size),
        "nme": float(e.mean()),
        "fr": failure_rate(e, threshold),
        "auc": auc(e, threshold),
    }


def plot_ced(
    curves: Mapping[str, np.ndarray], path: str | Path, threshold: float = 0.10, title: str = ""
) -> None:
    """Save a PNG of the CED curves; ``curves`` maps a label to per-face NMEs (fractions).

    The legend gives each curve's mean NME, failure rate and AUC at ``threshold``. Uses the Agg canvas
    directly, so no display and no pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no curves to plot")
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pct = 100.0
    for label, values in curves.items():
        s = summarize(values, threshold)
        x, y = ced_curve(values, threshold)
        ax.plot(
            x * pct,
            y,
            drawstyle="steps-post",
            label=f"{label}: NME {s['nme'] * pct:.2f}%, FR {s['fr'] * pct:.2f}%, AUC {s['auc']:.3f}",
        )
    ax.set_xlim(0, threshold * pct)
    ax.set_ylim(0, 1)
    ax.set_xlabel("NME (%)")
    ax.set_ylabel("fraction of faces")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
