"""The backend against a real Label Studio 1.23 server.

The backend runs as a real HTTP server (werkzeug, threaded) on 127.0.0.1; Label Studio connects to it
(/health, /setup), asks it for predictions of uploaded LFPW test faces through the Data Manager's "Retrieve
predictions", and stores them; the checks read Label Studio's own stored predictions: per face a rectangle
and 68 keypoints with parentID, coordinates in percent of the image, the model version, and (when the
trained default model exists at weights/hih_cpu_300w) points within 10% of the inter-ocular distance of the
ground truth.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from werkzeug.serving import make_server

from backend import model_api
from backend.app import create_app
from backend.metrics import METRICS
from backend.results import percent_to_pixel, percent_to_rect
from hih_settings import PACKAGED_WEIGHTS, Settings
from model.schemes import get_scheme

from .label_studio import LabelStudioServer

LFPW = Path("300w") / "test_full" / "lfpw"
SCHEME = get_scheme("300w_68")
TRAINED = (PACKAGED_WEIGHTS / "meta.json").is_file() and (PACKAGED_WEIGHTS / "model.safetensors").is_file()


@dataclass
class Backend:
    url: str
    settings: Settings
    version: str


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained default model when it exists, else a tiny random-weight one (structure checks only)."""
    if TRAINED:
        return PACKAGED_WEIGHTS
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.network import HIHNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("e2e-weights") / "ckpt"
    return save_checkpoint(path, HIHNet(get_config("hih_tiny")), {"scheme": "300w_68", "version": "e2e-tiny"})


@contextmanager
def _serve(settings: Settings) -> Iterator[str]:
    """The backend app as a real threaded HTTP server on 127.0.0.1 (a free port) -> its URL."""
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="hih-backend-e2e", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudioServer, weights: Path) -> Iterator[Backend]:
    torch.set_num_threads(1)
    model_api.clear_caches()
    METRICS.reset()
    settings = Settings(
        weights=weights, device="cpu", threads=1,
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
    )  # fmt: skip
    version = model_api.model_version_of(weights, "cpu", settings.detector)
    with _serve(settings) as url:
        yield Backend(url, settings, version)


@pytest.fixture(scope="module")
def lfpw_images(data_dir: Path) -> list[Path]:
    images = sorted((data_dir / LFPW).glob("*.jpg"))[:3]
    if len(images) < 3:
        pytest.skip(f"needs three LFPW test images in {data_dir / LFPW}")
    return images


def _read_pts(path: Path) -> np.ndarray:
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    return np.array([[float(v) for v in line.split()] for line in body.strip().splitlines()]) - 1.0


def _faces(result: list[dict], width: int, height: int) -> list[tuple[dict, np.ndarray]]:
    """(rectangle, 68 x 2 pixel-centre points) per face, checking the stored structure on the way."""
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    kps = [r for r in result if r["type"] == "keypointlabels"]
    assert rects, "no face rectangle"
    assert len(kps) == 68 * len(rects)
    order = {name: i for i, name in enumerate(SCHEME.point_names)}
    faces = []
    for rect in rects:
        assert rect["id"] and rect["from_name"] == "face" and rect["to_name"] == "image"
        assert rect["value"]["rectanglelabels"] == ["Face"]
        mine = [k for k in kps if k.get("parentID") == rect["id"]]
        assert sorted(order[k["value"]["keypointlabels"][0]] for k in mine) == list(range(68))
        pts = np.zeros((68, 2))
        for k in mine:
            assert k["from_name"] == "keypoints" and k["to_name"] == "image"
            assert (k["original_width"], k["original_height"]) == (width, height)
            assert 0.0 <= k["score"] <= 1.0
            pts[order[k["value"]["keypointlabels"][0]]] = percent_to_pixel(
                k["value"]["x"], k["value"]["y"], width, height
            )
        faces.append((rect, pts))
    return faces


def _iou_with_truth(rect_value: dict, gt: np.ndarray, width: int, height: int) -> float:
    x0, y0, x1, y1 = percent_to_rect(rect_value, width, height)
    (gx0, gy0), (gx1, gy1) = gt.min(0) + 0.5, gt.max(0) + 0.5
    iw, ih = max(0.0, min(x1, gx1) - max(x0, gx0)), max(0.0, min(y1, gy1) - max(y0, gy0))
    inter = iw * ih
    return inter / ((x1 - x0) * (y1 - y0) + (gx1 - gx0) * (gy1 - gy0) - inter)


@pytest.mark.data
def test_label_studio_gets_and_stores_hih_predictions(
    label_studio: LabelStudioServer, label_config_xml: str, backend: Backend, lfpw_images: list[Path]
) -> None:
    ls = label_studio
    pid = ls.create_project("hih-assist e2e: predictions", label_config_xml)
    task_ids = ls.upload_images(pid, lfpw_images)
    assert len(task_ids) == 3
    tasks = {t["id"]: t for t in ls.list_tasks(pid)}
    image_of = {
        tid: next(p for p in lfpw_images if tasks[tid]["data"]["image"].endswith(p.name)) for tid in task_ids
    }

    backend_id = ls.connect_ml_backend(pid, backend.url, title="hih-assist")  # /health + /setup
    assert ls.get_ml_backend(backend_id)["state"] == "CO"
    out = ls.retrieve_predictions(pid, task_ids)
    assert out["processed_items"] == 3

    errors = []
    for tid in task_ids:
        path = image_of[tid]
        width, height = Image.open(path).size
        (pred,) = ls.get_predictions(tid)
        assert pred["model_version"] == backend.version
        assert 0.0 < pred["score"] <= 1.0
        faces = _faces(pred["result"], width, height)
        gt = _read_pts(path.with_suffix(".pts"))
        rect, pts = max(faces, key=lambda f: _iou_with_truth(f[0]["value"], gt, width, height))
        assert _iou_with_truth(rect["value"], gt, width, height) > 0.3, (
            f"{path.name}: no face box on the face"
        )
        if TRAINED:
            iod = np.linalg.norm(gt[36] - gt[45])
            err = np.linalg.norm(pts - gt, axis=1) / iod
            errors.append(err.mean())
            assert err.max() < 0.5, f"{path.name}: a point is {err.max():.2f} inter-ocular distances off"
            assert err.mean() < 0.10, f"{path.name}: mean error {err.mean():.3f} of the inter-ocular distance"

    # the Data Manager's prediction score follows the backend's version once the project uses it
    ls.set_model_version(pid, backend.version)
    scores = {t["id"]: t["predictions_score"] for t in ls.list_tasks(pid)}
    assert all(scores[tid] is not None and scores[tid] > 0 for tid in task_ids), scores
    if errors:
        print(f"\nmean NME over {len(errors)} faces through Label Studio: {100 * np.mean(errors):.2f}%")


@pytest.mark.data
def test_personal_access_token_and_webhooks(
    label_studio: LabelStudioServer, label_config_xml: str, backend: Backend, lfpw_images: list[Path]
) -> None:
    """A backend configured with a personal access token (JWT refresh token) fetches the images with a
    refreshed Bearer token; annotations and training requests reach the training hook."""
    ls = label_studio
    pat_settings = replace(backend.settings, label_studio_api_key=ls.create_personal_access_token())
    events: list[tuple[str, dict]] = []
    model_api.set_training_hook(lambda event, payload: events.append((event, payload)) or None)
    try:
        with _serve(pat_settings) as url:
            pid = ls.create_project("hih-assist e2e: personal access token", label_config_xml)
            (tid,) = ls.upload_images(pid, lfpw_images[:1])
            backend_id = ls.connect_ml_backend(pid, url, title="hih-assist-pat")
            assert ls.retrieve_predictions(pid, [tid])["processed_items"] == 1
            (pred,) = ls.get_predictions(tid)
            width, height = Image.open(lfpw_images[0]).size
            assert _faces(pred["result"], width, height)

            ls.create_annotation(tid, pred["result"])
            ls.train_ml_backend(backend_id)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not {"ANNOTATION_CREATED", "START_TRAINING"} <= {
                e for e, _ in events
            }:
                time.sleep(0.1)
    finally:
        model_api.set_training_hook(None)
    actions = {e for e, _ in events}
    assert {"ANNOTATION_CREATED", "START_TRAINING"} <= actions, actions
    start = next(p for e, p in events if e == "START_TRAINING")
    assert start["project"]["id"] == pid
