"""Readers for face landmark annotations: 300-W .pts folders, 300-VW, WFLW text files, COCO-style JSON.

Coordinate convention: every reader returns points as float arrays of shape (K, 2), x to the right, y down,
0-based pixel-centre coordinates (the centre of the top-left pixel is (0, 0)). Formats that store 1-based
(Matlab) coordinates are converted on reading; ``write_pts`` converts back.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schemes import get_scheme

__all__ = [
    "FaceRecord",
    "IMAGE_SUFFIXES",
    "WFLW_ATTRIBUTES",
    "read_pts",
    "write_pts",
    "load_300w_folder",
    "read_wflw_annotations",
    "read_coco_keypoints",
    "load_300vw_folder",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
WFLW_ATTRIBUTES = ("pose", "expression", "illumination", "make_up", "occlusion", "blur")


@dataclass
class FaceRecord:
    """One annotated face.

    ``points`` is (K, 2) float32 in 0-based pixel-centre coordinates (x right, y down; the centre of the
    top-left pixel is (0, 0)) of the image at ``image_path``. ``visible`` is (K,) bool, False where a point
    is occluded or unlabelled; None means all points are visible. ``box`` is (x_min, y_min, x_max, y_max) in
    the same coordinates, where the source gives one. ``attributes`` holds source-specific extras.
    """

    image_path: Path
    points: np.ndarray
    visible: np.ndarray | None
    scheme: str
    box: tuple[float, float, float, float] | None = None
    attributes: dict | None = None

    @property
    def num_points(self) -> int:
        """Number of landmarks K."""
        return int(self.points.shape[0])

    def __repr__(self) -> str:
        vis = "all" if self.visible is None else f"{int(np.count_nonzero(self.visible))}/{len(self.visible)}"
        return f"FaceRecord({str(self.image_path)!r}, {self.scheme}, K={self.num_points}, visible={vis})"


# ------------------------------------------------------------------------------------------ .pts files

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POINT_LINE = re.compile(rf"^\s*({_NUM})\s+({_NUM})\s*$")


def read_pts(path: str | Path) -> np.ndarray:
    """Read a 300-W ``.pts`` file into (K, 2) float64, 0-based pixel-centre coordinates (x right, y down).

    The file stores 1-based (Matlab) coordinates: ``version: 1``, ``n_points: K``, ``{``, K lines ``x y``,
    ``}``; 1 is subtracted. Raises ValueError naming the file when the content does not follow that format.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text .pts file") from exc
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 4 or not lines[0].lower().startswith("version"):
        raise ValueError(f"{path}: not a .pts file (expected 'version: 1' on the first line)")
    m = re.fullmatch(r"n_points\s*:\s*(\d+)", lines[1], flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"{path}: bad .pts header, expected 'n_points: K' but found {lines[1]!r}")
    n = int(m.group(1))
    if lines[2] != "{" or lines[-1] != "}":
        raise ValueError(f"{path}: bad .pts file, the points must be enclosed in '{{' and '}}'")
    body = lines[3:-1]
    if len(body) != n:
        raise ValueError(f"{path}: header says n_points: {n} but the file holds {len(body)} point lines")
    pts = np.empty((n, 2), dtype=np.float64)
    for i, line in enumerate(body):
        pm = _POINT_LINE.match(line)
        if pm is None:
            raise ValueError(f"{path}: point {i} is not 'x y': {line!r}")
        pts[i] = float(pm.group(1)), float(pm.group(2))
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: non-finite coordinates")
    return pts - 1.0


def write_pts(path: str | Path, points: np.ndarray) -> None:
    """Write (K, 2) 0-based pixel-centre points (x right, y down) as a 1-based 300-W ``.pts`` file."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (K, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points must be finite")
    body = "\n".join(f"{x + 1.0:.6f} {y + 1.0:.6f}" for x, y in pts)
    Path(path).write_text(f"version: 1\nn_points: {len(pts)}\n{{\n{body}\n}}\n", encoding="utf-8")


def _scheme_name(num_points: int) -> str:
    return get_scheme(num_points).name


def _find_image(pts_path: Path) -> Path | None:
    """The image for a .pts: same stem, else (300-W multi-face naming 'img_1.pts') the stem without '_<n>'."""
    stems = [pts_path.stem]
    m = re.fullmatch(r"(.+)_\d+", pts_path.stem)
    if m:
        stems.append(m.group(1))
    for stem in stems:
        for suffix in IMAGE_SUFFIXES:
            for cand in (suffix, suffix.upper()):
                img = pts_path.with_name(stem + cand)
                if img.is_file():
                    return img
    return None


def _as_paths(folders: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(folders, (str, Path)):
        return [Path(folders)]
    return [Path(f) for f in folders]


def load_300w_folder(
    folders: Path | str | Sequence[Path | str], expected_points: int | None = 68
) -> list[FaceRecord]:
    """Load every annotated face under one or more folders (searched recursively).

    A face is a ``.pts`` file and the image with the same stem (.jpg, .jpeg or .png; for the 300-W
    multi-face names ``img_1.pts`` also ``img.jpg``). Points are 0-based pixel-centre (x right, y down).
    Records are sorted by image path, then .pts path. Images without a .pts are ignored; a .pts without
    an image is skipped with a warning. Raises ValueError "no faces found in <dir>" when a folder yields
    nothing, and ValueError naming the file when a .pts is malformed or has a count other than
    ``expected_points`` (None accepts any known scheme).
    """
    found: list[tuple[Path, Path, np.ndarray]] = []
    for folder in _as_paths(folders):
        if not folder.is_dir():
            raise ValueError(f"no faces found in {folder}: not a directory")
        count = 0
        for pts_path in sorted(folder.rglob("*")):
            if pts_path.suffix.lower() != ".pts" or not pts_path.is_file():
                continue
            image = _find_image(pts_path)
            if image is None:
                log.warning("%s: no image with the same name, skipped", pts_path)
                continue
            pts = read_pts(pts_path)
            if expected_points is not None and len(pts) != expected_points:
                raise ValueError(f"{pts_path}: {len(pts)} points, expected {expected_points}")
            if expected_points is None:
                try:
                    get_scheme(len(pts))
                except ValueError as exc:
                    raise ValueError(f"{pts_path}: {exc}") from None
            found.append((image, pts_path, pts))
            count += 1
        if count == 0:
            raise ValueError(f"no faces found in {folder}")
    found.sort(key=lambda t: (str(t[0]), str(t[1])))
    return [
        FaceRecord(image_path=img, points=pts.astype(np.float32), visible=None, scheme=_scheme_name(len(pts)))
        for img, _, pts in found
    ]


# ------------------------------------------------------------------------------------------ 300-VW


def _load_broken_frames(path: Path) -> dict[str, set[int]]:
    """A JSON file {video: [frame numbers]}. The 300-VW ``broken_frames.npy`` is a pickled dict: pickles we
    did not write are never loaded, so it is refused with a message saying how to convert it."""
    if path.suffix.lower() == ".npy":
        raise ValueError(
            f"{path} is a pickled object array; hih-assist never loads pickles it did not write. Convert it "
            "once, where you trust it, to JSON {video: [frames]} and pass that file"
        )
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read broken-frame list: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object video -> list of frame numbers")
    return {str(k): {int(f) for f in v} for k, v in obj.items()}


def load_300vw_folder(
    root: Path | str,
    broken_frames: Path | str | dict[str, Iterable[int]] | None = "auto",
) -> list[FaceRecord]:
    """Load 300-VW frames: ``<root>/<video>/imgs/<frame>.jpg`` with ``<root>/<video>/annot/<frame>.pts``.

    Points are 0-based pixel-centre (x right, y down), converted from the 1-based .pts. Frames listed in
    ``broken_frames`` (video -> frame numbers whose annotation is known to be wrong: a dict or a JSON file)
    are dropped: ``"auto"`` uses ``<root>/broken_frames.json`` when present, None keeps every frame. The
    dataset's own ``broken_frames.npy`` is a pickle and is never loaded (see ``_load_broken_frames``).
    Records are sorted by video then frame; ``attributes`` holds ``{"video": str, "frame": int}``.
    """
    root = Path(root)
    if broken_frames == "auto":
        default = root / "broken_frames.json"
        broken = _load_broken_frames(default) if default.is_file() else {}
    elif broken_frames is None:
        broken = {}
    elif isinstance(broken_frames, dict):
        broken = {str(k): {int(f) for f in v} for k, v in broken_frames.items()}
    else:
        broken = _load_broken_frames(Path(broken_frames))
    records = []
    for pts_path in sorted(root.glob("*/annot/*.pts")):
        video = pts_path.parent.parent.name
        try:
            frame = int(pts_path.stem)
        except ValueError:
            raise ValueError(f"{pts_path}: 300-VW frame names must be numbers") from None
        if frame in broken.get(video, ()):
            continue
        image = None
        for suffix in IMAGE_SUFFIXES:
            cand = pts_path.parent.parent / "imgs" / (pts_path.stem + suffix)
            if cand.is_file():
                image = cand
                break
        if image is None:
            log.warning("%s: no frame image in ../imgs, skipped", pts_path)
            continue
        pts = read_pts(pts_path)
        if len(pts) != 68:
            raise ValueError(f"{pts_path}: {len(pts)} points, expected 68")
        records.append(
            FaceRecord(
                image, pts.astype(np.float32), None, "300w_68", attributes={"video": video, "frame": frame}
            )
        )
    if not records:
        raise ValueError(f"no faces found in {root}")
    return records


# ------------------------------------------------------------------------------------------ WFLW text


def read_wflw_annotations(txt_path: Path | str, image_root: Path | str) -> list[FaceRecord]:
    """Read a WFLW annotation file (``list_98pt_rect_attr_*.txt``).

    Each line: 196 floats ``x0 y0 ... x97 y97``, 4 ints ``x_min y_min x_max y_max``, 6 attribute flags
    (pose, expression, illumination, make-up, occlusion, blur) and the image path relative to
    ``image_root``. WFLW coordinates are used as they are, as 0-based pixel-centre coordinates
    (x right, y down), as every reference implementation does. Raises ValueError naming file and line on
    malformed content.
    """
    txt_path = Path(txt_path)
    image_root = Path(image_root)
    records = []
    for lineno, line in enumerate(txt_path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 207:
            raise ValueError(
                f"{txt_path}:{lineno}: expected 206 numbers and an image path, got {len(tokens)} fields"
            )
        try:
            nums = np.array([float(t) for t in tokens[:206]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{txt_path}:{lineno}: the first 206 fields must be numbers") from None
        if not np.isfinite(nums).all():
            raise ValueError(f"{txt_path}:{lineno}: non-finite value")
        pts = nums[:196].reshape(98, 2).astype(np.float32)
        x0, y0, x1, y1 = (float(v) for v in nums[196:200])
        attributes = {name: int(v) for name, v in zip(WFLW_ATTRIBUTES, nums[200:206], strict=True)}
        rel = " ".join(tokens[206:])
        records.append(
            FaceRecord(image_root / rel, pts, None, "wflw_98", box=(x0, y0, x1, y1), attributes=attributes)
        )
    return records


# ------------------------------------------------------------------------------------------ COCO JSON

# Coordinate origin of the sources of mmpose-style COCO face annotations, which copy the source values.
_ONE_BASED_BY_SCHEME = {"300w_68": True, "cofw_29": True, "wflw_98": False}


def read_coco_keypoints(
    json_path: Path | str, image_root: Path | str | None = None, one_based: bool | None = None
) -> list[FaceRecord]:
    """Read a COCO-style keypoint JSON of faces (as shipped by mmpose for WFLW, COFW, 300-W, 300-VW).

    Returns points in 0-based pixel-centre coordinates (x right, y down). These files copy the values of
    each dataset's original annotation (checked on the 300-VW fixture: its JSON keypoints equal its
    1-based .pts values digit for digit), so the origin is the source dataset's: 300-W and 300-VW
    (.pts) and COFW (Matlab) are 1-based and get 1 subtracted; WFLW is used as it is, as every reference
    implementation does (on the fixture, its 8 pupils sit on the dark iris centroid with a mean x offset of
    -0.07 px, where a 1-based file would show about -1). ``one_based`` overrides that choice.
    Visibility: where a file uses v=2 for some points, v=1 means "labelled but occluded" (COFW) and
    ``visible`` is ``v == 2``; where every labelled point has v=1 (the other fixtures), v=1 just means
    "labelled". v=0 (unlabelled) is never visible. ``box`` comes from ``bbox``
    (x, y, w, h), shifted like the points, as (x_min, y_min, x_max, y_max). ``image_root`` defaults to
    the JSON's folder. Records follow the file's annotation order.
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        images = {img["id"]: img for img in data["images"]}
        anns = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{json_path}: not a COCO keypoint file ({exc})") from None
    any_v2 = any(2 in np.asarray(a.get("keypoints", []), dtype=np.float64)[2::3] for a in anns)
    records = []
    for ann in anns:
        kp = np.asarray(ann.get("keypoints", []), dtype=np.float64)
        if kp.size == 0 or kp.size % 3:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} has {kp.size} keypoint values")
        if ann.get("image_id") not in images:
            raise ValueError(
                f"{json_path}: annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}"
            )
        kp = kp.reshape(-1, 3)
        try:
            scheme = get_scheme(len(kp)).name
        except ValueError as exc:
            raise ValueError(f"{json_path}: annotation {ann.get('id')}: {exc}") from None
        offset = 1.0 if (one_based if one_based is not None else _ONE_BASED_BY_SCHEME[scheme]) else 0.0
        pts = (kp[:, :2] - offset).astype(np.float32)
        v = kp[:, 2]
        vis = v == 2 if any_v2 else v > 0
        visible = None if vis.all() else vis
        box = None
        if ann.get("bbox") is not None and len(ann["bbox"]) == 4:
            x, y, w, h = (float(t) for t in ann["bbox"])
            box = (x - offset, y - offset, x + w - offset, y + h - offset)
        img = images[ann["image_id"]]
        attributes = {
            "image_id": ann["image_id"],
            "id": ann.get("id"),
            "width": img.get("width"),
            "height": img.get("height"),
            "coco_v": v.astype(np.int8),
        }
        records.append(
            FaceRecord(root / img["file_name"], pts, visible, scheme, box=box, attributes=attributes)
        )
    return records
