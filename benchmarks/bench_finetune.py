"""Adaptation to a new domain with the background fine-tuning recipe (active_learning.finetune).

    python benchmarks/bench_finetune.py            # prints a table, writes benchmarks/results/finetune.json

Fine-tunes the default model (HIH_WEIGHTS, else runs/default/best) on 100 faces of ``ytf/train`` (YouTube
Faces video frames: small, blurry; pseudo ground truth) exactly as a fine-tune job does (the job's hold-out
share of the 100 gates it, 300-W check faces guard against collapse), then measures NME on 300 other
``ytf/train`` faces before and after, and on the 300-W validation set (``300w/test/lfpw``, 224 faces) before
and after (forgetting). Train and test faces are of different people (split by identity), so no video frame
of a test person is trained on. Wall time: the whole fine-tune call (loading, hold-out and check evaluations,
training), with ``--threads`` torch threads (default 2, the CPU budget of the target).

Targets: at least 25% lower NME on the new domain, at most 5 minutes on 2 CPU cores, 300-W validation NME
no more than 5% worse.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import ROOT, print_table, write_results

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from active_learning.finetune import (  # noqa: E402
    AUGMENT,
    FinetuneOptions,
    check_records_300w,
    finetune,
    replay_records_300w,
)
from hih_settings import Settings  # noqa: E402
from model.checkpoint import load_checkpoint, read_meta  # noqa: E402
from model.evaluate import evaluate_crops  # noqa: E402
from model.readers import FaceRecord, load_300w_folder  # noqa: E402
from model.schemes import SCHEME_300W  # noqa: E402

TARGET_GAIN = 0.25
TARGET_SECONDS = 300.0
TARGET_FORGETTING = 0.05


def identity(record: FaceRecord) -> str:
    """``Abdullah_Gul_30.jpg`` -> ``Abdullah_Gul``: the person of a YouTube Faces frame."""
    return re.sub(r"_\d+$", "", record.image_path.stem)


def split_by_identity(records: list[FaceRecord], n_train: int, n_test: int) -> tuple[list, list]:
    """``n_train`` faces then ``n_test`` faces of other people, people in a fixed pseudo-random order."""
    people: dict[str, list[FaceRecord]] = {}
    for r in records:
        people.setdefault(identity(r), []).append(r)
    order = sorted(people, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    train: list[FaceRecord] = []
    test: list[FaceRecord] = []
    for person in order:
        faces = people[person]
        if len(train) < n_train:
            train += faces[: n_train - len(train)]  # the rest of this person is left out, not tested on
        elif len(test) < n_test:
            test += faces[: n_test - len(test)]
    if len(train) < n_train or len(test) < n_test:
        raise SystemExit(f"not enough faces: {len(records)} for {n_train} + {n_test}")
    return train, test


def default_init(settings: Settings) -> Path:
    for candidate in (Path(settings.weights), ROOT / "runs" / "default" / "best"):
        if (candidate / "meta.json").is_file():
            return candidate
    raise SystemExit(f"no model to fine-tune: {settings.weights} (HIH_WEIGHTS) nor runs/default/best exist")


def nme(checkpoint: Path | str, records: list[FaceRecord]) -> dict:
    model, _ = load_checkpoint(checkpoint, device="cpu")
    out = evaluate_crops(model, records, SCHEME_300W)
    return {"nme": out["nme"], "fr": out["fr"], "auc": out["auc"], "n": out["n"]}


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="checkpoint to fine-tune (default: HIH_WEIGHTS, else "
                                                     "runs/default/best)")
    parser.add_argument("--train-faces", type=int, default=100)
    parser.add_argument("--test-faces", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=settings.finetune_epochs)
    parser.add_argument("--lr", type=float, default=settings.finetune_lr)
    parser.add_argument("--batch-size", type=int, default=FinetuneOptions.batch_size)
    parser.add_argument("--holdout-fraction", type=float, default=settings.holdout_fraction)
    parser.add_argument("--replay", type=int, default=settings.finetune_replay,
                        help="300-W training faces mixed in (default: $FINETUNE_REPLAY, as the jobs)")
    parser.add_argument("--replay-per-epoch", type=int, default=FinetuneOptions.replay_per_epoch)
    parser.add_argument("--augment", default=FinetuneOptions.augment, choices=sorted(AUGMENT))
    parser.add_argument("--flip", type=float, default=FinetuneOptions.flip, help="mirroring probability")
    parser.add_argument("--no-freeze-bn", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not write the results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = Path(settings.data_dir)
    init = Path(args.init) if args.init else default_init(settings)
    init_meta = read_meta(init)
    ytf = load_300w_folder(data / "ytf" / "train")
    train, test = split_by_identity(ytf, args.train_faces, args.test_faces)
    val = load_300w_folder(data / "300w" / "test" / "lfpw")
    print(f"init {init} ({init_meta.get('version')}, epoch {init_meta.get('epoch')}); "
          f"{len(train)} ytf faces to fine-tune on, {len(test)} to test, {len(val)} 300-W validation faces; "
          f"{args.threads} threads", flush=True)

    before_ytf, before_val = nme(init, test), nme(init, val)
    options = FinetuneOptions(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, holdout_fraction=args.holdout_fraction,
        replay_faces=args.replay, replay_per_epoch=args.replay_per_epoch, augment=args.augment,
        freeze_bn=not args.no_freeze_bn, flip=args.flip, seed=args.seed,
        device="cpu", threads=args.threads,
    )
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        t0 = time.perf_counter()
        result = finetune(
            train, init, Path(tmp) / "ckpt", options,
            check_records=check_records_300w(data, 32), replay_records=replay_records_300w(data, args.replay),
            progress=lambda v: print(f"  epoch {v['epoch']}/{v['epochs']} loss {v['loss']:.3f} held-out NME "
                                     f"{100 * v['holdout_nme']:.2f}%", flush=True)
            if v.get("stage") == "training" and v.get("epoch") else None,
        )
        wall = time.perf_counter() - t0
        if not result.accepted:
            print(f"the gate rejected the fine-tuned model: {result.reason}")
        # what the job would serve: the new weights when accepted, else the unchanged model
        # (the "after" numbers below are those of the fine-tuned weights either way)
        after_ckpt = result.checkpoint
        if after_ckpt is None:
            options_keep = FinetuneOptions(**{**asdict(options), "tolerance": 1e9, "collapse_ratio": 1e9})
            after_ckpt = finetune(train, init, Path(tmp) / "forced", options_keep).checkpoint
        after_ytf, after_val = nme(after_ckpt, test), nme(after_ckpt, val)

    gain = (before_ytf["nme"] - after_ytf["nme"]) / before_ytf["nme"]
    forgetting = (after_val["nme"] - before_val["nme"]) / before_val["nme"]
    rows = [
        {"measure": f"ytf NME ({len(test)} faces, other people)", "before": f"{100 * before_ytf['nme']:.2f}%",
         "after": f"{100 * after_ytf['nme']:.2f}%", "change": f"{-100 * gain:+.1f}%",
         "target": f"<= -{100 * TARGET_GAIN:.0f}%", "met": "yes" if gain >= TARGET_GAIN else "NO"},
        {"measure": f"300-W val NME ({len(val)} faces)", "before": f"{100 * before_val['nme']:.2f}%",
         "after": f"{100 * after_val['nme']:.2f}%", "change": f"{100 * forgetting:+.1f}%",
         "target": f"<= +{100 * TARGET_FORGETTING:.0f}%",
         "met": "yes" if forgetting <= TARGET_FORGETTING else "NO"},
        {"measure": f"wall time ({args.threads} threads, {result.epochs} epochs)", "before": "",
         "after": f"{wall:.0f} s", "change": "", "target": f"<= {TARGET_SECONDS:.0f} s",
         "met": "yes" if wall <= TARGET_SECONDS else "NO"},
        {"measure": f"gate (held-out {result.n_holdout} ytf faces)",
         "before": f"{100 * result.holdout_nme_before:.2f}%",
         "after": f"{100 * result.holdout_nme_after:.2f}%",
         "change": "accepted" if result.accepted else "rejected", "target": "accepted",
         "met": "yes" if result.accepted else "NO"},
    ]
    print_table(rows, ["measure", "before", "after", "change", "target", "met"],
                title="Fine-tuning on a new domain (YouTube Faces frames)")
    if not args.no_write:
        payload = {
            "init": str(init), "init_version": init_meta.get("version"), "init_epoch": init_meta.get("epoch"),
            "train_faces": len(train), "test_faces": len(test), "val_faces": len(val),
            "options": asdict(options), "threads": args.threads,
            "ytf": {"before": before_ytf, "after": after_ytf, "relative_gain": gain},
            "val_300w": {"before": before_val, "after": after_val, "relative_change": forgetting},
            "wall_seconds": wall, "gate": result.to_dict(),
            "targets": {"ytf_gain": TARGET_GAIN, "seconds": TARGET_SECONDS, "forgetting": TARGET_FORGETTING},
            "met": {"ytf_gain": gain >= TARGET_GAIN, "seconds": wall <= TARGET_SECONDS,
                    "forgetting": forgetting <= TARGET_FORGETTING, "gate": result.accepted},
        }
        command = " ".join(["python benchmarks/bench_finetune.py", *(argv or sys.argv[1:])])
        write_results("finetune", payload, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
