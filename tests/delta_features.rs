//! Deltas and probe features against numpy reference values
//! (fixtures/lora/generate.py → fixtures/lora/expected.json).

use std::path::PathBuf;

use ndarray::Array2;
use safe_fedllm::Error;
use safe_fedllm::features::{FeatureConfig, Normalization, Selection, l2_norm};
use safe_fedllm::lora::{
    AdapterView, KeyPolicy, LazyDelta, LoraAdapter, LoraDelta, LoraTensor, TensorSource,
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
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

fn base() -> LoraAdapter {
    LoraAdapter::load(fixture("base_f32.safetensors")).unwrap()
}

fn update() -> LoraAdapter {
    LoraAdapter::load(fixture("update_f32.safetensors")).unwrap()
}

fn assert_close(found: &[f32], want: &[f32], tol: f32) {
    assert_eq!(found.len(), want.len());
    for (i, (a, b)) in found.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol, "index {i}: {a} vs {b}");
    }
}

const FIRST_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

#[test]
fn delta_is_update_minus_base_and_applies_back() {
    let (base, update) = (base(), update());
    let delta = LoraDelta::between(&update, &base).unwrap();
    let sum: f64 = delta
        .as_adapter()
        .iter()
        .flat_map(|e| e.tensor.as_slice())
        .map(|&v| f64::from(v))
        .sum();
    let want = expected()["delta_sum"].as_f64().unwrap();
    assert!((sum - want).abs() < 1e-5, "{sum} vs {want}");
    let back = delta.apply_to(&base).unwrap();
    for entry in update.iter() {
        assert_close(
            back.get(entry.key.canonical()).unwrap().as_slice(),
            entry.tensor.as_slice(),
            1e-6,
        );
    }
}

#[test]
fn delta_with_a_missing_key_names_it_and_the_sides() {
    let (base, mut update) = (base(), update());
    let mut smaller = LoraAdapter::new();
    for entry in update.iter().filter(|e| e.key.canonical() != FIRST_B) {
        smaller
            .insert(entry.key.canonical(), entry.tensor.clone())
            .unwrap();
    }
    match LoraDelta::between(&smaller, &base) {
        Err(Error::MissingKey {
            tensor,
            present_in,
            missing_from,
        }) => {
            assert_eq!(tensor, FIRST_B);
            assert_eq!(
                (present_in, missing_from),
                ("the base adapter", "the update")
            );
        }
        other => panic!("{other:?}"),
    }
    update
        .insert(
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
            LoraTensor::zeros("x", [4, 16]).unwrap(),
        )
        .unwrap();
    match LoraDelta::between(&update, &base) {
        Err(Error::MissingKey {
            tensor, present_in, ..
        }) => {
            assert!(tensor.contains("layers.9"));
            assert_eq!(present_in, "the update");
        }
        other => panic!("{other:?}"),
    }
    // The explicit policy uses the shared keys and reports the rest.
    let (delta, report) =
        LoraDelta::between_with(&smaller, &base, KeyPolicy::Intersection).unwrap();
    assert_eq!(delta.as_adapter().len(), base.len() - 1);
    assert_eq!(report.only_in_base, [FIRST_B]);
    assert!(report.only_in_update.is_empty());
    assert!(!report.is_clean());
}

#[test]
fn delta_with_a_changed_shape_names_both_shapes() {
    let base = base();
    let mut update = update();
    update
        .insert(FIRST_B, LoraTensor::zeros("b", [4, 16]).unwrap())
        .unwrap();
    match LoraDelta::between(&update, &base) {
        Err(Error::ShapeMismatch {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(tensor, FIRST_B);
            assert_eq!(expected, [16, 4]);
            assert_eq!(found, [4, 16]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        LazyDelta::new(&update, &base),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn first_layer_b_picks_only_the_lowest_layers_b_tensors() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[&delta])
        .unwrap();
    let keys: Vec<&str> = spec.layout().iter().map(|b| b.key.as_str()).collect();
    assert_eq!(keys, strings(&expected()["first_layer_b_keys"]));
    assert_eq!(spec.layer(), Some(0));
    assert_eq!(spec.dim(), 16 * 4 + 8 * 4);

    // Drop layer 0 entirely: the lowest layer present is now 1.
    let mut without_0 = LoraAdapter::new();
    for e in delta
        .as_adapter()
        .iter()
        .filter(|e| e.key.layer() != Some(0))
    {
        without_0
            .insert(e.key.canonical(), e.tensor.clone())
            .unwrap();
    }
    let spec1 = FeatureConfig::default()
        .fit(&[LoraDelta::from_adapter(without_0)])
        .unwrap();
    assert_eq!(spec1.layer(), Some(1));
    assert!(
        spec1
            .layout()
            .iter()
            .all(|b| b.key.contains(".layers.1.") && b.key.ends_with("lora_B.weight"))
    );
}

#[test]
fn features_match_numpy_for_every_selection_and_normalisation() {
    let exp = expected();
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let cases = [
        (
            Selection::FirstLayerB,
            Normalization::L2,
            "features_first_layer_b_l2",
        ),
        (
            Selection::FirstLayerB,
            Normalization::None,
            "features_first_layer_b_none",
        ),
        (
            Selection::AllLayers,
            Normalization::L2,
            "features_all_layers_l2",
        ),
    ];
    for (selection, norm, name) in cases {
        let spec = FeatureConfig::new(selection)
            .normalization(norm)
            .fit(&[&delta])
            .unwrap();
        let features = spec.transform(&delta).unwrap();
        assert!(features.report.is_exact());
        assert_close(&features.values, &floats(&exp[name]), 1e-6);
    }
}

#[test]
fn l2_normalised_features_have_unit_norm() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(&[&delta])
        .unwrap();
    let v = spec.transform(&delta).unwrap().values;
    assert!((l2_norm(&v) - 1.0).abs() < 1e-6);
    // A zero delta stays zero instead of dividing by zero.
    let zero = LoraDelta::between(&base(), &base()).unwrap();
    let z = spec.transform(&zero).unwrap().values;
    assert!(z.iter().all(|&x| x == 0.0));
}

#[test]
fn l2_normalisation_holds_at_every_scale() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(&[&delta])
        .unwrap();
    let want = spec.transform(&delta).unwrap().values;
    for scale in [1e-20f32, 1e-30, 1e-36, 1e20, 1e30] {
        let mut scaled = LoraAdapter::new();
        for entry in delta.as_adapter().iter() {
            let values = entry.tensor.as_slice().iter().map(|v| v * scale).collect();
            let tensor = LoraTensor::new("t", entry.tensor.shape(), values).unwrap();
            scaled.insert(entry.key.canonical(), tensor).unwrap();
        }
        let scaled = LoraDelta::from_adapter(scaled);
        let got = spec.transform(&scaled).unwrap().values;
        assert!((l2_norm(&got) - 1.0).abs() < 1e-5, "{scale}");
        // Scaling by a power of ten rounds each value once: 1e-6 relative.
        assert_close(&got, &want, 1e-5);
    }
    // The norm itself, where the f32 sum of squares is 0.
    assert!((l2_norm(&[1e-30, 1e-30, 1e-30, 1e-30]) / 2e-30 - 1.0).abs() < 1e-6);
}

#[test]
fn features_straight_from_bytes_equal_features_from_owned_deltas() {
    let base = base();
    let owned = LoraDelta::between(&update(), &base).unwrap();
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(&[&owned])
        .unwrap();
    let want = spec.transform(&owned).unwrap().values;
    let bytes = std::fs::read(fixture("update_f32.safetensors")).unwrap();
    let view = AdapterView::parse(&bytes).unwrap();
    let lazy = LazyDelta::new(&view, &base).unwrap();
    assert_eq!(spec.transform(&lazy).unwrap().values, want);
}

#[test]
fn glob_and_key_list_selections() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::Glob("*.layers.2.*.lora_A.weight".into()))
        .fit(&[&delta])
        .unwrap();
    assert_eq!(spec.layout().len(), 2);
    assert!(spec.layout().iter().all(|b| b.key.contains(".layers.2.")));
    // Keys may be given in any accepted spelling.
    let spec = FeatureConfig::new(Selection::Keys(vec![
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight".into(),
    ]))
    .fit(&[&delta])
    .unwrap();
    assert_eq!(spec.dim(), 8 * 4);
    match FeatureConfig::new(Selection::Keys(vec!["nope.lora_A.weight".into()])).fit(&[&delta]) {
        Err(Error::MissingKey { tensor, .. }) => assert_eq!(tensor, "nope.lora_A.weight"),
        other => panic!("{other:?}"),
    }
    match FeatureConfig::new(Selection::Glob("*.mlp.*".into())).fit(&[&delta]) {
        Err(Error::EmptySelection { selection }) => assert_eq!(selection, "glob(*.mlp.*)"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_layout_key_is_zero_filled_and_reported() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .normalization(Normalization::None)
        .fit(&[&delta])
        .unwrap();
    let mut partial = LoraAdapter::new();
    for e in delta
        .as_adapter()
        .iter()
        .filter(|e| e.key.canonical() != FIRST_B)
    {
        partial.insert(e.key.canonical(), e.tensor.clone()).unwrap();
    }
    let features = spec.transform(&partial).unwrap();
    assert_eq!(features.report.zero_filled, [FIRST_B]);
    let block = &spec.layout()[0];
    assert_eq!(block.key, FIRST_B);
    assert!(features.values[..block.len()].iter().all(|&v| v == 0.0));
    let full = spec.transform(&delta).unwrap().values;
    assert_eq!(features.values[block.len()..], full[block.len()..]);
}

#[test]
fn an_extra_selected_key_is_ignored_and_reported() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[&delta])
        .unwrap();
    let mut bigger = delta.as_adapter().clone();
    let extra = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight";
    bigger
        .insert(extra, LoraTensor::new("x", [2, 4], vec![1.0; 8]).unwrap())
        .unwrap();
    let features = spec.transform(&bigger).unwrap();
    assert_eq!(features.report.ignored, [extra]);
    assert_eq!(features.values, spec.transform(&delta).unwrap().values);
}

#[test]
fn a_changed_size_is_an_error_naming_the_key_and_shapes() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[&delta])
        .unwrap();
    let mut changed = delta.as_adapter().clone();
    changed
        .insert(FIRST_B, LoraTensor::zeros("b", [16, 8]).unwrap())
        .unwrap();
    match spec.transform(&changed) {
        Err(Error::ShapeMismatch {
            tensor,
            expected,
            found,
        }) => {
            assert_eq!(tensor, FIRST_B);
            assert_eq!((expected, found), (vec![16, 4], vec![16, 8]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn training_deltas_that_disagree_on_a_shape_cannot_be_fitted() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let mut other = delta.as_adapter().clone();
    other
        .insert(FIRST_B, LoraTensor::zeros("b", [16, 8]).unwrap())
        .unwrap();
    let deltas = [delta.as_adapter().clone(), other];
    assert!(matches!(
        FeatureConfig::default().fit(&deltas),
        Err(Error::ShapeMismatch { .. })
    ));
    let none: [LoraAdapter; 0] = [];
    assert!(matches!(
        FeatureConfig::default().fit(&none),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn non_finite_values_are_an_error_naming_tensor_and_index() {
    let base = base();
    let nan = LoraAdapter::load(fixture("broken/nan_update.safetensors")).unwrap();
    let delta = LoraDelta::between(&nan, &base).unwrap();
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(&[LoraDelta::between(&update(), &base).unwrap()])
        .unwrap();
    match spec.transform(&delta) {
        Err(Error::NonFinite {
            tensor,
            index,
            value,
        }) => {
            assert_eq!(tensor, FIRST_B);
            assert_eq!(index, 4 + 2); // row 1, column 2 of a [16, 4] matrix
            assert!(value.is_nan());
        }
        other => panic!("{other:?}"),
    }
    match nan.check_finite() {
        Err(Error::NonFinite { tensor, .. }) => assert_eq!(tensor, FIRST_B),
        other => panic!("{other:?}"),
    }
}

#[test]
fn batch_transform_stacks_rows_in_order() {
    let base = base();
    let d1 = LoraDelta::between(&update(), &base).unwrap();
    let d2 = LoraDelta::between(&base, &update()).unwrap();
    let spec = FeatureConfig::default().fit(&[&d1, &d2]).unwrap();
    let (matrix, reports): (Array2<f32>, _) = spec.transform_batch(&[&d1, &d2]).unwrap();
    assert_eq!(matrix.dim(), (2, spec.dim()));
    assert_eq!(reports.len(), 2);
    let r1 = spec.transform(&d1).unwrap().values;
    assert_eq!(matrix.row(0).to_vec(), r1);
    // d2 = −d1, and normalisation keeps the sign.
    let neg: Vec<f32> = r1.iter().map(|v| -v).collect();
    assert_eq!(matrix.row(1).to_vec(), neg);
}

#[test]
fn feature_spec_survives_serde() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::default().fit(&[&delta]).unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    let back: safe_fedllm::features::FeatureSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);
    assert_eq!(
        back.transform(&delta).unwrap().values,
        spec.transform(&delta).unwrap().values
    );
}

#[test]
fn output_buffer_of_the_wrong_size_is_refused() {
    let delta = LoraDelta::between(&update(), &base()).unwrap();
    let spec = FeatureConfig::default().fit(&[&delta]).unwrap();
    let mut out = vec![0.0; spec.dim() + 1];
    assert!(matches!(
        spec.transform_into(&delta, &mut out),
        Err(Error::DimensionMismatch { expected, found, .. }) if expected == spec.dim() && found == spec.dim() + 1
    ));
    let _ = delta.shape_of(FIRST_B);
}
