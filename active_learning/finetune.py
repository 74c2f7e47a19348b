"""The fine-tuning recipe and its gate: annotated faces in, a checkpoint and a verdict out.

Pure of Redis and Label Studio: the RQ job (``active_learning.jobs``) and ``hih-assist finetune`` both call
``finetune``. Points are 0-based pixel-centre coordinates throughout (``model.readers.FaceRecord``).

Recipe: start from a checkpoint (the project's current version, or the base weights); hold out a stable share
of the faces (``split_holdout``: by image, chosen by a hash of the image's key, so a face held out once stays
held out as the project grows and is never trained on); fine-tune on the rest with the base recipe's losses
(AdamW, warm-up then cosine, BatchNorm statistics frozen so that small batches of a new domain do not
overwrite them) with light augmentation and no mirroring (a project's annotations may follow a convention
that is not mirror-symmetric, e.g. a consistent offset to one side, which a mirrored copy would teach the
other way), mixing into every epoch a fresh sample of 300-W training faces (when the data is there) against
forgetting; keep the weights of the last epoch.

Gate (``accepted``): the held-out NME of the new weights must not be worse than that of the starting weights
(``tolerance`` 0), and, when 300-W check faces are given, their NME must not collapse (at most
``collapse_ratio`` x the starting model's). The result carries both numbers before and after and the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_checkpoint, resolve_device, save_checkpoint
from model.dataset import FaceCropDataset
from model.evaluate import evaluate_crops
from model.losses import decimal_loss, integer_loss
from model.readers import FaceRecord, load_300w_folder
from model.schemes import get_scheme
from model.train import decimal_targets, seed_everything
from model.transforms import AugmentRanges

log = logging.getLogger(__name__)

__all__ = [
    "FinetuneDataError",
    "FinetuneOptions",
    "FinetuneResult",
    "check_records_300w",
    "finetune",
    "replay_records_300w",
    "split_holdout",
]


# Augmentation for fine-tuning: "full" is the base training's; "light" (default) jitters little, so that a
# few dozen faces teach their domain and annotation convention within minutes (on the YouTube Faces benchmark
# it adapts markedly further than "full" in the same time); mirroring is set apart (FinetuneOptions.flip).
AUGMENT = {
    "full": AugmentRanges(),
    "light": AugmentRanges(rotation_sigma=4.0, rotation_max=10.0, scale_min=0.96, scale_max=1.05, shift=0.03,
                           blur=0.05, occlusion=0.05, colour=0.3, grayscale=0.02),
}


class FinetuneDataError(ValueError):
    """Not enough (or unusable) faces to fine-tune and gate."""


@dataclass
class FinetuneOptions:
    """A fine-tuning recipe and its gate. ``lr`` is AdamW's peak after ``warmup_epochs``, then cosine.

    ``freeze_bn``: keep BatchNorm statistics; ``augment``: ``light`` or ``full`` (see ``AUGMENT``); ``flip``:
    mirroring probability; ``anchor``: L2-SP weight pulling the weights towards the starting ones;
    ``replay_faces``: how many 300-W faces the callers load for ``replay_records`` (see
    ``replay_records_300w``), ``replay_per_epoch``: how many of them each epoch mixes in (0: all);
    ``tolerance``: how much worse (fraction) the held-out NME may get; ``collapse_ratio``: the most the 300-W
    check NME may grow; ``eval_every``: held-out NME every that many epochs (0: only at the end).
    """

    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    holdout_fraction: float = 0.2
    min_holdout: int = 1
    min_train: int = 2
    freeze_bn: bool = True
    augment: str = "light"
    flip: float = 0.0
    anchor: float = 0.0
    replay_faces: int = 300
    replay_per_epoch: int = 70
    integer_loss: str = "soft_ce"
    decimal_weight: float = 1.0
    predicted_centre_prob: float = 0.5
    tolerance: float = 0.0
    collapse_ratio: float = 1.5
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    max_steps_per_epoch: int = 0
    eval_every: int = 1


@dataclass
class FinetuneResult:
    """What a fine-tune run did. NMEs are fractions of the inter-ocular distance (None: not measured)."""

    accepted: bool
    reason: str
    holdout_nme_before: float
    holdout_nme_after: float
    check_nme_before: float | None = None
    check_nme_after: float | None = None
    n_train: int = 0
    n_holdout: int = 0
    n_check: int = 0
    n_replay: int = 0
    epochs: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    init: str = ""
    checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"

        verdict = "ACCEPTED" if self.accepted else "REJECTED"
        text = f"{verdict}: {self.reason}; {self.n_holdout} held-out faces"
        if self.check_nme_before is not None:
            text += f"; 300-W check NME {pct(self.check_nme_before)} -> {pct(self.check_nme_after)}"
        return text + f"; {self.n_train} training faces, {self.epochs} epochs, {self.seconds:.0f} s"


# ------------------------------------------------------------------------------------------- data
def _group_key(record: FaceRecord) -> str:
    attrs = record.attributes or {}
    return str(attrs.get("group") or attrs.get("task_id") or record.image_path)


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_holdout(
    records: Sequence[FaceRecord], fraction: float = 0.2, min_holdout: int = 1, min_train: int = 2
) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """(train, holdout): whole images held out, the ``fraction`` whose key hashes lowest (stable across runs).

    The key is ``attributes["group"]`` or ``attributes["task_id"]`` when present, else the image path, so
    every face of one image lands on the same side. Raises ``FinetuneDataError`` when there are too few
    images.
    """
    groups: dict[str, list[FaceRecord]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    order = sorted(groups, key=lambda g: (_unit_hash(g), g))
    n_hold = max(min_holdout, int(round(fraction * len(order))))
    if len(order) - n_hold < 1 or len(order) < n_hold:
        raise FinetuneDataError(
            f"{len(records)} faces on {len(order)} images: need at least {min_holdout + 1} annotated images "
            f"({min_holdout} to hold out for the gate, the rest to train on)"
        )
    held = [r for g in order[:n_hold] for r in groups[g]]
    train = [r for g in order[n_hold:] for r in groups[g]]
    if len(train) < min_train:
        raise FinetuneDataError(
            f"only {len(train)} faces left to train on after holding out {len(held)}: "
            f"need at least {min_train} (annotate more faces)"
        )
    return train, held


def _spread(records: list[FaceRecord], n: int) -> list[FaceRecord]:
    if n <= 0 or n >= len(records):
        return list(records) if n > 0 else []
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


def check_records_300w(data_dir: str | Path | None, n: int = 32) -> list[FaceRecord]:
    """``n`` faces spread over ``<data_dir>/300w/test/lfpw`` for the collapse check ([] when absent)."""
    folder = Path(data_dir) / "300w" / "test" / "lfpw" if data_dir else None
    if folder is None or not folder.is_dir():
        return []
    return _spread(load_300w_folder(folder), n)


def replay_records_300w(data_dir: str | Path | None, n: int) -> list[FaceRecord]:
    """``n`` faces spread over ``<data_dir>/300w/train`` to mix into fine-tuning ([] when absent or n=0)."""
    folder = Path(data_dir) / "300w" / "train" if data_dir else None
    if n <= 0 or folder is None or not folder.is_dir():
        return []
    return _spread(load_300w_folder(folder), n)


# ------------------------------------------------------------------------------------------- training
def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index batches covering all ``n`` items; a last batch of one joins the previous (BatchNorm)."""
    perm = rng.permutation(n)
    size = max(1, min(batch_size, n))
    batches = [perm[i : i + size] for i in range(0, n, size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


def _collate(dataset: FaceCropDataset, indices: np.ndarray) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in ("image", "integer", "u", "centers")}


def _set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _evaluate(model, dataset: FaceCropDataset | None, scheme, device) -> float | None:
    if dataset is None or len(dataset) == 0:
        return None
    return float(evaluate_crops(model, dataset.records, scheme, device=device, dataset=dataset)["nme"])


def finetune(
    records: Sequence[FaceRecord],
    init: str | Path,
    out_dir: str | Path | None,
    options: FinetuneOptions | None = None,
    *,
    holdout: Sequence[FaceRecord] | None = None,
    check_records: Sequence[FaceRecord] = (),
    replay_records: Sequence[FaceRecord] = (),
    progress: Callable[[dict], None] | None = None,
    meta: dict | None = None,
) -> FinetuneResult:
    """Fine-tune the checkpoint ``init`` on ``records`` and gate the result.

    ``holdout`` None splits ``records`` with ``split_holdout``; otherwise ``records`` are all trained on and
    ``holdout`` gates. ``check_records``: 300-W faces for the collapse check (may be empty).
    ``replay_records``: faces mixed into training against forgetting. ``progress`` is called with
    ``{"stage", "epoch", "epochs", "loss", "holdout_nme", ...}`` before training and after every epoch.
    When the gate accepts and ``out_dir`` is given, the new weights are saved there as a checkpoint folder
    (``meta.json`` gets ``finetune``: this result, and ``meta``); nothing is written when it rejects.
    """
    opts = options or FinetuneOptions()
    t0 = time.time()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if holdout is None:
        train_records, held = split_holdout(records, opts.holdout_fraction, opts.min_holdout, opts.min_train)
    else:
        train_records, held = list(records), list(holdout)
        if len(train_records) < opts.min_train or not held:
            raise FinetuneDataError(f"need at least {opts.min_train} training faces and 1 held-out face")
    device = resolve_device(opts.device)
    scheme = get_scheme(train_records[0].points.shape[0])
    for r in [*train_records, *held]:
        if r.points.shape[0] != scheme.num_points:
            raise FinetuneDataError(
                f"{r.image_path}: {r.points.shape[0]} points, expected {scheme.num_points}"
            )
    seed_everything(opts.seed)
    model, init_meta = load_checkpoint(init, device=device, scheme=scheme.name)
    config = model.config
    replay = [r for r in replay_records if r.points.shape[0] == scheme.num_points]
    if opts.augment not in AUGMENT:
        raise ValueError(f"unknown augment {opts.augment!r}; choose one of {', '.join(AUGMENT)}")
    ranges = dataclasses.replace(AUGMENT[opts.augment], flip=opts.flip)
    train_set = FaceCropDataset([*train_records, *replay], config, scheme, augment=True, ranges=ranges,
                                seed=opts.seed)
    held_set = FaceCropDataset(held, config, scheme, augment=False)
    check_set = FaceCropDataset(list(check_records), config, scheme, augment=False) if check_records else None

    def report(**values) -> None:
        if progress is not None:
            try:
                progress(values)
            except Exception:  # noqa: BLE001 - progress reporting must never break training
                log.exception("progress callback failed")

    report(stage="evaluating", epoch=0, epochs=opts.epochs)
    hold_before = _evaluate(model, held_set, scheme, device)
    check_before = _evaluate(model, check_set, scheme, device)
    report(stage="training", epoch=0, epochs=opts.epochs, holdout_nme=hold_before, loss=None)

    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    # L2-SP: pull the weights towards the starting ones (less forgetting), instead of towards zero
    start = [p.detach().clone() for p in model.parameters()] if opts.anchor > 0 else None
    rng = np.random.default_rng(opts.seed)
    generator = torch.Generator().manual_seed(opts.seed)
    n_new = len(train_records)
    replay_idx = np.arange(n_new, len(train_set))
    per_epoch = min(opts.replay_per_epoch or len(replay_idx), len(replay_idx))

    def epoch_items() -> np.ndarray:
        """The new faces, and the replay faces of this epoch (all, or a fresh random subset)."""
        picked = replay_idx if per_epoch == len(replay_idx) else rng.choice(replay_idx, per_epoch, replace=False)
        return np.concatenate([np.arange(n_new), picked]).astype(int)

    n_batches = len(_batches(n_new + per_epoch, opts.batch_size, rng))
    steps_per_epoch = min(n_batches, opts.max_steps_per_epoch) if opts.max_steps_per_epoch else n_batches
    total = steps_per_epoch * opts.epochs
    warmup = int(opts.warmup_epochs * steps_per_epoch)
    history: list[dict] = []
    hold_after = hold_before
    diverged = False
    for epoch in range(opts.epochs):
        te = time.time()
        _set_train_mode(model, opts.freeze_bn)
        train_set.set_epoch(epoch)
        losses = []
        items = epoch_items()
        for s, pos in enumerate(_batches(len(items), opts.batch_size, rng)[:steps_per_epoch]):
            idx = items[pos]
            step = epoch * steps_per_epoch + s
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, opts.lr)
            batch = _collate(train_set, idx)
            integer_maps, feats = model.trunk(batch["image"].to(device))
            target = batch["integer"].to(device)
            l_int = sum(integer_loss(h, target, opts.integer_loss) for h in integer_maps)
            centres, dec_target = decimal_targets(
                batch["u"].to(device), batch["centers"].to(device), integer_maps[-1], config.decimal_size,
                config.decimal_sigma, opts.predicted_centre_prob, generator,
            )
            loss = l_int + opts.decimal_weight * decimal_loss(model.decimal(feats, integer_maps[-1], centres),
                                                              dec_target)
            if start is not None:
                loss = loss + opts.anchor * sum(((p - p0) ** 2).sum() for p, p0 in
                                                zip(model.parameters(), start, strict=True))
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if diverged:
            break
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                  "seconds": round(time.time() - te, 2)}
        if opts.eval_every and ((epoch + 1) % opts.eval_every == 0 or epoch + 1 == opts.epochs):
            hold_after = _evaluate(model, held_set, scheme, device)
            record["holdout_nme"] = hold_after
        history.append(record)
        log.info("fine-tune epoch %d/%d loss %.4f held-out NME %s", epoch + 1, opts.epochs,
                 record["loss"] or float("nan"),
                 f"{100 * record['holdout_nme']:.2f}%" if "holdout_nme" in record else "-")
        report(stage="training", epochs=opts.epochs, **record)

    if diverged:
        hold_after, check_after = math.inf, None
    else:
        if not history or "holdout_nme" not in history[-1]:
            hold_after = _evaluate(model, held_set, scheme, device)
        check_after = _evaluate(model, check_set, scheme, device)
    accepted, reason = _gate(opts, hold_before, hold_after, check_before, check_after, diverged)
    result = FinetuneResult(
        accepted=accepted, reason=reason, holdout_nme_before=hold_before, holdout_nme_after=hold_after,
        check_nme_before=check_before, check_nme_after=check_after, n_train=len(train_records),
        n_holdout=len(held), n_check=len(check_records), n_replay=len(replay), epochs=len(history),
        seconds=round(time.time() - t0, 1), device=str(device), init=str(init), history=history,
    )
    if accepted and out_dir is not None:
        dropped = ("config", "format", "created", "metrics")
        ckpt_meta = {k: v for k, v in init_meta.items() if k not in dropped}
        ckpt_meta.update(meta or {})
        ckpt_meta["parent"] = str(init_meta.get("version", init))
        ckpt_meta["finetune"] = {**result.to_dict(), "options": asdict(opts)}
        ckpt_meta["metrics"] = {"holdout_nme": hold_after, "check_nme": check_after}
        result.checkpoint = str(save_checkpoint(out_dir, model.cpu(), ckpt_meta))
    report(stage="done", epoch=len(history), epochs=opts.epochs, holdout_nme=hold_after,
           accepted=accepted, reason=reason)
    log.info("%s", result.summary())
    return result


def _gate(opts: FinetuneOptions, hold_before: float, hold_after: float, check_before: float | None,
          check_after: float | None, diverged: bool) -> tuple[bool, str]:
    if diverged:
        return False, "training diverged (non-finite loss)"
    limit = hold_before * (1.0 + opts.tolerance)
    if not hold_after <= limit:
        return False, (f"held-out NME got worse: {100 * hold_before:.2f}% -> {100 * hold_after:.2f}% "
                       "(the current model stays)")
    if check_before is not None and check_after is not None:
        ceiling = check_before * opts.collapse_ratio
        if not check_after <= ceiling:
            return False, (f"300-W check NME collapsed: {100 * check_before:.2f}% -> "
                           f"{100 * check_after:.2f}% (over {opts.collapse_ratio:g}x; "
                           "the current model stays)")
    gain = (hold_before - hold_after) / hold_before if hold_before > 0 else 0.0
    return True, (f"held-out NME {100 * hold_before:.2f}% -> {100 * hold_after:.2f}% "
                  f"({100 * gain:.1f}% lower)")
