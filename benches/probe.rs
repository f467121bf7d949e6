//! LoRA-Probe training and scoring.
//!
//! Training: the synthetic generator of `safe_fedllm::probe::synthetic`
//! (rank-16 class subspace, separation 1.5, noise 3.0, L2-normalised rows,
//! 30 % malicious) at 2,500 × 40,960 f32 — the width of a Llama-3.1-8B
//! `first_layer_b` feature vector. The first 2,000 rows train, the last 500
//! are held out. The matrix is also written to `target/probe-bench/` so
//! `scripts/bench_probe_sklearn.py` times scikit-learn on the very same data.
//!
//! Scoring: a trained-shape probe on Llama-3.1-8B-shaped adapters (32 layers,
//! q_proj 4096→4096, v_proj 4096→1024, r = 8), straight from safetensors bytes
//! (parse, ΔLoRA against the base, features, logit): `first_layer_b`
//! (40,960 features) and `all_layers` (3,407,872 features), plus the sketch
//! projection of one `all_layers` vector.
//!
//! Run (see BENCHMARKS.md):
//! `cargo bench --bench probe -- --warm-up-time 1 --measurement-time 5`
//! With `--features linfa` and `PROBE_BENCH_LINFA=1` it also fits linfa-logistic
//! and linfa-svm once each (minutes) and reports their time and AUC.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use common::{llama8b_adapter, values};
use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::{Array2, ArrayView2, s};
use safe_fedllm::features::{FeatureConfig, FeatureSpec, Selection};
use safe_fedllm::lora::{AdapterView, LazyDelta, LoraDelta, StorageDtype};
use safe_fedllm::probe::eval::roc_auc;
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{
    EarlyStopping, Label, LinearProbe, LogisticParams, Probe, SketchConfig, Trainer,
};

const ROWS: usize = 2_500;
const TRAIN: usize = 2_000;
const DIM: usize = 40_960;

fn out_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("probe-bench")
}

/// Writes `x.f32` (row-major little-endian) and `meta.json` for the Python peer.
fn write_dataset(x: &Array2<f32>, labels: &[Label]) {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("x.f32")).unwrap());
    for v in x.iter() {
        file.write_all(&v.to_le_bytes()).unwrap();
    }
    let meta = serde_json::json!({
        "rows": x.nrows(), "cols": x.ncols(), "train_rows": TRAIN,
        "labels": labels.iter().map(|l| u8::from(l.is_malicious())).collect::<Vec<_>>(),
        "generator": "safe_fedllm::probe::synthetic::SyntheticConfig::new(2500, 40960).seed(0)",
    });
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
}

/// Fits once outside criterion to report iterations and held-out AUC.
fn report_fit(
    name: &str,
    trainer: &impl Trainer,
    data: &Split<'_>,
    results: &mut serde_json::Map<String, serde_json::Value>,
) {
    let start = Instant::now();
    let model = trainer.fit(data.train_x, data.train_y).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let scores = model.probabilities(data.test_x).unwrap();
    let auc = roc_auc(&scores, data.test_y).unwrap();
    eprintln!(
        "{name}: held-out AUC {auc:.4}, {} iterations, {} evaluations, stop {:?}, single fit {seconds:.3} s",
        model.report.iterations, model.report.evaluations, model.report.stop
    );
    results.insert(
        name.to_owned(),
        serde_json::json!({"auc": auc, "single_fit_seconds": seconds, "iterations": model.report.iterations,
                           "evaluations": model.report.evaluations, "held_out_scores": scores}),
    );
}

struct Split<'a> {
    train_x: ArrayView2<'a, f32>,
    train_y: &'a [Label],
    test_x: ArrayView2<'a, f32>,
    test_y: &'a [Label],
}

fn bench_training(c: &mut Criterion) {
    let (x, labels) = SyntheticConfig::new(ROWS, DIM).seed(0).generate().unwrap();
    write_dataset(&x, &labels);
    let (train_y, test_y) = labels.split_at(TRAIN);
    let data = Split {
        train_x: x.slice(s![..TRAIN, ..]),
        train_y,
        test_x: x.slice(s![TRAIN.., ..]),
        test_y,
    };
    let default = LogisticParams::default();
    let early = LogisticParams::default().early_stopping(EarlyStopping::Validation {
        fraction: 0.1,
        patience: 3,
        seed: 0,
    });
    let mut results = serde_json::Map::new();
    report_fit("logistic-lbfgs", &default, &data, &mut results);
    report_fit("logistic-lbfgs-early-stopping", &early, &data, &mut results);
    #[cfg(feature = "linfa")]
    if std::env::var_os("PROBE_BENCH_LINFA").is_some() {
        report_fit(
            "linfa-logistic",
            &safe_fedllm::probe::LinfaLogistic::default(),
            &data,
            &mut results,
        );
        report_fit(
            "linfa-svm",
            &safe_fedllm::probe::LinfaSvm::default(),
            &data,
            &mut results,
        );
    }
    std::fs::write(
        out_dir().join("rust_results.json"),
        serde_json::Value::Object(results).to_string(),
    )
    .unwrap();

    let mut group = c.benchmark_group("probe_train_2000x40960");
    group.sample_size(10);
    group.bench_function("logistic-lbfgs", |b| {
        b.iter(|| default.fit(black_box(data.train_x), data.train_y).unwrap())
    });
    group.bench_function("logistic-lbfgs-early-stopping", |b| {
        b.iter(|| early.fit(black_box(data.train_x), data.train_y).unwrap())
    });
    group.finish();
}

fn probe_for(spec: FeatureSpec) -> LinearProbe {
    let weights = values(99, spec.dim(), 2.0);
    LinearProbe::new(spec, weights, -0.1).unwrap()
}

fn score_bytes(probe: &LinearProbe, bytes: &[u8], base: &AdapterView<'_>) -> f32 {
    let view = AdapterView::parse(bytes).unwrap();
    let delta = LazyDelta::new(&view, base).unwrap();
    probe.score(&delta).unwrap()
}

fn bench_scoring(c: &mut Criterion) {
    let base = llama8b_adapter(1);
    let update = llama8b_adapter(2);
    let delta = LoraDelta::between(&update, &base).unwrap();
    let base_bytes = base.to_bytes(StorageDtype::Bf16).unwrap();
    let base_view = AdapterView::parse(&base_bytes).unwrap();
    let mut group = c.benchmark_group("probe_score_llama8b");
    group.sample_size(20);
    for dtype in [StorageDtype::F32, StorageDtype::Bf16] {
        let bytes = update.to_bytes(dtype).unwrap();
        for selection in [Selection::FirstLayerB, Selection::AllLayers] {
            let probe = probe_for(
                FeatureConfig::new(selection.clone())
                    .fit(&[&delta])
                    .unwrap(),
            );
            group.bench_function(format!("{selection}/{dtype:?}"), |b| {
                b.iter(|| score_bytes(&probe, black_box(&bytes), &base_view))
            });
        }
    }
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(&[&delta])
        .unwrap();
    let features = spec.transform(&delta).unwrap().values;
    let sketch = SketchConfig::default().build(spec.dim()).unwrap();
    let mut out = vec![0.0f32; sketch.output_dim()];
    group.bench_function("sketch_project_all_layers_to_32768", |b| {
        b.iter(|| sketch.project(black_box(&features), &mut out).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_training, bench_scoring);
criterion_main!(benches);
