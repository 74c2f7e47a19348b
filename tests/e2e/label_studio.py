"""A real Label Studio server (1.23.x) for end-to-end tests, and thin REST helpers around it.

The server runs from its own venv (``.e2e/ls-venv``, made by ``scripts/install_label_studio.sh``), because the
``label-studio`` package pins older redis, rq and opencv than hih-assist. It listens on 127.0.0.1 on a free
port, keeps everything (SQLite database, uploads, log) in a temporary data directory, and has one admin user
with a fixed legacy API token. Use it as a context manager::

    with LabelStudioServer() as ls:
        pid = ls.create_project("faces", LABEL_CONFIG.read_text())
        task_ids = ls.upload_files(pid, [Path("a.jpg"), Path("b.jpg")])
        backend_id = ls.connect_ml_backend(pid, "http://127.0.0.1:9090")
        ls.retrieve_predictions(pid, task_ids)
        ls.get_predictions(task_ids[0])

Environment the server gets (1.23 refuses an ML backend on a loopback/private address otherwise, and
silently skips creating the ML backend's ``/webhook`` when SSRF protection is on):
``ML_BLOCK_LOCAL_IP=false``, ``SSRF_PROTECTION_ENABLED=false``, ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``
(plus ``--enable-legacy-api-token``; both only matter when the organisation is created, i.e. the first start),
``LATEST_VERSION_CHECK=false``, ``COLLECT_ANALYTICS=false``, ``SENTRY_DSN=`` (offline),
``LOCAL_FILES_SERVING_ENABLED=true`` with ``LOCAL_FILES_DOCUMENT_ROOT`` (``/data/local-files/?d=`` only serves
files under a Local Files import storage of the project: see :meth:`add_local_storage`).

Authentication: every helper sends ``Authorization: Token <legacy token>``. A personal access token (a JWT
refresh token) is available too: :meth:`create_personal_access_token` (``POST /api/token/``) and
:meth:`refresh_access_token` (``POST /api/token/refresh/`` -> ``Bearer <access>``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
# The same variable scripts/install_label_studio.sh installs into.
DEFAULT_VENV = Path(os.environ.get("HIH_E2E_VENV") or REPO_ROOT / ".e2e" / "ls-venv")
LABEL_CONFIG = REPO_ROOT / "label_config.xml"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_label_studio.sh"

# Variables Label Studio reads WITHOUT a prefix (its get_env tries LABEL_STUDIO_X, HEARTEX_X, then X) and
# that a test process may well have set for something else (hih-assist itself reads HOST, PORT, LOG_LEVEL):
# they are removed from the server's environment, as is every inherited LABEL_STUDIO_* / HEARTEX_* one.
_SCRUBBED_ENV = (
    "HOST",
    "PORT",
    "LOG_LEVEL",
    "DEBUG",
    "USERNAME",
    "PASSWORD",
    "USER_TOKEN",
    "DJANGO_DB",
    "DATABASE_NAME",
    "BASE_DATA_DIR",
    "SENTRY_DSN",
    "FRONTEND_SENTRY_DSN",
    "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH",
    "VIRTUAL_ENV",
)


class LabelStudioError(RuntimeError):
    """The server did not start, or an API call answered with an error (the message holds the details)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a race is possible; :class:`LabelStudioServer` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _no_proxy(current: str | None) -> str:
    hosts = [h for h in (current or "").split(",") if h.strip()]
    return ",".join([*hosts, *(h for h in ("127.0.0.1", "localhost", "::1") if h not in hosts)])


def tail(path: Path, max_chars: int = 6000) -> str:
    """The last ``max_chars`` characters of a text file ('' when missing)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-max_chars:].decode("utf-8", errors="replace")


class LabelStudioServer:
    """A ``label-studio start`` subprocess with a throw-away data directory, and REST helpers.

    Attributes once started: ``url`` (``http://127.0.0.1:<port>``), ``port``, ``token`` (legacy API
    token), ``username``/``password`` (the admin user), ``data_dir``, ``log_path``, ``startup_seconds``,
    ``session`` (a ``requests.Session`` that sends the token).
    """

    def __init__(
        self,
        venv: Path | str = DEFAULT_VENV,
        *,
        port: int | None = None,
        data_dir: Path | str | None = None,
        username: str = "admin@hih-assist.test",
        password: str = "hih-assist-e2e",
        token: str = "hih0e2e0legacy0token0000000000000000000",
        local_files_root: Path | str = "/",
        log_level: str = "INFO",
        startup_timeout: float = 180.0,
        keep_data: bool = False,
        use_template: bool = True,
        extra_env: dict[str, str] | None = None,
    ):
        self.venv = Path(venv)
        self.executable = self.venv / "bin" / "label-studio"
        self._requested_port = port
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self.username = username
        self.password = password
        self.token = token
        self.local_files_root = Path(local_files_root)
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_data = keep_data
        self.use_template = use_template
        self.from_template = False
        self.extra_env = dict(extra_env or {})

        self.port: int | None = None
        self.url: str = ""
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # a loopback server: no proxies, no .netrc
        self.session.headers["Authorization"] = f"Token {token}"
        self._anon = requests.Session()  # for requests with caller-chosen (or no) credentials
        self._anon.trust_env = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._own_data_dir = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def is_installed(cls, venv: Path | str = DEFAULT_VENV) -> bool:
        return (Path(venv) / "bin" / "label-studio").exists()

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SCRUBBED_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))
        }
        assert self.data_dir is not None
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "LOCAL_FILES_SERVING_ENABLED": "true",
                "LOCAL_FILES_DOCUMENT_ROOT": str(self.local_files_root),
                "PYTHONUNBUFFERED": "1",
                # Label Studio calls the ML backend with requests: keep loopback off any proxy
                "NO_PROXY": _no_proxy(os.environ.get("NO_PROXY") or os.environ.get("no_proxy")),
                "no_proxy": _no_proxy(os.environ.get("NO_PROXY") or os.environ.get("no_proxy")),
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudioServer:
        """Start the server and wait until ``/health`` answers and the token works (or raise)."""
        if self._proc is not None:
            return self
        if not self.executable.exists():
            raise LabelStudioError(
                f"{self.executable} not found: run `make e2e-deps` (scripts/install_label_studio.sh) first"
            )
        if self._given_data_dir is not None:
            self.data_dir = self._given_data_dir
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="hih-label-studio-"))
            self._own_data_dir = True
            self.from_template = self.use_template and self._copy_template(self.data_dir)
        self.log_path = self.data_dir / "label-studio.log"
        t0 = time.monotonic()
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            port = self._requested_port or free_port()
            try:
                self._launch(port)
                self._wait_ready(t0)
                self.startup_seconds = time.monotonic() - t0
                if self._own_data_dir and self.use_template and not self.from_template:
                    self._save_template()
                return self
            except _PortTakenError:
                self._terminate()
                if attempt == attempts - 1:
                    self.keep_data = True  # keep the log the message points to
                    self.stop()
                    raise LabelStudioError(f"port {port} was taken; log:\n{tail(self.log_path)}") from None
            except BaseException:
                self.keep_data = True
                self.stop()
                raise
        raise AssertionError("unreachable")

    # A fresh SQLite database takes Label Studio ~30-45 s to migrate; a migrated one starts in ~4 s. So the
    # first start saves its pristine database (admin user, organisation, token; no projects) and .env (the
    # SECRET_KEY) as a template under .e2e/, keyed by the Label Studio version and the user's credentials,
    # and later starts copy it into their own fresh data directory.

    def template_dir(self) -> Path:
        dists = sorted(p.name for p in self.venv.glob("lib/python*/site-packages/label_studio-*.dist-info"))
        key = "|".join([*dists, self.username, self.password, self.token])
        return self.venv.parent / "ls-template" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def _copy_template(self, data_dir: Path) -> bool:
        tpl = self.template_dir()
        if not (tpl / "label_studio.sqlite3").is_file():
            return False
        for name in ("label_studio.sqlite3", ".env"):
            if (tpl / name).is_file():
                shutil.copy2(tpl / name, data_dir / name)
        return True

    def _save_template(self) -> None:
        assert self.data_dir is not None
        tpl = self.template_dir()
        if tpl.exists():
            return
        tmp: Path | None = None
        try:
            tpl.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=tpl.parent))
            src = sqlite3.connect(self.data_dir / "label_studio.sqlite3")
            dst = sqlite3.connect(tmp / "label_studio.sqlite3")
            with dst:
                src.backup(dst)  # consistent copy while the server runs
            src.close()
            dst.close()
            if (self.data_dir / ".env").is_file():
                shutil.copy2(self.data_dir / ".env", tmp / ".env")
            os.rename(tmp, tpl)  # atomic; loses harmlessly to a concurrent run that got there first
            tmp = None
        except (OSError, sqlite3.Error):
            pass  # only an optimisation
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _launch(self, port: int) -> None:
        assert self.data_dir is not None and self.log_path is not None
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            str(self.executable),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(self.data_dir),
            "--username",
            self.username,
            "--password",
            self.password,
            "--user-token",
            self.token,
            "--enable-legacy-api-token",
            "--log-level",
            self.log_level,
        ]
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() takes its children too
        )

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None and self.log_path is not None
        deadline = t0 + self.startup_timeout
        while True:
            log = tail(self.log_path, 20000)
            # Label Studio silently moves to the next port when its port is busy: treat that as a failed try.
            if re.search(rf"Port {self.port} is in use", log):
                raise _PortTakenError()
            code = self._proc.poll()
            if code is not None:
                raise LabelStudioError(
                    f"label-studio exited with code {code} during startup; log {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            with contextlib.suppress(requests.RequestException):
                r = self._anon.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"label-studio did not answer {self.url}/health within {self.startup_timeout:.0f} s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.5)
        who = self.session.get(f"{self.url}/api/current-user/whoami", timeout=10)
        if who.status_code != 200 or who.json().get("email") != self.username:
            raise LabelStudioError(
                f"server on {self.url} is up but does not accept the legacy token for {self.username} "
                f"({who.status_code}: {who.text[:500]}); log:\n{tail(self.log_path)}"
            )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Stop the server (its whole process group) and remove the temporary data directory."""
        self._terminate()
        if self._own_data_dir and not self.keep_data and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._own_data_dir = False

    def log_tail(self, max_chars: int = 6000) -> str:
        return tail(self.log_path, max_chars) if self.log_path else ""

    # ------------------------------------------------------------------ raw API

    def request(self, method: str, path: str, *, ok: Iterable[int] = (200, 201, 204), **kwargs: Any) -> Any:
        """``method`` on ``url + path`` with the token -> the JSON (None if empty).

        Raises LabelStudioError, with the response body, on a status not in ``ok``."""
        kwargs.setdefault("timeout", 120)
        r = self.session.request(method, f"{self.url}{path}", **kwargs)
        if r.status_code not in set(ok):
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:3000]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def version(self) -> dict[str, Any]:
        return self.get("/api/version")

    # ------------------------------------------------------------------ projects and tasks

    def create_project(self, title: str, label_config: str, **fields: Any) -> int:
        """``POST /api/projects`` -> project id. Label Studio validates ``label_config`` here (400 if bad)."""
        return self.post("/api/projects", json={"title": title, "label_config": label_config, **fields})["id"]

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self.get(f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        """``PATCH /api/projects/{id}``, e.g. ``update_project(pid, model_version="hih-v2")``."""
        return self.patch(f"/api/projects/{project_id}", json=fields)

    def set_model_version(self, project_id: int, model_version: str) -> dict[str, Any]:
        """``PATCH /api/projects/{id} {"model_version": ...}``.

        Label Studio 1.23 accepts only an ML backend's *title* or the model_version of a prediction that
        already exists in the project (else 400 "Model version doesn't exist either as live model or as
        static predictions"): retrieve or import predictions of a new version first, then set it. The Data
        Manager's prediction score averages only predictions of this version."""
        return self.update_project(project_id, model_version=model_version)

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Import JSON tasks (``{"data": {...}}`` or bare data dicts, predictions allowed) -> new task ids."""
        out = self.post(
            f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=list(tasks)
        )
        return list(out.get("task_ids", []))

    def upload_files(self, project_id: int, paths: Sequence[Path | str]) -> list[int]:
        """Upload image files as new tasks -> task ids (``data.image = "/data/upload/<project>/<name>"``).

        Each file gets its own multipart field name: Label Studio reads ``request.FILES.items()``, which keeps
        only the LAST file of a repeated field name.
        """
        with contextlib.ExitStack() as stack:
            files = {}
            for i, p in enumerate(map(Path, paths)):
                mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
                files[f"file{i}"] = (p.name, stack.enter_context(open(p, "rb")), mime)
            out = self.post(
                f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, files=files
            )
        return list(out.get("task_ids", []))

    upload_images = upload_files

    def list_tasks(
        self, project_id: int, *, page_size: int = 1000, fields: str = "all"
    ) -> list[dict[str, Any]]:
        """All tasks of a project (``GET /api/tasks?project=``), with annotations and predictions when
        ``fields="all"``."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            out = self.request(
                "GET",
                "/api/tasks",
                ok=(200, 404),
                params={"project": project_id, "page": page, "page_size": page_size, "fields": fields},
            )
            batch = out.get("tasks", []) if isinstance(out, dict) else []
            tasks.extend(batch)
            total = out.get("total", len(tasks)) if isinstance(out, dict) else len(tasks)
            if not batch or len(tasks) >= total:
                return tasks
            page += 1

    def get_task(self, task_id: int) -> dict[str, Any]:
        return self.get(f"/api/tasks/{task_id}")

    def download(self, path_or_url: str, *, headers: dict[str, str] | None = None) -> requests.Response:
        """GET a task's file (``/data/upload/...``, ``/data/local-files/?d=...``).

        Sends the legacy token, or exactly ``headers`` when given (``{}``: anonymous)."""
        url = path_or_url if path_or_url.startswith("http") else f"{self.url}{path_or_url}"
        if headers is None:
            return self.session.get(url, timeout=60)
        return self._anon.get(url, headers=headers, timeout=60)

    # ------------------------------------------------------------------ annotations and predictions

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """``POST /api/tasks/{id}/annotations`` -> the annotation (fires ANNOTATION_CREATED webhooks)."""
        return self.post(f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def update_annotation(
        self, annotation_id: int, result: list[dict[str, Any]], **fields: Any
    ) -> dict[str, Any]:
        return self.patch(f"/api/annotations/{annotation_id}", json={"result": result, **fields})

    def get_annotations(self, task_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/tasks/{task_id}/annotations")

    def get_predictions(self, task_id: int) -> list[dict[str, Any]]:
        """``GET /api/predictions?task=`` -> predictions of one task (result, score, model_version, ...)."""
        return self.get("/api/predictions", params={"task": task_id})

    def list_predictions(self, project_id: int) -> list[dict[str, Any]]:
        return self.get("/api/predictions", params={"project": project_id})

    def create_prediction(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        *,
        score: float | None = None,
        model_version: str = "",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"task": task_id, "result": result, "model_version": model_version}
        if score is not None:
            body["score"] = score
        return self.post("/api/predictions", json=body)

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Data Manager action "Retrieve predictions": Label Studio calls the project's ML backend
        ``/predict`` for the tasks (all of them when ``task_ids`` is None) and stores the predictions.
        Synchronous in the open-source edition (no Redis): it returns once the backend has answered.

        ``POST /api/dm/actions?id=retrieve_tasks_predictions&project=<id>`` with
        ``{"selectedItems": {"all": false, "included": [ids]}}``.
        """
        selected = (
            {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
        )
        return self.post(
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )

    # ------------------------------------------------------------------ ML backends and webhooks

    def connect_ml_backend(
        self, project_id: int, url: str, *, title: str = "hih-assist", **fields: Any
    ) -> int:
        """``POST /api/ml`` -> backend id.

        Label Studio calls the backend's ``GET /health`` and ``POST /setup`` before it answers (400 if
        either fails) and creates a project webhook to ``<url>/webhook`` (all actions, with payload).
        If the project had no model_version, Label Studio sets it to ``title`` (not to the version /setup
        returned): call :meth:`set_model_version` afterwards. ``fields``: e.g. ``is_interactive=True``,
        ``auth_method="BASIC_AUTH", basic_auth_user=..., basic_auth_pass=...``, ``extra_params``."""
        body = {"project": project_id, "url": url, "title": title, **fields}
        return self.post("/api/ml", json=body)["id"]

    def list_ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """``GET /api/ml?project=`` (Label Studio re-checks each backend's health and setup here)."""
        return self.get("/api/ml", params={"project": project_id})

    def get_ml_backend(self, backend_id: int) -> dict[str, Any]:
        return self.get(f"/api/ml/{backend_id}")

    def train_ml_backend(self, backend_id: int) -> None:
        """``POST /api/ml/{id}/train``: in 1.23 Label Studio POSTs ``{"action": "START_TRAINING", "project":
        {...}}`` to the backend's ``/webhook`` (feature flag ff_back_dev_1417 is on), not to ``/train``."""
        self.post(f"/api/ml/{backend_id}/train", json={})

    def list_webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return self.get("/api/webhooks", params={"project": project_id})

    # ------------------------------------------------------------------ local files

    def add_local_storage(
        self, project_id: int, path: Path | str, *, sync: bool = False, **fields: Any
    ) -> int:
        """A Local Files import storage on ``path`` (a directory strictly under ``local_files_root``) -> id.

        Needed for ``/data/local-files/?d=<path relative to the root>`` URLs to be served at all; with
        ``sync=True`` Label Studio also creates one task per file (``use_blob_urls``: data.image = the URL).
        """
        body = {
            "project": project_id,
            "path": str(Path(path).resolve()),
            "title": fields.pop("title", Path(path).name),
            "use_blob_urls": fields.pop("use_blob_urls", True),
            **fields,
        }
        storage_id = self.post("/api/storages/localfiles", json=body)["id"]
        if sync:
            self.post(f"/api/storages/localfiles/{storage_id}/sync", json={})
        return storage_id

    def local_file_url(self, path: Path | str) -> str:
        """The ``/data/local-files/?d=...`` URL (server-relative) of a file under ``local_files_root``."""
        rel = Path(path).resolve().relative_to(self.local_files_root.resolve())
        return f"/data/local-files/?d={rel.as_posix()}"

    # ------------------------------------------------------------------ tokens

    def current_user(self) -> dict[str, Any]:
        return self.get("/api/current-user/whoami")

    def create_personal_access_token(self) -> str:
        """A personal access token (JWT refresh token) for the admin user: ``POST /api/token/``.

        Label Studio allows one live token per user (a second ``POST`` answers 409) and ``GET /api/token/``
        lists only truncated tokens, so this helper makes it once per server and returns the same one after.
        Org setting ``api_tokens_enabled`` (``GET /api/jwt/settings``) is on by default in 1.23."""
        cached = getattr(self, "_pat", None)
        if cached:
            return cached
        out = self.post("/api/token/", json={})
        self._pat: str = out["token"]
        return self._pat

    def refresh_access_token(self, refresh_token: str) -> str:
        """``POST /api/token/refresh/ {"refresh": ...}`` -> a short-lived access token (for ``Bearer``)."""
        r = self._anon.post(f"{self.url}/api/token/refresh/", json={"refresh": refresh_token}, timeout=30)
        if r.status_code != 200:
            raise LabelStudioError(f"POST /api/token/refresh/ -> {r.status_code}: {r.text[:2000]}")
        return r.json()["access"]


class _PortTakenError(Exception):
    pass


class StubMLBackend:
    """A tiny ML backend on 127.0.0.1 (a thread) that speaks just enough of the protocol for Label Studio:
    ``GET /health`` -> ``{"status": "UP"}``, ``POST /setup`` -> ``{"model_version": ...}``, ``POST /predict``
    -> ``predict(tasks)`` (default: no regions), ``POST /webhook`` -> 201. Every request is appended to
    ``calls`` as ``(method, path, json_body_or_None)``. A context manager; ``url`` once started."""

    def __init__(
        self,
        model_version: str = "stub-v1",
        predict: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    ):
        self.model_version = model_version
        self.predict = predict or (lambda tasks: [{"result": [], "score": 0.0} for _ in tasks])
        self.calls: list[tuple[str, str, Any]] = []
        self.url = ""
        self._server: ThreadingHTTPServer | None = None

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _ in self.calls if method is None or m == method]

    def __enter__(self) -> StubMLBackend:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                stub.calls.append(("GET", self.path, None))
                if self.path.startswith("/health"):
                    self._reply(200, {"status": "UP", "model_class": "StubMLBackend"})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", errors="replace")
                stub.calls.append(("POST", self.path, body))
                if self.path == "/setup":
                    self._reply(200, {"model_version": stub.model_version})
                elif self.path == "/predict":
                    results = stub.predict((body or {}).get("tasks", []))
                    for r in results:
                        r.setdefault("model_version", stub.model_version)
                    self._reply(200, {"results": results})
                elif self.path == "/webhook":
                    self._reply(201, {})
                else:
                    self._reply(404, {"error": "not found"})

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="stub-ml-backend", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
