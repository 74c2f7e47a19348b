"""Accuracy of a model on 300-W LFPW test faces: decodes compared, and the whole-image detector path.

    python benchmarks/bench_accuracy.py [--weights weights/hih_cpu_300w] [--threads 2]

Prints a table and writes benchmarks/results/accuracy.json. Needs the face data (HIH_DATA_DIR).
NME is in % of the inter-ocular distance (outer eye corners); FR: % of faces with NME > 10%; AUC@0.10.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import print_table, write_results

from hih_settings import Settings


def main() -> None:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(settings.weights))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector", default="auto")
    args = parser.parse_args()

    import torch

    from model.evaluate import evaluate_images
    from model.metrics import auc, failure_rate, plot_ced
    from model.predictor import Predictor
    from model.readers import load_300w_folder

    torch.set_num_threads(args.threads)
    crops = load_300w_folder([settings.data_dir / "300w" / "test" / "lfpw"])
    whole = load_300w_folder([settings.data_dir / "300w" / "test_full" / "lfpw"])
    rows, curves = [], {}
    runs = [
        ("crops, gt box", crops, "gt", "integer", False, False),
        ("crops, gt box", crops, "gt", "argmax", False, False),
        ("crops, gt box", crops, "gt", "hih", False, False),
        ("crops, gt box", crops, "gt", "hih", True, False),
        ("crops, gt box", crops, "gt", "hih", True, True),
        ("whole images", whole, args.detector, "hih", True, False),
    ]
    for label, records, detector, decode, refine, flip in runs:
        pred = Predictor.load(args.weights, device="cpu", detector=detector if detector != "gt" else "auto",
                              decode_method=decode, refine=refine, flip_test=flip)
        t0 = time.time()
        res = evaluate_images(pred, records, detector)
        e = res.nmes
        row = {
            "set": label, "detector": detector, "decode": decode, "refine": refine, "flip": flip,
            "n": len(records), "missed": len(res.missed), "nme_%": 100 * float(np.mean(e)),
            "fr_%": 100 * failure_rate(e), "auc": auc(e), "ms_per_face": 1000 * res.seconds / max(1, res.faces),
            "wall_s": round(time.time() - t0, 1),
        }
        rows.append(row)
        if label == "crops, gt box" and not refine and not flip:
            curves[f"{decode} decode"] = e
        print_table([row], list(row), title="" if len(rows) > 1 else "running:")
    print_table(rows, ["set", "detector", "decode", "refine", "flip", "n", "missed", "nme_%", "fr_%", "auc",
                       "ms_per_face"], title=f"Accuracy of {args.weights} on 300-W LFPW test")
    plot = write_results("accuracy", {"weights": args.weights, "rows": rows},
                         "python benchmarks/bench_accuracy.py").with_name("accuracy_ced.png")
    plot_ced(curves, plot, title="CED, 300-W LFPW test crops (ground-truth box, one pass)")
    print(f"wrote {plot}")


if __name__ == "__main__":
    main()
