"""Model output -> Label Studio prediction results, and the coordinate conventions between them.

Conventions
-----------
* The model (``model/``) gives points in 0-based **pixel-centre** coordinates of the image as displayed
  (EXIF orientation applied): the centre of the top-left pixel is (0, 0), the image spans
  [-0.5, W - 0.5] x [-0.5, H - 0.5].
* Label Studio stores ``x``/``y`` (and rectangle ``width``/``height``) in **percent of the displayed image**,
  measured from the top-left **corner** of the top-left pixel: the image spans [0, 100] x [0, 100].
* So a point converts as ``x_percent = (x_centre + 0.5) / W * 100`` and back as
  ``x_centre = x_percent / 100 * W - 0.5`` (same for y with H); the round trip is exact to rounding
  (tested to 1e-9). Rectangles are already in pixel-corner coordinates (``FacePrediction.rect``):
  ``x = x0 / W * 100``, ``width = (x1 - x0) / W * 100``, rotation 0.
* Worked example: on a 200 x 100 image, the centre of the top-left pixel (0, 0) is at (0.25 %, 0.5 %);
  the centre of the image (99.5, 49.5) is at (50 %, 50 %); the bottom-right pixel (199, 99) at
  (99.75 %, 99.5 %).

Every face becomes one ``rectanglelabels`` region with an ``id`` (when the config has a RectangleLabels tag)
and one ``keypointlabels`` region per mapped point with ``parentID`` set to that id. Points that fall outside
the image (a jaw cut off by the frame) are clamped to its border, where Label Studio can show and move them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from active_learning import uncertainty
from backend.label_config import LabelMapping

__all__ = [
    "POINT_SIZE_OF_FACE",
    "empty_prediction",
    "face_regions",
    "percent_to_pixel",
    "percent_to_rect",
    "pixel_to_percent",
    "prediction_from_faces",
    "rect_to_percent",
    "task_score",
]

# Keypoint size shown in Label Studio (value.width, in percent of the image width): this fraction of the
# face size, at least one pixel. Small, so that neighbouring points of a small face stay apart.
POINT_SIZE_OF_FACE = 0.01


def pixel_to_percent(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """0-based pixel-centre (x, y) -> Label Studio percent (corner convention) of a W x H image."""
    return (float(x) + 0.5) / width * 100.0, (float(y) + 0.5) / height * 100.0


def percent_to_pixel(x_percent: float, y_percent: float, width: int, height: int) -> tuple[float, float]:
    """Label Studio percent -> 0-based pixel-centre (x, y) of a W x H image (inverse of pixel_to_percent)."""
    return float(x_percent) / 100.0 * width - 0.5, float(y_percent) / 100.0 * height - 0.5


def rect_to_percent(rect: Sequence[float], width: int, height: int) -> dict[str, float]:
    """Pixel-corner ``(x0, y0, x1, y1)`` -> a Label Studio rectangle value (x, y, width, height, rotation)."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    return {
        "x": x0 / width * 100.0,
        "y": y0 / height * 100.0,
        "width": (x1 - x0) / width * 100.0,
        "height": (y1 - y0) / height * 100.0,
        "rotation": 0,
    }


def percent_to_rect(value: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """A Label Studio rectangle value -> pixel-corner ``(x0, y0, x1, y1)``: the axis-aligned bounds when the
    rectangle is rotated (Label Studio rotates about its top-left corner, clockwise, in degrees)."""
    x = float(value["x"]) / 100.0 * width
    y = float(value["y"]) / 100.0 * height
    w = float(value["width"]) / 100.0 * width
    h = float(value["height"]) / 100.0 * height
    angle = float(value.get("rotation") or 0.0)
    if angle % 360 == 0:
        return x, y, x + w, y + h
    t = np.deg2rad(angle)
    c, s = np.cos(t), np.sin(t)
    corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    rotated = corners @ np.array([[c, s], [-s, c]]) + [x, y]
    (x0, y0), (x1, y1) = rotated.min(0), rotated.max(0)
    return float(x0), float(y0), float(x1), float(y1)


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _clamp(v: float) -> float:
    return min(100.0, max(0.0, v))


def face_regions(
    face: Any, mapping: LabelMapping, width: int, height: int, region_id: str | None = None
) -> list[dict[str, Any]]:
    """Label Studio result regions of one ``FacePrediction``: its rectangle (when the config has one) and
    its mapped keypoints, linked by ``parentID``."""
    common = {
        "to_name": mapping.image_name,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
    }
    regions: list[dict[str, Any]] = []
    parent = None
    if mapping.face_from_name:
        parent = region_id or _region_id()
        value = rect_to_percent(face.rect, width, height)
        value["rectanglelabels"] = [mapping.face_label]
        regions.append(
            {
                "id": parent,
                "type": "rectanglelabels",
                "from_name": mapping.face_from_name,
                **common,
                "value": value,
                "score": float(face.score),
            }
        )
    points = np.asarray(face.points, dtype=np.float64)
    scores = np.asarray(face.point_scores, dtype=np.float64)
    x0, y0, x1, y1 = (float(v) for v in face.rect)
    size_px = max(x1 - x0, y1 - y0, 1.0)
    point_width = max(POINT_SIZE_OF_FACE * size_px, 1.0) / width * 100.0
    for idx, label in mapping.points:
        px, py = pixel_to_percent(points[idx, 0], points[idx, 1], width, height)
        region = {
            "id": _region_id(),
            "type": "keypointlabels",
            "from_name": mapping.keypoints_from_name,
            **common,
            "value": {"x": _clamp(px), "y": _clamp(py), "width": point_width, "keypointlabels": [label]},
            "score": float(np.clip(scores[idx], 0.0, 1.0)) if np.isfinite(scores[idx]) else 0.0,
        }
        if parent is not None:
            region["parentID"] = parent
        regions.append(region)
    return regions


def empty_prediction(model_version: str) -> dict[str, Any]:
    """The prediction of a task that failed (no image, unreadable, no face): no regions, score 0."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def prediction_from_faces(
    faces: Sequence[Any], mapping: LabelMapping, width: int, height: int, model_version: str
) -> dict[str, Any]:
    """One Label Studio prediction for a task: every face (largest first, as given), its score and version."""
    result: list[dict[str, Any]] = []
    for face in faces:
        result.extend(face_regions(face, mapping, width, height))
    return {"result": result, "score": task_score(faces), "model_version": model_version}


# The task's confidence: the calibrated score of its most uncertain face (0 without a face), so that Label
# Studio's ascending "prediction score" order and uncertainty sampling show the most doubtful tasks first.
task_score = uncertainty.task_score
