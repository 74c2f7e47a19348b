"""Process-local counters for ``GET /metrics`` in the Prometheus text format (version 0.0.4).

Each gunicorn worker keeps its own counters (scrape each worker, or run one worker; the numbers are
per process, as ``process`` in the output says).
"""

from __future__ import annotations

import os
import threading
from collections import Counter, defaultdict

__all__ = ["METRICS", "Metrics"]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Thread-safe counters: requests by route and status, predictions, failures by reason, latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests: Counter[tuple[str, int]] = Counter()
            self.latency_sum: defaultdict[str, float] = defaultdict(float)
            self.latency_count: Counter[str] = Counter()
            self.tasks = 0
            self.predictions = 0
            self.faces = 0
            self.failures: Counter[str] = Counter()
            self.webhooks: Counter[str] = Counter()
            self.model_version = ""

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, int(status))] += 1
            self.latency_sum[route] += float(seconds)
            self.latency_count[route] += 1

    def observe_task(self, faces: int = 0, failure: str | None = None) -> None:
        with self._lock:
            self.tasks += 1
            if failure:
                self.failures[failure] += 1
            else:
                self.predictions += 1
                self.faces += int(faces)

    def observe_webhook(self, action: str) -> None:
        with self._lock:
            self.webhooks[action] += 1

    def set_model_version(self, version: str) -> None:
        with self._lock:
            self.model_version = version

    def render(self) -> str:
        with self._lock:
            pid = os.getpid()
            lines = [
                "# HELP hih_requests_total HTTP requests by route and status code.",
                "# TYPE hih_requests_total counter",
            ]
            lines += [
                f'hih_requests_total{{route="{_escape(r)}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP hih_request_seconds Request latency by route.",
                "# TYPE hih_request_seconds summary",
            ]
            for r in sorted(self.latency_count):
                lines.append(f'hih_request_seconds_sum{{route="{_escape(r)}"}} {self.latency_sum[r]:.6f}')
                lines.append(f'hih_request_seconds_count{{route="{_escape(r)}"}} {self.latency_count[r]}')
            lines += [
                "# HELP hih_tasks_total Tasks received by /predict.",
                "# TYPE hih_tasks_total counter",
                f"hih_tasks_total {self.tasks}",
                "# HELP hih_predictions_total Tasks answered with at least one face.",
                "# TYPE hih_predictions_total counter",
                f"hih_predictions_total {self.predictions}",
                "# HELP hih_faces_total Faces predicted.",
                "# TYPE hih_faces_total counter",
                f"hih_faces_total {self.faces}",
                "# HELP hih_prediction_failures_total Tasks answered with an empty prediction, by reason.",
                "# TYPE hih_prediction_failures_total counter",
            ]
            lines += [
                f'hih_prediction_failures_total{{reason="{_escape(k)}"}} {n}'
                for k, n in sorted(self.failures.items())
            ]
            lines += [
                "# HELP hih_webhooks_total Webhook events by action.",
                "# TYPE hih_webhooks_total counter",
            ]
            lines += [
                f'hih_webhooks_total{{action="{_escape(k)}"}} {n}' for k, n in sorted(self.webhooks.items())
            ]
            lines += [
                "# HELP hih_model_info The model version served (1 = current).",
                "# TYPE hih_model_info gauge",
                f'hih_model_info{{version="{_escape(self.model_version)}",process="{pid}"}} 1',
            ]
        return "\n".join(lines) + "\n"


METRICS = Metrics()
