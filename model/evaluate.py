"""Run a network over face crops and score it. Points are 0-based pixel-centre image coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.codec import Decoded, Geometry, decode
from model.dataset import FaceCropDataset
from model.network import HIHNet
from model.readers import FaceRecord
from model.schemes import LandmarkScheme
from model.transforms import apply_affine, invert_affine


@dataclass
class CropPredictions:
    """Per-face predictions in source-image pixels (N, K, 2) with the decoder's statistics (N, K)."""

    points: np.ndarray
    decoded: Decoded


def concat_decoded(parts: Sequence[Decoded]) -> Decoded:
    return Decoded(*(np.concatenate([getattr(p, f) for p in parts]) for f in Decoded.__dataclass_fields__))


@torch.no_grad()
def predict_dataset(
    model: HIHNet, dataset: FaceCropDataset, decode_method: str = "hih", batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> CropPredictions:
    """Predict every (unaugmented) crop of ``dataset``; map the points back to each record's image."""
    model.eval()
    cfg = model.config
    geo = Geometry(cfg.input_size, cfg.heatmap_size, cfg.decimal_size)
    parts, points = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = model(batch["image"].to(device))
        dec = decode(out["integer"][-1], out["decimal"], geo, decode_method)
        parts.append(dec)
        for pts, M in zip(dec.points, batch["matrix"].numpy(), strict=True):
            points.append(apply_affine(pts, invert_affine(M)))
    return CropPredictions(points=np.stack(points), decoded=concat_decoded(parts))


def gt_points(records: Sequence[FaceRecord]) -> np.ndarray:
    return np.stack([r.points for r in records]).astype(np.float64)


def evaluate_crops(
    model: HIHNet, records: Sequence[FaceRecord], scheme: LandmarkScheme, decode_method: str = "hih",
    device: torch.device | str = "cpu", dataset: FaceCropDataset | None = None,
) -> dict[str, float]:
    """NME (fraction), FR@0.10 and AUC@0.10 on ground-truth-box crops of ``records``."""
    from model.metrics import auc, failure_rate, nme

    dataset = dataset or FaceCropDataset(records, model.config, scheme, augment=False)
    pred = predict_dataset(model, dataset, decode_method, device=device)
    errors = nme(pred.points, gt_points(dataset.records), scheme)
    return {"nme": float(np.mean(errors)), "fr": failure_rate(errors), "auc": auc(errors), "n": len(errors)}


@dataclass
class ImageEvaluation:
    """Whole-image evaluation: per-face NME (fraction) and uncertainty of the found faces, and the misses.

    ``found`` indexes the records whose annotated face the detector found; ``nmes`` and ``uncertainty`` align
    with it; ``points`` (len(found), K, 2) are the predictions in image pixel-centre coordinates.
    """

    nmes: np.ndarray
    uncertainty: np.ndarray
    found: list[int]
    missed: list[int]
    points: np.ndarray
    seconds: float
    faces: int


def match_face(boxes, gt_points: np.ndarray):
    """The detected box that belongs to the annotated face: its mapped centre inside the ground-truth landmark
    box and its size within 0.5x-2x; the nearest such box, or None. Points are 0-based pixel-centre."""
    lo, hi = gt_points.min(0), gt_points.max(0)
    size = float(max(hi - lo))
    centre = (lo + hi) / 2.0
    good = [b for b in boxes if lo[0] <= b.cx <= hi[0] and lo[1] <= b.cy <= hi[1] and 0.5 <= b.size / size <= 2]
    if not good:
        return None
    return min(good, key=lambda b: float(np.hypot(b.cx - centre[0], b.cy - centre[1])))


def evaluate_images(predictor, records: Sequence[FaceRecord], detector: str = "gt", progress: bool = False,
                    scorer=None) -> ImageEvaluation:
    """Run ``predictor`` on each record's image: ``detector`` "gt" crops from the ground-truth landmark box
    (as benchmarks do); any other spec runs that detector (``model.detect.make_detector``) on the whole image
    and scores the face that matches the annotation (``match_face``); unmatched faces count as missed.
    ``scorer(face)`` (e.g. ``active_learning.uncertainty.score_face``) sets each face's uncertainty."""
    import time

    from tqdm import tqdm

    from model.detect import box_from_points, make_detector
    from model.image_io import load_image
    from model.metrics import nme as nme_fn

    det = None if detector == "gt" else make_detector(detector)
    nmes, unc, found, missed, points = [], [], [], [], []
    seconds, faces = 0.0, 0
    for idx, rec in enumerate(tqdm(records, desc="evaluate", disable=not progress, leave=False)):
        image = load_image(rec.image_path)
        t0 = time.perf_counter()
        if det is None:
            preds = predictor.predict(image, boxes=[box_from_points(rec.points)])
            chosen = preds[0]
        else:
            boxes = det.detect(image)
            box = match_face(boxes, rec.points)
            preds = predictor.predict(image, boxes=[box]) if box is not None else []
            chosen = preds[0] if preds else None
        seconds += time.perf_counter() - t0
        if chosen is None:
            missed.append(idx)
            continue
        if scorer is not None:
            scorer(chosen)
        faces += 1
        found.append(idx)
        points.append(chosen.points)
        nmes.append(float(nme_fn(chosen.points, rec.points, predictor.scheme)))
        unc.append(chosen.uncertainty)
    return ImageEvaluation(
        nmes=np.asarray(nmes), uncertainty=np.asarray(unc), found=found, missed=missed,
        points=np.asarray(points), seconds=seconds, faces=faces,
    )
