"""Checkpoints: safetensors weights plus a JSON metadata file, never pickle.

A checkpoint is a folder holding ``model.safetensors`` and ``meta.json``. ``meta.json`` carries the
network configuration, the landmark scheme, the version string, the training data and the measured metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import HIHConfig
from model.network import HIHNet

FORMAT = "hih-assist/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, of another format or of another landmark scheme."""


def save_checkpoint(path: str | Path, model: HIHNet, meta: dict) -> Path:
    """Write ``model`` and ``meta`` to the folder ``path`` atomically (temp folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
        "config": model.config.to_dict(),
    }
    meta.setdefault("version", path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in (tmp / WEIGHTS_FILE, tmp / META_FILE):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        f.chmod(0o644)
    tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints are read by other users (containers, workers)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(path)
    return path


def read_meta(path: str | Path) -> dict:
    """The metadata of the checkpoint folder ``path`` (or of the folder holding a given weights file)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"not a checkpoint: {folder} has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", scheme: str | None = None
) -> tuple[HIHNet, dict]:
    """Load a checkpoint folder into an ``HIHNet`` in eval mode; check its scheme when ``scheme`` is given."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    meta = read_meta(folder)
    if scheme is not None and meta.get("scheme") != scheme:
        raise CheckpointError(f"{folder} is a {meta.get('scheme')} model, expected {scheme}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    model = HIHNet(HIHConfig.from_dict(meta["config"]))
    try:
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a corrupt file
        raise CheckpointError(f"cannot load weights {weights}: {exc}") from exc
    return model.to(device).eval(), meta


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``/``cuda`` as given (cuda must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)
