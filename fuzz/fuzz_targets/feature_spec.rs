//! Untrusted feature specs (JSON, as stored in probe files).
#![no_main]

use libfuzzer_sys::fuzz_target;
use safe_fedllm::features::FeatureSpec;
use safe_fedllm::lora::{LoraAdapter, LoraTensor};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<FeatureSpec>(data) else {
        return;
    };
    let total: usize = spec.layout().iter().map(|b| b.len()).sum();
    assert_eq!(total, spec.dim());
    let mut delta = LoraAdapter::new();
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    if let Ok(t) = LoraTensor::new("b", [2, 1], vec![0.5, -0.25]) {
        let _ = delta.insert(key, t);
    }
    if let Ok(features) = spec.transform(&delta) {
        assert_eq!(features.values.len(), spec.dim());
        assert!(features.values.iter().all(|v| v.is_finite()));
    }
});
