"""Training and evaluation samples: face crops with HIH labels.

Points are 0-based pixel-centre coordinates throughout (the centre of the top-left pixel is (0, 0)).
Images are decoded once and kept in memory as RGB uint8 (2,012 300-W crops take about 0.9 GB).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from model.codec import Geometry, encode, to_heatmap_coords
from model.config import HIHConfig
from model.image_io import load_image
from model.readers import FaceRecord
from model.schemes import LandmarkScheme
from model.transforms import (
    AugmentRanges,
    apply_affine,
    crop_matrix,
    landmark_box,
    photometric,
    random_crop_matrix,
    warp,
)

cv2.setNumThreads(1)  # data loading runs beside training on few cores: no oversubscription

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(..., S, S, 3) RGB uint8 -> (..., 3, S, S) float32, ImageNet-normalised."""
    x = (crops.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


class FaceCropDataset(Dataset):
    """Face crops around each record's landmark box, with HIH labels; augmented when ``augment``.

    Each item: ``image`` (3, S, S) float32; ``points`` (K, 2) crop pixels; ``u`` (K, 2) continuous heatmap
    coordinates; ``integer`` (K, H, H) label; ``centers`` (K, 2) long (decimal labels are made in the
    training step, relative to the centre it picks);
    ``matrix`` (2, 3) source -> crop affine; ``index`` the record's position.
    """

    def __init__(
        self,
        records: Sequence[FaceRecord],
        config: HIHConfig,
        scheme: LandmarkScheme,
        augment: bool = False,
        ranges: AugmentRanges | None = None,
        seed: int = 0,
    ):
        self.records = list(records)
        self.config = config
        self.scheme = scheme
        self.augment = augment
        self.ranges = ranges or AugmentRanges()
        self.geometry = Geometry(config.input_size, config.heatmap_size, config.decimal_size)
        self.flip_perm = scheme.flip_permutation()
        self.seed = seed
        self.epoch = 0
        self.images = [load_image(r.image_path) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Reseed augmentation so every epoch (and a resumed run) draws reproducible, fresh crops."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record, image = self.records[index], self.images[index]
        cfg = self.config
        box = landmark_box(record.points)
        points = record.points.astype(np.float64)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            M, flipped = random_crop_matrix(box, cfg.input_size, cfg.crop_scale, rng, self.ranges)
            crop = photometric(warp(image, M, cfg.input_size), rng, self.ranges)
            points = apply_affine(points, M)
            if flipped:
                points = points[self.flip_perm]
        else:
            M = crop_matrix(box[0], box[1], box[2] * cfg.crop_scale, cfg.input_size)
            crop = warp(image, M, cfg.input_size)
            points = apply_affine(points, M)
        labels = encode(points, self.geometry, cfg.integer_sigma, with_decimal=False)
        return {
            "image": to_tensor(crop),
            "points": torch.from_numpy(points.astype(np.float32)),
            "u": torch.from_numpy(to_heatmap_coords(points, self.geometry).astype(np.float32)),
            "integer": torch.from_numpy(labels["integer"]),
            "centers": torch.from_numpy(labels["centers"]),
            "matrix": torch.from_numpy(M.astype(np.float64)),
            "index": torch.tensor(index),
        }
