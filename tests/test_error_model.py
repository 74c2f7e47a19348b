"""The learned face-error models (active_learning.error_model, face and point kinds): hand-computed features and
predictions, the ridge fits, the JSON file, the shipped fit's reading, and fits on real augmented training
faces that rank unseen faces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from active_learning import error_model as EM

K = 68


def _stats(n: int, spread: np.ndarray | float, iod: np.ndarray | float) -> dict[str, np.ndarray]:
    spread = np.broadcast_to(np.asarray(spread, dtype=np.float64), (n,))
    iod = np.broadcast_to(np.asarray(iod, dtype=np.float64), (n,))
    pts = np.full((n, K, 2), 0.5)
    pts[:, 36, 0], pts[:, 45, 0] = 0.5 - iod / 2, 0.5 + iod / 2
    return {"integer_std": np.repeat(spread[:, None], K, 1), "decimal_std": np.full((n, K), 0.0),
            "integer_peak": np.full((n, K), 0.3), "decimal_entropy": np.full((n, K), 0.6),
            "decimal_peak": np.full((n, K), 0.1), "crop_points": pts}


def test_hand_computed_features() -> None:
    assert EM.top_mean(np.array([4.0, 1.0, 3.0, 2.0])) == 4.0  # a quarter of 4 points is 1
    assert EM.top_mean(np.array([4.0, 1.0, 3.0, 2.0]), 0.5) == 3.5
    assert EM.top_mean(np.arange(68.0)) == pytest.approx(np.arange(51.0, 68.0).mean())  # the 17 largest
    s = _stats(1, 2.0, 0.5)
    s["decimal_std"][:] = 1.5
    s["crop_points"][0, 36], s["crop_points"][0, 45] = [0.3, 0.4], [0.6, 0.8]
    assert EM.interocular_fraction(s)[0] == pytest.approx(0.5)  # a 3-4-5 triangle
    x = EM.feature_matrix(s, ("ln top25(rss_std)", "ln iod", "mean(decimal_entropy)", "mean(ln integer_peak)"))
    assert x.shape == (1, 4)
    assert x[0] == pytest.approx([math.log(2.5), math.log(0.5), 0.6, math.log(0.3)])
    with pytest.raises(KeyError, match="unknown face features"):
        EM.feature_matrix(s, ("ln nothing",))
    with pytest.raises(KeyError, match="crop_points"):
        EM.feature_matrix({k: v for k, v in s.items() if k != "crop_points"}, ("ln iod",))
    for names in EM.FEATURE_SETS.values():
        assert EM.feature_matrix(_stats(3, 2.0, 0.4), names).shape == (3, len(names))


def test_ridge_recovers_a_known_log_linear_law() -> None:
    rng = np.random.default_rng(0)
    x = np.c_[rng.normal(2.0, 0.3, 500), rng.normal(-0.8, 0.1, 500)]
    y = -3.0 + 2.0 * (x[:, 0] - 2.0) - 0.5 * (x[:, 1] + 0.8) + rng.normal(0, 0.01, 500)
    m = EM.fit_ridge(x, y, ("a", "b"), ridge=0.0)
    raw = np.asarray(m.weights) / np.asarray(m.scale)  # per unit of each feature
    assert raw == pytest.approx([2.0, -0.5], abs=0.02)
    assert m.log_nme(np.array([2.0, -0.8])) == pytest.approx(-3.0, abs=0.01)
    shrunk = EM.fit_ridge(x, y, ("a", "b"), ridge=1.0)
    assert np.abs(shrunk.weights).sum() < np.abs(m.weights).sum()
    assert shrunk.bias == pytest.approx(y.mean())  # the bias is not shrunk
    with pytest.raises(ValueError):
        EM.fit_ridge(x[:3], y[:3], ("a", "b"))
    with pytest.raises(ValueError):
        EM.fit_ridge(x, y, ("a",))


def test_point_features_and_point_errors_by_hand() -> None:
    from model.metrics import point_errors

    s = _stats(2, np.array([3.0, 4.0]), np.array([0.5, 0.25]))
    s["decimal_std"][:] = np.array([[4.0], [3.0]])
    x = EM.point_feature_matrix(s, ("ln rss_std", "ln iod", "decimal_entropy"))
    assert x.shape == (2, K, 3)
    assert x[0, 7] == pytest.approx([math.log(5.0), math.log(0.5), 0.6])  # 3-4-5 spreads
    assert x[1, 60] == pytest.approx([math.log(5.0), math.log(0.25), 0.6])  # the face's iod on every point
    with pytest.raises(KeyError, match="unknown point features"):
        EM.point_feature_matrix(s, ("ln nothing",))
    for names in EM.POINT_FEATURE_SETS.values():
        assert EM.point_feature_matrix(s, names).shape == (2, K, len(names))
    gt = np.zeros((1, K, 2))
    gt[0, 45] = [10.0, 0.0]  # inter-ocular distance 10 px
    pred = gt.copy()
    pred[0, 3] += [3.0, 4.0]  # 5 px off: half the inter-ocular distance
    e = point_errors(pred, gt, 68)
    assert e[0, 3] == pytest.approx(0.5) and np.delete(e[0], 3).max() == 0.0
    assert e.mean(-1)[0] == pytest.approx(0.5 / K)
    with pytest.raises(ValueError):
        point_errors(pred[:, :5], gt[:, :5], 68)


def test_point_model_predicts_the_mean_of_lognormal_point_errors_by_hand() -> None:
    bias = tuple(np.linspace(-4.0, -2.0, K).tolist())
    m = EM.PointErrorModel(("ln rss_std", "ln iod"), (1.0, -0.7), (0.5, 0.2), (0.4, -0.1), bias, 0.6)
    s = _stats(1, 2.0, 0.4)
    z = np.array([(math.log(2.0) - 1.0) / 0.5, (math.log(0.4) + 0.7) / 0.2])
    ln_e = np.asarray(bias) + 0.4 * z[0] - 0.1 * z[1]
    assert m.log_point_errors(EM.point_feature_matrix(s, m.features))[0] == pytest.approx(ln_e)
    expected = np.exp(ln_e + 0.5 * 0.36)
    assert m.predict_point_errors(s)[0] == pytest.approx(expected)
    assert m.predict_nme(s)[0] == pytest.approx(expected.mean())
    assert m.n_parameters == 2 + K
    with pytest.raises(ValueError, match="point features"):
        m.log_point_errors(np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="residual sd"):
        EM.PointErrorModel(("a",), (0.0,), (1.0,), (1.0,), (0.0,), -1.0)


def test_point_ridge_recovers_per_landmark_intercepts_and_shared_slopes() -> None:
    rng = np.random.default_rng(1)
    n, k = 400, 6
    x = np.stack([rng.normal(1.5, 0.4, (n, k)), np.repeat(rng.normal(-0.8, 0.1, (n, 1)), k, 1)], -1)
    b = np.array([-3.0, -2.5, -2.0, -3.5, -4.0, -2.2])
    y = b + 1.5 * x[..., 0] - 0.7 * x[..., 1] + rng.normal(0, 0.05, (n, k))
    m = EM.fit_point_ridge(x, y, ("a", "b"), ridge=0.0)
    raw = np.asarray(m.weights) / np.asarray(m.scale)
    assert raw == pytest.approx([1.5, -0.7], abs=0.03)
    at_zero = m.log_point_errors(np.zeros((1, k, 2)))[0]  # every feature 0: the intercepts themselves
    assert at_zero == pytest.approx(b, abs=0.05)
    assert m.residual_sd == pytest.approx(0.05, abs=0.01)
    shrunk = EM.fit_point_ridge(x, y, ("a", "b"), ridge=1.0)
    assert np.abs(shrunk.weights).sum() < np.abs(m.weights).sum()
    with pytest.raises(ValueError):
        EM.fit_point_ridge(x[:, :, :1], y, ("a", "b"))
    with pytest.raises(ValueError):
        EM.fit_point_ridge(x[:3], y[:3], ("a", "b"))


def test_both_kinds_round_trip_through_the_file(tmp_path: Path) -> None:
    point = EM.PointErrorModel(("ln rss_std", "ln iod"), (1.0, -0.7), (0.5, 0.2), (0.4, -0.1),
                               tuple(np.linspace(-4, -2, K).tolist()), 0.6, 0.01, {"fitted_on": "test"})
    path = tmp_path / "point.json"
    EM.save(point, path)
    assert EM.load(path) == point and isinstance(EM.load(path), EM.PointErrorModel)
    face = EM.ErrorModel(("ln iod",), (-0.8,), (0.1,), (-0.1,), -3.0)
    doc = face.to_dict()
    assert doc["kind"] == "face"
    del doc["kind"]  # files written before there were two kinds
    assert EM.model_from_dict(doc) == face
    with pytest.raises(ValueError, match="unknown kind"):
        EM.model_from_dict({**doc, "kind": "ensemble"})
    with pytest.raises(ValueError, match="malformed"):
        EM.model_from_dict({"kind": "point", "features": ["a"]})


def test_model_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    m = EM.ErrorModel(("ln top25(rss_std)", "ln iod"), (2.0, -0.8), (0.1, 0.1), (0.2, -0.1), -3.1, 0.01,
                      {"fitted_on": "test"})
    path = tmp_path / "em.json"
    EM.save(m, path, {"face_calibration": {"c0": 1.0, "c1": -2.0}})
    assert EM.load(path) == m and EM.load(path).info == {"fitted_on": "test"}
    assert EM.read_document(path)["face_calibration"] == {"c0": 1.0, "c1": -2.0}
    assert not list(tmp_path.glob("*.tmp"))
    doc = json.loads(path.read_text())
    doc["error_model"]["weights"] = [1.0]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="features"):
        EM.ErrorModel.from_dict(doc["error_model"])
    with pytest.raises(ValueError, match="malformed"):
        EM.ErrorModel.from_dict({"features": ["a"]})
    with pytest.raises(ValueError, match="scales"):
        EM.ErrorModel(("a",), (0.0,), (0.0,), (1.0,), 0.0)
    with pytest.raises(FileNotFoundError, match="bench_uncertainty.py fit"):
        EM.read_document(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="no error_model"):
        EM.read_document(tmp_path / "other.json")


def test_the_shipped_fit_reads_as_documented() -> None:
    m = EM.load()
    doc = EM.read_document()
    known = EM.POINT_FEATURES if m.kind == "point" else EM.FACE_FEATURES
    assert set(m.features) <= set(known) and "fitted_on" in m.info
    assert {"c0", "c1", "on"} <= set(doc["face_calibration"]) and doc["face_calibration"]["c1"] < 0
    spreads = np.linspace(4.0, 12.0, 9)  # crop px, the range of the shipped model's top quarter
    nme = m.predict_nme(_stats(9, spreads, 0.46))
    assert (np.diff(nme) > 0).all(), "a wider spread must predict a larger error"
    iods = np.linspace(0.3, 0.6, 7)  # fraction of the crop side
    assert (np.diff(m.predict_nme(_stats(7, 7.5, iods))) < 0).all(), "closer eyes must predict a larger NME"
    typical = float(m.predict_nme(_stats(1, math.exp(m.mean[0]), 0.46))[0])
    assert 0.02 < typical < 0.08, f"a typical face should be predicted near the training NME, got {typical}"


@pytest.mark.data
@pytest.mark.slow
def test_a_fit_on_augmented_training_faces_ranks_unseen_faces(data_dir: Path, trained_weights: Path) -> None:
    """The whole recipe, small: fit on 150 augmented training faces, rank 60 LFPW test faces it never saw."""
    import torch

    from active_learning.error_model_fit import collect_augmented
    from active_learning.uncertainty import spearman
    from model.image_io import load_image
    from model.metrics import nme
    from model.predictor import Predictor
    from model.readers import load_300w_folder
    from model.transforms import landmark_box

    torch.set_num_threads(1)
    predictor = Predictor.load(trained_weights, device="cpu", detector="auto")
    train = load_300w_folder([data_dir / "300w" / "train"])[::13][:150]
    aug = collect_augmented(predictor, train, draws=1, seed=5)
    assert aug["nme"].shape == (150,) and aug["crop_points"].shape == (150, K, 2)
    assert 0.02 < float(np.median(aug["nme"])) < 0.10
    assert aug["point_errors"].shape == (150, K)
    assert aug["point_errors"].mean(-1) == pytest.approx(aug["nme"])
    names = EM.FEATURE_SETS["spread + iod"]
    face_model = EM.fit_ridge(EM.feature_matrix(aug, names), np.log(aug["nme"]), names, ridge=1e-2)
    names = EM.POINT_FEATURE_SETS["point spread + iod"]
    point_model = EM.fit_point_ridge(EM.point_feature_matrix(aug, names),
                                     np.log(np.clip(aug["point_errors"], 1e-4, None)), names, ridge=1e-2)

    test = load_300w_folder([data_dir / "300w" / "test" / "lfpw"])[:60]
    images = [load_image(r.image_path) for r in test]
    pts, dec = predictor.predict_crops(images, [landmark_box(r.points) for r in test])
    stats = {f: getattr(dec, f) for f in ("integer_std", "decimal_std")}
    stats["crop_points"] = dec.points / predictor.model.config.input_size
    err = nme(pts, np.stack([r.points for r in test]), predictor.scheme)
    for m in (face_model, point_model):
        rho = spearman(m.predict_nme(stats), err)
        assert rho > 0.4, f"the fitted {m.kind} error model should rank unseen faces' errors; Spearman {rho:.2f}"
