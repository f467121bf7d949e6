//! safetensors I/O against fixtures written by an independent Python writer
//! (fixtures/lora/generate.py).

use std::path::PathBuf;

use safe_fedllm::Error;
use safe_fedllm::error::MalformedSafetensors;
use safe_fedllm::lora::{
    AdapterView, LoraAdapter, LoraConfig, LoraKind, LoraTensor, ReadLimits, StorageDtype,
    TensorSource,
};
use serde_json::Value;

mod common;

use common::floats;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/lora")
        .join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("valid json")
}

const FIRST_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn sum_abs(adapter: &LoraAdapter) -> f64 {
    adapter
        .iter()
        .flat_map(|e| e.tensor.as_slice().iter())
        .map(|v| f64::from(v.abs()))
        .sum()
}

#[test]
fn loads_all_three_dtypes_to_the_values_numpy_rounded() {
    let exp = expected();
    for dtype in ["f32", "f16", "bf16"] {
        let adapter = LoraAdapter::load(fixture(&format!("update_{dtype}.safetensors"))).unwrap();
        let keys: Vec<&str> = adapter.keys().collect();
        let want: Vec<&str> = exp["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, want, "{dtype}: sorted canonical keys");
        let row0 = &adapter.get(FIRST_B).unwrap().as_slice()[..4];
        assert_eq!(
            row0,
            floats(&exp[format!("update_first_b_row0_{dtype}")]).as_slice(),
            "{dtype}: decoding is exact"
        );
        let want_sum = exp["update_sum_abs"][dtype].as_f64().unwrap();
        assert!(
            (sum_abs(&adapter) - want_sum).abs() < 1e-9 * want_sum.max(1.0),
            "{dtype}: {} vs {want_sum}",
            sum_abs(&adapter)
        );
        assert_eq!(adapter.rank().unwrap(), Some(4));
        assert_eq!(
            adapter.num_params() as u64,
            exp["num_params"].as_u64().unwrap()
        );
    }
}

#[test]
fn round_trips_in_every_dtype() {
    let original = LoraAdapter::load(fixture("update_f32.safetensors")).unwrap();
    for dtype in [StorageDtype::F32, StorageDtype::F16, StorageDtype::Bf16] {
        let bytes = original.to_bytes(dtype).unwrap();
        let once = LoraAdapter::from_bytes(&bytes).unwrap();
        // A second trip through the same dtype is lossless: values are already representable.
        let twice = LoraAdapter::from_bytes(&once.to_bytes(dtype).unwrap()).unwrap();
        assert_eq!(once, twice, "{dtype:?}: second round trip is bit-identical");
        let tolerance = match dtype {
            StorageDtype::F32 => 0.0,
            StorageDtype::F16 => 1e-3,
            StorageDtype::Bf16 => 8e-3,
        };
        for entry in original.iter() {
            let back = once.get(entry.key.canonical()).unwrap();
            assert_eq!(back.shape(), entry.tensor.shape());
            for (a, b) in entry.tensor.as_slice().iter().zip(back.as_slice()) {
                assert!(
                    (a - b).abs() <= tolerance * a.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn save_and_load_a_file() {
    let original = LoraAdapter::load(fixture("with_config.safetensors")).unwrap();
    let dir = std::env::temp_dir().join(format!("safe-fedllm-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adapter.safetensors");
    original.save(&path, StorageDtype::F32).unwrap();
    let back = LoraAdapter::load(&path).unwrap();
    assert_eq!(back, original);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reads_config_from_metadata() {
    let adapter = LoraAdapter::load(fixture("with_config.safetensors")).unwrap();
    assert_eq!(
        adapter.config(),
        &LoraConfig {
            rank: Some(4),
            alpha: Some(8.0),
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    );
    let plain = LoraAdapter::load(fixture("base_f32.safetensors")).unwrap();
    assert_eq!(plain.config(), &LoraConfig::default());
}

#[test]
fn peft_in_memory_names_embeddings_and_extras() {
    let adapter = LoraAdapter::load(fixture("update_default_name.safetensors")).unwrap();
    assert_eq!(adapter.adapter_name(), Some("default"));
    // 12 linear factors + 2 embedding factors, stored under canonical names.
    assert_eq!(adapter.len(), 14);
    assert!(adapter.get(FIRST_B).is_some());
    let emb = adapter
        .key("base_model.model.model.embed_tokens.lora_embedding_A")
        .unwrap();
    assert_eq!(emb.kind(), LoraKind::Embedding);
    assert_eq!(emb.layer(), None);
    // Non-LoRA tensors are kept aside, byte-for-byte, whatever their dtype.
    let extras: Vec<&str> = adapter.extras().keys().map(String::as_str).collect();
    assert_eq!(
        extras,
        [
            "base_model.model.extra_counts",
            "base_model.model.lm_head.modules_to_save.default.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.bias",
        ]
    );
    assert_eq!(
        adapter.extras()["base_model.model.extra_counts"].bytes(),
        &[0, 1, 2, 3, 4, 5]
    );
    // They survive a round trip.
    let back = LoraAdapter::from_bytes(&adapter.to_bytes(StorageDtype::F32).unwrap()).unwrap();
    assert_eq!(back.extras(), adapter.extras());
}

#[test]
fn view_reads_lazily_and_matches_the_owned_adapter() {
    let bytes = std::fs::read(fixture("update_bf16.safetensors")).unwrap();
    let view = AdapterView::parse(&bytes).unwrap();
    let owned = view.to_adapter().unwrap();
    assert_eq!(view.len(), owned.len());
    for entry in owned.iter() {
        let name = entry.key.canonical();
        assert_eq!(view.shape_of(name), Some(entry.tensor.shape()));
        let mut out = vec![0.0; entry.tensor.len()];
        view.copy_into(name, &mut out).unwrap();
        assert_eq!(out, entry.tensor.as_slice());
    }
}

#[test]
fn transposition_is_the_burn_orientation_flip() {
    let t = LoraTensor::new("t", [2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap();
    let tt = t.transposed();
    assert_eq!(tt.shape(), [3, 2]);
    assert_eq!(tt.as_slice(), &[1., 4., 2., 5., 3., 6.]);
    assert_eq!(tt.transposed(), t);
}

// ---- one named test per rejection -------------------------------------------------

fn load_broken(name: &str) -> Error {
    let err = LoraAdapter::load(fixture(&format!("broken/{name}"))).unwrap_err();
    match &err {
        Error::InFile { path, .. } => assert!(path.ends_with(name), "{path:?}"),
        other => panic!("expected the error to name the file, got {other:?}"),
    }
    match err {
        Error::InFile { source, .. } => *source,
        _ => unreachable!(),
    }
}

#[test]
fn truncated_file_is_malformed() {
    assert!(matches!(
        load_broken("truncated.safetensors"),
        Error::Malformed(MalformedSafetensors::MetadataIncompleteBuffer)
    ));
}

#[test]
fn too_short_file_is_malformed() {
    assert!(matches!(
        load_broken("too_short.safetensors"),
        Error::Malformed(MalformedSafetensors::HeaderTooSmall)
    ));
}

#[test]
fn oversized_header_is_refused_before_parsing() {
    match load_broken("header_too_large.safetensors") {
        Error::HeaderTooLarge { declared, limit } => {
            assert_eq!(declared, 1 << 40);
            assert_eq!(limit, ReadLimits::default().max_header_bytes);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn input_over_the_size_limit_is_refused() {
    let limits = ReadLimits {
        max_bytes: 100,
        ..ReadLimits::default()
    };
    let err = LoraAdapter::load_with(fixture("base_f32.safetensors"), &limits).unwrap_err();
    assert!(matches!(
        err.root(),
        Error::InputTooLarge {
            limit: 100,
            found: 4192
        }
    ));
    let bytes = std::fs::read(fixture("base_f32.safetensors")).unwrap();
    assert!(matches!(
        LoraAdapter::from_bytes_with(&bytes, &limits),
        Err(Error::InputTooLarge { .. })
    ));
}

#[test]
fn bad_json_header_is_malformed() {
    assert!(matches!(
        load_broken("bad_json.safetensors"),
        Error::Malformed(MalformedSafetensors::InvalidHeaderDeserialization { .. })
    ));
}

#[test]
fn trailing_bytes_are_malformed() {
    assert!(matches!(
        load_broken("trailing_bytes.safetensors"),
        Error::Malformed(MalformedSafetensors::MetadataIncompleteBuffer)
    ));
}

#[test]
fn overlapping_offsets_are_malformed() {
    assert!(matches!(
        load_broken("overlapping_offsets.safetensors"),
        Error::Malformed(MalformedSafetensors::InvalidOffset { .. })
    ));
}

#[test]
fn int8_lora_tensor_is_an_unsupported_dtype() {
    match load_broken("int8_lora.safetensors") {
        Error::UnsupportedDtype {
            tensor,
            dtype,
            supported,
        } => {
            assert_eq!(
                tensor,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            );
            assert_eq!(dtype, "I8");
            assert_eq!(supported, "F32, F16 or BF16");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn three_dimensional_lora_tensor_is_not_a_matrix() {
    match load_broken("not_a_matrix.safetensors") {
        Error::NotAMatrix { tensor, shape } => {
            assert!(tensor.ends_with("q_proj.lora_A.weight"));
            assert_eq!(shape, [2, 2, 2]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_spellings_of_one_key_are_a_duplicate() {
    match load_broken("duplicate_key.safetensors") {
        Error::DuplicateKey {
            canonical,
            first,
            second,
        } => {
            assert_eq!(
                canonical,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            );
            assert_ne!(first, second);
            assert!(first.contains(".default.") || second.contains(".default."));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_adapter_names_in_one_file_are_refused() {
    match load_broken("mixed_adapters.safetensors") {
        Error::MixedAdapters { first, second } => {
            let mut names = [first, second];
            names.sort();
            assert_eq!(names, ["default", "other"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn disagreeing_ranks_are_refused() {
    match load_broken("rank_mismatch.safetensors") {
        Error::RankMismatch {
            module,
            a_rank,
            b_rank,
            a_shape,
            b_shape,
        } => {
            assert_eq!(module, "base_model.model.model.layers.0.self_attn.q_proj");
            assert_eq!((a_rank, b_rank), (4, 5));
            assert_eq!((a_shape, b_shape), ([4, 16], [16, 5]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unparseable_metadata_is_refused() {
    match load_broken("bad_metadata.safetensors") {
        Error::InvalidMetadata { field, value, .. } => {
            assert_eq!(field, "r");
            assert_eq!(value, "eight");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_file_is_an_io_error_with_the_path() {
    match LoraAdapter::load(fixture("no_such_file.safetensors")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("no_such_file.safetensors")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_data_length_is_refused() {
    match LoraTensor::new("x.lora_A.weight", [2, 2], vec![0.0; 3]) {
        Err(Error::DataLength {
            tensor,
            expected,
            found,
            ..
        }) => {
            assert_eq!(tensor, "x.lora_A.weight");
            assert_eq!((expected, found), (4, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn inserting_a_non_lora_name_is_refused() {
    let mut adapter = LoraAdapter::new();
    let t = LoraTensor::zeros("t", [1, 1]).unwrap();
    match adapter.insert("model.layers.0.q_proj.weight", t) {
        Err(Error::NotALoraKey { key }) => assert_eq!(key, "model.layers.0.q_proj.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn peft_adapter_config_json_is_read() {
    let cfg = LoraConfig::from_peft_json(
        r#"{"r": 16, "lora_alpha": 32, "target_modules": "q_proj|v_proj", "bias": "none"}"#,
    )
    .unwrap();
    assert_eq!(cfg.rank, Some(16));
    assert_eq!(cfg.alpha, Some(32.0));
    assert_eq!(cfg.target_modules, ["q_proj|v_proj"]);
    assert!(matches!(
        LoraConfig::from_peft_json(r#"{"r": 0}"#),
        Err(Error::InvalidMetadata { .. })
    ));
    assert!(matches!(
        LoraConfig::from_peft_json("not json"),
        Err(Error::InvalidMetadata { .. })
    ));
}

// Rejections of the header layer (formerly unit tests of the crate's own
// header parser, now answered by the `safetensors` crate's parser and mapped
// to `MalformedSafetensors`).

fn header_bytes(json: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

fn parse_err(bytes: &[u8]) -> Error {
    match AdapterView::parse(bytes) {
        Ok(_) => panic!("accepted"),
        Err(err) => err,
    }
}

#[test]
fn a_name_given_twice_with_two_ranges_is_refused() {
    let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert!(matches!(
        parse_err(&header_bytes(json, 8)),
        Error::Malformed(MalformedSafetensors::InvalidOffset { .. })
    ));
}

#[test]
fn names_with_escapes_are_decoded() {
    let name = "model.layers.0.q_proj.lora_B.weight";
    let escaped = name.replace('.', "\\u002e");
    let json = format!(r#"{{"{escaped}":{{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}}}"#);
    let bytes = header_bytes(&json, 4);
    let view = AdapterView::parse(&bytes).unwrap();
    assert_eq!(view.shape_of(name), Some([1, 1]));
}

#[test]
fn a_gap_between_tensors_is_refused() {
    let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    match parse_err(&header_bytes(json, 12)) {
        Error::Malformed(MalformedSafetensors::InvalidOffset { tensor }) => assert_eq!(tensor, "b"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_size_that_disagrees_with_the_shape_is_refused() {
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
    assert!(matches!(
        parse_err(&header_bytes(json, 4)),
        Error::Malformed(MalformedSafetensors::TensorInvalidInfo)
    ));
}

#[test]
fn an_overflowing_shape_is_refused() {
    let json = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#;
    assert!(matches!(
        parse_err(&header_bytes(json, 4)),
        Error::Malformed(MalformedSafetensors::ValidationOverflow)
    ));
}

#[test]
fn a_header_that_is_not_utf8_is_refused() {
    let mut bytes = header_bytes("{\"a\":1}", 0);
    bytes[9] = 0xFF;
    assert!(matches!(
        parse_err(&bytes),
        Error::Malformed(MalformedSafetensors::InvalidHeader { valid_up_to: 1 })
    ));
}

#[test]
fn a_header_longer_than_the_input_is_refused() {
    let mut bytes = header_bytes("{}", 0);
    bytes[0] = 200;
    assert!(matches!(
        parse_err(&bytes),
        Error::Malformed(MalformedSafetensors::InvalidHeaderLength)
    ));
}

#[test]
fn malformed_errors_are_our_own_type_with_a_message() {
    let err = parse_err(b"short");
    assert_eq!(
        err.to_string(),
        "malformed safetensors data: fewer than 8 bytes: no header-length prefix"
    );
}

/// An adapter whose first-layer lora_B holds `values` (2 × 2).
fn holding(values: [f32; 4]) -> LoraAdapter {
    let mut adapter = LoraAdapter::new();
    adapter
        .insert(
            FIRST_B,
            LoraTensor::new("b", [2, 2], values.to_vec()).unwrap(),
        )
        .unwrap();
    adapter
}

fn storage_overflow(values: [f32; 4], dtype: StorageDtype) -> (String, usize, f32, &'static str) {
    match holding(values).to_bytes(dtype) {
        Err(Error::StorageOverflow {
            tensor,
            index,
            value,
            dtype,
        }) => (tensor, index, value, dtype),
        other => panic!("{dtype:?} {values:?}: expected StorageOverflow, got {other:?}"),
    }
}

#[test]
fn f16_refuses_a_finite_value_that_would_become_inf() {
    for bad in [7e4f32, -7e4, 65_520.0, f32::MAX] {
        let (tensor, index, value, dtype) =
            storage_overflow([0.5, 1.0, bad, 2.0], StorageDtype::F16);
        assert_eq!(tensor, FIRST_B);
        assert_eq!(index, 2, "{bad}");
        assert_eq!(value, bad);
        assert_eq!(dtype, "F16");
    }
    // The largest values that round to f16::MAX (65,504) are written and read back.
    for ok in [65_504.0f32, 65_519.0, -65_519.0] {
        let bytes = holding([ok, 0.0, 0.0, 0.0])
            .to_bytes(StorageDtype::F16)
            .unwrap();
        let back = LoraAdapter::from_bytes(&bytes).unwrap();
        let v = back.get(FIRST_B).unwrap().as_slice()[0];
        assert_eq!(v, 65_504.0f32.copysign(ok), "{ok}");
    }
}

#[test]
fn bf16_refuses_a_finite_value_that_would_become_inf() {
    for bad in [f32::MAX, -f32::MAX, 3.4e38] {
        let (tensor, index, value, dtype) =
            storage_overflow([bad, 1.0, 2.0, 3.0], StorageDtype::Bf16);
        assert_eq!(tensor, FIRST_B);
        assert_eq!(index, 0, "{bad}");
        assert_eq!(value, bad);
        assert_eq!(dtype, "BF16");
    }
    // 7e4 overflows f16 but not bf16, and bf16::MAX itself is written.
    let bf16_max = f32::from_bits(0x7F7F_0000);
    let bytes = holding([7e4, bf16_max, -bf16_max, 0.0])
        .to_bytes(StorageDtype::Bf16)
        .unwrap();
    let back = LoraAdapter::from_bytes(&bytes).unwrap();
    let values = back.get(FIRST_B).unwrap().as_slice();
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
    assert_eq!(values[1], bf16_max);
}

#[test]
fn f32_writes_every_finite_value() {
    let bytes = holding([f32::MAX, -f32::MAX, 7e4, f32::MIN_POSITIVE])
        .to_bytes(StorageDtype::F32)
        .unwrap();
    let back = LoraAdapter::from_bytes(&bytes).unwrap();
    assert_eq!(
        back.get(FIRST_B).unwrap().as_slice(),
        &[f32::MAX, -f32::MAX, 7e4, f32::MIN_POSITIVE]
    );
}
