"""The model side of the backend, shaped like ``label_studio_ml.model.LabelStudioMLBase``.

``HIHModel(project_id, label_config)`` is built per request (cheap: it holds no weights); it has
``setup()``, ``predict(tasks, context=None) -> list[prediction]``, ``fit(event, data)`` and
``model_version``, like the ML backend SDK's model class. The heavy objects live at module level and are
built once per process, lazily, under a lock:

* ``get_predictor(weights, device, detector)`` -> a cached ``model.predictor.Predictor`` (so nothing touches
  CUDA before gunicorn forks its workers: the first request of each worker loads it);
* ``get_fetcher(settings, api_key)`` -> a cached ``ImageFetcher``.

Hooks that later modules replace (both are looked up at call time):

* ``set_weights_resolver(fn)``: ``fn(project_id: str | None, settings) -> Path`` picks the checkpoint a
  project is served from (default: ``settings.weights``), for hot-swapping fine-tuned versions; when it
  raises ``QueueUnavailable`` (Redis down), the project keeps the checkpoint last resolved for it in this
  process (else ``settings.weights``), so that predictions do not depend on Redis;
* ``set_training_hook(fn)``: ``fn(event: str, payload: dict) -> dict | None`` receives every webhook event
  (``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED``, ``ANNOTATIONS_DELETED``, ``START_TRAINING``, ...) from
  ``fit``; the default ``on_training_event`` only logs. It must return fast (enqueue, don't train).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from active_learning.images import ImageFetcher, ImageFetchError
from active_learning.queue import QueueUnavailable
from active_learning.uncertainty import score_faces
from backend.label_config import LabelMapping, parse_label_config
from backend.metrics import METRICS
from backend.results import empty_prediction, percent_to_rect, prediction_from_faces
from hih_settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_SIZE",
    "MAX_PREDICTORS",
    "HIHModel",
    "ModelUnavailableError",
    "TRAINING_EVENTS",
    "clear_caches",
    "get_fetcher",
    "get_predictor",
    "model_version_of",
    "on_training_event",
    "project_number",
    "remember_setup",
    "set_training_hook",
    "set_weights_resolver",
    "task_face_boxes",
]

MAX_PREDICTORS = 4  # loaded models kept per process (hot-swapped versions push out the oldest)
MAX_FETCHERS = 32  # image fetchers kept per process (one per API key / access token)
MAX_FACES_PER_TASK = 64  # face boxes taken from a task (largest first): bounds the work one task can ask for
MAX_REMEMBERED = 1024  # /setup tokens and last resolved weights kept per process (one per project)
# PyTorch/pickle formats: loading them can run arbitrary code, so they are refused by name, never opened
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar", ".joblib")
BATCH_SIZE = 8  # tasks fetched and run through the network together (bounds memory for big /predict calls)
TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING")

_lock = threading.Lock()  # guards the caches below
_load_lock = threading.Lock()  # one model load at a time
_predictors: OrderedDict[tuple[str, str, str], Any] = OrderedDict()  # LRU, at most MAX_PREDICTORS
_fetchers: dict[tuple, ImageFetcher] = {}
_setup_tokens: dict[str, str] = {}  # project number -> access_token that Label Studio sent to /setup
_last_setup_token: list[str] = []
_last_weights: dict[str | None, Path] = {}  # project -> weights last resolved (served while Redis is down)


def _remember(store: dict, key: Any, value: Any, limit: int = MAX_REMEMBERED) -> None:
    """``store[key] = value``, forgetting the oldest entries beyond ``limit`` (call under ``_lock``)."""
    store.pop(key, None)
    store[key] = value
    while len(store) > limit:
        del store[next(iter(store))]


def clear_caches() -> None:
    """Forget the cached predictors, fetchers and /setup tokens (tests; after publishing new weights)."""
    with _lock:
        _predictors.clear()
        _fetchers.clear()
        _setup_tokens.clear()
        _last_setup_token.clear()
        _last_weights.clear()


def _default_weights(project_id: str | None, settings: Settings) -> Path:
    return Path(settings.weights)


_weights_resolver: Callable[[str | None, Settings], Path] = _default_weights


def set_weights_resolver(fn: Callable[[str | None, Settings], Path] | None) -> None:
    """Choose the checkpoint each project is served from (None: back to ``settings.weights``)."""
    global _weights_resolver
    _weights_resolver = fn or _default_weights


def _refuse_pickle(path: str | Path) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelUnavailableError(
            f"refusing to load {path}: {suffix} files are PyTorch/pickle archives, and unpickling can run "
            "arbitrary code; hih-assist loads only checkpoint folders of model.safetensors + meta.json "
            "(see model/checkpoint.py)"
        )


def get_predictor(weights: str | Path, device: str = "auto", detector: str = "auto", threads: int = 0):
    """The process-wide ``Predictor`` for these weights, device and detector (loaded on first use)."""
    _refuse_pickle(weights)
    key = (str(Path(weights).expanduser().resolve()), device, detector)
    with _lock:
        predictor = _predictors.get(key)
        if predictor is not None:
            _predictors.move_to_end(key)
            return predictor
    with _load_lock:
        predictor = _predictors.get(key)
        if predictor is None:
            import torch

            from model.predictor import Predictor

            if threads > 0:
                torch.set_num_threads(threads)
            from model.checkpoint import CheckpointError

            t0 = time.monotonic()
            try:
                predictor = Predictor.load(key[0], device=device, detector=detector)
            except (CheckpointError, FileNotFoundError) as exc:
                raise ModelUnavailableError(f"cannot load the model at {key[0]}: {exc}") from exc
            log.info(
                "loaded model %s from %s (device %s, detector %s) in %.1f s",
                predictor.version,
                key[0],
                device,
                detector,
                time.monotonic() - t0,
            )
            with _lock:
                _predictors[key] = predictor
                while len(_predictors) > MAX_PREDICTORS:
                    old, _ = _predictors.popitem(last=False)
                    log.info("unloaded the model at %s", old[0])
            METRICS.set_model_version(str(predictor.version))
    return predictor


class ModelUnavailableError(RuntimeError):
    """The checkpoint to serve is missing or unreadable (answered 503 by the app)."""


def model_version_of(weights: str | Path, device: str = "auto", detector: str = "auto") -> str:
    """The version of a checkpoint: the loaded predictor's, else ``meta.json``'s ``version`` (read without
    importing torch, so that /health and /setup answer fast, even in a fresh worker)."""
    _refuse_pickle(weights)
    key = (str(Path(weights).expanduser().resolve()), device, detector)
    predictor = _predictors.get(key)
    if predictor is not None:
        return str(predictor.version)
    folder = Path(key[0])
    meta_path = (folder.parent if folder.suffix == ".safetensors" else folder) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ModelUnavailableError(f"no model at {key[0]}: {meta_path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read {meta_path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelUnavailableError(f"{meta_path} is not a JSON object")
    return str(meta.get("version", "unknown"))  # as Predictor.version


def get_fetcher(settings: Settings, api_key: str | None = None) -> ImageFetcher:
    """The process-wide image fetcher for these settings (and API key, when it comes from /setup)."""
    key = (
        settings.label_studio_url,
        api_key if api_key is not None else settings.label_studio_api_key,
        settings.allowed_hosts,
        settings.max_image_bytes,
    )
    with _lock:
        fetcher = _fetchers.get(key)
        if fetcher is None:
            fetcher = ImageFetcher(key[0], key[1], key[2], key[3])
            _remember(_fetchers, key, fetcher, MAX_FETCHERS)
    return fetcher


def project_number(project: Any) -> str | None:
    """Label Studio's project uid ``"<id>.<timestamp>"`` (or an id, or a project dict) -> ``"<id>"``."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or isinstance(project, bool):
        return None
    text = str(project).strip()
    return text.split(".", 1)[0] or None


def remember_setup(project: Any, access_token: Any) -> None:
    """Keep the token Label Studio sends to /setup: images are fetched with it when LABEL_STUDIO_API_KEY is
    empty."""
    if not isinstance(access_token, str) or not access_token.strip():
        return
    number = project_number(project)
    with _lock:
        if number:
            _remember(_setup_tokens, number, access_token.strip())
        _last_setup_token[:] = [access_token.strip()]


def _setup_token(project: Any) -> str | None:
    with _lock:
        number = project_number(project)
        if number and number in _setup_tokens:
            return _setup_tokens[number]
        return _last_setup_token[0] if _last_setup_token else None


# ------------------------------------------------------------------------------------------ hooks
def on_training_event(event: str, payload: dict) -> dict | None:
    """Default training hook: log the event. The fine-tuning loop replaces it (``set_training_hook``)."""
    project = payload.get("project")
    pid = project.get("id") if isinstance(project, dict) else project
    level = logging.INFO if event in TRAINING_EVENTS else logging.DEBUG
    log.log(level, "webhook %s for project %s (no training hook installed: nothing queued)", event, pid)
    return None


_training_hook: Callable[[str, dict], dict | None] | None = None


def set_training_hook(fn: Callable[[str, dict], dict | None] | None) -> None:
    """Route webhook events to ``fn`` (None: back to the logging ``on_training_event``)."""
    global _training_hook
    _training_hook = fn


# ------------------------------------------------------------------------------------------ faces
def _time_key(item: dict) -> tuple[str, int]:
    stamp = item.get("updated_at") or item.get("created_at") or ""
    ident = item.get("id")
    return str(stamp), ident if isinstance(ident, int) else 0


def task_face_boxes(task: dict, mapping: LabelMapping, width: int, height: int) -> list:
    """Face boxes the task already has: the Face rectangles of its newest annotation that has any (not
    cancelled), else of its newest prediction that has any, as ``FaceBox``es (``box_from_xywh``, mapping
    ``given``), clipped to the image, largest first, at most ``MAX_FACES_PER_TASK``. Empty when there are
    none."""
    from model.detect import box_from_xywh

    sources: list[dict] = []
    for key in ("annotations", "predictions"):
        items = task.get(key) or []
        if not isinstance(items, list):
            continue
        items = [a for a in items if isinstance(a, dict) and not a.get("was_cancelled")]
        sources.extend(sorted(items, key=_time_key, reverse=True))
    for source in sources:
        boxes = []
        for region in source.get("result") or []:
            if not isinstance(region, dict) or region.get("type") not in ("rectanglelabels", "rectangle"):
                continue
            if region.get("to_name") not in (None, mapping.image_name):
                continue
            if mapping.face_from_name and region.get("from_name") not in (None, mapping.face_from_name):
                continue
            value = region.get("value") or {}
            labels = value.get("rectanglelabels")
            if (
                mapping.face_label
                and isinstance(labels, list)
                and labels
                and mapping.face_label not in labels
            ):
                continue
            try:
                x0, y0, x1, y1 = percent_to_rect(value, width, height)
                if not all(np.isfinite((x0, y0, x1, y1))):
                    continue
                # Label Studio keeps rectangles inside the image: clip what a task may say beyond it
                x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
                y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
                boxes.append(box_from_xywh(x0, y0, x1 - x0, y1 - y0))
            except (KeyError, TypeError, ValueError, OverflowError):
                continue
        if boxes:
            if len(boxes) > MAX_FACES_PER_TASK:
                log.warning("task %s: %d face boxes, predicting the %d largest", task.get("id"), len(boxes),
                            MAX_FACES_PER_TASK)
            return sorted(boxes, key=lambda b: -b.size)[:MAX_FACES_PER_TASK]
    return []


# ------------------------------------------------------------------------------------------ the model
class HIHModel:
    """HIH landmarks for one Label Studio project (``LabelStudioMLBase``-like; cheap to construct)."""

    def __init__(
        self,
        project_id: Any = None,
        label_config: str | None = None,
        settings: Settings | None = None,
        access_token: str | None = None,
    ):
        self.project_id = project_number(project_id)
        self.label_config = label_config
        self.settings = settings or Settings.from_env()
        self.access_token = access_token
        self._mapping: LabelMapping | None = None

    # -- LabelStudioMLBase-like API
    @property
    def mapping(self) -> LabelMapping:
        """The parsed label config (raises ``LabelConfigError`` with what is missing)."""
        if self._mapping is None:
            self._mapping = parse_label_config(self.label_config)  # type: ignore[arg-type]
        return self._mapping

    @functools.cached_property
    def weights(self) -> Path:
        """The checkpoint this project is served from (asked of the weights resolver once per instance; with
        Redis down, the one last resolved for the project, else ``settings.weights``)."""
        try:
            path = Path(_weights_resolver(self.project_id, self.settings))
        except QueueUnavailable as exc:
            with _lock:
                path = _last_weights.get(self.project_id) or Path(self.settings.weights)
            log.warning("project %s: cannot read the current model version (%s): serving %s",
                        self.project_id, exc, path)
            return path
        with _lock:
            _remember(_last_weights, self.project_id, path)
        return path

    @property
    def model_version(self) -> str:
        return model_version_of(self.weights, self.settings.device, self.settings.detector)

    def predictor(self):
        return get_predictor(
            self.weights, self.settings.device, self.settings.detector, self.settings.threads
        )

    def setup(self) -> str:
        """Check the label config and the weights; returns the model version (loads nothing heavy)."""
        mapping = self.mapping
        log.info("setup project %s: %s", self.project_id, mapping.describe())
        for label, reason in mapping.unmapped:
            log.warning(
                "project %s: keypoint label %r gets no prediction: %s", self.project_id, label, reason
            )
        return self.model_version

    def fit(self, event: str, data: dict, **kwargs: Any) -> dict | None:
        """A webhook event: counted, then handed to the training hook (which must return fast)."""
        METRICS.observe_webhook(str(event))
        hook = _training_hook or on_training_event
        return hook(event, data)

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> list[dict]:
        """One prediction per task, in order. A task that fails (no image, unreadable, no face) gets an
        empty prediction, and the reason is logged and counted; it never fails the batch."""
        mapping = self.mapping
        predictor = self.predictor()
        version = str(predictor.version)
        out: list[dict | None] = [None] * len(tasks)
        for start in range(0, len(tasks), BATCH_SIZE):
            chunk = list(range(start, min(start + BATCH_SIZE, len(tasks))))
            self._predict_chunk(tasks, chunk, mapping, predictor, version, out)
        return [p if p is not None else empty_prediction(version) for p in out]

    # -- internals
    def _fail(self, out: list, i: int, task: Any, version: str, reason: str, message: str) -> None:
        tid = task.get("id") if isinstance(task, dict) else None
        log.warning("task %s (project %s): no prediction (%s): %s", tid, self.project_id, reason, message)
        METRICS.observe_task(failure=reason)
        out[i] = empty_prediction(version)

    def _fetcher(self) -> ImageFetcher:
        key = self.settings.label_studio_api_key or self.access_token or _setup_token(self.project_id) or ""
        return get_fetcher(self.settings, key)

    def _task_image(self, task: dict, mapping: LabelMapping) -> np.ndarray:
        data = task.get("data")
        if mapping.image_url:
            value = mapping.image_url
        elif not isinstance(data, dict):
            raise ImageFetchError("missing", "the task has no data object")
        else:
            value = data.get(mapping.image_key)
            if value is None or value == "":
                keys = ", ".join(sorted(map(str, data))) or "none"
                raise ImageFetchError("missing", f"the task data has no {mapping.image_key!r} (keys: {keys})")
            if not isinstance(value, str):
                raise ImageFetchError(
                    "missing", f"task data {mapping.image_key!r} is not a string URL or path"
                )
        tid = task.get("id")
        return self._fetcher().fetch(
            value, tid if isinstance(tid, int) and not isinstance(tid, bool) else None
        )

    def _predict_chunk(self, tasks, chunk, mapping, predictor, version, out) -> None:
        ready: list[tuple[int, np.ndarray, list | None]] = []
        for i in chunk:
            task = tasks[i]
            try:
                if not isinstance(task, dict):
                    raise ImageFetchError("bad_task", f"the task is a {type(task).__name__}, not an object")
                image = self._task_image(task, mapping)
                h, w = image.shape[:2]
                boxes = task_face_boxes(task, mapping, w, h)
                ready.append((i, image, boxes or None))
            except ImageFetchError as exc:
                self._fail(out, i, task, version, exc.reason, str(exc))
            except Exception as exc:  # noqa: BLE001 - one bad task must not fail the batch
                log.exception("task %s: unexpected error reading the image", i)
                self._fail(out, i, task, version, "error", f"{type(exc).__name__}: {exc}")
        if not ready:
            return
        try:
            results = predictor.predict_batch([img for _, img, _ in ready], [b for _, _, b in ready])
        except Exception:  # noqa: BLE001 - retry one by one so that only the bad task fails
            log.warning(
                "batch prediction failed; predicting the %d tasks one by one", len(ready), exc_info=True
            )
            results = []
            for i, img, boxes in ready:
                try:
                    results.append(predictor.predict(img, boxes))
                except Exception as exc:  # noqa: BLE001
                    log.exception("task %s: prediction failed", i)
                    results.append(exc)
        for (i, image, boxes), faces in zip(ready, results, strict=True):
            task = tasks[i]
            if isinstance(faces, Exception):
                self._fail(out, i, task, version, "model_error", f"{type(faces).__name__}: {faces}")
                continue
            if not faces:
                self._fail(out, i, task, version, "no_face", "no face found in the image")
                continue
            h, w = image.shape[:2]
            score_faces(faces)  # calibrated point, face and task scores (active_learning.uncertainty)
            out[i] = prediction_from_faces(faces, mapping, w, h, version)
            METRICS.observe_task(faces=len(faces))
            log.info(
                "task %s: %d face(s)%s, score %.3f",
                task.get("id"),
                len(faces),
                " (boxes from the task)" if boxes else "",
                out[i]["score"],
            )
