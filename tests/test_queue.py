"""The webhook trigger on a real Redis: counting, TRAIN_AFTER, START_TRAINING, one pending job per project."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from finetune_helpers import delete_namespace, free_port, make_settings, redis_server

from active_learning import queue


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture
def settings(tmp_path, redis_url):
    s = make_settings(tmp_path, redis_url, tmp_path / "weights", train_after=3)
    yield s
    delete_namespace(redis_url, s.queue_name)


def event(action: str, project: int = 1, **extra) -> tuple[str, dict]:
    return action, {"action": action, "project": {"id": project, "title": "faces"}, **extra}


def queued_ids(settings) -> list[str]:
    return queue.get_queue(settings).get_job_ids()


def test_annotations_are_counted_until_train_after(settings):
    for i in (1, 2):
        out = queue.on_training_event(*event("ANNOTATION_CREATED"), settings)
        assert out == {"queued": False, "job_id": None, "project": 1,
                       "reason": f"{i} of 3 new annotations before training"}
    out = queue.on_training_event(*event("ANNOTATION_UPDATED"), settings)
    assert out["queued"] is True and out["job_id"].startswith(f"{settings.queue_name}-finetune-p1-")
    assert queued_ids(settings) == [out["job_id"]]
    assert queue.pending_job_id(1, settings) == out["job_id"]
    assert queue.new_annotations(1, settings) == 0
    job = queue.get_queue(settings).fetch_job(out["job_id"])
    assert job.func_name == queue.JOB_FUNCTION and job.kwargs == {"project_id": 1}
    assert job.meta["project"] == 1 and job.meta["state"] == "queued"
    assert job.timeout == settings.finetune_timeout


def test_events_while_a_job_is_pending_queue_nothing_more(settings):
    first = queue.on_training_event(*event("START_TRAINING"), settings)
    assert first["queued"] and first["reason"] == "START_TRAINING"
    for action in ("ANNOTATION_CREATED",) * 5 + ("START_TRAINING",):
        out = queue.on_training_event(*event(action), settings)
        assert out["queued"] is False
    assert "already pending" in out["reason"] and out["job_id"] == first["job_id"]
    assert queued_ids(settings) == [first["job_id"]]
    # another project is independent
    other = queue.on_training_event(*event("START_TRAINING", project=2), settings)
    assert other["queued"] and len(queued_ids(settings)) == 2


def test_a_burst_of_concurrent_webhooks_yields_one_job(settings):
    s = replace(settings, train_after=1)
    results, errors = [], []
    barrier = threading.Barrier(24)

    def hit(action):
        try:
            barrier.wait()
            results.append(queue.on_training_event(*event(action, project=9), s))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hit, args=("START_TRAINING" if i % 4 == 0 else "ANNOTATION_CREATED",))
               for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r["queued"] for r in results) == 1
    assert len(queued_ids(s)) == 1
    assert {r["job_id"] for r in results if r["job_id"]} == set(queued_ids(s))


def test_a_started_job_lets_the_next_events_queue_another(settings):
    first = queue.on_training_event(*event("START_TRAINING"), settings)
    conn = queue.get_connection(settings)
    assert queue.clear_pending(1, "someone-else", settings, conn) is False
    assert queue.clear_pending(1, first["job_id"], settings, conn) is True  # what a job does when it starts
    second = queue.on_training_event(*event("START_TRAINING"), settings)
    assert second["queued"] and second["job_id"] != first["job_id"]


def test_a_stale_pending_mark_does_not_block_training(settings):
    first = queue.on_training_event(*event("START_TRAINING"), settings)
    queue.get_queue(settings).fetch_job(first["job_id"]).delete()  # lost (e.g. Redis flushed the job)
    assert queue.pending_job_id(1, settings) is None
    again = queue.on_training_event(*event("START_TRAINING"), settings)
    assert again["queued"] and again["job_id"] != first["job_id"]


def test_start_training_queues_at_once_and_train_after_zero_only_counts(settings):
    s = replace(settings, train_after=0)
    for _ in range(4):
        out = queue.on_training_event(*event("ANNOTATION_CREATED"), s)
        assert not out["queued"] and "automatic training is off" in out["reason"]
    assert queue.new_annotations(1, s) == 4
    assert queue.on_training_event(*event("START_TRAINING"), s)["queued"]
    assert queue.new_annotations(1, s) == 0


def test_deletions_count_every_deleted_annotation(settings):
    out = queue.on_training_event(*event("ANNOTATIONS_DELETED", annotations=[{"id": 1}, {"id": 2}]), settings)
    assert not out["queued"] and queue.new_annotations(1, settings) == 2
    out = queue.on_training_event(*event("ANNOTATIONS_DELETED", annotations=[{"id": 3}]), settings)
    assert out["queued"]


def test_other_actions_and_payloads_without_a_project_do_nothing(settings):
    assert queue.on_training_event("PROJECT_UPDATED", {"project": {"id": 1}}, settings)["reason"] == (
        "action PROJECT_UPDATED does not train")
    out = queue.on_training_event("ANNOTATION_CREATED", {"annotation": {"id": 5}}, settings)
    assert not out["queued"] and "without a project id" in out["reason"]
    assert queued_ids(settings) == []


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"project": {"id": 12}}, 12),
        ({"project": 13}, 13),
        ({"project": "14.1700000000"}, 14),
        ({"task": {"id": 1, "project": 15}}, 15),
        ({"annotation": {"project": 16}}, 16),
        ({"project": {"title": "x"}}, None),
        ({}, None),
        (None, None),
    ],
)
def test_project_id_from_payload(payload, expected):
    assert queue.project_id_from_payload(payload) == expected


def test_redis_down_raises_queue_unavailable_fast(tmp_path):
    dead = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", tmp_path / "w")
    t0 = time.monotonic()
    with pytest.raises(queue.QueueUnavailable, match="Redis is unreachable"):
        queue.on_training_event(*event("START_TRAINING"), dead)
    assert time.monotonic() - t0 < 3
    # events that do not train never touch Redis
    assert queue.on_training_event("PROJECT_UPDATED", {"project": 1}, dead)["queued"] is False


def test_jobs_by_project_lists_queued_jobs_with_their_meta(settings):
    out = queue.on_training_event(*event("START_TRAINING", project=4), settings)
    jobs = queue.jobs_by_project(settings)
    assert [j["id"] for j in jobs[4]] == [out["job_id"]]
    assert jobs[4][0]["status"] == "queued" and jobs[4][0]["trigger"] == "START_TRAINING"
    assert queue.seen_projects(settings) == [4]
