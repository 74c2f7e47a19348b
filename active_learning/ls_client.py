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

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
import requests

from hih_settings import Settings

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
MAX_REDIRECTS = 5
CHUNK = 64 * 1024
_LS_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/projects/")
_CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure")


class LabelStudioError(RuntimeError):
    """A Label Studio API call that failed. ``reason``: a short code; ``status``: HTTP status or None."""

    def __init__(self, reason: str, message: str, status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status


class ImageFetchError(LabelStudioError):
    """An image that could not be fetched or read (``reason``: ``missing``, ``unauthorized``, ``not_found``,
    ``too_large``, ``forbidden_host``, ``http_error``, ``network``, ``unreadable``)."""


# ------------------------------------------------------------------------------------------ credentials
def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (not verified), or None when ``token`` is not one."""
    parts = (token or "").split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def is_jwt_refresh_token(token: str) -> bool:
    """A Label Studio personal access token: a JWT whose ``token_type`` is ``refresh``."""
    claims = jwt_claims(token)
    return bool(claims) and claims.get("token_type") == "refresh"


class LabelStudioAuth:
    """The ``Authorization`` header for Label Studio (legacy token, personal access token, or access JWT).

    ``kind``: ``none``, ``legacy`` (``Token <key>``), ``pat`` (refresh JWT -> ``Bearer <access>``, cached
    until 30 s before its ``exp``, 4 minutes without one) or ``bearer`` (an access JWT, sent as is).
    Thread-safe.
    """

    REFRESH_MARGIN = 30.0

    def __init__(self, url: str, api_key: str, session: requests.Session | None = None,
                 timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT)):
        self.url = (url or "").rstrip("/")
        self.api_key = (api_key or "").strip()
        self.session = session or requests.Session()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access: str | None = None
        self._expires = 0.0
        claims = jwt_claims(self.api_key) if self.api_key else None
        token_type = (claims or {}).get("token_type")
        if not self.api_key:
            self.kind = "none"
        elif token_type == "refresh":
            self.kind = "pat"
        elif token_type == "access":
            self.kind = "bearer"
        else:
            self.kind = "legacy"

    def invalidate(self) -> None:
        with self._lock:
            self._access, self._expires = None, 0.0

    def headers(self) -> dict[str, str]:
        if self.kind == "none":
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self.api_key}"}
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.api_key}"}
        with self._lock:
            if self._access is None or time.time() >= self._expires:
                self._access, self._expires = self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> tuple[str, float]:
        url = f"{self.url}/api/token/refresh/"
        try:
            r = self.session.post(url, json={"refresh": self.api_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(
                "network", f"cannot reach Label Studio at {url} to refresh the personal access token: {exc}"
            ) from exc
        if r.status_code in (400, 401, 403):
            raise LabelStudioError(
                "unauthorized",
                f"Label Studio refused the personal access token (HTTP {r.status_code} from {url}): "
                "LABEL_STUDIO_API_KEY is wrong, expired or revoked",
                r.status_code,
            )
        try:
            r.raise_for_status()
            access = r.json()["access"]
        except (requests.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise LabelStudioError(
                "http_error", f"unexpected answer from {url} (HTTP {r.status_code})", r.status_code
            ) from exc
        exp = (jwt_claims(access) or {}).get("exp")
        expires = float(exp) - self.REFRESH_MARGIN if isinstance(exp, (int, float)) else time.time() + 240.0
        return access, expires


def _host_port(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.hostname or "").lower(), port


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
        self.session = requests.Session()
        self.auth = LabelStudioAuth(self.url, api_key, self.session, timeout)
        self._ls_host = _host_port(self.url) if self.url else ("", None)

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
    def is_label_studio(self, url: str) -> bool:
        return bool(self._ls_host[0]) and _host_port(url) == self._ls_host

    def is_allowed(self, url: str) -> bool:
        host, port = _host_port(url)
        return host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts

    def resolve(self, value: str, task_id: int | None = None) -> str:
        """A task's image value -> the URL (or ``file://``/``data:`` value/path) that will be read."""
        value = value.strip()
        scheme = urlsplit(value).scheme.lower()
        if value.startswith(_LS_PREFIXES):
            return self._ls_url(value)
        if scheme in _CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError("missing", f"cannot resolve the cloud storage URI {value}: no task id")
            fileuri = base64.urlsafe_b64encode(value.encode()).decode()
            return self._ls_url(f"/tasks/{int(task_id)}/resolve/?fileuri={fileuri}")
        return value

    def _ls_url(self, path: str) -> str:
        if not self.url:
            raise ImageFetchError("missing", f"{path} is a Label Studio path but LABEL_STUDIO_URL is not set")
        return urljoin(self.url + "/", path.lstrip("/"))

    def fetch(self, value: str, task_id: int | None = None) -> np.ndarray:
        """The image a task's value points to, as RGB uint8 (H, W, 3) in display orientation."""
        from model.image_io import ImageError, load_image

        data, source = self._fetch(value, task_id)
        try:
            return load_image(data)
        except ImageError as exc:
            raise ImageFetchError("unreadable", f"cannot read the image {source}: {exc}") from exc

    def fetch_bytes(self, value: str, task_id: int | None = None) -> bytes:
        """The encoded image file a task's value points to (not decoded; see ``fetch``)."""
        return self._fetch(value, task_id)[0]

    def _fetch(self, value: str, task_id: int | None) -> tuple[bytes, str]:
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError("missing", "the task has no image (empty value)")
        url = self.resolve(value, task_id)
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._download(url), url
        if scheme == "data":
            return self._data_uri(url), "data: URI"
        if scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
            path = Path(unquote(urlsplit(url).path) if scheme == "file" else url).expanduser()
            return self._read_file(path), str(path)
        raise ImageFetchError("forbidden_host", f"unsupported image URL scheme {scheme!r}: {url}")

    def _read_file(self, path: Path) -> bytes:
        if not path.is_file():
            raise ImageFetchError("not_found", f"image file not found: {path}")
        size = path.stat().st_size
        if size > self.max_image_bytes:
            raise ImageFetchError(
                "too_large", f"image {path} is {size} bytes, over MAX_IMAGE_BYTES={self.max_image_bytes}"
            )
        return path.read_bytes()

    def _data_uri(self, url: str) -> bytes:
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ImageFetchError("unreadable", "data: URIs must be base64-encoded images")
        if len(payload) * 3 // 4 > self.max_image_bytes:
            raise ImageFetchError(
                "too_large", f"data: URI image is over MAX_IMAGE_BYTES={self.max_image_bytes}"
            )
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError("unreadable", f"bad base64 in data: URI: {exc}") from exc

    def _download(self, url: str) -> bytes:
        if not self.is_label_studio(url) and not self.is_allowed(url):
            raise ImageFetchError(
                "forbidden_host",
                f"refusing to fetch {url}: host {urlsplit(url).netloc} is neither Label Studio's "
                f"({self.url or 'unset'}) nor listed in ALLOWED_IMAGE_HOSTS",
            )
        retried_auth = False
        from_label_studio = False
        for _ in range(MAX_REDIRECTS + 1):
            on_ls = self.is_label_studio(url)
            try:
                headers = self.auth.headers() if on_ls else {}
            except LabelStudioError as exc:
                raise ImageFetchError(exc.reason, str(exc), exc.status) from exc
            try:
                r = self.session.get(url, headers=headers, stream=True, timeout=self.timeout,
                                     allow_redirects=False)
            except requests.RequestException as exc:
                raise ImageFetchError("network", f"cannot download {url}: {exc}") from exc
            with r:
                if r.status_code in (301, 302, 303, 307, 308):
                    location = r.headers.get("Location")
                    if not location:
                        raise ImageFetchError("http_error", f"redirect without a Location from {url}")
                    from_label_studio = from_label_studio or on_ls
                    nxt = urljoin(url, location)
                    # Label Studio may redirect to a presigned cloud URL; others only within the allow-list
                    if not (from_label_studio or self.is_label_studio(nxt) or self.is_allowed(nxt)):
                        raise ImageFetchError(
                            "forbidden_host", f"{url} redirects to {nxt}, whose host is not allowed"
                        )
                    url = nxt
                    continue
                if r.status_code in (401, 403) and on_ls:
                    if self.auth.kind == "pat" and not retried_auth:
                        self.auth.invalidate()  # the cached access token may have expired early: once more
                        retried_auth = True
                        continue
                    raise ImageFetchError(
                        "unauthorized",
                        f"Label Studio refused the image download (HTTP {r.status_code}): "
                        "LABEL_STUDIO_API_KEY is wrong or missing",
                        r.status_code,
                    )
                if r.status_code == 404:
                    raise ImageFetchError("not_found", f"image not found (HTTP 404): {url}", 404)
                if r.status_code >= 400:
                    raise ImageFetchError(
                        "http_error", f"image download failed (HTTP {r.status_code}): {url}", r.status_code
                    )
                return self._read_body(r, url)
        raise ImageFetchError("http_error", f"too many redirects fetching {url}")

    def _read_body(self, r: requests.Response, url: str) -> bytes:
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_image_bytes:
            raise ImageFetchError(
                "too_large", f"image {url} is {declared} bytes, over MAX_IMAGE_BYTES={self.max_image_bytes}"
            )
        buf = bytearray()
        try:
            for chunk in r.iter_content(CHUNK):
                buf.extend(chunk)
                if len(buf) > self.max_image_bytes:
                    raise ImageFetchError(
                        "too_large", f"image {url} is over MAX_IMAGE_BYTES={self.max_image_bytes} bytes"
                    )
        except requests.RequestException as exc:
            raise ImageFetchError("network", f"download of {url} broke off: {exc}") from exc
        if not buf:
            raise ImageFetchError("unreadable", f"image {url} is empty")
        return bytes(buf)
