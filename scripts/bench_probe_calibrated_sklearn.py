#!/usr/bin/env python3
"""scikit-learn peer for the calibrated probe trainer (issue 11 item 1).

Reads what `cargo bench --bench probe_calibrated` writes to
target/probe-bench-calibrated/ (by default 2,500 x 40,960 f32 rows from the
probe bench's generator; the first 2,000 train, the last 500 are held out;
groups are runs of 10 consecutive training rows) and does scikit-learn's own
version of the crate's calibrated default:

  1. LogisticRegressionCV(Cs=<same grid>, cv=<same group folds>,
     class_weight="balanced", solver="lbfgs", scoring="neg_log_loss",
     tol=1e-4, max_iter=100)  -- C by group k-fold, refit on all rows;
  2. CalibratedClassifierCV(LogisticRegression(C=<chosen C>, same settings),
     method="sigmoid", cv=<same group folds>, ensemble=False)  -- Platt
     scaling on out-of-fold decision values, then a final refit.

The folds are, by default, exactly the ones the Rust trainer used
(`fold_of` in meta.json, from `stratified_group_k_fold`); `--folds
groupkfold` uses scikit-learn's GroupKFold on the same groups instead.
Prints fit time, chosen C, held-out ROC AUC and ECE (10 equal-width bins)
for both, from one run.

Usage: python3 scripts/bench_probe_calibrated_sklearn.py [--repeats 3]
       [--target-dir target] [--folds rust|groupkfold]
"""
import argparse
import json
import os
import statistics
import time
import warnings

import numpy as np
import sklearn
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold


def ece(scores, labels, bins=10):
    """Expected calibration error, equal-width bins, last bin closed (as the crate)."""
    index = np.minimum((scores * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        mask = index == k
        if mask.any():
            total += mask.mean() * abs(scores[mask].mean() - labels[mask].mean())
    return total


def main():
    # LogisticRegressionCV's attribute-layout deprecation notice (sklearn >= 1.8) is noise here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    parser.add_argument("--folds", choices=["rust", "groupkfold"], default="rust")
    args = parser.parse_args()
    out = os.path.join(args.target_dir, "probe-bench-calibrated")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    x = np.fromfile(os.path.join(out, "x.f32"), dtype="<f4").reshape(meta["rows"], meta["cols"])
    y = np.array(meta["labels"], dtype=np.int64)
    n = meta["train_rows"]
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]
    groups = np.array(meta["groups"])
    grid = meta["c_grid"]
    if args.folds == "rust":
        fold_of = np.array(meta["fold_of"])
        splits = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(meta["folds"])]
    else:
        splits = list(GroupKFold(n_splits=meta["folds"]).split(x_train, y_train, groups))
    for train_idx, test_idx in splits:
        assert not set(groups[train_idx]) & set(groups[test_idx]), "a group straddles folds"

    settings = dict(class_weight="balanced", solver="lbfgs", tol=1e-4, max_iter=100)
    times, model, chosen = [], None, None
    for _ in range(args.repeats):
        start = time.perf_counter()
        cv = LogisticRegressionCV(Cs=grid, cv=splits, scoring="neg_log_loss", refit=True, **settings)
        cv.fit(x_train, y_train)
        chosen = float(cv.C_[0])
        model = CalibratedClassifierCV(
            LogisticRegression(C=chosen, **settings), method="sigmoid", cv=splits, ensemble=False
        )
        model.fit(x_train, y_train)
        times.append(time.perf_counter() - start)
    proba = model.predict_proba(x_test)[:, 1]
    sk = dict(seconds=statistics.median(times), c=chosen, auc=roc_auc_score(y_test, proba), ece=ece(proba, y_test))

    rust = meta["rust"]
    rust_scores = np.array(rust["held_out_scores"])
    rs = dict(seconds=rust["fit_seconds"], c=rust["c"], auc=roc_auc_score(y_test, rust_scores), ece=ece(rust_scores, y_test))
    print(f"scikit-learn {sklearn.__version__}, numpy {np.__version__}; train {x_train.shape}, held out {x_test.shape}; "
          f"grid {grid}, {len(splits)} group folds ({args.folds}), {len(set(groups))} groups")
    print(f"{'trainer':44} {'fit s':>8} {'vs sklearn':>10} {'C':>7} {'held-out AUC':>13} {'held-out ECE':>13}")
    rows = [("scikit-learn LRCV + CalibratedClassifierCV", sk),
            ("safe-fedllm CalibratedParams (single fit)", rs)]
    for name, r in rows:
        print(f"{name:44} {r['seconds']:8.3f} {r['seconds'] / sk['seconds']:9.2f}x {r['c']:7g} {r['auc']:13.4f} {r['ece']:13.4f}")
    print(f"scikit-learn: median of {args.repeats} fits; Rust: one fit timed inside the bench. "
          f"max |P_rust - P_sklearn| on held-out rows: {np.max(np.abs(rust_scores - proba)):.2e}")


if __name__ == "__main__":
    main()
