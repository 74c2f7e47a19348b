"""`make demo` end to end, and the README's screenshot taken from it in headless Chromium.

Runs ``scripts/demo.py`` as a user would (its own Label Studio, ``hih-assist serve`` with its fine-tune worker
and the embedded Redis, the default public-domain faces), with ``--screenshot``: the demo logs in to Label
Studio in headless Chromium and saves the labelling page of a pre-annotated face. Then it sends SIGTERM and
checks that the demo stopped everything it started.

``HIH_UPDATE_SCREENSHOT=1`` copies the picture to docs/screenshot.png (the README's), so that the picture
there is always one this test took and checked. Needs Label Studio (``make e2e-deps``), chromium (``make
e2e-tools``: Debian's, as root) and a trained model (the shipped weights, or ``HIH_WEIGHTS``); skips, saying
which is missing, otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from hih_settings import Settings

from .label_studio import DEFAULT_VENV, LabelStudioServer

ROOT = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"
FACE_REGIONS = 1 + 68  # a face box and its 68 points
READY_TIMEOUT = 600  # a first Label Studio start makes its SQLite database (~1 min; more on a busy machine)

pytestmark = pytest.mark.slow


def _missing(message: str) -> None:
    """Skip, or fail where the end-to-end tests are required (``HIH_E2E=require``, as in conftest.py)."""
    if os.environ.get("HIH_E2E", "").lower() == "require":
        pytest.fail(message + " (HIH_E2E=require)", pytrace=False)
    pytest.skip(message)


def _requirements() -> Path:
    if not LabelStudioServer.is_installed(DEFAULT_VENV):
        _missing(f"Label Studio is not installed in {DEFAULT_VENV}: `make e2e-deps`")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from screenshot import find_browser
    finally:
        sys.path.pop(0)
    if find_browser() is None:
        _missing("no chromium on PATH: `make e2e-tools` (as root), or HIH_CHROMIUM")
    weights = Settings.from_env().weights
    if not (weights / "meta.json").is_file():
        pytest.skip(f"needs a trained model at {weights} (the shipped weights, or set HIH_WEIGHTS)")
    return weights


def _listening(url: str) -> bool:
    u = urlparse(url)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((u.hostname or "127.0.0.1", u.port or 80)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_demo_runs_screenshots_a_preannotated_face_and_stops_everything(tmp_path: Path):
    weights = _requirements()
    shot = tmp_path / "screenshot.png"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "demo.py"), "--data-dir", str(tmp_path / "demo"),
        "--ls-port", "0", "--backend-port", "0", "--weights", str(weights), "--screenshot", str(shot),
        "--ready-json",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HOST", "PORT")}
    env["THREADS"] = env.get("THREADS", "1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    ready = None
    stopped = False
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while ready is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            if line is None:
                break
            output.append(line)
            if line.startswith('{"demo": "ready"'):
                ready = json.loads(line)
        assert ready is not None, "the demo never said it was ready:\n" + "".join(output)[-6000:]
        ready_seconds = time.monotonic() - t0

        # what the demo set up, as Label Studio stores it
        assert ready["model_version"], ready
        # Grace Hopper (matplotlib's sample data) always; the astronaut too where scikit-image (the `demo`
        # extra) is installed
        expected = 2 if importlib.util.find_spec("skimage") is not None else 1
        assert len(ready["tasks"]) >= expected and sum(ready["faces"]) >= expected, ready
        assert ready["workers"], "no fine-tune worker registered on the queue"
        text = "".join(output)
        assert "password" in text and "log in as" in text and f"/projects/{ready['project']}/" in text

        # the screenshot: the labelling page with a face box and its 68 points drawn
        pattern = re.compile(r"demo: screenshot of task \d+ \((\d+) regions\)")
        said = [m for line in output if (m := pattern.search(line))]
        assert said, "".join(output)[-3000:]
        regions = int(said[0].group(1))
        assert regions >= FACE_REGIONS and regions % FACE_REGIONS == 0, f"the editor showed {regions} regions"
        image = np.asarray(Image.open(shot).convert("RGB"))
        assert image.shape == (900, 1440, 3)
        assert image.std() > 30, "the screenshot is (nearly) blank"
        if os.environ.get("HIH_UPDATE_SCREENSHOT", "") not in ("", "0"):
            DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, DOCS_SCREENSHOT)

        # SIGTERM stops the worker, the backend, Label Studio and the embedded Redis
        assert _listening(ready["url"]) and _listening(ready["backend_url"])
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        while (line := lines.get(timeout=10)) is not None:
            output.append(line)
        assert rc == 0, "".join(output)[-4000:]
        assert "demo: stopped" in "".join(output)
        assert not _listening(ready["url"]), "Label Studio still answers after the demo stopped"
        assert not _listening(ready["backend_url"]), "the backend still answers after the demo stopped"
        alive = [pid for pid in ready["pids"] if _pid_alive(pid)]
        assert not alive, f"processes the demo started are still running: {alive}"
        stopped = True
        print(f"demo ready in {ready_seconds:.0f} s; screenshot {shot}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        for pid in [] if stopped else (ready or {}).get("pids", []):  # each in its own process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
