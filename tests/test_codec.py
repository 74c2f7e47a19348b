"""HIH codec: round trips (including the borders), hand-computed encodings, the stated error bound."""

import numpy as np
import pytest
import torch

from model.codec import (
    Geometry,
    decimal_label,
    decode,
    encode,
    from_heatmap_coords,
    labels_to_logits,
    split,
    to_heatmap_coords,
)

GEOMETRIES = [Geometry(128, 32, 8), Geometry(256, 64, 8), Geometry(64, 16, 4)]


def bound(geo: Geometry) -> float:
    """The documented round-trip bound: half a decimal bin, in input pixels (+ float tolerance)."""
    return geo.stride / (2 * geo.decimal_size) + 1e-3


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"{g.input_size}-{g.heatmap_size}-{g.decimal_size}")
def test_round_trip_random_points_within_half_a_bin(geo):
    rng = np.random.default_rng(1)
    pts = rng.uniform(-0.5, geo.input_size - 0.5 - 1e-6, size=(3000, 2))
    integer, decimal = labels_to_logits(encode(pts, geo))
    dec = decode(integer, decimal, geo, "hih")
    err = np.abs(dec.points[0] - pts)
    assert err.max() <= bound(geo)
    # inside the outermost bin centres the expectation decode is exact
    o = split(pts, geo)[1]
    inner = np.all(np.abs(o) <= 0.5 - 0.5 / geo.decimal_size, axis=1)
    assert err[inner].max() < 1e-3


def test_round_trip_on_the_borders():
    geo = GEOMETRIES[0]
    edge = [-0.5, -0.49, 0.0, 1.5, 1.51, 126.5, 127.0, 127.49]
    pts = np.array([[x, y] for x in edge for y in edge])
    integer, decimal = labels_to_logits(encode(pts, geo))
    dec = decode(integer, decimal, geo, "hih")
    assert np.abs(dec.points[0] - pts).max() <= bound(geo)


def test_integer_peak_is_the_nearest_pixel_even_near_zero():
    """The released code truncated toward zero and put the peak one pixel off for small coordinates."""
    geo = Geometry(128, 32, 8)
    # heatmap coordinate u = (x + 0.5) / 4 - 0.5: x = 1.9 -> u = 0.1 -> pixel 0; x = 2.1 -> u = 0.15 -> 0;
    # x = 3.6 -> u = 0.525 -> pixel 1; x = -0.5 -> u = -0.375 -> pixel 0
    pts = np.array([[1.9, 3.6], [2.1, -0.5]])
    labels = encode(pts, geo)
    assert labels["centers"].tolist() == [[0, 1], [0, 0]]
    for k in range(2):
        row, col = np.unravel_index(labels["integer"][k].argmax(), labels["integer"][k].shape)
        assert [col, row] == labels["centers"][k].tolist()


def test_fraction_that_rounds_to_the_grid_edge_stays_on_the_grid():
    geo = Geometry(128, 32, 8)
    u = np.array([[5.4999, 7.4999]])  # offsets just under +0.5: the released code's bin 8 (off grid)
    pts = from_heatmap_coords(u, geo)
    labels = encode(pts, geo)
    assert labels["centers"].tolist() == [[5, 7]]
    assert labels["decimal"].shape == (1, 8, 8)
    assert labels["decimal"][0].argmax() == 63  # last bin in both axes


def test_decimal_label_is_a_distribution_with_the_offset_as_mean():
    offsets = torch.tensor([[0.1, -0.2], [0.0, 0.0], [-0.3, 0.37]])
    lab = decimal_label(offsets, 8, 1.0).double()
    assert torch.allclose(lab.sum((-2, -1)), torch.ones(3, dtype=torch.float64), atol=1e-6)
    centres = (torch.arange(8, dtype=torch.float64) + 0.5) / 8 - 0.5
    mean_x = (lab.sum(-2) * centres).sum(-1)
    mean_y = (lab.sum(-1) * centres).sum(-1)
    assert torch.allclose(mean_x, offsets[:, 0].double(), atol=1e-5)
    assert torch.allclose(mean_y, offsets[:, 1].double(), atol=1e-5)
    # not the released code's nearly flat softmax: the peak bin holds a real share of the mass
    assert lab[1].max() > 0.03


def test_hand_computed_decode():
    """One point, integer argmax at (col 3, row 2), decimal mass on two bins: expectation vs argmax."""
    geo = Geometry(64, 16, 4)  # stride 4; bin centres at -0.375, -0.125, 0.125, 0.375
    integer = torch.full((1, 1, 16, 16), -10.0)
    integer[0, 0, 2, 3] = 10.0
    probs = torch.full((4, 4), 1e-9)
    probs[1, 2] = 0.75  # dy = -0.125, dx = 0.125
    probs[1, 3] = 0.25  # dy = -0.125, dx = 0.375
    decimal = torch.log(probs)[None, None]
    hih = decode(integer, decimal, geo, "hih").points[0, 0]
    # u = (3 + 0.1875, 2 - 0.125); x = (u + 0.5) * 4 - 0.5
    assert hih == pytest.approx([(3.1875 + 0.5) * 4 - 0.5, (1.875 + 0.5) * 4 - 0.5], abs=1e-6)
    arg = decode(integer, decimal, geo, "argmax").points[0, 0]
    assert arg == pytest.approx([(3.125 + 0.5) * 4 - 0.5, (1.875 + 0.5) * 4 - 0.5], abs=1e-6)
    only_int = decode(integer, decimal, geo, "integer").points[0, 0]
    assert only_int == pytest.approx([(3 + 0.5) * 4 - 0.5, (2 + 0.5) * 4 - 0.5])


def test_heatmap_coordinate_maps_are_inverse_and_pixel_centred():
    geo = Geometry(128, 32, 8)
    # the centre of heatmap pixel 0 covers input pixels 0..3, whose centre is 1.5
    assert to_heatmap_coords(np.array([1.5]), geo)[0] == pytest.approx(0.0)
    x = np.linspace(-0.5, 127.5, 99)
    assert np.allclose(from_heatmap_coords(to_heatmap_coords(x, geo), geo), x)


def test_decode_statistics_follow_the_spread():
    geo = Geometry(64, 16, 8)
    integer = torch.zeros(1, 2, 16, 16)
    integer[0, :, 5, 5] = 8.0
    sharp = torch.full((8, 8), -20.0)
    sharp[3, 4] = 0.0
    flat = torch.zeros(8, 8)
    dec = decode(integer, torch.stack([sharp, flat])[None], geo)
    assert dec.decimal_entropy[0, 0] < 0.01 and dec.decimal_entropy[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert dec.decimal_std[0, 0] < dec.decimal_std[0, 1]
    with pytest.raises(ValueError, match="unknown decode"):
        decode(integer, flat[None, None].expand(1, 2, 8, 8), geo, "nearest")
