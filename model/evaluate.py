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
