"""Every setting of hih-assist, read from environment variables, in one place.

Each field documents its variable and default. Read them with ``Settings.from_env()``;
nothing else in the project reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
PACKAGED_WEIGHTS = PROJECT_ROOT / "weights" / "hih_cpu_300w"


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration. Field metadata ``env`` names the variable; ``doc`` says what it does."""

    data_dir: Path = field(
        default=PROJECT_ROOT.parent / "shared" / "data",
        metadata={"env": "HIH_DATA_DIR", "doc": "Face data for training, tests and benchmarks (read only)."},
    )
    weights: Path = field(
        default=PACKAGED_WEIGHTS,
        metadata={"env": "HIH_WEIGHTS", "doc": "Base model checkpoint (safetensors + JSON) served by default."},
    )
    device: str = field(
        default="auto", metadata={"env": "HIH_DEVICE", "doc": "auto, cpu or cuda (auto: cuda when present)."}
    )
    detector: str = field(
        default="auto",
        metadata={"env": "HIH_DETECTOR", "doc": "Face detector: auto, haar, or yunet:/path/to/model.onnx."},
    )
    label_studio_url: str = field(
        default="http://localhost:8080",
        metadata={"env": "LABEL_STUDIO_URL", "doc": "Label Studio base URL, for images and the API."},
    )
    label_studio_api_key: str = field(
        default="",
        metadata={
            "env": "LABEL_STUDIO_API_KEY",
            "doc": "Label Studio legacy token or personal access token (JWT refresh token).",
        },
    )
    model_dir: Path = field(
        default=PROJECT_ROOT / "runs" / "models",
        metadata={"env": "MODEL_DIR", "doc": "Where fine-tuned model versions are published, per project."},
    )
    redis_url: str = field(
        default="",
        metadata={"env": "REDIS_URL", "doc": "Redis for the job queue; empty: `serve` starts an embedded one."},
    )
    basic_auth_user: str = field(
        default="", metadata={"env": "BASIC_AUTH_USER", "doc": "Basic-auth user for the backend (empty: off)."}
    )
    basic_auth_pass: str = field(
        default="", metadata={"env": "BASIC_AUTH_PASS", "doc": "Basic-auth password for the backend."}
    )
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "doc": "Python logging level."})
    host: str = field(default="0.0.0.0", metadata={"env": "HOST", "doc": "Address the backend listens on."})
    port: int = field(default=9090, metadata={"env": "PORT", "doc": "Port the backend listens on."})
    workers: int = field(default=1, metadata={"env": "WORKERS", "doc": "gunicorn worker processes."})
    threads: int = field(default=2, metadata={"env": "THREADS", "doc": "Torch threads per process."})
    train_after: int = field(
        default=10,
        metadata={"env": "TRAIN_AFTER", "doc": "New annotations that trigger a fine-tune job."},
    )
    allowed_hosts: str = field(
        default="",
        metadata={
            "env": "ALLOWED_IMAGE_HOSTS",
            "doc": "Comma-separated extra hosts images may be fetched from (Label Studio's host always is).",
        },
    )
    max_image_bytes: int = field(
        default=50 * 1024 * 1024,
        metadata={"env": "MAX_IMAGE_BYTES", "doc": "Largest image download accepted, in bytes."},
    )
    queue_name: str = field(
        default="hih-assist",
        metadata={
            "env": "HIH_QUEUE",
            "doc": "RQ queue name; also the prefix of every Redis key hih-assist writes (versions, counters).",
        },
    )
    embedded_redis_db: Path = field(
        default=PROJECT_ROOT / "runs" / "redis" / "hih-assist.rdb",
        metadata={"env": "HIH_EMBEDDED_REDIS", "doc": "Database file of the embedded Redis (REDIS_URL unset)."},
    )
    finetune_epochs: int = field(
        default=40, metadata={"env": "FINETUNE_EPOCHS", "doc": "Epochs of a background fine-tune job."}
    )
    finetune_lr: float = field(
        default=1e-3, metadata={"env": "FINETUNE_LR", "doc": "Peak learning rate of a fine-tune job."}
    )
    finetune_replay: int = field(
        default=300,
        metadata={
            "env": "FINETUNE_REPLAY",
            "doc": "300-W training faces (HIH_DATA_DIR, if present) sampled into fine-tuning, 70 an epoch.",
        },
    )
    holdout_fraction: float = field(
        default=0.2,
        metadata={
            "env": "HOLDOUT_FRACTION",
            "doc": "Share of annotated faces held out to gate a fine-tuned model (never trained on).",
        },
    )
    finetune_timeout: int = field(
        default=3600, metadata={"env": "FINETUNE_TIMEOUT", "doc": "Seconds before a fine-tune job is killed."}
    )
    finetune_lock_ttl: int = field(
        default=60,
        metadata={
            "env": "FINETUNE_LOCK_TTL",
            "doc": "Seconds a killed fine-tune job keeps its project locked (a live job renews the lock).",
        },
    )

    @classmethod
    def from_env(cls) -> Settings:
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            if f.type in ("Path", Path):
                values[f.name] = Path(raw).expanduser()
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)

    @classmethod
    def table(cls) -> list[tuple[str, str, str]]:
        """(variable, default, doc) rows, for the README and `hih-assist config`."""
        rows = []
        for f in fields(cls):
            default = f.default
            if isinstance(default, Path):
                try:
                    default = default.relative_to(PROJECT_ROOT)
                except ValueError:
                    default = os.path.relpath(default, PROJECT_ROOT)
            rows.append((f.metadata["env"], str(default), f.metadata["doc"]))
        return rows
