//! Fixtures shared by the integration tests: the two-tensor toy adapter and
//! its probe (the defended-round tests), JSON helpers and the projection of
//! an audit line every front end must agree on.
//!
//! Each test crate compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
use safe_fedllm::probe::LinearProbe;
use serde_json::{Value, json};

/// The toy adapter's lora_B key.
pub const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// The toy adapter's lora_A key.
pub const A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

/// The toy adapter: lora_B = (x, y) (2 × 1), lora_A = `a` (1 × 2).
pub fn adapter_with_a(x: f32, y: f32, a: [f32; 2]) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    out.insert(B, LoraTensor::new("b", [2, 1], vec![x, y]).unwrap())
        .unwrap();
    out.insert(A, LoraTensor::new("a", [1, 2], a.to_vec()).unwrap())
        .unwrap();
    out
}

/// The toy adapter with lora_A = (a, a).
pub fn adapter(x: f32, y: f32, a: f32) -> LoraAdapter {
    adapter_with_a(x, y, [a, a])
}

/// The round's starting adapter: lora_B = 0, lora_A = (0.5, 0.5).
pub fn global() -> LoraAdapter {
    adapter(0.0, 0.0, 0.5)
}

/// A probe over the (L2-normalised) lora_B delta: +x is malicious, +y benign.
pub fn probe() -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(&adapter(1.0, 0.0, 0.5), &global()).unwrap()])
        .unwrap();
    LinearProbe::new(spec, vec![20.0, 0.0], -10.0).unwrap()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// A file of the shared defense-spec fixture (`fixtures/spec/`).
pub fn spec_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/spec")
        .join(name)
}

/// What every front end (Rust, the command-line tool, Python) must agree on
/// for the same uploads: per client the disposition, verdict, factor and
/// samples; the round's mean factor, skip, τ and spec hash.
pub fn projection(outcome: &Value) -> Value {
    let clients: Vec<Value> = outcome["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .map(|c| {
            json!({
                "client": c["client"],
                "disposition": c["disposition"],
                "verdict": c["verdict"],
                "factor": c["factor"],
                "samples": c["samples"],
            })
        })
        .collect();
    json!({
        "clients": clients,
        "mean_factor": outcome["mean_factor"],
        "skipped": outcome["skipped"],
        "threshold": outcome["threshold"],
        "spec_sha256": outcome["spec_sha256"],
    })
}

/// An adapter holding only the layer-0 lora_B = (x, y) (no lora_A).
pub fn b_adapter(x: f32, y: f32) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    out.insert(B, LoraTensor::new("b", [2, 1], vec![x, y]).unwrap())
        .unwrap();
    out
}

/// The lora_B-only global, (0, 0).
pub fn b_global() -> LoraAdapter {
    b_adapter(0.0, 0.0)
}

/// The toy probe over the lora_B-only adapters: +x is malicious.
pub fn b_probe() -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(&b_adapter(1.0, 0.0), &b_global()).unwrap()])
        .unwrap();
    LinearProbe::new(spec, vec![20.0, 0.0], -10.0).unwrap()
}
