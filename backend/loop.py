"""Connect the backend to the fine-tuning loop: webhooks go to the RQ queue, projects are served their
current model version from the registry.

Called by the production entry points (``hih-assist serve``, ``backend.wsgi``); tests build apps without it
unless they want the loop. Redis going down never stops predictions: the resolver falls back to the version
it last saw for the project (or the base weights) and logs once per outage.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from active_learning import queue, registry
from backend import model_api
from hih_settings import Settings

log = logging.getLogger(__name__)


class VersionResolver:
    """``fn(project_id, settings) -> checkpoint folder`` for ``model_api.set_weights_resolver``."""

    def __init__(self) -> None:
        self._last: dict[int, Path] = {}
        self._outage = False
        self._lock = threading.Lock()

    def __call__(self, project_id: str | None, settings: Settings) -> Path:
        number = model_api.project_number(project_id)
        if number is None or not number.isdigit():
            return Path(settings.weights)
        pid = int(number)
        try:
            info = registry.current_version(pid, settings)
            path = registry.load_path(info, settings) if info is not None else Path(settings.weights)
        except queue.QueueUnavailable as exc:
            with self._lock:
                if not self._outage:
                    log.warning("Redis unavailable (%s): serving the last known model versions", exc)
                self._outage = True
            return self._last.get(pid, Path(settings.weights))
        except registry.RegistryError as exc:
            log.error("project %s: current version unusable (%s); serving the base weights", pid, exc)
            return Path(settings.weights)
        with self._lock:
            if self._outage:
                log.info("Redis is back: model versions are read from the registry again")
            self._outage = False
            self._last[pid] = path
        return path


_connected: Settings | None = None


def connected_settings() -> Settings | None:
    """The settings the loop was connected with in this process, or None (predictions only)."""
    return _connected


def disconnect_fine_tuning() -> None:
    """Undo ``connect_fine_tuning``: webhooks are only logged, every project gets the base weights."""
    global _connected
    _connected = None
    model_api.set_training_hook(None)
    model_api.set_weights_resolver(None)


def connect_fine_tuning(settings: Settings) -> None:
    """Install the queue's webhook handler and the registry's version resolver into ``backend.model_api``."""
    global _connected
    _connected = settings
    model_api.set_training_hook(lambda event, payload: queue.on_training_event(event, payload, settings))
    model_api.set_weights_resolver(VersionResolver())
    log.info("webhooks feed the fine-tune queue %r; projects are served their current model version",
             settings.queue_name)


def create_deployed_app(settings: Settings | None = None, **kwargs):
    """The app as ``hih-assist serve`` and ``backend.wsgi`` run it: ``create_app`` with the loop connected."""
    from backend.app import create_app

    settings = settings or Settings.from_env()
    connect_fine_tuning(settings)
    return create_app(settings, **kwargs)


def loop_metrics(settings: Settings) -> str:
    """Prometheus lines for the loop's state: Redis reachable, and per project the current version, versions
    published, pending job, annotations counted since the last job, and jobs by status."""
    lines = ["# TYPE hih_queue_up gauge"]
    try:
        status = registry.project_status(settings)
    except queue.QueueUnavailable as exc:
        log.warning("/metrics: no loop state (%s)", exc)
        return "\n".join([*lines, "hih_queue_up 0", ""])
    lines.append("hih_queue_up 1")
    for pid, st in status["projects"].items():
        lab = f'project="{pid}"'
        lines.append(f'hih_project_current_version{{{lab},version="{st["current"]}"}} 1')
        lines.append(f"hih_project_versions{{{lab}}} {len(st['versions'])}")
        lines.append(f"hih_project_pending_job{{{lab}}} {1 if st['pending'] else 0}")
        lines.append(f"hih_project_new_annotations{{{lab}}} {int(st['new_annotations'] or 0)}")
        counts: dict[str, int] = {}
        for job in st["jobs"]:
            state = str(job.get("status", "unknown")) if isinstance(job, dict) else "unknown"
            counts[state] = counts.get(state, 0) + 1
        for state, n in sorted(counts.items()):
            lines.append(f'hih_project_jobs{{{lab},status="{state}"}} {n}')
    return "\n".join(lines) + "\n"
