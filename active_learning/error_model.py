"""A learned predictor of a face's landmark error, from the network's own decoder statistics.

The face's uncertainty is its *predicted inter-ocular NME* (a fraction: 0.05 = 5 %). Two kinds of model:

- ``ErrorModel`` ("face"): log-linear in face features, ``ln NME_hat = bias + sum_i w_i (x_i - mean_i) /
  scale_i``, the features aggregating the points (e.g. the mean spread of the least sure quarter);
- ``PointErrorModel`` ("point"): log-linear per point, ``ln e_k = b_k + sum_i w_i (x_ki - mean_i) / scale_i``,
  with ``e_k`` the point's error as a fraction of the inter-ocular distance, one intercept ``b_k`` per landmark
  (a jaw point is less sure than an eye corner at the same spread) and shared slopes; ``e_k`` is lognormal
  with the fit's residual sd ``s``, so its expected value is ``exp(ln e_k + s^2 / 2)`` and the predicted NME
  is the mean of those over the points: NME is the mean point error over the inter-ocular distance.

Features are computed from the decoder statistics of ``model.codec.decode`` (each (..., K) per point, as in
``model.predictor.FacePrediction.stats``) and the predicted points in the network's input crop:

- spreads (``integer_std``, ``decimal_std``, their root-sum-square ``rss_std``) in input pixels of the crop;
- ``integer_peak`` (0-1) and ``decimal_entropy`` (0-1);
- ``crop_points`` (..., K, 2): the points in the input crop as a fraction of its side (pixel-centre crop
  coordinates / input size, so 0.5 is the crop's centre line), from which ``ln iod`` is the log inter-ocular
  distance (outer eye corners of the scheme) as a fraction of the crop side. NME divides a pixel error by the
  inter-ocular distance, so a face whose eyes are close together in its crop (a turned head) has a larger
  NME for the same pixel spread: this feature carries that.

Fitted by ridge regression of ln error on features of 300-W *training* faces under the training augmentation
(``python benchmarks/bench_uncertainty.py fit``, which also picks the kind and the features on held-out
folds): the network is surer of faces it was trained on, but the augmentation (rotation, scale, occlusion,
blur, colour) makes their errors as large as on new faces (mean NME 4.7 % against 4.0 % on the validation
faces), and the fit only has to learn how the statistics map to the error. The fitted model is data
(``error_model.json`` beside this module), not code. Pure functions, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = Path(__file__).with_name("error_model.json")

STAT_FIELDS = ("integer_peak", "integer_std", "decimal_entropy", "decimal_std", "decimal_peak")
_EPS = 1e-6
TOP_FRACTION = 0.25  # "top25": the mean of the least sure quarter of the points


def stat(stats: Mapping[str, Any], name: str) -> np.ndarray:
    """``stats[name]`` as float64, or a KeyError that names what the statistics do have."""
    if name not in stats:
        raise KeyError(f"decoder statistics lack {name!r} (have {', '.join(sorted(stats))})")
    return np.asarray(stats[name], dtype=np.float64)


def top_mean(u: np.ndarray, frac: float = TOP_FRACTION) -> np.ndarray:
    """Mean of the largest ``frac`` of the last axis (at least one value): (..., K) -> (...)."""
    u = np.asarray(u, dtype=np.float64)
    k = max(1, int(round(u.shape[-1] * frac)))
    return np.sort(u, axis=-1)[..., -k:].mean(-1)


def rss_std(stats: Mapping[str, Any]) -> np.ndarray:
    """Per-point spread of the whole position distribution, sqrt(integer_std^2 + decimal_std^2), crop px."""
    return np.hypot(stat(stats, "integer_std"), stat(stats, "decimal_std"))


def interocular_fraction(stats: Mapping[str, Any]) -> np.ndarray:
    """(...) inter-ocular distance of ``stats["crop_points"]`` (..., K, 2) as a fraction of the crop side;
    the eye corners are the scheme's NME normaliser (points 36 and 45, 0-based, for 300-W's 68)."""
    from model.schemes import get_scheme

    pts = stat(stats, "crop_points")
    if pts.ndim < 2 or pts.shape[-1] != 2:
        raise ValueError(f"crop_points must be (..., K, 2), got {pts.shape}")
    a, b = get_scheme(int(pts.shape[-2])).interocular
    return np.linalg.norm(pts[..., a, :] - pts[..., b, :], axis=-1)


def _ln(x: np.ndarray) -> np.ndarray:
    return np.log(np.clip(x, _EPS, None))


# Face features, each stats -> (...). Names say the statistic, the aggregate over points and the transform.
FACE_FEATURES: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "ln top25(rss_std)": lambda s: _ln(top_mean(rss_std(s))),
    "ln mean(integer_std)": lambda s: _ln(stat(s, "integer_std").mean(-1)),
    "ln top25(integer_std)": lambda s: _ln(top_mean(stat(s, "integer_std"))),
    "ln mean(decimal_std)": lambda s: _ln(stat(s, "decimal_std").mean(-1)),
    "ln top25(decimal_std)": lambda s: _ln(top_mean(stat(s, "decimal_std"))),
    "mean(ln integer_peak)": lambda s: _ln(stat(s, "integer_peak")).mean(-1),
    "top25(-ln integer_peak)": lambda s: top_mean(-_ln(stat(s, "integer_peak"))),
    "mean(decimal_entropy)": lambda s: stat(s, "decimal_entropy").mean(-1),
    "top25(decimal_entropy)": lambda s: top_mean(stat(s, "decimal_entropy")),
    "ln iod": lambda s: _ln(interocular_fraction(s)),
}

# The feature sets the selection compares (``benchmarks/bench_uncertainty.py fit``), smallest first.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "spread + iod": ("ln top25(rss_std)", "ln iod"),
    "spreads + peak + iod": ("ln mean(integer_std)", "ln top25(integer_std)", "ln mean(decimal_std)",
                             "ln top25(decimal_std)", "mean(ln integer_peak)", "top25(-ln integer_peak)",
                             "ln iod"),
    "all statistics + iod": ("ln mean(integer_std)", "ln top25(integer_std)", "ln mean(decimal_std)",
                             "ln top25(decimal_std)", "mean(ln integer_peak)", "top25(-ln integer_peak)",
                             "mean(decimal_entropy)", "top25(decimal_entropy)", "ln iod"),
}


def feature_matrix(stats: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """(..., F) features ``names`` (keys of ``FACE_FEATURES``) of faces whose stats are (..., K)."""
    unknown = [n for n in names if n not in FACE_FEATURES]
    if unknown:
        raise KeyError(f"unknown face features {unknown}; known: {', '.join(FACE_FEATURES)}")
    return np.stack([FACE_FEATURES[n](stats) for n in names], axis=-1)


# Point features, each stats -> (..., K): one value per point (``ln iod`` is the face's, repeated).
POINT_FEATURES: dict[str, Callable[[Mapping[str, Any]], np.ndarray]] = {
    "ln rss_std": lambda s: _ln(rss_std(s)),
    "ln integer_std": lambda s: _ln(stat(s, "integer_std")),
    "ln decimal_std": lambda s: _ln(stat(s, "decimal_std")),
    "ln integer_peak": lambda s: _ln(stat(s, "integer_peak")),
    "decimal_entropy": lambda s: stat(s, "decimal_entropy"),
    "ln iod": lambda s: np.repeat(_ln(interocular_fraction(s))[..., None], stat(s, "crop_points").shape[-2], -1),
}

# The point feature sets the selection compares, smallest first.
POINT_FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "point spread + iod": ("ln rss_std", "ln iod"),
    "point statistics + iod": ("ln integer_std", "ln decimal_std", "ln integer_peak", "decimal_entropy", "ln iod"),
}


def point_feature_matrix(stats: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """(..., K, F) point features ``names`` (keys of ``POINT_FEATURES``) of faces whose stats are (..., K)."""
    unknown = [n for n in names if n not in POINT_FEATURES]
    if unknown:
        raise KeyError(f"unknown point features {unknown}; known: {', '.join(POINT_FEATURES)}")
    return np.stack([POINT_FEATURES[n](stats) for n in names], axis=-1)


def _check_coefficients(n: int, mean: Sequence[float], scale: Sequence[float], weights: Sequence[float],
                        others: Sequence[float]) -> None:
    if not (len(mean) == len(scale) == len(weights) == n) or n == 0:
        raise ValueError(f"error model: {n} features but {len(mean)} means, {len(scale)} scales "
                         f"and {len(weights)} weights")
    if not all(np.isfinite(v) for v in (*mean, *scale, *weights, *others)):
        raise ValueError("error model: non-finite coefficient")
    if min(scale) <= 0:
        raise ValueError("error model: feature scales must be positive")


@dataclass(frozen=True)
class _LinearFit:
    """What both kinds share: named features, their standardisation and the weights on the standardised values."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    kind = ""

    def _linear(self, x: np.ndarray) -> np.ndarray:
        """(...) ``weights . (x - mean) / scale`` of (..., F) features."""
        return ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}}


@dataclass(frozen=True)
class ErrorModel(_LinearFit):
    """A fitted log-linear NME predictor: standardise each feature, then ``bias + weights . z`` = ln NME."""

    bias: float
    ridge: float = 0.0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    kind = "face"

    def __post_init__(self) -> None:
        _check_coefficients(len(self.features), self.mean, self.scale, self.weights, (self.bias,))

    @property
    def n_parameters(self) -> int:
        """Fitted coefficients: one weight a feature and the bias."""
        return len(self.features) + 1

    def log_nme(self, features: np.ndarray) -> np.ndarray:
        """ln of the predicted NME from (..., F) features in ``self.features`` order."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape[-1] != len(self.features):
            raise ValueError(f"expected {len(self.features)} features, got {x.shape[-1]}")
        return self._linear(x) + self.bias

    def predict_nme(self, stats: Mapping[str, Any]) -> np.ndarray:
        """Predicted inter-ocular NME (fraction) of faces whose stats are (..., K): (...)."""
        return np.exp(self.log_nme(feature_matrix(stats, self.features)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorModel:
        try:
            return cls(features=tuple(str(f) for f in d["features"]), mean=tuple(float(v) for v in d["mean"]),
                       scale=tuple(float(v) for v in d["scale"]), weights=tuple(float(v) for v in d["weights"]),
                       bias=float(d["bias"]), ridge=float(d.get("ridge", 0.0)), info=dict(d.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed error model: {exc}") from exc


def fit_ridge(x: np.ndarray, log_nme: np.ndarray, features: Sequence[str], ridge: float = 1.0,
              info: Mapping[str, Any] | None = None) -> ErrorModel:
    """Ridge regression of ``log_nme`` (N,) on standardised features ``x`` (N, F); the bias is not shrunk.
    ``ridge`` is the penalty on the standardised weights (comparable across feature sets)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(log_nme, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(features):
        raise ValueError(f"need x (N, {len(features)}) and y (N,), got {x.shape} and {y.shape}")
    if len(y) < x.shape[1] + 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("need more faces than features, all finite")
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    A = np.c_[z, np.ones(len(z))]
    penalty = ridge * len(y) * np.eye(A.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(A.T @ A + penalty, A.T @ y)
    return ErrorModel(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(w[:-1].tolist()),
                      float(w[-1]), float(ridge), dict(info or {}))


@dataclass(frozen=True)
class PointErrorModel(_LinearFit):
    """A fitted per-point log-linear error model: ``ln e_k = landmark_bias[k] + weights . z_k``, with ``e_k`` a
    point's error over the inter-ocular distance and ``z_k`` its standardised point features; lognormal
    residuals of sd ``residual_sd``. The predicted NME is the mean over points of ``E[e_k]``."""

    landmark_bias: tuple[float, ...]
    residual_sd: float
    ridge: float = 0.0
    info: dict[str, Any] = field(default_factory=dict, compare=False)
    kind = "point"

    def __post_init__(self) -> None:
        _check_coefficients(len(self.features), self.mean, self.scale, self.weights,
                            (*self.landmark_bias, self.residual_sd))
        if not self.landmark_bias or self.residual_sd < 0:
            raise ValueError("error model: need landmark biases and a non-negative residual sd")

    @property
    def n_parameters(self) -> int:
        """Fitted coefficients: one weight a feature and one bias a landmark."""
        return len(self.features) + len(self.landmark_bias)

    def log_point_errors(self, features: np.ndarray) -> np.ndarray:
        """(..., K) median ln point error (fraction of the inter-ocular distance) from (..., K, F) features."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape[-1] != len(self.features) or x.shape[-2] != len(self.landmark_bias):
            raise ValueError(f"expected (..., {len(self.landmark_bias)}, {len(self.features)}) point features, "
                             f"got {x.shape}")
        return self._linear(x) + np.asarray(self.landmark_bias)

    def predict_point_errors(self, stats: Mapping[str, Any]) -> np.ndarray:
        """(..., K) expected point errors (fraction of the inter-ocular distance) of faces with (..., K) stats."""
        ln_e = self.log_point_errors(point_feature_matrix(stats, self.features))
        return np.exp(ln_e + 0.5 * self.residual_sd**2)

    def predict_nme(self, stats: Mapping[str, Any]) -> np.ndarray:
        """Predicted inter-ocular NME (fraction) of faces whose stats are (..., K): (...)."""
        return self.predict_point_errors(stats).mean(-1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PointErrorModel:
        try:
            return cls(features=tuple(str(f) for f in d["features"]), mean=tuple(float(v) for v in d["mean"]),
                       scale=tuple(float(v) for v in d["scale"]), weights=tuple(float(v) for v in d["weights"]),
                       landmark_bias=tuple(float(v) for v in d["landmark_bias"]),
                       residual_sd=float(d["residual_sd"]), ridge=float(d.get("ridge", 0.0)),
                       info=dict(d.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed error model: {exc}") from exc


AnyErrorModel = ErrorModel | PointErrorModel
MODEL_KINDS: dict[str, type] = {"face": ErrorModel, "point": PointErrorModel}


def model_from_dict(d: Mapping[str, Any]) -> AnyErrorModel:
    """The model a ``to_dict`` wrote, by its ``kind`` ("face" when absent: files written before there were two)."""
    kind = d.get("kind", "face") if isinstance(d, Mapping) else None
    if kind not in MODEL_KINDS:
        raise ValueError(f"malformed error model: unknown kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind].from_dict(d)


def fit_point_ridge(x: np.ndarray, log_errors: np.ndarray, features: Sequence[str], ridge: float = 1.0,
                    info: Mapping[str, Any] | None = None) -> PointErrorModel:
    """Ridge regression of ``log_errors`` (N, K) on standardised point features ``x`` (N, K, F), with one
    unshrunk intercept a landmark; ``ridge`` is the penalty on the standardised shared weights."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(log_errors, dtype=np.float64)
    if x.ndim != 3 or x.shape[:2] != y.shape or x.shape[2] != len(features):
        raise ValueError(f"need x (N, K, {len(features)}) and y (N, K), got {x.shape} and {y.shape}")
    n, k, f = x.shape
    if n < f + 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("need more faces than features, all finite")
    flat = x.reshape(-1, f)
    mean = flat.mean(0)
    scale = flat.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    # normal equations of [z | one-hot landmark], blockwise: the one-hot block is diagonal (n per landmark)
    zz = np.einsum("nkf,nkg->fg", z, z) + ridge * n * k * np.eye(f)
    zo = z.sum(0).T  # (F, K)
    a = np.block([[zz, zo], [zo.T, n * np.eye(k)]])
    b = np.r_[np.einsum("nkf,nk->f", z, y), y.sum(0)]
    w = np.linalg.solve(a, b)
    weights, biases = w[:f], w[f:]
    residual = y - (z @ weights + biases)
    return PointErrorModel(tuple(features), tuple(mean.tolist()), tuple(scale.tolist()), tuple(weights.tolist()),
                           tuple(biases.tolist()), float(residual.std()), float(ridge), dict(info or {}))


def save(model: AnyErrorModel, path: Path | str = MODEL_FILE, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (and ``extra`` top-level keys, e.g. the score calibration) as JSON, atomically."""
    path = Path(path)
    doc = {"error_model": model.to_dict(), **(extra or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def read_document(path: Path | str = MODEL_FILE) -> dict[str, Any]:
    """The whole JSON document (the model and what was saved beside it)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no error model at {path}: run `python benchmarks/bench_uncertainty.py fit`"
                                ) from exc
    if not isinstance(doc, dict) or "error_model" not in doc:
        raise ValueError(f"{path} holds no error_model")
    return doc


@lru_cache(maxsize=4)
def load(path: Path | str = MODEL_FILE) -> AnyErrorModel:
    """The error model saved at ``path`` (default: the shipped one), cached."""
    return model_from_dict(read_document_cached(path)["error_model"])


@lru_cache(maxsize=4)
def read_document_cached(path: Path | str = MODEL_FILE) -> dict[str, Any]:
    """:func:`read_document`, cached (the shipped file does not change while a process runs)."""
    return read_document(path)
