"""RQ jobs: fine-tune a project's model on its Label Studio annotations, gate it, publish it.

``run_finetune(project_id)`` is what ``active_learning.queue`` enqueues; the worker runs it with the settings
of its own environment. Steps (each visible in ``job.meta``: ``state``, ``stage``, and while training
``epoch``, ``epochs``, ``loss``, ``holdout_nme``, ``holdout_nme_before``):

1. take the project's lock (one running fine-tune per project; renewed while the job lives, so a killed job
   frees it after ``FINETUNE_LOCK_TTL``) and clear the project's pending mark, so that annotations made
   during training queue the next job;
2. read every annotated task from Label Studio's API (the source of truth: a missed webhook loses nothing),
   one annotation per task (the latest not cancelled), faces = ``RectangleLabels`` boxes with the
   ``KeyPointLabels`` whose ``parentID`` is the box (or the only face of an annotation without boxes); each
   keypoint label maps to a 300-W point by name (``jaw_01`` ... as in label_config.xml; case, spaces, dots,
   hyphens and leading zeros ignored); faces without all 68 points are skipped and counted;
3. download each task's image with the project's credentials into the job's work folder
   (``MODEL_DIR/.work/<project>/<job>``) and convert percent to 0-based pixel-centre coordinates,
   ``x_px = x% / 100 * width - 0.5``;
4. fine-tune the project's current version (or the base weights ``HIH_WEIGHTS``) with
   ``active_learning.finetune`` and gate it (held-out NME must not get worse; 300-W check faces from
   ``HIH_DATA_DIR`` when present must not collapse; ``FINETUNE_REPLAY`` 300-W training faces from there are
   mixed in against forgetting);
5. accepted: publish it as the project's next version (``active_learning.registry``), then write predictions
   of the new version for the annotated tasks to Label Studio and set the project's ``model_version`` to it
   (Label Studio 1.23 refuses a version with no predictions in the project); a refusal is recorded in the
   result (``label_studio.model_version_set`` False with the error), the version stays published.

Outcomes: ``published`` and ``rejected`` (the gate said no; the old version stays) finish the job normally and
return a dict; bad annotations, Label Studio unreachable and images gone fail the job with
``FinetuneJobError`` whose message is the reason (also in ``job.meta["reason"]`` and
``queue.last_outcome``). In every case the current version is only ever moved by a successful publish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import redis

from hih_settings import Settings
from model.readers import FaceRecord
from model.schemes import SCHEME_300W, LandmarkScheme

from . import registry
from .finetune import (
    FinetuneDataError,
    FinetuneOptions,
    check_records_300w,
    finetune,
    replay_records_300w,
)
from .ls_client import ImageFetchError, LabelStudioClient, LabelStudioError
from .queue import clear_pending, get_connection, key, record_outcome

log = logging.getLogger(__name__)

__all__ = [
    "AnnotatedFace",
    "FinetuneJobError",
    "faces_from_tasks",
    "finetune_project",
    "normalize_point_name",
    "prediction_result",
    "run_finetune",
]

CHECK_FACES = 32
KEYPOINT_WIDTH = 0.4  # percent of the image width, when the annotation gives none


class FinetuneJobError(RuntimeError):
    """A fine-tune job that could not run (no usable annotations, Label Studio or images unreachable)."""


# ------------------------------------------------------------------------------------------- annotations
def normalize_point_name(name: str) -> str:
    """``"Jaw 01"``, ``"jaw-1"``, ``"JAW_01"`` -> ``"jaw_1"``: lower case, ``_`` separators, no leading 0s."""
    text = re.sub(r"[\s.\-]+", "_", str(name).strip().lower())
    return re.sub(r"(?<![0-9])0+(?=[0-9])", "", text)


@dataclass
class AnnotatedFace:
    """One annotated face of a task, in Label Studio's percent coordinates (top-left pixel corner origin)."""

    task_id: int
    annotation_id: int | None
    image_key: str
    points_pct: np.ndarray  # (K, 2) percent of width/height
    label_names: list[str]  # the label used for each of the K points
    from_name: str
    to_name: str
    rect_pct: tuple[float, float, float, float] | None = None  # x, y, width, height in percent
    rect_from_name: str | None = None
    rect_labels: list[str] = field(default_factory=list)
    point_width: float = KEYPOINT_WIDTH


def _image_keys(label_config: str | None) -> dict[str, str]:
    """Image tag name -> the task data key of its ``value="$key"``."""
    out: dict[str, str] = {}
    if not label_config:
        return out
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return out
    for el in root.iter():
        if el.tag.lower() == "image" and el.get("name") and str(el.get("value", "")).startswith("$"):
            out[el.get("name")] = el.get("value")[1:]
    return out


def _pick_annotation(task: dict) -> dict | None:
    usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")]
    if not usable:
        return None
    def when(a: dict) -> tuple[str, int]:
        return str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0

    return max(usable, key=when)


def faces_from_tasks(
    tasks: list[dict], label_config: str | None = None, scheme: LandmarkScheme = SCHEME_300W
) -> tuple[list[AnnotatedFace], Counter]:
    """Every complete face of the tasks' annotations, and a count of what was skipped and why."""
    index = {normalize_point_name(n): i for i, n in enumerate(scheme.point_names)}
    image_keys = _image_keys(label_config)
    faces: list[AnnotatedFace] = []
    skipped: Counter = Counter()
    for task in tasks:
        ann = _pick_annotation(task)
        if ann is None:
            skipped["tasks without a usable annotation"] += 1
            continue
        rects: dict[str, dict] = {}
        groups: dict[str | None, list[dict]] = {}
        for item in ann.get("result") or []:
            kind = str(item.get("type", "")).lower()
            if kind in ("rectanglelabels", "rectangle"):
                rects[str(item.get("id"))] = item
            elif kind == "keypointlabels":
                parent = item.get("parentID")
                groups.setdefault(str(parent) if parent else None, []).append(item)
        if None in groups and len(rects) <= 1 and len(groups) == 1:
            groups = {next(iter(rects), None): groups[None]}  # one face, keypoints not linked to its box
        if not groups:
            skipped["annotations without keypoints"] += 1
            continue
        for parent, items in groups.items():
            if any(int(it.get("image_rotation") or 0) % 360 for it in items):
                skipped["faces on a rotated image"] += 1
                continue
            pts = np.full((scheme.num_points, 2), np.nan)
            names = [""] * scheme.num_points
            bad = None
            for it in items:
                value = it.get("value") or {}
                labels = value.get("keypointlabels") or []
                if not labels:
                    bad = "keypoints without a label"
                    break
                i = index.get(normalize_point_name(labels[0]))
                if i is None:
                    bad = f"keypoint labels that are not 300-W points (e.g. {labels[0]!r})"
                    break
                if not np.isnan(pts[i, 0]):
                    bad = "a 300-W point labelled twice in one face"
                    break
                try:
                    x, y = float(value["x"]), float(value["y"])
                except (KeyError, TypeError, ValueError):
                    bad = "keypoints without x/y"
                    break
                if not (np.isfinite(x) and np.isfinite(y)):
                    bad = "non-finite keypoint coordinates"
                    break
                pts[i] = x, y
                names[i] = labels[0]
            if bad is None and np.isnan(pts).any():
                bad = f"faces with fewer than {scheme.num_points} points"
            if bad is not None:
                skipped[bad] += 1
                continue
            first = items[0]
            rect = rects.get(parent) if parent is not None else None
            rect_pct, rect_labels, rect_from = None, [], None
            if rect is not None:
                rv = rect.get("value") or {}
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    rect_pct = (float(rv["x"]), float(rv["y"]), float(rv["width"]), float(rv["height"]))
                rect_labels = list(rv.get("rectanglelabels") or [])
                rect_from = rect.get("from_name")
            to_name = str(first.get("to_name") or "image")
            faces.append(AnnotatedFace(
                task_id=int(task["id"]), annotation_id=ann.get("id"),
                image_key=image_keys.get(to_name, to_name), points_pct=pts, label_names=names,
                from_name=str(first.get("from_name") or "keypoints"), to_name=to_name, rect_pct=rect_pct,
                rect_from_name=rect_from, rect_labels=rect_labels,
                point_width=float((first.get("value") or {}).get("width") or KEYPOINT_WIDTH),
            ))
    return faces, skipped


def _task_image_value(task: dict, image_key: str) -> str | None:
    data = task.get("data") or {}
    value = data.get(image_key)
    if isinstance(value, str) and value.strip():
        return value
    strings = [v for v in data.values() if isinstance(v, str) and v.strip()]
    return strings[0] if len(strings) == 1 else None


def _skipped_text(skipped: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in skipped.most_common()) or "nothing skipped"


# ------------------------------------------------------------------------------------------- progress
class _Progress:
    """Writes the job's state into ``job.meta`` (and the log)."""

    def __init__(self, job, project_id: int):
        self.job = job
        self.project_id = project_id

    def __call__(self, **values: Any) -> None:
        if self.job is None:
            return
        self.job.meta.update({k: v for k, v in values.items() if k != "history"})
        self.job.meta["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            self.job.save_meta()
        except redis.RedisError:
            log.warning("could not save the progress of job %s", self.job.id)

    def training(self, values: dict) -> None:
        stage = values.get("stage")
        if stage == "evaluating":
            self(state="training", stage="measuring the current model on the held-out faces")
        elif stage == "training":
            update = {"state": "training", "stage": f"epoch {values.get('epoch')}/{values.get('epochs')}",
                      "epoch": values.get("epoch"), "epochs": values.get("epochs")}
            if values.get("epoch") == 0:
                update["holdout_nme_before"] = values.get("holdout_nme")
            else:
                update["loss"] = values.get("loss")
            if values.get("holdout_nme") is not None:
                update["holdout_nme"] = values.get("holdout_nme")
            self(**update)


class _LockKeeper(threading.Thread):
    """Renews the project lock while the job runs (a killed job's lock then expires after its TTL)."""

    def __init__(self, lock, interval: float):
        super().__init__(name="hih-lock-keeper", daemon=True)
        self.lock = lock
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.lock.reacquire()
            except Exception:  # noqa: BLE001 - lost lock or Redis down: log and keep trying
                log.warning("could not renew the fine-tune lock %s", self.lock.name)

    def stop(self) -> None:
        self.stopped.set()


# ------------------------------------------------------------------------------------------- the job
def run_finetune(project_id: int) -> dict:
    """The RQ entry point: fine-tune project ``project_id`` with the worker's settings (environment)."""
    from rq import get_current_job

    _die_with_worker()
    return finetune_project(int(project_id), Settings.from_env(), job=get_current_job())


def _die_with_worker() -> None:
    """In a work horse forked by ``run_worker``: be killed when the worker dies (Linux; best effort)."""
    from .worker import worker_pid

    parent = worker_pid()
    if parent is None or os.getppid() != parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before the call
            os._exit(1)
    except (OSError, AttributeError):
        log.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)


def finetune_options(settings: Settings) -> FinetuneOptions:
    """The job's recipe from settings (epochs, learning rate, hold-out share, device, threads)."""
    return FinetuneOptions(
        epochs=settings.finetune_epochs, lr=settings.finetune_lr, holdout_fraction=settings.holdout_fraction,
        replay_faces=settings.finetune_replay, device=settings.device, threads=settings.threads,
    )


def finetune_project(
    project_id: int,
    settings: Settings,
    job=None,
    client: LabelStudioClient | None = None,
    connection: redis.Redis | None = None,
    options: FinetuneOptions | None = None,
) -> dict:
    """Run the whole job for one project (see the module docstring). Returns the outcome dict."""
    conn = connection or get_connection(settings)
    job_id = job.id if job is not None else f"direct-{int(time.time())}"
    progress = _Progress(job, project_id)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    if job is not None:
        clear_pending(project_id, job.id, settings, conn)
    progress(state="waiting", stage="waiting for the project's lock", started=started, pid=os.getpid())
    ttl = max(3, int(settings.finetune_lock_ttl))
    lock = conn.lock(key(settings, "lock", project_id), timeout=ttl, thread_local=False,
                     blocking_timeout=max(ttl * 2, settings.finetune_timeout))
    if not lock.acquire():
        reason = f"another fine-tune job of project {project_id} held the lock for too long"
        return _fail(project_id, job_id, reason, settings, conn, progress, started)
    keeper = _LockKeeper(lock, max(1.0, ttl / 3))
    keeper.start()
    work = Path(settings.model_dir) / ".work" / str(project_id) / job_id
    for stale in work.parent.glob("*") if work.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # left by killed jobs: we hold the lock, none is running
    try:
        outcome = _run(project_id, settings, job_id, client, conn, options, progress, work)
        outcome.update(job_id=job_id, project=project_id, started=started,
                       ended=datetime.now(UTC).isoformat(timespec="seconds"))
        record_outcome(project_id, outcome, settings, conn)
        progress(stage="done", **{k: v for k, v in outcome.items() if k in ("state", "reason", "version")})
        return outcome
    except (LabelStudioError, FinetuneDataError, FinetuneJobError, registry.RegistryError) as exc:
        return _fail(project_id, job_id, str(exc), settings, conn, progress, started, exc)
    except BaseException as exc:  # a bug, Redis down, RQ's timeout: record why, then let RQ see it as it is
        with contextlib.suppress(Exception):
            _fail(project_id, job_id, f"{type(exc).__name__}: {exc}", settings, conn, progress, started, exc)
        raise
    finally:
        keeper.stop()
        with contextlib.suppress(redis.RedisError):
            lock.release()
        shutil.rmtree(work, ignore_errors=True)


def _fail(project_id, job_id, reason, settings, conn, progress, started, exc=None):
    ended = datetime.now(UTC).isoformat(timespec="seconds")
    outcome = {"state": "failed", "published": False, "reason": reason, "job_id": job_id,
               "project": project_id, "started": started, "ended": ended}
    with contextlib.suppress(redis.RedisError):
        record_outcome(project_id, outcome, settings, conn)
    progress(state="failed", stage="failed", reason=reason)
    log.error("fine-tune job %s of project %d failed: %s", job_id, project_id, reason)
    raise FinetuneJobError(reason) from exc


def _run(project_id, settings, job_id, client, conn, options, progress, work: Path) -> dict:
    client = client or LabelStudioClient.from_settings(settings)
    progress(state="fetching", stage="reading annotations from Label Studio")
    try:
        project = client.get_project(project_id)
        tasks = client.annotated_tasks(project_id)
    except LabelStudioError as exc:
        raise FinetuneJobError(
            f"cannot read project {project_id} from Label Studio at {client.url}: {exc}"
        ) from exc
    faces, skipped = faces_from_tasks(tasks, project.get("label_config"))
    if not faces:
        raise FinetuneJobError(
            f"no usable annotated faces in project {project_id}: {len(tasks)} annotated tasks "
            f"({_skipped_text(skipped)}); each face needs all 68 300-W keypoints"
        )
    progress(state="downloading", stage=f"downloading {len({f.task_id for f in faces})} images",
             faces=len(faces))
    records, images, skipped = _download(faces, tasks, client, work / "images", skipped)
    if len(records) < 3:
        raise FinetuneJobError(
            f"{len(records)} usable faces in project {project_id} after downloading images "
            f"({_skipped_text(skipped)}): need at least 3 (2 to train, 1 to hold out)"
        )
    parent = registry.current_version(project_id, settings, conn)
    init = registry.load_path(parent) if parent is not None else Path(settings.weights)
    if not (Path(init) / "meta.json").is_file():
        raise FinetuneJobError(f"the model to fine-tune is missing: {init} (set HIH_WEIGHTS)")
    opts = options or finetune_options(settings)
    check = check_records_300w(settings.data_dir, CHECK_FACES)
    replay = replay_records_300w(settings.data_dir, opts.replay_faces)
    progress(state="training", stage="preparing", parent=parent.version if parent else "base",
             faces=len(records), skipped=_skipped_text(skipped))
    result = finetune(
        records, init, work / "candidate", opts, check_records=check, replay_records=replay,
        progress=progress.training,
        meta={"project": project_id, "job_id": job_id},
    )
    numbers = {
        "parent": parent.version if parent else "base", "faces": len(records),
        "annotated_tasks": len(tasks), "skipped": dict(skipped), "holdout_faces": result.n_holdout,
        "train_faces": result.n_train, "holdout_nme_before": result.holdout_nme_before,
        "holdout_nme_after": result.holdout_nme_after, "check_nme_before": result.check_nme_before,
        "check_nme_after": result.check_nme_after, "epochs": result.epochs, "train_seconds": result.seconds,
        "device": result.device,
    }
    if not result.accepted:
        return {"state": "rejected", "published": False, "reason": result.reason, "version": None, **numbers}
    progress(state="publishing", stage="publishing the new version")
    info = registry.publish(
        project_id, result.checkpoint,
        {k: numbers[k] for k in ("parent", "faces", "annotated_tasks", "holdout_nme_before",
                                  "holdout_nme_after", "check_nme_before", "check_nme_after")}
        | {"job_id": job_id, "reason": result.reason},
        settings, conn,
    )
    ls = _update_label_studio(project_id, info, faces, images, client, settings, progress)
    return {"state": "published", "published": True, "reason": result.reason, "version": info.version,
            "path": info.path, "label_studio": ls, **numbers}


def _download(faces, tasks, client, folder: Path, skipped: Counter):
    from model.image_io import ImageError, load_image

    folder.mkdir(parents=True, exist_ok=True)
    by_id = {int(t["id"]): t for t in tasks}
    images: dict[int, tuple[Path, int, int]] = {}
    failed: dict[int, str] = {}
    records = []
    errors: Counter = Counter()
    for face in faces:
        tid = face.task_id
        if tid in failed:
            continue
        if tid not in images:
            value = _task_image_value(by_id[tid], face.image_key)
            try:
                if value is None:
                    raise ImageFetchError("missing", f"task {tid} has no image under data.{face.image_key}")
                data = client.fetch_bytes(value, tid)
                try:
                    h, w = load_image(data).shape[:2]
                except ImageError as exc:
                    raise ImageFetchError("unreadable", f"task {tid}: cannot read its image: {exc}") from exc
            except ImageFetchError as exc:
                failed[tid] = str(exc)
                errors[exc.reason] += 1
                log.warning("task %d skipped: %s", tid, exc)
                continue
            path = folder / f"task-{tid}.img"
            path.write_bytes(data)
            images[tid] = (path, w, h)
        path, w, h = images[tid]
        pts = face.points_pct / 100.0 * np.array([w, h], dtype=np.float64) - 0.5
        box = None
        if face.rect_pct is not None:
            x, y, bw, bh = face.rect_pct
            box = (x / 100 * w - 0.5, y / 100 * h - 0.5, (x + bw) / 100 * w - 0.5, (y + bh) / 100 * h - 0.5)
        records.append(FaceRecord(
            image_path=path, points=pts.astype(np.float32), visible=None, scheme=SCHEME_300W.name, box=box,
            attributes={"task_id": tid, "annotation_id": face.annotation_id, "group": f"task-{tid}"},
        ))
    for reason, n in errors.items():
        skipped[f"images not downloadable ({reason})"] += n
    if failed and not images:
        example = next(iter(failed.values()))
        raise FinetuneJobError(
            f"none of the {len(failed)} annotated images could be downloaded, e.g. {example}"
        )
    return records, images, skipped


# ------------------------------------------------------------------------------------------- Label Studio
def prediction_result(face: AnnotatedFace, points: np.ndarray, scores: np.ndarray, width: int, height: int,
                      region_id: str) -> list[dict]:
    """Label Studio results for one predicted face: its box (when the annotation had one) and keypoints
    (``points`` 0-based pixel-centre, ``x% = (x + 0.5) / width * 100``), named as in the annotation."""
    common = {"to_name": face.to_name, "original_width": int(width), "original_height": int(height),
              "image_rotation": 0}
    out: list[dict] = []
    parent = None
    if face.rect_pct is not None and face.rect_from_name:
        x, y, w, h = face.rect_pct
        parent = region_id
        out.append({"id": region_id, "type": "rectanglelabels", "from_name": face.rect_from_name, **common,
                    "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                              "rectanglelabels": face.rect_labels or ["Face"]}})
    for k, name in enumerate(face.label_names):
        item = {"id": f"{region_id}-{k}", "type": "keypointlabels", "from_name": face.from_name, **common,
                "value": {"x": float((points[k, 0] + 0.5) / width * 100),
                          "y": float((points[k, 1] + 0.5) / height * 100),
                          "width": face.point_width, "keypointlabels": [name]},
                "score": float(scores[k])}
        if parent:
            item["parentID"] = parent
        out.append(item)
    return out


def _update_label_studio(project_id, info, faces, images, client, settings, progress) -> dict:
    """Predictions of the new version for the annotated tasks, then the project's model_version."""
    from model.detect import FaceBox
    from model.predictor import Predictor

    progress(state="publishing", stage="writing predictions of the new version to Label Studio")
    out: dict[str, Any] = {"predictions": 0, "model_version_set": False, "error": None}
    try:
        predictor = Predictor.load(registry.load_path(info), device=settings.device)
        by_task: dict[int, list[AnnotatedFace]] = {}
        for f in faces:
            if f.task_id in images:
                by_task.setdefault(f.task_id, []).append(f)
        for tid, task_faces in by_task.items():
            path, w, h = images[tid]
            boxes = []
            for f in task_faces:
                if f.rect_pct is not None:
                    x, y, bw, bh = f.rect_pct
                    x0, y0, x1, y1 = x / 100 * w, y / 100 * h, (x + bw) / 100 * w, (y + bh) / 100 * h
                else:  # no box: the annotated points' box
                    p = f.points_pct / 100 * np.array([w, h])
                    x0, y0, x1, y1 = *p.min(0), *p.max(0)
                boxes.append(FaceBox(cx=(x0 + x1) / 2 - 0.5, cy=(y0 + y1) / 2 - 0.5,
                                     size=max(x1 - x0, y1 - y0), score=1.0, source="annotation",
                                     raw=(x0, y0, x1, y1)))
            # one call per box: predict() sorts faces by size, and each face keeps its own labels
            result, scores = [], []
            for i, (f, b) in enumerate(zip(task_faces, boxes, strict=True)):
                pred = predictor.predict(str(path), [b])[0]
                result += prediction_result(f, pred.points, pred.point_scores, w, h, f"hih{tid}f{i}")
                scores.append(pred.score)
            client.create_prediction(tid, result, info.version, float(np.mean(scores)))
            out["predictions"] += 1
        client.set_model_version(project_id, info.version)
        out["model_version_set"] = True
    except Exception as exc:  # noqa: BLE001 - the version is published whatever Label Studio says
        out["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("project %d: version %s is published but Label Studio was not updated: %s",
                    project_id, info.version, exc)
    return out
