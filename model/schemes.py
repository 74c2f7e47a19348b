"""Facial landmark schemes (300-W 68, WFLW 98, COFW 29) as data.

Coordinate convention (everywhere in ``model/``): points are float arrays of shape (K, 2), x to the right,
y down, 0-based pixel-centre coordinates (the centre of the top-left pixel is (0, 0)). A horizontal mirror
of an image of width W maps x to W - 1 - x.

"Right" and "left" are the subject's, as in the 300-W convention: point 36 of 300-W is the subject's right
eye outer corner, which appears on the image's left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LandmarkScheme", "SCHEMES", "get_scheme"]


@dataclass(frozen=True)
class LandmarkScheme:
    """A landmark layout: point names, mirror pairs, NME normalisers and facial-part groups.

    All indices are 0-based. ``parts`` partitions the points: every index lies in exactly one part.
    """

    name: str
    point_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    interocular: tuple[int, int]
    interpupil: tuple[int, int] | None
    parts: dict[str, tuple[int, ...]] = field(hash=False, compare=True)

    def __post_init__(self) -> None:
        k = len(self.point_names)
        if len(set(self.point_names)) != k:
            raise ValueError(f"scheme {self.name}: point names are not unique")
        seen: set[int] = set()
        for a, b in self.flip_pairs:
            if not (0 <= a < k and 0 <= b < k) or a == b or a in seen or b in seen:
                raise ValueError(f"scheme {self.name}: bad flip pair ({a}, {b})")
            seen.update((a, b))
        norms = [self.interocular] + ([self.interpupil] if self.interpupil is not None else [])
        for pair in norms:
            if not all(0 <= i < k for i in pair) or pair[0] == pair[1]:
                raise ValueError(f"scheme {self.name}: normaliser {pair} out of range")
        covered = sorted(i for idx in self.parts.values() for i in idx)
        if covered != list(range(k)):
            raise ValueError(f"scheme {self.name}: parts must cover every point exactly once")

    @property
    def num_points(self) -> int:
        """Number of landmarks K."""
        return len(self.point_names)

    def flip_permutation(self) -> np.ndarray:
        """Index permutation for a horizontal mirror.

        For points (K, 2) in 0-based pixel-centre coordinates on an image of width W, the mirrored
        annotation is ``m = points[perm]`` followed by ``m[:, 0] = W - 1 - m[:, 0]``. It is an involution.
        """
        perm = np.arange(self.num_points)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def flip_points(self, points: np.ndarray, width: float) -> np.ndarray:
        """Mirror points (..., K, 2), 0-based pixel-centre (x right, y down), on an image W px wide."""
        pts = np.asarray(points)
        if not np.issubdtype(pts.dtype, np.floating):
            pts = pts.astype(np.float64)
        out = pts[..., self.flip_permutation(), :].copy()
        out[..., 0] = (width - 1) - out[..., 0]
        return out

    def part_of(self) -> np.ndarray:
        """(K,) array of part names, one per point (handy for colouring)."""
        out = np.empty(self.num_points, dtype=object)
        for part, idx in self.parts.items():
            out[list(idx)] = part
        return out


def _seq(prefix: str, n: int, width: int = 1) -> list[str]:
    return [f"{prefix}_{i:0{width}d}" for i in range(1, n + 1)]


def _r(a: int, b: int) -> tuple[int, ...]:
    """Inclusive range a..b as a tuple."""
    return tuple(range(a, b + 1))


def _pairs(*pairs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in pairs)


# ---------------------------------------------------------------- 300-W, 68 points (iBUG / Multi-PIE)
_300W_NAMES = (
    _seq("jaw", 17, 2)  # 0-16, from the subject's right ear (image left) round the chin
    + _seq("right_brow", 5)  # 17-21, outer to inner
    + _seq("left_brow", 5)  # 22-26, inner to outer
    + _seq("nose_bridge", 4)  # 27-30, top to tip
    + _seq("nose_base", 5)  # 31-35, subject's right to left
    + [
        "right_eye_outer",  # 36
        "right_eye_upper_outer",
        "right_eye_upper_inner",
        "right_eye_inner",  # 39
        "right_eye_lower_inner",
        "right_eye_lower_outer",
        "left_eye_inner",  # 42
        "left_eye_upper_inner",
        "left_eye_upper_outer",
        "left_eye_outer",  # 45
        "left_eye_lower_outer",
        "left_eye_lower_inner",
    ]
    + _seq("mouth_outer", 12, 2)  # 48-59, 48 = subject's right corner, clockwise in the image
    + _seq("mouth_inner", 8)  # 60-67, 60 = subject's right corner
)
_300W_FLIP = _pairs(
    *[(i, 16 - i) for i in range(8)],
    *[(17 + i, 26 - i) for i in range(5)],
    (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
    (60, 64), (61, 63), (65, 67),
)  # fmt: skip
SCHEME_300W = LandmarkScheme(
    name="300w_68",
    point_names=tuple(_300W_NAMES),
    flip_pairs=_300W_FLIP,
    interocular=(36, 45),
    interpupil=None,
    parts={
        "jaw": _r(0, 16),
        "right_brow": _r(17, 21),
        "left_brow": _r(22, 26),
        "nose": _r(27, 35),
        "right_eye": _r(36, 41),
        "left_eye": _r(42, 47),
        "mouth": _r(48, 67),
    },
)

# ---------------------------------------------------------------- WFLW, 98 points
_WFLW_NAMES = (
    _seq("jaw", 33, 2)  # 0-32
    + _seq("right_brow_upper", 5)  # 33-37, outer to inner
    + _seq("right_brow_lower", 4)  # 38-41, inner to outer
    + _seq("left_brow_upper", 5)  # 42-46, inner to outer
    + _seq("left_brow_lower", 4)  # 47-50, outer to inner
    + _seq("nose_bridge", 4)  # 51-54
    + _seq("nose_base", 5)  # 55-59
    + ["right_eye_outer"]
    + _seq("right_eye_upper", 3)  # 60-63
    + ["right_eye_inner"]
    + _seq("right_eye_lower", 3)  # 64-67
    + ["left_eye_inner"]
    + _seq("left_eye_upper", 3)  # 68-71
    + ["left_eye_outer"]
    + _seq("left_eye_lower", 3)  # 72-75
    + _seq("mouth_outer", 12, 2)  # 76-87
    + _seq("mouth_inner", 8)  # 88-95
    + ["right_pupil", "left_pupil"]  # 96, 97
)
_WFLW_FLIP = _pairs(
    *[(i, 32 - i) for i in range(16)],
    (33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47),
    (55, 59), (56, 58),
    (60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73),
    (76, 82), (77, 81), (78, 80), (83, 87), (84, 86),
    (88, 92), (89, 91), (93, 95),
    (96, 97),
)  # fmt: skip
SCHEME_WFLW = LandmarkScheme(
    name="wflw_98",
    point_names=tuple(_WFLW_NAMES),
    flip_pairs=_WFLW_FLIP,
    interocular=(60, 72),
    interpupil=(96, 97),
    parts={
        "jaw": _r(0, 32),
        "right_brow": _r(33, 41),
        "left_brow": _r(42, 50),
        "nose": _r(51, 59),
        "right_eye": _r(60, 67),
        "left_eye": _r(68, 75),
        "mouth": _r(76, 95),
        "pupils": (96, 97),
    },
)

# ---------------------------------------------------------------- COFW, 29 points (RCPR order)
# Layout checked against the COFW fixture: 8 and 9 are the outer eye corners (image left / right at eye
# height), 16 and 17 the pupils, 28 the chin. 8 and 9 are the inter-ocular normaliser of HRNet and HIH.
_COFW_NAMES = (
    "right_brow_outer",  # 0
    "left_brow_outer",  # 1
    "right_brow_inner",  # 2
    "left_brow_inner",  # 3
    "right_brow_upper",  # 4
    "right_brow_lower",  # 5
    "left_brow_upper",  # 6
    "left_brow_lower",  # 7
    "right_eye_outer",  # 8
    "left_eye_outer",  # 9
    "right_eye_inner",  # 10
    "left_eye_inner",  # 11
    "right_eye_upper",  # 12
    "right_eye_lower",  # 13
    "left_eye_upper",  # 14
    "left_eye_lower",  # 15
    "right_pupil",  # 16
    "left_pupil",  # 17
    "nose_right",  # 18
    "nose_left",  # 19
    "nose_tip",  # 20
    "nose_base",  # 21
    "mouth_right",  # 22
    "mouth_left",  # 23
    "upper_lip_top",  # 24
    "upper_lip_bottom",  # 25
    "lower_lip_top",  # 26
    "lower_lip_bottom",  # 27
    "chin",  # 28
)
_COFW_FLIP = _pairs(
    (0, 1), (2, 3), (4, 6), (5, 7), (8, 9), (10, 11), (12, 14), (13, 15), (16, 17), (18, 19), (22, 23)
)  # fmt: skip
SCHEME_COFW = LandmarkScheme(
    name="cofw_29",
    point_names=_COFW_NAMES,
    flip_pairs=_COFW_FLIP,
    interocular=(8, 9),
    interpupil=(16, 17),
    parts={
        "jaw": (28,),
        "right_brow": (0, 2, 4, 5),
        "left_brow": (1, 3, 6, 7),
        "nose": (18, 19, 20, 21),
        "right_eye": (8, 10, 12, 13),
        "left_eye": (9, 11, 14, 15),
        "mouth": _r(22, 27),
        "pupils": (16, 17),
    },
)

SCHEMES: dict[str, LandmarkScheme] = {s.name: s for s in (SCHEME_300W, SCHEME_WFLW, SCHEME_COFW)}

_ALIASES = {"300w": "300w_68", "300-w": "300w_68", "ibug": "300w_68", "68": "300w_68",
            "wflw": "wflw_98", "98": "wflw_98", "cofw": "cofw_29", "29": "cofw_29"}  # fmt: skip


def get_scheme(name_or_num_points: str | int | LandmarkScheme) -> LandmarkScheme:
    """Look a scheme up by name ("300w_68", "wflw", ...) or by number of points (68, 98, 29)."""
    if isinstance(name_or_num_points, LandmarkScheme):
        return name_or_num_points
    if isinstance(name_or_num_points, (int, np.integer)) and not isinstance(name_or_num_points, bool):
        key = str(int(name_or_num_points))
    elif isinstance(name_or_num_points, str):
        key = name_or_num_points.strip().lower()
    else:
        raise ValueError(f"unknown landmark scheme {name_or_num_points!r}")
    key = _ALIASES.get(key, key)
    if key not in SCHEMES:
        known = ", ".join(f"{s.name} ({s.num_points} points)" for s in SCHEMES.values())
        raise ValueError(f"unknown landmark scheme {name_or_num_points!r}; known: {known}")
    return SCHEMES[key]
