"""The ``hih-assist`` command line: train, evaluate, predict, serve, and the active-learning tools.

Every sub-command prints a clear one-line error and exits with status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting make torch 5-10x slower when the cores are shared (measured in
# benchmarks/bench_speed.py); sleep instead. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def _predictor(args: argparse.Namespace, settings: Settings, detector: str | None = None):
    import torch

    from model.checkpoint import CheckpointError
    from model.predictor import Predictor

    torch.set_num_threads(args.threads or settings.threads)
    weights = Path(args.weights) if args.weights else settings.weights
    try:
        return Predictor.load(
            weights, device=args.device or settings.device, detector=detector or settings.detector,
            decode_method=getattr(args, "decode", "hih"), flip_test=getattr(args, "flip", False),
        )
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from model.evaluate import evaluate_images
    from model.metrics import auc, failure_rate, plot_ced

    records, _ = _load_records([args.data])
    detector = args.detector
    predictor = _predictor(args, settings, detector=None if detector == "gt" else detector)
    if records[0].points.shape[0] != predictor.scheme.num_points:
        raise CLIError(f"{args.data} has {records[0].points.shape[0]}-point faces; the model is "
                       f"{predictor.scheme.name}")
    from active_learning.uncertainty import score_face

    result = evaluate_images(predictor, records, detector, progress=not args.json, scorer=score_face)
    nmes = result.nmes
    summary = {
        "data": args.data, "weights": str(args.weights or settings.weights), "model_version": predictor.version,
        "detector": detector, "decode": args.decode, "flip": args.flip, "n": len(records),
        "evaluated": int(len(nmes)), "missed": len(result.missed),
        "nme": round(100 * float(np.mean(nmes)), 4) if len(nmes) else None, "nme_unit": "% of inter-ocular",
        "fr": round(100 * failure_rate(nmes), 3) if len(nmes) else None, "fr_unit": "% of faces, NME > 10%",
        "auc": round(auc(nmes), 4) if len(nmes) else None,
        "ms_per_face": round(1000 * result.seconds / max(1, result.faces), 2),
        "missed_images": [str(records[i].image_path) for i in result.missed],
    }
    if args.per_image:
        import csv

        with open(args.per_image, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "nme", "uncertainty"])
            for i, e, u in zip(result.found, nmes, result.uncertainty, strict=True):
                writer.writerow([records[i].image_path, f"{e:.6f}", f"{u:.6f}"])
    if args.plot:
        plot_ced({f"{predictor.version} ({args.decode})": nmes}, args.plot, title=f"CED on {args.data}")
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            if key != "missed_images":
                print(f"{key:>14}: {value}")
    return 0


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np
    from PIL import Image

    from active_learning.uncertainty import score_faces
    from model.image_io import ImageError, load_image
    from model.overlay import draw_faces

    predictor = _predictor(args, settings, detector=args.detector)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for path in args.images:
        try:
            image = load_image(path)
        except ImageError as exc:
            print(f"hih-assist predict: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        faces = score_faces(predictor.predict(image))
        entry = {
            "image": path, "width": image.shape[1], "height": image.shape[0], "model_version": predictor.version,
            "faces": [
                {"rect": [round(v, 3) for v in f.rect], "score": round(f.score, 4),
                 "uncertainty": round(f.uncertainty, 4),
                 "points": np.round(f.points, 3).tolist(), "point_scores": np.round(f.point_scores, 4).tolist()}
                for f in faces
            ],
            "coordinates": "0-based pixel-centre (the centre of the top-left pixel is (0, 0)); rect: pixel corners",
        }
        if out_dir:
            overlay = out_dir / (Path(path).stem + ".png")
            Image.fromarray(draw_faces(image, faces, predictor.scheme)).save(overlay)
            entry["overlay"] = str(overlay)
        results.append(entry)
        if not args.json:
            print(f"{path}: {len(faces)} face(s)" + (f", overlay {entry['overlay']}" if out_dir else ""))
            for i, f in enumerate(faces):
                print(f"  face {i}: rect {tuple(round(v, 1) for v in f.rect)} score {f.score:.3f}")
    if args.json:
        print(json.dumps(results))
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """The backend under gunicorn, plus an RQ worker beside it (and an embedded Redis when REDIS_URL is unset)."""
    from active_learning.queue import QueueUnavailable, connection_url, get_connection
    from active_learning.worker import spawn_worker
    from backend.serve import run_server

    worker = None
    if not args.no_worker:
        try:
            get_connection(settings).ping()  # starts the embedded Redis first, so the worker shares it
            worker = spawn_worker(settings)
            log.info("started fine-tune worker pid %d on %s", worker.pid, connection_url(settings))
        except QueueUnavailable as exc:
            log.warning("no job queue (%s): serving predictions only; training requests will answer 503", exc)
    log.info("serving on http://%s:%d (model %s)", settings.host, settings.port, settings.weights)
    try:
        return run_server(settings)
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a stuck worker is killed
                worker.kill()


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print every setting with its variable, current value and meaning."""
    for variable, default, doc in Settings.table():
        print(f"{variable:<22} {default:<32} {doc}")
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

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", default=None, help="checkpoint folder (default: $HIH_WEIGHTS, the shipped model)")
        p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: $HIH_DEVICE")
        p.add_argument("--threads", type=int, default=0, help="torch threads (default: $THREADS)")
        p.add_argument("--decode", default="hih", choices=["hih", "argmax", "integer"],
                       help="hih: expectation over the decimal map (default); argmax: the paper's; integer: no decimal")
        p.add_argument("--flip", action="store_true", help="flip test: average with the mirrored face")

    p = sub.add_parser("evaluate", help="NME, FR, AUC of a model on a 300-W style folder")
    p.add_argument("--data", required=True, help="folder of images with .pts beside them")
    p.add_argument("--detector", default="gt", help="gt (crop from ground truth), auto, haar, hog, yunet:PATH")
    p.add_argument("--per-image", default=None, metavar="CSV", help="write image,nme,uncertainty per face "
                   "(uncertainty: the predicted NME; both fractions)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the CED curve")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    model_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="landmarks for images: JSON and overlay PNGs")
    p.add_argument("images", nargs="+")
    p.add_argument("--out-dir", default=None, help="write an overlay PNG per image here")
    p.add_argument("--detector", default=None, help="auto, haar, hog, yunet:PATH (default: $HIH_DETECTOR)")
    p.add_argument("--json", action="store_true")
    model_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="the Label Studio ML backend (with a worker and, if needed, embedded Redis)")
    p.add_argument("--no-worker", action="store_true", help="do not start a fine-tune worker beside it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="list the settings (environment variables) and their defaults")
    p.set_defaults(func=cmd_config)

    from active_learning import cli_finetune, cli_review

    cli_finetune.register(sub)
    cli_review.register(sub)
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
