"""The learning loop against a real Label Studio 1.23, a real Redis and real RQ worker processes.

Annotated LFPW faces in a Label Studio project; training triggered from Label Studio (``POST
/api/ml/{id}/train`` makes Label Studio send START_TRAINING to the connected ML backend's ``/webhook``; a stub
backend hands the payload to ``active_learning.queue.on_training_event``, as the real backend does; one test
runs the deployed backend itself, webhooks and predictions included); a worker
process fine-tunes, publishes, writes predictions and sets the project's model_version. Failures (annotations
without all points, images deleted from Label Studio) and a worker killed mid-training leave the old version
current with a clear reason, and the next job succeeds.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import (
    LFPW_TEST,
    delete_namespace,
    keypoint_result,
    kill_group,
    kill_tree,
    make_settings,
    pid_alive,
    redis_server,
    run_worker_burst,
    start_worker,
    tiny_checkpoint,
    wait_for,
)

from active_learning import queue, registry
from model.image_io import load_image
from model.readers import load_300w_folder

from .label_studio import LabelStudioServer, StubMLBackend

torch.set_num_threads(1)
N_FACES = 8


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def faces(data_dir):
    return load_300w_folder(data_dir / LFPW_TEST)[:N_FACES]


@pytest.fixture
def settings(tmp_path, redis_url, base, label_studio: LabelStudioServer):
    s = make_settings(tmp_path, redis_url, base, label_studio_url=label_studio.url,
                      label_studio_api_key=label_studio.token)
    yield s
    delete_namespace(redis_url, s.queue_name)


def annotated_project(ls: LabelStudioServer, label_config: str, faces, title: str, n_points: int = 68) -> int:
    pid = ls.create_project(title, label_config)
    task_ids = ls.upload_files(pid, [f.image_path for f in faces])
    for tid, face in zip(task_ids, faces, strict=True):
        h, w = load_image(face.image_path).shape[:2]
        result = keypoint_result(face.points.astype(np.float64), w, h)
        ls.create_annotation(tid, result[: 1 + n_points])
    return pid


def start_training_from_label_studio(ls: LabelStudioServer, pid: int, settings) -> dict:
    """Label Studio's "Start training" -> START_TRAINING on the backend's /webhook -> the queue."""
    with StubMLBackend("stub-v0") as stub:
        backend_id = ls.connect_ml_backend(pid, stub.url)
        ls.train_ml_backend(backend_id)
        assert wait_for(lambda: any(p == "/webhook" for _, p, _ in stub.calls), timeout=15), stub.calls
        (body,) = [b for m, p, b in stub.calls if p == "/webhook"]
    assert body["action"] == "START_TRAINING" and body["project"]["id"] == pid
    return queue.on_training_event(body["action"], body, settings)


def job_of(settings, job_id):
    return queue.get_queue(settings).fetch_job(job_id)


@contextlib.contextmanager
def deployed_backend(settings) -> Iterator[str]:
    """The backend as ``hih-assist serve`` runs it (``backend.loop``: webhooks -> queue, current versions),
    as a real threaded HTTP server on 127.0.0.1 -> its URL."""
    from werkzeug.serving import make_server

    from backend import model_api
    from backend.loop import create_deployed_app

    model_api.clear_caches()
    server = make_server("127.0.0.1", 0, create_deployed_app(settings, warm_up=False), threaded=True)
    threading.Thread(target=server.serve_forever, name="hih-backend-finetune-e2e", daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        model_api.set_training_hook(None)
        model_api.set_weights_resolver(None)
        model_api.clear_caches()


@pytest.mark.data
def test_the_deployed_backend_trains_from_label_studio_and_serves_the_new_version(
    label_studio: LabelStudioServer, label_config_xml: str, faces, settings, data_dir, tmp_path
):
    """Label Studio's "Start training" reaches the real backend's /webhook; the worker publishes; Label Studio
    follows the new version, and its next "Retrieve predictions" is answered by that version."""
    ls = label_studio
    pid = annotated_project(ls, label_config_xml, faces, "fine-tune e2e deployed")
    whole = sorted((data_dir / "300w" / "test_full" / "lfpw").glob("*.jpg"))[0]
    (new_task,) = ls.upload_files(pid, [whole])  # a face nobody annotated yet
    with deployed_backend(settings) as url:
        backend_id = ls.connect_ml_backend(pid, url)
        ls.train_ml_backend(backend_id)
        assert wait_for(lambda: queue.pending_job_id(pid, settings), timeout=15)
        assert run_worker_burst(settings, tmp_path / "worker.log") == 0
        version = f"hih-p{pid}-v1"
        assert registry.current_version(pid, settings).version == version, (
            (tmp_path / "worker.log").read_text()[-3000:])
        assert ls.get_project(pid)["model_version"] == version
        ls.retrieve_predictions(pid, [new_task])
        served = [p for p in ls.get_predictions(new_task) if p["model_version"] == version]
        assert len(served) == 1, ls.get_predictions(new_task)
        assert any(r["type"] == "keypointlabels" for r in served[0]["result"])


@pytest.mark.data
def test_training_from_label_studio_publishes_a_version_label_studio_and_predictor_use(
    label_studio: LabelStudioServer, label_config_xml: str, faces, settings, tmp_path
):
    from model.predictor import Predictor

    pid = annotated_project(label_studio, label_config_xml, faces, "fine-tune e2e")
    # the worker authenticates with a personal access token (JWT refresh -> Bearer)
    s = replace(settings, label_studio_api_key=label_studio.create_personal_access_token())
    out = start_training_from_label_studio(label_studio, pid, s)
    assert out["queued"] and out["project"] == pid
    assert run_worker_burst(s, tmp_path / "worker.log") == 0
    job = job_of(s, out["job_id"])
    assert job.get_status().value == "finished", (tmp_path / "worker.log").read_text()[-3000:]
    result = job.return_value()
    version = f"hih-p{pid}-v1"
    assert result["state"] == "published" and result["version"] == version, result
    assert result["faces"] == N_FACES and result["holdout_nme_after"] <= result["holdout_nme_before"]
    assert result["label_studio"] == {"predictions": N_FACES, "model_version_set": True, "error": None}
    assert job.meta["state"] == "published" and job.meta["epoch"] == job.meta["epochs"] == s.finetune_epochs
    assert job.meta["holdout_nme"] == result["holdout_nme_after"] and job.meta["loss"] > 0

    # Label Studio: the project follows the new version, whose predictions are stored with scores
    assert label_studio.get_project(pid)["model_version"] == version
    preds = [p for p in label_studio.list_predictions(pid) if p["model_version"] == version]
    assert len(preds) == N_FACES and all(p["score"] is not None for p in preds)
    kps = [r for r in preds[0]["result"] if r["type"] == "keypointlabels"]
    assert len(kps) == 68 and all(r["parentID"] == preds[0]["result"][0]["id"] for r in kps)
    # the backend's side: the current version loads, and predicts under that version's name
    current = registry.current_version(pid, s)
    assert current.version == version
    predictor = Predictor.load(registry.load_path(current), device="cpu")
    assert predictor.version == version
    meta = json.loads((Path(current.path) / "meta.json").read_text())
    assert meta["registry"]["faces"] == N_FACES and meta["registry"]["job_id"] == out["job_id"]


@pytest.mark.data
def test_annotations_without_all_points_fail_with_a_reason_and_keep_the_version(
    label_studio: LabelStudioServer, label_config_xml: str, faces, settings, base, tmp_path
):
    pid = annotated_project(label_studio, label_config_xml, faces[:4], "fine-tune e2e bad", n_points=10)
    old = registry.publish(pid, base, {"parent": "base"}, settings)
    out = start_training_from_label_studio(label_studio, pid, settings)
    assert run_worker_burst(settings, tmp_path / "worker.log") == 0
    job = job_of(settings, out["job_id"])
    assert job.get_status().value == "failed"
    assert job.meta["reason"] == (
        f"no usable annotated faces in project {pid}: 4 annotated tasks (4 faces with fewer than 68 points); "
        "each face needs all 68 300-W keypoints")
    assert registry.current_version(pid, settings).version == old.version
    assert queue.last_outcome(pid, settings)["reason"] == job.meta["reason"]


@pytest.mark.data
def test_images_gone_from_label_studio_fail_with_a_reason_and_keep_the_version(
    label_studio: LabelStudioServer, label_config_xml: str, faces, settings, base, tmp_path
):
    pid = annotated_project(label_studio, label_config_xml, faces[:4], "fine-tune e2e images gone")
    old = registry.publish(pid, base, {"parent": "base"}, settings)
    uploads = list((label_studio.data_dir / "media" / "upload" / str(pid)).iterdir())
    assert len(uploads) == 4
    for f in uploads:
        f.unlink()
    out = start_training_from_label_studio(label_studio, pid, settings)
    assert run_worker_burst(settings, tmp_path / "worker.log") == 0
    job = job_of(settings, out["job_id"])
    assert job.get_status().value == "failed"
    # Label Studio 1.23 answers a deleted upload with HTTP 500, not 404
    reason = job.meta["reason"]
    assert reason.startswith("none of the 4 annotated images could be downloaded, e.g. image download failed "
                             "(HTTP 500): http://127.0.0.1:"), reason
    assert f"/data/upload/{pid}/" in reason
    assert registry.current_version(pid, settings).version == old.version
    assert [v.version for v in registry.list_versions(pid, settings)] == [old.version]


@pytest.mark.data
def test_a_worker_killed_mid_training_leaves_no_version_and_the_next_job_succeeds(
    label_studio: LabelStudioServer, label_config_xml: str, faces, settings, base, tmp_path
):
    pid = annotated_project(label_studio, label_config_xml, faces, "fine-tune e2e killed")
    old = registry.publish(pid, base, {"parent": "base"}, settings)
    first = queue.on_training_event("START_TRAINING", {"project": {"id": pid}}, settings)
    worker = start_worker(settings, tmp_path / "killed.log", burst=True, FINETUNE_EPOCHS=1000)
    horse = None
    try:
        def training() -> bool:
            meta = job_of(settings, first["job_id"]).get_meta(refresh=True)
            return meta.get("state") == "training" and (meta.get("epoch") or 0) >= 2

        assert wait_for(training, timeout=90), (tmp_path / "killed.log").read_text()[-3000:]
        horse = job_of(settings, first["job_id"]).meta["pid"]
        assert horse != worker.pid and pid_alive(horse)
        assert queue.pending_job_id(pid, settings) is None  # a started job no longer blocks the next
        kill_group(worker)  # SIGKILL the worker mid-epoch; its horse (own process group) must die with it
        assert wait_for(lambda: not pid_alive(horse), timeout=10), "the work horse outlived its worker"
    finally:
        kill_tree(worker.pid)
        if horse is not None:
            kill_tree(horse)
    project_dir = settings.model_dir / str(pid)
    assert [p.name for p in project_dir.iterdir() if not p.name.startswith(".")] == [old.version]
    assert registry.current_version(pid, settings).version == old.version
    assert any((settings.model_dir / ".work" / str(pid)).iterdir())  # the dead job's downloads remain

    second = queue.on_training_event("START_TRAINING", {"project": {"id": pid}}, settings)
    assert second["queued"]
    t0 = time.monotonic()
    assert run_worker_burst(settings, tmp_path / "next.log") == 0
    assert time.monotonic() - t0 >= 1  # it waited for the dead job's lock to expire (FINETUNE_LOCK_TTL=3)
    result = job_of(settings, second["job_id"]).return_value()
    assert result["state"] == "published" and result["parent"] == old.version, result
    assert registry.current_version(pid, settings).version == result["version"] == f"hih-p{pid}-v2"
    assert not any((settings.model_dir / ".work" / str(pid)).iterdir())  # leftovers swept
    assert registry.load_path(result["version"], settings).is_dir()
