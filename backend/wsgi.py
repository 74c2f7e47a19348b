"""gunicorn entry point: ``gunicorn 'backend.wsgi:app'`` (settings from the environment).

Importing this builds the Flask app only; the model is loaded lazily by each worker on its first request,
so nothing initialises CUDA before gunicorn forks.
"""

from __future__ import annotations

from backend.app import create_app

app = create_app()
