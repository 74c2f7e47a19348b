"""Project-wide pre-annotation: an RQ job that predicts every task the current model version has not
predicted yet, and writes the predictions to Label Studio in batches.

Why a job: Label Studio's "Retrieve predictions" action is one synchronous request to the ML backend for every
selected task and times out on large projects. This job walks the project in batches of ``batch_size`` tasks:
it asks the ML backend (``POST /predict``, the same protocol Label Studio uses, so the results are exactly
what an annotator would get) and writes each prediction with ``POST /api/predictions``.

- Model version: the ML backend's answer to ``POST /setup`` (what it predicts with now), unless given.
- Idempotent and resumable: Label Studio is the record. The job lists the project's tasks with
  ``predictions_model_versions`` and skips those that already have a prediction of the version; right before
  writing, it checks each task again (``GET /api/predictions?task=``). A job killed part-way and started
  again continues where it stopped and never writes a second prediction of the same version for a task.
- Several workers: the same job can be queued several times (``enqueue_preannotate(copies=N)``); each copy
  claims the tasks of a batch in Redis (``SET NX`` with a TTL, ``<ns>:preannotate:<project>:<version>:
  claim:<task>``) before predicting them, so copies share the work instead of repeating it. A killed copy's
  claims expire after ``claim_ttl`` seconds, and the remaining copies (or a restart) take those tasks.
- Progress: ``job.meta`` (``total``, ``done``, ``written``, ``existing``, ``failed``, ``batches``, ``state``,
  ``version``), saved after every batch; the task's uncertainty goes into the review ranking as it is written.
- Failures: a batch the ML backend fails on is counted in ``failed`` (its tasks are retried by the next run);
  a task the backend answers with no regions (no face, unreadable image) gets that empty prediction (score 0:
  it ranks first for review).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import requests

from active_learning.review import (
    LabelStudioAPI,
    LabelStudioAPIError,
    _versions,
    namespace,
    review_key,
)
from active_learning.uncertainty import score_to_uncertainty

log = logging.getLogger(__name__)

__all__ = [
    "JOB_FUNCTION",
    "MLBackendClient",
    "VersionChangedError",
    "backend_auth",
    "enqueue_preannotate",
    "job_progress",
    "preannotate_project",
    "project_backend_url",
    "run_preannotate",
]

JOB_FUNCTION = "active_learning.preannotate.run_preannotate"
DEFAULT_BATCH = 16
DEFAULT_CLAIM_TTL = 300
JOB_TIMEOUT = 24 * 3600


class VersionChangedError(RuntimeError):
    """The ML backend switched model versions during the job (a fine-tune was published): stop cleanly."""


class MLBackendClient:
    """Calls an ML backend the way Label Studio does (``/setup``, ``/predict``)."""

    def __init__(self, url: str, timeout: float = 300.0, auth: tuple[str, str] | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if auth and auth[0]:
            self.session.auth = auth

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.session.post(f"{self.url}{path}", json=body, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"ML backend POST {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def setup(self, project_id: int, label_config: str, hostname: str = "", access_token: str = "") -> str:
        """``POST /setup`` -> the model version the backend predicts with for the project."""
        body = {"project": f"{int(project_id)}.{int(time.time())}", "schema": label_config,
                "hostname": hostname, "access_token": access_token, "extra_params": {}}
        out = self._post("/setup", body)
        version = out.get("model_version")
        if not version:
            raise RuntimeError(f"ML backend {self.url} /setup gave no model_version: {out}")
        return str(version)

    def predict(self, project_id: int, tasks: list[dict[str, Any]], label_config: str) -> list[dict]:
        """``POST /predict`` -> one prediction per task, in order."""
        out = self._post("/predict", {"tasks": tasks, "project": f"{int(project_id)}.{int(time.time())}",
                                      "label_config": label_config, "params": {}})
        results = out.get("results")
        if not isinstance(results, list) or len(results) != len(tasks):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise RuntimeError(f"ML backend {self.url} /predict gave {got} results for {len(tasks)} tasks")
        return results


def backend_auth(settings: Any) -> tuple[str, str] | None:
    """Basic-auth credentials for the ML backend (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``), or None."""
    user = getattr(settings, "basic_auth_user", "") if settings is not None else ""
    return (user, getattr(settings, "basic_auth_pass", "")) if user else None


def project_backend_url(api: LabelStudioAPI, project_id: int) -> str | None:
    """URL of the ML backend connected to the project in Label Studio (the first one), or None."""
    try:
        backends = api.ml_backends(project_id)
    except LabelStudioAPIError as exc:
        log.warning("cannot list the ML backends of project %s: %s", project_id, exc)
        return None
    return str(backends[0]["url"]) if backends else None


# ------------------------------------------------------------------------------------------- claims
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _claim_key(ns: str, project_id: int, version: str, task_id: int) -> str:
    return f"{ns}:preannotate:{int(project_id)}:{version}:claim:{int(task_id)}"


def _claim(conn: Any, keys: list[str], token: str, ttl: int) -> list[bool]:
    if conn is None:
        return [True] * len(keys)
    pipe = conn.pipeline(transaction=False)
    for k in keys:
        pipe.set(k, token, nx=True, ex=int(ttl))
    return [bool(x) for x in pipe.execute()]


def _release(conn: Any, keys: list[str], token: str) -> None:
    if conn is None:
        return
    for k in keys:
        conn.eval(_RELEASE, 1, k, token)


# ---------------------------------------------------------------------------------------------- job
def _current_job():
    try:
        from rq import get_current_job

        return get_current_job()
    except Exception:  # noqa: BLE001 - outside a worker, or rq absent
        return None


def preannotate_project(
    project_id: int,
    *,
    api: LabelStudioAPI | None = None,
    settings: Any = None,
    backend_url: str | None = None,
    model_version: str | None = None,
    batch_size: int = DEFAULT_BATCH,
    conn: Any = None,
    ns: str | None = None,
    claim_ttl: int = DEFAULT_CLAIM_TTL,
    predict: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_seconds: float = 2.0,
) -> dict[str, Any]:
    """Predict and write every task of the project that has no prediction of the model version.

    ``api``: a Label Studio client (default: from ``settings``). The ML backend is ``backend_url``, else the
    one connected to the project; ``predict`` (tasks -> predictions) replaces it entirely (then
    ``model_version`` is required). ``conn``: Redis for the work-sharing claims and the review ranking
    (None: neither, for a single process). Returns the final progress dict (see the module docstring).
    """
    if settings is None and (api is None or conn is None):
        from hih_settings import Settings

        settings = Settings.from_env()
    api = api or LabelStudioAPI.from_settings(settings)
    ns = ns or namespace(settings)
    project_id = int(project_id)
    project = api.project(project_id)
    label_config = project.get("label_config") or ""
    if predict is None:
        url = backend_url or project_backend_url(api, project_id)
        if not url:
            raise ValueError(f"project {project_id} has no ML backend connected in Label Studio: "
                             "pass a backend URL (--backend)")
        client = MLBackendClient(url, auth=backend_auth(settings))
        version = model_version or client.setup(project_id, label_config, api.url, api.api_key)

        def predict(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return client.predict(project_id, tasks, label_config)
    else:
        if not model_version:
            raise ValueError("a custom predict function needs the model_version it predicts with")
        version = model_version
    job = _current_job()
    token = f"{job.id if job else 'local'}:{secrets.token_hex(4)}"
    progress: dict[str, Any] = {
        "project": project_id, "version": version, "state": "running", "total": 0, "done": 0, "existing": 0,
        "written": 0, "failed": 0, "batches": 0, "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }

    progress["_ok"] = set()  # tasks written by this run (internal, not reported)

    def report() -> None:
        progress["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        public = {k: v for k, v in progress.items() if not k.startswith("_")}
        if job is not None:
            job.meta.update(public)
            job.save_meta()
        if on_progress is not None:
            on_progress(public)

    failed: set[int] = set()
    first = True
    while True:
        tasks = list(api.iter_tasks(project_id, ("id", "data", "predictions_model_versions")))
        done_ids = {int(t["id"]) for t in tasks if version in _versions(t)}
        todo = [t for t in tasks if int(t["id"]) not in done_ids and int(t["id"]) not in failed]
        progress.update(total=len(tasks), done=len(done_ids))
        if first:
            progress["existing"] = len(done_ids)
            first = False
        report()
        if not todo:
            break
        progressed = False
        for start in range(0, len(todo), max(int(batch_size), 1)):
            batch = todo[start : start + max(int(batch_size), 1)]
            keys = [_claim_key(ns, project_id, version, int(t["id"])) for t in batch]
            got = _claim(conn, keys, token, claim_ttl)
            mine = [t for t, ok in zip(batch, got, strict=True) if ok]
            mine_keys = [k for k, ok in zip(keys, got, strict=True) if ok]
            if not mine:
                continue
            progressed = True
            try:
                _predict_and_write(api, conn, ns, project_id, version, mine, predict, progress)
            except VersionChangedError as exc:
                _release(conn, mine_keys, token)
                progress["state"] = f"stopped: {exc}"
                report()
                log.warning("project %d: %s", project_id, exc)
                return {k: v for k, v in progress.items() if not k.startswith("_")}
            except (requests.RequestException, RuntimeError, LabelStudioAPIError) as exc:
                log.warning("project %d: batch of %d tasks failed: %s", project_id, len(mine), exc)
                failed.update(int(t["id"]) for t in mine if int(t["id"]) not in progress["_ok"])
                progress["failed"] = len(failed)
                _release(conn, mine_keys, token)
                report()
                continue
            progress["batches"] += 1
            report()
        if not progressed:
            time.sleep(poll_seconds)  # every remaining task is claimed by another live copy: wait for it
    if progress["done"] and project.get("model_version") != version:
        try:
            api.set_model_version(project_id, version)
        except LabelStudioAPIError as exc:
            log.warning("project %d: could not set model_version %s: %s", project_id, version, exc)
    progress["state"] = "finished" if not failed else "finished with failures"
    report()
    log.info("project %d, version %s: %d tasks, %d written now, %d had one, %d failed", project_id, version,
             progress["total"], progress["written"], progress["existing"], progress["failed"])
    return {k: v for k, v in progress.items() if not k.startswith("_")}


def _predict_and_write(api: LabelStudioAPI, conn: Any, ns: str, project_id: int, version: str,
                       tasks: list[dict[str, Any]], predict: Callable, progress: dict[str, Any]) -> None:
    """Predict one claimed batch and write what is still missing, counting each write in ``progress``."""
    preds = predict([{"id": int(t["id"]), "data": t.get("data") or {}} for t in tasks])
    if len(preds) != len(tasks):
        raise RuntimeError(f"{len(preds)} predictions for {len(tasks)} tasks")
    changed = {str(p["model_version"]) for p in preds if p.get("model_version")} - {version}
    if changed:
        now = ", ".join(sorted(changed))
        raise VersionChangedError(f"the ML backend now predicts with {now}, not {version}: "
                                  "run the job again for the new version")
    ranked: dict[str, float] = {}
    try:
        for task, pred in zip(tasks, preds, strict=True):
            tid = int(task["id"])
            # Check again right before writing: another copy, or an earlier run, may have written it.
            if any(p.get("model_version") == version for p in api.predictions(task_id=tid)):
                continue
            score = pred.get("score")
            api.create_prediction(tid, pred.get("result") or [], score, version)
            progress["written"] += 1
            progress["done"] += 1
            progress["_ok"].add(tid)
            if score is not None and math.isfinite(float(score)):
                ranked[str(tid)] = min(score_to_uncertainty(float(score)), 1e300)
    finally:
        if conn is not None and ranked:
            conn.zadd(review_key(ns, project_id, version), ranked)


# ------------------------------------------------------------------------------------------ RQ glue
def run_preannotate(project_id: int, backend_url: str | None = None, model_version: str | None = None,
                    batch_size: int = DEFAULT_BATCH, claim_ttl: int = DEFAULT_CLAIM_TTL) -> dict[str, Any]:
    """The RQ job: reads Label Studio's URL and key and Redis from the worker's settings (environment)."""
    from active_learning.queue import get_connection
    from hih_settings import Settings

    settings = Settings.from_env()
    return preannotate_project(project_id, settings=settings, backend_url=backend_url,
                               model_version=model_version, batch_size=batch_size,
                               conn=get_connection(settings), claim_ttl=claim_ttl)


def enqueue_preannotate(project_id: int, *, settings: Any = None, connection: Any = None, copies: int = 1,
                        backend_url: str | None = None, model_version: str | None = None,
                        batch_size: int = DEFAULT_BATCH, claim_ttl: int = DEFAULT_CLAIM_TTL) -> list[str]:
    """Queue the pre-annotation job (``copies`` times, for as many workers to share); returns job ids."""
    from active_learning.queue import get_queue

    if settings is None:
        from hih_settings import Settings

        settings = Settings.from_env()
    queue = get_queue(settings, connection)
    ids = []
    for i in range(max(int(copies), 1)):
        job_id = f"{namespace(settings)}-preannotate-p{int(project_id)}-{int(time.time() * 1000)}-{i}"
        queue.enqueue_call(
            JOB_FUNCTION,
            kwargs={"project_id": int(project_id), "backend_url": backend_url, "model_version": model_version,
                    "batch_size": int(batch_size), "claim_ttl": int(claim_ttl)},
            job_id=job_id, timeout=JOB_TIMEOUT, result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
            description=f"pre-annotate project {int(project_id)}",
            meta={"project": int(project_id), "state": "queued"},
        )
        ids.append(job_id)
    return ids


def job_progress(job_ids: Sequence[str], connection: Any) -> list[dict[str, Any]]:
    """``[{id, status, **meta}]`` of pre-annotation jobs."""
    from rq.job import Job

    out = []
    for jid in job_ids:
        job = Job.fetch(jid, connection=connection)
        status = job.get_status()
        out.append({"id": jid, "status": str(getattr(status, "value", status)), **job.meta})
    return out

