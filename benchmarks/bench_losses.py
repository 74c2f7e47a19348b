"""Integer-heatmap loss, measured: the paper's MSE (+ 0.05 x CSC) against soft cross-entropy (+ 1 x CSC).

    python benchmarks/bench_losses.py [--epochs 6]

Short runs of the default configuration from scratch on 300-W train less the 100-face holdout (the same
split as the shipped model), scored on that holdout (training data: no test faces are used). Prints a table,
writes benchmarks/results/losses.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from common import print_table, write_results

from hih_settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from model.readers import load_300w_folder
    from model.train import TrainOptions, train

    records = load_300w_folder([Settings.from_env().data_dir / "300w" / "train"])
    order = np.random.default_rng(0).permutation(len(records))
    held = [records[i] for i in sorted(order[:100])]
    used = [records[i] for i in sorted(order[100:])]
    arms = [("mse + 0.05 csc (paper)", "mse", 0.05), ("soft_ce + 1.0 csc (shipped)", "soft_ce", 1.0)]
    rows = []
    for label, loss, weight in arms:
        opts = TrainOptions(config="hih_cpu", epochs=args.epochs, integer_loss=loss, decimal_weight=weight,
                            threads=args.threads, workers=1, seed=0)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as out:
            summary = train(used, held, out, opts, progress=False)
        hist = summary["history"]
        rows.append({"recipe": label, "epochs": args.epochs,
                     "holdout_nme_%": 100 * hist[-1]["val_nme"], "holdout_fr_%": 100 * hist[-1]["val_fr"],
                     "best_nme_%": 100 * min(h["val_nme"] for h in hist), "minutes": (time.time() - t0) / 60})
        print_table([rows[-1]], list(rows[-1]))
    print_table(rows, list(rows[0]), title=f"Integer-heatmap loss, {args.epochs} epochs from scratch (holdout NME)")
    write_results("losses", {"rows": rows}, f"python benchmarks/bench_losses.py --epochs {args.epochs}")


if __name__ == "__main__":
    main()
