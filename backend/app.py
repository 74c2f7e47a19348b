"""The HTTP face of the backend: Label Studio's ML backend protocol on Flask 3.

Routes (payloads as Label Studio 1.23 sends them; see ../shared/DESIGN.md):

* ``GET /health`` (and ``GET /``) -> ``{"status": "UP", "model_class": "HIHModel", "model_version": ...}``;
  never behind basic auth;
* ``POST /setup`` ``{project, schema, hostname, access_token, extra_params}`` -> ``{"model_version": ...}``;
  checks the label config (4xx saying what is missing) and starts loading the model in the background;
* ``POST /predict`` ``{tasks, project, label_config, params}`` -> ``{"results": [one per task, in order],
  "model_version": ...}``;
* ``POST /webhook`` ``{action, project, ...}`` -> 201 at once; the event goes to ``HIHModel.fit`` and so to
  the training hook (``backend.model_api.set_training_hook``);
* ``GET /versions`` -> ``{"versions": [...]}``; ``GET /metrics`` -> Prometheus text.

Every error answers JSON ``{"error": "..."}``: 400 for a malformed request (bad JSON, wrong types, missing
keys), 401 without the basic-auth credentials (when ``BASIC_AUTH_USER`` is set), 422 for a label config the
backend cannot serve, 503 when the model weights are missing or when the training queue (Redis) is down (a
webhook is then refused with the reason; predictions do not need Redis); an unexpected failure is logged
with its traceback and answered 500 with a one-line message, never the traceback.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from active_learning.queue import QueueUnavailable
from backend import model_api
from backend.label_config import LabelConfigError
from backend.metrics import METRICS
from hih_settings import Settings

log = logging.getLogger(__name__)

__all__ = ["RequestError", "create_app"]

MAX_REQUEST_BYTES = 256 * 1024 * 1024  # /predict bodies hold whole tasks with their annotations
MAX_SCHEMAS = 1024  # label configs remembered from /setup (oldest forgotten first)
_OPEN_ROUTES = ("/", "/health")
_schemas: dict[str, str] = {}  # project number -> label config seen at /setup (when /predict omits it)
_schemas_lock = threading.Lock()


class RequestError(Exception):
    """A malformed request: answered ``status`` (400) with ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _json_body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw or not raw.strip():
        raise RequestError("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_basic_auth(settings: Settings) -> Response | None:
    if not settings.basic_auth_user or request.path in _OPEN_ROUTES:
        return None
    header = request.headers.get("Authorization", "")
    user = password = b""
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
            user, _, password = decoded.partition(b":")
        except (binascii.Error, ValueError):
            user = password = b""
    ok_user = hmac.compare_digest(user, settings.basic_auth_user.encode())
    ok_pass = hmac.compare_digest(password, settings.basic_auth_pass.encode())
    if ok_user and ok_pass:
        return None
    resp = jsonify(
        error="authentication required: this backend needs the basic-auth user and password "
        "(BASIC_AUTH_USER/BASIC_AUTH_PASS) configured in Label Studio's model connection"
    )
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Basic realm="hih-assist"'
    return resp


def _warm_up(model: model_api.HIHModel) -> None:
    def run() -> None:
        try:
            model.predictor()
        except Exception:  # noqa: BLE001 - reported again, properly, by the first /predict
            log.warning("background model load failed", exc_info=True)

    threading.Thread(target=run, name="hih-warm-up", daemon=True).start()


def create_app(settings: Settings | None = None, *, warm_up: bool = True) -> Flask:
    """The Flask app (gunicorn: ``backend.wsgi:app`` or ``backend.app:create_app()``).

    ``settings``: default ``Settings.from_env()``. ``warm_up``: load the model in a background thread after
    ``/setup`` so that the first ``/predict`` does not pay for it."""
    settings = settings or Settings.from_env()
    app = Flask("hih_assist")
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.config["HIH_SETTINGS"] = settings
    app.json.sort_keys = False

    def new_model(project: Any = None, label_config: str | None = None, access_token: str | None = None):
        return model_api.HIHModel(project, label_config, settings=settings, access_token=access_token)

    @app.before_request
    def _before() -> Response | None:
        g.t0 = time.perf_counter()
        return _check_basic_auth(settings)

    @app.after_request
    def _after(resp: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        METRICS.observe_request(
            rule, resp.status_code, time.perf_counter() - g.get("t0", time.perf_counter())
        )
        return resp

    @app.errorhandler(RequestError)
    def _bad_request(exc: RequestError):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc)
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(LabelConfigError)
    def _bad_config(exc: LabelConfigError):
        log.warning("%s %s: label config rejected: %s", request.method, request.path, exc)
        return jsonify(error=f"label config not supported: {exc}"), 422

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code or 500

    @app.errorhandler(model_api.ModelUnavailableError)
    def _no_model(exc: model_api.ModelUnavailableError):
        log.error("model unavailable: %s", exc)
        return jsonify(error=f"model unavailable: {exc} (set HIH_WEIGHTS or train the default model)"), 503

    @app.errorhandler(QueueUnavailable)
    def _no_queue(exc: QueueUnavailable):
        log.error("%s %s: training queue unavailable: %s", request.method, request.path, exc)
        return jsonify(
            error=f"training queue unavailable, event not queued: {exc} (predictions still work; "
            "Label Studio's annotations are re-read when the next training job runs, so send the event or "
            "START_TRAINING again once Redis is back)"
        ), 503

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}): {exc}"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        out: dict[str, Any] = {"status": "UP", "model_class": model_api.HIHModel.__name__}
        try:
            out["model_version"] = new_model().model_version
        except Exception as exc:  # noqa: BLE001 - health reports the process, and says what is wrong
            out["model_error"] = str(exc)
        return jsonify(out)

    @app.get("/metrics")
    def metrics():
        from backend.loop import connected_settings, loop_metrics

        body = METRICS.render()
        loop_settings = connected_settings()
        if loop_settings is not None:  # jobs and versions, where this process feeds the fine-tune queue
            body = body.rstrip("\n") + "\n" + loop_metrics(loop_settings)
        return Response(body, mimetype="text/plain", content_type="text/plain; version=0.0.4")

    @app.get("/versions")
    def versions():
        return jsonify(versions=[new_model().model_version])

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema")
        if schema is None:
            raise RequestError("missing 'schema': send the project's label config XML")
        if not isinstance(schema, str):
            raise RequestError(f"'schema' must be the label config XML string, got {type(schema).__name__}")
        project = body.get("project")
        if project is not None and not isinstance(project, (str, int)):
            raise RequestError("'project' must be a string like '<id>.<timestamp>' or a number")
        token = body.get("access_token")
        if token is not None and not isinstance(token, str):
            raise RequestError("'access_token' must be a string")
        model = new_model(project, schema, token)
        version = model.setup()
        model_api.remember_setup(project, token)
        number = model_api.project_number(project)
        if number:
            with _schemas_lock:
                _schemas.pop(number, None)
                _schemas[number] = schema
                while len(_schemas) > MAX_SCHEMAS:
                    del _schemas[next(iter(_schemas))]
        if warm_up:
            _warm_up(model)
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if tasks is None:
            raise RequestError("missing 'tasks': send a list of Label Studio tasks")
        if not isinstance(tasks, list):
            raise RequestError(f"'tasks' must be a list of task objects, got {type(tasks).__name__}")
        bad = [i for i, t in enumerate(tasks) if not isinstance(t, dict)]
        if bad:
            raise RequestError(f"every task must be an object with 'data'; tasks {bad[:10]} are not")
        bad = [i for i, t in enumerate(tasks) if "data" in t and not isinstance(t["data"], dict)]
        if bad:
            raise RequestError(f"task 'data' must be an object; tasks {bad[:10]} are not")
        project = body.get("project")
        if project is not None and not isinstance(project, (str, int)):
            raise RequestError("'project' must be a string like '<id>.<timestamp>' or a number")
        config = body.get("label_config")
        if config is None:
            number = model_api.project_number(project)
            with _schemas_lock:
                config = _schemas.get(number) if number else None
            if config is None:
                raise RequestError("missing 'label_config' (and no /setup was seen for this project)")
        if not isinstance(config, str):
            raise RequestError(
                f"'label_config' must be the label config XML string, got {type(config).__name__}"
            )
        params = body.get("params")
        context = params.get("context") if isinstance(params, dict) else None
        model = new_model(project, config)
        model.mapping  # noqa: B018 - reject an unusable config before loading anything
        results = model.predict(tasks, context=context)
        return jsonify(results=results, model_version=model.model_version)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise RequestError("missing 'action': a webhook event like ANNOTATION_CREATED or START_TRAINING")
        project = body.get("project")
        number = model_api.project_number(project) if isinstance(project, (dict, str, int)) else None
        model = new_model(number)
        out = model.fit(action, body)
        return jsonify(status="ok", action=action, **({"job": out} if out else {})), 201

    return app
