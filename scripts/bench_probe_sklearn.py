#!/usr/bin/env python3
"""scikit-learn peer for the probe training benchmark (issue #3).

Reads the matrix that `cargo bench --bench probe` writes to
target/probe-bench/ (2,500 x 40,960 f32, L2-normalised rows; first 2,000 rows
train, last 500 held out), fits scikit-learn's LogisticRegression with the
objective of the crate's plain trainer, LogisticParams::default() (lbfgs, C=1, class_weight="balanced",
tol=1e-4, max_iter=100), and prints its median fit time and held-out ROC AUC
next to the Rust figures of the same run (criterion's median from
target/criterion, AUC and held-out scores from target/probe-bench/rust_results.json).

Usage: python3 scripts/bench_probe_sklearn.py [--repeats 7] [--target-dir target]
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def rust_median_seconds(target, bench_id):
    path = os.path.join(target, "criterion", "probe_train_2000x40960", bench_id, "new", "estimates.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", "target"))
    args = parser.parse_args()
    out = os.path.join(args.target_dir, "probe-bench")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    x = np.fromfile(os.path.join(out, "x.f32"), dtype="<f4").reshape(meta["rows"], meta["cols"])
    y = np.array(meta["labels"], dtype=np.int64)
    n = meta["train_rows"]
    x_train, y_train, x_test, y_test = x[:n], y[:n], x[n:], y[n:]

    times = []
    model = None
    for _ in range(args.repeats):
        model = LogisticRegression(C=1.0, class_weight="balanced", solver="lbfgs", tol=1e-4, max_iter=100)
        start = time.perf_counter()
        model.fit(x_train, y_train)
        times.append(time.perf_counter() - start)
    proba = model.predict_proba(x_test)[:, 1]
    sk_auc = roc_auc_score(y_test, proba)
    sk_median = statistics.median(times)

    with open(os.path.join(out, "rust_results.json")) as f:
        rust = json.load(f)
    rows = [("scikit-learn lbfgs", sk_median, sk_auc, int(model.n_iter_[0]))]
    for name in ["logistic-lbfgs", "logistic-lbfgs-early-stopping", "linfa-logistic", "linfa-svm"]:
        if name in rust:
            median = rust_median_seconds(args.target_dir, name) or rust[name]["single_fit_seconds"]
            rows.append((name, median, rust[name]["auc"], rust[name]["iterations"]))
    print(f"scikit-learn {sklearn.__version__}, numpy {np.__version__}; train {x_train.shape}, held out {x_test.shape}")
    print(f"{'trainer':32} {'median s':>9} {'vs sklearn':>10} {'held-out AUC':>13} {'ΔAUC':>8} {'iters':>6}")
    for name, seconds, auc, iters in rows:
        print(f"{name:32} {seconds:9.3f} {seconds / sk_median:9.2f}x {auc:13.4f} {auc - sk_auc:+8.4f} {iters:6d}")
    rust_scores = np.array(rust["logistic-lbfgs"]["held_out_scores"])
    print(f"max |P_rust - P_sklearn| on held-out rows: {np.max(np.abs(rust_scores - proba)):.2e}")


if __name__ == "__main__":
    main()
