"""``hih-assist`` sub-commands of the learning loop: ``worker``, ``status``, ``finetune``, ``rollback``.

``register(subparsers)`` adds them to the main parser (``hih_cli.build_parser``). Each sets ``func(args,
settings) -> int``; bad input raises ``ValueError`` (printed as one line, exit status 2 by ``hih_cli``).

- ``worker [--burst]``: the RQ worker that runs fine-tune jobs.
- ``status [--project ID] [--json]``: per project, the current version, published versions, pending and
  recent jobs (state, epoch, loss, held-out NME, reason) and the last outcome.
- ``finetune --init PATH --data DIR [DIR ...] --out DIR``: the background jobs' recipe and gate on 300-W style
  folders (images with ``.pts``), without Label Studio or Redis. Writes the checkpoint to ``--out`` when the
  gate accepts, and ``--out/finetune.json`` either way; exit status 0 accepted, 1 rejected.
- ``rollback --project ID --version V``: make an earlier version (``hih-p<project>-v<n>``, or ``base``)
  current; backends switch on their next request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hih_settings import Settings

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``worker``, ``status``, ``finetune`` and ``rollback`` to ``hih-assist``'s sub-commands."""
    p = subparsers.add_parser("worker", help="run the RQ worker that fine-tunes models in the background")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--name", default=None, help="worker name")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("status", help="fine-tune jobs and model versions per Label Studio project")
    p.add_argument("--project", type=int, default=None, help="only this project")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint on annotated faces with the background jobs' recipe and gate"
    )
    p.add_argument("--init", required=True, help="checkpoint folder to start from")
    p.add_argument("--data", nargs="+", required=True, help="folders of images with .pts beside them")
    p.add_argument("--out", required=True, help="output folder (checkpoint if accepted, finetune.json)")
    p.add_argument("--holdout", default=None,
                   help="held-out faces for the gate (default: hold out --holdout-fraction of --data)")
    p.add_argument("--holdout-fraction", type=float, default=None, help="default: $HOLDOUT_FRACTION")
    p.add_argument("--epochs", type=int, default=None, help="default: $FINETUNE_EPOCHS")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: $FINETUNE_LR)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--replay", type=int, default=None,
                   help="300-W training faces mixed in against forgetting (default: $FINETUNE_REPLAY)")
    p.add_argument("--check", type=int, default=32, help="300-W faces for the collapse check (0: off)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: $HIH_DEVICE")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: $THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_finetune)

    p = subparsers.add_parser("rollback", help="make an earlier model version of a project current")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--version", required=True, help="hih-p<project>-v<n>, or 'base' for the base weights")
    p.set_defaults(func=cmd_rollback)


# ------------------------------------------------------------------------------------------- commands
def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .worker import run_worker

    run_worker(settings, burst=args.burst, name=args.name)
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from . import queue as queue_module
    from .registry import project_status

    report = project_status(settings, args.project)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    if not report["projects"]:
        print(f"no projects yet (queue {report['queue']}, Redis {report['redis']})")
        return 0
    for pid, p in report["projects"].items():
        print(f"project {pid}: current {p['current']}; {p['new_annotations']} new annotations counted; "
              f"pending job: {p['pending'] or 'none'}")
        for v in p["versions"]:
            mark = "*" if v["version"] == p["current"] else " "
            print(f"  {mark} {v['version']:<16} {v['created']:<26} parent {v['parent'] or '-':<14} "
                  f"held-out NME {_pct(v['holdout_nme_before'])} -> {_pct(v['holdout_nme_after'])} "
                  f"({v['faces'] or '?'} faces)")
        for j in p["jobs"]:
            kind = "fine-tune" if j.get("func") == queue_module.JOB_FUNCTION else (j.get("func") or "job")
            line = f"    {kind} {j['id']} {j['status']}"
            if j.get("state"):
                line += f" [{j['state']}]"
            if j.get("epoch") is not None and j.get("epochs"):
                line += f" epoch {j['epoch']}/{j['epochs']}"
            if j.get("loss") is not None:
                line += f" loss {float(j['loss']):.3f}"
            if j.get("holdout_nme") is not None:
                line += f" held-out NME {_pct(j['holdout_nme'])}"
            if j.get("version"):
                line += f" -> {j['version']}"
            if j.get("reason") and j.get("state") in ("failed", "rejected"):
                line += f": {j['reason']}"
            print(line)
        if p["last"]:
            last = p["last"]
            print(f"    last outcome: {last.get('state')} ({last.get('ended')}): {last.get('reason')}")
    return 0


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from model.readers import load_300w_folder

    from .finetune import FinetuneOptions, check_records_300w, finetune, replay_records_300w

    for folder in [*args.data, *([args.holdout] if args.holdout else [])]:
        if not Path(folder).is_dir():
            raise ValueError(f"no such folder: {folder}")
    if not (Path(args.init) / "meta.json").is_file():
        raise ValueError(f"--init {args.init} is not a checkpoint folder (model.safetensors + meta.json)")
    records = load_300w_folder([Path(f) for f in args.data])
    holdout = load_300w_folder(Path(args.holdout)) if args.holdout else None
    options = FinetuneOptions(
        epochs=args.epochs if args.epochs is not None else settings.finetune_epochs,
        lr=args.lr if args.lr is not None else settings.finetune_lr,
        batch_size=args.batch_size,
        holdout_fraction=(args.holdout_fraction if args.holdout_fraction is not None
                          else settings.holdout_fraction),
        replay_faces=args.replay if args.replay is not None else settings.finetune_replay,
        device=args.device or settings.device, threads=args.threads or settings.threads, seed=args.seed,
    )
    out = Path(args.out)
    result = finetune(
        records, args.init, out, options, holdout=holdout,
        check_records=check_records_300w(settings.data_dir, args.check),
        replay_records=replay_records_300w(settings.data_dir, options.replay_faces),
        progress=_print_progress, meta={"data": {"train": args.data, "holdout": args.holdout}},
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    print(result.summary())
    if result.accepted:
        print(f"checkpoint: {result.checkpoint}")
    return 0 if result.accepted else 1


def _print_progress(values: dict) -> None:
    if values.get("stage") == "training" and values.get("epoch"):
        nme = values.get("holdout_nme")
        print(f"epoch {values['epoch']}/{values['epochs']} loss {values.get('loss') or float('nan'):.4f}"
              + (f" held-out NME {100 * nme:.2f}%" if nme is not None else ""), file=sys.stderr, flush=True)


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from . import registry

    try:
        info = registry.rollback(args.project, args.version, settings)
    except registry.RegistryError as exc:
        raise ValueError(str(exc)) from exc
    print(f"project {args.project}: current version is now {info.version if info else 'base'}")
    return 0
