//! Untrusted probe files: parse; whatever parses must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safe_fedllm::probe::{LinearProbe, Probe};

fuzz_target!(|data: &[u8]| {
    let Ok(probe) = LinearProbe::from_bytes(data) else {
        return;
    };
    let bytes = probe.to_bytes().expect("a loaded probe saves");
    let again = LinearProbe::from_bytes(&bytes).expect("a saved probe loads");
    assert_eq!(again.feature_spec(), probe.feature_spec());
    let zeros = vec![0.0f32; probe.feature_spec().dim()];
    if let Ok(s) = probe.score_features(&zeros) {
        assert!((0.0..=1.0).contains(&s), "score {s}");
    }
});
