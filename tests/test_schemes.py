"""Landmark schemes: names, mirror pairs, normalisers and parts (0-based pixel-centre coordinates)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from model.schemes import SCHEMES, LandmarkScheme, get_scheme

ALL = sorted(SCHEMES)


@pytest.mark.parametrize("name", ALL)
def test_flip_permutation_is_an_involution(name: str) -> None:
    s = SCHEMES[name]
    perm = s.flip_permutation()
    assert sorted(perm.tolist()) == list(range(s.num_points))
    np.testing.assert_array_equal(perm[perm], np.arange(s.num_points))


@pytest.mark.parametrize("name", ALL)
def test_names_unique_and_counts(name: str) -> None:
    s = SCHEMES[name]
    assert len(set(s.point_names)) == s.num_points == int(name.split("_")[1])


@pytest.mark.parametrize("name", ALL)
def test_normalisers_in_range(name: str) -> None:
    s = SCHEMES[name]
    for pair in (s.interocular, s.interpupil):
        if pair is not None:
            assert all(0 <= i < s.num_points for i in pair) and pair[0] != pair[1]
    assert s.flip_permutation()[s.interocular[0]] == s.interocular[1]


@pytest.mark.parametrize("name", ALL)
def test_parts_cover_every_point_once(name: str) -> None:
    s = SCHEMES[name]
    idx = [i for part in s.parts.values() for i in part]
    assert sorted(idx) == list(range(s.num_points))
    assert {"jaw", "right_brow", "left_brow", "nose", "right_eye", "left_eye", "mouth"} <= set(s.parts)
    assert ("pupils" in s.parts) == (s.interpupil is not None)


@pytest.mark.parametrize("name", ALL)
def test_flip_swaps_right_and_left_parts(name: str) -> None:
    s = SCHEMES[name]
    perm = s.flip_permutation()
    for a, b in (("right_eye", "left_eye"), ("right_brow", "left_brow")):
        assert sorted(perm[list(s.parts[a])].tolist()) == sorted(s.parts[b])
    for part in ("jaw", "nose", "mouth"):
        assert sorted(perm[list(s.parts[part])].tolist()) == sorted(s.parts[part])


@pytest.mark.parametrize("name", ALL)
def test_right_left_names_follow_flip_pairs(name: str) -> None:
    s = SCHEMES[name]
    for a, b in s.flip_pairs:
        na, nb = (s.point_names[i].rstrip("0123456789_") for i in (a, b))  # numbering runs in index order
        if "right" in na or "left" in na:
            swapped = na.replace("right", "@").replace("left", "right").replace("@", "left")
            assert swapped == nb


def test_300w_known_indices() -> None:
    s = get_scheme("300w_68")
    assert s.interocular == (36, 45) and s.interpupil is None
    assert s.point_names[36] == "right_eye_outer" and s.point_names[45] == "left_eye_outer"
    assert s.point_names[0] == "jaw_01" and s.point_names[17] == "right_brow_1"
    assert s.point_names[27] == "nose_bridge_1" and s.point_names[48] == "mouth_outer_01"
    perm = s.flip_permutation()
    assert perm[0] == 16 and perm[8] == 8 and perm[30] == 30 and perm[48] == 54 and perm[62] == 62


def test_wflw_and_cofw_known_indices() -> None:
    w, c = get_scheme("wflw_98"), get_scheme("cofw_29")
    assert w.interocular == (60, 72) and w.interpupil == (96, 97)
    assert c.interocular == (8, 9) and c.interpupil == (16, 17)
    assert w.flip_permutation()[96] == 97 and c.flip_permutation()[28] == 28


def _synthetic_300w_shape() -> np.ndarray:
    """A rough frontal 300-W shape (K, 2), 0-based pixel-centre, symmetric about x = 100."""
    rng = np.random.default_rng(0)
    return (np.array([100.0, 100.0]) + rng.normal(0, 30, size=(68, 2))).astype(np.float64)


def test_flip_points_twice_is_identity() -> None:
    s = get_scheme(68)
    pts = _synthetic_300w_shape()
    once = s.flip_points(pts, width=200)
    np.testing.assert_allclose(s.flip_points(once, width=200), pts)
    # a single flip mirrors x about (W - 1) / 2 and moves point 36 to slot 45
    np.testing.assert_allclose(once[45], [199 - pts[36, 0], pts[36, 1]])


@pytest.mark.data
def test_flip_of_real_mean_shape_is_near_symmetric(data_dir) -> None:
    from model.readers import load_300w_folder

    s = get_scheme(68)
    recs = load_300w_folder(data_dir / "300w" / "train" / "lfpw")
    # normalise each face by its eye corners, then average: a near-frontal, near-symmetric mean shape
    shapes = []
    for r in recs:
        p = r.points.astype(np.float64)
        c = p.mean(axis=0)
        shapes.append((p - c) / np.linalg.norm(p[36] - p[45]))
    mean = np.mean(shapes, axis=0)
    mirrored = s.flip_points(mean, width=1.0)  # x -> -x after centring
    mirrored[:, 0] -= mirrored[:, 0].mean() - mean[:, 0].mean()
    np.testing.assert_allclose(s.flip_points(s.flip_points(mean, 321), 321), mean, atol=1e-9)
    err = np.linalg.norm(mirrored - mean, axis=1)
    assert err.max() < 0.10  # 10 % of the inter-ocular distance: the pairs match real anatomy
    no_perm = mean.copy()
    no_perm[:, 0] = -no_perm[:, 0]
    assert np.linalg.norm(no_perm - mean, axis=1).mean() > 5 * err.mean()


def test_get_scheme_lookups() -> None:
    assert get_scheme(68) is SCHEMES["300w_68"]
    assert get_scheme(np.int64(98)).name == "wflw_98"
    assert get_scheme("COFW").name == "cofw_29"
    assert get_scheme("300w").name == "300w_68"
    s = SCHEMES["wflw_98"]
    assert get_scheme(s) is s


@pytest.mark.parametrize("bad", ["dlib_5", 5, "", 0])
def test_get_scheme_unknown(bad) -> None:
    with pytest.raises(ValueError, match="unknown landmark scheme"):
        get_scheme(bad)


def test_scheme_hashable_and_picklable() -> None:
    assert len({*SCHEMES.values()}) == len(SCHEMES)
    for s in SCHEMES.values():
        assert pickle.loads(pickle.dumps(s)) == s


def test_invalid_scheme_rejected() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        LandmarkScheme("x", ("a", "b", "c"), ((0, 1),), (0, 1), None, {"jaw": (0, 1)})
    with pytest.raises(ValueError, match="flip pair"):
        LandmarkScheme("x", ("a", "b"), ((0, 2),), (0, 1), None, {"jaw": (0, 1)})
    with pytest.raises(ValueError, match="unique"):
        LandmarkScheme("x", ("a", "a"), (), (0, 1), None, {"jaw": (0, 1)})
