"""Uncertainty scores: the pure functions, and monotonicity in a controlled blur / occlusion of real faces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from active_learning import uncertainty as U
from hih_settings import Settings

K = 68


def crop_points(iod: float = 0.45) -> np.ndarray:
    """(K, 2) points in a crop (fraction of its side) whose outer eye corners (36, 45) are ``iod`` apart."""
    pts = np.full((K, 2), 0.5)
    pts[36], pts[45] = [0.5 - iod / 2, 0.4], [0.5 + iod / 2, 0.4]
    return pts


def _stats(n: int = 1, integer_std: float = 2.0, decimal_std: float = 0.5, peak: float = 0.5,
           entropy: float = 0.5, iod: float = 0.45) -> dict[str, np.ndarray]:
    return {
        "integer_peak": np.full((n, K), peak),
        "integer_std": np.full((n, K), integer_std),
        "decimal_entropy": np.full((n, K), entropy),
        "decimal_std": np.full((n, K), decimal_std),
        "decimal_peak": np.full((n, K), 0.2),
        "crop_points": np.repeat(crop_points(iod)[None], n, axis=0),
    }


@dataclass
class FakeFace:
    points: np.ndarray
    stats: dict[str, np.ndarray]
    point_scores: np.ndarray = field(default_factory=lambda: np.zeros(K))
    point_uncertainty: np.ndarray = field(default_factory=lambda: np.zeros(K))
    score: float = 0.0
    uncertainty: float = 0.0


def _face(**kw) -> FakeFace:
    return FakeFace(np.zeros((K, 2)), {k: v[0] for k, v in _stats(**kw).items()})


# ------------------------------------------------------------------------------------ pure functions
def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 50).astype(float)
    b = a + rng.normal(0, 1, 50)
    assert U.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert U.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(U.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        U.spearman([1, 2], [1, 2, 3])


def test_worst_in_most_uncertain() -> None:
    e = np.arange(100.0)
    assert U.worst_in_most_uncertain(e, e) == 1.0
    assert U.worst_in_most_uncertain(-e, e) == 0.0
    u = e.copy()
    u[-5:] = -1  # half of the 10 worst are hidden
    assert U.worst_in_most_uncertain(u, e) == 0.5


def test_every_candidate_and_aggregate_has_the_right_shape() -> None:
    s = _stats(n=3)
    for name, f in U.POINT_CANDIDATES.items():
        assert f(s).shape == (3, K), name
    u = np.random.default_rng(1).random((3, K)) + 0.1
    for name, agg in U.FACE_AGGREGATES.items():
        out = agg(u)
        assert out.shape == (3,), name
        assert (out <= u.max(-1) + 1e-12).all() and (out >= u.min(-1) - 1e-12).all(), name


def test_point_and_face_uncertainty_grow_with_the_spread() -> None:
    low, high = _stats(integer_std=1.0, decimal_std=0.3), _stats(integer_std=4.0, decimal_std=0.6)
    assert (U.point_uncertainty(high) > U.point_uncertainty(low)).all()
    assert U.face_uncertainty(high)[0] > U.face_uncertainty(low)[0]
    # one face gives a float; point uncertainties alone are not enough for the face's predicted NME
    one = {k: v[0] for k, v in high.items()}
    assert isinstance(U.face_uncertainty(one), float)
    assert U.face_uncertainty(one) == pytest.approx(float(U.face_uncertainty(high)[0]))
    with pytest.raises(TypeError, match="decoder statistics"):
        U.face_uncertainty(U.point_uncertainty(high)[0])


def test_face_uncertainty_is_the_error_models_predicted_nme_by_hand() -> None:
    from active_learning import error_model as EM

    m = EM.load()
    s = _stats(integer_std=3.0, decimal_std=0.4, iod=0.5)
    u = math.hypot(3.0, 0.4)  # every point has the same spread, so the top quarter's mean is it too
    by_name = {"ln top25(rss_std)": math.log(u), "ln rss_std": math.log(u), "ln iod": math.log(0.5)}
    assert set(m.features) <= set(by_name), f"extend this hand computation to {m.features}"
    z = [(by_name[f] - mu) / sd for f, mu, sd in zip(m.features, m.mean, m.scale, strict=True)]
    linear = sum(w * v for w, v in zip(m.weights, z, strict=True))
    if m.kind == "point":  # the mean over points of each point's expected (lognormal) error
        expected = float(np.mean(np.exp(np.asarray(m.landmark_bias) + linear + m.residual_sd**2 / 2)))
    else:
        expected = math.exp(m.bias + linear)
    assert U.face_uncertainty(s)[0] == pytest.approx(expected, rel=1e-12)
    # the shipped model's reading: a wider spread, or eyes closer together in the crop, predict a larger NME
    assert U.face_uncertainty(_stats(integer_std=4.0))[0] > U.face_uncertainty(_stats(integer_std=3.0))[0]
    assert U.face_uncertainty(_stats(iod=0.3))[0] > U.face_uncertainty(_stats(iod=0.5))[0]


def test_scores_are_monotone_bounded_and_invertible() -> None:
    # strictly decreasing everywhere, also where the steep calibrated logistic rounds to 1 or nearly 0
    us = np.array([0.0, 1e-3, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.2, 0.5, 1, 64, 1e4])
    s = np.array([U.face_score(u) for u in us])
    assert s[0] == pytest.approx(1.0) and (np.diff(s) < 0).all() and (s > 0).all() and (s < 1).all()
    for u, sc in zip(us, s, strict=True):
        # exact where the logistic has slope; below 1 % predicted NME only the tie-break term is left
        assert U.score_to_uncertainty(sc) == pytest.approx(u, rel=1e-6 if u >= 0.01 else 1e-4, abs=1e-9)
    assert U.face_score(math.inf) == 0.0 and U.face_score(float("nan")) == 0.0
    assert U.score_to_uncertainty(0.0) == math.inf and U.score_to_uncertainty(1.0) == 0.0
    ps = U.point_scores(np.array([0.0, 1.0, 10.0, 20.0, np.inf, np.nan]))
    assert ps[0] == pytest.approx(1.0) and ps[0] > ps[1] > ps[2] > ps[3] > 0 and ps[4] == 0 and ps[5] == 0


def test_task_uncertainty_is_the_worst_face_and_no_face_is_most_doubtful() -> None:
    assert U.task_uncertainty([1.0, 3.0, 2.0]) == 3.0
    assert U.task_uncertainty([]) == math.inf
    assert U.task_uncertainty([1.0, float("nan")]) == math.inf
    sure, doubtful = _face(integer_std=1.0), _face(integer_std=6.0)
    assert U.task_score([]) == 0.0
    assert U.task_score([sure]) > U.task_score([sure, doubtful]) == pytest.approx(U.task_score([doubtful]))
    assert 0 < U.task_score([doubtful]) < U.task_score([sure]) <= 1


def test_score_face_fills_a_prediction_in_place() -> None:
    face = U.score_face(_face(integer_std=2.0))
    assert face.point_uncertainty.shape == (K,) and face.point_scores.shape == (K,)
    assert face.uncertainty == pytest.approx(float(U.face_uncertainty(face.stats)))
    assert face.score == pytest.approx(U.face_score(face.uncertainty))
    out = U.prediction_scores([face, _face(integer_std=5.0)])
    assert out["score"] == pytest.approx(U.face_score(max(out["face_uncertainty"])))
    assert len(out["point_scores"]) == 2 and out["point_scores"][0].shape == (K,)
    with pytest.raises(ValueError, match="statistics"):
        U.score_face(FakeFace(np.zeros((K, 2)), {}))


def test_per_image_rows() -> None:
    gt = np.zeros((K, 2))
    gt[:, 0] = np.linspace(0, 100, K)
    gt[36], gt[45] = [0.0, 0.0], [100.0, 0.0]
    good = FakeFace(gt + [1.0, 0.0], _face(integer_std=1.0).stats)
    bad = {"points": gt + [5.0, 0.0], "stats": _face(integer_std=5.0).stats, "image": "b.jpg"}
    rows = U.per_image_rows([good, bad, None], [gt, gt, gt])
    assert [r["image"] for r in rows] == ["0", "b.jpg", "2"]
    assert rows[0]["nme"] == pytest.approx(0.01) and rows[1]["nme"] == pytest.approx(0.05)
    assert rows[0]["uncertainty"] < rows[1]["uncertainty"]
    assert math.isnan(rows[2]["nme"]) and rows[2]["uncertainty"] == math.inf
    assert [r["image"] for r in U.per_image_rows([good], [gt], images=["x.png"])] == ["x.png"]
    with pytest.raises(ValueError):
        U.per_image_rows([good], [gt, gt])


# ------------------------------------------------------------------------- real faces, trained model
def _trained_weights() -> Path:
    weights = Settings.from_env().weights
    if not (weights / "model.safetensors").is_file():
        pytest.skip(f"needs the trained model at {weights} (HIH_WEIGHTS; made by `make train`): an untrained "
                    "network's uncertainty says nothing about blur or occlusion")
    return weights


@pytest.fixture(scope="module")
def trained(data_dir: Path):
    import torch

    from model.predictor import Predictor
    from model.readers import load_300w_folder

    torch.set_num_threads(1)
    predictor = Predictor.load(_trained_weights(), device="cpu", detector="auto")
    records = load_300w_folder([data_dir / "300w" / "test" / "lfpw"])[:6]
    return predictor, records


def _face_uncertainties(predictor, images, box) -> np.ndarray:
    _, dec = predictor.predict_crops(images, [box] * len(images))
    stats = {f: getattr(dec, f) for f in U.STAT_FIELDS}
    stats["crop_points"] = dec.points / predictor.model.config.input_size
    return np.asarray(U.face_uncertainty(stats))


def _levels_monotone(u: np.ndarray) -> None:
    """u (faces, levels): the mean over faces rises at every level, and every face ends above its start."""
    mean = u.mean(0)
    assert (np.diff(mean) > 0).all(), f"mean uncertainty per level not increasing: {np.round(mean, 3)}"
    assert (u[:, -1] > u[:, 0]).all(), f"a face got surer under the strongest change: {np.round(u, 3)}"


@pytest.mark.data
def test_uncertainty_rises_with_blur(trained) -> None:
    import cv2

    from model.image_io import load_image
    from model.transforms import landmark_box

    predictor, records = trained
    sigmas = [0.0, 2.0, 4.0, 8.0]  # in units of the face box size / 100
    rows = []
    for r in records:
        image = load_image(r.image_path)
        box = landmark_box(r.points)
        imgs = [image if s == 0 else cv2.GaussianBlur(image, (0, 0), s * box[2] / 100) for s in sigmas]
        rows.append(_face_uncertainties(predictor, imgs, box))
    _levels_monotone(np.array(rows))


@pytest.mark.data
def test_uncertainty_rises_with_occlusion(trained) -> None:
    from model.image_io import load_image
    from model.transforms import landmark_box

    predictor, records = trained
    fractions = [0.0, 0.3, 0.5, 0.7]  # side of a grey square on the face centre, as a share of the box
    rows = []
    for r in records:
        image = load_image(r.image_path)
        cx, cy, size = landmark_box(r.points)
        imgs = []
        for f in fractions:
            im = image.copy()
            h = f * size / 2
            if h > 0:
                im[max(int(cy - h), 0): int(cy + h), max(int(cx - h), 0): int(cx + h)] = 128
            imgs.append(im)
        rows.append(_face_uncertainties(predictor, imgs, (cx, cy, size)))
    _levels_monotone(np.array(rows))
