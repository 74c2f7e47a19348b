"""Training data for ``active_learning.error_model``: a network's own training faces under augmentation.

``collect_augmented`` runs a predictor's network on augmented crops of annotated faces (the training
augmentation of ``model.transforms.AugmentRanges``: rotation, scale, shift, flip, blur, colour, occlusion) and
returns, per crop, the decoder statistics, the predicted points in the crop (``crop_points``, fraction of its
side), each point's error over the ground truth's inter-ocular distance (``point_errors``) and their mean,
the inter-ocular NME (``nme``), against the augmented ground truth. Points are 0-based pixel-centre crop
coordinates before the division by the input size. Needs torch; ``error_model`` itself does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from active_learning.error_model import STAT_FIELDS


def collect_augmented(predictor, records: Sequence, draws: int = 3, seed: int = 1234, batch: int = 64,
                      progress: bool = False) -> dict[str, np.ndarray]:
    """``draws`` augmented crops of each of ``records`` (``model.readers.FaceRecord``) through
    ``predictor.model`` (a ``model.predictor.Predictor``): arrays ``nme`` (N,), ``crop_points`` (N, K, 2) and
    ``point_errors`` and each of ``STAT_FIELDS`` (N, K), N = draws x len(records). Reproducible for a given ``seed``."""
    import torch
    from tqdm import tqdm

    from model.codec import decode
    from model.dataset import FaceCropDataset
    from model.metrics import point_errors

    if draws < 1 or not records:
        raise ValueError("need at least one draw of at least one face")
    size = predictor.model.config.input_size
    ds = FaceCropDataset(records, predictor.model.config, predictor.scheme, augment=True, seed=seed)
    out: dict[str, list[np.ndarray]] = {f: [] for f in (*STAT_FIELDS, "crop_points", "point_errors", "nme")}
    was_training = predictor.model.training
    predictor.model.eval()
    try:
        with tqdm(total=draws * len(ds), desc="augmented faces", unit="face", disable=not progress) as bar:
            for draw in range(draws):
                ds.set_epoch(draw)
                for s in range(0, len(ds), batch):
                    items = [ds[i] for i in range(s, min(s + batch, len(ds)))]
                    x = torch.stack([it["image"] for it in items]).to(predictor.device)
                    with torch.inference_mode():
                        o = predictor.model(x)
                        dec = decode(o["integer"][-1], o["decimal"], predictor.geometry, predictor.decode_method)
                    gt = np.stack([it["points"].numpy() for it in items]).astype(np.float64)
                    for f in STAT_FIELDS:
                        out[f].append(getattr(dec, f).astype(np.float64))
                    out["crop_points"].append(dec.points / size)
                    errors = point_errors(dec.points, gt, predictor.scheme)
                    out["point_errors"].append(errors)
                    out["nme"].append(errors.mean(-1))
                    bar.update(len(items))
    finally:
        predictor.model.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}

