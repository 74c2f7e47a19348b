"""Drawing predicted faces onto images for people to look at."""

from __future__ import annotations

import cv2
import numpy as np

from model.schemes import LandmarkScheme

PART_COLOURS = {  # RGB
    "jaw": (255, 196, 0), "right_brow": (255, 90, 90), "left_brow": (255, 90, 90), "nose": (80, 200, 255),
    "right_eye": (90, 255, 120), "left_eye": (90, 255, 120), "mouth": (255, 110, 220), "pupils": (255, 255, 255),
}
SHIFT = 4  # cv2 fixed-point bits: draws at 1/16 pixel precision


def draw_faces(image: np.ndarray, faces, scheme: LandmarkScheme, radius: float | None = None) -> np.ndarray:
    """A copy of ``image`` (RGB uint8) with each face's rectangle and points, coloured by facial part.

    Points are 0-based pixel-centre coordinates and are drawn with sub-pixel precision (cv2's ``shift``).
    """
    out = image.copy()
    h, w = out.shape[:2]
    thickness = max(1, round(max(h, w) / 500))
    r = radius if radius is not None else max(1.5, max(h, w) / 350)
    part_of = scheme.part_of()
    for face in faces:
        x0, y0, x1, y1 = face.rect
        cv2.rectangle(out, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), (255, 255, 255), thickness)
        for k, (x, y) in enumerate(face.points):
            colour = PART_COLOURS.get(str(part_of[k]).rstrip("0123456789_"), (255, 255, 0))
            centre = (round(x * (1 << SHIFT)), round(y * (1 << SHIFT)))
            cv2.circle(out, centre, round(r * (1 << SHIFT)), colour, -1, cv2.LINE_AA, SHIFT)
    return out
