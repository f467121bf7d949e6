//! Untrusted adapter bytes: parse, convert, and compute probe features.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, TensorSource};

fuzz_target!(|data: &[u8]| {
    let Ok(view) = AdapterView::parse(data) else {
        return;
    };
    let Ok(adapter) = view.to_adapter() else {
        return;
    };
    assert_eq!(adapter.len(), view.len());
    for selection in [Selection::FirstLayerB, Selection::AllLayers] {
        if let Ok(spec) = FeatureConfig::new(selection).fit(&[&view]) {
            // The view and its owned copy must give the same features.
            let a = spec.transform(&view);
            let b = spec.transform(&adapter);
            assert_eq!(a.is_ok(), b.is_ok());
            if let (Ok(a), Ok(b)) = (a, b) {
                let (a, b) = (&a.values, &b.values);
                assert_eq!(a.len(), b.len());
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }
    for key in view.lora_keys() {
        let _ = view.shape_of(key.canonical());
    }
});
