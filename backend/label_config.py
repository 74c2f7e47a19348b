"""Reading a Label Studio labelling config: which tags the backend fills, and which 300-W point each
keypoint label receives.

A config the backend can serve has an ``<Image>``, a ``<KeyPointLabels>`` connected to it (``toName``), and
optionally a ``<RectangleLabels>`` on the same image for the face boxes (without one, keypoints are sent
without ``parentID``). Each keypoint label is mapped to indices of the 68-point 300-W scheme
(``model.schemes.SCHEME_300W``; 0-based), by the first rule that applies:

1. a ``predicted_values`` attribute on the ``<Label>``: comma-separated 300-W point names, 0-based indices
   or inclusive index ranges (``predicted_values="right_eye_outer"``, ``"36"``, ``"36-41"``, ``"0-67"``);
2. the label's own value equal to a 300-W point name (``jaw_01`` ... ``mouth_inner_8``), compared
   case-insensitively, with spaces, dots or hyphens read as ``_`` and leading zeros of the number ignored
   (``Jaw 1`` == ``jaw_01``);
3. a small alias table of common names (``nose_tip``, ``chin``, ``mouth_left`` ...; see ``ALIASES``).

Any subset of the 68 points may be mapped; labels that map to nothing are reported (``unmapped``) and never
predicted. When two labels claim the same point the first one (in config order) keeps it. A config with no
Image, no KeyPointLabels on an Image, or no mappable keypoint label raises ``LabelConfigError`` whose message
says exactly what is missing.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from model.schemes import SCHEME_300W

__all__ = [
    "ALIASES",
    "LabelConfigError",
    "LabelMapping",
    "normalize_name",
    "parse_label_config",
]

SCHEME = SCHEME_300W

# Common names for single 300-W points (0-based indices). Keys are normalised (see normalize_name).
ALIASES: dict[str, int] = {
    "chin": 8,
    "menton": 8,
    "right_brow_outer": 17,
    "right_brow_inner": 21,
    "left_brow_inner": 22,
    "left_brow_outer": 26,
    "nose_top": 27,
    "nasion": 27,
    "nose_tip": 30,
    "pronasale": 30,
    "nose_right": 31,
    "subnasale": 33,
    "nose_left": 35,
    "right_eye_outer_corner": 36,
    "right_eye_inner_corner": 39,
    "left_eye_inner_corner": 42,
    "left_eye_outer_corner": 45,
    "mouth_right": 48,
    "right_mouth_corner": 48,
    "mouth_right_corner": 48,
    "upper_lip_top": 51,
    "mouth_left": 54,
    "left_mouth_corner": 54,
    "mouth_left_corner": 54,
    "lower_lip_bottom": 57,
    "upper_lip_bottom": 62,
    "lower_lip_top": 66,
}

_SEPARATORS = re.compile(r"[\s.\-]+")
_TRAILING_NUMBER = re.compile(r"^(.*?_)0*(\d+)$")
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


class LabelConfigError(ValueError):
    """A labelling config the backend cannot serve; the message says what is missing and how to fix it."""


def normalize_name(name: str) -> str:
    """Lower case, spaces/dots/hyphens as ``_``, no leading zeros in a trailing number.

    ``Jaw-01`` -> ``jaw_1``."""
    key = _SEPARATORS.sub("_", str(name).strip().lower()).strip("_")
    m = _TRAILING_NUMBER.match(key)
    return f"{m.group(1)}{int(m.group(2))}" if m else key


_BY_NAME: dict[str, int] = {normalize_name(n): i for i, n in enumerate(SCHEME.point_names)}
_BY_NAME_OR_ALIAS: dict[str, int] = {**{normalize_name(k): v for k, v in ALIASES.items()}, **_BY_NAME}


def _resolve_token(token: str) -> list[int]:
    """One ``predicted_values`` token -> 300-W indices (raises ValueError when it names no point)."""
    token = token.strip()
    if token.isdigit():
        idx = int(token)
        if not 0 <= idx < SCHEME.num_points:
            raise ValueError(f"index {idx} is outside 0..{SCHEME.num_points - 1}")
        return [idx]
    m = _RANGE.match(token)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if not (0 <= a <= b < SCHEME.num_points):
            raise ValueError(f"range {token!r} is not within 0..{SCHEME.num_points - 1}")
        return list(range(a, b + 1))
    key = normalize_name(token)
    if key in _BY_NAME_OR_ALIAS:
        return [_BY_NAME_OR_ALIAS[key]]
    raise ValueError(f"{token!r} is not a 300-W point name or 0-based index")


@dataclass(frozen=True)
class LabelMapping:
    """What the backend fills in a project, parsed from its labelling config.

    ``points``: ``(300-W index, keypoint label)`` pairs in index order, each index at most once.
    ``image_key``: the task data key of the image (``$image`` -> ``image``); ``image_url`` is set instead
    when the Image tag's value is a literal URL. ``face_from_name``/``face_label`` are None when the config
    has no RectangleLabels on the image. ``unmapped``: ``(label, reason)`` for labels that receive nothing.
    """

    image_name: str
    image_key: str | None
    image_url: str | None
    keypoints_from_name: str
    points: tuple[tuple[int, str], ...]
    face_from_name: str | None = None
    face_label: str | None = None
    unmapped: tuple[tuple[str, str], ...] = ()

    @property
    def indices(self) -> list[int]:
        return [i for i, _ in self.points]

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self.points]

    def describe(self) -> str:
        """One line for logs: tags used and how many points map."""
        face = f"{self.face_from_name}[{self.face_label}]" if self.face_from_name else "no face rectangles"
        return (
            f"image={self.image_name} keypoints={self.keypoints_from_name} ({len(self.points)}/"
            f"{SCHEME.num_points} points) face={face}"
            + (f" unmapped={len(self.unmapped)}" if self.unmapped else "")
        )


def _tag_kind(tag: object) -> str:
    """``KeyPointLabelsTag`` -> ``keypointlabels`` (the SDK's class names follow the XML tag)."""
    name = type(tag).__name__
    return (name[:-3] if name.endswith("Tag") else name).lower()


def _map_keypoint_labels(control) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    taken: dict[int, str] = {}
    unmapped: list[tuple[str, str]] = []
    for label, tag in control.labels_attrs.items():
        attrs = getattr(tag, "attr", None) or {}
        raw = attrs.get("predicted_values")
        if raw is not None and str(raw).strip():
            indices: list[int] = []
            for token in str(raw).split(","):
                if not token.strip():
                    continue
                try:
                    indices.extend(_resolve_token(token))
                except ValueError as exc:
                    unmapped.append((label, f"predicted_values: {exc}"))
        else:
            key = normalize_name(label)
            indices = [_BY_NAME_OR_ALIAS[key]] if key in _BY_NAME_OR_ALIAS else []
            if not indices:
                unmapped.append((label, "not a 300-W point name or alias, and no predicted_values"))
        for idx in indices:
            if idx in taken:
                if taken[idx] != label:
                    unmapped.append(
                        (label, f"point {idx} ({SCHEME.point_names[idx]}) already mapped to {taken[idx]!r}")
                    )
                continue
            taken[idx] = label
    return sorted(taken.items()), unmapped


def _face_label(control) -> str | None:
    labels = list(control.labels_attrs.items())
    if not labels:
        return None
    for label, tag in labels:
        attrs = getattr(tag, "attr", None) or {}
        values = [normalize_name(v) for v in str(attrs.get("predicted_values") or "").split(",")]
        if normalize_name(label) == "face" or "face" in values:
            return label
    return labels[0][0]


def _parse(config: str) -> LabelMapping:
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError("the label config is empty: send the project's labelling config XML")
    try:
        li = LabelInterface(config)
    except Exception as exc:  # noqa: BLE001 - the SDK raises several XML/validation error types
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from exc

    images = {o.name: o for o in li.objects if _tag_kind(o) == "image"}
    if not images:
        raise LabelConfigError(
            'the label config has no <Image> tag: add e.g. <Image name="image" value="$image"/>'
        )
    controls = list(li.controls)
    keypoint_tags = [c for c in controls if _tag_kind(c) == "keypointlabels"]
    if not keypoint_tags:
        raise LabelConfigError(
            "the label config has no <KeyPointLabels> tag: add one connected to the image, with labels named "
            "after the 300-W points (jaw_01 ... mouth_inner_8, see label_config.xml)"
        )
    on_image = [c for c in keypoint_tags if any(t in images for t in (c.to_name or []))]
    if not on_image:
        names = ", ".join(repr(c.name) for c in keypoint_tags)
        raise LabelConfigError(
            f"the <KeyPointLabels> tag(s) {names} are not connected to an <Image> "
            f"(toName must be one of: {', '.join(sorted(images))})"
        )

    best = None
    all_unmapped: list[tuple[str, str]] = []
    for control in on_image:
        points, unmapped = _map_keypoint_labels(control)
        all_unmapped.extend(unmapped)
        if points and (best is None or len(points) > len(best[1])):
            best = (control, points, unmapped)
    if best is None:
        labels = [label for c in on_image for label in c.labels_attrs]
        shown = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "") if labels else "(none)"
        raise LabelConfigError(
            f"none of the <KeyPointLabels> labels maps to a 300-W landmark (labels: {shown}): "
            f"name them after "
            f"the 300-W points (jaw_01 ... mouth_inner_8, as in label_config.xml) or give each <Label> a "
            f'predicted_values attribute with a point name or 0-based index, e.g. predicted_values="30"'
        )
    control, points, unmapped = best
    image_name = next(t for t in control.to_name if t in images)
    image = images[image_name]
    value = str(getattr(image, "value", "") or "")
    if value.startswith("$") and len(value) > 1:
        image_key, image_url = value[1:], None
    elif value:
        image_key, image_url = None, value
    else:
        raise LabelConfigError(f'the <Image name="{image_name}"> tag has no value: set value="$image"')

    face_from, face_label = None, None
    for c in controls:
        if _tag_kind(c) == "rectanglelabels" and image_name in (c.to_name or []):
            label = _face_label(c)
            if label is not None:
                face_from, face_label = c.name, label
                break

    return LabelMapping(
        image_name=image_name,
        image_key=image_key,
        image_url=image_url,
        keypoints_from_name=control.name,
        points=tuple(points),
        face_from_name=face_from,
        face_label=face_label,
        unmapped=tuple(unmapped),
    )


_CACHE: OrderedDict[str, LabelMapping | LabelConfigError] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64
MAX_CONFIG_CHARS = 1_000_000  # a 68-point config is ~10 kB; bounds parsing time and the cache's memory


def parse_label_config(config: str) -> LabelMapping:
    """The ``LabelMapping`` of a labelling config (cached by the config text); raises ``LabelConfigError``."""
    if not isinstance(config, str):
        raise LabelConfigError(f"the label config must be an XML string, got {type(config).__name__}")
    if len(config) > MAX_CONFIG_CHARS:
        raise LabelConfigError(
            f"the label config is {len(config)} characters long, over the limit of {MAX_CONFIG_CHARS}"
        )
    with _CACHE_LOCK:
        hit = _CACHE.get(config)
        if hit is not None:
            _CACHE.move_to_end(config)
    if hit is None:
        try:
            hit = _parse(config)
        except LabelConfigError as exc:
            hit = exc
        with _CACHE_LOCK:
            _CACHE[config] = hit
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    if isinstance(hit, LabelConfigError):
        raise LabelConfigError(str(hit))
    return hit
