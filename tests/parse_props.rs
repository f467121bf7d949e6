//! Property tests: the safetensors reader never panics on hostile bytes, and
//! features keep their invariants.

use std::path::PathBuf;

use proptest::prelude::*;
use safe_fedllm::features::{FeatureConfig, Selection, l2_norm};
use safe_fedllm::lora::{AdapterView, LoraAdapter, LoraDelta, LoraTensor, StorageDtype};

fn good_bytes() -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/lora/update_bf16.safetensors");
    std::fs::read(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes: an error or an adapter, never a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = LoraAdapter::from_bytes(&bytes);
    }

    /// A valid file with bytes overwritten or cut short: an error or an
    /// adapter, never a panic; and whatever parses converts fully.
    #[test]
    fn mutated_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = good_bytes();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(view) = AdapterView::parse(&bytes) {
            let _ = view.to_adapter();
        }
    }

    /// Round trip through bf16 is idempotent after the first rounding.
    #[test]
    fn bf16_round_trip_is_idempotent(values in proptest::collection::vec(-1e3f32..1e3, 6)) {
        let mut a = LoraAdapter::new();
        a.insert("m.layers.0.q.lora_B.weight", LoraTensor::new("b", [3, 2], values).unwrap()).unwrap();
        let once = LoraAdapter::from_bytes(&a.to_bytes(StorageDtype::Bf16).unwrap()).unwrap();
        let twice = LoraAdapter::from_bytes(&once.to_bytes(StorageDtype::Bf16).unwrap()).unwrap();
        prop_assert_eq!(once, twice);
    }

    /// L2 features have unit norm (or are all zero) and do not depend on the
    /// delta's scale.
    #[test]
    fn l2_features_are_unit_and_scale_free(
        values in proptest::collection::vec(-10f32..10.0, 8),
        factor in 0.01f32..100.0,
    ) {
        let mut a = LoraAdapter::new();
        a.insert("m.layers.0.q.lora_B.weight", LoraTensor::new("b", [4, 2], values.clone()).unwrap()).unwrap();
        let mut b = LoraAdapter::new();
        let scaled: Vec<f32> = values.iter().map(|v| v * factor).collect();
        b.insert("m.layers.0.q.lora_B.weight", LoraTensor::new("b", [4, 2], scaled).unwrap()).unwrap();
        let (da, db) = (LoraDelta::from_adapter(a), LoraDelta::from_adapter(b));
        let spec = FeatureConfig::new(Selection::AllLayers).fit(&[&da]).unwrap();
        let fa = spec.transform(&da).unwrap().values;
        let fb = spec.transform(&db).unwrap().values;
        let norm = l2_norm(&fa);
        prop_assert!(norm == 0.0 || (norm - 1.0).abs() < 1e-5);
        for (x, y) in fa.iter().zip(&fb) {
            prop_assert!((x - y).abs() < 1e-5);
        }
    }
}
