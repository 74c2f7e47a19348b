"""The ``hih-assist`` command line: train, evaluate, predict, serve, and the active-learning tools.

Every sub-command prints a clear one-line error and exits with status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hih_settings import Settings

log = logging.getLogger("hih_assist")


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_records(folders: list[str], holdout: int = 0, seed: int = 0):
    from model.readers import load_300w_folder

    for folder in folders:
        if not Path(folder).is_dir():
            raise CLIError(f"no such folder: {folder}")
    records = load_300w_folder([Path(f) for f in folders])
    if holdout:
        import numpy as np

        if holdout >= len(records):
            raise CLIError(f"--holdout {holdout} leaves no training faces (have {len(records)})")
        order = np.random.default_rng(seed).permutation(len(records))
        held = [records[i] for i in sorted(order[:holdout])]
        return [records[i] for i in sorted(order[holdout:])], held
    return records, []


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from model.train import TrainOptions, train

    train_records, held = _load_records(args.data, args.holdout, args.seed)
    val_records = held
    if args.val:
        val_records, _ = _load_records([args.val])
    options = TrainOptions(
        config=args.config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, threads=args.threads or settings.threads, workers=args.workers,
    )
    log.info("training %s on %d faces (%s), validating on %d, %d epochs, into %s",
             args.config, len(train_records), ", ".join(args.data), len(val_records), args.epochs, args.out)
    summary = train(
        train_records, val_records, args.out, options, init=args.init, resume=args.resume,
        meta={"data": {"train": args.data, "val": args.val or f"holdout:{args.holdout}"}},
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hih-assist", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or fine-tune an HIH model on 300-W style folders")
    p.add_argument("--data", nargs="+", required=True, help="folders of images with .pts beside them")
    p.add_argument("--val", default=None, help="validation folder (reported each epoch; picks best/)")
    p.add_argument("--holdout", type=int, default=0, help="hold out N training faces as the validation set")
    p.add_argument("--out", required=True, help="output folder (last/, best/, state/, history.json)")
    p.add_argument("--config", default="hih_cpu", help="network configuration: hih_cpu, hih_b, hih_s, hih_t, hih_tiny")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init", default=None, help="checkpoint to start from (fine-tuning)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: $THREADS)")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/state if present")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    _setup_logging(args.log_level or settings.log_level)
    try:
        return args.func(args, settings)
    except CLIError as exc:
        print(f"hih-assist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"hih-assist {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
