"""The HIH network: a stacked hourglass with an integer heatmap per stack and a decimal head.

Shapes: input (B, 3, S, S) ImageNet-normalised RGB, S = ``input_size``. Outputs:
``integer``: list over stacks of (B, K, H, H) logits, H = ``heatmap_size``;
``decimal``: (B, K, D, D) logits over the D x D sub-pixel bins of the integer-heatmap pixel given by
``centers`` (B, K, 2) integer (col, row) heatmap indices.

The decimal head is local ("heatmap in heatmap"): for each landmark it reads a window of the last stack's
features and of that landmark's integer heatmap around the integer pixel, and classifies the sub-pixel
position inside that pixel. During training the centre is the ground-truth integer pixel; at inference it
is the argmax of the last integer heatmap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import HIHConfig


class Residual(nn.Module):
    """Pre-activation bottleneck residual block (the hourglass paper's)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = max(c_out // 2, 8)
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, c_out, 1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class Hourglass(nn.Module):
    """One hourglass of ``depth`` levels, each halving the resolution."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.up = Residual(channels, channels)
        self.down = Residual(channels, channels)
        self.inner = Hourglass(depth - 1, channels) if depth > 1 else Residual(channels, channels)
        self.out = Residual(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.up(x)
        y = self.down(F.max_pool2d(x, 2))
        y = self.out(self.inner(y))
        return skip + F.interpolate(y, scale_factor=2, mode="nearest")


class DecimalHead(nn.Module):
    """Classifies each landmark's sub-pixel bin from a window around its integer-heatmap pixel."""

    def __init__(self, channels: int, num_points: int, window: int, hidden: int, decimal_size: int):
        super().__init__()
        self.window = window
        self.reduce = nn.Sequential(nn.Conv2d(channels, 16, 1), nn.ReLU(inplace=True))
        n_in = (16 + 1) * window * window
        self.mlp = nn.Sequential(
            nn.Linear(n_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, decimal_size * decimal_size)
        )
        self.point_bias = nn.Parameter(torch.zeros(num_points, decimal_size * decimal_size))
        self.decimal_size = decimal_size

    def forward(self, features: torch.Tensor, heatmaps: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        B, K, H, W = heatmaps.shape
        r = self.window // 2
        feats = F.pad(self.reduce(features), (r, r, r, r))
        hms = F.pad(heatmaps, (r, r, r, r))
        Wp = W + 2 * r
        offs = torch.arange(-r, r + 1, device=centers.device)
        cols = centers[..., 0].clamp(0, W - 1)[..., None, None] + r + offs[None, None, None, :]
        rows = centers[..., 1].clamp(0, H - 1)[..., None, None] + r + offs[None, None, :, None]
        flat = (rows * Wp + cols).reshape(B, K * self.window * self.window)  # (B, K*w*w)
        C = feats.shape[1]
        f = torch.gather(feats.flatten(2), 2, flat[:, None, :].expand(B, C, -1))
        f = f.reshape(B, C, K, -1).permute(0, 2, 1, 3).reshape(B, K, -1)
        h = torch.gather(hms.flatten(2), 2, flat.reshape(B, K, -1))
        logits = self.mlp(torch.cat([f, h], dim=2)) + self.point_bias
        return logits.reshape(B, K, self.decimal_size, self.decimal_size)


class HIHNet(nn.Module):
    """Stacked hourglass with integer heatmaps on every stack and a local decimal head after the last."""

    def __init__(self, config: HIHConfig):
        super().__init__()
        self.config = config
        c, k = config.channels, config.num_points
        down = config.input_size // config.heatmap_size
        if down not in (2, 4) or config.input_size % config.heatmap_size:
            raise ValueError("input_size / heatmap_size must be 2 or 4")
        stem: list[nn.Module] = [
            nn.Conv2d(3, c // 2, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True),
            Residual(c // 2, c),
        ]
        if down == 4:
            stem.append(nn.MaxPool2d(2))
        stem.append(Residual(c, c))
        self.stem = nn.Sequential(*stem)
        self.hourglasses = nn.ModuleList(Hourglass(config.depth, c) for _ in range(config.num_stacks))
        self.features = nn.ModuleList(
            nn.Sequential(Residual(c, c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(True))
            for _ in range(config.num_stacks)
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, k, 1) for _ in range(config.num_stacks))
        self.merge_features = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(config.num_stacks - 1))
        self.merge_heatmaps = nn.ModuleList(nn.Conv2d(k, c, 1) for _ in range(config.num_stacks - 1))
        self.decimal = DecimalHead(c, k, config.decimal_window, config.decimal_hidden, config.decimal_size)

    def trunk(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Integer heatmap logits of every stack and the last stack's features."""
        y = self.stem(x)
        integer: list[torch.Tensor] = []
        feats = y
        for i, hourglass in enumerate(self.hourglasses):
            feats = self.features[i](hourglass(y))
            heat = self.heads[i](feats)
            integer.append(heat)
            if i < len(self.hourglasses) - 1:
                y = y + self.merge_features[i](feats) + self.merge_heatmaps[i](heat)
        return integer, feats

    def forward(self, x: torch.Tensor, centers: torch.Tensor | None = None) -> dict[str, object]:
        """Run the network. ``centers``: (B, K, 2) long (col, row) for the decimal head; None = argmax."""
        integer, feats = self.trunk(x)
        if centers is None:
            centers = argmax_2d(integer[-1])
        decimal = self.decimal(feats, integer[-1], centers)
        return {"integer": integer, "decimal": decimal, "centers": centers}


def argmax_2d(heatmaps: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, 2) long (col, row) of each map's maximum."""
    B, K, H, W = heatmaps.shape
    idx = heatmaps.flatten(2).argmax(dim=2)
    return torch.stack([idx % W, idx // W], dim=2)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
