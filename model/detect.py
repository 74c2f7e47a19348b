"""Face detection: detector boxes mapped to the landmark-box convention of the landmark network.

Conventions
-----------
* Images are RGB ``uint8`` arrays ``(H, W, 3)``. For convenience ``detect`` also accepts a 2-D gray
  image, ``(H, W, 1)`` and RGBA ``(H, W, 4)`` (alpha dropped); anything else raises ``ValueError``.
* Points and ``FaceBox.cx/cy`` are 0-based pixel-centre coordinates (the centre of the top-left pixel is
  (0, 0)). Raw detector boxes (``FaceBox.raw``, ``box_from_xywh``) and ``FaceBox.as_xyxy()`` use the
  pixel-corner convention (the top-left corner of pixel (0, 0) is (0, 0)): corner = centre + 0.5.
* The *landmark box* of a face is the tight bounding box of its 68 points, described by its centre
  ``(cx, cy)`` and its larger side ``size``. Every detector draws its own kind of box; a linear map per
  detector kind, fitted on the 300-W training crops only (``benchmarks/bench_detect.py --fit``, stored
  with its residuals in ``model/box_mapping.json``), turns a raw box ``(x, y, w, h)`` into an estimate::

      cx = x + a*w - 0.5      cy = y + b*h - 0.5      size = c*max(w, h)

  The ``given`` mapping (``box_from_xywh``, e.g. a Label Studio rectangle assumed to be a tight face box)
  is fitted the same way with the tight landmark box itself as the raw box (corners ``xmin+0.5`` ..
  ``xmax+0.5``), so it is the identity (a = b = 0.5, c = 1, zero residual): a rectangle drawn through the
  outermost landmarks maps to exactly their landmark box, and ``box_from_xywh(*box_from_points(p).raw)``
  equals ``box_from_points(p)``.

Detectors (``make_detector(spec)``)
-----------------------------------
* ``"haar"``: OpenCV's frontal Haar cascades shipped in the opencv-python wheel (``default`` and
  ``alt2``; union + NMS), with small images upscaled so the smallest faces exceed the 24 px window.
* ``"hog"``: dlib's HOG frontal face detector (built into the ``dlib-bin`` wheel, Boost licence; trained
  by dlib on LFW images), images upscaled to at least ``HOG_MIN_SIDE`` px on their longer side.
* ``"yunet:/path/model.onnx"``: ``cv2.FaceDetectorYN`` with a file the user supplies (never the default:
  the file is not shipped with the project).
* ``"auto"`` (the default): ``"hog"`` first, then ``"haar"`` only when HOG finds no face (``hog>haar``);
  plain ``"haar"`` when dlib cannot be imported.

Why ``auto`` is ``hog>haar`` (``python benchmarks/bench_detect.py``, one thread, CPU ms per image; full
table in ``benchmarks/results/detect.json``). Found faces on 300w/test_full/lfpw (224 whole images) and
ytf/train (800 small blurry frames); "false" = boxes per ytf frame not on its one face:

==========================================  ===========  ====  ===========  ======  ====
detector                                    lfpw found   ms    ytf found    false   ms
==========================================  ===========  ====  ===========  ======  ====
haar default (1.1, 5, 30 px), the baseline  221 (98.7%)  64    788 (98.5%)  0.014   13
haar default+alt2, upscaled to 400 px       222          163   799 (99.9%)  0.091   99
hog, no upscaling                           223          16    630 (78.8%)  0.001   3
hog, upscaled to 640 px (``"hog"``)         222          25    782 (97.8%)  0.003   30
**hog>haar** (``"auto"``)                   **224**      26    **799**      0.003   30
yunet (user file; not shipped)              224          14    800          0.021   3.5
==========================================  ===========  ====  ===========  ======  ====

No single cheap detector reaches both targets (at most one LFPW face and 1% of ytf frames missed); the
union of four Haar cascades (default, alt2, alt, profile) does, at 10-20x the time and with 0.11 false
boxes per frame, and relaxed Haar parameters (1.05, 3) triple the false boxes. HOG at 640 px (faces down
to ~1/8 of the image side fill its 80 px window) is fast, has the fewest false boxes and draws consistent
boxes; Haar (24 px window, small images upscaled to 400 px) catches the tilted or blurry faces HOG misses
and runs on only ~2% of the frames, so ``hog>haar`` costs about HOG's time. HOG without upscaling, then
Haar, is faster on tiny frames but falls back to Haar on 21% of them (10x more frames with false boxes,
p90 91 ms). Mapped-box errors (median centre error / size, |size ratio - 1|) of ``auto``: 0.077 / 0.059
(lfpw), 0.097 / 0.068 (ytf). YuNet is clearly better (0.036-0.040 centre error, no misses) and is the
better choice where a user supplies its file (``HIH_DETECTOR=yunet:/path/yunet.onnx``).

Every detector returns its boxes de-duplicated (greedy NMS on the mapped landmark squares) and sorted
largest face first. Detectors hold a lock around their native calls, so one instance may be shared by
threads (calls are then serialised).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)

MAPPING_FILE = Path(__file__).with_name("box_mapping.json")

AUTO_SPEC = "hog>haar"
AUTO_RATIONALE = (
    "dlib HOG (upscaled to 640 px), OpenCV Haar default+alt2 only when HOG finds nothing: meets both "
    "targets (lfpw 224/224, ytf 799/800) at HOG's cost with the fewest false boxes; HOG without upscaling "
    "then Haar also meets them, faster on tiny frames, but falls back to Haar on 21% of them (10x more "
    "frames with false boxes, p90 91 ms)"
)

HAAR_FILES = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
    "alt_tree": "haarcascade_frontalface_alt_tree.xml",
    "profile": "haarcascade_profileface.xml",
}
HAAR_CASCADES = ("default", "alt2")
HAAR_MIN_SIDE = 400  # images smaller than this (longer side) are upscaled before the Haar pass
HOG_MIN_SIDE = 640  # images smaller than this (longer side) are upscaled before the HOG pass


# --------------------------------------------------------------------------------------------- boxes
@dataclass(frozen=True)
class FaceBox:
    """A face: its estimated landmark box (centre + larger side, 0-based pixel-centre) and the raw box."""

    cx: float
    cy: float
    size: float
    score: float
    source: str
    raw: tuple[float, float, float, float]

    def as_xyxy(self) -> tuple[float, float, float, float]:
        """The square landmark box as corners ``(x0, y0, x1, y1)``, pixel-corner convention."""
        h = self.size / 2.0
        return (self.cx + 0.5 - h, self.cy + 0.5 - h, self.cx + 0.5 + h, self.cy + 0.5 + h)


class RawBox(NamedTuple):
    """A detector's own box (pixel-corner x, y, w, h), its score and the mapping ``kind`` that applies."""

    x: float
    y: float
    w: float
    h: float
    score: float
    kind: str  # key in box_mapping.json, e.g. "haar_default", "hog", "yunet"
    mirrored: bool = False  # found on the mirrored image (profile cascade): mapping is mirrored too


@dataclass(frozen=True)
class BoxMapping:
    a: float = 0.5
    b: float = 0.5
    c: float = 1.0

    def apply(
        self, x: float, y: float, w: float, h: float, mirrored: bool = False
    ) -> tuple[float, float, float]:
        a = 1.0 - self.a if mirrored else self.a
        return (x + a * w - 0.5, y + self.b * h - 0.5, self.c * max(w, h))


@lru_cache(maxsize=4)
def load_mappings(path: Path = MAPPING_FILE) -> dict[str, BoxMapping]:
    """The fitted mappings by kind (``given``, ``haar_default``, ..., ``hog``, ``yunet``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"box mapping file {path} is missing; run benchmarks/bench_detect.py --fit") from exc
    return {k: BoxMapping(float(v["a"]), float(v["b"]), float(v["c"])) for k, v in data["mappings"].items()}


def _mapping(kind: str) -> BoxMapping:
    maps = load_mappings()
    if kind in maps:
        return maps[kind]
    alias = {"haar": "haar_default"}.get(kind)
    if alias in maps:
        return maps[alias]
    raise ValueError(f"no fitted box mapping for {kind!r} (known: {sorted(maps)})")


def map_raw(raw: RawBox, source: str) -> FaceBox:
    """Map one raw detector box to a ``FaceBox`` with the fitted mapping of its kind."""
    cx, cy, size = _mapping(raw.kind).apply(raw.x, raw.y, raw.w, raw.h, raw.mirrored)
    return FaceBox(float(cx), float(cy), float(size), float(raw.score), source,
                   (float(raw.x), float(raw.y), float(raw.w), float(raw.h)))


def box_from_points(points: np.ndarray) -> FaceBox:
    """The landmark box of ``points`` (N x 2, 0-based pixel-centre; NaN rows ignored), source ``given``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    p = p[np.all(np.isfinite(p), axis=1)]
    if len(p) == 0:
        raise ValueError("box_from_points needs at least one finite point")
    (x0, y0), (x1, y1) = p.min(0), p.max(0)
    return FaceBox(float((x0 + x1) / 2), float((y0 + y1) / 2), float(max(x1 - x0, y1 - y0)), 1.0, "given",
                   (float(x0 + 0.5), float(y0 + 0.5), float(x1 - x0), float(y1 - y0)))


def box_from_xywh(x: float, y: float, w: float, h: float, source: str = "given") -> FaceBox:
    """A box given from outside (pixel-corner x, y, w, h), mapped to the landmark convention.

    ``source`` picks the mapping: ``given`` (default; a tight face box, identity mapping, see the module
    docstring), or a detector kind (``haar``, ``haar_alt2``, ``hog``, ``yunet``...) for a box that such a
    detector drew elsewhere.
    """
    if not (w > 0 and h > 0):
        raise ValueError(f"box needs a positive width and height, got w={w}, h={h}")
    return map_raw(RawBox(x, y, w, h, 1.0, source), source.split("_")[0])


def iou_xyxy(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _overlap_min(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def nms(boxes: Sequence[FaceBox], iou: float = 0.3, contain: float = 0.7) -> list[FaceBox]:
    """Greedy NMS in the given order (best first) on the landmark squares; returns largest first.

    A box is dropped when it overlaps a kept one with IoU > ``iou`` or lies mostly (intersection over
    the smaller area > ``contain``) inside it.
    """
    kept: list[FaceBox] = []
    kept_xyxy: list[tuple[float, float, float, float]] = []
    for b in boxes:
        bx = b.as_xyxy()
        if any(iou_xyxy(bx, k) > iou or _overlap_min(bx, k) > contain for k in kept_xyxy):
            continue
        kept.append(b)
        kept_xyxy.append(bx)
    return sorted(kept, key=lambda f: -f.size)


# ------------------------------------------------------------------------------------------ detectors
class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[FaceBox]: ...


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Check an image and return it as contiguous RGB uint8 (gray and RGBA are converted)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (RGB), got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"images must be RGB (H, W, 3) uint8, got shape {img.shape}")
    return np.ascontiguousarray(img)


def _upscale(img: np.ndarray, min_side: int) -> tuple[np.ndarray, float]:
    """Upscale so the longer side is at least ``min_side``; returns the image and the factor used."""
    side = max(img.shape[:2])
    if min_side <= 0 or side >= min_side:
        return img, 1.0
    f = min_side / side
    out = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_LINEAR)
    # corner coordinates scale exactly by the realised factor (cv2.resize aligns pixel corners)
    return out, out.shape[1] / img.shape[1]


class _BaseDetector:
    name = "base"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def detect_raw(self, image: np.ndarray) -> list[RawBox]:
        """Raw detector boxes in the original image's pixel-corner coordinates, best first."""
        raise NotImplementedError

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        raws = self.detect_raw(as_rgb(image))
        return nms([map_raw(r, self.name) for r in raws])


class HaarDetector(_BaseDetector):
    """OpenCV Haar cascades (union of ``cascades`` + NMS). Score: the cascade's neighbour count."""

    name = "haar"

    def __init__(self, cascades: Sequence[str] = HAAR_CASCADES, scale_factor: float = 1.1,
                 min_neighbors: int = 5, min_size: int = 24, min_side: int = HAAR_MIN_SIDE,
                 equalize: bool = False, min_size_frac: float = 0.0) -> None:
        super().__init__()
        unknown = [c for c in cascades if c not in HAAR_FILES]
        if unknown or not cascades:
            raise ValueError(f"unknown Haar cascade(s) {unknown}; choose from {sorted(HAAR_FILES)}")
        self.cascades = tuple(cascades)
        self._clf = {}
        for c in self.cascades:
            path = Path(cv2.data.haarcascades) / HAAR_FILES[c]
            clf = cv2.CascadeClassifier(str(path))
            if clf.empty():
                raise ValueError(f"cannot load the Haar cascade {path} (OpenCV 5.x wheels do not ship them)")
            self._clf[c] = clf
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size
        self.min_side, self.equalize, self.min_size_frac = min_side, equalize, min_size_frac

    def detect_raw(self, image: np.ndarray) -> list[RawBox]:
        gray = cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2GRAY)
        gray, f = _upscale(gray, self.min_side)
        if self.equalize:
            gray = cv2.equalizeHist(gray)
        min_px = max(self.min_size, int(self.min_size_frac * min(gray.shape)))
        out: list[RawBox] = []
        with self._lock:
            for c in self.cascades:
                passes = [(gray, False)]
                if c == "profile":
                    passes.append((np.ascontiguousarray(gray[:, ::-1]), True))
                for g, mirrored in passes:
                    rects, counts = self._clf[c].detectMultiScale2(
                        g, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                        minSize=(min_px, min_px))
                    for (x, y, w, h), n in zip(np.reshape(rects, (-1, 4)), np.ravel(counts), strict=True):
                        x = g.shape[1] - x - w if mirrored else x
                        out.append(RawBox(x / f, y / f, w / f, h / f, float(n), f"haar_{c}", mirrored))
        # cascades in priority order, then by score
        rank = {f"haar_{c}": i for i, c in enumerate(self.cascades)}
        return sorted(out, key=lambda r: (rank[r.kind], -r.score))


class _DlibMissingError(ValueError, ImportError):
    """dlib is not importable (a ValueError for callers of make_detector; 'auto' falls back to Haar)."""


class HogDetector(_BaseDetector):
    """dlib's HOG frontal face detector (``dlib-bin``). Score: the SVM margin (> ``threshold``)."""

    name = "hog"

    def __init__(self, min_side: int = HOG_MIN_SIDE, threshold: float = 0.0) -> None:
        super().__init__()
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dlib-bin is a dependency
            raise _DlibMissingError("the 'hog' detector needs dlib (pip install dlib-bin)") from exc
        self._det = dlib.get_frontal_face_detector()
        self.min_side, self.threshold = min_side, threshold

    def detect_raw(self, image: np.ndarray) -> list[RawBox]:
        img, f = _upscale(as_rgb(image), self.min_side)
        with self._lock:
            rects, scores, _ = self._det.run(img, 0, self.threshold)
        out = [
            RawBox(r.left() / f, r.top() / f, (r.right() - r.left() + 1) / f, (r.bottom() - r.top() + 1) / f,
                   float(s), "hog")
            for r, s in zip(rects, scores, strict=True)
        ]
        return sorted(out, key=lambda r: -r.score)


class YuNetDetector(_BaseDetector):
    """OpenCV's YuNet (``cv2.FaceDetectorYN``) with a user-supplied ONNX file. Score: its face score."""

    name = "yunet"

    def __init__(self, path: str | Path, score_threshold: float = 0.6, nms_threshold: float = 0.3,
                 min_side: int = 0) -> None:
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"YuNet model file {str(path)!r} does not exist")
        try:
            self._det = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), score_threshold, nms_threshold, 5000
            )
        except cv2.error as exc:
            raise ValueError(f"cannot load the YuNet model {str(path)!r}: {exc}") from exc
        self.path, self.min_side = path, min_side

    def detect_raw(self, image: np.ndarray) -> list[RawBox]:
        img, f = _upscale(as_rgb(image), self.min_side)
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        with self._lock:
            self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self._det.detect(bgr)
        if faces is None:
            return []
        out = [RawBox(r[0] / f, r[1] / f, r[2] / f, r[3] / f, float(r[-1]), "yunet") for r in faces]
        return sorted([r for r in out if r.w > 0 and r.h > 0], key=lambda r: -r.score)


class FallbackDetector:
    """Runs detectors in order and returns the first non-empty result (e.g. ``hog>haar``)."""

    def __init__(self, detectors: Sequence[FaceDetector]) -> None:
        self.detectors = list(detectors)
        self.name = ">".join(d.name for d in self.detectors)

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        image = as_rgb(image)
        for d in self.detectors:
            boxes = d.detect(image)
            if boxes:
                return boxes
        return []


def make_detector(spec: str = "auto") -> FaceDetector:
    """A face detector from a spec: ``auto``, ``haar``, ``hog``, ``yunet:/path/model.onnx``, or a fallback
    chain of those joined by ``>`` (``hog>haar``: Haar only when HOG finds nothing)."""
    spec = (spec or "auto").strip()
    if spec.lower() == "auto":
        try:
            return make_detector(AUTO_SPEC)
        except ImportError:  # dlib-bin missing (it is a dependency): Haar alone, which ships with OpenCV
            log.warning("dlib is not installed: the 'auto' face detector falls back to 'haar'")
            return HaarDetector()
    if spec.lower().startswith("yunet:"):
        path = spec[len("yunet:"):].strip()
        if not path:
            raise ValueError("yunet needs a model file: 'yunet:/path/to/yunet.onnx'")
        return YuNetDetector(path)
    if ">" in spec:
        return FallbackDetector([make_detector(s) for s in spec.split(">")])
    if spec.lower() == "haar":
        return HaarDetector()
    if spec.lower() == "hog":
        return HogDetector()
    if spec.lower() == "yunet":
        raise ValueError("yunet needs a model file: 'yunet:/path/to/yunet.onnx' (it is not shipped)")
    raise ValueError(f"unknown detector spec {spec!r}: use auto, haar, hog or yunet:/path/to/model.onnx")
