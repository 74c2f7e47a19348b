"""A headless-Chromium screenshot of a Label Studio task's labelling page, with the user logged in.

``screenshot_task(url, username, password, project, task, out_png)`` logs in through Label Studio's own login
form (``requests``: the Django session cookie), starts Debian's ``chromium`` headless, drives it over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: no websocket library, no port), hands it the session
cookie, opens ``/projects/<project>/data?task=<task>`` and waits until the editor has drawn the task's regions
(the pre-annotation), then saves a PNG. Used by ``scripts/demo.py --screenshot`` and
tests/e2e/test_demo_screenshot.py (which keeps docs/screenshot.png true).

    python scripts/screenshot.py --url http://127.0.0.1:8080 --user admin@x --password ... \
        --project 1 --task 1 --out shot.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ScreenshotError(RuntimeError):
    pass


@dataclass
class Shot:
    """A saved screenshot: the PNG, the regions the editor showed, the URL, what the zoom did."""

    path: Path
    regions: int
    url: str
    zoom: str = ""


def find_browser() -> str | None:
    """Chromium's executable (``$HIH_CHROMIUM`` or one on PATH), or None."""
    explicit = os.environ.get("HIH_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def login_cookies(url: str, username: str, password: str) -> dict[str, str]:
    """Log in with Label Studio's form (``/user/login/``) -> its cookies (``sessionid``, ``csrftoken``)."""
    import requests

    s = requests.Session()
    s.trust_env = False
    page = s.get(f"{url}/user/login/", timeout=30)
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    token = match.group(1) if match else s.cookies.get("csrftoken", "")
    r = s.post(
        f"{url}/user/login/",
        data={"email": username, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{url}/user/login/"},
        timeout=30,
        allow_redirects=False,
    )
    cookies = {c.name: c.value for c in s.cookies}
    if r.status_code not in (301, 302) or "sessionid" not in cookies:
        raise ScreenshotError(f"Label Studio login as {username} failed ({r.status_code}): {r.text[:500]}")
    return cookies


class DevTools:
    """Chromium's DevTools protocol on ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, browser: str, width: int, height: int, log: Path):
        self.profile = Path(tempfile.mkdtemp(prefix="hih-chromium-"))
        # chromium reads commands on fd 3 and answers on fd 4: bash puts the pipe ends there (moved above 9
        # first, so that no redirection clobbers another; dash knows only fds 0-9)
        r0, self._to_child = os.pipe()
        self._from_child, w0 = os.pipe()
        r, w = fcntl.fcntl(r0, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(w0, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(r0)
        os.close(w0)
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--no-first-run", "--no-default-browser-check", "--mute-audio",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--proxy-server=direct://", "--proxy-bypass-list=*",
            f"--window-size={width},{height}", f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe", "about:blank",
        ]
        script = f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-'
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", script, browser, *args], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(r, w), start_new_session=True,
        )
        os.close(r)
        os.close(w)
        self._buffer = b""
        self._id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise ScreenshotError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise ScreenshotError(f"{method}: no answer from chromium (exit code {self.proc.poll()})")
            import select

            ready, _, _ = select.select([self._from_child], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise ScreenshotError(f"{method}: chromium closed the DevTools pipe")
                self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


# How many regions the editor shows for the task, once its image is loaded and laid out (-1 before). Label
# Studio's editor keeps its state in window.Htx (mobx-state-tree): the selected annotation (the draft made
# from the prediction), its regions, and the image tag with its natural and on-screen sizes.
_REGIONS_JS = """
((tag) => {
  try {
    const a = window.Htx.annotationStore.selected;
    const img = a.names.get(tag);
    const el = document.querySelector('img[src*="/data/"]');
    if (!img || !(img.naturalWidth > 0) || !(img.stageWidth > 0) || (el && !el.complete)) return -1;
    return a.regionStore.regions.length;
  } catch (e) {
    return -1;
  }
})(%s)
"""


# Zoom the image so that the first face box fills ``fill`` of the canvas, centred on it (the image tag's own
# zoom: setZoom takes screen pixels per image pixel; the position is the image's offset in the canvas).
_ZOOM_JS = """
((fill) => {
  const a = window.Htx.annotationStore.selected;
  const img = a.names.get(%s);
  const r = a.regionStore.regions.find(r => r.type === 'rectangleregion');
  if (!img || !r) return 'no image tag or no face box';
  const cw = img.containerWidth, ch = img.containerHeight, nw = img.naturalWidth, nh = img.naturalHeight;
  const base = img.stageWidth / nw;
  img.setZoom(Math.min(fill * ch / (r.height / 100 * nh), fill * cw / (r.width / 100 * nw)));
  const s = img.zoomScale * base;
  const cx = (r.x + r.width / 2) / 100 * nw, cy = (r.y + r.height / 2) / 100 * nh;
  img.setZoomPosition(cw / 2 - cx * s, ch / 2 - cy * s);
  return 'zoom ' + s.toFixed(2);
})(%s)
"""


def screenshot_task(
    url: str,
    username: str,
    password: str,
    project_id: int,
    task_id: int,
    out_png: Path | str,
    *,
    width: int = 1440,
    height: int = 900,
    timeout: float = 120,
    min_regions: int = 1,
    settle: float = 3.0,
    zoom_to_face: float | None = 0.6,
    image_tag: str = "image",
) -> Shot:
    """Save a PNG of the task's labelling page (logged in as ``username``).

    Waits until the editor shows at least ``min_regions`` regions (the pre-annotation), then ``settle``
    seconds for the canvas to finish drawing. ``zoom_to_face``: zoom so that the first face box fills this
    share of the canvas (None: the whole image). Raises ScreenshotError (with what the page showed) when the
    regions do not appear."""
    browser = find_browser()
    if browser is None:
        raise ScreenshotError("no chromium on PATH (apt-get install chromium, or set HIH_CHROMIUM)")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    cookies = login_cookies(url, username, password)
    cdp = DevTools(browser, width, height, out.with_suffix(".chromium.log"))
    try:
        targets = cdp.send("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        if page is None:
            page = cdp.send("Target.createTarget", {"url": "about:blank"})
        target_id = page["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Network.enable"):
            cdp.send(method, session=session)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        cdp.send("Network.setCookies", {"cookies": [
            {"name": k, "value": v, "url": url, "path": "/"} for k, v in cookies.items()
        ]}, session=session)
        page_url = f"{url}/projects/{project_id}/data?task={task_id}"
        cdp.send("Page.navigate", {"url": page_url}, session=session)
        deadline = time.monotonic() + timeout
        regions = -1
        while time.monotonic() < deadline:
            time.sleep(1.0)
            value = cdp.send("Runtime.evaluate", {"expression": _REGIONS_JS % json.dumps(image_tag),
                                                  "returnByValue": True}, session=session)
            regions = value.get("result", {}).get("value", -1)
            if isinstance(regions, (int, float)) and regions >= min_regions:
                break
        else:
            text = cdp.send("Runtime.evaluate", {
                "expression": "location.href + ' | ' + document.title + ' | ' + "
                              "(document.body ? document.body.innerText.slice(0, 600) : '')",
                "returnByValue": True}, session=session)
            raise ScreenshotError(f"the page showed {regions} region(s) after {timeout:.0f} s: "
                                  f"{text.get('result', {}).get('value')}")
        zoom = ""
        if zoom_to_face:
            time.sleep(1.0)  # let the editor finish its own first layout, which would reset a zoom
            reply = cdp.send("Runtime.evaluate", {"expression": _ZOOM_JS % (json.dumps(image_tag),
                                                                            float(zoom_to_face)),
                                                  "returnByValue": True}, session=session)
            zoom = str(reply.get("result", {}).get("value", reply.get("exceptionDetails", "")))
        time.sleep(settle)
        shot = cdp.send("Page.captureScreenshot", {"format": "png"}, session=session)
        out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        cdp.close()
    return Shot(out, int(regions), page_url, zoom)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--task", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--zoom", type=float, default=0.6, help="share of the canvas the face fills (0: no zoom)")
    args = p.parse_args(argv)
    try:
        out = screenshot_task(args.url, args.user, args.password, args.project, args.task, args.out,
                              width=args.width, height=args.height, zoom_to_face=args.zoom or None)
    except ScreenshotError as exc:
        print(f"screenshot: error: {exc}", file=sys.stderr)
        return 1
    print(f"{out.path}: {out.regions} regions, {out.zoom or 'no zoom'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
