"""Training loop for HIH: progress bar, validation each epoch, best/last checkpoints, resumable, seeded.

Output folder layout: ``last/`` and ``best/`` (checkpoints: model.safetensors + meta.json), ``state/``
(optimizer and progress, safetensors + JSON, for ``--resume``), ``history.json`` (per-epoch metrics).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_checkpoint, resolve_device, save_checkpoint
from model.codec import decimal_label
from model.config import get_config
from model.dataset import FaceCropDataset
from model.evaluate import evaluate_crops
from model.losses import decimal_loss, integer_loss
from model.network import HIHNet, argmax_2d
from model.readers import FaceRecord
from model.schemes import get_scheme

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """A training recipe. Learning rate is AdamW's peak, reached after ``warmup_epochs``, then cosine."""

    config: str = "hih_cpu"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    integer_loss: str = "soft_ce"
    decimal_weight: float = 1.0
    predicted_centre_prob: float = 0.5
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    threads: int = 0
    max_steps_per_epoch: int = 0
    augment: bool = True
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decimal_targets(
    u: torch.Tensor, gt_centres: torch.Tensor, last_logits: torch.Tensor, D: int, sigma: float, prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres for the decimal head and its labels.

    With probability ``prob`` per point, the centre is the network's own argmax where that lies within one
    pixel of the ground truth (so the head learns to recover from near-boundary argmax errors, as at
    inference); else the ground-truth pixel. The label is the offset ``u - centre`` clamped to [-0.5, 0.5).
    """
    pred = argmax_2d(last_logits.detach())
    near = (pred - gt_centres).abs().amax(-1, keepdim=True) <= 1
    use = (torch.rand(near.shape, generator=generator) < prob).to(near.device) & near
    centres = torch.where(use, pred, gt_centres)
    offsets = (u - centres.to(u.dtype)).clamp(-0.5, 0.5 - 1e-4)
    return centres, decimal_label(offsets, D, sigma).to(u.device)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_state(folder: Path, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors.tmp"))
    (folder / "optimizer.safetensors.tmp").replace(folder / "optimizer.safetensors")
    payload = {"param_groups": sd["param_groups"], **progress}
    (folder / "progress.json.tmp").write_text(json.dumps(payload, indent=2))
    (folder / "progress.json.tmp").replace(folder / "progress.json")


def _load_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    payload = json.loads((folder / "progress.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": payload.pop("param_groups")})
    return payload


def train(
    train_records: list[FaceRecord],
    val_records: list[FaceRecord],
    out_dir: str | Path,
    options: TrainOptions,
    init: str | Path | None = None,
    resume: bool = False,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train (or fine-tune from ``init``) and return the final summary. Resumes from ``out_dir/state``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    scheme = get_scheme(train_records[0].points.shape[0])
    seed_everything(options.seed)
    if init is not None:
        model, init_meta = load_checkpoint(init, scheme=scheme.name)
        config = model.config
    else:
        config = get_config(options.config, scheme.num_points)
        model = HIHNet(config)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)

    start_epoch, history, best = 0, [], math.inf
    state_dir = out / "state"
    if resume and (state_dir / "progress.json").is_file():
        resumed, _ = load_checkpoint(out / "last")
        model.load_state_dict(resumed.state_dict())
        saved = _load_state(state_dir, optimizer)
        start_epoch, history, best = saved["epoch"], saved["history"], saved["best"]
        log.info("resumed from %s at epoch %d (best val NME %.4f)", out, start_epoch, best)

    t_load = time.time()
    train_set = FaceCropDataset(train_records, config, scheme, augment=options.augment, seed=options.seed)
    val_set = FaceCropDataset(val_records, config, scheme, augment=False) if val_records else None
    log.info("loaded %d training and %d validation faces in %.1f s", len(train_set),
             len(val_set) if val_set else 0, time.time() - t_load)

    steps_per_epoch = len(train_set) // options.batch_size
    if options.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, options.max_steps_per_epoch)
    total_steps = steps_per_epoch * options.epochs
    warmup = int(options.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(options.seed)
    base_meta = {
        "scheme": scheme.name,
        "training": {
            "train_faces": len(train_records), "val_faces": len(val_records),
            "options": asdict(options), "init": str(init) if init else None,
        },
        **(meta or {}),
    }

    for epoch in range(start_epoch, options.epochs):
        t0 = time.time()
        model.train()
        train_set.set_epoch(epoch)
        g = torch.Generator().manual_seed(options.seed * 1000 + epoch)
        loader = DataLoader(
            train_set, batch_size=options.batch_size, shuffle=True, drop_last=True, generator=g,
            num_workers=options.workers, persistent_workers=False,
        )
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{options.epochs}", disable=not progress,
                   leave=False)
        sums = {"loss": 0.0, "integer": 0.0, "decimal": 0.0}
        for step_in_epoch, batch in enumerate(loader):
            if step_in_epoch >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + step_in_epoch
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup, options.lr)
            images = batch["image"].to(device)
            integer_maps, feats = model.trunk(images)
            l_int = sum(integer_loss(h, batch["integer"].to(device), options.integer_loss) for h in integer_maps)
            centres, dec_target = decimal_targets(
                batch["u"].to(device), batch["centers"].to(device), integer_maps[-1], config.decimal_size,
                config.decimal_sigma, options.predicted_centre_prob, generator,
            )
            dec_logits = model.decimal(feats, integer_maps[-1], centres)
            l_dec = decimal_loss(dec_logits, dec_target)
            loss = l_int + options.decimal_weight * l_dec
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in (("loss", loss), ("integer", l_int), ("decimal", l_dec)):
                sums[k] += float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / (step_in_epoch + 1):.3f}")
        bar.close()
        record = {k: v / max(1, steps_per_epoch) for k, v in sums.items()}
        record.update(epoch=epoch + 1, seconds=round(time.time() - t0, 1), lr=optimizer.param_groups[0]["lr"])
        if val_set is not None:
            metrics = evaluate_crops(model, val_set.records, scheme, device=device, dataset=val_set)
            record.update(val_nme=metrics["nme"], val_fr=metrics["fr"], val_auc=metrics["auc"])
        history.append(record)
        msg = f"epoch {epoch + 1}/{options.epochs} loss {record['loss']:.4f} ({record['seconds']:.0f} s)"
        if "val_nme" in record:
            msg += f" val NME {100 * record['val_nme']:.2f}% FR {100 * record['val_fr']:.1f}%"
        if progress:
            print(msg, flush=True)
        log.info(msg)
        ckpt_meta = {**base_meta, "epoch": epoch + 1, "metrics": {k: v for k, v in record.items()
                                                                   if k.startswith("val_")}}
        save_checkpoint(out / "last", model, {**ckpt_meta, "version": out.name + "-last"})
        score = record.get("val_nme", -epoch)
        if score < best:
            best = score
            save_checkpoint(out / "best", model, {**ckpt_meta, "version": out.name + "-best"})
        _save_state(state_dir, optimizer, {"epoch": epoch + 1, "history": history, "best": best})
        (out / "history.json").write_text(json.dumps(history, indent=2))
    return {"epochs": options.epochs, "best_val_nme": best, "history": history, "out": str(out)}
