"""Points -> Label Studio results: the percent convention (stated in backend/results.py), its exact round
trip, hand-computed examples, and the region structure (face rectangle + keypoints with parentID)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.label_config import parse_label_config
from backend.results import (
    empty_prediction,
    face_regions,
    percent_to_pixel,
    percent_to_rect,
    pixel_to_percent,
    prediction_from_faces,
    rect_to_percent,
    task_score,
)
from model.detect import FaceBox
from model.predictor import FacePrediction

ROOT = Path(__file__).resolve().parents[1]


def face(points: np.ndarray, score: float = 0.8, spread: float = 1.0) -> FacePrediction:
    """A face with decoder statistics whose integer and decimal spreads are ``spread`` crop pixels."""
    lo, hi = points.min(0), points.max(0)
    return FacePrediction(
        box=FaceBox(float(points[:, 0].mean()), float(points[:, 1].mean()), 10.0, 1.0, "given", (0, 0, 1, 1)),
        rect=(float(lo[0]), float(lo[1]), float(hi[0] + 1), float(hi[1] + 1)),
        points=points,
        point_scores=np.linspace(0.2, 0.9, len(points)),
        point_uncertainty=np.ones(len(points)),
        score=score,
        uncertainty=1.0,
        stats={"integer_std": np.full(len(points), spread), "decimal_std": np.full(len(points), spread),
               "crop_points": np.c_[np.linspace(0.1, 0.9, len(points)), np.full(len(points), 0.5)]},
    )


def test_hand_computed_examples() -> None:
    # 200 x 100 image: top-left pixel centre, image centre, bottom-right pixel centre
    assert pixel_to_percent(0, 0, 200, 100) == (0.25, 0.5)
    assert pixel_to_percent(99.5, 49.5, 200, 100) == (50.0, 50.0)
    assert pixel_to_percent(199, 99, 200, 100) == (99.75, 99.5)
    # the outer corners of the image are -0.5 and W - 0.5 in pixel-centre coordinates
    assert pixel_to_percent(-0.5, -0.5, 200, 100) == (0.0, 0.0)
    assert pixel_to_percent(199.5, 99.5, 200, 100) == (100.0, 100.0)
    assert percent_to_pixel(50, 50, 200, 100) == (99.5, 49.5)
    assert rect_to_percent((20, 10, 120, 60), 200, 100) == {
        "x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0, "rotation": 0,
    }  # fmt: skip


def test_round_trip_percent_pixel_percent_to_1e9() -> None:
    rng = np.random.default_rng(0)
    for width, height in [(1, 1), (7, 3), (640, 480), (4032, 3024), (123, 4567)]:
        for _ in range(500):
            px, py = rng.uniform(0, 100, 2)
            x, y = percent_to_pixel(px, py, width, height)
            bx, by = pixel_to_percent(x, y, width, height)
            assert abs(bx - px) < 1e-9 and abs(by - py) < 1e-9
            # and pixel -> percent -> pixel
            qx, qy = rng.uniform(-0.5, width - 0.5), rng.uniform(-0.5, height - 0.5)
            rx, ry = percent_to_pixel(*pixel_to_percent(qx, qy, width, height), width, height)
            assert abs(rx - qx) < 1e-9 and abs(ry - qy) < 1e-9


def test_rectangle_round_trip_and_rotation() -> None:
    value = rect_to_percent((12.5, 7.25, 80.0, 66.0), 160, 90)
    assert percent_to_rect(value, 160, 90) == pytest.approx((12.5, 7.25, 80.0, 66.0), abs=1e-9)
    # rotated 90 deg clockwise about its top-left corner: a w x h box hangs to the left of (x, y)
    rot = {"x": 50.0, "y": 10.0, "width": 10.0, "height": 20.0, "rotation": 90}
    assert percent_to_rect(rot, 100, 100) == pytest.approx((30.0, 10.0, 50.0, 20.0), abs=1e-9)


def test_face_regions_structure_and_values() -> None:
    mapping = parse_label_config((ROOT / "label_config.xml").read_text())
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(20, 60, 68), rng.uniform(10, 40, 68)])
    regions = face_regions(face(pts), mapping, 100, 50)
    rect, kps = regions[0], regions[1:]
    assert rect["type"] == "rectanglelabels" and rect["from_name"] == "face" and rect["to_name"] == "image"
    assert rect["value"]["rectanglelabels"] == ["Face"] and rect["value"]["rotation"] == 0
    assert isinstance(rect["id"], str) and rect["id"]
    assert len(kps) == 68
    assert len({r["id"] for r in regions}) == 69  # unique region ids
    for i, (kp, name) in enumerate(zip(kps, mapping.labels, strict=True)):
        assert kp["type"] == "keypointlabels" and kp["from_name"] == "keypoints" and kp["to_name"] == "image"
        assert kp["parentID"] == rect["id"]
        assert kp["value"]["keypointlabels"] == [name]
        assert (kp["original_width"], kp["original_height"], kp["image_rotation"]) == (100, 50, 0)
        x, y = percent_to_pixel(kp["value"]["x"], kp["value"]["y"], 100, 50)
        assert abs(x - pts[i, 0]) < 1e-9 and abs(y - pts[i, 1]) < 1e-9
        assert kp["score"] == pytest.approx(np.linspace(0.2, 0.9, 68)[i])
        assert 0 < kp["value"]["width"] < 5
    x0, y0, x1, y1 = percent_to_rect(rect["value"], 100, 50)
    assert (x0, y0) == pytest.approx((pts[:, 0].min(), pts[:, 1].min()))
    assert (x1, y1) == pytest.approx((pts[:, 0].max() + 1, pts[:, 1].max() + 1))


def test_subset_mapping_and_no_rectangle_tag() -> None:
    xml = (
        '<View><Image name="im" value="$image"/><KeyPointLabels name="k" toName="im">'
        '<Label value="Tip" predicted_values="nose_tip"/><Label value="chin"/></KeyPointLabels></View>'
    )
    mapping = parse_label_config(xml)
    pts = np.tile([[30.0, 20.0]], (68, 1))
    pts[30] = [10.0, 12.0]
    regions = face_regions(face(pts), mapping, 64, 48)
    assert [r["value"]["keypointlabels"] for r in regions] == [["chin"], ["Tip"]]  # index order: 8, 30
    assert all("parentID" not in r for r in regions)
    assert regions[1]["value"]["x"] == pytest.approx(10.5 / 64 * 100)


def test_points_outside_the_image_are_clamped_to_its_border() -> None:
    mapping = parse_label_config((ROOT / "label_config.xml").read_text())
    pts = np.tile([[5.0, 5.0]], (68, 1))
    pts[0] = [-3.0, 4.0]
    pts[16] = [12.0, 30.0]
    regions = face_regions(face(pts), mapping, 10, 10)
    by_label = {r["value"]["keypointlabels"][0]: r["value"] for r in regions[1:]}
    assert (
        by_label["jaw_01"]["x"] == 0.0
        and by_label["jaw_17"]["x"] == 100.0
        and by_label["jaw_17"]["y"] == 100.0
    )


def test_prediction_score_version_and_empty_prediction() -> None:
    mapping = parse_label_config((ROOT / "label_config.xml").read_text())
    pts = np.full((68, 2), 5.0) + np.arange(68)[:, None] * 0.1
    sure, doubtful = face(pts, 0.9, spread=0.5), face(pts + 20, 0.5, spread=3.0)
    pred = prediction_from_faces([sure, doubtful], mapping, 100, 100, "v7")
    # the task's score is the calibrated score of its most uncertain face (active_learning.uncertainty)
    alone = prediction_from_faces([doubtful], mapping, 100, 100, "v7")["score"]
    assert pred["model_version"] == "v7" and pred["score"] == pytest.approx(alone)
    assert 0 <= pred["score"] < prediction_from_faces([sure], mapping, 100, 100, "v7")["score"]
    rect_ids = [r["id"] for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert len(rect_ids) == 2 and len(pred["result"]) == 2 * 69
    assert {r["parentID"] for r in pred["result"] if r["type"] == "keypointlabels"} == set(rect_ids)
    assert empty_prediction("v7") == {"result": [], "score": 0.0, "model_version": "v7"}
    assert task_score([]) == 0.0
