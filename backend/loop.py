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


def connect_fine_tuning(settings: Settings) -> None:
    """Install the queue's webhook handler and the registry's version resolver into ``backend.model_api``."""
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
