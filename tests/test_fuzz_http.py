"""Property-based fuzzing of the HTTP protocol (/predict, /setup, /webhook) with Flask's test client.

Whatever arrives -- malformed JSON, wrong types, missing keys, NaN and infinite numbers, huge or deeply nested
payloads, unknown webhook actions, label configs without keypoints, XML bombs -- the backend answers a 4xx
JSON error that says what is wrong, or 200 with exactly one prediction per task (an empty one when a task
cannot be served, its reason counted in /metrics); never a 500, never a traceback, never non-standard JSON
(NaN/Infinity), and every request returns within seconds.

The model is a random-weight hih_tiny checkpoint (``tiny_checkpoint``), so the fuzzing is about the protocol,
not accuracy. The webhook goes through the real training hook, ``active_learning.queue.on_training_event``,
on a real Redis (``REDIS_URL``, or the local one on 127.0.0.1:6379; a private namespace, deleted afterwards);
without a reachable Redis the webhook part runs with the default logging hook.

The number of requests tried per target is printed at the end of the module and written to
``runs/hardening/fuzz_http.json``. ``HIH_FUZZ_SCALE`` (default 1) multiplies every ``max_examples``.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend import app as app_module
from backend import model_api
from backend.app import MAX_REQUEST_BYTES, create_app
from backend.label_config import MAX_CONFIG_CHARS
from backend.metrics import METRICS
from hih_settings import PROJECT_ROOT, Settings

CONFIG = (PROJECT_ROOT / "label_config.xml").read_text()
NO_KEYPOINTS = '<View><Image name="image" value="$image"/></View>'
NO_IMAGE = '<View><KeyPointLabels name="kp" toName="image"><Label value="jaw_01"/></KeyPointLabels></View>'
SMALL = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="face" toName="image"><Label value="Face"/></RectangleLabels>'
    '<KeyPointLabels name="kp" toName="image"><Label value="nose_tip"/><Label value="chin"/>'
    "</KeyPointLabels></View>"
)
XXE = (
    '<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file://{path}">]>'
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="&x;"/></KeyPointLabels></View>'
)
LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY l0 "lol">'
    + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    + ']><View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="&l9;"/></KeyPointLabels></View>'
)
ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"]
OTHER_ACTIONS = ["PROJECT_UPDATED", "TASKS_CREATED", "annotation_created", "", " ", "START_TRAINING\x00"]
SCALE = float(os.environ.get("HIH_FUZZ_SCALE", "1"))
REQUEST_SECONDS = 20.0  # no single request may take longer (a hang fails the test, not the run)
OK_STATUSES = {200, 201, 400, 404, 405, 413, 415, 422}
COUNTS: Counter[str] = Counter()


def fuzz_settings(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)), deadline=None, database=None, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )  # fmt: skip


def _no_constants(name: str) -> Any:
    raise AssertionError(f"the response is not standard JSON: it contains {name}")


def strict_json(data: bytes) -> Any:
    return json.loads(data, parse_constant=_no_constants)


def _redis_url() -> str | None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return None
    return url


@pytest.fixture(scope="module")
def env(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    import torch

    from active_learning import queue

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fuzz-http")
    rng = np.random.default_rng(0)
    image = folder / "face.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    url = _redis_url()
    s = Settings(
        weights=tiny_checkpoint, device="cpu", threads=1, label_studio_url="http://127.0.0.1:9",
        redis_url=url or "", queue_name=f"hihfuzz-{uuid.uuid4().hex[:8]}", train_after=3,
        model_dir=folder / "models", embedded_redis_db=folder / "redis" / "none.rdb",
    )  # fmt: skip
    model_api.clear_caches()
    METRICS.reset()
    app = create_app(s, warm_up=False)
    hook = (lambda event, payload: queue.on_training_event(event, payload, s)) if url else None
    yield SimpleNamespace(client=app.test_client(), image=image, settings=s, redis=url, hook=hook)
    model_api.set_training_hook(None)
    with app_module._schemas_lock:  # label configs /setup remembered for fuzzed project ids
        app_module._schemas.clear()
    if url:
        conn = redis.Redis.from_url(url)
        for pattern in (f"{s.queue_name}:*", f"rq:*{s.queue_name}*"):
            for k in conn.scan_iter(pattern, count=500):
                conn.delete(k)
    report = {k: COUNTS[k] for k in sorted(COUNTS)} | {"total": sum(COUNTS.values())}
    out = PROJECT_ROOT / "runs" / "hardening" / "fuzz_http.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    announce(request, "fuzz_http cases tried: " + ", ".join(f"{k}={v}" for k, v in report.items()))


def announce(request: pytest.FixtureRequest, line: str) -> None:
    """Write a line to the terminal past pytest's output capture (shown with -q too)."""
    plugins = request.config.pluginmanager
    reporter, capman = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is None or capman is None:
        print(line)
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


@pytest.fixture
def wired(env) -> SimpleNamespace:
    """Webhooks go to the real queue for this test (tests/conftest.py unhooks after every test)."""
    model_api.set_training_hook(env.hook)
    return env


# ------------------------------------------------------------------------------------------ checking
def post(env, target: str, route: str, body: Any = None, raw: bytes | None = None, **kw):
    """POST and check the invariants every answer must keep; returns (status, parsed JSON)."""
    COUNTS[target] += 1
    t0 = time.monotonic()
    if raw is not None:
        r = env.client.post(route, data=raw, content_type=kw.pop("content_type", "application/json"), **kw)
    else:
        r = env.client.post(route, json=body, **kw)
    elapsed = time.monotonic() - t0
    assert elapsed < REQUEST_SECONDS, f"{route} took {elapsed:.1f} s"
    assert r.status_code < 500, (r.status_code, r.data[:500])
    assert r.status_code in OK_STATUSES, (r.status_code, r.data[:500])
    assert r.mimetype == "application/json", r.mimetype
    data = strict_json(r.data)
    text = r.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text
    if r.status_code >= 400:
        assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"].strip()
    return r.status_code, data


def check_predictions(data: dict, n_tasks: int) -> None:
    results = data["results"]
    assert isinstance(results, list) and len(results) == n_tasks
    assert isinstance(data["model_version"], str)
    for p in results:
        assert set(p) >= {"result", "score", "model_version"}
        assert isinstance(p["result"], list)
        assert isinstance(p["score"], float) and 0.0 <= p["score"] <= 1.0
        for region in p["result"]:
            value = region["value"]
            assert all(np.isfinite(v) for v in value.values() if isinstance(v, float))
            if region["type"] == "keypointlabels":
                assert 0.0 <= value["x"] <= 100.0 and 0.0 <= value["y"] <= 100.0
                assert 0.0 < value["width"] <= 100.0


def failures_and_successes() -> tuple[int, int, int]:
    m = METRICS
    return m.tasks, m.predictions, sum(m.failures.values())


# ------------------------------------------------------------------------------------------ strategies
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 0.0, -0.0, 100, 1e-300, 1e300, -1e9, 1e9, 50.0])
    | st.integers(-(10**6), 10**6) | st.text(max_size=4) | st.none()
)  # fmt: skip
projects = (
    st.sampled_from(["1.1700000000", "1", "1.", ".", "", "abc.def", "-3.1", "99999999999999999999.1"])
    | st.integers(-5, 10**12) | json_values
)  # fmt: skip


@st.composite
def regions(draw) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    keys = draw(st.sets(st.sampled_from(["x", "y", "width", "height", "rotation"])))
    value = {k: draw(numbers) for k in keys}
    if draw(st.booleans()):
        value["rectanglelabels"] = draw(st.sampled_from([["Face"], [], ["Other"], "Face", None, [1]]))
    region = {
        "type": draw(st.sampled_from(["rectanglelabels", "rectangle", "keypointlabels", None, 5])),
        "to_name": draw(st.sampled_from(["image", None, "other", 3])),
        "from_name": draw(st.sampled_from(["face", None, "kp"])),
        "value": value if draw(st.integers(0, 9)) else draw(json_values),
    }
    return region


annotation_lists = st.lists(
    st.fixed_dictionaries(
        {"result": st.lists(regions(), max_size=4) | json_values},
        optional={"was_cancelled": json_values, "id": json_values, "updated_at": json_values,
                  "created_at": json_values},
    ) | json_values,
    max_size=3,
) | json_values  # fmt: skip


def image_values(env) -> st.SearchStrategy:
    fixed = [
        str(env.image), f"file://{env.image}", str(env.image) + ".missing", "", "   ", "/", ".", "~",
        "/data/upload/1/face.png", "/data/local-files/?d=x/y.png", "/tasks/1/resolve/?fileuri=eA==",
        "http://203.0.113.1/face.png", "https://169.254.169.254/latest/meta-data/", "s3://bucket/key.png",
        "gs://b/k", "azure-blob://c/k", "ftp://example.com/x.png", "javascript:alert(1)",
        "data:image/png;base64,!!!", "data:image/png,notbase64", "data:image/png;base64,", "file:///etc/passwd",
        "/proc/kmsg", "/proc/self/environ", "/dev/zero", "/dev/urandom", "\x00", "x" * 5000,
    ]  # fmt: skip
    return st.sampled_from(fixed) | st.text(max_size=30) | json_values


def tasks_of(env) -> st.SearchStrategy:
    data = st.fixed_dictionaries({}, optional={"image": image_values(env), "text": st.text(max_size=5)})
    task = st.fixed_dictionaries(
        {}, optional={"id": st.integers(-(2**63), 2**63) | json_values, "data": data | json_values,
                      "annotations": annotation_lists, "predictions": annotation_lists},
    )  # fmt: skip
    return st.lists(task, max_size=4)


@st.composite
def xml_configs(draw) -> str:
    """Random label configs built from the tags the parser looks at, with random attributes."""
    tags = ["View", "Image", "KeyPointLabels", "RectangleLabels", "Label", "Header", "Choices", "Text"]
    names = st.sampled_from(["image", "img", "kp", "face", "", "$image", "x y"])
    labels = st.sampled_from(["jaw_01", "Jaw 1", "nose_tip", "chin", "Face", "mouth_inner_8", "zzz", "",
                              "68"])  # fmt: skip

    def element(depth: int) -> str:
        tag = draw(st.sampled_from(tags))
        attrs = {}
        for attr in draw(st.sets(st.sampled_from(["name", "toName", "value", "predicted_values", "hint"]))):
            if attr == "predicted_values":
                attrs[attr] = draw(st.sampled_from(["30", "0-67", "67-0", "99", "a,b", "nose_tip,chin", ""]))
            elif attr == "value":
                attrs[attr] = draw(st.sampled_from(["$image", "$", "", "http://203.0.113.1/x.png"]) | labels)
            else:
                attrs[attr] = draw(names)
        inner = "".join(element(depth + 1) for _ in range(draw(st.integers(0, 3 if depth < 3 else 0))))
        text = "".join(f' {k}="{v}"' for k, v in attrs.items())
        return f"<{tag}{text}>{inner}</{tag}>"

    body = "".join(element(1) for _ in range(draw(st.integers(0, 4))))
    return f"<View>{body}</View>"


def configs() -> st.SearchStrategy:
    return (
        st.sampled_from([CONFIG, SMALL, NO_KEYPOINTS, NO_IMAGE, XXE.format(path="/etc/hostname"), LAUGHS, "",
                         "<View>", "<View/>", "null"])
        | xml_configs() | st.text(max_size=40) | json_values
    )  # fmt: skip


def mutate(data: bytes, draw) -> bytes:
    """Flip, cut or splice a valid body."""
    kind = draw(st.sampled_from(["cut", "flip", "insert", "utf16", "bom"]))
    if not data:
        return data
    i = draw(st.integers(0, len(data) - 1))
    if kind == "cut":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if kind == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    if kind == "utf16":
        return data.decode("utf-8", "replace").encode("utf-16")
    return b"\xef\xbb\xbf" + data


# ------------------------------------------------------------------------------------------ /predict
@pytest.mark.timeout(300)
def test_predict_answers_every_body_with_4xx_or_one_prediction_per_task(env) -> None:
    @fuzz_settings(200)
    @given(data=st.data())
    def run(data) -> None:
        body: dict[str, Any] = {}
        for key, strategy in (
            ("tasks", tasks_of(env) | json_values), ("project", projects), ("label_config", configs()),
            ("params", st.fixed_dictionaries({}, optional={"context": json_values}) | json_values),
        ):  # fmt: skip
            if data.draw(st.integers(0, 5)):
                body[key] = data.draw(strategy, label=key)
        before = failures_and_successes()
        status, out = post(env, "predict", "/predict", body)
        if status == 200:
            n = len(body["tasks"])
            check_predictions(out, n)
            tasks, ok, failed = (a - b for a, b in zip(failures_and_successes(), before, strict=True))
            # every task is accounted for: a prediction, or an empty one whose reason is counted
            assert tasks == n and ok + failed == n
        else:
            assert status in (400, 422), (status, out)

    run()


@pytest.mark.timeout(300)
def test_predict_with_valid_shape_and_hostile_tasks_never_fails_the_batch(env) -> None:
    """A valid config and task list, with every task's image, boxes and ids drawn from hostile values."""

    @fuzz_settings(150)
    @given(tasks=tasks_of(env), config=st.sampled_from([CONFIG, SMALL]))
    def run(tasks, config) -> None:
        tasks = [t for t in tasks if "data" not in t or isinstance(t["data"], dict)]
        status, out = post(env, "predict_tasks", "/predict", {"tasks": tasks, "label_config": config,
                                                               "project": "1.1"})  # fmt: skip
        assert status == 200, out
        check_predictions(out, len(tasks))

    run()


@pytest.mark.timeout(300)
def test_raw_and_mutated_bodies_get_a_json_answer(env) -> None:
    valid = {
        "/predict": {"tasks": [{"id": 1, "data": {"image": str(env.image)}}], "label_config": CONFIG},
        "/setup": {"project": "1.1", "schema": CONFIG, "access_token": "t"},
        "/webhook": {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 1}},
    }
    valid = {route: json.dumps(body) for route, body in valid.items()}

    @fuzz_settings(300)
    @given(data=st.data())
    def run(data) -> None:
        route = data.draw(st.sampled_from(sorted(valid)))
        kind = data.draw(st.sampled_from(["bytes", "text", "json", "mutated"]))
        if kind == "bytes":
            raw = data.draw(st.binary(max_size=300))
        elif kind == "text":
            raw = data.draw(st.text(max_size=100)).encode("utf-8", "surrogatepass")
        elif kind == "json":
            raw = json.dumps(data.draw(json_values)).encode()
        else:
            raw = mutate(valid[route].encode(), data.draw)
        kinds = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
        ctype = data.draw(st.sampled_from([*kinds, ""]))
        status, out = post(env, f"raw{route}", route, raw=raw, content_type=ctype)
        if status >= 400:
            assert status in (400, 413, 415, 422), (status, out)

    run()


def test_edge_payloads_huge_deep_and_numeric(env) -> None:
    # deeper than Python's recursion limit: 400, not a RecursionError 500
    deep = b"[" * 100_000 + b"]" * 100_000
    for route in ("/predict", "/setup", "/webhook"):
        status, out = post(env, "edge", route, raw=deep)
        assert status == 400 and "nested too deeply" in out["error"], out
    # a number with more digits than Python converts
    status, out = post(env, "edge", "/predict", raw=b'{"tasks": [], "label_config": ' + b"1" * 5000 + b"}")
    assert status == 400 and "not valid JSON" in out["error"]
    # NaN / Infinity literals (Python's json accepts them): handled, and never echoed back
    box = '{"x": NaN, "y": Infinity, "width": -Infinity, "height": 1e999}'
    raw = (
        f'{{"tasks": [{{"id": NaN, "data": {{"image": "{env.image}"}}, "annotations": [{{"result": '
        f'[{{"type": "rectanglelabels", "to_name": "image", "value": {box}}}]}}]}}], '
        f'"label_config": {json.dumps(CONFIG)}}}'
    )
    status, out = post(env, "edge", "/predict", raw=raw.encode())
    assert status == 200
    check_predictions(out, 1)
    # a body over MAX_REQUEST_BYTES (claimed by Content-Length; nothing that big is allocated here)
    r = env.client.post(
        "/predict", data=b"{}", content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": str(MAX_REQUEST_BYTES + 1)},
    )  # fmt: skip
    COUNTS["edge"] += 1
    assert r.status_code == 413 and "error" in strict_json(r.data)
    # a label config over the size limit: 422 at once, without parsing it
    big = CONFIG.replace("</View>", "<!--" + "x" * MAX_CONFIG_CHARS + "--></View>")
    for route, body in (("/setup", {"schema": big}), ("/predict", {"tasks": [], "label_config": big})):
        t0 = time.monotonic()
        status, out = post(env, "edge", route, body)
        assert status == 422 and "over the limit" in out["error"] and time.monotonic() - t0 < 5
    # XML attacks in the label config: refused, the external entity is never read into the answer
    secret = env.image.with_name("secret.txt")
    secret.write_text("jaw_01")  # would make a valid label if the entity were expanded
    for config in (XXE.format(path=secret), LAUGHS):
        status, out = post(env, "edge", "/setup", {"schema": config})
        assert status == 422 and "not valid XML" in out["error"], out
    # many tasks at once: one answer per task, quickly
    n = 1000
    t0 = time.monotonic()
    status, out = post(env, "edge", "/predict", {"tasks": [{"id": i, "data": {}} for i in range(n)],
                                                 "label_config": CONFIG})  # fmt: skip
    assert status == 200 and len(out["results"]) == n and time.monotonic() - t0 < 15
    # a very long string where the image path goes
    status, out = post(env, "edge", "/predict", {"tasks": [{"id": 1, "data": {"image": "a/" * 200_000}}],
                                                 "label_config": CONFIG})  # fmt: skip
    assert status == 200 and out["results"][0]["result"] == []
    # many face boxes in one task: bounded work
    box = {"type": "rectanglelabels", "to_name": "image", "from_name": "face",
           "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rectanglelabels": ["Face"]}}  # fmt: skip
    t0 = time.monotonic()
    status, out = post(env, "edge", "/predict", {"tasks": [{"id": 1, "data": {"image": str(env.image)},
                                                            "annotations": [{"result": [box] * 2000}]}],
                                                 "label_config": CONFIG})  # fmt: skip
    assert status == 200 and time.monotonic() - t0 < REQUEST_SECONDS
    check_predictions(out, 1)


# ------------------------------------------------------------------------------------------ /setup
@pytest.mark.timeout(300)
def test_setup_answers_200_or_a_4xx_that_says_why(env) -> None:
    @fuzz_settings(200)
    @given(data=st.data())
    def run(data) -> None:
        body: dict[str, Any] = {}
        for key, strategy in (
            ("project", projects), ("schema", configs()),
            ("hostname", st.sampled_from(["http://localhost:8080", "", "::::"]) | json_values),
            ("access_token", st.text(max_size=30) | json_values), ("extra_params", json_values),
        ):  # fmt: skip
            if data.draw(st.integers(0, 4)):
                body[key] = data.draw(strategy, label=key)
        status, out = post(env, "setup", "/setup", body)
        if status == 200:
            assert out == {"model_version": "test-tiny"}
        else:
            assert status in (400, 422), (status, out)
            if status == 422:
                assert out["error"].startswith("label config not supported: ")

    run()


def test_configs_without_keypoints_are_422_naming_what_is_missing(env) -> None:
    cases = {
        NO_KEYPOINTS: "no <KeyPointLabels>",
        NO_IMAGE: "no <Image>",
        '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="nothing">'
        '<Label value="jaw_01"/></KeyPointLabels></View>': "not connected to an <Image>",
        '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
        '<Label value="ear"/></KeyPointLabels></View>': "none of the <KeyPointLabels> labels maps",
        "": "empty",
        "<View": "not valid XML",
    }
    for config, message in cases.items():
        for route, body in (("/setup", {"schema": config}), ("/predict", {"tasks": [{"data": {}}],
                                                                          "label_config": config})):
            status, out = post(env, "no_keypoints", route, body)
            assert status in (400, 422) and message in out["error"], (route, config, out)


# ------------------------------------------------------------------------------------------ /webhook
@pytest.mark.timeout(300)
def test_webhook_answers_201_or_400_for_any_event(wired) -> None:
    env = wired
    """Known actions with any payload, unknown actions, junk: 201 (queued or not, with the reason) or 400."""

    @fuzz_settings(250)
    @given(data=st.data())
    def run(data) -> None:
        body: dict[str, Any] = {}
        if data.draw(st.integers(0, 6)):
            actions = st.sampled_from(ACTIONS + OTHER_ACTIONS) | st.text(max_size=20) | json_values
            body["action"] = data.draw(actions)
        for key, strategy in (
            ("project", st.fixed_dictionaries({}, optional={"id": projects}) | projects),
            ("annotation", json_values), ("task", json_values), ("annotations", json_values),
        ):  # fmt: skip
            if data.draw(st.booleans()):
                body[key] = data.draw(strategy, label=key)
        status, out = post(env, "webhook", "/webhook", body)
        if status == 201:
            assert out["status"] == "ok" and out["action"] == body["action"]
            if env.redis:
                job = out["job"]
                assert set(job) == {"queued", "job_id", "reason", "project"}
                assert isinstance(job["reason"], str)
                assert job["reason"] or job["queued"]
        else:
            assert status == 400 and "action" in out["error"], out

    run()


def test_a_burst_of_webhooks_queues_one_job_per_project(wired) -> None:
    env = wired
    if not env.redis:
        pytest.skip("needs a Redis (REDIS_URL or 127.0.0.1:6379)")
    from active_learning import queue

    project = 900_000 + uuid.uuid4().int % 1000
    outs = [post(env, "webhook_burst", "/webhook", {"action": a, "project": {"id": project}})[1]
            for a in ["ANNOTATION_CREATED"] * 10 + ["START_TRAINING"] * 3]  # fmt: skip
    assert sum(o["job"]["queued"] for o in outs) == 1
    assert queue.pending_job_id(project, env.settings) is not None


def test_wrong_methods_and_routes_answer_json(env) -> None:
    for method, route in [("get", "/predict"), ("put", "/setup"), ("delete", "/webhook"), ("get", "/nope"),
                          ("post", "/health"), ("patch", "/metrics")]:  # fmt: skip
        COUNTS["routes"] += 1
        r = getattr(env.client, method)(route)
        assert r.status_code in (404, 405) and "error" in strict_json(r.data)
    r = env.client.post("/predict", data=io.BytesIO(b"{}"), content_type="application/json")
    COUNTS["routes"] += 1
    assert r.status_code == 400
