"""``backend.serve.run_server``: the backend under gunicorn, as a real HTTP server in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from backend.serve import gunicorn_options
from hih_settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_gunicorn_options_follow_the_settings() -> None:
    opts = gunicorn_options(Settings(host="127.0.0.1", port=9999, workers=3, log_level="INFO"))
    assert opts["bind"] == "127.0.0.1:9999" and opts["workers"] == 3
    assert opts["worker_class"] == "gthread" and opts["threads"] >= 2
    assert opts["preload_app"] is False  # the model loads in each worker, after the fork
    assert opts["timeout"] > 100  # Label Studio waits 100 s for /predict


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path / "ckpt", HIHNet(get_config("hih_tiny")), {"scheme": "300w_68", "version": "srv-1"}
    )


def test_run_server_serves_the_protocol_under_gunicorn(tiny_checkpoint: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HIH_WEIGHTS": str(tiny_checkpoint), "HOST": "127.0.0.1", "PORT": str(port),
           "WORKERS": "1", "THREADS": "1", "HIH_DEVICE": "cpu", "LOG_LEVEL": "WARNING"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from backend.serve import run_server; sys.exit(run_server())"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = requests.get(f"{url}/health", timeout=30)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert r.json()["model_version"] == "srv-1"
        config = (ROOT / "label_config.xml").read_text()
        r = requests.post(f"{url}/setup", json={"project": "1.1", "schema": config}, timeout=30)
        assert r.status_code == 200 and r.json() == {"model_version": "srv-1"}
        r = requests.post(
            f"{url}/predict", data=b"{oops", headers={"Content-Type": "application/json"}, timeout=30
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = requests.post(
            f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=30
        )
        assert r.status_code == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0
