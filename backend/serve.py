"""``hih-assist serve``: the backend under gunicorn (or Flask's server where gunicorn is unavailable).

gunicorn runs ``WORKERS`` worker processes, each with ``HANDLER_THREADS`` request threads (``gthread``), so
``/health`` answers while a ``/predict`` runs. The app is built in each worker after the fork (no preload)
and the model is loaded by the worker's first request: no CUDA initialisation happens before a fork.
``THREADS`` is the number of torch threads per worker.
"""

from __future__ import annotations

import logging
import sys

from hih_settings import Settings

log = logging.getLogger(__name__)

__all__ = ["HANDLER_THREADS", "TIMEOUT", "gunicorn_options", "run_server"]

HANDLER_THREADS = 4
TIMEOUT = 180  # seconds; Label Studio gives /predict 100 s


def gunicorn_options(settings: Settings) -> dict:
    """gunicorn settings for ``settings`` (bind, workers, threads, timeouts, logging)."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": max(1, int(settings.workers)),
        "worker_class": "gthread",
        "threads": HANDLER_THREADS,
        "timeout": TIMEOUT,
        "graceful_timeout": 30,
        "keepalive": 5,
        "preload_app": False,
        "loglevel": settings.log_level.lower(),
        "accesslog": "-" if settings.log_level.upper() == "DEBUG" else None,
        "errorlog": "-",
        "proc_name": "hih-assist",
    }


def run_server(settings: Settings | None = None) -> int:
    """Serve the backend on ``HOST:PORT`` until interrupted; returns an exit status.

    Uses gunicorn (``gthread`` workers) when it can be imported, else Flask's threaded development server.
    """
    settings = settings or Settings.from_env()
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:  # pragma: no cover - gunicorn is a dependency; this is for platforms without fork
        BaseApplication = None

    if BaseApplication is None:
        from backend.app import create_app

        log.warning("gunicorn is not available: serving with Flask's development server")
        create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
        return 0

    class _Server(BaseApplication):
        def __init__(self) -> None:
            self.options = gunicorn_options(settings)
            super().__init__()

        def load_config(self) -> None:
            for key, value in self.options.items():
                if value is not None and key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            from backend.loop import create_deployed_app

            return create_deployed_app(settings)

    log.info(
        "hih-assist backend on http://%s:%d (%d worker(s), model %s)",
        settings.host,
        settings.port,
        max(1, settings.workers),
        settings.weights,
    )
    try:
        _Server().run()
    except SystemExit as exc:  # gunicorn exits through sys.exit
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(run_server())
