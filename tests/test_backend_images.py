"""Fetching task images: Label Studio credentials (legacy token, personal access token), clear failures,
host restrictions, size limits, EXIF orientation, local paths and data URIs.

A tiny HTTP server on 127.0.0.1 plays Label Studio's file and token endpoints.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from active_learning.images import ImageFetcher, ImageFetchError, is_jwt_refresh_token, jwt_claims

LEGACY = "legacy0token0abc"


def make_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


PAT = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "user_id": 1})


def png_bytes(arr: np.ndarray, orientation: int | None = None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, format="PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def gradient(h: int = 30, w: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 5 % 256, yy * 7 % 256, (xx + yy) % 256], axis=2).astype(np.uint8)


class FakeLabelStudio:
    """Serves /data/upload/* (needs a legacy token or a Bearer access token), /api/token/refresh/, and a few
    misbehaving paths."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.refreshes = 0
        self.auth_seen: list[str | None] = []
        self.access = make_jwt({"token_type": "access", "exp": int(time.time()) + 300})
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, length: bool = True):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                auth = self.headers.get("Authorization")
                fake.auth_seen.append(auth)
                path = self.path
                if path.startswith("/data/upload/"):
                    if auth not in (f"Token {LEGACY}", f"Bearer {fake.access}"):
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    if path not in fake.files:
                        return self._send(404, b"not found")
                    return self._send(200, fake.files[path], {"Content-Type": "image/png"})
                if path == "/forbidden":
                    return self._send(403, b"no")
                if path.startswith("/public/") and path in fake.files:
                    return self._send(200, fake.files[path])
                if path == "/chunked-big":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b"\0" * 1024)
                    return None
                if path == "/redirect-away":
                    return self._send(302, b"", {"Location": "http://203.0.113.9/x.png"})
                if path == "/redirect-local":
                    return self._send(302, b"", {"Location": "/data/upload/1/face.png"})
                return self._send(404, b"not found")

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/api/token/refresh/":
                    fake.refreshes += 1
                    if body.get("refresh") != PAT:
                        return self._send(401, b'{"detail": "Token is invalid or expired"}')
                    return self._send(200, json.dumps({"access": fake.access}).encode())
                return self._send(404)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_ls() -> Iterator[FakeLabelStudio]:
    fake = FakeLabelStudio()
    fake.files["/data/upload/1/face.png"] = png_bytes(gradient())
    fake.files["/public/a.png"] = png_bytes(gradient(10, 12))
    fake.files["/data/upload/1/big.png"] = png_bytes(
        np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    )
    yield fake
    fake.close()


def test_jwt_helpers() -> None:
    assert is_jwt_refresh_token(PAT)
    assert not is_jwt_refresh_token(LEGACY)
    assert not is_jwt_refresh_token(make_jwt({"token_type": "access"}))
    assert jwt_claims("a.b") is None and jwt_claims("x.!!!.y") is None


def test_legacy_token_is_sent_as_token_header(fake_ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(fake_ls.url, LEGACY)
    img = fetcher.fetch("/data/upload/1/face.png")
    assert np.array_equal(img, gradient())
    assert fake_ls.auth_seen[-1] == f"Token {LEGACY}"
    # a full URL on Label Studio's host gets the credentials too
    assert np.array_equal(fetcher.fetch(f"{fake_ls.url}/data/upload/1/face.png"), gradient())


def test_personal_access_token_is_refreshed_once_and_sent_as_bearer(fake_ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(fake_ls.url, PAT)
    before = fake_ls.refreshes
    for _ in range(3):
        assert np.array_equal(fetcher.fetch("/data/upload/1/face.png"), gradient())
    assert fake_ls.refreshes - before == 1  # cached until near expiry
    assert fake_ls.auth_seen[-1] == f"Bearer {fake_ls.access}"


def test_bad_personal_access_token_says_so(fake_ls: FakeLabelStudio) -> None:
    bad = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "user_id": 2})
    with pytest.raises(ImageFetchError, match="refused the personal access token") as info:
        ImageFetcher(fake_ls.url, bad).fetch("/data/upload/1/face.png")
    assert info.value.reason == "unauthorized"


@pytest.mark.parametrize("key", ["", "wrong-token"])
def test_401_says_the_api_key_is_wrong_or_missing(fake_ls: FakeLabelStudio, key: str) -> None:
    with pytest.raises(ImageFetchError) as info:
        ImageFetcher(fake_ls.url, key).fetch("/data/upload/1/face.png")
    assert str(info.value) == (
        "Label Studio refused the image download (HTTP 401): LABEL_STUDIO_API_KEY is wrong or missing"
    )
    assert info.value.reason == "unauthorized"


def test_403_from_label_studio_is_an_auth_error(fake_ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageFetchError, match=r"\(HTTP 403\): LABEL_STUDIO_API_KEY is wrong or missing"):
        ImageFetcher(fake_ls.url, LEGACY).fetch(f"{fake_ls.url}/forbidden")


def test_404_names_the_url(fake_ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageFetchError) as info:
        ImageFetcher(fake_ls.url, LEGACY).fetch("/data/upload/1/gone.png")
    assert str(info.value) == f"image not found (HTTP 404): {fake_ls.url}/data/upload/1/gone.png"
    assert info.value.reason == "not_found"


def test_size_limit_by_content_length_and_while_streaming(fake_ls: FakeLabelStudio) -> None:
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES=1000") as info:
        ImageFetcher(fake_ls.url, LEGACY, max_bytes=1000).fetch("/data/upload/1/big.png")
    assert info.value.reason == "too_large"
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES=10000") as info:
        ImageFetcher(fake_ls.url, LEGACY, max_bytes=10_000).fetch(
            f"{fake_ls.url}/chunked-big"
        )  # no Content-Length
    assert info.value.reason == "too_large"


def test_other_hosts_need_the_allow_list(fake_ls: FakeLabelStudio) -> None:
    url = f"http://localhost:{fake_ls.port}/public/a.png"  # same server, but not Label Studio's host name
    with pytest.raises(ImageFetchError, match="ALLOWED_IMAGE_HOSTS") as info:
        ImageFetcher(fake_ls.url, LEGACY).fetch(url)
    assert info.value.reason == "forbidden_host"
    fetcher = ImageFetcher(fake_ls.url, LEGACY, allowed_hosts="example.org, localhost")
    assert fetcher.fetch(url).shape == (10, 12, 3)
    assert fake_ls.auth_seen[-1] is None  # credentials go to Label Studio only


def test_redirects_stay_within_allowed_hosts(fake_ls: FakeLabelStudio) -> None:
    fetcher = ImageFetcher(f"http://localhost:{fake_ls.port}", LEGACY, allowed_hosts="127.0.0.1")
    with pytest.raises(ImageFetchError, match="redirects to http://203.0.113.9/x.png") as info:
        fetcher.fetch(f"{fake_ls.url}/redirect-away")
    assert info.value.reason == "forbidden_host"
    # a relative redirect within Label Studio keeps the credentials
    assert np.array_equal(
        ImageFetcher(fake_ls.url, LEGACY).fetch(f"{fake_ls.url}/redirect-local"), gradient()
    )


def test_cloud_uri_resolves_through_label_studio() -> None:
    fetcher = ImageFetcher("http://ls.example:8080", LEGACY)
    url = fetcher.resolve("s3://bucket/faces/a.jpg", task_id=17)
    fileuri = base64.urlsafe_b64encode(b"s3://bucket/faces/a.jpg").decode()
    assert url == f"http://ls.example:8080/tasks/17/resolve/?fileuri={fileuri}"
    assert (
        fetcher.resolve("/data/local-files/?d=faces/a.jpg")
        == "http://ls.example:8080/data/local-files/?d=faces/a.jpg"
    )


def test_local_path_file_url_and_data_uri(tmp_path: Path) -> None:
    data = png_bytes(gradient())
    path = tmp_path / "face.png"
    path.write_bytes(data)
    fetcher = ImageFetcher("http://ls.example:8080", "")
    assert np.array_equal(fetcher.fetch(str(path)), gradient())
    assert np.array_equal(fetcher.fetch(path.as_uri()), gradient())
    assert np.array_equal(
        fetcher.fetch("data:image/png;base64," + base64.b64encode(data).decode()), gradient()
    )
    with pytest.raises(ImageFetchError, match="image file not found") as info:
        fetcher.fetch(str(tmp_path / "nope.png"))
    assert info.value.reason == "not_found"
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageFetchError, match="cannot read the image") as info:
        fetcher.fetch(str(tmp_path / "junk.png"))
    assert info.value.reason == "unreadable"
    with pytest.raises(ImageFetchError, match="over MAX_IMAGE_BYTES"):
        ImageFetcher("", "", max_bytes=10).fetch(str(path))
    with pytest.raises(ImageFetchError, match="empty value") as info:
        fetcher.fetch("  ")
    assert info.value.reason == "missing"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    shown = gradient(30, 40)
    stored = np.ascontiguousarray(np.rot90(shown, k=1))  # 40 x 30 on disk, rotated 90 deg counter-clockwise
    path = tmp_path / "rotated.png"
    path.write_bytes(png_bytes(stored, orientation=6))  # 6: rotate 90 deg clockwise to display
    img = ImageFetcher("", "").fetch(str(path))
    assert img.shape == (30, 40, 3)
    assert np.array_equal(img, shown)
