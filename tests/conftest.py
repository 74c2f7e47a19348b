"""Shared pytest fixtures (keep generic: specific fixtures live in their test modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hih_settings import Settings


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The face data folder (HIH_DATA_DIR, default ../shared/data); skips the test where it is absent."""
    path = Settings.from_env().data_dir
    if not path.is_dir():
        pytest.skip(f"needs the face data at {path} (set HIH_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight toy model (hih_tiny, 300-W 68 points) saved as a real checkpoint folder."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("weights") / "tiny", HIHNet(get_config("hih_tiny")),
        {"scheme": "300w_68", "version": "test-tiny"},
    )


@pytest.fixture(scope="session")
def trained_weights() -> Path:
    """The shipped default model; skips where it has not been trained yet."""
    path = Settings().weights
    if not (path / "meta.json").is_file():
        pytest.skip(f"needs the trained default model at {path}")
    return path


@pytest.fixture(autouse=True)
def _reset_backend_hooks():
    """Tests that wire the backend to the loop (``backend.loop``) must not leak the hooks into others."""
    yield
    import sys

    loop = sys.modules.get("backend.loop")
    if loop is not None:
        loop.disconnect_fine_tuning()
    model_api = sys.modules.get("backend.model_api")
    if model_api is not None:
        model_api.set_training_hook(None)
        model_api.set_weights_resolver(None)


# ---------------------------------------------------------------- the learning loop: Redis and isolated settings
@pytest.fixture(scope="session")
def redis_url():
    """A real Redis for the session: $REDIS_URL when set, else a private redis-server (tests/finetune_helpers)."""
    from finetune_helpers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random hih_tiny checkpoint to fine-tune from (fast; far from good)."""
    from finetune_helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, base: Path):
    """Settings of an isolated deployment (own queue and key namespace, model dir); its keys are removed after.
    Modules that need other settings define their own ``settings`` fixture, which takes precedence."""
    from finetune_helpers import delete_namespace, make_settings

    s = make_settings(tmp_path, redis_url, base)
    yield s
    delete_namespace(redis_url, s.queue_name)
