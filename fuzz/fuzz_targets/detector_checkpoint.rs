//! Untrusted detector checkpoints (`AnyDetector` JSON): load, then use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safe_fedllm::ClientId;
use safe_fedllm::detect::{AnyDetector, ClientEvidence, Detector};

fuzz_target!(|data: &[u8]| {
    let Ok(mut detector) = serde_json::from_slice::<AnyDetector>(data) else {
        return;
    };
    let json = serde_json::to_string(&detector).expect("a loaded checkpoint saves");
    let again: AnyDetector = serde_json::from_str(&json).expect("a saved checkpoint loads");
    assert_eq!(serde_json::to_string(&again).ok(), Some(json));
    let client = ClientId::from("fuzz");
    let evidence = ClientEvidence::new(16).with_steps(vec![0.9, 0.1, 0.5]);
    if let Ok(assessment) = detector.assess(0, &client, &evidence) {
        assert!((0.0..=1.0).contains(&assessment.factor), "{assessment:?}");
    }
});
