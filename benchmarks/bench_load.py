"""Load test: the backend under gunicorn on loopback, /predict driven by concurrent clients for a bounded
time.

For each worker count (default 1 and 2) the script starts ``backend.serve.run_server`` (gunicorn, gthread
workers, ``THREADS`` torch threads each) on 127.0.0.1, warms every worker up (each loads the model on its
first request), then runs ``--clients`` client threads, each sending one ``/predict`` after another
(keep-alive) for ``--duration`` seconds, and reports throughput, p50/p90/p99 latency and errors (a non-200
answer, a transport error, or an answer that is not one prediction per task). Results: a table on stdout
and ``benchmarks/results/load.json``.

The model: ``--weights``, else the shipped ``weights/hih_cpu_300w`` when present, else the trained
``runs/default/best``, else a random-weight ``hih_tiny`` checkpoint (timings only); the JSON says which. The
image: a 300-W LFPW test face from ``HIH_DATA_DIR`` when present (so the detector finds a face and the full
pipeline runs), else a synthetic texture (no face: detection only).

    .venv/bin/python benchmarks/bench_load.py              # 1 and 2 workers x 1 and 4 clients, 20 s each
    .venv/bin/python benchmarks/bench_load.py --workers 1 2 4 --clients 8 --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from common import ROOT, print_table, write_results

CONFIG = (ROOT / "label_config.xml").read_text()


def pick_weights(given: str | None, scratch: Path) -> tuple[Path, str]:
    if given:
        return Path(given), "given (--weights)"
    candidates = [(ROOT / "weights" / "hih_cpu_300w", "shipped default (weights/hih_cpu_300w)"),
                  (ROOT / "runs" / "default" / "best", "trained default (runs/default/best)")]  # fmt: skip
    for path, what in candidates:
        if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
            return path, what
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(0)
    path = save_checkpoint(scratch / "tiny", HIHNet(get_config("hih_tiny")),
                           {"scheme": "300w_68", "version": "bench-tiny-random"})  # fmt: skip
    return path, "random-weight hih_tiny (no trained model found: timings only)"


def pick_image(scratch: Path) -> tuple[Path, str]:
    from hih_settings import Settings

    folder = Settings.from_env().data_dir / "300w" / "test" / "lfpw"
    images = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")) if folder.is_dir() else []
    if images:
        return images[0], f"300-W LFPW test face {images[0].name}"
    from PIL import Image

    rng = np.random.default_rng(0)
    path = scratch / "texture.png"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path)
    return path, "synthetic 640x480 texture (no face: detection only)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """``run_server`` in a child process (its own process group), stopped with SIGTERM."""

    def __init__(self, weights: Path, workers: int, threads: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HIH_WEIGHTS": str(weights), "HOST": "127.0.0.1", "PORT": str(self.port),
               "WORKERS": str(workers), "THREADS": str(threads), "HIH_DEVICE": "cpu", "LOG_LEVEL": "WARNING",
               "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}  # fmt: skip
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        code = "import sys; from backend.serve import run_server; sys.exit(run_server())"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=10).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the backend did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and its descendants (Linux /proc; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return total


def busy_others(exclude: set[int], seconds: float = 1.0, threshold: float = 0.2) -> list[str]:
    """Other processes that kept at least ``threshold`` of a core busy over ``seconds`` (competition for the
    cores that the numbers should be read with)."""
    def sample() -> dict[int, float]:
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                out[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
            except (OSError, ValueError, IndexError):
                continue
        return out

    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    first = sample()
    time.sleep(seconds)
    second = sample()
    found = []
    for pid, ticks in second.items():
        share = (ticks - first.get(pid, ticks)) / tick / seconds
        if pid not in exclude and share >= threshold:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            found.append(f"{share:.2f} cores: {cmd.strip()[:100]}")
    return found


def tree(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return out


def drive(url: str, body: bytes, n_tasks: int, clients: int, seconds: float) -> dict:
    """``clients`` threads posting ``body`` to /predict until ``seconds`` pass; latencies and errors."""
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    errors: dict[str, int] = {}
    faces = [0]
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            error = None
            try:
                r = session.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"},
                                 timeout=120)  # fmt: skip
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                else:
                    results = r.json().get("results")
                    if not isinstance(results, list) or len(results) != n_tasks:
                        error = "wrong number of predictions"
            except (requests.RequestException, ValueError) as exc:
                error = type(exc).__name__
            dt = time.perf_counter() - t0
            with lock:
                if error:
                    errors[error] = errors.get(error, 0) + 1
                else:
                    latencies.append(dt)
                    faces[0] += sum(1 for p in results if p["result"])

    t_start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    lat = np.array(latencies) * 1000.0
    done = len(latencies)
    return {
        "requests": done, "errors": sum(errors.values()), "error_kinds": errors, "wall_s": round(wall, 2),
        "throughput_rps": round(done / wall, 3) if wall else 0.0,
        "tasks_per_s": round(done * n_tasks / wall, 3) if wall else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if done else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 1) if done else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if done else None,
        "max_ms": round(float(lat.max()), 1) if done else None,
        "tasks_with_faces": faces[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="gunicorn worker counts")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent client counts")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per worker count")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (THREADS)")
    ap.add_argument("--tasks", type=int, default=1, help="tasks per /predict request")
    ap.add_argument("--weights", default=None, help="checkpoint folder (default: see the module docstring)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/load.json")
    args = ap.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="hih-bench-load-"))
    weights, weights_note = pick_weights(args.weights, scratch)
    image, image_note = pick_image(scratch)
    meta = json.loads((weights / "meta.json").read_text())
    print(f"model: {weights} -- {weights_note} (version {meta.get('version')})")
    print(f"image: {image} -- {image_note}")
    print(f"clients {args.clients}, {args.duration:.0f} s per run after {args.warmup:.0f} s warm-up, "
          f"{args.tasks} task(s) per request, {args.threads} torch thread(s) per worker, "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    tasks = [{"id": i + 1, "data": {"image": str(image)}} for i in range(args.tasks)]
    body = json.dumps({"tasks": tasks, "project": "1.1700000000", "label_config": CONFIG}).encode()

    rows = []
    for workers in args.workers:
        server = Backend(weights, workers, args.threads, scratch / f"gunicorn-{workers}.log")
        try:
            # warm-up: enough concurrent requests that every worker loads the model before measuring
            drive(server.url, body, args.tasks, max(*args.clients, 2 * workers), args.warmup)
            for clients in args.clients:
                others = busy_others(tree(server.proc.pid) | {os.getpid()})
                load_before, cpu_before = os.getloadavg()[0], cpu_seconds(server.proc.pid)
                row = {"workers": workers, "clients": clients,
                       **drive(server.url, body, args.tasks, clients, args.duration)}  # fmt: skip
                # cores the server kept busy, and the 1-minute load average before and after (other processes
                # competing for the cores show there)
                cpu = cpu_seconds(server.proc.pid) - cpu_before
                row["server_cores_busy"] = round(cpu / row["wall_s"], 2)
                row["cpu_ms_per_request"] = round(cpu * 1000 / max(1, row["requests"]), 1)
                row["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                row["other_busy_processes"] = others
                rows.append(row)
                for line in others:
                    print(f"    competing: {line}")
                print(f"  {workers} worker(s), {clients} client(s): {row['throughput_rps']} req/s, "
                      f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['errors']} errors, "
                      f"server busy on {row['server_cores_busy']} cores")  # fmt: skip
        finally:
            server.stop()
    base = rows[0]["throughput_rps"] or 1.0
    for row in rows:
        row["speedup"] = round(row["throughput_rps"] / base, 2)
    columns = ["workers", "clients", "requests", "throughput_rps", "speedup", "p50_ms", "p90_ms", "p99_ms",
               "max_ms", "errors", "server_cores_busy", "cpu_ms_per_request", "loadavg_1m"]
    print_table(rows, columns, title="/predict under load (loopback, gunicorn)")
    if not args.no_write:
        command = "python benchmarks/bench_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("load", {
            "model": {"path": str(weights), "which": weights_note, "version": meta.get("version"),
                      "config": meta.get("config", {})},
            "image": {"path": str(image), "which": image_note},
            "settings": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                         "torch_threads_per_worker": args.threads, "tasks_per_request": args.tasks,
                         "gunicorn": "gthread, 4 request threads per worker", "device": "cpu"},
            "runs": rows,
        }, command.strip())  # fmt: skip
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
