"""``hih-assist rank`` and ``hih-assist preannotate``: the review queue and project-wide pre-annotation.

Wire into the main parser with ``active_learning.cli_review.register(subparsers)``; each sub-command
sets ``func(args, settings) -> int`` like the others. Bad input raises ValueError (one line, exit 2).

    hih-assist rank --project 3 --top 50 --view     # rank, keep in Redis, write the review tab
    hih-assist preannotate --project 3 --wait       # queue the job, follow its progress
    hih-assist preannotate --project 3 --inline     # run it in this process (no worker needed)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

__all__ = ["cmd_preannotate", "cmd_rank", "register"]


def _api(settings: Any):
    from active_learning.review import LabelStudioAPI

    return LabelStudioAPI.from_settings(settings)


def _redis(settings: Any):
    from active_learning.queue import get_connection

    return get_connection(settings)


def _one_line_errors(fn):
    """Label Studio, ML backend and Redis failures become ValueError: the CLI prints one line, exit 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace, settings: Any) -> int:
        import redis
        import requests

        from active_learning.ls_client import LabelStudioError
        from active_learning.queue import QueueUnavailable

        try:
            return fn(args, settings)
        except (LabelStudioError, QueueUnavailable, redis.RedisError, requests.RequestException) as exc:
            raise ValueError(str(exc)) from exc
        except RuntimeError as exc:  # the ML backend's answers (MLBackendClient)
            raise ValueError(str(exc)) from exc

    return wrapper


@_one_line_errors
def cmd_rank(args: argparse.Namespace, settings: Any) -> int:
    from active_learning.review import namespace, rank_project
    from active_learning.uncertainty import face_score

    if args.top is not None and args.top < 1:
        raise ValueError("--top must be at least 1")
    result = rank_project(
        _api(settings), _redis(settings), args.project, args.version, ns=namespace(settings), top=args.top,
        view=args.view, compute=args.compute, backend_url=args.backend, settings=settings,
    )
    unc = dict(result.ranked)
    top = result.top(args.top)
    if args.json:
        print(json.dumps({
            "project": result.project_id, "version": result.version, "view": result.view_id,
            "unscored": result.unscored,
            "tasks": [{"task": t, "uncertainty": None if not math.isfinite(unc.get(t, math.inf)) else unc[t],
                       "score": face_score(unc.get(t, math.inf)), "queued": t in result.queued} for t in top],
        }))
        return 0
    print(f"project {result.project_id}, model version {result.version}: {len(result.ranked)} ranked, "
          f"{len(result.unscored)} without a prediction of this version"
          + ("" if not result.unscored else " (run `hih-assist preannotate` or `rank --compute`)"))
    print(f"{'#':>4s} {'task':>8s} {'pred.NME%':>12s} {'score':>6s}")  # uncertainty = the predicted NME
    for i, t in enumerate(top, 1):
        u = unc.get(t, math.inf)
        mark = "  (queued by hand)" if t in result.queued else ""
        print(f"{i:4d} {t:8d} {u * 100:12.2f} {face_score(u):6.3f}{mark}")
    if result.view_id is not None:
        print(f"Data Manager tab {result.view_id} (\"Review: most uncertain\") holds these {len(top)} tasks")
    return 0


@_one_line_errors
def cmd_preannotate(args: argparse.Namespace, settings: Any) -> int:
    from active_learning.preannotate import enqueue_preannotate, job_progress, preannotate_project

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.inline:
        def show(p: dict) -> None:
            print(f"\r{p['done']}/{p['total']} tasks predicted by {p['version']} "
                  f"({p['written']} written now, {p['failed']} failed)", end="", flush=True)

        out = preannotate_project(args.project, settings=settings, backend_url=args.backend,
                                  model_version=args.version, batch_size=args.batch_size,
                                  conn=_redis(settings), on_progress=show)
        print()
        print(json.dumps(out))
        return 0 if not out["failed"] else 1
    conn = _redis(settings)
    ids = enqueue_preannotate(args.project, settings=settings, connection=conn, copies=args.workers,
                              backend_url=args.backend, model_version=args.version,
                              batch_size=args.batch_size)
    print(json.dumps({"project": args.project, "jobs": ids}))
    if not args.wait:
        return 0
    while True:
        states = job_progress(ids, conn)
        p = max(states, key=lambda s: s.get("done", 0))
        print(f"\r{p.get('done', 0)}/{p.get('total', '?')} tasks predicted; jobs: "
              + ", ".join(s["status"] for s in states), end="", flush=True)
        if all(s["status"] in ("finished", "failed", "stopped", "canceled") for s in states):
            print()
            print(json.dumps(states))
            return 0 if all(s["status"] == "finished" for s in states) else 1
        time.sleep(2.0)


def register(subparsers: Any) -> None:
    """Add ``rank`` and ``preannotate`` to the ``hih-assist`` sub-command parsers."""
    p = subparsers.add_parser("rank", help="rank a Label Studio project's tasks by model uncertainty")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--top", type=int, default=None, help="only the K most uncertain")
    p.add_argument("--view", action="store_true",
                   help='create or update the Data Manager tab "Review: most uncertain" with those tasks')
    p.add_argument("--version", default=None,
                   help="model version to rank (default: the connected ML backend's, else the project's)")
    p.add_argument("--compute", action="store_true",
                   help="first predict the tasks without a prediction of the version (ML backend)")
    p.add_argument("--backend", default=None, help="ML backend URL (default: the project's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_rank)

    p = subparsers.add_parser("preannotate", help="predict every task of a project not yet predicted by the "
                              "current model version (an RQ job, resumable)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--backend", default=None, help="ML backend URL (default: the project's)")
    p.add_argument("--version", default=None, help="model version (default: the ML backend's /setup answer)")
    p.add_argument("--batch-size", type=int, default=16, help="tasks per /predict call")
    p.add_argument("--workers", type=int, default=1, help="queue the job N times, for N workers to share")
    p.add_argument("--wait", action="store_true", help="follow the progress until the jobs end")
    p.add_argument("--inline", action="store_true", help="run in this process instead of queueing a job")
    p.set_defaults(func=cmd_preannotate)
