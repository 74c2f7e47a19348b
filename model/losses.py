"""Losses for HIH heatmaps. Logits are raw network outputs; targets come from ``model.codec``.

- Integer heatmaps: ``soft_ce`` (default) treats each (H, W) map as a classification over its pixels and
  takes the cross-entropy against the Gaussian label normalised to sum 1; ``mse`` is the paper's regression
  of the raw map onto the Gaussian with peak 1.
- Decimal heatmaps: the CSC distribution loss, KL(label || softmax(logits)) over the D x D bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTEGER_LOSSES = ("soft_ce", "mse")


def integer_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "soft_ce") -> torch.Tensor:
    """Mean over batch and points of the per-map loss. ``logits``/``target``: (B, K, H, W)."""
    if kind == "mse":
        return F.mse_loss(logits, target, reduction="none").flatten(2).sum(2).mean()
    if kind == "soft_ce":
        t = target.flatten(2)
        t = t / t.sum(2, keepdim=True).clamp_min(1e-12)
        return -(t * F.log_softmax(logits.flatten(2), dim=2)).sum(2).mean()
    raise ValueError(f"unknown integer loss {kind!r}; choose one of {', '.join(INTEGER_LOSSES)}")


def decimal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CSC: KL(target || softmax(logits)) over the D x D bins, mean over batch and points."""
    t = target.flatten(2)
    logp = F.log_softmax(logits.flatten(2), dim=2)
    return (t * (torch.log(t.clamp_min(1e-12)) - logp)).sum(2).mean()
