"""The production wiring (backend.loop): webhooks reach the real queue, projects get their current version,
and predictions go on when Redis is down. Real Redis ($REDIS_URL or a private server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import delete_namespace, make_settings, redis_server, tiny_checkpoint
from PIL import Image

from active_learning import queue, registry
from backend import model_api
from backend.app import create_app
from backend.loop import connect_fine_tuning

CONFIG = (Path(__file__).resolve().parents[1] / "label_config.xml").read_text()


@pytest.fixture
def wired(tmp_path):
    with redis_server() as url:
        base = tiny_checkpoint(tmp_path / "base", seed=0, version="base-v0")
        settings = make_settings(tmp_path, url, base, train_after=3)
        connect_fine_tuning(settings)
        model_api.clear_caches()
        try:
            yield settings, create_app(settings, warm_up=False).test_client(), tmp_path
        finally:
            model_api.set_training_hook(None)
            model_api.set_weights_resolver(None)
            model_api.clear_caches()
            delete_namespace(url, settings.queue_name)


def _predict(client, project: str, image_path) -> dict:
    face = {"type": "rectanglelabels", "from_name": "face", "to_name": "image", "id": "f",
            "original_width": 64, "original_height": 64,
            "value": {"x": 10, "y": 10, "width": 80, "height": 80, "rectanglelabels": ["Face"]}}
    task = {"id": 1, "data": {"image": str(image_path)}, "annotations": [{"result": [face]}]}
    body = {"tasks": [task], "project": project, "label_config": CONFIG}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["results"][0]


def test_projects_are_served_their_published_version(wired):
    settings, client, tmp = wired
    image = tmp / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    assert _predict(client, "7.1700000000", image)["model_version"] == "base-v0"
    v1 = registry.publish(7, tiny_checkpoint(tmp / "v1", seed=1, version="ignored"), {"parent": "base-v0"},
                          settings)
    served = _predict(client, "7.1700000000", image)
    assert served["model_version"] == v1.version != "base-v0"
    assert _predict(client, "8.1700000000", image)["model_version"] == "base-v0"  # other projects unchanged


def test_webhooks_queue_one_job_per_project(wired):
    settings, client, _ = wired
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 5}, "annotation": {"id": 1}, "task": {"id": 1}}
    for _ in range(5):
        assert client.post("/webhook", json=event).status_code == 201
    q = queue.get_queue(settings)
    assert q.count == 1  # 3 events reached TRAIN_AFTER: one job; the next two wait behind it
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}}).status_code == 201
    assert q.count == 1  # still one pending job for the project
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "hih_queue_up 1" in metrics
    assert 'hih_project_pending_job{project="5"} 1' in metrics
    assert 'hih_project_current_version{project="5",version="base"} 1' in metrics


def test_predictions_survive_redis_going_down(tmp_path):
    with redis_server() as url:
        base = tiny_checkpoint(tmp_path / "base", version="base-v0")
    # the server is gone now; point the settings at a port where nothing listens
    settings = make_settings(tmp_path, "redis://127.0.0.1:1/0", base)
    connect_fine_tuning(settings)
    model_api.clear_caches()
    try:
        client = create_app(settings, warm_up=False).test_client()
        image = tmp_path / "face.png"
        Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
        assert _predict(client, "3.1", image)["model_version"] == "base-v0"
        resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
        assert resp.status_code == 503 and "redis" in resp.get_json()["error"].lower()
    finally:
        model_api.set_training_hook(None)
        model_api.set_weights_resolver(None)
        model_api.clear_caches()
    del url
