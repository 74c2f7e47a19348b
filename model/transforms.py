"""Face-crop geometry and augmentation, exact to sub-pixel precision.

Every point and matrix here uses 0-based pixel-centre coordinates: the centre of an image's top-left pixel is
(0, 0). OpenCV's ``warpAffine`` samples destination pixel (i, j) at ``M^-1 (i, j)`` in the same convention,
so a point mapped with ``apply_affine(points, M)`` lands exactly where its pixel lands in the warped crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


def crop_matrix(
    cx: float, cy: float, size: float, out_size: int, angle_deg: float = 0.0, flip: bool = False
) -> np.ndarray:
    """(2, 3) affine from source pixels to a square crop of ``out_size`` pixels.

    The crop covers a square of side ``size`` source pixels centred at (cx, cy), rotated by ``angle_deg``
    (counter-clockwise in the image as displayed, y down); ``flip`` mirrors it left-right afterwards.
    """
    s = out_size / size
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) * s, math.sin(a) * s
    half = (out_size - 1) / 2.0
    # x' = s R (x - c) + half, with R rotating the content by -angle so the face turns upright.
    M = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]])
    M[:, 2] = np.array([half, half]) - M[:, :2] @ np.array([cx, cy])
    if flip:
        M = np.array([[-1.0, 0.0, out_size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([M, [0, 0, 1]])
    return M


def apply_affine(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Map (..., 2) points with a (2, 3) affine."""
    points = np.asarray(points, dtype=np.float64)
    return points @ M[:, :2].T + M[:, 2]


def invert_affine(M: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine."""
    return cv2.invertAffineTransform(np.asarray(M, dtype=np.float64))


def warp(image: np.ndarray, M: np.ndarray, out_size: int) -> np.ndarray:
    """Warp ``image`` (H, W, C) uint8 into an ``out_size`` square crop with ``M``; zero outside the image.

    When the crop shrinks the image by more than 2x, the image is first reduced with area averaging (the
    matrix is composed with that reduction), so small crops are not aliased.
    """
    scale = math.sqrt(abs(np.linalg.det(M[:, :2])))
    if scale < 0.5:
        f = min(1.0, 2.0 * scale)
        h, w = image.shape[:2]
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        fx, fy = nw / w, nh / h
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        # source pixel-centre x maps to (x + 0.5) * fx - 0.5 in the reduced image
        S = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]])
        M = M @ np.linalg.inv(S)
    return cv2.warpAffine(
        image, M, (out_size, out_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def landmark_box(points: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, size) of the tight box of (K, 2) points: its centre and its larger side, in their pixels."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    c = (lo + hi) / 2.0
    return float(c[0]), float(c[1]), float(max(hi - lo))


@dataclass(frozen=True)
class AugmentRanges:
    """Random ranges for training crops. Angles in degrees; shift as a fraction of the box size."""

    rotation_sigma: float = 15.0
    rotation_max: float = 35.0
    scale_min: float = 0.85
    scale_max: float = 1.2
    shift: float = 0.08
    flip: float = 0.5
    blur: float = 0.15
    occlusion: float = 0.25
    colour: float = 0.8
    grayscale: float = 0.1


def random_crop_matrix(
    box: tuple[float, float, float], out_size: int, crop_scale: float, rng: np.random.Generator,
    ranges: AugmentRanges,
) -> tuple[np.ndarray, bool]:
    """A jittered crop matrix around a landmark box (rotation, scale, shift, flip); returns (M, flipped)."""
    cx, cy, size = box
    angle = float(np.clip(rng.normal(0.0, ranges.rotation_sigma), -ranges.rotation_max, ranges.rotation_max))
    scale = float(np.exp(rng.uniform(np.log(ranges.scale_min), np.log(ranges.scale_max))))
    dx, dy = rng.uniform(-ranges.shift, ranges.shift, size=2) * size
    flip = bool(rng.random() < ranges.flip)
    return crop_matrix(cx + dx, cy + dy, size * crop_scale * scale, out_size, angle, flip), flip


def photometric(image: np.ndarray, rng: np.random.Generator, ranges: AugmentRanges) -> np.ndarray:
    """Blur, colour jitter, grayscale and a random occluding rectangle on an RGB uint8 crop (geometry unchanged)."""
    out = image
    if rng.random() < ranges.blur:
        k = int(rng.choice([3, 5, 7]))
        out = cv2.GaussianBlur(out, (k, k), 0)
    if rng.random() < ranges.colour:
        img = out.astype(np.float32)
        img = img * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)  # contrast, brightness
        gray = img.mean(axis=2, keepdims=True)
        img = gray + (img - gray) * rng.uniform(0.5, 1.5)  # saturation
        img = img * rng.uniform(0.9, 1.1, size=3)  # colour balance
        out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < ranges.grayscale:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    if rng.random() < ranges.occlusion:
        h, w = out.shape[:2]
        ow, oh = (rng.uniform(0.1, 0.4, size=2) * (w, h)).astype(int)
        x0, y0 = rng.integers(0, w - ow), rng.integers(0, h - oh)
        out = out.copy()
        out[y0 : y0 + oh, x0 : x0 + ow] = rng.integers(0, 256, size=(oh, ow, 3) if rng.random() < 0.5 else 3)
    return out
