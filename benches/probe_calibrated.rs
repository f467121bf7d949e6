//! The calibrated default trainer, side by side with scikit-learn's own way
//! of doing the same (issue 11 item 1): `LogisticRegressionCV` over the same
//! C grid and the same group folds, then `CalibratedClassifierCV(method=
//! "sigmoid")` on those folds.
//!
//! Data: the probe bench's generator (`SyntheticConfig::new(rows, dim)
//! .seed(0)`, rank-16 class subspace, separation 1.5, noise 3.0, 30 %
//! malicious), by default 2,500 × 40,960 — the first 2,000 rows train, the
//! last 500 are held out. Groups: runs of 10 consecutive training rows.
//! The matrix, the labels, the groups and the fold assignment the Rust
//! trainer used are written to `target/probe-bench-calibrated/` so that
//! `scripts/bench_probe_calibrated_sklearn.py` fits scikit-learn on the very
//! same data and folds and prints both rows (fit time, held-out AUC, ECE).
//!
//! Run (the lead times this on a quiet machine; see BENCHMARKS.md):
//! ```text
//! cargo bench --bench probe_calibrated && python3 scripts/bench_probe_calibrated_sklearn.py
//! ```
//! Smaller, to check the plumbing: `PROBE_CAL_ROWS=300 PROBE_CAL_DIM=512`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::s;
use safe_fedllm::probe::eval::{expected_calibration_error, roc_auc, stratified_group_k_fold};
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{CalibratedParams, Trainer};

const GRID: [f64; 5] = [0.01, 0.1, 1.0, 10.0, 100.0];
const FOLDS: usize = 5;
const GROUP_SIZE: usize = 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful either way: always run once.
    let rows = env_usize("PROBE_CAL_ROWS", 2_500);
    let dim = env_usize("PROBE_CAL_DIM", 40_960);
    let train = rows * 4 / 5;
    let (x, labels) = SyntheticConfig::new(rows, dim).seed(0).generate().unwrap();
    let groups: Vec<usize> = (0..train).map(|i| i / GROUP_SIZE).collect();
    let train_x = x.slice(s![..train, ..]);
    let (train_y, test_y) = labels.split_at(train);

    let trainer = CalibratedParams::default()
        .c_grid(GRID.to_vec())
        .folds(FOLDS)
        .seed(0);
    let start = Instant::now();
    let model = trainer
        .fit_grouped(train_x, train_y, Some(&groups))
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let held_out = model.probabilities(x.slice(s![train.., ..])).unwrap();
    let auc = roc_auc(&held_out, test_y).unwrap();
    let ece = expected_calibration_error(&held_out, test_y, 10).unwrap();
    let report = model.calibration.as_ref().unwrap();
    eprintln!(
        "rust calibrated: {rows}x{dim} (train {train}), fit {seconds:.3} s, C {}, {} fits, {} iterations, \
         held-out AUC {auc:.4}, ECE {ece:.4} (OOF ECE {:.4}, uncalibrated {:.4})",
        report.c, report.fits, report.iterations, report.oof_ece, report.oof_ece_uncalibrated
    );

    // The folds the trainer used (same function, same seed).
    let folds = stratified_group_k_fold(train_y, &groups, FOLDS, 0).unwrap();
    let mut fold_of = vec![0usize; train];
    for (f, fold) in folds.iter().enumerate() {
        for &i in &fold.test {
            fold_of[i] = f;
        }
    }

    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let dir = target.join("probe-bench-calibrated");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("x.f32")).unwrap());
    for v in x.iter() {
        file.write_all(&v.to_le_bytes()).unwrap();
    }
    file.flush().unwrap();
    let meta = serde_json::json!({
        "rows": rows, "cols": dim, "train_rows": train,
        "labels": labels.iter().map(|l| u8::from(l.is_malicious())).collect::<Vec<_>>(),
        "groups": groups, "fold_of": fold_of, "c_grid": GRID, "folds": FOLDS,
        "generator": format!("safe_fedllm::probe::synthetic::SyntheticConfig::new({rows}, {dim}).seed(0)"),
        "rust": {
            "fit_seconds": seconds, "held_out_auc": auc, "held_out_ece": ece, "c": report.c,
            "fits": report.fits, "iterations": report.iterations,
            "platt": report.platt, "held_out_scores": held_out,
        },
    });
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
}
