//! LoRA-Probe behaviour: class imbalance, thresholds, persistence, sketch,
//! manifests, evaluation helpers and every error path.

use std::path::{Path, PathBuf};

use ndarray::Array2;
use safe_fedllm::Error;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor, StorageDtype};
use safe_fedllm::probe::eval::{
    Confusion, Evaluation, ThresholdRule, cross_validate, roc_auc, select_threshold,
    stratified_k_fold,
};
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{
    ClassWeight, EarlyStopping, Label, LinearProbe, LogisticParams, Manifest, Probe, ProbeBuilder,
    SketchConfig, StopReason, Trainer,
};

const KEY_Q: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const KEY_V: &str = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";

/// A delta whose first-layer-B features are `values` (split over q and v).
fn delta(values: &[f32]) -> LoraDelta {
    let half = values.len() / 2;
    let mut adapter = LoraAdapter::new();
    adapter
        .insert(
            KEY_Q,
            LoraTensor::new("q", [half, 1], values[..half].to_vec()).unwrap(),
        )
        .unwrap();
    adapter
        .insert(
            KEY_V,
            LoraTensor::new("v", [values.len() - half, 1], values[half..].to_vec()).unwrap(),
        )
        .unwrap();
    LoraDelta::from_adapter(adapter)
}

fn deltas_of(x: &Array2<f32>) -> Vec<LoraDelta> {
    x.rows().into_iter().map(|r| delta(&r.to_vec())).collect()
}

fn data(n: usize, d: usize, malicious_fraction: f64, seed: u64) -> (Array2<f32>, Vec<Label>) {
    SyntheticConfig::new(n, d)
        .separation(3.0)
        .noise(1.0)
        .rank(4)
        .malicious_fraction(malicious_fraction)
        .seed(seed)
        .generate()
        .unwrap()
}

fn trained_probe() -> (LinearProbe, Vec<LoraDelta>, Vec<Label>) {
    let (x, labels) = data(80, 16, 0.3, 1);
    let deltas = deltas_of(&x);
    let probe = ProbeBuilder::new(LogisticParams::default().c(10.0))
        .fit(&deltas, &labels)
        .unwrap();
    (probe, deltas, labels)
}

fn mean_score(scores: &[f32], labels: &[Label], class: Label) -> f32 {
    let picked: Vec<f32> = scores
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l == class)
        .map(|(s, _)| *s)
        .collect();
    picked.iter().sum::<f32>() / picked.len() as f32
}

// ---------------------------------------------------------------- imbalance

#[test]
fn scores_are_p_malicious_with_one_malicious_in_ten() {
    let (x, labels) = data(100, 16, 0.1, 2);
    let malicious = labels.iter().filter(|l| l.is_malicious()).count();
    assert!(
        malicious * 4 < labels.len(),
        "{malicious} malicious of {}",
        labels.len()
    );
    let model = LogisticParams::default()
        .c(10.0)
        .fit(x.view(), &labels)
        .unwrap();
    let scores = model.probabilities(x.view()).unwrap();
    assert!(mean_score(&scores, &labels, Label::Malicious) > 0.7);
    assert!(mean_score(&scores, &labels, Label::Benign) < 0.3);
    assert!(roc_auc(&scores, &labels).unwrap() > 0.95);
}

#[test]
fn scores_are_p_malicious_with_nine_malicious_in_ten() {
    let (x, labels) = data(100, 16, 0.9, 3);
    let benign = labels.iter().filter(|l| !l.is_malicious()).count();
    assert!(benign * 4 < labels.len());
    let model = LogisticParams::default()
        .c(10.0)
        .fit(x.view(), &labels)
        .unwrap();
    let scores = model.probabilities(x.view()).unwrap();
    assert!(mean_score(&scores, &labels, Label::Malicious) > 0.7);
    assert!(mean_score(&scores, &labels, Label::Benign) < 0.3);
}

#[test]
fn balanced_weights_flag_more_rare_malicious_samples_than_uniform() {
    let (x, labels) = SyntheticConfig::new(200, 16)
        .separation(0.8)
        .noise(2.0)
        .rank(4)
        .malicious_fraction(0.1)
        .seed(4)
        .generate()
        .unwrap();
    let recall = |weight| {
        let model = LogisticParams::default()
            .class_weight(weight)
            .fit(x.view(), &labels)
            .unwrap();
        let scores = model.probabilities(x.view()).unwrap();
        Confusion::at(&scores, &labels, 0.5).unwrap().recall()
    };
    assert!(recall(ClassWeight::Balanced) > recall(ClassWeight::Uniform));
}

// ---------------------------------------------------------------- threshold

#[test]
fn default_threshold_is_point_eight_and_decides_harmful() {
    let (probe, deltas, _) = trained_probe();
    assert_eq!(probe.threshold(), 0.8);
    assert!(probe.is_harmful(0.8));
    assert!(!probe.is_harmful(0.799_999));
    let probe = probe.with_threshold(0.3).unwrap();
    let score = probe.score(&deltas[0]).unwrap();
    assert_eq!(probe.is_harmful(score), score >= 0.3);
}

#[test]
fn builder_threshold_is_carried_and_checked() {
    let (x, labels) = data(40, 8, 0.3, 5);
    let deltas = deltas_of(&x);
    let probe = ProbeBuilder::new(LogisticParams::default())
        .threshold(0.65)
        .fit(&deltas, &labels)
        .unwrap();
    assert_eq!(probe.threshold(), 0.65);
    for bad in [1.5, -0.1, f32::NAN] {
        let err = ProbeBuilder::new(LogisticParams::default())
            .threshold(bad)
            .fit(&deltas, &labels)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidParameter {
                    name: "threshold",
                    ..
                }
            ),
            "{bad}: {err}"
        );
        assert!(matches!(
            probe.clone().with_threshold(bad),
            Err(Error::InvalidParameter { .. })
        ));
    }
}

#[test]
fn max_f1_threshold_separates_separable_scores() {
    let scores = [0.1, 0.2, 0.3, 0.7, 0.9];
    let y = [
        Label::Benign,
        Label::Benign,
        Label::Benign,
        Label::Malicious,
        Label::Malicious,
    ];
    let choice = select_threshold(&scores, &y, ThresholdRule::MaxF1).unwrap();
    assert_eq!(choice.threshold, 0.7);
    assert_eq!(choice.confusion.f1(), 1.0);
}

#[test]
fn target_fpr_threshold_respects_the_budget() {
    let scores = [0.1, 0.5, 0.6, 0.4, 0.8, 0.9];
    let y = [
        Label::Benign,
        Label::Benign,
        Label::Benign,
        Label::Malicious,
        Label::Malicious,
        Label::Malicious,
    ];
    let zero = select_threshold(&scores, &y, ThresholdRule::TargetFalsePositiveRate(0.0)).unwrap();
    assert_eq!(zero.threshold, 0.8);
    assert_eq!(zero.confusion.false_positives, 0);
    let third = select_threshold(
        &scores,
        &y,
        ThresholdRule::TargetFalsePositiveRate(1.0 / 3.0),
    )
    .unwrap();
    assert_eq!(third.threshold, 0.6);
    assert!(third.confusion.false_positive_rate() <= 1.0 / 3.0);
    let err =
        select_threshold(&scores, &y, ThresholdRule::TargetFalsePositiveRate(1.5)).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }));
}

// ---------------------------------------------------------------- persistence

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("safe-fedllm-probe-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn save_and_load_give_bit_identical_scores() {
    let (probe, deltas, _) = trained_probe();
    let path = temp_dir("roundtrip").join("probe.safetensors");
    probe.save(&path).unwrap();
    let loaded = LinearProbe::load(&path).unwrap();
    assert_eq!(loaded, probe);
    for d in &deltas {
        assert_eq!(
            probe.score(d).unwrap().to_bits(),
            loaded.score(d).unwrap().to_bits()
        );
    }
    assert_eq!(loaded.info().trainer.name, "logistic-lbfgs");
    assert_eq!(loaded.info().training.samples, deltas.len());
    assert!(loaded.info().fit.stop.converged());
}

#[test]
fn metadata_is_plain_json_in_the_safetensors_header() {
    let (probe, _, _) = trained_probe();
    let bytes = probe.to_bytes().unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &header.metadata().as_ref().unwrap()["safe_fedllm.probe"];
    let meta: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(meta["format"], "safe-fedllm-linear-probe");
    assert_eq!(meta["crate_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta["threshold"].as_f64(), Some(0.8));
    assert_eq!(meta["feature_spec"]["dim"], 16);
}

/// Rewrites a saved probe's metadata JSON with `edit`.
fn with_metadata(probe: &LinearProbe, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let bytes = probe.to_bytes().unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["safe_fedllm.probe"]).unwrap();
    edit(&mut meta);
    let weights: Vec<u8> = probe
        .weights()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let bias = probe.bias().to_le_bytes();
    tensors_with(meta.to_string(), &weights, probe.weights().len(), &bias)
}

fn tensors_with(meta: String, weights: &[u8], len: usize, bias: &[u8]) -> Vec<u8> {
    use safetensors::{Dtype, tensor::TensorView};
    let w = TensorView::new(Dtype::F32, vec![len], weights).unwrap();
    let b = TensorView::new(Dtype::F32, vec![1], bias).unwrap();
    let meta = std::collections::HashMap::from([("safe_fedllm.probe".to_owned(), meta)]);
    safetensors::serialize([("weight", w), ("bias", b)], Some(meta)).unwrap()
}

#[test]
fn load_rejects_wrong_format_and_version() {
    let (probe, _, _) = trained_probe();
    let bytes = with_metadata(&probe, |m| m["format"] = "something-else".into());
    assert!(
        matches!(LinearProbe::from_bytes(&bytes), Err(Error::InvalidMetadata { field, .. }) if field == "format")
    );
    let bytes = with_metadata(&probe, |m| m["format_version"] = 2.into());
    assert!(
        matches!(LinearProbe::from_bytes(&bytes), Err(Error::InvalidMetadata { field, .. }) if field == "format_version")
    );
    let bytes = with_metadata(&probe, |m| m["unexpected"] = 1.into());
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::InvalidMetadata { .. })
    ));
}

#[test]
fn load_rejects_bad_threshold_and_inconsistent_layout() {
    let (probe, _, _) = trained_probe();
    let bytes = with_metadata(&probe, |m| m["threshold"] = 1.5.into());
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::InvalidParameter {
            name: "threshold",
            ..
        })
    ));
    // A spec whose dim disagrees with its own layout is refused while the
    // spec is read, before the weights are compared with it.
    let bytes = with_metadata(&probe, |m| m["feature_spec"]["dim"] = 17.into());
    let err = LinearProbe::from_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidMetadata { reason, .. } if reason.contains("blocks hold")),
        "{err:?}"
    );
    let bytes = with_metadata(&probe, |m| {
        m["feature_spec"]["layout"][1]["offset"] = 3.into()
    });
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::InvalidMetadata { .. })
    ));
}

#[test]
fn load_rejects_weights_that_do_not_fit() {
    let (probe, _, _) = trained_probe();
    let meta = {
        let bytes = probe.to_bytes().unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        header.metadata().as_ref().unwrap()["safe_fedllm.probe"].clone()
    };
    let short: Vec<u8> = probe.weights()[..15]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let bytes = tensors_with(meta.clone(), &short, 15, &probe.bias().to_le_bytes());
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan: Vec<u8> = probe
        .weights()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bytes = tensors_with(meta.clone(), &nan, 16, &probe.bias().to_le_bytes());
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::NonFiniteFeature { column: 0, .. })
    ));
    let weights: Vec<u8> = probe
        .weights()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let bytes = tensors_with(meta, &weights, 16, &f32::INFINITY.to_le_bytes());
    assert!(matches!(
        LinearProbe::from_bytes(&bytes),
        Err(Error::InvalidParameter { name: "bias", .. })
    ));
}

#[test]
fn load_rejects_missing_metadata_garbage_and_missing_files() {
    let (probe, _, _) = trained_probe();
    let adapter_bytes = deltas_of(&data(4, 8, 0.5, 9).0)[0]
        .as_adapter()
        .to_bytes(StorageDtype::F32)
        .unwrap();
    assert!(matches!(
        LinearProbe::from_bytes(&adapter_bytes),
        Err(Error::MissingKey { .. })
    ));
    assert!(matches!(
        LinearProbe::from_bytes(b"not safetensors"),
        Err(Error::Malformed(_))
    ));
    let missing = temp_dir("missing").join("nope.safetensors");
    assert!(matches!(LinearProbe::load(&missing), Err(Error::Io { .. })));
    let bad = temp_dir("bad").join("bad.safetensors");
    std::fs::write(&bad, &probe.to_bytes().unwrap()[..40]).unwrap();
    let err = LinearProbe::load(&bad).unwrap_err();
    assert!(matches!(&err, Error::InFile { path, .. } if path == &bad));
    assert!(matches!(err.root(), Error::Malformed(_)));
}

// ---------------------------------------------------------------- scoring errors

#[test]
fn scoring_a_delta_that_does_not_fit_the_spec_fails() {
    let (probe, _, _) = trained_probe();
    let wrong_shape = delta(&[0.5; 10]);
    assert!(matches!(
        probe.score(&wrong_shape),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut nan = vec![0.1f32; 16];
    nan[3] = f32::NAN;
    assert!(matches!(
        probe.score(&delta(&nan)),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        probe.score_features(&[0.0; 3]),
        Err(Error::DimensionMismatch {
            expected: 16,
            found: 3,
            ..
        })
    ));
    let mut features = vec![0.0f32; 16];
    features[5] = f32::INFINITY;
    assert!(matches!(
        probe.score_features(&features),
        Err(Error::NonFiniteFeature { column: 5, .. })
    ));
}

#[test]
fn batch_scores_equal_single_scores() {
    let (probe, deltas, _) = trained_probe();
    let batch = probe.score_batch(&deltas).unwrap();
    for (d, s) in deltas.iter().zip(&batch) {
        assert_eq!(probe.score(d).unwrap().to_bits(), s.to_bits());
    }
    let spec = probe.feature_spec().clone();
    let (x, _) = spec.transform_batch(&deltas).unwrap();
    assert_eq!(probe.score_matrix(x.view()).unwrap(), batch);
}

#[test]
fn hand_built_probes_are_validated() {
    let (probe, _, _) = trained_probe();
    let spec = probe.feature_spec().clone();
    assert!(matches!(
        LinearProbe::new(spec.clone(), vec![0.0; 3], 0.0),
        Err(Error::DimensionMismatch { .. })
    ));
    let mut w = vec![0.0; 16];
    w[2] = f32::NAN;
    assert!(matches!(
        LinearProbe::new(spec.clone(), w, 0.0),
        Err(Error::NonFiniteFeature { column: 2, .. })
    ));
    assert!(matches!(
        LinearProbe::new(spec, vec![0.0; 16], f32::NAN),
        Err(Error::InvalidParameter { name: "bias", .. })
    ));
}

// ---------------------------------------------------------------- trainer errors

#[test]
fn every_invalid_setting_fails_at_fit_with_its_name() {
    let (x, y) = data(20, 4, 0.5, 6);
    let cases: Vec<(LogisticParams, &str)> = vec![
        (LogisticParams::default().c(0.0), "c"),
        (LogisticParams::default().c(f64::NAN), "c"),
        (LogisticParams::default().tolerance(-1.0), "tolerance"),
        (
            LogisticParams::default().max_iterations(0),
            "max_iterations",
        ),
        (LogisticParams::default().memory(0), "memory"),
        (LogisticParams::default().threads(5000), "threads"),
        (
            LogisticParams::default().class_weight(ClassWeight::Custom {
                benign: 1.0,
                malicious: -2.0,
            }),
            "class_weight",
        ),
        (
            LogisticParams::default().early_stopping(EarlyStopping::Validation {
                fraction: 0.9,
                patience: 3,
                seed: 0,
            }),
            "early_stopping.fraction",
        ),
        (
            LogisticParams::default().early_stopping(EarlyStopping::Validation {
                fraction: 0.1,
                patience: 0,
                seed: 0,
            }),
            "early_stopping.patience",
        ),
    ];
    for (params, expected) in cases {
        match params.fit(x.view(), &y) {
            Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, expected),
            other => panic!("{expected}: {other:?}"),
        }
    }
}

#[test]
fn bad_training_data_is_rejected() {
    let (x, y) = data(20, 4, 0.5, 7);
    let trainer = LogisticParams::default();
    assert!(matches!(
        trainer.fit(x.view(), &y[..19]),
        Err(Error::LengthMismatch {
            expected: 20,
            found: 19,
            ..
        })
    ));
    let benign = vec![Label::Benign; 20];
    assert!(matches!(
        trainer.fit(x.view(), &benign),
        Err(Error::MissingClass {
            missing: "malicious",
            ..
        })
    ));
    let malicious = vec![Label::Malicious; 20];
    assert!(matches!(
        trainer.fit(x.view(), &malicious),
        Err(Error::MissingClass {
            missing: "benign",
            ..
        })
    ));
    let mut bad = x.clone();
    bad[[7, 2]] = f32::NAN;
    assert!(matches!(
        trainer.fit(bad.view(), &y),
        Err(Error::NonFiniteFeature {
            row: 7,
            column: 2,
            ..
        })
    ));
    let empty = Array2::<f32>::zeros((0, 4));
    assert!(matches!(
        trainer.fit(empty.view(), &[]),
        Err(Error::Empty { .. })
    ));
    let deltas = deltas_of(&x);
    assert!(matches!(
        ProbeBuilder::new(trainer).fit(&deltas, &y[..3]),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn early_stopping_keeps_a_good_iterate() {
    let (x, y) = data(120, 16, 0.3, 8);
    let params = LogisticParams::default()
        .c(1e4)
        .early_stopping(EarlyStopping::Validation {
            fraction: 0.2,
            patience: 2,
            seed: 1,
        });
    let model = params.fit(x.view(), &y).unwrap();
    assert!(model.report.validation_loss.is_some());
    let scores = model.probabilities(x.view()).unwrap();
    assert!(roc_auc(&scores, &y).unwrap() > 0.95);
    let full = LogisticParams::default()
        .c(1e4)
        .max_iterations(3)
        .fit(x.view(), &y)
        .unwrap();
    assert_eq!(full.report.stop, StopReason::MaxIterations);
}

#[test]
fn thread_count_does_not_change_the_model_beyond_rounding() {
    let (x, y) = data(64, 32, 0.4, 10);
    let one = LogisticParams::default()
        .threads(1)
        .tolerance(1e-8)
        .fit(x.view(), &y)
        .unwrap();
    let three = LogisticParams::default()
        .threads(3)
        .tolerance(1e-8)
        .fit(x.view(), &y)
        .unwrap();
    for (a, b) in one.weights.iter().zip(&three.weights) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

// ---------------------------------------------------------------- sketch

#[test]
fn sketched_probe_scores_raw_features_like_the_sketched_model() {
    let (x, y) = data(120, 400, 0.3, 11);
    let deltas = deltas_of(&x);
    let sketch = SketchConfig::new(128, 5).nnz_per_column(2);
    let probe = ProbeBuilder::new(LogisticParams::default().c(10.0))
        .features(FeatureConfig::new(Selection::AllLayers))
        .sketch(sketch)
        .fit(&deltas, &y)
        .unwrap();
    assert_eq!(probe.weights().len(), 400);
    assert_eq!(probe.info().sketch, Some(sketch));
    assert_eq!(probe.info().training.trained_dim, 128);
    let scores = probe.score_batch(&deltas).unwrap();
    assert!(roc_auc(&scores, &y).unwrap() > 0.95);

    // The lifted weights reproduce the sketched model on projected rows.
    let built = sketch.build(400).unwrap();
    let mut projected = vec![0.0f32; 128];
    let model = LogisticParams::default()
        .c(10.0)
        .fit(
            {
                let mut px = Array2::<f32>::zeros((120, 128));
                for (mut row, src) in px.rows_mut().into_iter().zip(x.rows()) {
                    built
                        .project(&src.to_vec(), row.as_slice_mut().unwrap())
                        .unwrap();
                }
                px
            }
            .view(),
            &y,
        )
        .unwrap();
    built.project(&x.row(0).to_vec(), &mut projected).unwrap();
    let direct = model
        .probabilities(Array2::from_shape_vec((1, 128), projected).unwrap().view())
        .unwrap()[0];
    assert!(
        (direct - scores[0]).abs() < 1e-4,
        "{direct} vs {}",
        scores[0]
    );
}

#[test]
fn bad_sketch_settings_fail_at_fit() {
    let (x, y) = data(20, 8, 0.5, 12);
    let deltas = deltas_of(&x);
    let err = ProbeBuilder::new(LogisticParams::default())
        .sketch(SketchConfig::new(10, 0).nnz_per_column(3))
        .fit(&deltas, &y)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidParameter {
            name: "sketch.nnz_per_column",
            ..
        }
    ));
}

// ---------------------------------------------------------------- evaluation

#[test]
fn auc_handles_ties_and_needs_both_classes() {
    let y = [
        Label::Benign,
        Label::Malicious,
        Label::Benign,
        Label::Malicious,
    ];
    assert_eq!(roc_auc(&[0.5, 0.5, 0.5, 0.5], &y).unwrap(), 0.5);
    assert_eq!(roc_auc(&[0.1, 0.9, 0.2, 0.8], &y).unwrap(), 1.0);
    assert_eq!(roc_auc(&[0.9, 0.1, 0.8, 0.2], &y).unwrap(), 0.0);
    assert!(matches!(
        roc_auc(&[0.1, 0.2], &[Label::Benign; 2]),
        Err(Error::MissingClass { .. })
    ));
    assert!(matches!(
        roc_auc(&[0.1], &y),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        roc_auc(&[f32::NAN, 0.1, 0.2, 0.3], &y),
        Err(Error::NonFiniteFeature { row: 0, .. })
    ));
}

#[test]
fn confusion_counts_and_zero_division() {
    let y = [
        Label::Malicious,
        Label::Malicious,
        Label::Benign,
        Label::Benign,
        Label::Benign,
    ];
    let c = Confusion::at(&[0.9, 0.2, 0.85, 0.1, 0.3], &y, 0.8).unwrap();
    assert_eq!(
        (
            c.true_positives,
            c.false_negatives,
            c.false_positives,
            c.true_negatives
        ),
        (1, 1, 1, 2)
    );
    assert_eq!(c.precision(), 0.5);
    assert_eq!(c.recall(), 0.5);
    assert!((c.false_positive_rate() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(c.accuracy(), 0.6);
    let none = Confusion::at(&[0.1; 5], &y, 0.8).unwrap();
    assert_eq!((none.precision(), none.f1()), (0.0, 0.0));
    let e = Evaluation::new(&[0.9, 0.2, 0.85, 0.1, 0.3], &y, 0.8).unwrap();
    assert_eq!(e.f1, 0.5);
}

#[test]
fn stratified_folds_partition_and_keep_class_ratio() {
    let y: Vec<Label> = (0..50)
        .map(|i| {
            if i % 5 == 0 {
                Label::Malicious
            } else {
                Label::Benign
            }
        })
        .collect();
    let folds = stratified_k_fold(&y, 5, 3).unwrap();
    let mut seen = [0; 50];
    for fold in &folds {
        assert_eq!(fold.test.len(), 10);
        assert_eq!(
            fold.test.iter().filter(|&&i| y[i].is_malicious()).count(),
            2
        );
        assert_eq!(fold.train.len() + fold.test.len(), 50);
        fold.test.iter().for_each(|&i| seen[i] += 1);
    }
    assert!(seen.iter().all(|&s| s == 1));
    assert!(matches!(
        stratified_k_fold(&y, 1, 0),
        Err(Error::InvalidParameter { name: "k", .. })
    ));
    assert!(matches!(
        stratified_k_fold(&y, 11, 0),
        Err(Error::InvalidParameter { name: "k", .. })
    ));
}

#[test]
fn cross_validation_reports_one_evaluation_per_fold() {
    let (x, y) = data(90, 12, 0.3, 13);
    let evals =
        cross_validate(&LogisticParams::default().c(10.0), x.view(), &y, 3, 0, 0.5).unwrap();
    assert_eq!(evals.len(), 3);
    assert!(evals.iter().all(|e| e.roc_auc > 0.9));
}

// ---------------------------------------------------------------- manifests

fn write_adapter(dir: &Path, name: &str, values: &[f32]) {
    delta(values)
        .as_adapter()
        .save(dir.join(name), StorageDtype::F32)
        .unwrap();
}

#[test]
fn manifest_training_matches_in_memory_training() {
    let dir = temp_dir("manifest");
    let (x, y) = data(40, 8, 0.3, 14);
    write_adapter(&dir, "base.safetensors", &[0.0; 8]);
    let mut lines = String::new();
    for (i, (row, label)) in x.rows().into_iter().zip(&y).enumerate() {
        // Even rows are stored as deltas, odd rows as base + delta.
        let name = format!("s{i}.safetensors");
        write_adapter(&dir, &name, &row.to_vec());
        let base = if i % 2 == 1 {
            r#", "base": "base.safetensors""#
        } else {
            ""
        };
        lines.push_str(&format!(
            "{{\"path\": \"{name}\", \"label\": \"{}\", \"client\": {i}, \"round\": 0{base}}}\n\n",
            label.as_str()
        ));
    }
    std::fs::write(dir.join("train.jsonl"), &lines).unwrap();
    let manifest = Manifest::load(dir.join("train.jsonl")).unwrap();
    assert_eq!(manifest.labels(), y);
    assert_eq!(manifest.entries()[3].client.as_deref(), Some("3"));
    let builder = ProbeBuilder::new(LogisticParams::default().c(10.0));
    let from_files = builder.fit_manifest(&manifest).unwrap();
    let in_memory = builder.fit(&deltas_of(&x), &y).unwrap();
    assert_eq!(from_files.weights(), in_memory.weights());
    assert_eq!(from_files.bias(), in_memory.bias());
}

#[test]
fn manifest_errors_name_the_line() {
    let root = Path::new("/data");
    let cases = [
        (r#"{"path": "a", "label": "evil"}"#, 1),
        ("\n{\"path\": \"a\"}", 2),
        (r#"{"path": "a", "label": "benign", "lable": 1}"#, 1),
        (
            r#"{"path": "a", "label": 1}
not json"#,
            2,
        ),
        (r#"{"path": "a", "label": 2}"#, 1),
        (r#"{"path": "a", "label": "benign", "client": 1.5}"#, 1),
    ];
    for (text, line) in cases {
        match Manifest::parse(text, root) {
            Err(Error::Manifest { line: l, .. }) => assert_eq!(l, line, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
    assert!(matches!(
        Manifest::parse("\n\n", root),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn manifest_with_a_missing_file_fails_with_its_path() {
    let dir = temp_dir("manifest-missing");
    std::fs::write(
        dir.join("m.jsonl"),
        r#"{"path": "absent.safetensors", "label": "benign"}"#,
    )
    .unwrap();
    let manifest = Manifest::load(dir.join("m.jsonl")).unwrap();
    let err = ProbeBuilder::new(LogisticParams::default())
        .fit_manifest(&manifest)
        .unwrap_err();
    assert!(
        matches!(err.root(), Error::Io { path, .. } if path.ends_with("absent.safetensors")),
        "{err}"
    );
    // The error names the manifest line and the folder relative paths
    // resolve against.
    assert!(
        matches!(err, Error::ManifestSample { line: 1, ref root, .. } if *root == dir),
        "{err}"
    );
    assert!(
        err.to_string().contains("resolve against its folder"),
        "{err}"
    );
}

// ---------------------------------------------------------------- threads

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<LinearProbe>();
    assert_send_sync::<LogisticParams>();
    assert_send_sync::<Manifest>();
    assert_send_sync::<safe_fedllm::probe::Sketch>();
    let (probe, _, _) = trained_probe();
    let shared: std::sync::Arc<dyn Probe> = std::sync::Arc::new(probe);
    let handle = std::thread::spawn(move || shared.threshold());
    assert_eq!(handle.join().unwrap(), 0.8);
}
