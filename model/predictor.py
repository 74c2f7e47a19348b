"""Image -> faces -> sub-pixel landmarks, in the coordinates of the image as displayed.

Conventions: images are RGB uint8 (H, W, 3) after EXIF rotation (``model.image_io.load_image``); points are
0-based pixel-centre coordinates (the centre of the top-left pixel is (0, 0)); face rectangles
(``FacePrediction.rect``) are in pixel-corner coordinates (the top-left corner of the top-left pixel is (0, 0)).

Each face is predicted in two passes by default: the first from the detector's box (mapped to the training
box convention), the second from the landmark box of the first pass's points, which removes most of the
detector's box bias. Faces of one or many images are batched through the network together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, read_meta, resolve_device
from model.codec import DECODES, Decoded, Geometry, decode
from model.dataset import to_tensor
from model.detect import FaceBox, FaceDetector, box_from_points, make_detector
from model.image_io import ImageLike, load_image
from model.network import HIHNet
from model.schemes import LandmarkScheme, get_scheme
from model.transforms import apply_affine, crop_matrix, invert_affine, warp

log = logging.getLogger(__name__)

UNCERTAINTY_SCALE_PX = 4.0  # input pixels of the crop at which a point's confidence falls to 1/e


@dataclass
class FacePrediction:
    """One face. ``points`` (K, 2) pixel-centre image coordinates; ``rect`` (x0, y0, x1, y1) pixel-corner.

    ``point_uncertainty`` (K,) is the spread of the predicted position in input pixels of the face crop,
    sqrt(integer_std^2 + decimal_std^2); ``point_scores`` (K,) = exp(-uncertainty / 4 px) in (0, 1], and
    ``uncertainty``/``score`` their per-face mean: raw values. ``active_learning.uncertainty.score_faces``
    replaces these four with the calibrated formula chosen by measurement (the backend and the CLI apply
    it). ``stats`` holds the decoder statistics each formula starts from (``model.codec.Decoded``'s fields
    but ``points``, each (K,)), and ``crop_points`` (K, 2): the points in the network's input crop as a
    fraction of its side (0-based pixel-centre crop coordinates / input size).
    """

    box: FaceBox
    rect: tuple[float, float, float, float]
    points: np.ndarray
    point_scores: np.ndarray
    point_uncertainty: np.ndarray
    score: float
    uncertainty: float
    stats: dict[str, np.ndarray]


class Predictor:
    """A loaded HIH model, a face detector and the decode settings; thread-safe for ``predict``."""

    def __init__(
        self, model: HIHNet, meta: dict, device: torch.device, detector: str | FaceDetector = "auto",
        decode_method: str = "hih", refine: bool = True, flip_test: bool = False, batch_size: int = 32,
    ):
        if decode_method not in DECODES:
            raise ValueError(f"unknown decode {decode_method!r}; choose one of {', '.join(DECODES)}")
        self.model = model
        self.meta = meta
        self.device = device
        self.scheme: LandmarkScheme = get_scheme(meta.get("scheme", model.config.num_points))
        self.version: str = str(meta.get("version", "unknown"))
        self.decode_method = decode_method
        self.refine = refine
        self.flip_test = flip_test
        self.batch_size = batch_size
        self._detector_spec = detector
        self._detector: FaceDetector | None = detector if not isinstance(detector, str) else None
        self._lock = threading.Lock()
        cfg = model.config
        self.geometry = Geometry(cfg.input_size, cfg.heatmap_size, cfg.decimal_size)
        self._flip_perm = self.scheme.flip_permutation()

    @classmethod
    def load(
        cls, weights: str | Path | None = None, device: str = "auto", detector: str | FaceDetector = "auto",
        **kwargs,
    ) -> Predictor:
        """Load a checkpoint folder (None: the packaged default weights) onto ``device``."""
        if weights is None:
            from hih_settings import Settings

            weights = Settings.from_env().weights
        dev = resolve_device(device)
        model, meta = load_checkpoint(weights, device=dev)
        log.info("loaded model %s (%s) from %s on %s", meta.get("version"), meta.get("scheme"), weights, dev)
        return cls(model, meta, dev, detector, **kwargs)

    @staticmethod
    def describe(weights: str | Path) -> dict:
        """The checkpoint's metadata without loading the weights."""
        return read_meta(weights)

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = make_detector(str(self._detector_spec))
        return self._detector

    # ------------------------------------------------------------------------------------------ public
    def predict(self, image: ImageLike, boxes: Sequence[FaceBox] | None = None) -> list[FacePrediction]:
        """Faces of one image, largest first. ``boxes`` None: run the detector; [] gives []."""
        return self.predict_batch([image], None if boxes is None else [boxes])[0]

    def predict_batch(
        self, images: Sequence[ImageLike], boxes: Sequence[Sequence[FaceBox] | None] | None = None
    ) -> list[list[FacePrediction]]:
        """Faces of several images; ``boxes[i]`` None runs the detector on image i."""
        arrays = [load_image(im) for im in images]
        per_image: list[list[FaceBox]] = []
        for i, arr in enumerate(arrays):
            given = None if boxes is None else boxes[i]
            found = list(given) if given is not None else self.detector.detect(arr)
            per_image.append(sorted(found, key=lambda b: -b.size))
        jobs = [(i, box) for i, faces in enumerate(per_image) for box in faces]
        if not jobs:
            return [[] for _ in arrays]
        points, dec = self._run(arrays, [(i, b.cx, b.cy, b.size) for i, b in jobs])
        if self.refine:
            refined = [box_from_points(p) for p in points]
            points, dec = self._run(arrays, [(i, r.cx, r.cy, r.size) for (i, _), r in zip(jobs, refined,
                                                                                            strict=True)])
        out: list[list[FacePrediction]] = [[] for _ in arrays]
        for j, (i, box) in enumerate(jobs):
            out[i].append(self._face(box, points[j], dec, j))
        return out

    def predict_crops(self, images: Sequence[np.ndarray], boxes: Sequence[tuple[float, float, float]]
                      ) -> tuple[np.ndarray, Decoded]:
        """One pass on given landmark boxes (cx, cy, size), one per image: (N, K, 2) image points + stats."""
        return self._run(list(images), [(i, *b) for i, b in enumerate(boxes)])

    # ----------------------------------------------------------------------------------------- helpers
    def _face(self, box: FaceBox, points: np.ndarray, dec: Decoded, j: int) -> FacePrediction:
        unc = np.sqrt(dec.integer_std[j] ** 2 + dec.decimal_std[j] ** 2)
        scores = np.exp(-unc / UNCERTAINTY_SCALE_PX)
        lo, hi = points.min(0), points.max(0)
        rect = (float(lo[0]), float(lo[1]), float(hi[0] + 1.0), float(hi[1] + 1.0))
        stats = {f: getattr(dec, f)[j] for f in Decoded.__dataclass_fields__ if f != "points"}
        stats["crop_points"] = dec.points[j] / self.model.config.input_size
        return FacePrediction(
            box=box, rect=rect, points=points, point_scores=scores.astype(np.float64),
            point_uncertainty=unc.astype(np.float64), score=float(scores.mean()), uncertainty=float(unc.mean()),
            stats=stats,
        )

    def _run(self, arrays: list[np.ndarray], jobs: list[tuple[int, float, float, float]]
             ) -> tuple[np.ndarray, Decoded]:
        cfg = self.model.config
        mats, crops = [], []
        for i, cx, cy, size in jobs:
            M = crop_matrix(cx, cy, size * cfg.crop_scale, cfg.input_size)
            mats.append(M)
            crops.append(warp(arrays[i], M, cfg.input_size))
        crops_arr = np.stack(crops)
        pts, dec = self._network(crops_arr)
        if self.flip_test:
            fpts, fdec = self._network(crops_arr[:, :, ::-1].copy())
            fpts = fpts[:, self._flip_perm].copy()
            fpts[..., 0] = cfg.input_size - 1 - fpts[..., 0]
            pts = (pts + fpts) / 2.0
            dec = Decoded(pts, *((getattr(dec, f) + getattr(fdec, f)[:, self._flip_perm]) / 2.0
                                 for f in list(Decoded.__dataclass_fields__)[1:]))
        image_pts = np.stack([apply_affine(p, invert_affine(M)) for p, M in zip(pts, mats, strict=True)])
        return image_pts, dec

    @torch.inference_mode()
    def _network(self, crops: np.ndarray) -> tuple[np.ndarray, Decoded]:
        parts = []
        with self._lock:
            for s in range(0, len(crops), self.batch_size):
                x = to_tensor(crops[s : s + self.batch_size]).to(self.device)
                out = self.model(x)
                parts.append(decode(out["integer"][-1], out["decimal"], self.geometry, self.decode_method))
        from model.evaluate import concat_decoded

        dec = concat_decoded(parts)
        return dec.points, dec
