"""Model versions per Label Studio project: checkpoints in ``MODEL_DIR``, the current version in Redis.

Layout: ``MODEL_DIR/<project>/<version>/`` is an ordinary checkpoint folder (``model.safetensors`` +
``meta.json``, see ``model.checkpoint``) whose ``meta.json`` ``version`` is the folder's name,
``hih-p<project>-v<n>``, so the backend's predictions carry exactly that ``model_version``. ``meta.json`` also
holds ``registry``: parent version, annotation count, held-out NME before and after, the 300-W check, the job
id and the time.

Publishing is atomic: the files are written and fsynced in a hidden ``.tmp-*`` folder beside the versions,
which is then renamed to its final name, and only then does the Redis pointer ``<ns>:current:<project>`` move
to it. A process killed at any point leaves either no new version or a complete one (hidden leftovers are
ignored and swept). Versions are never modified or deleted here; ``rollback`` just moves the pointer (to any
published version, or to ``base``: no pointer, the backend serves ``HIH_WEIGHTS``).

Hot swap contract for the backend: ``current_version(project_id)`` costs one Redis GET; cache the loaded
Predictor per ``VersionInfo.version`` and load ``load_path(info)`` when it changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis

from hih_settings import Settings

from .queue import QueueUnavailable, get_connection, key

__all__ = [
    "RegistryError",
    "RegistryUnavailable",
    "VersionInfo",
    "current_version",
    "history",
    "list_projects",
    "list_versions",
    "load_path",
    "parse_version",
    "project_status",
    "publish",
    "rollback",
    "version_name",
]

_VERSION_RE = re.compile(r"^hih-p(\d+)-v(\d+)$")
_STALE_TMP_SECONDS = 3600
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"


class RegistryError(ValueError):
    """An unknown, malformed or incomplete model version."""


class RegistryUnavailable(QueueUnavailable):
    """Redis (which holds the current-version pointers) cannot be reached."""


@dataclass(frozen=True)
class VersionInfo:
    """One published model version of a project. ``path`` is its checkpoint folder."""

    project_id: int
    version: str
    path: str
    number: int
    parent: str | None = None
    created: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VersionInfo:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else Settings.from_env()


def version_name(project_id: int, number: int) -> str:
    """``hih-p<project>-v<number>``."""
    return f"hih-p{int(project_id)}-v{int(number)}"


def parse_version(version: str) -> tuple[int, int]:
    """``hih-p12-v3`` -> (12, 3); RegistryError for anything else."""
    m = _VERSION_RE.match(str(version).strip())
    if not m:
        raise RegistryError(f"{version!r} is not a hih-assist model version (expected hih-p<project>-v<n>)")
    return int(m.group(1)), int(m.group(2))


def project_dir(project_id: int, settings: Settings | None = None) -> Path:
    return Path(_settings(settings).model_dir) / str(int(project_id))


def _conn(settings: Settings, connection: redis.Redis | None) -> redis.Redis:
    try:
        return connection or get_connection(settings)
    except QueueUnavailable as exc:
        raise RegistryUnavailable(str(exc)) from exc


@contextlib.contextmanager
def _redis(what: str):
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RegistryUnavailable(f"Redis is unreachable ({what}): {exc}") from exc


# ------------------------------------------------------------------------------------------- reading
def _info_from_dir(folder: Path) -> VersionInfo:
    project_id, number = parse_version(folder.name)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"model version {folder} has no readable {META_FILE}: {exc}") from exc
    reg = meta.get("registry", {})
    return VersionInfo(
        project_id=project_id, version=folder.name, path=str(folder), number=number,
        parent=reg.get("parent"), created=str(reg.get("published") or meta.get("created") or ""), extra=reg,
    )


def list_versions(project_id: int, settings: Settings | None = None) -> list[VersionInfo]:
    """Every published version of the project, oldest first (hidden temporary folders are ignored)."""
    folder = project_dir(project_id, settings)
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        if child.name.startswith(".") or not child.is_dir() or not _VERSION_RE.match(child.name):
            continue
        try:
            out.append(_info_from_dir(child))
        except RegistryError:
            continue
    return sorted(out, key=lambda v: v.number)


def list_projects(settings: Settings | None = None) -> list[int]:
    """Projects with a folder in MODEL_DIR."""
    root = Path(_settings(settings).model_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def current_version(
    project_id: int, settings: Settings | None = None, connection: redis.Redis | None = None
) -> VersionInfo | None:
    """The version the project's predictions should come from, or None (serve the base weights).

    One Redis GET. Raises ``RegistryUnavailable`` (a ``QueueUnavailable``) when Redis is down: a backend may
    keep serving what it has loaded.
    """
    settings = _settings(settings)
    conn = _conn(settings, connection)
    with _redis(f"reading the current version of project {project_id}"):
        raw = conn.get(key(settings, "current", int(project_id)))
    if not raw:
        return None
    return VersionInfo.from_dict(json.loads(raw))


def load_path(version: VersionInfo | str, settings: Settings | None = None) -> Path:
    """The checkpoint folder of a version (a ``VersionInfo`` or a name ``hih-p<project>-v<n>``), checked."""
    if isinstance(version, VersionInfo):
        folder = Path(version.path)
    else:
        project_id, _ = parse_version(version)
        folder = project_dir(project_id, settings) / str(version).strip()
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise RegistryError(f"model version {folder.name} is missing or incomplete at {folder}")
    return folder


def history(
    project_id: int, settings: Settings | None = None, connection: redis.Redis | None = None, limit: int = 20
) -> list[dict]:
    """The last pointer changes of the project, newest first: ``{"time", "version", "action", ...}``."""
    settings = _settings(settings)
    conn = _conn(settings, connection)
    with _redis("reading the version history"):
        items = conn.lrange(key(settings, "history", int(project_id)), 0, limit - 1)
    return [json.loads(i) for i in items]


# ------------------------------------------------------------------------------------------- writing
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_tmp(folder: Path) -> None:
    now = time.time()
    for child in folder.glob(".tmp-*"):
        try:
            if now - child.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            continue


def _set_pointer(
    info: VersionInfo | None, project_id: int, action: str, settings: Settings, conn: redis.Redis, **note
) -> None:
    pointer = key(settings, "current", project_id)
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "action": action,
             "version": info.version if info else "base", **note}
    with _redis(f"moving the current version of project {project_id}"):
        pipe = conn.pipeline(transaction=True)
        if info is None:
            pipe.delete(pointer)
        else:
            pipe.set(pointer, json.dumps(info.to_dict()))
        pipe.lpush(key(settings, "history", project_id), json.dumps(entry))
        pipe.ltrim(key(settings, "history", project_id), 0, 199)
        pipe.sadd(key(settings, "projects"), project_id)
        pipe.execute()


def publish(
    project_id: int,
    checkpoint: str | Path,
    registry_meta: dict | None = None,
    settings: Settings | None = None,
    connection: redis.Redis | None = None,
    make_current: bool = True,
) -> VersionInfo:
    """Copy the checkpoint folder in as the project's next version, atomically; then point Redis at it.

    ``registry_meta`` (parent, annotations, held-out NME before/after, ...) is stored under ``meta.json``'s
    ``registry`` with the publication time. Returns the new version.
    """
    settings = _settings(settings)
    project_id = int(project_id)
    src = Path(checkpoint)
    if not (src / WEIGHTS_FILE).is_file() or not (src / META_FILE).is_file():
        raise RegistryError(f"{src} is not a checkpoint folder ({WEIGHTS_FILE} + {META_FILE})")
    conn = _conn(settings, connection) if make_current else None
    root = project_dir(project_id, settings)
    root.mkdir(parents=True, exist_ok=True)
    _sweep_tmp(root)
    meta = json.loads((src / META_FILE).read_text())
    tmp = root / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        shutil.copyfile(src / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        for _attempt in range(100):
            number = max((v.number for v in list_versions(project_id, settings)), default=0) + 1
            name = version_name(project_id, number)
            reg = {**(registry_meta or {}), "project": project_id,
                   "published": datetime.now(UTC).isoformat(timespec="seconds")}
            full = {**meta, "version": name, "registry": reg}
            (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
            for f in (tmp / WEIGHTS_FILE, tmp / META_FILE):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            final = root / name
            if final.exists():  # another publisher took the number: take the next
                continue
            try:
                os.rename(tmp, final)
            except OSError:
                if final.exists():
                    continue
                raise
            _fsync_dir(root)
            break
        else:
            raise RegistryError(f"could not find a free version number in {root}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = VersionInfo(project_id=project_id, version=name, path=str(final), number=number,
                       parent=reg.get("parent"), created=reg["published"], extra={})
    if make_current:
        _set_pointer(info, project_id, "publish", settings, conn, parent=reg.get("parent"))
    return info


def rollback(
    project_id: int,
    version: str | None,
    settings: Settings | None = None,
    connection: redis.Redis | None = None,
) -> VersionInfo | None:
    """Make ``version`` (``hih-p<project>-v<n>``, or ``base``/None for the base weights) current again."""
    settings = _settings(settings)
    project_id = int(project_id)
    conn = _conn(settings, connection)
    if version is None or str(version).strip().lower() in ("base", "none", ""):
        _set_pointer(None, project_id, "rollback", settings, conn)
        return None
    owner, _ = parse_version(version)
    if owner != project_id:
        raise RegistryError(f"{version} belongs to project {owner}, not {project_id}")
    folder = load_path(version, settings)
    info = _info_from_dir(folder)
    info = VersionInfo(project_id=info.project_id, version=info.version, path=info.path, number=info.number,
                       parent=info.parent, created=info.created, extra={})
    _set_pointer(info, project_id, "rollback", settings, conn)
    return info


# ------------------------------------------------------------------------------------------- overview
def project_status(settings: Settings | None = None, project: int | None = None) -> dict:
    """Versions and jobs per project, for ``hih-assist status`` and ``/metrics``.

    ``{"queue", "redis", "projects": {id: {"current", "versions": [...], "pending", "new_annotations",
    "jobs": [...], "last"}}}``; ``current`` is ``base`` when no version is current. Raises
    ``QueueUnavailable`` when Redis is down."""
    from . import queue

    settings = _settings(settings)
    conn = queue.get_connection(settings)
    jobs = queue.jobs_by_project(settings, conn)
    ids = set(list_projects(settings)) | set(queue.seen_projects(settings, conn)) | set(jobs)
    if project is not None:
        ids = {int(project)}
    out: dict = {"queue": settings.queue_name, "redis": settings.redis_url or "embedded", "projects": {}}
    for pid in sorted(ids):
        current = current_version(pid, settings, conn)
        out["projects"][pid] = {
            "current": current.version if current else "base",
            "versions": [
                {"version": v.version, "parent": v.parent, "created": v.created,
                 "holdout_nme_before": v.extra.get("holdout_nme_before"),
                 "holdout_nme_after": v.extra.get("holdout_nme_after"), "faces": v.extra.get("faces")}
                for v in list_versions(pid, settings)
            ],
            "pending": queue.pending_job_id(pid, settings, conn),
            "new_annotations": queue.new_annotations(pid, settings, conn),
            "jobs": jobs.get(pid, []),
            "last": queue.last_outcome(pid, settings, conn),
        }
    return out
