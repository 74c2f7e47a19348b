"""The fine-tune worker: an RQ worker on hih-assist's queue (``hih-assist worker``).

Each job runs in a forked work horse, so the memory of a training run is returned when it ends, and a job
that is killed takes nothing else down. RQ puts the horse in its own process group; a fine-tune horse also
asks the kernel to kill it when its worker dies (Linux ``PR_SET_PDEATHSIG``), so a killed worker never
leaves an orphan training on that may publish behind RQ's back. The worker process itself never imports
torch nor touches CUDA (a CUDA context does not survive a fork): the job picks its device from
``HIH_DEVICE`` (``auto``: the GPU when present, else the CPU) inside the horse. Where ``os.fork`` is
missing, jobs run in the worker process.

``python -m active_learning.worker [--burst]`` runs one from the environment's settings, as
``hih-assist worker`` does; ``spawn_worker`` starts one beside a backend (the embedded set-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from hih_settings import Settings

from .queue import connection_url, get_connection, get_queue

log = logging.getLogger(__name__)

__all__ = ["run_worker", "spawn_worker", "worker_pid"]

_WORKER_PID: int | None = None  # set in the worker process; its forked work horses inherit it


def worker_pid() -> int | None:
    """The pid of the ``run_worker`` process this process belongs to (itself, or its work horse's parent)."""
    return _WORKER_PID


def run_worker(settings: Settings | None = None, burst: bool = False, name: str | None = None) -> bool:
    """Process fine-tune jobs until stopped (``burst``: until the queue is empty). True if any job ran."""
    from rq import SimpleWorker, Worker

    global _WORKER_PID
    settings = settings if settings is not None else Settings.from_env()
    _WORKER_PID = os.getpid()
    conn = get_connection(settings)
    conn.ping()
    queue = get_queue(settings, conn)
    worker_class = Worker if hasattr(os, "fork") else SimpleWorker
    worker = worker_class([queue], connection=conn, name=name)
    where = settings.redis_url or f"embedded Redis ({connection_url(settings)})"
    log.info("worker %s on queue %s at %s; jobs use device %s", worker.name, queue.name, where,
             settings.device)
    return worker.work(burst=burst, logging_level=settings.log_level.upper())


def spawn_worker(settings: Settings | None = None, burst: bool = False, log_file: str | Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m active_learning.worker`` as a child process (same settings via the environment).

    With the embedded Redis, call ``queue.get_connection(settings)`` first in the parent so that both share
    the server it starts. The caller owns the process (terminate it on shutdown)."""
    settings = settings if settings is not None else Settings.from_env()
    cmd = [sys.executable, "-m", "active_learning.worker"] + (["--burst"] if burst else [])
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            cmd, cwd=str(Path(__file__).resolve().parents[1]), env={**os.environ, **(env or {})},
            stdout=out, stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out is not None:
            out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m active_learning.worker", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", default=None, help="worker name (default: RQ's)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # through the package module, not this __main__ copy: work horses read its worker_pid()
    from active_learning import worker

    worker.run_worker(settings, burst=args.burst, name=args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
