"""The HIH codec: sub-pixel points <-> integer and decimal heatmap labels, and back.

Coordinate conventions (every function here):
- Input-crop points are 0-based pixel-centre coordinates: the centre of the crop's top-left pixel is (0, 0).
- An integer-heatmap pixel (col i, row j) covers the input area whose centre is
  ((i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5), ``stride = input_size / heatmap_size``.
  A point maps to continuous heatmap coordinates ``u = (x + 0.5) / stride - 0.5`` (pixel-centre, 0-based).
- Integer index ``n = floor(u + 0.5)`` (nearest pixel centre, rounding half up, exact for negative
  values too: the released code's truncation toward zero put the peak one pixel off near the border).
  Offset ``o = u - n`` lies in [-0.5, 0.5).
- Decimal grid: D x D bins subdividing pixel n; bin b covers offsets [b/D - 0.5, (b+1)/D - 0.5), its centre
  is ``(b + 0.5) / D - 0.5``. Every offset falls on the grid (the released code let offsets that round to D
  fall off it).
- Points are clipped to the heatmap's extent [-0.5, H - 0.5) before encoding.

Labels: the integer label is a Gaussian (sigma in heatmap pixels) centred on pixel n; the decimal label is a
separable Gaussian (sigma in bins) over the D x D bin centres, normalised to sum 1 (a real distribution, not
the released code's nearly flat softmax of a Gaussian), whose centre is shifted so that the label's *mean*
equals the offset exactly: a Gaussian truncated at the grid's edge would otherwise pull the expectation decode
towards the middle. Offsets outside the outermost bin centres cannot be a mean of the bins; they get the
nearest reachable mean, so the codec's round-trip error is at most half a bin, ``stride / (2 D)`` input
pixels (0.25 px for the 128/32/8 and 256/64/8 configurations), and zero for offsets inside the bin centres.

Decodes: ``"hih"`` = argmax integer pixel + expectation of the decimal distribution (default, best);
``"argmax"`` = the paper's argmax of both; ``"integer"`` = the integer argmax alone (quantised baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DECODES = ("hih", "argmax", "integer")


@dataclass(frozen=True)
class Geometry:
    """Sizes that the codec needs: square input and heatmap sides in pixels, decimal grid side in bins."""

    input_size: int
    heatmap_size: int
    decimal_size: int

    @property
    def stride(self) -> float:
        return self.input_size / self.heatmap_size


def to_heatmap_coords(points: np.ndarray, geo: Geometry) -> np.ndarray:
    """Input-crop pixel-centre coordinates -> continuous heatmap pixel-centre coordinates."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / geo.stride - 0.5


def from_heatmap_coords(u: np.ndarray, geo: Geometry) -> np.ndarray:
    """Continuous heatmap coordinates -> input-crop pixel-centre coordinates (inverse of the above)."""
    return (np.asarray(u, dtype=np.float64) + 0.5) * geo.stride - 0.5


def split(points: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Points (..., 2) in input pixels -> (integer index n (..., 2) int64 (col, row), offset o in [-0.5, 0.5))."""
    H = geo.heatmap_size
    u = np.clip(to_heatmap_coords(points, geo), -0.5, H - 0.5 - 1e-6)
    n = np.floor(u + 0.5).astype(np.int64)
    n = np.clip(n, 0, H - 1)
    return n, u - n


def gaussian_2d(size: int, centre: np.ndarray, sigma: float) -> np.ndarray:
    """(..., size, size) Gaussians exp(-d^2 / 2 sigma^2) centred at ``centre`` (..., 2) = (col, row)."""
    grid = np.arange(size, dtype=np.float64)
    dx = grid[None, :] - centre[..., 0, None, None]
    dy = grid[:, None] - centre[..., 1, None, None]
    return np.exp(-(dx**2 + dy**2) / (2.0 * sigma**2))


def encode(
    points: np.ndarray, geo: Geometry, integer_sigma: float = 1.5, decimal_sigma: float = 1.0,
    with_decimal: bool = True,
) -> dict[str, np.ndarray]:
    """Encode (K, 2) input-crop points into HIH labels.

    Returns ``integer`` (K, H, H) float32 Gaussians with peak 1 at pixel n, ``decimal`` (K, D, D) float32
    distributions summing to 1 (left out when ``with_decimal`` is False), ``centers`` (K, 2) int64
    (col, row) integer pixels, and ``offsets`` (K, 2).
    """
    n, o = split(points, geo)
    integer = gaussian_2d(geo.heatmap_size, n.astype(np.float64), integer_sigma)
    labels = {"integer": integer.astype(np.float32), "centers": n, "offsets": o.astype(np.float32)}
    if with_decimal:
        labels["decimal"] = decimal_label(torch.from_numpy(o), geo.decimal_size, decimal_sigma).numpy()
    return labels


def _gaussian_1d(mu: torch.Tensor, D: int, sigma: float) -> torch.Tensor:
    """(..., D) normalised Gaussian weights over bin centres 0..D-1 (bin units), centred at ``mu``."""
    grid = torch.arange(D, dtype=mu.dtype, device=mu.device)
    w = torch.exp(-((grid - mu[..., None]) ** 2) / (2.0 * sigma**2))
    return w / w.sum(-1, keepdim=True)


def _mean_matched_1d(target: torch.Tensor, D: int, sigma: float, iterations: int = 48) -> torch.Tensor:
    """(..., D) Gaussian-shaped distribution over bins 0..D-1 whose mean is ``target`` (bin units).

    Targets outside [0, D-1] are clamped there. Found by bisection on the Gaussian's centre, since the mean of
    the truncated Gaussian grows monotonically with it.
    """
    grid = torch.arange(D, dtype=target.dtype, device=target.device)
    target = target.clamp(0.0, D - 1.0)
    lo = torch.full_like(target, -8.0 * sigma - 1.0)
    hi = torch.full_like(target, D + 8.0 * sigma)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = (_gaussian_1d(mid, D, sigma) * grid).sum(-1) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return _gaussian_1d((lo + hi) / 2, D, sigma)


def decimal_label(offsets: torch.Tensor, D: int, sigma: float = 1.0) -> torch.Tensor:
    """Offsets (..., 2) = (dx, dy) in heatmap pixels, in [-0.5, 0.5) -> (..., D, D) label distributions.

    Rows index dy, columns dx. The label's mean bin position equals the offset wherever a mean can (see the
    module docstring), so the expectation decode of a perfect prediction returns the point exactly.
    """
    pos = (offsets.double() + 0.5) * D - 0.5  # continuous bin coordinates, bin centres at 0..D-1
    px = _mean_matched_1d(pos[..., 0], D, sigma)
    py = _mean_matched_1d(pos[..., 1], D, sigma)
    return (py[..., :, None] * px[..., None, :]).float()


@dataclass
class Decoded:
    """Decoded landmarks for a batch: all arrays have leading shape (B, K).

    ``points``: input-crop pixel-centre coordinates (B, K, 2). ``integer_peak``: softmax probability of the
    argmax integer pixel (0-1). ``decimal_entropy``: entropy of the decimal distribution / log(D*D) (0-1).
    ``decimal_std``: standard deviation of the decimal distribution in input pixels (RMS of x and y).
    ``decimal_peak``: the largest decimal bin probability. ``integer_std``: standard deviation of the
    softmax of the integer map around its mean, in input pixels (RMS of x and y): large when the map has
    several peaks or a broad one.
    """

    points: np.ndarray
    integer_peak: np.ndarray
    decimal_entropy: np.ndarray
    decimal_std: np.ndarray
    decimal_peak: np.ndarray
    integer_std: np.ndarray


def decode(
    integer_logits: torch.Tensor, decimal_logits: torch.Tensor, geo: Geometry, method: str = "hih"
) -> Decoded:
    """Decode network outputs (B, K, H, H) and (B, K, D, D) into sub-pixel input-crop points.

    The decimal logits must belong to the argmax pixel of ``integer_logits`` (as the network's forward
    computes them when it is given no centres). Runs on any device; results come back as numpy.
    """
    if method not in DECODES:
        raise ValueError(f"unknown decode {method!r}; choose one of {', '.join(DECODES)}")
    B, K, H, W = integer_logits.shape
    D = decimal_logits.shape[-1]
    flat = integer_logits.detach().float().flatten(2)
    prob = torch.softmax(flat, dim=2)
    peak, idx = prob.max(dim=2)
    n = torch.stack([idx % W, idx // W], dim=2).double()
    cols = torch.arange(W, dtype=torch.float64, device=prob.device).repeat(H)
    rows = torch.arange(H, dtype=torch.float64, device=prob.device).repeat_interleave(W)
    p64 = prob.double()
    mx, my = (p64 * cols).sum(2), (p64 * rows).sum(2)
    ivar = (p64 * (cols - mx[..., None]) ** 2).sum(2) + (p64 * (rows - my[..., None]) ** 2).sum(2)

    dprob = torch.softmax(decimal_logits.detach().float().flatten(2), dim=2).double()  # (B, K, D*D)
    centres = (torch.arange(D, dtype=torch.float64, device=dprob.device) + 0.5) / D - 0.5
    bx = centres.repeat(D)  # column offset of each flattened bin
    by = centres.repeat_interleave(D)
    ex = (dprob * bx).sum(2)
    ey = (dprob * by).sum(2)
    var = (dprob * (bx - ex[..., None]) ** 2).sum(2) + (dprob * (by - ey[..., None]) ** 2).sum(2)
    entropy = -(dprob * torch.log(dprob.clamp_min(1e-12))).sum(2) / np.log(D * D)
    dpeak, didx = dprob.max(dim=2)

    if method == "hih":
        offset = torch.stack([ex, ey], dim=2)
    elif method == "argmax":
        offset = torch.stack([bx[didx], by[didx]], dim=2)
    else:
        offset = torch.zeros_like(n)
    geo_stride = geo.input_size / H
    u = (n + offset).cpu().numpy()
    points = (u + 0.5) * geo_stride - 0.5
    return Decoded(
        points=points,
        integer_peak=peak.cpu().numpy(),
        decimal_entropy=entropy.float().cpu().numpy(),
        decimal_std=(torch.sqrt(var / 2.0) * geo_stride).float().cpu().numpy(),
        decimal_peak=dpeak.float().cpu().numpy(),
        integer_std=(torch.sqrt(ivar / 2.0) * geo_stride).float().cpu().numpy(),
    )


def labels_to_logits(labels: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn encoded labels into logits whose decode reproduces them (for round-trip tests).

    Integer: log of the Gaussian (argmax at n). Decimal: log of the label distribution, so the softmax is
    the label itself and the expectation decode returns its mean.
    """
    integer = torch.from_numpy(np.log(np.maximum(labels["integer"], 1e-30)))[None]
    decimal = torch.from_numpy(np.log(np.maximum(labels["decimal"], 1e-30)))[None]
    return integer, decimal
