"""Face detector benchmark and box-mapping fit.

    python benchmarks/bench_detect.py --fit   # refit model/box_mapping.json on 300w/train only
    python benchmarks/bench_detect.py         # measure every configuration, print a table,
                                              # write benchmarks/results/detect.json

Sets: ``300w/test_full/lfpw`` (224 whole images, one annotated face each; other faces in an image are not
annotated) and ``ytf/train`` (800 small video frames, one face each). A face counts as found when some
detected box's mapped centre lies inside the annotated landmark box (tight box of the 68 points) and its
mapped size is within a factor 0.5-2 of the landmark box's larger side. "other/img" counts the boxes that
do not match the annotated face (on ytf these are false detections; on lfpw some are real, unannotated
faces). Errors of the mapped box (on found faces): centre distance / size and |size ratio - 1|, medians.
Times per image (image already decoded, one thread): "ms" is the process CPU time, which stays
meaningful when other jobs share the cores; the JSON also has the wall-clock times ("wall_ms_*").
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hih_settings import Settings  # noqa: E402
from model import detect as D  # noqa: E402

cv2.setNumThreads(1)

RESULTS = ROOT / "benchmarks" / "results" / "detect.json"
TRAIN_SETS = ("300w/train/afw", "300w/train/helen", "300w/train/lfpw")
EVAL_SETS = {"lfpw": "300w/test_full/lfpw", "ytf": "ytf/train"}
YUNET_FILE = "yunet_n_640_640.onnx"


# ------------------------------------------------------------------------------------------------ data
def read_pts(path: Path) -> np.ndarray:
    """A 300-W .pts file as (N, 2) float64, 0-based pixel-centre coordinates."""
    text = Path(path).read_text()
    body = text[text.index("{") + 1: text.index("}")]
    return np.array(body.split(), dtype=np.float64).reshape(-1, 2) - 1.0


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class Face:
    name: str
    image: Path
    points: np.ndarray
    box: D.FaceBox = field(init=False)

    def __post_init__(self) -> None:
        self.box = D.box_from_points(self.points)

    def matches(self, b: D.FaceBox) -> bool:
        """Mapped centre inside the landmark box and size within a factor 0.5-2."""
        (x0, y0), (x1, y1) = self.points.min(0), self.points.max(0)
        return bool(x0 <= b.cx <= x1 and y0 <= b.cy <= y1 and 0.5 <= b.size / self.box.size <= 2.0)


def load_set(folder: Path, limit: int = 0, stride: int = 1) -> list[Face]:
    pts = sorted(folder.glob("*.pts"))[::stride]
    if limit:
        pts = pts[:limit]
    return [Face(f"{folder.name}/{p.stem}", p.with_suffix(".jpg"), read_pts(p)) for p in pts]


# ------------------------------------------------------------------------------------------------- fit
def fit_components(yunet: Path | None) -> dict[str, D._BaseDetector]:
    """The raw detectors whose boxes get a mapping. Haar in the fit looks only for big faces (the crops
    hold one face of about half their side): faster, and the drawn box does not depend on min size."""
    comps: dict[str, D._BaseDetector] = {
        f"haar_{c}": D.HaarDetector((c,), min_side=0, min_size_frac=0.3) for c in D.HAAR_FILES
    }
    comps["hog"] = D.HogDetector(min_side=0)
    if yunet is not None:
        comps["yunet"] = D.YuNetDetector(yunet)
    return comps


def fit(data: Path, stride: int, yunet: Path | None, out: Path) -> dict:
    faces = [f for s in TRAIN_SETS for f in load_set(data / s, stride=stride)]
    print(f"fitting on {len(faces)} training crops ({', '.join(TRAIN_SETS)}; stride {stride})", flush=True)
    comps = fit_components(yunet)
    samples: dict[str, list[tuple]] = {k: [] for k in comps}
    for i, face in enumerate(faces):
        img = read_rgb(face.image)
        t = face.box
        (x0, y0), (x1, y1) = face.points.min(0), face.points.max(0)
        for kind, det in comps.items():
            best = None
            for r in det.detect_raw(img):
                if r.kind != kind:
                    continue
                rcx, rcy = r.x + r.w / 2 - 0.5, r.y + r.h / 2 - 0.5
                if not (x0 <= rcx <= x1 and y0 <= rcy <= y1 and 0.5 <= max(r.w, r.h) / t.size <= 2.5):
                    continue
                d = np.hypot(rcx - t.cx, rcy - t.cy)
                if best is None or d < best[0]:
                    best = (d, r)
            if best is not None:
                samples[kind].append((best[1], t))
        if (i + 1) % 200 == 0:
            print(f"  {i + 1}/{len(faces)}", {k: len(v) for k, v in samples.items()}, flush=True)

    # "given": the tight landmark box itself is the raw box (identity, see model/detect.py)
    samples["given"] = [(D.RawBox(*f.box.raw, 1.0, "given"), f.box) for f in faces]
    mappings = {}
    for kind, pairs in samples.items():
        if len(pairs) < 20:
            print(f"  {kind}: only {len(pairs)} matches, not fitted")
            continue
        raw = np.array([(r.x, r.y, r.w, r.h, r.mirrored) for r, _ in pairs], dtype=np.float64)
        tru = np.array([(t.cx, t.cy, t.size) for _, t in pairs], dtype=np.float64)
        a_i = (tru[:, 0] + 0.5 - raw[:, 0]) / raw[:, 2]
        a_i = np.where(raw[:, 4] > 0, 1.0 - a_i, a_i)
        b_i = (tru[:, 1] + 0.5 - raw[:, 1]) / raw[:, 3]
        c_i = tru[:, 2] / np.maximum(raw[:, 2], raw[:, 3])
        m = D.BoxMapping(float(np.median(a_i)), float(np.median(b_i)), float(np.median(c_i)))
        est = np.array([m.apply(*r[:4], mirrored=bool(r[4])) for r in raw])
        ce = np.hypot(est[:, 0] - tru[:, 0], est[:, 1] - tru[:, 1]) / tru[:, 2]
        se = np.abs(est[:, 2] - tru[:, 2]) / tru[:, 2]
        mappings[kind] = {
            "a": round(m.a, 5), "b": round(m.b, 5), "c": round(m.c, 5), "n": len(pairs),
            "found_fraction": round(len(pairs) / len(faces), 4),
            "median_centre_err": round(float(np.median(ce)), 5),
            "median_size_err": round(float(np.median(se)), 5),
            "p90_centre_err": round(float(np.percentile(ce, 90)), 5),
            "p90_size_err": round(float(np.percentile(se, 90)), 5),
            "raw_aspect_h_over_w": round(float(np.median(raw[:, 3] / raw[:, 2])), 4),
        }
        print(f"  {kind:14s} a={m.a:.4f} b={m.b:.4f} c={m.c:.4f} n={len(pairs)} "
              f"centre {np.median(ce):.4f} size {np.median(se):.4f}", flush=True)
    doc = {
        "description": "Linear maps from each detector's raw box (pixel-corner x, y, w, h) to the landmark "
                       "box (tight box of the 68 points: centre, larger side; 0-based pixel-centre coords).",
        "form": "cx = x + a*w - 0.5; cy = y + b*h - 0.5; size = c*max(w, h); boxes found on a mirrored image "
                "(haar_profile) use 1 - a",
        "fit": "medians of the per-face ratios a_i, b_i, c_i on the training crops where the detector found "
               "the face; residuals: |centre error| / size and |size error| / size of the mapped box",
        "given": "identity: fitted with the tight landmark box itself as the raw box "
                 "(corners xmin+0.5 .. xmax+0.5)",
        "fitted_on": [f"{s} (stride {stride})" for s in TRAIN_SETS],
        "n_faces": len(faces),
        "regenerate": "python benchmarks/bench_detect.py --fit",
        "mappings": mappings,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    D.load_mappings.cache_clear()
    print(f"wrote {out}")
    return doc


# ------------------------------------------------------------------------------------------- benchmark
def configs(yunet: Path | None, quick: bool) -> dict[str, object]:
    """Detector configurations to measure, by name (the name says what it is; [spec] marks the one that
    ``make_detector(spec)`` builds). Haar: (scaleFactor, minNeighbors, minSize); upN: images whose longer
    side is below N px are upscaled to N first."""
    H = D.HaarDetector
    c: dict[str, object] = {
        "haar default (1.1,5,30)": H(("default",), 1.1, 5, 30, min_side=0),
        "haar alt": H(("alt",), 1.1, 5, 30, min_side=0),
        "haar alt2": H(("alt2",), 1.1, 5, 30, min_side=0),
        "haar alt_tree (1.1,3,30)": H(("alt_tree",), 1.1, 3, 30, min_side=0),
        "haar profile+mirror": H(("profile",), 1.1, 5, 30, min_side=0),
        "haar default up400": H(("default",), 1.1, 5, 24, min_side=400),
        "haar default (1.05,3) up400": H(("default",), 1.05, 3, 24, min_side=400),
        "haar default+alt2 up400 [haar]": D.make_detector("haar"),
        "haar default+alt2+alt+profile up400": H(
            ("default", "alt2", "alt", "profile"), 1.1, 5, 24, min_side=400
        ),
        "hog (no upscale)": D.HogDetector(min_side=0),
        "hog up640 [hog]": D.make_detector("hog"),
        "hog up800": D.HogDetector(min_side=800),
        "auto = hog up640 > haar [auto]": D.make_detector("auto"),
    }
    if quick:
        c = {k: v for k, v in c.items() if "[" in k or k.startswith("haar default (1.1")}
    if yunet is not None:
        c["yunet (user file)"] = D.YuNetDetector(yunet)
    return c


# fallback chains evaluated from the runs of their parts: the same boxes and summed time as running
# FallbackDetector (the second detector only runs on images where the first found nothing)
CHAINS = {
    "hog (no upscale) > haar default (1.1,5,30)": ("hog (no upscale)", "haar default (1.1,5,30)"),
    "hog (no upscale) > haar [default+alt2 up400]": ("hog (no upscale)", "haar default+alt2 up400 [haar]"),
    "hog up640 > haar default up400": ("hog up640 [hog]", "haar default up400"),
    "hog up800 > haar [default+alt2 up400]": ("hog up800", "haar default+alt2 up400 [haar]"),
}


Run = tuple[list[D.FaceBox], float, float]  # boxes, wall ms, CPU ms


def run_config(det, images: list[np.ndarray]) -> list[Run]:
    out = []
    for img in images:
        t0, c0 = time.perf_counter(), time.process_time()
        boxes = det.detect(img)
        out.append((boxes, (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0))
    return out


def score(faces: list[Face], runs: list[Run]) -> dict:
    hits, misses, other, ce, se, ms, wall, n_any_other = 0, [], 0, [], [], [], [], 0
    for face, (boxes, t, cpu) in zip(faces, runs, strict=True):
        ms.append(cpu)
        wall.append(t)
        good = [b for b in boxes if face.matches(b)]
        if good:
            hits += 1
            b = min(good, key=lambda b: np.hypot(b.cx - face.box.cx, b.cy - face.box.cy))
            ce.append(np.hypot(b.cx - face.box.cx, b.cy - face.box.cy) / face.box.size)
            se.append(abs(b.size / face.box.size - 1.0))
        else:
            misses.append(face.name)
        n_other = len(boxes) - (1 if good else 0)
        other += n_other
        n_any_other += n_other > 0
    n = len(faces)
    return {
        "n": n, "found": hits, "rate": round(hits / n, 4), "missed": len(misses), "misses": misses,
        "other_per_image": round(other / n, 4), "images_with_other": n_any_other,
        "median_centre_err": round(float(np.median(ce)), 4) if ce else None,
        "median_size_err": round(float(np.median(se)), 4) if se else None,
        "p90_centre_err": round(float(np.percentile(ce, 90)), 4) if ce else None,
        "ms_median": round(float(np.median(ms)), 2), "ms_p90": round(float(np.percentile(ms, 90)), 2),
        "ms_mean": round(float(np.mean(ms)), 2),
        "wall_ms_median": round(float(np.median(wall)), 2),
        "wall_ms_p90": round(float(np.percentile(wall, 90)), 2),
    }


def chain(parts: list[list[Run]]) -> list[Run]:
    out = []
    for per_image in zip(*parts, strict=True):
        boxes, t, c = [], 0.0, 0.0
        for b, ti, ci in per_image:
            t, c = t + ti, c + ci
            if b:
                boxes = b
                break
        out.append((boxes, t, c))
    return out


def bench(data: Path, yunet: Path | None, limit: int, quick: bool, out: Path, cache: Path | None) -> dict:
    """Run every configuration on both sets. ``cache``: a pickle of per-image runs keyed by set, config
    name and the mapping file's hash (a developer convenience to re-tabulate without re-running; delete it
    after changing model/detect.py)."""
    dets = configs(yunet, quick)
    key = hashlib.sha1(D.MAPPING_FILE.read_bytes()).hexdigest()[:10]
    store = pickle.loads(cache.read_bytes()) if cache is not None and cache.is_file() else {}
    results: dict[str, dict] = {}
    for set_name, sub in EVAL_SETS.items():
        faces = load_set(data / sub, limit=limit)
        images = [read_rgb(f.image) for f in faces]
        runs = {}
        for name, det in dets.items():
            t0 = time.perf_counter()
            ck = (set_name, name, key, limit, "v2")
            runs[name] = store[ck] if ck in store else run_config(det, images)
            store[ck] = runs[name]
            results.setdefault(name, {})[set_name] = r = score(faces, runs[name])
            print(f"[{set_name}] {name}: {r['found']}/{r['n']} other/img {r['other_per_image']} "
                  f"{r['ms_median']} ms CPU ({time.perf_counter() - t0:.0f} s)", flush=True)
            if cache is not None:
                cache.write_bytes(pickle.dumps(store))
        for name, parts in CHAINS.items():
            if all(p in runs for p in parts):
                results.setdefault(name, {})[set_name] = score(faces, chain([runs[p] for p in parts]))
    print_table(results)
    doc = {
        "description": __doc__.strip().splitlines()[0],
        "command": "python benchmarks/bench_detect.py" + (f" --limit {limit}" if limit else ""),
        "auto": D.AUTO_SPEC, "auto_rationale": D.AUTO_RATIONALE,
        "opencv": cv2.__version__, "threads": 1, "load_average_at_end": os.getloadavg(),
        "hit_rule": "mapped centre inside the annotated landmark box, "
                    "mapped size within 0.5-2x its larger side",
        "sets": {k: str(v) for k, v in EVAL_SETS.items()},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nauto = {D.AUTO_SPEC}: {D.AUTO_RATIONALE}\nwrote {out}")
    return doc


def print_table(results: dict[str, dict]) -> None:
    head = (f"{'detector':44s} | {'lfpw found':>10s} {'miss':>4s} {'other':>6s} {'cpu ms':>6s} {'c.err':>5s} "
            f"{'s.err':>5s} | {'ytf found':>10s} {'miss':>4s} {'FP/img':>6s} {'cpu ms':>6s} {'c.err':>5s} "
            f"{'s.err':>5s}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, sets in results.items():
        cells = []
        for s in EVAL_SETS:
            r = sets.get(s)
            if r is None:
                cells.append(" " * 45)
                continue
            ce = "-" if r["median_centre_err"] is None else f"{r['median_centre_err']:.3f}"
            sz = "-" if r["median_size_err"] is None else f"{r['median_size_err']:.3f}"
            cells.append(f"{r['rate'] * 100:9.1f}% {r['missed']:4d} {r['other_per_image']:6.2f} "
                         f"{r['ms_median']:6.1f} {ce:>5s} {sz:>5s}")
        print(f"{name:44s} | {cells[0]} | {cells[1]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="refit model/box_mapping.json on 300w/train, stop")
    ap.add_argument("--stride", type=int, default=1, help="fit on every STRIDE-th training crop (default 1)")
    ap.add_argument("--limit", type=int, default=0, help="benchmark: first N images of each set (0: all)")
    ap.add_argument("--quick", action="store_true", help="benchmark: only the baseline, haar, hog and auto")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: HIH_DATA_DIR / settings)")
    ap.add_argument("--yunet", type=Path, default=None,
                    help=f"YuNet ONNX file (default: <data>/../models/{YUNET_FILE} when present)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="benchmark: reuse per-image runs (pickle)")
    args = ap.parse_args(argv)
    data = (args.data or Settings.from_env().data_dir).resolve()
    if not data.is_dir():
        print(f"no data folder at {data} (set HIH_DATA_DIR)", file=sys.stderr)
        return 2
    yunet = args.yunet or data.parent / "models" / YUNET_FILE
    yunet = yunet if yunet.is_file() else None
    if args.fit:
        fit(data, args.stride, yunet, args.out or D.MAPPING_FILE)
    else:
        bench(data, yunet, args.limit, args.quick, args.out or RESULTS, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
