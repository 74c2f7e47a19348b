"""Fetching a task's image, from every place a Label Studio task can point to, with Label Studio's credentials.

The one implementation: the backend (``/predict``) and the jobs (``active_learning.ls_client``) both use it.

``ImageFetcher.fetch(value, task_id)`` accepts:

* Label Studio paths ``/data/upload/...``, ``/data/local-files/?d=...``, ``/storage-data/...``,
  ``/tasks/<id>/resolve/?fileuri=...`` (joined to ``LABEL_STUDIO_URL``), and full URLs on Label Studio's
  host: sent with Label Studio's credentials (see ``LabelStudioAuth``);
* cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``): resolved through Label Studio's
  ``/tasks/<task_id>/resolve/?fileuri=<base64>``, which proxies or redirects to a presigned URL;
* http(s) URLs on hosts listed in ``ALLOWED_IMAGE_HOSTS`` (sent without credentials); any other host is
  refused, so that task data cannot make the backend fetch from arbitrary addresses;
* ``data:image/...;base64,`` URIs, ``file://`` URLs and local paths (regular files only, never under the
  kernel's pseudo file systems ``/proc``, ``/sys``, ``/dev``, whose files can block or never end).

Downloads are streamed with connect/read timeouts, a deadline for the whole download (``TOTAL_TIMEOUT``), and
stop at ``MAX_IMAGE_BYTES``; images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, or in a format
other than the photo formats of ``IMAGE_FORMATS`` (no EPS, which Pillow hands to Ghostscript), are refused
from their header, before decoding. Every failure raises
``ImageFetchError`` with a short ``reason`` (for metrics) and a message that says what to fix, e.g.
``Label Studio refused the image download (HTTP 401): LABEL_STUDIO_API_KEY is wrong or missing``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image

from model.image_io import ImageError, load_image

log = logging.getLogger(__name__)

__all__ = [
    "ImageFetchError", "ImageFetcher", "LabelStudioAuth", "LabelStudioError", "is_jwt_refresh_token", "jwt_claims",
]

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
TOTAL_TIMEOUT = 60.0  # a whole download, however slowly the server drips it (Label Studio waits 100 s)
_PSEUDO_FS = ("/proc", "/sys", "/dev")
# Pillow's names of the formats accepted (browsers show these in Label Studio; TIFF/PPM for 16-bit sources)
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "JPEG2000", "PPM", "ICO")
MAX_REDIRECTS = 5
CHUNK = 64 * 1024
_LS_PREFIXES = ("/data/", "/storage-data/", "/tasks/", "/projects/")
_CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure")


class LabelStudioError(RuntimeError):
    """A Label Studio request that failed: ``reason`` (``network``, ``unauthorized``, ``not_found``,
    ``http_error``, ``bad_response``, ...), ``status`` (the HTTP status or None) and a message saying what
    to fix."""

    def __init__(self, reason: str, message: str, status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status


class ImageFetchError(LabelStudioError):
    """A task image that cannot be had; ``reason`` also ``missing``, ``too_large``, ``forbidden_host``,
    ``unreadable``."""


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (not verified), or None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def is_jwt_refresh_token(token: str) -> bool:
    """A Label Studio personal access token: a JWT whose ``token_type`` is ``refresh``."""
    claims = jwt_claims(token)
    return bool(claims) and claims.get("token_type") == "refresh"


class LabelStudioAuth:
    """The ``Authorization`` header for Label Studio.

    A legacy token is sent as ``Token <key>``. A personal access token (a JWT refresh token) is exchanged at
    ``POST {url}/api/token/refresh/`` for a short-lived access token, sent as ``Bearer <access>`` and cached
    until 30 s before it expires (``exp`` claim; 4 minutes when it has none). A JWT access token is sent as
    ``Bearer`` as is. Thread-safe.
    """

    REFRESH_MARGIN = 30.0

    def __init__(self, url: str, api_key: str, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.api_key = (api_key or "").strip()
        self.session = session or requests.Session()
        self._lock = threading.Lock()
        self._access: str | None = None
        self._expires = 0.0
        claims = jwt_claims(self.api_key) if self.api_key else None
        self.kind = (
            "none"
            if not self.api_key
            else (
                "pat"
                if claims and claims.get("token_type") == "refresh"
                else "bearer"
                if claims and claims.get("token_type") == "access"
                else "legacy"
            )
        )

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
            r = self.session.post(
                url, json={"refresh": self.api_key}, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
            )
        except requests.RequestException as exc:
            raise ImageFetchError(
                "network", f"cannot reach Label Studio at {url} to refresh the personal access token: {exc}"
            ) from exc
        if r.status_code in (400, 401, 403):
            raise ImageFetchError(
                "unauthorized",
                f"Label Studio refused the personal access token (HTTP {r.status_code} from {url}): "
                "LABEL_STUDIO_API_KEY is wrong, expired or revoked",
            )
        try:
            r.raise_for_status()
            access = r.json()["access"]
        except (requests.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ImageFetchError(
                "http_error", f"unexpected answer from {url} (HTTP {r.status_code})"
            ) from exc
        exp = (jwt_claims(access) or {}).get("exp")
        expires = float(exp) - self.REFRESH_MARGIN if isinstance(exp, (int, float)) else time.time() + 240.0
        return access, expires


# ---------------------------------------------------------------------------------------- fetching
def _host_port(url: str) -> tuple[str, int | None]:
    """The (host, port) an http(s) URL connects to, or ``("", None)`` -- trusted by nobody -- when the URL is
    ambiguous: control characters, or user info, backslashes, spaces or escapes in its authority, or
    urllib's reading (which decides here) differing from urllib3's (which requests connects with), as for
    ``http://internal:1\\@labelstudio:8080/``."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return "", None
    try:
        parts = urlsplit(url)
        authority = parts.netloc
        if not authority.isascii() or any(c in authority for c in "@\\% "):
            return "", None
        default = {"http": 80, "https": 443}.get(parts.scheme.lower())
        port = parts.port or default
        host = (parts.hostname or "").lower()
        connects = urllib3.util.parse_url(url)
    except ValueError:  # a port that is not a number, a malformed IPv6 address (urllib3's errors included)
        return "", None
    if (connects.host or "").strip("[]").lower() != host or (connects.port or default) != port:
        return "", None
    return host, port


class ImageFetcher:
    """Fetches task images (see the module docstring). One per process is enough; it is thread-safe."""

    def __init__(
        self,
        label_studio_url: str,
        api_key: str = "",
        allowed_hosts: str | list[str] = "",
        max_bytes: int = 50 * 1024 * 1024,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
        total_timeout: float = TOTAL_TIMEOUT,
    ):
        self.label_studio_url = (label_studio_url or "").rstrip("/")
        self.max_bytes = int(max_bytes)
        self.timeout = timeout
        self.total_timeout = float(total_timeout)
        if isinstance(allowed_hosts, str):
            allowed_hosts = [h for h in allowed_hosts.split(",")]
        self.allowed_hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.session = requests.Session()
        self.auth = LabelStudioAuth(self.label_studio_url, api_key, self.session)
        self._ls_host = _host_port(self.label_studio_url) if self.label_studio_url else ("", None)

    @classmethod
    def from_settings(cls, settings, api_key: str | None = None) -> ImageFetcher:
        return cls(
            settings.label_studio_url,
            settings.label_studio_api_key if api_key is None else api_key,
            settings.allowed_hosts,
            settings.max_image_bytes,
        )

    # -- where a value points
    def is_label_studio(self, url: str) -> bool:
        return bool(self._ls_host[0]) and _host_port(url) == self._ls_host

    def is_allowed(self, url: str) -> bool:
        host, port = _host_port(url)
        return host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts

    def resolve(self, value: str, task_id: int | None = None) -> str:
        """A task's image value -> the URL (or ``file://``/``data:`` value) that will be read."""
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
        if not self.label_studio_url:
            raise ImageFetchError("missing", f"{path} is a Label Studio path but LABEL_STUDIO_URL is not set")
        return urljoin(self.label_studio_url + "/", path.lstrip("/"))

    # -- reading
    def fetch(self, value: str, task_id: int | None = None) -> np.ndarray:
        """The image a task's value points to, as RGB uint8 (H, W, 3) in display orientation."""
        data, source = self._fetch(value, task_id)
        try:
            return load_image(data)
        except ImageError as exc:
            raise ImageFetchError("unreadable", f"cannot read the image {source}: {exc}") from exc

    def fetch_bytes(self, value: str, task_id: int | None = None) -> bytes:
        """The encoded image file a task's value points to, its header checked (see ``fetch``)."""
        return self._fetch(value, task_id)[0]

    def _fetch(self, value: str, task_id: int | None) -> tuple[bytes, str]:
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError("missing", "the task has no image (empty value)")
        url = self.resolve(value, task_id)
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            data = self._download(url)
            source = url
        elif scheme == "data":
            data, source = self._data_uri(url), "data: URI"
        elif scheme == "file" or scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
            path = Path(unquote(urlsplit(url).path) if scheme == "file" else url).expanduser()
            data, source = self._read_file(path), str(path)
        else:
            raise ImageFetchError("forbidden_host", f"unsupported image URL scheme {scheme!r}: {url}")
        self._check_header(data, source)
        return data, source

    @staticmethod
    def _check_header(data: bytes, source: str) -> None:
        """Refuse, from its header and without decoding it, an image in a format outside ``IMAGE_FORMATS`` or
        with more than ``Image.MAX_IMAGE_PIXELS`` pixels (Pillow itself only refuses twice that); anything
        unreadable is left to ``load_image`` to report."""
        limit = Image.MAX_IMAGE_PIXELS
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels, fmt = im.width * im.height, im.format
        except Image.DecompressionBombError as exc:
            raise ImageFetchError("too_large", f"image {source}: {exc}") from None
        except Exception:  # noqa: BLE001 - load_image says what is wrong with it
            return
        if fmt not in IMAGE_FORMATS:
            raise ImageFetchError(
                "unreadable", f"image {source} is {fmt}, not an accepted format ({', '.join(IMAGE_FORMATS)})"
            )
        if limit and pixels > limit:
            raise ImageFetchError(
                "too_large",
                f"image {source} has {pixels} pixels, over the limit of {limit} (a decompression bomb?)",
            )

    def _read_file(self, path: Path) -> bytes:
        shown = str(path) if len(str(path)) <= 300 else str(path)[:300] + "..."
        try:
            real = path.resolve()
            is_file = real.is_file()
        except (OSError, RuntimeError, ValueError) as exc:
            reason = type(exc).__name__
            raise ImageFetchError("not_found", f"image file not found: {shown} ({reason})") from None
        if any(real == Path(p) or Path(p) in real.parents for p in _PSEUDO_FS):
            raise ImageFetchError("forbidden_host", f"refusing to read {shown}: not an image file")
        if not is_file:
            raise ImageFetchError("not_found", f"image file not found: {shown}")
        try:
            # O_NONBLOCK: a FIFO swapped in after the check must not block the open
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ImageFetchError("not_found", f"image file not found: {shown} (not a regular file)")
                if st.st_size > self.max_bytes:
                    raise ImageFetchError(
                        "too_large",
                        f"image {shown} is {st.st_size} bytes, over MAX_IMAGE_BYTES={self.max_bytes}",
                    )
                if st.st_size == 0:
                    raise ImageFetchError("unreadable", f"image file {shown} is empty")
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ImageFetchError("not_found", f"image file not found: {shown}") from None
        except IsADirectoryError:
            raise ImageFetchError("not_found", f"image file not found: {shown} (a directory)") from None
        except OSError as exc:
            raise ImageFetchError("unreadable", f"cannot read the image file {shown}: {exc}") from exc
        if len(data) > self.max_bytes:
            raise ImageFetchError("too_large", f"image {shown} is over MAX_IMAGE_BYTES={self.max_bytes}")
        return data

    def _data_uri(self, url: str) -> bytes:
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ImageFetchError("unreadable", "data: URIs must be base64-encoded images")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageFetchError("too_large", f"data: URI image is over MAX_IMAGE_BYTES={self.max_bytes}")
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError("unreadable", f"bad base64 in data: URI: {exc}") from exc

    def _download(self, url: str) -> bytes:
        trusted = self.is_label_studio(url)
        if not trusted and not self.is_allowed(url):
            host = urlsplit(url).netloc
            raise ImageFetchError(
                "forbidden_host",
                f"refusing to fetch {url}: host {host} is neither Label Studio's "
                f"({self.label_studio_url or 'unset'})"
                " nor listed in ALLOWED_IMAGE_HOSTS",
            )
        retried_auth = False
        from_label_studio = False
        for _ in range(MAX_REDIRECTS + 1):
            on_ls = self.is_label_studio(url)
            headers = self.auth.headers() if on_ls else {}
            try:
                r = self.session.get(
                    url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=False
                )
            except requests.RequestException as exc:
                raise ImageFetchError("network", f"cannot download {url}: {exc}") from exc
            with r:
                if r.is_redirect or r.status_code in (301, 302, 303, 307, 308):
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
                    )
                if r.status_code == 404:
                    raise ImageFetchError("not_found", f"image not found (HTTP 404): {url}")
                if r.status_code >= 400:
                    raise ImageFetchError(
                        "http_error", f"image download failed (HTTP {r.status_code}): {url}"
                    )
                return self._read_body(r, url)
        raise ImageFetchError("http_error", f"too many redirects fetching {url}")

    def _read_body(self, r: requests.Response, url: str) -> bytes:
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageFetchError(
                "too_large", f"image {url} is {declared} bytes, over MAX_IMAGE_BYTES={self.max_bytes}"
            )
        buf = bytearray()
        deadline = time.monotonic() + self.total_timeout
        # read1: whatever has arrived, so that the deadline holds against a server that drips bytes
        read1 = getattr(r.raw, "read1", None)
        if read1 is not None:
            chunks = iter(lambda: read1(CHUNK, decode_content=True), b"")
        else:  # urllib3 1.x
            chunks = r.iter_content(CHUNK)
        try:
            for chunk in chunks:
                buf.extend(chunk)
                if len(buf) > self.max_bytes:
                    raise ImageFetchError(
                        "too_large", f"image {url} is over MAX_IMAGE_BYTES={self.max_bytes} bytes"
                    )
                if time.monotonic() > deadline:
                    raise ImageFetchError(
                        "network", f"download of {url} took over {self.total_timeout:.0f} s: gave up"
                    )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageFetchError("network", f"download of {url} broke off: {exc}") from exc
        if not buf:
            raise ImageFetchError("unreadable", f"image {url} is empty")
        return bytes(buf)
