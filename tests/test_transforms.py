"""A drawn dot and its mapped point must coincide after crop, scale, rotation and flip."""

import numpy as np
import pytest

from model.transforms import apply_affine, crop_matrix, invert_affine, landmark_box, warp


def dot_image(h: int, w: int, x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    """A Gaussian dot centred at sub-pixel (x, y), 0-based pixel-centre coordinates."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat(img[..., None], 3, axis=2).astype(np.uint8)


def centroid(img: np.ndarray) -> np.ndarray:
    g = img[..., 0].astype(np.float64)
    g = np.where(g > 20, g, 0)
    yy, xx = np.mgrid[0 : g.shape[0], 0 : g.shape[1]]
    return np.array([(g * xx).sum() / g.sum(), (g * yy).sum() / g.sum()])


@pytest.mark.parametrize(
    ("size", "out", "angle", "flip"),
    [(100.0, 100, 0.0, False), (160.0, 128, 0.0, False), (90.0, 128, 25.0, False), (120.0, 64, -40.0, True),
     (300.0, 128, 10.0, True)],  # the last one shrinks by > 2x: the area pre-reduction path
)
def test_dot_and_point_coincide(size, out, angle, flip):
    x, y = 137.3, 151.8
    img = dot_image(300, 320, x, y, sigma=3.0 * max(1.0, size / out))
    M = crop_matrix(160.2, 150.7, size, out, angle, flip)
    crop = warp(img, M, out)
    mapped = apply_affine(np.array([x, y]), M)
    assert np.abs(centroid(crop) - mapped).max() < 0.05 * max(1.0, out / size) + 0.02


def test_crop_centre_lands_on_crop_centre_and_inverse_round_trips():
    M = crop_matrix(40.25, 60.75, 80.0, 128, 17.0, True)
    assert apply_affine(np.array([40.25, 60.75]), M) == pytest.approx([63.5, 63.5])
    pts = np.random.default_rng(0).uniform(0, 100, (20, 2))
    back = apply_affine(apply_affine(pts, M), invert_affine(M))
    assert np.allclose(back, pts)


def test_flip_mirrors_about_the_crop_centre():
    plain = crop_matrix(50, 50, 100, 100)
    flipped = crop_matrix(50, 50, 100, 100, flip=True)
    p = np.array([10.0, 20.0])
    a, b = apply_affine(p, plain), apply_affine(p, flipped)
    assert b[0] == pytest.approx(99 - a[0]) and b[1] == pytest.approx(a[1])


def test_landmark_box():
    pts = np.array([[10.0, 20.0], [30.0, 25.0], [20.0, 60.0]])
    assert landmark_box(pts) == (20.0, 40.0, 40.0)
