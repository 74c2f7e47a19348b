"""gunicorn entry point: ``gunicorn 'backend.wsgi:app'`` (settings from the environment).

Importing this builds the Flask app only; the model is loaded lazily by each worker on its first request,
so nothing initialises CUDA before gunicorn forks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see hih_cli.py: before torch is imported

from backend.loop import create_deployed_app  # noqa: E402

app = create_deployed_app()
