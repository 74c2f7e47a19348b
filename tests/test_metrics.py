"""Metrics against hand-computed values. Points: 0-based pixel-centre (x right, y down)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.metrics import auc, ced_curve, failure_rate, nme, plot_ced, summarize
from model.schemes import get_scheme


def _face_300w(iod: float = 100.0) -> np.ndarray:
    """A 300-W face (68, 2) whose outer eye corners 36 and 45 are ``iod`` apart horizontally."""
    pts = np.zeros((68, 2))
    pts[:, 0] = np.linspace(0, 50, 68)
    pts[:, 1] = 200.0
    pts[36] = [100.0, 100.0]
    pts[45] = [100.0 + iod, 100.0]
    return pts


def test_nme_two_faces_known_offsets() -> None:
    gt = np.stack([_face_300w(100.0), _face_300w(50.0)])
    pred = gt.copy()
    pred[0] += [3.0, 4.0]  # every point 5 px off; IOD 100 -> 0.05
    pred[1, :34, 0] += 2.0  # half the points 2 px off; mean 1 px; IOD 50 -> 0.02
    out = nme(pred, gt, "300w_68")
    np.testing.assert_allclose(out, [0.05, 0.02])
    assert out.shape == (2,)


def test_nme_single_face_is_0d() -> None:
    gt = _face_300w()
    out = nme(gt + [0.0, 10.0], gt, 68)
    assert out.shape == () and float(out) == pytest.approx(0.10)


def test_nme_visible_mask() -> None:
    gt = _face_300w()
    pred = gt.copy()
    pred[0] += [0.0, 68.0]  # one point far off
    vis = np.ones(68, dtype=bool)
    assert float(nme(pred, gt, 68)) == pytest.approx(0.01)  # 68 px / 68 points / 100
    vis[0] = False
    assert float(nme(pred, gt, 68, visible=vis)) == 0.0
    with pytest.raises(ValueError, match="no visible"):
        nme(pred, gt, 68, visible=np.zeros(68, dtype=bool))


def test_nme_interpupil_and_pairs() -> None:
    s = get_scheme("wflw_98")
    gt = np.zeros((98, 2))
    gt[:, 0] = np.arange(98)
    gt[60] = [0, 0]
    gt[72] = [80, 0]
    gt[96] = [10, 0]
    gt[97] = [70, 0]
    pred = gt + [0.0, 3.0]
    assert float(nme(pred, gt, s)) == pytest.approx(3 / 80)
    assert float(nme(pred, gt, s, norm="interpupil")) == pytest.approx(3 / 60)
    assert float(nme(pred, gt, s, norm=(96, 72))) == pytest.approx(3 / 70)


def test_nme_box_norm() -> None:
    gt = _face_300w()  # x from 0 to 200, y from 100 to 200 -> sqrt(200 * 100)
    assert float(nme(gt + [1.0, 0.0], gt, 68, norm="box")) == pytest.approx(1 / np.sqrt(200 * 100))


def test_nme_errors() -> None:
    gt = _face_300w()
    with pytest.raises(ValueError, match="no pupil"):
        nme(gt, gt, 68, norm="interpupil")
    with pytest.raises(ValueError, match="unknown norm"):
        nme(gt, gt, 68, norm="eyes")
    with pytest.raises(ValueError, match="two point indices"):
        nme(gt, gt, 68, norm=(0, 68))
    with pytest.raises(ValueError, match="differ in shape"):
        nme(gt[:10], gt, 68)
    with pytest.raises(ValueError, match=r"\(N, 68, 2\)"):
        nme(np.zeros((29, 2)), np.zeros((29, 2)), 68)
    with pytest.raises(ValueError, match="zero"):
        nme(gt, np.zeros_like(gt), 68)


def test_failure_rate() -> None:
    nmes = np.array([0.02, 0.05, 0.10, 0.11, 0.30])
    assert failure_rate(nmes) == pytest.approx(2 / 5)  # 0.10 itself is not a failure
    assert failure_rate(nmes, threshold=0.08) == pytest.approx(3 / 5)


def test_auc_on_paper() -> None:
    # faces at 0.02 and 0.06 (and one failure): CED is 0 on [0, .02), 1/3 on [.02, .06), 2/3 on [.06, .1]
    # area = (0.04 * 1/3 + 0.04 * 2/3) = 0.04; / 0.1 -> 0.4
    assert auc([0.02, 0.06, 0.5]) == pytest.approx(0.4)
    assert auc([0.0]) == pytest.approx(1.0)
    assert auc([0.1, 0.2]) == 0.0
    assert auc([0.04], threshold=0.08) == pytest.approx(0.5)


def test_auc_matches_dense_integration() -> None:
    nmes = np.random.default_rng(3).gamma(2.0, 0.025, size=500)
    x, y = ced_curve(nmes, num=200001)
    assert auc(nmes) == pytest.approx(np.trapezoid(y, x) / 0.10, abs=1e-4)


def test_ced_curve() -> None:
    x, y = ced_curve([0.02, 0.06, 0.5], num=11)
    np.testing.assert_allclose(x, np.linspace(0, 0.1, 11))
    np.testing.assert_allclose(y, [0, 0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert np.all(np.diff(y) >= 0)


@pytest.mark.parametrize("bad", [[], [np.nan], [-0.1]])
def test_bad_nmes(bad) -> None:
    with pytest.raises(ValueError):
        failure_rate(bad)
    with pytest.raises(ValueError):
        auc(bad)


def test_summarize() -> None:
    s = summarize([0.02, 0.06, 0.5])
    assert s == pytest.approx({"n": 3.0, "nme": 0.58 / 3, "fr": 1 / 3, "auc": 0.4})


def test_plot_ced(tmp_path: Path) -> None:
    out = tmp_path / "ced.png"
    rng = np.random.default_rng(4)
    plot_ced({"hih": rng.gamma(2, 0.02, 100), "dlib": rng.gamma(2, 0.03, 100)}, out, title="300-W")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError):
        plot_ced({}, tmp_path / "empty.png")
