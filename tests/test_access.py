"""Access: basic auth on every route but /health (constant-time comparison), image URLs only from Label
Studio's host or ``ALLOWED_IMAGE_HOSTS`` (internal addresses, other loopback ports, URL-parser tricks and
redirects refused, credentials never forwarded), size and time limits on downloads, and checkpoints never
loaded through pickle.

Three local HTTP servers on 127.0.0.1 play Label Studio (needs ``Authorization: Token``), an allowed image
host, and a *canary*: an internal service no task may reach. Every test asserts the canary saw nothing.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import gzip
import hmac
import inspect
import io
import json
import os
import pickle
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from active_learning.images import ImageFetcher, ImageFetchError
from backend import app as app_module
from backend import model_api
from backend.app import create_app
from hih_settings import PROJECT_ROOT, Settings

CONFIG = (PROJECT_ROOT / "label_config.xml").read_text()
TOKEN = "access0test0token"
USER, PASSWORD = "annotator", "s3:cr€t pass"  # a colon and non-ASCII in the password
SCALE = float(os.environ.get("HIH_FUZZ_SCALE", "1"))


def png(h: int = 24, w: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 127, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A loopback HTTP server whose behaviour per path is a function; it records every request."""

    def __init__(self, routes: dict | None = None) -> None:
        self.hits: list[tuple[str, dict]] = []
        self.routes = dict(routes or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                outer.hits.append((self.path, dict(self.headers)))
                handler = outer.routes.get(self.path.split("?")[0], outer.routes.get("*"))
                if handler is None:
                    self._send(404, b"")
                else:
                    handler(self)

            def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(code: int, body: bytes = b"", **headers):
    return lambda h: h._send(code, body, headers)


def redirect(location: str):
    return lambda h: h._send(302, b"", {"Location": location})


def ls_file(h) -> None:
    ok = h.headers.get("Authorization") == f"Token {TOKEN}"
    h._send(200 if ok else 401, png() if ok else b"{}")


def infinite(h) -> None:
    """Chunked, without a length, forever (until the client hangs up)."""
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    block = b"\0" * 65536
    try:
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
    except (BrokenPipeError, ConnectionResetError):
        pass


def drip(h) -> None:
    """A valid length, one byte every 0.1 s."""
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        for _ in range(100000):
            h.wfile.write(b"\0")
            h.wfile.flush()
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass


def declared_huge(h) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(10**12))
    h.end_headers()
    with_pause = b"\0" * 1024
    try:
        h.wfile.write(with_pause)
        time.sleep(2)
    except (BrokenPipeError, ConnectionResetError):
        pass


GZIP_BOMB = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MB in ~64 kB


@pytest.fixture(scope="module")
def net() -> Iterator[SimpleNamespace]:
    canary = Server({"*": send(200, png())})
    allowed = Server()
    ls = Server()
    allowed.routes = {
        "/face.png": send(200, png()),
        "/to-canary": redirect(f"{canary.url}/x"),
        "/to-canary-relative": redirect(f"//{canary.host}/x"),
        "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-ls": redirect(f"{ls.url}/data/upload/1/face.png"),
        "/to-file": redirect("file:///etc/passwd"),
        "/loop": redirect("/loop"),
        "/infinite": infinite,
        "/drip": drip,
        "/declared-huge": declared_huge,
        "/gzip-bomb": send(200, GZIP_BOMB, **{"Content-Encoding": "gzip"}),
        "/stall": lambda h: time.sleep(3),
    }
    ls.routes = {
        "/data/upload/1/face.png": ls_file,
        "/data/upload/1/to-canary": redirect(f"{canary.url}/presigned?sig=1"),
        "/data/upload/1/to-file": redirect("file:///etc/passwd"),
    }
    yield SimpleNamespace(canary=canary, allowed=allowed, ls=ls)
    for server in (canary, allowed, ls):
        server.close()


@pytest.fixture
def fetcher(net) -> Iterator[ImageFetcher]:
    net.canary.hits.clear()
    f = ImageFetcher(net.ls.url, TOKEN, allowed_hosts=net.allowed.host, max_bytes=1024 * 1024,
                     timeout=(1.0, 1.0), total_timeout=1.5)  # fmt: skip
    yield f
    assert net.canary.hits == [], f"the canary was reached: {net.canary.hits}"


def refused(f: ImageFetcher, value: str, reason: str = "forbidden_host", seconds: float = 3.0) -> str:
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        f.fetch(value, task_id=1)
    assert time.monotonic() - t0 < seconds, f"{value!r} took {time.monotonic() - t0:.1f} s"
    assert err.value.reason == reason, (value, err.value.reason, str(err.value))
    return str(err.value)


# ------------------------------------------------------------------------------------------ basic auth
def auth(user: str | bytes, password: str | bytes) -> dict[str, str]:
    raw = (user if isinstance(user, bytes) else user.encode()) + b":" + (
        password if isinstance(password, bytes) else password.encode()
    )
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture(scope="module")
def locked(tiny_checkpoint: Path):
    model_api.clear_caches()
    s = Settings(weights=tiny_checkpoint, device="cpu", threads=1, basic_auth_user=USER,
                 basic_auth_pass=PASSWORD, label_studio_url="http://127.0.0.1:9")  # fmt: skip
    app = create_app(s, warm_up=False)
    return SimpleNamespace(app=app, client=app.test_client())


def every_route(app) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if rule.rule != "/static/<path:filename>":
                out.append((method, rule.rule))
    return out


WRONG = [
    (USER, ""), ("", PASSWORD), (USER, "S3:cr€t pass"), (USER.upper(), PASSWORD), (USER, PASSWORD + " "),
    (USER, PASSWORD.encode("latin-1", "replace")), (USER + "\0", PASSWORD), (PASSWORD, USER),
]  # fmt: skip
BAD_HEADERS = [
    None, "", "Basic", "Basic ", "Basic ====", "Basic !!!", "Bearer " + TOKEN, "Token " + TOKEN,
    "Basic " + base64.b64encode(USER.encode()).decode(),  # no colon
    *(auth(u, p)["Authorization"] for u, p in WRONG), "Basic " + "A" * 100_000,
]  # fmt: skip


def test_every_route_but_health_needs_the_credentials(locked) -> None:
    routes = every_route(locked.app)
    expected = {"/", "/health", "/setup", "/predict", "/webhook", "/metrics", "/versions"}
    assert {r for _, r in routes} >= expected
    for method, route in routes + [("GET", "/no-such-route"), ("POST", "/predict/../setup")]:
        call = getattr(locked.client, method.lower())
        for header in BAD_HEADERS:
            r = call(route, json={}, headers={"Authorization": header} if header is not None else {})
            if route in ("/", "/health"):
                assert r.status_code == 200 and r.json["status"] == "UP"
                continue
            assert r.status_code == 401, (method, route, header and header[:40], r.status_code)
            assert r.headers["WWW-Authenticate"] == 'Basic realm="hih-assist"'
            assert "basic-auth" in r.json["error"]
        r = call(route, json={}, headers=auth(USER, PASSWORD))
        assert r.status_code != 401, (method, route)


def test_the_right_credentials_open_every_route(locked) -> None:
    ok = auth(USER, PASSWORD)
    r = locked.client.post("/setup", json={"schema": CONFIG}, headers=ok)
    assert r.json == {"model_version": "test-tiny"}
    assert locked.client.get("/metrics", headers=ok).status_code == 200
    assert locked.client.get("/versions", headers=ok).json == {"versions": ["test-tiny"]}
    r = locked.client.post("/predict", json={"tasks": [{"data": {}}], "label_config": CONFIG}, headers=ok)
    assert r.status_code == 200 and len(r.json["results"]) == 1
    lower = {"Authorization": "basic " + ok["Authorization"][6:]}  # the scheme is case-insensitive (RFC 7617)
    assert locked.client.get("/metrics", headers=lower).status_code == 200


def test_credentials_are_compared_in_constant_time_both_fields_always(locked, monkeypatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    for header, expected in ((auth("intruder", "guess"), 401), (auth(USER, "guess"), 401),
                             (auth("intruder", PASSWORD), 401), (auth(USER, PASSWORD), 200)):  # fmt: skip
        calls.clear()
        assert locked.client.get("/metrics", headers=header).status_code == expected
        # both the user and the password are compared, every time, whichever is wrong: no early exit that
        # tells an attacker which one was right, and no length or prefix leak from ==
        assert len(calls) == 2 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
        assert calls[1][1] == PASSWORD.encode()
    # and nothing in the check compares secrets with == / != / startswith
    source = inspect.getsource(app_module._check_basic_auth)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = ast.unparse(node)
            assert not re.search(r"user|password|basic_auth", names), f"non-constant-time comparison: {names}"
    assert "startswith" not in source and "hmac.compare_digest" in source


def test_auth_is_off_when_no_user_is_set(tiny_checkpoint: Path) -> None:
    model_api.clear_caches()
    c = create_app(Settings(weights=tiny_checkpoint, device="cpu", threads=1), warm_up=False).test_client()
    assert c.get("/metrics").status_code == 200


# ------------------------------------------------------------------------------------------ image hosts
def internal_urls(net) -> list[str]:
    c, ls = net.canary, net.ls
    return [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://169.254.169.254.nip.io/latest/meta-data/", "http://[fd00:ec2::254]/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/", "http://10.0.0.1/x.png", "http://10.255.255.1:8080/",
        "http://192.168.1.1/x.png", "http://172.16.0.1/x.png", "https://10.0.0.1/x.png",
        f"{c.url}/x.png", f"http://localhost:{c.port}/x.png", f"http://[::1]:{c.port}/x.png",
        f"http://0.0.0.0:{c.port}/x.png", f"http://127.1:{c.port}/x", f"http://2130706433:{c.port}/x",
        f"http://0x7f000001:{c.port}/x", f"http://017700000001:{c.port}/x", f"HTTP://127.0.0.1:{c.port}/x",
        f"http://127.0.0.1:{ls.port}@127.0.0.1:{c.port}/x", f"http://{ls.host}:pw@127.0.0.1:{c.port}/x",
        f"http://127.0.0.1:{c.port}\\@127.0.0.1:{ls.port}/x", f"http://127.0.0.1:{c.port}#@127.0.0.1:{ls.port}/",
        f"http://127.0.0.1:{c.port}?@127.0.0.1:{ls.port}/", f"http://127.0.0.1:{c.port}%2f@127.0.0.1:{ls.port}/",
        f"http://localhost:{ls.port}/data/upload/1/face.png",  # Label Studio's port under another name
        f"http://127.0.0.1:{ls.port + 1 if ls.port < 65535 else 1}/x",
        f"gopher://127.0.0.1:{c.port}/_PING", f"dict://127.0.0.1:{c.port}/info", f"ftp://127.0.0.1:{c.port}/x",
        f"ws://127.0.0.1:{c.port}/", "jar:http://10.0.0.1/x!/", "netdoc:///etc/passwd",
    ]  # fmt: skip


def test_internal_addresses_other_ports_and_parser_tricks_are_refused(net, fetcher) -> None:
    ls_before = len(net.ls.hits)
    for url in internal_urls(net):
        refused(fetcher, url)
    assert len(net.ls.hits) == ls_before  # not even Label Studio was asked, under another name


def test_label_studio_and_allowed_hosts_are_fetched_credentials_only_to_label_studio(net, fetcher) -> None:
    net.ls.hits.clear()
    net.allowed.hits.clear()
    assert fetcher.fetch("/data/upload/1/face.png").shape == (24, 32, 3)
    assert fetcher.fetch(f"{net.ls.url}/data/upload/1/face.png").shape == (24, 32, 3)
    assert fetcher.fetch(f"{net.allowed.url}/face.png").shape == (24, 32, 3)
    assert all(h.get("Authorization") == f"Token {TOKEN}" for _, h in net.ls.hits)
    assert all("Authorization" not in h for _, h in net.allowed.hits)
    # Label Studio paths never leave Label Studio, however they are spelled
    c = net.canary.host
    for value in ("/data/upload/../../x.png", f"/data/upload/1/x.png@{c}", f"/data//{c}/x.png",
                  f"/data/local-files/?d=http://{c}/x", f"/data/upload/1/x.png\\@{c}/"):  # fmt: skip
        with pytest.raises(ImageFetchError):
            fetcher.fetch(value)


def test_redirects_to_internal_addresses_are_refused(net, fetcher) -> None:
    base = net.allowed.url
    for path in ("/to-canary", "/to-canary-relative", "/to-metadata", "/to-file"):
        message = refused(fetcher, f"{base}{path}")
        assert "redirects to" in message
    # an allowed host may redirect to Label Studio (allowed) ...
    assert fetcher.fetch(f"{base}/to-ls").shape == (24, 32, 3)
    refused(fetcher, f"{base}/loop", reason="http_error")


def test_label_studio_redirects_to_presigned_urls_without_forwarding_credentials(net, fetcher) -> None:
    """Label Studio may redirect anywhere (cloud storage presigned URLs): followed, but its token is never
    sent to the other host; a redirect to a non-HTTP scheme is refused."""
    data = fetcher.fetch("/data/upload/1/to-canary")
    assert data.shape == (24, 32, 3)
    hits = list(net.canary.hits)
    net.canary.hits.clear()  # expected here: the one presigned download
    assert len(hits) == 1 and hits[0][0] == "/presigned?sig=1" and "Authorization" not in hits[0][1]
    with pytest.raises(ImageFetchError) as err:
        fetcher.fetch("/data/upload/1/to-file")
    assert err.value.reason in ("network", "forbidden_host")


@settings(max_examples=max(1, int(150 * SCALE)), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzzed_urls_reach_only_label_studio_or_allowed_hosts(net, fetcher, data) -> None:
    hosts = ["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "127.1", "2130706433", "0x7f000001", "10.0.0.1",
             "169.254.169.254", "LOCALHOST", "127.0.0.1.", "[::ffff:127.0.0.1]"]  # fmt: skip
    ports = [net.canary.port, net.ls.port, net.allowed.port, None]
    host = data.draw(st.sampled_from(hosts))
    port = data.draw(st.sampled_from(ports))
    netloc = host + (f":{port}" if port else "")
    prefix = data.draw(st.sampled_from(["", f"{net.ls.host}@", f"{net.allowed.host}@", "u:p@", "@", "%40@"]))
    inject = data.draw(st.sampled_from(["", "\\", "#", "?", "%2F", "\t", " ", "%00", "@", ";", "/.."]))
    suffix = data.draw(st.sampled_from(["", f"{net.ls.host}", f"@{net.allowed.host}", "evil.example"]))
    scheme = data.draw(st.sampled_from(["http", "https", "HTTP", "hTTp"]))
    path = data.draw(st.sampled_from(["/face.png", "/data/upload/1/face.png", "/x", ""]))
    url = f"{scheme}://{prefix}{netloc}{inject}{suffix}{path}"
    before = {name: len(s.hits) for name, s in (("ls", net.ls), ("allowed", net.allowed))}
    t0 = time.monotonic()
    with contextlib.suppress(ImageFetchError):
        fetcher.fetch(url)
    assert time.monotonic() - t0 < 3.0, f"{url!r}: a connection attempt outside loopback?"
    assert net.canary.hits == [], f"{url!r} reached the canary"
    ls_hits = net.ls.hits[before["ls"]:]
    allowed_hits = net.allowed.hits[before["allowed"]:]
    assert all("Authorization" not in h for _, h in allowed_hits)
    assert len(ls_hits) + len(allowed_hits) <= 2


def test_predict_refuses_internal_image_urls_per_task(net, tiny_checkpoint: Path) -> None:
    net.canary.hits.clear()
    model_api.clear_caches()
    s = Settings(weights=tiny_checkpoint, device="cpu", threads=1, label_studio_url=net.ls.url,
                 label_studio_api_key=TOKEN, allowed_hosts=net.allowed.host)  # fmt: skip
    client = create_app(s, warm_up=False).test_client()
    urls = internal_urls(net)
    r = client.post("/predict", json={"tasks": [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)],
                                      "label_config": CONFIG})  # fmt: skip
    assert r.status_code == 200 and all(p["result"] == [] for p in r.json["results"])
    text = client.get("/metrics").get_data(as_text=True)
    assert f'hih_prediction_failures_total{{reason="forbidden_host"}} {len(urls)}' in text
    assert net.canary.hits == []


# ------------------------------------------------------------------------------------------ sizes, time
def test_downloads_stop_at_the_size_limit_and_the_deadline(net, fetcher) -> None:
    base = net.allowed.url
    message = refused(fetcher, f"{base}/declared-huge", reason="too_large", seconds=1.5)
    assert "over MAX_IMAGE_BYTES" in message
    refused(fetcher, f"{base}/infinite", reason="too_large", seconds=3)
    refused(fetcher, f"{base}/gzip-bomb", reason="too_large", seconds=3)  # counted after decompression
    assert "took over" in refused(fetcher, f"{base}/drip", reason="network", seconds=4)
    refused(fetcher, f"{base}/stall", reason="network", seconds=3)


def test_local_files_and_data_uris_have_the_same_limit(fetcher, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png() + b"\0" * (1024 * 1024))
    refused(fetcher, str(big), reason="too_large")
    refused(fetcher, f"file://{big}", reason="too_large")
    payload = base64.b64encode(b"\0" * (2 * 1024 * 1024)).decode()
    refused(fetcher, f"data:image/png;base64,{payload}", reason="too_large")
    small = base64.b64encode(png()).decode()
    assert fetcher.fetch(f"data:image/png;base64,{small}").shape == (24, 32, 3)


# ------------------------------------------------------------------------------------------ no pickle
class Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


def test_pickle_weights_are_refused_with_a_clear_error_and_never_unpickled(tmp_path: Path, no_unpickling,
                                                                         tiny_checkpoint: Path) -> None:
    from model.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(marker))
    cases: dict[str, Path] = {}
    for suffix in (".pt", ".pth", ".pkl", ".ckpt", ".bin"):
        cases[suffix] = tmp_path / f"model{suffix}"
        cases[suffix].write_bytes(evil)
    disguised = tmp_path / "disguised"  # a checkpoint folder whose weights file is a pickle
    disguised.mkdir()
    (disguised / "meta.json").write_text((tiny_checkpoint / "meta.json").read_text())
    (disguised / "model.safetensors").write_bytes(evil)
    cases["disguised"] = disguised
    only_pt = tmp_path / "only-pt"  # meta.json beside a model.pt
    only_pt.mkdir()
    (only_pt / "meta.json").write_text((tiny_checkpoint / "meta.json").read_text())
    (only_pt / "model.pt").write_bytes(evil)
    cases["only-pt"] = only_pt

    for name, weights in cases.items():
        model_api.clear_caches()
        client = create_app(Settings(weights=weights, device="cpu", threads=1), warm_up=False).test_client()
        r = client.post("/predict", json={"tasks": [{"data": {}}], "label_config": CONFIG})
        assert r.status_code == 503, (name, r.json)
        error = r.json["error"]
        if name.startswith("."):
            assert "pickle" in error and "safetensors" in error and "refusing to load" in error, error
            s = client.post("/setup", json={"schema": CONFIG})
            assert s.status_code == 503 and "pickle" in s.json["error"]
            assert "pickle" in client.get("/health").json["model_error"]
        else:
            assert "model unavailable" in error and ("safetensors" in error or "weights" in error), error
        with pytest.raises(CheckpointError):
            load_checkpoint(weights)
    assert not marker.exists()


def test_no_code_path_loads_checkpoints_with_pickle() -> None:
    """A static check of the shipped packages: no torch.load, pickle, joblib or dill; np.load only without
    pickles, except the one reader of a dataset's own file listed here with its reason."""
    allowed = {
        ("model/readers.py", "np.load(path, allow_pickle=True)"):
            "300-VW's broken-frames list, a dataset file read from HIH_DATA_DIR by training tools only",
    }  # fmt: skip
    pattern = re.compile(
        r"torch\.load\(|^\s*(import|from) (pickle|_pickle|dill|cloudpickle|joblib)\b"
        r"|\bpickle\.(load|Unpickler)|\bjoblib\.load\b|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
    )
    found = []
    for folder in ("model", "backend", "active_learning"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for line in path.read_text().splitlines():
                if pattern.search(line) and not line.strip().startswith("#"):
                    rel = str(path.relative_to(PROJECT_ROOT))
                    if not any(rel == f and snippet in line for f, snippet in allowed):
                        found.append(f"{rel}: {line.strip()}")
    for extra in ("hih_cli.py", "hih_settings.py"):
        for line in (PROJECT_ROOT / extra).read_text().splitlines():
            if pattern.search(line):
                found.append(f"{extra}: {line.strip()}")
    assert found == [], "pickle-capable loaders in the shipped code:\n" + "\n".join(found)


def test_registry_refuses_a_pickle_as_a_version(tmp_path: Path) -> None:
    from dataclasses import replace

    from active_learning import registry

    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / "model.pt").write_bytes(pickle.dumps({"w": 1}))
    (folder / "meta.json").write_text(json.dumps({"format": "hih-assist/1"}))
    s = replace(Settings(), model_dir=tmp_path / "models", redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(registry.RegistryError, match="not a checkpoint folder"):
        registry.publish(1, folder, {}, s, make_current=False)


# ------------------------------------------------------------------------------------------ the job's client
# The fine-tune job downloads task images with active_learning.ls_client.LabelStudioClient, which delegates
# to the same ImageFetcher as the backend: the same refusals must hold there.
def test_the_job_client_sends_no_token_to_a_backslash_authority(net) -> None:
    from active_learning.ls_client import ImageFetchError as ClientFetchError
    from active_learning.ls_client import LabelStudioClient

    net.canary.hits.clear()
    client = LabelStudioClient(net.ls.url, TOKEN, allowed_hosts=net.allowed.host, timeout=(1.0, 1.0))
    try:
        with pytest.raises(ClientFetchError):
            client.fetch_bytes(f"http://127.0.0.1:{net.canary.port}\\@127.0.0.1:{net.ls.port}/x.png")
        assert not any(h.get("Authorization") for _, h in net.canary.hits)
    finally:
        net.canary.hits.clear()


def test_the_job_client_refuses_pseudo_files() -> None:
    from active_learning.ls_client import ImageFetchError as ClientFetchError
    from active_learning.ls_client import LabelStudioClient

    client = LabelStudioClient("http://127.0.0.1:9", "")
    with pytest.raises(ClientFetchError):
        client.fetch_bytes("/proc/self/pagemap")
