"""Uncertainty benchmark: does a face's uncertainty predict its error?

    python benchmarks/bench_uncertainty.py select [--weights runs/default/best]
        Choose the per-point formula (the regions' scores) on TRAINING data only: the 100 faces that the
        default training run held out of 300w/train (``np.random.default_rng(0).permutation(n)[:100]`` over
        the sorted records) plus the 800 ytf/train frames (never trained on), in 5 folds (ytf grouped by
        person, so frames of one video stay in one fold). Every per-point candidate x face aggregate of
        active_learning.uncertainty is scored per fold (Spearman of face uncertainty with NME; hit10 = share
        of the fold's worst 10 % found among its 10 % most uncertain), next to fitted log-linear combinations
        (out of fold), the baseline and the flip-test disagreement (a second pass, for comparison). Writes
        benchmarks/results/uncertainty_selection.json.

    python benchmarks/bench_uncertainty.py fit
        Fit the face error model (active_learning.error_model: predicted NME) on augmented crops of the
        300-W training faces (holdout excluded), for every feature set x ridge, score each on the same
        selection folds, keep one by the one-standard-error rule, calibrate the face score on the holdout
        faces and write active_learning/error_model.json and benchmarks/results/uncertainty_fit.json.

    python benchmarks/bench_uncertainty.py [--weights weights/hih_cpu_300w]
        Measure the chosen face uncertainty (active_learning.uncertainty.face_uncertainty) against the
        previous formula (top25 of the point spreads, crop px) and the baseline (the integer heatmap's peak
        value, mean over points, negated) on the 300-W validation faces (300w/test/lfpw, 224) and on
        ytf/train (800): Spearman(uncertainty, NME) and the fraction of the worst 10 % faces (by NME) found
        among the 10 % most uncertain, each with a 95 % bootstrap interval. Prints a table, writes
        benchmarks/results/uncertainty.json and benchmarks/results/uncertainty.png (NME against uncertainty).

Faces are predicted on their ground-truth landmark box (``model.transforms.landmark_box``), one pass, the
network's default "hih" decode; NME is inter-ocular (outer eye corners). The bench also measures the
product's own path (sets ``*_detected``): whole images (300w/test_full/lfpw; the ytf frames), the default
face detector, the annotated face matched by ``model.evaluate.match_face``, two passes; faces the detector
misses are counted, not scored. One torch thread. Predictions are
cached under $TMPDIR/hih-bench-uncertainty keyed by the checkpoint's file size and time (--no-cache: off).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from active_learning import uncertainty as U  # noqa: E402
from hih_settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HOLDOUT = 100  # faces the default training run held out of 300w/train (seed 0)
FOLDS = 5
BASELINE = "integer_peak"


# ------------------------------------------------------------------------------------------ predict
def _cache_key(weights: Path, records) -> str:
    st = (weights / "model.safetensors").stat()
    h = hashlib.sha256(f"v4|{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for r in records:
        h.update(str(r.image_path).encode())
    return h.hexdigest()[:20]


def _cache_file(name: str) -> Path:
    return Path(tempfile.gettempdir()) / "hih-bench-uncertainty" / f"{name}.npz"


def _read_cache(path: Path, cache: bool) -> dict[str, np.ndarray] | None:
    if not (cache and path.is_file()):
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _write_cache(path: Path, cache: bool, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return arrays


def predict_records(weights: Path, records, cache: bool = True, batch: int = 32) -> dict[str, np.ndarray]:
    """Predict ``records`` on their landmark boxes: ``points`` (N, K, 2), ``gt``, ``nme`` (N,), ``stats``."""
    import torch

    from model.image_io import load_image
    from model.metrics import nme
    from model.predictor import Predictor
    from model.transforms import landmark_box

    cache_file = _cache_file(_cache_key(weights, records))
    if (hit := _read_cache(cache_file, cache)) is not None:
        return hit
    torch.set_num_threads(1)
    predictor = Predictor.load(weights, device="cpu", detector="auto")
    perm = predictor.scheme.flip_permutation()
    crop = predictor.model.config.input_size / predictor.model.config.crop_scale
    pts, parts, flips, crop_pts = [], [], [], []
    seconds = 0.0
    for s in range(0, len(records), batch):
        chunk = records[s : s + batch]
        images = [load_image(r.image_path) for r in chunk]
        boxes = [landmark_box(r.points) for r in chunk]
        t0 = time.perf_counter()
        p, dec = predictor.predict_crops(images, boxes)
        seconds += time.perf_counter() - t0
        pts.append(p)
        parts.append({f: getattr(dec, f) for f in U.STAT_FIELDS})
        crop_pts.append(dec.points / predictor.model.config.input_size)
        # the mirrored face, for the flip-disagreement candidate (a second pass; not a decoder statistic)
        widths = np.array([im.shape[1] for im in images], dtype=np.float64)
        mirrored = [(w - 1 - b[0], b[1], b[2]) for w, b in zip(widths, boxes, strict=True)]
        fp, _ = predictor.predict_crops([im[:, ::-1].copy() for im in images], mirrored)
        fp = fp[:, perm].copy()
        fp[..., 0] = widths[:, None] - 1 - fp[..., 0]
        size = np.array([b[2] for b in boxes])
        flips.append(np.linalg.norm(p - fp, axis=-1) * (crop / size)[:, None])
    gt = np.stack([r.points for r in records]).astype(np.float64)
    points = np.concatenate(pts)
    out = {"points": points, "gt": gt, "nme": nme(points, gt, predictor.scheme),
           "seconds_per_face": np.array(seconds / max(len(records), 1))}
    for f in U.STAT_FIELDS:
        out[f] = np.concatenate([p[f] for p in parts]).astype(np.float64)
    out["flip_disagreement"] = np.concatenate(flips)
    out["crop_points"] = np.concatenate(crop_pts).astype(np.float64)
    return _write_cache(cache_file, cache, out)


def predict_detected(weights: Path, records, cache: bool = True) -> dict[str, np.ndarray]:
    """The product's path on whole images: the default face detector, the annotated face matched
    (``model.evaluate.match_face``), two passes (the second from the first pass's landmark box). Returns the
    found faces' ``nme`` (N,), their stats as in ``stats_of``, and ``missed``: how many faces were not found."""
    import torch

    from model.evaluate import evaluate_images
    from model.predictor import Predictor

    cache_file = _cache_file(f"detected-{_cache_key(weights, records)}")
    if (hit := _read_cache(cache_file, cache)) is not None:
        return hit
    torch.set_num_threads(1)
    predictor = Predictor.load(weights, device="cpu", detector="auto")
    stats: list[dict] = []
    ev = evaluate_images(predictor, records, detector="auto", scorer=lambda face: stats.append(face.stats))
    out = {"nme": ev.nmes, "missed": np.array(len(ev.missed)),
           "seconds_per_face": np.array(ev.seconds / max(ev.faces, 1))}
    for f in (*U.STAT_FIELDS, "crop_points"):
        out[f] = np.stack([np.asarray(st[f], dtype=np.float64) for st in stats])
    return _write_cache(cache_file, cache, out)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stats_of(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder statistics and crop points of cached predictions, as ``FacePrediction.stats`` holds them."""
    return {f: pred[f] for f in (*U.STAT_FIELDS, "crop_points")}


def point_errors(pred: dict[str, np.ndarray]) -> np.ndarray:
    """(N, K) point errors divided by the face's ground-truth inter-ocular distance."""
    from model.metrics import point_errors as errors

    return errors(pred["points"], pred["gt"], pred["gt"].shape[1])


def previous_uncertainty(stats: dict[str, np.ndarray]) -> np.ndarray:
    """The face formula before the error model: the mean spread of the least sure quarter of the points (crop px)."""
    return U.FACE_AGGREGATES["top25"](U.POINT_CANDIDATES["rss_std"](stats))


def baseline_uncertainty(stats: dict[str, np.ndarray]) -> np.ndarray:
    """The baseline: the integer heatmap's peak value (mean over points), negated so larger = less sure."""
    return -np.asarray(stats[BASELINE]).mean(-1)


# -------------------------------------------------------------------------------------------- data
def load_sets(data: Path) -> dict[str, list]:
    from model.readers import load_300w_folder

    train = load_300w_folder([data / "300w" / "train"])
    held = set(np.random.default_rng(0).permutation(len(train))[:HOLDOUT].tolist())
    return {
        "holdout": [train[i] for i in sorted(held)],
        "trained_on": [r for i, r in enumerate(train) if i not in held],
        "ytf": load_300w_folder([data / "ytf" / "train"]),
        "lfpw": load_300w_folder([data / "300w" / "test" / "lfpw"]),
        "lfpw_full": load_300w_folder([data / "300w" / "test_full" / "lfpw"]),
    }


def ytf_group(path: Path) -> str:
    """The person (video) of a ytf frame ``Name_Surname_123.jpg``."""
    return path.stem.rsplit("_", 1)[0]


def make_folds(holdout_n: int, ytf_paths: list[Path], k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold index per face of holdout + ytf: holdout faces at random, ytf by person (greedy balance)."""
    rng = np.random.default_rng(seed)
    folds_h = rng.permutation(np.arange(holdout_n) % k)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(ytf_paths):
        groups.setdefault(ytf_group(p), []).append(i)
    names = list(groups)
    rng.shuffle(names)
    names.sort(key=lambda n: -len(groups[n]))
    sizes = np.zeros(k, dtype=int)
    folds_y = np.zeros(len(ytf_paths), dtype=int)
    for n in names:
        f = int(np.argmin(sizes))
        folds_y[groups[n]] = f
        sizes[f] += len(groups[n])
    return np.concatenate([folds_h, folds_y])


# ------------------------------------------------------------------------------------------ select
def _scores(u: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    return U.spearman(u, e), U.worst_in_most_uncertain(u, e, 0.10)


def fold_scores(u: np.ndarray, e: np.ndarray, folds: np.ndarray, is_ytf: np.ndarray) -> dict:
    """Face uncertainty ``u`` against NME ``e`` on the selection faces: the mean (sd) over folds of the pooled
    Spearman and of hit10, and each domain's Spearman over its faces whole."""
    per_fold = [_scores(u[folds == f], e[folds == f]) for f in range(FOLDS)]
    rho = np.array([p[0] for p in per_fold])
    return {"spearman": float(rho.mean()), "spearman_sd": float(rho.std()),
            "worst10_hit": float(np.mean([p[1] for p in per_fold])),
            "spearman_holdout": U.spearman(u[~is_ytf], e[~is_ytf]),
            "spearman_ytf": U.spearman(u[is_ytf], e[is_ytf])}


def domain_fold_scores(u: np.ndarray, e: np.ndarray, folds: np.ndarray, is_ytf: np.ndarray) -> dict:
    """The fit's selection score: per fold, the mean of the two domains' Spearman (300-W's 20 faces, ytf's
    160), so the 800 ytf frames do not outvote the 100 300-W faces 8 to 1; its mean and sd over folds."""
    by_domain = np.array([np.mean([U.spearman(u[(folds == f) & (is_ytf == y)], e[(folds == f) & (is_ytf == y)])
                                   for y in (False, True)]) for f in range(FOLDS)])
    return {"spearman_domains": float(by_domain.mean()), "spearman_domains_sd": float(by_domain.std())}


def _fit_loglinear(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    A = np.c_[x, np.ones(len(x))]
    w, *_ = np.linalg.lstsq(A, y, rcond=None)
    return w


def fit_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Maximum-likelihood (c0, c1) of P(y = 1) = sigmoid(c0 + c1 * x), by Newton's method."""
    A = np.c_[np.ones(len(x)), x]
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(A @ w)))
        grad = A.T @ (y - p)
        hess = (A * (p * (1 - p))[:, None]).T @ A + 1e-9 * np.eye(2)
        w = w + np.linalg.solve(hess, grad)
    return float(w[0]), float(w[1])


def selection_pool(weights: Path, sets: dict[str, list], cache: bool
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The selection faces (holdout + ytf) predicted and pooled, their fold per face, and which are ytf."""
    preds = {name: predict_records(weights, sets[name], cache) for name in ("holdout", "ytf")}
    pool = {k: np.concatenate([preds["holdout"][k], preds["ytf"][k]]) for k in preds["holdout"]
            if k != "seconds_per_face"}
    folds = make_folds(len(sets["holdout"]), [r.image_path for r in sets["ytf"]])
    is_ytf = np.r_[np.zeros(len(sets["holdout"]), bool), np.ones(len(sets["ytf"]), bool)]
    return pool, folds, is_ytf


def select(weights: Path, data: Path, cache: bool) -> dict:
    sets = load_sets(data)
    pool, folds, is_ytf = selection_pool(weights, sets, cache)
    stats, e = stats_of(pool), pool["nme"]
    perr = point_errors(pool)
    rows = []

    def score_face_u(name: str, u: np.ndarray) -> dict:
        return {"formula": name, **fold_scores(u, e, folds, is_ytf)}

    for pname, pfun in U.POINT_CANDIDATES.items():
        pu = pfun(stats)
        point_rho = U.spearman(pu.ravel(), perr.ravel())
        for aname, afun in U.FACE_AGGREGATES.items():
            row = score_face_u(f"{aname}({pname})", afun(pu))
            row["point_spearman"] = point_rho
            rows.append(row)
    rows.append({**score_face_u("baseline -mean(integer_peak)", baseline_uncertainty(stats)),
                 "point_spearman": U.spearman(-stats[BASELINE].ravel(), perr.ravel())})
    flip = pool["flip_disagreement"]  # crop px between the prediction and the mirrored face's, unmirrored
    for aname in ("mean", "top25"):
        rows.append({**score_face_u(f"{aname}(flip disagreement), 2nd pass", U.FACE_AGGREGATES[aname](flip)),
                     "point_spearman": U.spearman(flip.ravel(), perr.ravel())})

    # Fitted combinations, to see whether one measurably beats the simple formulas: least squares of ln NME
    # on the faces' mean per-point features (U.loglinear_features), fitted on 4 folds and scored on the fifth.
    feats = U.loglinear_features(stats).mean(-2)
    subsets = {"4 stats": [0, 1, 2, 3], "ln integer_std + decimal_entropy": [0, 2],
               "ln integer_std + ln decimal_std": [0, 1], "ln integer_std + ln integer_peak": [0, 3]}
    for label, cols in subsets.items():
        fitted = np.zeros(len(e))
        for f in range(FOLDS):
            w = _fit_loglinear(feats[folds != f][:, cols], np.log(e[folds != f]))
            fitted[folds == f] = np.c_[feats[folds == f][:, cols], np.ones((folds == f).sum())] @ w
        name = f"fitted log-linear({label}), out-of-fold"
        rows.append({**score_face_u(name, fitted), "point_spearman": None})
    w_all = _fit_loglinear(feats, np.log(e))
    loglinear_fit = {"features": list(U.LOGLINEAR_FEATURES), "weights": [float(v) for v in w_all[:-1]],
                     "bias": float(w_all[-1])}
    rows.sort(key=lambda r: -r["spearman"])

    # Calibration of the chosen uncertainties into scores, on the 300-W holdout faces (clean ground truth;
    # ytf's is machine-made): P(error <= threshold), logistic in ln uncertainty (faces: NME <= FACE_OK_NME;
    # points: error <= POINT_OK_IOD of the inter-ocular distance).
    chosen = U.face_uncertainty(stats)
    pu = U.point_uncertainty(stats)
    h = ~is_ytf
    face_ok = (e[h] <= U.FACE_OK_NME).astype(float)
    point_ok = (perr[h] <= U.POINT_OK_IOD).astype(float).ravel()
    face_fit = fit_logistic(np.log(np.clip(chosen[h], 1e-6, None)), face_ok)
    point_fit = fit_logistic(np.log(np.clip(pu[h].ravel(), 1e-6, None)), point_ok)
    calibration = {"on": "300-W holdout faces",
                   "face": {"c0": face_fit[0], "c1": face_fit[1], "ok_nme": U.FACE_OK_NME,
                            "ok_rate": float(face_ok.mean())},
                   "point": {"c0": point_fit[0], "c1": point_fit[1], "ok_iod": U.POINT_OK_IOD,
                             "ok_rate": float(point_ok.mean())}}
    # The rule: among the simple (unfitted) formulas whose mean fold Spearman is within one standard error of
    # the best one's, take the one whose per-point uncertainty best predicts the per-point error (it also
    # gives the regions' scores), then its best aggregate.
    simple = [r for r in rows if not r["formula"].startswith(("fitted", "baseline")) and "2nd pass" not in
              r["formula"]]
    best = max(simple, key=lambda r: r["spearman"])
    close = [r for r in simple if r["spearman"] >= best["spearman"] - best["spearman_sd"] / np.sqrt(FOLDS)]
    recommended = max(close, key=lambda r: (round(r["point_spearman"], 3), r["spearman"]))
    out = {
        "weights": _rel(weights), "faces": {"holdout": int((~is_ytf).sum()), "ytf": int(is_ytf.sum())},
        "folds": FOLDS, "nme_mean": {"holdout": float(e[~is_ytf].mean()), "ytf": float(e[is_ytf].mean())},
        "chosen": score_face_u("chosen: active_learning.uncertainty.face_uncertainty", chosen),
        "chosen_quantiles": {q: float(np.quantile(chosen, q / 100)) for q in (10, 25, 50, 75, 90)},
        "point_uncertainty_quantiles": {
            q: float(np.quantile(U.point_uncertainty(stats), q / 100)) for q in (10, 25, 50, 75, 90)},
        "calibration": calibration,
        "best_simple": recommended["formula"],
        "loglinear_fit_all": loglinear_fit,
        "rows": rows,
    }
    return out


# --------------------------------------------------------------------------------------------- fit
AUG_DRAWS = 3  # augmented crops per training face for the error model's fit
POINT_ERROR_FLOOR = 1e-4  # point errors (fraction of the inter-ocular distance) are clipped here before ln
RIDGES = (1e-4, 1e-3, 1e-2)  # penalty on standardised weights: at most 1 % shrinkage


def augmented_training_faces(weights: Path, records, draws: int = AUG_DRAWS, seed: int = 1234,
                             cache: bool = True) -> dict[str, np.ndarray]:
    """``active_learning.error_model_fit.collect_augmented`` with the checkpoint at ``weights``, cached."""
    import torch

    from active_learning.error_model_fit import collect_augmented
    from model.predictor import Predictor

    cache_file = _cache_file(f"aug-{_cache_key(weights, records)}-{draws}-{seed}")
    if (hit := _read_cache(cache_file, cache)) is not None:
        return hit
    torch.set_num_threads(1)
    predictor = Predictor.load(weights, device="cpu", detector="auto")
    return _write_cache(cache_file, cache, collect_augmented(predictor, records, draws, seed, progress=True))


def fit(weights: Path, data: Path, cache: bool, model_file: Path) -> dict:
    """Fit every feature set x ridge of ``active_learning.error_model`` on augmented training faces (the 300-W
    training faces the default model trained on, its 100 holdout faces excluded), score each on the
    selection folds (holdout + ytf, never fitted on) and keep, by the one-standard-error rule, the model with
    the fewest fitted parameters and then the strongest ridge within one standard error (fold sd / sqrt 5) of
    the best mean fold Spearman. Both kinds compete: face models (ln NME on face features) and point models
    (ln point error on point features, one intercept a landmark). Then calibrate the face score on the
    holdout faces and write ``model_file``."""
    from active_learning import error_model as EM

    sets = load_sets(data)
    fit_records = sets["trained_on"]
    aug = augmented_training_faces(weights, fit_records, cache=cache)
    pool, folds, is_ytf = selection_pool(weights, sets, cache)
    e, stats = pool["nme"], stats_of(pool)
    y_aug = np.log(np.clip(aug["nme"], 1e-6, None))

    def scored(u: np.ndarray) -> dict:
        return {**domain_fold_scores(u, e, folds, is_ytf), **fold_scores(u, e, folds, is_ytf)}

    y_points = np.log(np.clip(aug["point_errors"], POINT_ERROR_FLOOR, None))
    candidates = [("face", n, names) for n, names in EM.FEATURE_SETS.items()]
    candidates += [("point", n, names) for n, names in EM.POINT_FEATURE_SETS.items()]
    rows, models = [], {}
    for kind, set_name, names in candidates:
        for ridge in RIDGES:
            if kind == "face":
                m = EM.fit_ridge(EM.feature_matrix(aug, names), y_aug, names, ridge)
            else:
                m = EM.fit_point_ridge(EM.point_feature_matrix(aug, names), y_points, names, ridge)
            label = f"{kind}: {set_name}, ridge {ridge:g}"
            models[label] = m
            rows.append({"formula": label, "kind": kind, "features": len(names), "parameters": m.n_parameters,
                         "ridge": ridge, "train_spearman": U.spearman(np.log(m.predict_nme(aug)), y_aug),
                         **scored(np.log(m.predict_nme(stats)))})
    reference = [{"formula": "previous: top25(rss_std), crop px", **scored(previous_uncertainty(stats))},
                 {"formula": "baseline -mean(integer_peak)", **scored(baseline_uncertainty(stats))}]
    best = max(rows, key=lambda r: r["spearman_domains"])
    floor = best["spearman_domains"] - best["spearman_domains_sd"] / np.sqrt(FOLDS)
    chosen = min((r for r in rows if r["spearman_domains"] >= floor), key=lambda r: (r["parameters"], -r["ridge"]))
    model = models[chosen["formula"]]

    # the face score: P(NME <= FACE_OK_NME), logistic in ln NME_hat, on the holdout faces (clean ground truth)
    h = ~is_ytf
    ln_hat = np.log(model.predict_nme({k: v[h] for k, v in stats.items()}))
    ok = (e[h] <= U.FACE_OK_NME).astype(float)
    c0, c1 = fit_logistic(ln_hat, ok)
    info = {"fitted_on": f"{len(aug['nme'])} augmented crops ({AUG_DRAWS} per face) of the "
                         f"{len(fit_records)} 300-W training faces the model trained on (its {HOLDOUT}-face "
                         "holdout excluded), training augmentation",
            "weights": _rel(weights), "mean_nme_fitted_on": float(aug["nme"].mean()),
            "residual_sd_ln_nme": float(np.std(np.log(model.predict_nme(aug)) - y_aug)),
            "chosen": chosen["formula"],
            "rule": "fewest fitted parameters, then strongest ridge, within one standard error of the best mean "
                    "fold Spearman on the selection folds (300-W holdout + ytf, 5 folds; per fold the mean of the "
                    "two domains' Spearman)"}
    model = dataclasses.replace(model, info=info)
    calibration = {"on": f"the {int(h.sum())} 300-W holdout faces", "ok_nme": U.FACE_OK_NME,
                   "ok_rate": float(ok.mean()), "c0": c0, "c1": c1}
    EM.save(model, model_file, {"face_calibration": calibration})
    EM.load.cache_clear()
    EM.read_document_cached.cache_clear()
    return {"weights": _rel(weights), "model_file": _rel(model_file), "error_model": model.to_dict(),
            "face_calibration": calibration, "chosen": chosen,
            "rows": sorted(rows, key=lambda r: -r["spearman_domains"]), "reference": reference}


def print_fit(out: dict) -> None:
    print(f"error model fit, weights {out['weights']}: {out['error_model']['info']['fitted_on']}")
    print("rho_dom: per fold the mean of the 300-W and the ytf Spearman (the selection score); rho: per fold, "
          "pooled; rho_h, rho_y: each domain whole")
    print(f"{'formula':48s} {'params':>6s} {'rho_dom':>7s} {'sd':>5s} {'rho':>6s} {'sd':>5s} {'hit10':>6s} "
          f"{'rho_h':>6s} {'rho_y':>6s} {'train':>6s}")
    for r in out["rows"] + out["reference"]:
        tr = f"{r['train_spearman']:.3f}" if "train_spearman" in r else ""
        print(f"{r['formula']:48s} {r.get('parameters', ''):>6} {r['spearman_domains']:7.3f} "
              f"{r['spearman_domains_sd']:5.3f} {r['spearman']:6.3f} {r['spearman_sd']:5.3f} {r['worst10_hit']:6.2f} "
              f"{r['spearman_holdout']:6.3f} {r['spearman_ytf']:6.3f} {tr:>6s}")
    m = out["error_model"]
    terms = " + ".join(f"{w:.3f} * ({f} - {mu:.3f}) / {sd:.3f}"
                       for f, w, mu, sd in zip(m["features"], m["weights"], m["mean"], m["scale"], strict=True))
    if m["kind"] == "point":
        b = np.asarray(m["landmark_bias"])
        print(f"chosen: {out['chosen']['formula']}; ln e_k = b_k + {terms} (b_k {b.min():.2f}..{b.max():.2f}, "
              f"residual sd {m['residual_sd']:.3f}); NME_hat = mean_k exp(ln e_k + sd^2 / 2)")
    else:
        print(f"chosen: {out['chosen']['formula']}; ln NME = {m['bias']:.3f} + {terms}")
    print(f"face score calibration: {out['face_calibration']}")
    print(f"wrote {out['model_file']}")


def print_selection(out: dict) -> None:
    print(f"formula selection on training data: {out['faces']} faces, {out['folds']} folds, "
          f"weights {out['weights']}; mean NME holdout {out['nme_mean']['holdout'] * 100:.2f}% "
          f"ytf {out['nme_mean']['ytf'] * 100:.2f}%")
    print(f"{'formula':44s} {'rho':>6s} {'sd':>5s} {'hit10':>6s} {'rho_h':>6s} {'rho_y':>6s} {'pt_rho':>6s}")
    for r in out["rows"]:
        pr = "" if r.get("point_spearman") is None else f"{r['point_spearman']:.3f}"
        print(f"{r['formula']:44s} {r['spearman']:6.3f} {r['spearman_sd']:5.3f} {r['worst10_hit']:6.2f} "
              f"{r['spearman_holdout']:6.3f} {r['spearman_ytf']:6.3f} {pr:>6s}")
    print(f"best simple formula: {out['best_simple']}")
    print(f"calibration: {out['calibration']}")
    print(f"log-linear fit on the whole pool: {out['loglinear_fit_all']}")
    c = out["chosen"]
    print(f"chosen: rho {c['spearman']:.3f} hit10 {c['worst10_hit']:.2f}; "
          f"quantiles {out['chosen_quantiles']}")


# ------------------------------------------------------------------------------------------- bench
BOOTSTRAP = 2000  # resamples of the faces for the 95 % intervals


def bootstrap_interval(u: np.ndarray, e: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> dict[str, list[float]]:
    """95 % percentile intervals of Spearman and of the worst-10 % hit rate over resamples of the faces."""
    rng = np.random.default_rng(seed)
    rho, hit = [], []
    for _ in range(n):
        i = rng.integers(0, len(e), len(e))
        rho.append(U.spearman(u[i], e[i]))
        hit.append(U.worst_in_most_uncertain(u[i], e[i], 0.10))
    return {"spearman": [float(v) for v in np.nanpercentile(rho, [2.5, 97.5])],
            "worst10_in_top10": [float(v) for v in np.percentile(hit, [2.5, 97.5])]}


def expected_hit10(rho: float, n: int, sims: int = 4000, seed: int = 0) -> dict[str, float]:
    """What the worst-10 % hit rate is worth at a given Spearman: faces drawn from a Gaussian copula with that
    rank correlation (Pearson 2 sin(pi rho / 6)), ``n`` faces, ``sims`` draws: mean, 5-95 % range, and the
    chance of catching at least half."""
    rng = np.random.default_rng(seed)
    r = 2.0 * np.sin(np.pi * rho / 6.0)
    hits = np.empty(sims)
    for i in range(sims):
        z = rng.standard_normal((n, 2))
        hits[i] = U.worst_in_most_uncertain(z[:, 0], r * z[:, 0] + np.sqrt(1.0 - r * r) * z[:, 1], 0.10)
    lo, hi = np.percentile(hits, [5, 95])
    return {"mean": float(hits.mean()), "p5": float(lo), "p95": float(hi),
            "p_at_least_half": float((hits >= 0.5).mean())}


def bench(weights: Path, data: Path, cache: bool, plot: Path) -> dict:
    sets = load_sets(data)
    out: dict = {"weights": _rel(weights), "sets": {}, "bootstrap": BOOTSTRAP}
    curves = {}
    runs = (("300w_val_lfpw", "lfpw", predict_records), ("ytf_train", "ytf", predict_records),
            ("300w_val_lfpw_detected", "lfpw_full", predict_detected), ("ytf_train_detected", "ytf", predict_detected))
    for name, folder, predict in runs:
        pred = predict(weights, sets[folder], cache)
        stats, e = stats_of(pred), pred["nme"]
        scores = {
            "uncertainty": U.face_uncertainty(stats),
            "previous_top25_rss_std": previous_uncertainty(stats),
            "baseline_integer_peak": baseline_uncertainty(stats),
        }
        row = {"faces": len(e), "nme_mean": float(e.mean()), "nme_median": float(np.median(e)),
               "seconds_per_face": float(pred["seconds_per_face"]),
               "path": "detector + two passes" if predict is predict_detected else "ground-truth box, one pass"}
        if "missed" in pred:
            row["missed"] = int(pred["missed"])
        for key, u in scores.items():
            rho, hit = _scores(u, e)
            k = max(1, round(len(e) * 0.1))
            row[key] = {"spearman": rho, "worst10_in_top10": hit, "worst10_found": round(hit * k), "worst10": k,
                        "interval95": bootstrap_interval(u, e)}
        chosen = row["uncertainty"]
        chosen["expected_hit10_at_this_spearman"] = expected_hit10(chosen["spearman"], len(e))
        out["sets"][name] = row
        if predict is predict_detected:
            continue
        curves[name] = {"predicted NME (chosen)": (scores["uncertainty"], e),
                        "baseline: -mean integer peak": (scores["baseline_integer_peak"], e)}
    _plot(curves, plot)
    out["plot"] = str(plot.relative_to(ROOT)) if plot.is_relative_to(ROOT) else str(plot)
    return out


def _plot(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path) -> None:
    """One column per set; rows: the chosen uncertainty, the baseline; NME against the score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    kinds = ["predicted NME (chosen)", "baseline: -mean integer peak"]
    fig = Figure(figsize=(5.0 * len(curves), 4.0 * len(kinds)), dpi=110)
    FigureCanvasAgg(fig)
    for col, (name, per_kind) in enumerate(curves.items()):
        for row, kind in enumerate(kinds):
            u, e = per_kind[kind]
            ax = fig.add_subplot(len(kinds), len(curves), row * len(curves) + col + 1)
            x = u * 100 if row == 0 else u  # the chosen score is a predicted NME: plotted in %
            ax.scatter(x, e * 100, s=6, alpha=0.5, color="tab:blue" if row == 0 else "tab:gray")
            k = max(1, round(len(e) * 0.1))
            ax.axvline(np.sort(x)[-k], color="tab:red", lw=0.8, ls="--", label="10% most uncertain")
            ax.axhline(np.sort(e)[-k] * 100, color="tab:orange", lw=0.8, ls=":", label="10% worst NME")
            if row == 0:
                lim = [min(x.min(), e.min() * 100), max(x.max(), e.max() * 100)]
                ax.plot(lim, lim, color="black", lw=0.6, alpha=0.6, label="predicted = measured")
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(ScalarFormatter())
                ax.set_xlabel("uncertainty: predicted NME (%)")
            else:
                ax.xaxis.set_major_locator(MaxNLocator(5))
                ax.set_xlabel("-mean integer-heatmap peak")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="both", which="minor", labelsize=6)
            ax.set_ylabel("NME (%)")
            hit = U.worst_in_most_uncertain(u, e, 0.10)
            ax.set_title(f"{name}, {kind}\nSpearman {U.spearman(u, e):.2f}, worst 10% in top 10%: {hit:.2f}",
                         fontsize=9)
            ax.grid(True, alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")


def print_bench(out: dict) -> None:
    print(f"uncertainty benchmark, weights {out['weights']} (sets: ground-truth boxes, one pass; *_detected: the "
          f"default detector on whole images, two passes); [95% interval over {out['bootstrap']} bootstrap resamples]")
    print(f"{'set':22s} {'faces':>5s} {'NME%':>5s} | {'score':24s} {'Spearman':>19s} {'worst 10% in top 10%':>26s}")
    labels = (("predicted NME (chosen)", "uncertainty"), ("previous: top25 rss_std", "previous_top25_rss_std"),
              ("baseline: integer peak", "baseline_integer_peak"))
    for name, s in out["sets"].items():
        for label, key in labels:
            r = s[key]
            lo, hi = r["interval95"]["spearman"]
            hlo, hhi = r["interval95"]["worst10_in_top10"]
            hit = f"{r['worst10_found']}/{r['worst10']} = {r['worst10_in_top10']:.2f} [{hlo:.2f}, {hhi:.2f}]"
            print(f"{name:22s} {s['faces']:5d} {s['nme_mean'] * 100:5.2f} | {label:24s} "
                  f"{r['spearman']:.3f} [{lo:.2f}, {hi:.2f}] {hit:>26s}")
    for name, s in out["sets"].items():
        if "missed" in s:
            print(f"{name}: the detector missed {s['missed']} of {s['faces'] + s['missed']} annotated faces")
    for name, s in out["sets"].items():
        x = s["uncertainty"]["expected_hit10_at_this_spearman"]
        print(f"{name}: at Spearman {s['uncertainty']['spearman']:.3f} a Gaussian copula of {s['faces']} faces "
              f"catches {x['mean']:.2f} of the worst 10% on average (5-95%: {x['p5']:.2f}-{x['p95']:.2f}; "
              f"at least half in {x['p_at_least_half'] * 100:.0f}% of draws)")
    print(f"plot: {out['plot']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "select", "fit"])
    p.add_argument("--weights", default=None, help="checkpoint folder (default: weights/hih_cpu_300w, "
                   "else runs/default/best)")
    p.add_argument("--data", default=None, help="data folder (default: $HIH_DATA_DIR or ../shared/data)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default=None,
                   help="JSON output (default: benchmarks/results/uncertainty[_selection].json)")
    args = p.parse_args(argv)
    data = Path(args.data) if args.data else Settings.from_env().data_dir
    if args.weights:
        weights = Path(args.weights)
    else:
        weights = next((w for w in (ROOT / "weights" / "hih_cpu_300w", ROOT / "runs" / "default" / "best")
                        if (w / "model.safetensors").is_file()), ROOT / "weights" / "hih_cpu_300w")
    if not (weights / "model.safetensors").is_file():
        print(f"no checkpoint at {weights}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.mode == "fit":
        from active_learning.error_model import MODEL_FILE

        out = fit(weights, data, not args.no_cache, MODEL_FILE)
        print_fit(out)
        target = Path(args.out) if args.out else RESULTS / "uncertainty_fit.json"
    elif args.mode == "select":
        out = select(weights, data, not args.no_cache)
        print_selection(out)
        target = Path(args.out) if args.out else RESULTS / "uncertainty_selection.json"
    else:
        out = bench(weights, data, not args.no_cache, RESULTS / "uncertainty.png")
        print_bench(out)
        target = Path(args.out) if args.out else RESULTS / "uncertainty.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
