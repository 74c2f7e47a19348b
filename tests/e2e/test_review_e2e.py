"""End to end against a real Label Studio 1.23: the review tab's order follows the uncertainty scores, and a
pre-annotation job whose RQ worker is killed part-way resumes without duplicating predictions.

Both talk to an ML backend over HTTP (``/setup``, ``/predict``), as the job does in production: here a stub
(tests/e2e/label_studio.py) whose predictions come from the trained HIH model and
``active_learning.uncertainty`` (ordering test) or from a slow fixed rule (restart test).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from finetune_helpers import delete_namespace, kill_tree, redis_server

from active_learning import uncertainty as U
from active_learning.preannotate import enqueue_preannotate, preannotate_project
from active_learning.review import LabelStudioAPI, rank_project, ranked_tasks
from hih_settings import PROJECT_ROOT, Settings

from .label_studio import LabelStudioServer, StubMLBackend

redis = pytest.importorskip("redis")


@contextlib.contextmanager
def _redis() -> Iterator[tuple[Any, str, str]]:
    """(connection, url, namespace): the shared test Redis (tests/finetune_helpers.redis_server); the
    namespace's keys are removed afterwards."""
    import redis

    ns = f"hih-e2e-{secrets.token_hex(4)}"
    with redis_server() as url:
        conn = redis.Redis.from_url(url)
        try:
            yield conn, url, ns
        finally:
            delete_namespace(url, ns)


def _per_task_versions(ls: LabelStudioServer, project_id: int, version: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in ls.list_predictions(project_id):
        if p["model_version"] == version:
            counts[p["task"]] = counts.get(p["task"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------------- ordering
@pytest.mark.data
def test_review_tab_order_follows_the_uncertainty(label_studio: LabelStudioServer, label_config_xml: str,
                                                  data_dir: Path, tmp_path: Path) -> None:
    import cv2
    import torch

    from model.detect import box_from_points
    from model.image_io import load_image
    from model.predictor import Predictor
    from model.readers import load_300w_folder

    weights = Settings.from_env().weights
    if not (weights / "model.safetensors").is_file():
        pytest.skip(f"needs the trained model at {weights} (HIH_WEIGHTS)")
    torch.set_num_threads(1)
    predictor = Predictor.load(weights, device="cpu", detector="auto")
    # Three faces, each sharp and blurred: six tasks whose uncertainties differ.
    files: dict[str, tuple[np.ndarray, Any]] = {}
    for r in load_300w_folder([data_dir / "300w" / "test" / "lfpw"])[:3]:
        image = load_image(r.image_path)
        box = box_from_points(r.points)
        for level, sigma in (("sharp", 0.0), ("blur", 0.06 * box.size)):
            im = image if sigma == 0 else cv2.GaussianBlur(image, (0, 0), sigma)
            name = f"{r.image_path.stem}_{level}.png"
            cv2.imwrite(str(tmp_path / name), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
            files[name] = (im, box)
    expected: dict[str, float] = {}

    def predict(tasks: list[dict]) -> list[dict]:
        out = []
        for t in tasks:
            name = next(n for n in files if t["data"]["image"].endswith(n))
            image, box = files[name]
            faces = predictor.predict(image, boxes=[box])
            scores = U.prediction_scores(faces)
            expected[name] = scores["uncertainty"]
            out.append({"result": [], "score": scores["score"]})
        return out

    pid = label_studio.create_project("review order e2e", label_config_xml)
    task_ids = label_studio.upload_files(pid, sorted(tmp_path.glob("*.png")))
    names = {t["id"]: next(n for n in files if t["data"]["image"].endswith(n))
             for t in label_studio.list_tasks(pid)}
    api = LabelStudioAPI(label_studio.url, label_studio.token)
    with _redis() as (conn, _, ns), StubMLBackend("hih-e2e-order", predict=predict) as stub:
        label_studio.connect_ml_backend(pid, stub.url)
        out = preannotate_project(pid, api=api, conn=conn, ns=ns, batch_size=4)
        assert out["written"] == len(task_ids) and out["version"] == "hih-e2e-order"
        res = rank_project(api, conn, pid, ns=ns, top=4, view=True)
        assert [t for t, _ in ranked_tasks(conn, ns, pid, res.version)] == [t for t, _ in res.ranked]
    by_uncertainty = sorted(task_ids, key=lambda t: (-expected[names[t]], t))
    assert [t for t, _ in res.ranked] == by_uncertainty
    # Label Studio's own listing of the tab: the top four, lowest prediction score first.
    shown = list(api.iter_tasks(pid, ("id", "predictions_score"), view=res.view_id))
    assert [t["id"] for t in shown] == by_uncertainty[:4]
    for t in shown:
        assert t["predictions_score"] == pytest.approx(U.face_score(expected[names[t["id"]]]), rel=1e-6)
    assert label_studio.get_project(pid)["model_version"] == "hih-e2e-order"
    # and each blurred face is more doubtful than the same face sharp
    for n in files:
        if n.endswith("_blur.png"):
            assert expected[n] > expected[n.replace("_blur", "_sharp")]


# ------------------------------------------------------------------------------------ kill & restart
def _worker(url: str, ns: str, ls: LabelStudioServer) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "HIH_QUEUE": ns, "LABEL_STUDIO_URL": ls.url,
           "LABEL_STUDIO_API_KEY": ls.token, "OMP_NUM_THREADS": "1"}
    rq = Path(sys.executable).with_name("rq")
    return subprocess.Popen([str(rq), "worker", "--burst", "--url", url, "--path", str(PROJECT_ROOT), ns],
                            cwd=PROJECT_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_preannotate_job_killed_part_way_resumes_without_duplicates(
    label_studio: LabelStudioServer, label_config_xml: str, tmp_path: Path
) -> None:
    from rq.job import Job

    n_tasks = 12
    tasks = [{"data": {"image": f"/data/upload/none/{i}.jpg"}} for i in range(n_tasks)]
    pid = label_studio.create_project("preannotate restart e2e", label_config_xml)
    task_ids = label_studio.import_tasks(pid, tasks)

    def slow(batch: list[dict]) -> list[dict]:
        time.sleep(0.4)
        return [{"result": [], "score": 1.0 / (1 + t["id"] % 7)} for t in batch]

    version = "stub-restart-v1"
    with _redis() as (conn, url, ns), StubMLBackend(version, predict=slow) as stub:
        settings = Settings(redis_url=url, queue_name=ns, label_studio_url=label_studio.url,
                            label_studio_api_key=label_studio.token)
        (job_id,) = enqueue_preannotate(pid, settings=settings, connection=conn, backend_url=stub.url,
                                        batch_size=2, claim_ttl=2)
        worker = _worker(url, ns, label_studio)
        try:
            deadline = time.monotonic() + 60
            while True:
                meta = Job.fetch(job_id, connection=conn).get_meta(refresh=True)
                if meta.get("written", 0) >= 4:
                    break
                assert worker.poll() is None, f"worker exited early: {worker.stderr.read().decode()[-2000:]}"
                assert time.monotonic() < deadline, f"no progress: {meta}"
                time.sleep(0.1)
            kill_tree(worker.pid)  # the worker and its work horse die mid-batch
            worker.wait(10)
        finally:
            if worker.poll() is None:
                kill_tree(worker.pid)
                worker.wait(10)
        before = _per_task_versions(label_studio, pid, version)
        assert 4 <= len(before) < n_tasks and set(before.values()) == {1}
        time.sleep(2.1)  # the dead job's claims expire

        (job2,) = enqueue_preannotate(pid, settings=settings, connection=conn, backend_url=stub.url,
                                      batch_size=2, claim_ttl=2)
        worker = _worker(url, ns, label_studio)
        try:
            _, err = worker.communicate(timeout=90)
        finally:
            if worker.poll() is None:
                kill_tree(worker.pid)
        job = Job.fetch(job2, connection=conn)
        assert job.get_status(refresh=True).value == "finished", err.decode()[-3000:]
        meta = job.get_meta(refresh=True)
        assert meta["existing"] == len(before) and meta["written"] == n_tasks - len(before)
        assert meta["done"] == meta["total"] == n_tasks and meta["state"] == "finished"
    after = _per_task_versions(label_studio, pid, version)
    assert after == {t: 1 for t in task_ids}
    assert label_studio.get_project(pid)["model_version"] == version
