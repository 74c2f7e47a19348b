"""The review queue: a project's tasks ranked by the model's uncertainty, and a Label Studio tab holding them.

Scores come from the predictions stored in Label Studio: a prediction's ``score`` is
``active_learning.uncertainty.face_score`` of the task's uncertainty (lower = more doubtful), so the task's
uncertainty is recovered exactly with ``score_to_uncertainty``. Tasks without a prediction of the model
version are "unscored" (``rank --compute`` predicts them first, through the pre-annotation path).

Redis (every key under the deployment's namespace ``HIH_QUEUE``, default ``hih-assist``):

``<ns>:review:<project>:<version>``        sorted set task id -> uncertainty (descending = review first);
                                            one per model version, so a new model re-ranks from scratch
``<ns>:review-info:<project>:<version>``   hash: ``ranked_at``, ``tasks``, ``unscored``, ``view``
``<ns>:review-queue:<project>``            sorted set task id -> time: tasks a lead queued by hand (they
                                            come before the ranked ones, whatever the model version)

The Data Manager tab "Review: most uncertain" (``POST``/``PATCH /api/dm/views``) filters on the top-K task ids
(``filter:tasks:id`` equal, joined with "or") and orders by ``tasks:predictions_score`` ascending, so Label
Studio lists the most doubtful first. Label Studio computes that column only from predictions of the
project's ``model_version``, which is therefore set to the ranked version when the tab is written.

Label Studio access goes through :class:`LabelStudioAPI`: the shared ``active_learning.ls_client`` client
(credentials, errors) plus the calls it lacks (light task listing, ML backends, Data Manager views).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests

from active_learning.ls_client import LabelStudioClient
from active_learning.ls_client import LabelStudioError as LabelStudioAPIError
from active_learning.uncertainty import score_to_uncertainty

log = logging.getLogger(__name__)

__all__ = [
    "REVIEW_VIEW_TITLE",
    "LabelStudioAPI",
    "LabelStudioAPIError",
    "RankResult",
    "clear_queue",
    "collect_scores",
    "current_version",
    "namespace",
    "queue_for_review",
    "queued_tasks",
    "rank_project",
    "ranked_tasks",
    "review_key",
    "store_scores",
    "upsert_review_view",
    "view_data",
]

REVIEW_VIEW_TITLE = "Review: most uncertain"
DEFAULT_NAMESPACE = "hih-assist"


# ------------------------------------------------------------------------------------- Label Studio
class LabelStudioAPI:
    """The Label Studio calls of the review queue and pre-annotation.

    Authentication, errors (``LabelStudioAPIError`` = ``active_learning.ls_client.LabelStudioError``) and the
    common calls go through the shared ``LabelStudioClient``; this adds the few it lacks: a light task listing
    (``include`` only the needed fields, optionally through a Data Manager view), the project's ML backends
    and the Data Manager views.
    """

    def __init__(self, url: str, api_key: str, client: LabelStudioClient | None = None):
        if not (client.url if client is not None else url):
            raise ValueError("no Label Studio URL (set LABEL_STUDIO_URL)")
        if not (api_key or client is not None):
            raise ValueError("no Label Studio API key (set LABEL_STUDIO_API_KEY)")
        self.client = client or LabelStudioClient(url, api_key)
        self.url = self.client.url
        self.api_key = api_key

    @classmethod
    def from_settings(cls, settings: Any) -> LabelStudioAPI:
        if not settings.label_studio_api_key:
            raise ValueError("no Label Studio API key: set LABEL_STUDIO_API_KEY")
        return cls(settings.label_studio_url, settings.label_studio_api_key,
                   LabelStudioClient.from_settings(settings) if settings.label_studio_url else None)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, **kwargs)

    # -- projects
    def project(self, project_id: int) -> dict[str, Any]:
        return self.client.get_project(project_id)

    def set_model_version(self, project_id: int, version: str) -> None:
        self.client.set_model_version(project_id, version)

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/ml", params={"project": int(project_id)}) or []

    # -- tasks and predictions
    def iter_tasks(self, project_id: int, include: Sequence[str] = ("id",), page_size: int = 500,
                   view: int | None = None) -> Iterator[dict[str, Any]]:
        """The project's tasks, page by page (``GET /api/tasks``) with only the ``include`` fields (no
        annotation or prediction bodies), in the order of Data Manager ``view`` when given."""
        page, seen = 1, 0
        while True:
            params: dict[str, Any] = {"project": int(project_id), "page": page, "page_size": page_size,
                                      "fields": "all", "include": ",".join(include)}
            if view is not None:
                params["view"] = int(view)
            out = self.request("GET", "/api/tasks", ok=(200, 404), params=params)
            batch = out.get("tasks", []) if isinstance(out, dict) else []
            yield from batch
            seen += len(batch)
            total = out.get("total", seen) if isinstance(out, dict) else seen
            if not batch or seen >= total:
                return
            page += 1

    def predictions(self, project_id: int | None = None, task_id: int | None = None) -> list[dict[str, Any]]:
        return self.client.list_predictions(project_id=project_id, task_id=task_id)

    def create_prediction(self, task_id: int, result: list, score: float | None, model_version: str) -> dict:
        ok = score is not None and math.isfinite(float(score))
        return self.client.create_prediction(task_id, result, model_version, float(score) if ok else None)

    # -- Data Manager views
    def views(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/dm/views", params={"project": int(project_id)}) or []

    def create_view(self, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/dm/views", json={"project": int(project_id), "data": data})

    def update_view(self, view_id: int, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/dm/views/{int(view_id)}",
                            json={"project": int(project_id), "data": data})


# ---------------------------------------------------------------------------------------- Redis keys
def namespace(settings: Any = None) -> str:
    """The deployment's key prefix (``HIH_QUEUE``)."""
    return getattr(settings, "queue_name", None) or DEFAULT_NAMESPACE


def review_key(ns: str, project_id: int, version: str, kind: str = "review") -> str:
    return f"{ns}:{kind}:{int(project_id)}:{version}"


def _queue_key(ns: str, project_id: int) -> str:
    return f"{ns}:review-queue:{int(project_id)}"


def store_scores(conn: Any, ns: str, project_id: int, version: str, uncertainties: dict[int, float],
                 unscored: int = 0, replace: bool = True) -> None:
    """Keep ``{task id: uncertainty}`` for (project, version); ``replace`` drops tasks not given."""
    key = review_key(ns, project_id, version)
    info = review_key(ns, project_id, version, "review-info")
    finite = {str(int(t)): (u if math.isfinite(u) else 1e300) for t, u in uncertainties.items()}
    pipe = conn.pipeline(transaction=True)
    if replace:
        pipe.delete(key)
    if finite:
        pipe.zadd(key, finite)
    pipe.hset(info, mapping={"ranked_at": datetime.now(UTC).isoformat(timespec="seconds"),
                             "tasks": len(finite), "unscored": int(unscored)})
    pipe.execute()


def ranked_tasks(conn: Any, ns: str, project_id: int, version: str, top: int | None = None
                 ) -> list[tuple[int, float]]:
    """Stored ranking, most uncertain first (ties: lower task id first): ``[(task id, uncertainty)]``,
    +inf for "no face"."""
    rows = conn.zrange(review_key(ns, project_id, version), 0, -1, withscores=True)
    out = [(int(t), math.inf if s >= 1e300 else float(s)) for t, s in rows]
    out.sort(key=lambda r: (-r[1], r[0]))
    return out if top is None else out[: max(int(top), 0)]


def queue_for_review(conn: Any, ns: str, project_id: int, task_ids: Iterable[int]) -> int:
    """A lead queues tasks by hand (the backend's endpoint calls this): they come first, oldest first.
    Returns how many were new."""
    now = time.time()
    return int(conn.zadd(_queue_key(ns, project_id), {str(int(t)): now for t in task_ids}, nx=True))


def queued_tasks(conn: Any, ns: str, project_id: int) -> list[int]:
    return [int(t) for t in conn.zrange(_queue_key(ns, project_id), 0, -1)]


def clear_queue(conn: Any, ns: str, project_id: int, task_ids: Iterable[int] | None = None) -> None:
    key = _queue_key(ns, project_id)
    if task_ids is None:
        conn.delete(key)
    else:
        ids = [str(int(t)) for t in task_ids]
        if ids:
            conn.zrem(key, *ids)


# ---------------------------------------------------------------------------------------- ranking
@dataclass
class RankResult:
    """A project's ranking for one model version."""

    project_id: int
    version: str
    ranked: list[tuple[int, float]]  # (task id, uncertainty), most uncertain first
    unscored: list[int] = field(default_factory=list)  # tasks without a prediction of the version
    queued: list[int] = field(default_factory=list)  # tasks a lead queued by hand
    view_id: int | None = None

    def top(self, k: int | None) -> list[int]:
        """Hand-queued tasks first, then the most uncertain, ``k`` in all (None: every ranked task)."""
        ids = list(dict.fromkeys([*self.queued, *(t for t, _ in self.ranked)]))
        return ids if k is None else ids[: max(int(k), 0)]


def _versions(task: dict[str, Any]) -> set[str]:
    raw = task.get("predictions_model_versions") or ""
    if isinstance(raw, list):
        return {str(v) for v in raw}
    return {v.strip() for v in str(raw).split(",") if v.strip()}


def collect_scores(api: LabelStudioAPI, project_id: int, version: str) -> tuple[dict[int, float], list[int]]:
    """Uncertainty of every task that has a scored prediction of ``version``, and the ids of the others.

    When ``version`` is the project's ``model_version``, Label Studio's own per-task column
    (``predictions_score``: the mean score of the task's predictions of that version) is read, without
    prediction bodies; otherwise every prediction of the project is listed and a task with several
    predictions of the version takes the lowest score."""
    if api.project(project_id).get("model_version") == version:
        unc: dict[int, float] = {}
        unscored: list[int] = []
        for t in api.iter_tasks(project_id, ("id", "predictions_score", "predictions_model_versions")):
            if version in _versions(t) and t.get("predictions_score") is not None:
                unc[int(t["id"])] = score_to_uncertainty(float(t["predictions_score"]))
            else:
                unscored.append(int(t["id"]))
        return unc, unscored
    all_ids = [int(t["id"]) for t in api.iter_tasks(project_id, ("id",))]
    scores: dict[int, float] = {}
    for p in api.predictions(project_id):
        if p.get("model_version") != version or p.get("score") is None:
            continue
        tid = int(p["task"])
        scores[tid] = min(scores.get(tid, math.inf), float(p["score"]))
    unc = {t: score_to_uncertainty(s) for t, s in scores.items()}
    return unc, [t for t in all_ids if t not in unc]


def current_version(api: LabelStudioAPI, project_id: int, backend_url: str | None = None,
                    settings: Any = None) -> str:
    """The model version to rank: the connected ML backend's (``/setup``), else the project's
    ``model_version`` in Label Studio. Raises ValueError when neither gives one."""
    from active_learning.preannotate import MLBackendClient, backend_auth, project_backend_url

    project = api.project(project_id)
    url = backend_url or project_backend_url(api, project_id)
    if url:
        try:
            return MLBackendClient(url, auth=backend_auth(settings)).setup(
                project_id, project["label_config"], api.url, api.api_key)
        except (requests.RequestException, RuntimeError) as exc:
            log.warning("ML backend %s did not answer /setup (%s): using the project's model_version",
                        url, exc)
    if project.get("model_version"):
        return str(project["model_version"])
    raise ValueError(f"project {project_id} has no ML backend and no model_version: pass a version")


def rank_project(api: LabelStudioAPI, conn: Any, project_id: int, version: str | None = None, *,
                 ns: str = DEFAULT_NAMESPACE, top: int | None = None, view: bool = False,
                 compute: bool = False, backend_url: str | None = None,
                 view_title: str = REVIEW_VIEW_TITLE, settings: Any = None) -> RankResult:
    """Rank the project's tasks by uncertainty for ``version`` (default: :func:`current_version`), keep the
    ranking in Redis, and with ``view`` write the top-``top`` tasks into the Data Manager tab.

    ``compute``: predict the unscored tasks first (the pre-annotation job's code, run inline; needs the ML
    backend), so every task is ranked."""
    project_id = int(project_id)
    version = version or current_version(api, project_id, backend_url, settings)
    if compute:
        from active_learning.preannotate import preannotate_project

        preannotate_project(project_id, api=api, settings=settings, backend_url=backend_url,
                            model_version=version, conn=conn, ns=ns)
    unc, unscored = collect_scores(api, project_id, version)
    store_scores(conn, ns, project_id, version, unc, unscored=len(unscored))
    result = RankResult(project_id, version, ranked_tasks(conn, ns, project_id, version),
                        unscored=unscored, queued=queued_tasks(conn, ns, project_id))
    if view:
        ids = result.top(top)
        result.view_id = upsert_review_view(api, project_id, ids, version=version, title=view_title)
        conn.hset(review_key(ns, project_id, version, "review-info"), "view", result.view_id)
    log.info("project %d, version %s: ranked %d tasks, %d unscored, %d queued by hand", project_id, version,
             len(result.ranked), len(unscored), len(result.queued))
    return result


# ------------------------------------------------------------------------------------ Data Manager tab
def view_data(task_ids: Sequence[int], title: str = REVIEW_VIEW_TITLE) -> dict[str, Any]:
    """The Data Manager tab: exactly ``task_ids``, ordered by prediction score, lowest (most doubtful) first.

    An empty list gets an impossible filter (id = -1), so the tab shows nothing rather than every task."""
    ids = [int(t) for t in task_ids] or [-1]
    return {
        "title": title,
        "filters": {
            "conjunction": "or",
            "items": [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": t}
                      for t in ids],
        },
        "ordering": ["tasks:predictions_score"],
    }


def upsert_review_view(api: LabelStudioAPI, project_id: int, task_ids: Sequence[int], *,
                       version: str | None = None, title: str = REVIEW_VIEW_TITLE) -> int:
    """Create the tab, or update it when one with ``title`` exists; returns its id. With ``version``, the
    project's ``model_version`` is set to it first (the score column only counts that version)."""
    if version:
        project = api.project(project_id)
        if project.get("model_version") != version:
            log.info("project %d: model_version %r -> %r (for the prediction score column)", project_id,
                     project.get("model_version"), version)
            api.set_model_version(project_id, version)
    data = view_data(task_ids, title)
    for v in api.views(project_id):
        if (v.get("data") or {}).get("title") == title:
            api.update_view(int(v["id"]), project_id, data)
            return int(v["id"])
    return int(api.create_view(project_id, data)["id"])
