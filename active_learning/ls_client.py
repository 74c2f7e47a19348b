"""A small Label Studio client: the REST calls hih-assist needs, and task images with the credentials.

Owned by ``active_learning`` (the backend imports it; this package never imports ``backend``).

Credentials (``LABEL_STUDIO_API_KEY``): a legacy token is sent as ``Authorization: Token <key>``; a personal
access token (a JWT refresh token) is exchanged at ``POST /api/token/refresh/`` for a short-lived access token
sent as ``Bearer <access>`` (cached until 30 s before it expires, refreshed once more on a 401).

API calls: ``get_project``, ``annotated_tasks`` / ``iter_tasks`` (``GET /api/tasks?project=&fields=all``,
paginated; falls back to ``/api/projects/{id}/export?exportType=JSON``), ``list_predictions``,
``create_prediction``, ``delete_prediction``, ``set_model_version`` (``PATCH /api/projects/{id}``).

Images (``fetch`` -> RGB array, ``fetch_bytes`` -> the file's bytes) from every place a task can point to:
Label Studio paths (``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``,
``/tasks/<id>/resolve/?fileuri=...``) and full URLs on Label Studio's host, sent with the credentials; cloud
URIs (``s3://``, ``gs://``, ``azure-blob://``) through Label Studio's ``/tasks/<id>/resolve/``; http(s) URLs
on hosts in ``ALLOWED_IMAGE_HOSTS`` (sent without credentials; any other host is refused); ``data:`` URIs,
``file://`` URLs and local paths. Downloads are streamed with timeouts and stop at ``MAX_IMAGE_BYTES``.

Errors: ``LabelStudioError`` (``reason``: ``network``, ``unauthorized``, ``not_found``, ``http_error``,
``bad_response``; ``status``: the HTTP status or None) and its subclass ``ImageFetchError`` (``reason`` also
``missing``, ``too_large``, ``forbidden_host``, ``unreadable``), each with a message that says what to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import requests

from hih_settings import Settings

from .images import ImageFetcher, ImageFetchError, LabelStudioAuth, LabelStudioError, is_jwt_refresh_token, jwt_claims

log = logging.getLogger(__name__)

__all__ = [
    "ImageFetchError",
    "LabelStudioAuth",
    "LabelStudioClient",
    "LabelStudioError",
    "is_jwt_refresh_token",
    "jwt_claims",
]

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------ the client
class LabelStudioClient:
    """Label Studio's REST API and task images, with the project's credentials. Thread-safe."""

    def __init__(
        self,
        url: str,
        api_key: str = "",
        allowed_hosts: str | list[str] = "",
        max_image_bytes: int = 50 * 1024 * 1024,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ):
        self.url = (url or "").rstrip("/")
        self.max_image_bytes = int(max_image_bytes)
        self.timeout = timeout
        if isinstance(allowed_hosts, str):
            allowed_hosts = allowed_hosts.split(",")
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.images = ImageFetcher(self.url, api_key, allowed_hosts, self.max_image_bytes)
        self.session = self.images.session
        self.auth = self.images.auth

    @classmethod
    def from_settings(
        cls, settings: Settings, url: str | None = None, api_key: str | None = None
    ) -> LabelStudioClient:
        """A client for ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (or the given ones)."""
        return cls(
            url or settings.label_studio_url,
            settings.label_studio_api_key if api_key is None else api_key,
            settings.allowed_hosts,
            settings.max_image_bytes,
        )

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 204), **kwargs: Any) -> Any:
        """``method`` on ``url + path`` with the credentials -> the decoded JSON (None when empty).

        Raises ``LabelStudioError``: ``network`` (unreachable), ``unauthorized`` (401/403), ``not_found``
        (404), ``http_error`` (any other status not in ``ok``), ``bad_response`` (not JSON)."""
        if not self.url:
            raise LabelStudioError("missing", "LABEL_STUDIO_URL is not set: cannot call Label Studio's API")
        url = f"{self.url}{path}"
        kwargs.setdefault("timeout", self.timeout)
        retried = False
        while True:
            try:
                r = self.session.request(method, url, headers=self.auth.headers(), **kwargs)
            except requests.RequestException as exc:
                raise LabelStudioError(
                    "network", f"cannot reach Label Studio at {self.url} ({method} {path}): {exc}"
                ) from exc
            if r.status_code in (401, 403) and self.auth.kind == "pat" and not retried:
                self.auth.invalidate()
                retried = True
                continue
            break
        if r.status_code not in ok:
            body = r.text[:500].strip()
            if r.status_code in (401, 403):
                raise LabelStudioError(
                    "unauthorized",
                    f"Label Studio refused {method} {path} (HTTP {r.status_code}): "
                    f"LABEL_STUDIO_API_KEY is wrong, missing or lacks access: {body}",
                    r.status_code,
                )
            reason = "not_found" if r.status_code == 404 else "http_error"
            raise LabelStudioError(reason, f"{method} {path} -> HTTP {r.status_code}: {body}", r.status_code)
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError as exc:
            raise LabelStudioError(
                "bad_response",
                f"{method} {path}: Label Studio answered non-JSON: {r.text[:200]!r}",
                r.status_code,
            ) from exc

    def get_project(self, project_id: int) -> dict:
        """``GET /api/projects/{id}``."""
        return self.request("GET", f"/api/projects/{int(project_id)}")

    def iter_tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict]:
        """Every task of the project with its annotations (``GET /api/tasks?fields=all``, paginated)."""
        page, seen = 1, 0
        while True:
            out = self.request(
                "GET", "/api/tasks", ok=(200, 404),
                params={"project": int(project_id), "page": page, "page_size": page_size, "fields": "all"},
            )
            if isinstance(out, list):  # servers that do not paginate
                yield from out
                return
            batch = out.get("tasks", []) if isinstance(out, dict) else []
            if not batch:
                return
            yield from batch
            seen += len(batch)
            total = out.get("total")
            if isinstance(total, int) and seen >= total:
                return
            page += 1

    def export_tasks(self, project_id: int) -> list[dict]:
        """``GET /api/projects/{id}/export?exportType=JSON``: every annotated task with its annotations."""
        out = self.request(
            "GET", f"/api/projects/{int(project_id)}/export", params={"exportType": "JSON"},
            timeout=(self.timeout[0], max(self.timeout[1], 300.0)),
        )
        if not isinstance(out, list):
            raise LabelStudioError("bad_response", f"the export of project {project_id} is not a task list")
        return out

    def annotated_tasks(self, project_id: int) -> list[dict]:
        """Tasks with at least one annotation (from the task list, else from the export)."""
        try:
            tasks = list(self.iter_tasks(project_id))
        except LabelStudioError as exc:
            if exc.reason not in ("http_error", "bad_response") and exc.status != 405:
                raise
            log.info("task list of project %s failed (%s): using the export", project_id, exc)
            tasks = self.export_tasks(project_id)
        return [t for t in tasks if t.get("annotations")]

    def list_predictions(self, project_id: int | None = None, task_id: int | None = None) -> list[dict]:
        """``GET /api/predictions?project=`` or ``?task=``."""
        params = {"project": project_id} if task_id is None else {"task": task_id}
        out = self.request("GET", "/api/predictions", params=params)
        return out if isinstance(out, list) else (out or {}).get("results", [])

    def create_prediction(
        self, task_id: int, result: list[dict], model_version: str, score: float | None = None
    ) -> dict:
        """``POST /api/predictions``."""
        body: dict[str, Any] = {"task": int(task_id), "result": result, "model_version": model_version}
        if score is not None:
            body["score"] = float(score)
        return self.request("POST", "/api/predictions", json=body)

    def delete_prediction(self, prediction_id: int) -> None:
        """``DELETE /api/predictions/{id}``."""
        self.request("DELETE", f"/api/predictions/{int(prediction_id)}", ok=(200, 204, 404))

    def set_model_version(self, project_id: int, model_version: str) -> dict:
        """``PATCH /api/projects/{id} {"model_version": ...}``.

        Label Studio 1.23 accepts only a version of which the project already has predictions, or an ML
        backend's title (else HTTP 400, raised as ``LabelStudioError`` with ``status`` 400)."""
        body = {"model_version": model_version}
        return self.request("PATCH", f"/api/projects/{int(project_id)}", json=body)

    # ------------------------------------------------------------------ images
    # One implementation of image fetching (hosts, credentials, limits): active_learning.images.ImageFetcher.
    def is_label_studio(self, url: str) -> bool:
        return self.images.is_label_studio(url)

    def is_allowed(self, url: str) -> bool:
        return self.images.is_allowed(url)

    def resolve(self, value: str, task_id: int | None = None) -> str:
        """A task's image value -> the URL (or ``file://``/``data:`` value/path) that will be read."""
        return self.images.resolve(value, task_id)

    def fetch(self, value: str, task_id: int | None = None) -> np.ndarray:
        """The image a task's value points to, as RGB uint8 (H, W, 3) in display orientation."""
        return self.images.fetch(value, task_id)

    def fetch_bytes(self, value: str, task_id: int | None = None) -> bytes:
        """The encoded image file a task's value points to (not decoded; see ``fetch``)."""
        return self.images.fetch_bytes(value, task_id)
