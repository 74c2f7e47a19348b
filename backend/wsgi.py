"""gunicorn entry point: ``gunicorn 'backend.wsgi:app'`` (settings from the environment).

Importing this builds the Flask app only; the model is loaded lazily by each worker on its first request,
so nothing initialises CUDA before gunicorn forks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see hih_cli.py: before torch is imported

from backend.app import create_app  # noqa: E402
from backend.loop import connect_fine_tuning  # noqa: E402
from hih_settings import Settings  # noqa: E402

_settings = Settings.from_env()
connect_fine_tuning(_settings)
app = create_app(_settings)
