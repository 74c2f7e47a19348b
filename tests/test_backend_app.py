"""The ML backend protocol with Flask's test client and a real Predictor (a tiny random-weight checkpoint;
the trained default model where it exists for the accuracy check on real faces)."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backend import model_api
from backend.app import create_app
from backend.label_config import parse_label_config
from backend.metrics import METRICS
from backend.results import percent_to_pixel, percent_to_rect, rect_to_percent
from hih_settings import PACKAGED_WEIGHTS, Settings
from model.schemes import get_scheme

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (ROOT / "label_config.xml").read_text()
SCHEME = get_scheme("300w_68")
LFPW = Path("300w") / "test_full" / "lfpw"
TOKEN = "backend0test0token"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "ckpt"
    save_checkpoint(path, HIHNet(get_config("hih_tiny")), {"scheme": "300w_68", "version": "test-tiny"})
    return path


class FileServer:
    """Label Studio's /data/upload on 127.0.0.1: needs ``Authorization: Token <TOKEN>``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    code, body = 401, b"{}"
                else:
                    code, body = (200, files[self.path]) if self.path in files else (404, b"")
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w])


def png(arr: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(arr).save(buf, format="PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    out = {"a": folder / "a.png", "b": folder / "b.png", "junk": folder / "junk.png"}
    out["a"].write_bytes(png(texture(90, 120, 1)))
    out["b"].write_bytes(png(texture(160, 200, 2)))
    out["junk"].write_bytes(b"this is not an image")
    return out


@pytest.fixture(scope="module")
def files() -> Iterator[FileServer]:
    server = FileServer({"/data/upload/1/a.png": png(texture(90, 120, 1))})
    yield server
    server.close()


@pytest.fixture
def settings(tiny_weights: Path, files: FileServer) -> Settings:
    return Settings(
        weights=tiny_weights, device="cpu", detector="auto", threads=1, label_studio_url=files.url
    )


@pytest.fixture
def client(settings: Settings):
    model_api.clear_caches()
    METRICS.reset()
    return create_app(settings, warm_up=False).test_client()


def face_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int, **extra: Any) -> dict[str, Any]:
    value = rect_to_percent((x0, y0, x1, y1), w, h)
    value["rectanglelabels"] = ["Face"]
    return {"id": "f", "type": "rectanglelabels", "from_name": "face", "to_name": "image", "value": value,
            "original_width": w, "original_height": h, **extra}  # fmt: skip


def task(tid: int, image: Any, boxes: list[dict] | None = None, key: str = "annotations") -> dict[str, Any]:
    t: dict[str, Any] = {"id": tid, "data": {"image": str(image)}, "annotations": [], "predictions": []}
    if boxes:
        t[key] = [{"id": 1, "result": boxes, "was_cancelled": False}]
    return t


def predict(client, tasks: list[dict], config: str = CONFIG, **extra: Any):
    return client.post(
        "/predict", json={"tasks": tasks, "project": "1.1700000000", "label_config": config, **extra}
    )


def check_face_structure(result: list[dict], width: int, height: int, n_points: int = 68) -> list[dict]:
    """Per face: a rectangle with an id and its keypoints with parentID; returns the rectangles."""
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    kps = [r for r in result if r["type"] == "keypointlabels"]
    assert rects and len(kps) == n_points * len(rects)
    for rect in rects:
        mine = [k for k in kps if k["parentID"] == rect["id"]]
        assert sorted(k["value"]["keypointlabels"][0] for k in mine) == sorted(SCHEME.point_names[:n_points])
    for r in result:
        assert (r["original_width"], r["original_height"], r["image_rotation"]) == (width, height, 0)
        assert 0 <= r["value"]["x"] <= 100 and 0 <= r["value"]["y"] <= 100
    for k in kps:
        assert 0 <= k["score"] <= 1
    return rects


# ------------------------------------------------------------------------------------------ routes
def test_health_is_open_and_names_the_model(client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json == {"status": "UP", "model_class": "HIHModel", "model_version": "test-tiny"}
    assert client.get("/").json["status"] == "UP"


def test_setup_returns_the_model_version(client) -> None:
    body = {"project": "1.1700000000", "schema": CONFIG, "hostname": "http://localhost:8080",
            "access_token": TOKEN, "extra_params": None}  # fmt: skip
    r = client.post("/setup", json=body)
    assert r.status_code == 200 and r.json == {"model_version": "test-tiny"}
    assert client.get("/versions").json == {"versions": ["test-tiny"]}


def test_setup_and_predict_reject_a_config_they_cannot_serve(client) -> None:
    no_kp = '<View><Image name="image" value="$image"/></View>'
    r = client.post("/setup", json={"project": "1.1", "schema": no_kp})
    assert r.status_code == 422 and "no <KeyPointLabels>" in r.json["error"]
    r = predict(client, [task(1, "x.png")], config=no_kp)
    assert r.status_code == 422 and "no <KeyPointLabels>" in r.json["error"]
    unmappable = CONFIG.replace('value="jaw_', 'value="contour_').replace('value="right_', 'value="r_')
    unmappable = unmappable.replace('value="left_', 'value="l_').replace('value="nose_', 'value="n_')
    unmappable = unmappable.replace('value="mouth_', 'value="m_')
    r = client.post("/setup", json={"project": "1.1", "schema": unmappable})
    assert r.status_code == 422 and "none of the <KeyPointLabels> labels maps" in r.json["error"]


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/predict", b"{not json", "not valid JSON"),
        ("/predict", b"", "body is empty"),
        ("/predict", b"[1, 2]", "must be a JSON object"),
        ("/predict", {"label_config": CONFIG}, "missing 'tasks'"),
        ("/predict", {"tasks": {"id": 1}, "label_config": CONFIG}, "'tasks' must be a list"),
        ("/predict", {"tasks": [1, "x"], "label_config": CONFIG}, "every task must be an object"),
        ("/predict", {"tasks": [{"data": "x"}], "label_config": CONFIG}, "'data' must be an object"),
        ("/predict", {"tasks": [], "label_config": 5}, "'label_config' must be"),
        ("/predict", {"tasks": [], "project": "999.1"}, "missing 'label_config'"),
        ("/predict", {"tasks": [], "project": [1], "label_config": CONFIG}, "'project' must be"),
        ("/setup", {"project": "1.1"}, "missing 'schema'"),
        ("/setup", {"schema": ["x"]}, "'schema' must be"),
        ("/setup", {"schema": CONFIG, "access_token": 5}, "'access_token' must be"),
        ("/webhook", {"project": {"id": 1}}, "missing 'action'"),
        ("/webhook", b"null", "must be a JSON object"),
    ],
)
def test_malformed_requests_get_400_with_a_message(client, route: str, body: Any, message: str) -> None:
    if isinstance(body, bytes):
        r = client.post(route, data=body, content_type="application/json")
    else:
        r = client.post(route, json=body)
    assert r.status_code == 400, r.data
    assert message in r.json["error"]
    assert "Traceback" not in r.get_data(as_text=True)


def test_unknown_route_and_wrong_method_answer_json(client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "Not Found" in r.json["error"]
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json


def test_unexpected_errors_are_500_json_without_traceback(client) -> None:
    def broken(project_id, settings):
        raise RuntimeError("resolver exploded")

    model_api.set_weights_resolver(broken)
    try:
        r = predict(client, [task(1, "x.png")])
    finally:
        model_api.set_weights_resolver(None)
    assert r.status_code == 500
    assert r.json == {"error": "internal error (RuntimeError): resolver exploded"}


def test_missing_weights_are_503_and_health_says_why(files: FileServer, tmp_path: Path) -> None:
    model_api.clear_caches()
    app = create_app(Settings(weights=tmp_path / "none", device="cpu", threads=1), warm_up=False)
    c = app.test_client()
    r = c.post("/setup", json={"project": "1.1", "schema": CONFIG})
    assert r.status_code == 503 and "model unavailable" in r.json["error"]
    h = c.get("/health")
    assert h.status_code == 200 and "meta.json" in h.json["model_error"]


# ------------------------------------------------------------------------------------------ predictions
def test_one_prediction_per_task_in_order_and_failures_stay_empty(client, images: dict[str, Path]) -> None:
    tasks = [
        task(10, images["a"], [face_box(30, 20, 80, 70, 120, 90)]),
        {"id": 11, "data": {"text": "no image here"}},
        task(12, images["a"].with_name("missing.png")),
        task(13, images["junk"]),
        task(14, images["b"], [face_box(20, 20, 60, 60, 200, 160), face_box(90, 30, 190, 130, 200, 160)]),
        {"id": 15, "data": {"image": 42}},
        task(16, "http://203.0.113.7/face.png"),
    ]
    r = predict(client, tasks)
    assert r.status_code == 200
    results = r.json["results"]
    assert len(results) == len(tasks) and r.json["model_version"] == "test-tiny"
    for i in (1, 2, 3, 5, 6):
        assert results[i] == {"result": [], "score": 0.0, "model_version": "test-tiny"}
    assert len(check_face_structure(results[0]["result"], 120, 90)) == 1
    assert len(check_face_structure(results[4]["result"], 200, 160)) == 2
    assert all(p["model_version"] == "test-tiny" for p in results)
    assert 0 < results[0]["score"] <= 1

    text = client.get("/metrics").get_data(as_text=True)
    assert "hih_tasks_total 7" in text and "hih_predictions_total 2" in text and "hih_faces_total 3" in text
    for reason, n in {"missing": 2, "not_found": 1, "unreadable": 1, "forbidden_host": 1}.items():
        assert f'hih_prediction_failures_total{{reason="{reason}"}} {n}' in text
    assert 'hih_requests_total{route="/predict",status="200"} 1' in text
    assert 'hih_request_seconds_count{route="/predict"} 1' in text
    assert 'hih_model_info{version="test-tiny"' in text


def test_face_boxes_in_the_task_are_used_largest_first(
    client, settings: Settings, images: dict[str, Path]
) -> None:
    from model.detect import box_from_xywh
    from model.image_io import load_image

    boxes = [(20.0, 20.0, 60.0, 60.0), (90.0, 30.0, 190.0, 130.0)]  # the second is larger
    r = predict(
        client,
        [
            task(1, images["b"]),
            task(2, images["b"], [face_box(*b, 200, 160) for b in boxes], key="predictions"),
        ],
    )
    assert r.json["results"][0]["result"] == []  # no face in the texture for the detector ...
    result = r.json["results"][1]["result"]
    rects = check_face_structure(result, 200, 160)  # ... but the two given boxes are used
    # the same as the predictor on those boxes, largest first
    predictor = model_api.get_predictor(settings.weights, "cpu", "auto")
    given = [box_from_xywh(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    faces = predictor.predict(load_image(images["b"]), given)
    assert [f.box.size for f in faces] == [100.0, 40.0]
    for rect, f in zip(rects, faces, strict=True):
        assert percent_to_rect(rect["value"], 200, 160) == pytest.approx(f.rect, abs=1e-9)
        kps = [k for k in result if k.get("parentID") == rect["id"]]
        got = np.array([percent_to_pixel(k["value"]["x"], k["value"]["y"], 200, 160) for k in kps])
        inside = (f.points >= -0.5).all(1) & (f.points[:, 0] <= 199.5) & (f.points[:, 1] <= 159.5)
        assert np.allclose(got[inside], f.points[inside], atol=1e-9)


def test_task_face_boxes_prefers_annotations_and_skips_cancelled() -> None:
    mapping = parse_label_config(CONFIG)
    ann_box = face_box(10, 10, 50, 50, 100, 100)
    old = {"id": 1, "updated_at": "2024-01-01T00:00:00Z", "result": [face_box(0, 0, 20, 20, 100, 100)]}
    new = {"id": 2, "updated_at": "2024-06-01T00:00:00Z", "result": [ann_box]}
    cancelled = {"id": 3, "updated_at": "2025-01-01T00:00:00Z", "was_cancelled": True,
                 "result": [face_box(60, 60, 90, 90, 100, 100)]}  # fmt: skip
    pred = {"id": 9, "result": [face_box(70, 70, 99, 99, 100, 100)]}
    t = {"data": {}, "annotations": [old, new, cancelled], "predictions": [pred]}
    (box,) = model_api.task_face_boxes(t, mapping, 100, 100)
    assert (box.cx, box.cy, box.size) == pytest.approx((29.5, 29.5, 40.0))
    (box,) = model_api.task_face_boxes({"annotations": [], "predictions": [pred]}, mapping, 100, 100)
    assert box.size == pytest.approx(29.0)
    other = face_box(10, 10, 50, 50, 100, 100)
    other["value"]["rectanglelabels"] = ["Car"]
    assert model_api.task_face_boxes({"annotations": [{"result": [other]}]}, mapping, 100, 100) == []


def test_exif_rotated_image_gives_display_coordinates(client, tmp_path: Path) -> None:
    shown = texture(96, 128, 5)  # displayed: 128 wide, 96 high
    plain, rotated = tmp_path / "plain.png", tmp_path / "rotated.png"
    plain.write_bytes(png(shown))
    rotated.write_bytes(png(np.ascontiguousarray(np.rot90(shown, k=1)), orientation=6))  # stored 96 x 128
    box = [face_box(30, 20, 90, 80, 128, 96)]
    r = predict(client, [task(1, plain, box), task(2, rotated, box)])
    a, b = (p["result"] for p in r.json["results"])
    check_face_structure(a, 128, 96)
    check_face_structure(b, 128, 96)
    ka = [(k["value"]["x"], k["value"]["y"]) for k in a if k["type"] == "keypointlabels"]
    kb = [(k["value"]["x"], k["value"]["y"]) for k in b if k["type"] == "keypointlabels"]
    assert np.allclose(ka, kb, atol=1e-9)


def test_label_studio_upload_is_fetched_with_the_setup_token(client) -> None:
    t = [{"id": 5, "data": {"image": "/data/upload/1/a.png"}}]
    r = predict(client, t)  # no LABEL_STUDIO_API_KEY and no /setup yet: 401 -> empty prediction
    assert r.json["results"][0]["result"] == []
    assert 'reason="unauthorized"} 1' in client.get("/metrics").get_data(as_text=True)
    client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG, "access_token": TOKEN})
    r = predict(client, t, project="1.1700000001")
    assert r.status_code == 200
    # the tiny random model may or may not find the random texture a face; the image was fetched either way
    text = client.get("/metrics").get_data(as_text=True)
    assert 'reason="unauthorized"} 1' in text and "hih_tasks_total 2" in text


def test_predict_uses_the_setup_config_when_label_config_is_missing(client, images: dict[str, Path]) -> None:
    client.post("/setup", json={"project": "7.1", "schema": CONFIG})
    r = client.post("/predict", json={"tasks": [task(1, images["a"], [face_box(30, 20, 80, 70, 120, 90)])],
                                      "project": "7.2"})  # fmt: skip
    assert r.status_code == 200 and len(r.json["results"][0]["result"]) == 69


def test_subset_config_gets_only_its_points(client, images: dict[str, Path]) -> None:
    xml = (
        '<View><Image name="photo" value="$img"/>'
        '<RectangleLabels name="faces" toName="photo"><Label value="Face"/></RectangleLabels>'
        '<KeyPointLabels name="pts" toName="photo"><Label value="Eye R" predicted_values="36"/>'
        '<Label value="nose_tip"/><Label value="Hat"/></KeyPointLabels></View>'
    )
    box = face_box(30, 20, 80, 70, 120, 90) | {"from_name": "faces", "to_name": "photo"}
    t = {"id": 1, "data": {"img": str(images["a"])}, "annotations": [{"result": [box]}]}
    r = predict(client, [t], config=xml)
    result = r.json["results"][0]["result"]
    assert [x["type"] for x in result] == ["rectanglelabels", "keypointlabels", "keypointlabels"]
    assert [x["value"]["keypointlabels"] for x in result[1:]] == [["nose_tip"], ["Eye R"]]
    assert {x["from_name"] for x in result[1:]} == {"pts"} and {x["to_name"] for x in result} == {"photo"}


def test_weights_resolver_hot_swaps_the_model_per_project(
    client, tiny_weights: Path, images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    v2 = save_checkpoint(
        tiny_weights.parent / "v2", HIHNet(get_config("hih_tiny")), {"scheme": "300w_68", "version": "p7-v2"}
    )
    monkeypatch.setattr(model_api, "MAX_PREDICTORS", 1)
    model_api.set_weights_resolver(lambda project, settings: v2 if project == "7" else settings.weights)
    try:
        t = [task(1, images["a"], [face_box(30, 20, 80, 70, 120, 90)])]
        r7 = client.post("/predict", json={"tasks": t, "project": "7.1", "label_config": CONFIG})
        r1 = client.post("/predict", json={"tasks": t, "project": "1.1", "label_config": CONFIG})
        assert client.post("/setup", json={"project": "7.5", "schema": CONFIG}).json == {
            "model_version": "p7-v2"
        }
    finally:
        model_api.set_weights_resolver(None)
    assert r7.json["model_version"] == r7.json["results"][0]["model_version"] == "p7-v2"
    assert r1.json["model_version"] == r1.json["results"][0]["model_version"] == "test-tiny"
    assert len(model_api._predictors) == 1  # the least recently used model was unloaded


# ------------------------------------------------------------------------------------------ webhook, auth
def test_webhook_answers_201_and_reaches_the_training_hook(client) -> None:
    seen: list[tuple[str, dict]] = []

    def hook(event: str, payload: dict) -> dict:
        seen.append((event, payload))
        return {"queued": event}

    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {},
                                      "task": {"id": 1}})  # fmt: skip
    assert r.status_code == 201 and r.json == {"status": "ok", "action": "ANNOTATION_CREATED"}
    model_api.set_training_hook(hook)
    try:
        r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3, "title": "p"}})
    finally:
        model_api.set_training_hook(None)
    assert r.status_code == 201 and r.json["job"] == {"queued": "START_TRAINING"}
    assert seen == [("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 3, "title": "p"}})]
    text = client.get("/metrics").get_data(as_text=True)
    assert 'hih_webhooks_total{action="ANNOTATION_CREATED"} 1' in text
    assert 'hih_webhooks_total{action="START_TRAINING"} 1' in text


def test_basic_auth_protects_everything_but_health(tiny_weights: Path) -> None:
    model_api.clear_caches()
    s = Settings(
        weights=tiny_weights, device="cpu", threads=1, basic_auth_user="ann", basic_auth_pass="s3cret"
    )
    c = create_app(s, warm_up=False).test_client()

    def auth(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert c.get("/health").status_code == 200
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("get", "/metrics")]:
        r = getattr(c, method)(path, json={})
        assert r.status_code == 401 and "basic-auth" in r.json["error"]
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    assert c.post("/setup", json={"schema": CONFIG}, headers=auth("ann", "wrong")).status_code == 401
    assert (
        c.post("/setup", json={"schema": CONFIG}, headers={"Authorization": "Basic !!!"}).status_code == 401
    )
    r = c.post("/setup", json={"schema": CONFIG}, headers=auth("ann", "s3cret"))
    assert r.status_code == 200 and r.json["model_version"] == "test-tiny"


def test_setup_warms_the_model_up_in_the_background(settings: Settings) -> None:
    model_api.clear_caches()
    c = create_app(settings, warm_up=True).test_client()
    assert c.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
    for t in threading.enumerate():
        if t.name == "hih-warm-up":
            t.join(60)
    assert model_api._predictors, "the model was not loaded after /setup"


# ------------------------------------------------------------------------------------------ real faces
def _read_pts(path: Path) -> np.ndarray:
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    return np.array([[float(v) for v in line.split()] for line in body.strip().splitlines()]) - 1.0


@pytest.mark.data
def test_real_faces_are_detected_and_annotated(data_dir: Path, tiny_weights: Path) -> None:
    trained = (PACKAGED_WEIGHTS / "meta.json").is_file()
    model_api.clear_caches()
    s = Settings(weights=PACKAGED_WEIGHTS if trained else tiny_weights, device="cpu", threads=1)
    c = create_app(s, warm_up=False).test_client()
    paths = sorted((data_dir / LFPW).glob("*.jpg"))[:3]
    r = predict(c, [task(i, p) for i, p in enumerate(paths)])
    assert r.status_code == 200
    for path, pred in zip(paths, r.json["results"], strict=True):
        w, h = Image.open(path).size
        rects = check_face_structure(pred["result"], w, h)
        gt = _read_pts(path.with_suffix(".pts"))
        # the annotated face is one of the faces found: the one whose box overlaps the ground truth most
        best = max(rects, key=lambda rc: _overlap(percent_to_rect(rc["value"], w, h), gt))
        if trained:  # random weights: the structure only
            assert _overlap(percent_to_rect(best["value"], w, h), gt) > 0.5
            kps = [k for k in pred["result"] if k.get("parentID") == best["id"]]
            order = {n: i for i, n in enumerate(SCHEME.point_names)}
            pts = np.zeros((68, 2))
            for k in kps:
                pts[order[k["value"]["keypointlabels"][0]]] = percent_to_pixel(
                    k["value"]["x"], k["value"]["y"], w, h
                )
            iod = np.linalg.norm(gt[36] - gt[45])
            err = np.linalg.norm(pts - gt, axis=1).mean() / iod
            assert err < 0.10, f"{path.name}: mean error {err:.3f} of the inter-ocular distance"


def _overlap(rect: tuple[float, float, float, float], gt: np.ndarray) -> float:
    gx0, gy0 = gt.min(0) + 0.5
    gx1, gy1 = gt.max(0) + 0.5
    iw = max(0.0, min(rect[2], gx1) - max(rect[0], gx0))
    ih = max(0.0, min(rect[3], gy1) - max(rect[1], gy0))
    inter = iw * ih
    union = (rect[2] - rect[0]) * (rect[3] - rect[1]) + (gx1 - gx0) * (gy1 - gy0) - inter
    return inter / union


def test_wsgi_module_builds_the_app() -> None:
    import importlib

    wsgi = importlib.import_module("backend.wsgi")
    assert wsgi.app.name == "hih_assist"
    assert json.loads(wsgi.app.test_client().get("/health").data)["status"] == "UP"
