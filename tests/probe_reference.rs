//! The plain logistic trainer and the evaluation helpers against scikit-learn.
//!
//! Reference vectors: `fixtures/probe/logistic.json`, written by
//! `fixtures/probe/generate.py` (scikit-learn `LogisticRegression`, lbfgs,
//! tol 1e-12; `sklearn.metrics`). The crate's trainer runs to a tolerance of
//! 1e-9 on the same objective; probabilities must agree to 1e-4 (the data are
//! f32, so dot products carry ~1e-7 relative rounding) and ROC AUC to 1e-9.

use ndarray::Array2;
use safe_fedllm::probe::eval::{Confusion, roc_auc};
use safe_fedllm::probe::{ClassWeight, Label, LogisticParams, Trainer};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/probe/logistic.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn labels(v: &Value) -> Vec<Label> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            if l.as_u64() == Some(1) {
                Label::Malicious
            } else {
                Label::Benign
            }
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn matrix(v: &Value) -> Array2<f32> {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(floats).collect();
    Array2::from_shape_fn((rows.len(), rows[0].len()), |(i, j)| rows[i][j] as f32)
}

#[test]
fn default_trainer_matches_sklearn_logistic_regression() {
    let doc = fixture();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let x = matrix(&case["x"]);
        let y = labels(&case["labels"]);
        let class_weight = match case["class_weight"].as_str().unwrap() {
            "balanced" => ClassWeight::Balanced,
            _ => ClassWeight::Uniform,
        };
        let model = LogisticParams::default()
            .c(case["c"].as_f64().unwrap())
            .class_weight(class_weight)
            .tolerance(1e-9)
            .max_iterations(10_000)
            .fit(x.view(), &y)
            .unwrap();
        assert!(model.report.stop.converged(), "{name}: {:?}", model.report);
        let ours = model.probabilities(x.view()).unwrap();
        let reference = floats(&case["probabilities"]);
        for (i, (p, r)) in ours.iter().zip(&reference).enumerate() {
            assert!(
                (f64::from(*p) - r).abs() < 1e-4,
                "{name} row {i}: {p} vs sklearn {r}"
            );
        }
        for (w, r) in model.weights.iter().zip(floats(&case["coef"])) {
            assert!(
                (f64::from(*w) - r).abs() < 1e-3 * (1.0 + r.abs()),
                "{name}: weight {w} vs {r}"
            );
        }
        assert!((f64::from(model.bias) - case["intercept"].as_f64().unwrap()).abs() < 1e-3);
        let auc = roc_auc(&ours, &y).unwrap();
        assert!(
            (auc - case["roc_auc"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: AUC {auc}"
        );
    }
}

#[test]
fn metrics_match_sklearn_metrics() {
    let doc = fixture();
    let m = &doc["metrics"];
    let scores: Vec<f32> = floats(&m["scores"]).into_iter().map(|s| s as f32).collect();
    let y = labels(&m["labels"]);
    assert!((roc_auc(&scores, &y).unwrap() - m["roc_auc"].as_f64().unwrap()).abs() < 1e-12);
    for at in m["at"].as_array().unwrap() {
        let threshold = at["threshold"].as_f64().unwrap() as f32;
        let c = Confusion::at(&scores, &y, threshold).unwrap();
        assert!((c.precision() - at["precision"].as_f64().unwrap()).abs() < 1e-12);
        assert!((c.recall() - at["recall"].as_f64().unwrap()).abs() < 1e-12);
        assert!((c.f1() - at["f1"].as_f64().unwrap()).abs() < 1e-12);
    }
}
