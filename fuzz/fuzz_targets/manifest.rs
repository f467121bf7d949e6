//! Untrusted training manifests (JSON lines).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use safe_fedllm::probe::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::parse(text, Path::new("/nonexistent-root")) {
        assert_eq!(manifest.labels().len(), manifest.entries().len());
        assert_eq!(manifest.groups().len(), manifest.entries().len());
    }
});
