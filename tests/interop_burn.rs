//! burn ↔ PEFT interop (feature `burn`): bit-exact round trips, orientation
//! against hand-built PEFT tensors, and typed errors for missing, renamed,
//! extra and wrongly shaped tensors (the module unchanged after each).

#![cfg(feature = "burn")]

use burn::module::{Lora, Module, ParamGroup};
use burn::nn::{Linear, LinearConfig};
use burn::store::{ModuleSnapshot, PathFilter, bridge};
use burn::tensor::{DType, Device, TensorData};
use safe_fedllm::Error;
use safe_fedllm::interop::burn::{
    BurnLora, BurnNames, LORA_PATH_REGEX, burn_peft_transpose, lora_filter, write_lora,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor, TensorSource};

#[derive(Module, Debug)]
struct Attn {
    q_proj: Linear,
    v_proj: Linear,
}

#[derive(Module, Debug)]
struct Mlp {
    down_proj: Linear,
}

#[derive(Module, Debug)]
struct Layer {
    attn: Attn,
    mlp: Mlp,
}

#[derive(Module, Debug)]
struct Tiny {
    layers: Vec<Layer>,
}

const D: usize = 6;
const KV: usize = 4;
const FF: usize = 5;
const RANK: usize = 3;
const ALPHA: f64 = 6.0;

fn peft(layer: usize, block: &str, module: &str, factor: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{factor}.weight")
}

/// Two layers; LoRA on q_proj, v_proj and mlp.down_proj.
fn tiny() -> Tiny {
    let device = Device::flex();
    let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(&device);
    let layers = (0..2)
        .map(|_| Layer {
            attn: Attn {
                q_proj: linear(D, D),
                v_proj: linear(D, KV),
            },
            mlp: Mlp {
                down_proj: linear(FF, D),
            },
        })
        .collect();
    let group = ParamGroup::from_regex(r"\.(q_proj|v_proj|down_proj)\.weight$").unwrap();
    Tiny { layers }.apply_lora(Lora::new(RANK, ALPHA).set_param_group(group))
}

/// Values with distinct, non-round bits, so a transposition or a conversion
/// slip cannot go unnoticed.
fn value(seed: u64, i: usize) -> f32 {
    let x = (seed.wrapping_mul(6_364_136_223_846_793_005)
        ^ (i as u64).wrapping_mul(1_442_695_040_888_963_407))
        >> 40;
    (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.37
}

/// A PEFT-orientation adapter matching [`tiny`], built by hand.
fn peft_adapter(seed: u64) -> LoraAdapter {
    let mut adapter = LoraAdapter::new();
    let mut n = 0;
    let mut put = |key: String, shape: [usize; 2]| {
        let values = (0..shape[0] * shape[1])
            .map(|i| value(seed + n, i))
            .collect();
        n += 1;
        adapter
            .insert(&key, LoraTensor::new(&key, shape, values).unwrap())
            .unwrap();
    };
    for layer in 0..2 {
        for (block, module, d_in, d_out) in [
            ("self_attn", "q_proj", D, D),
            ("self_attn", "v_proj", D, KV),
            ("mlp", "down_proj", FF, D),
        ] {
            put(peft(layer, block, module, "A"), [RANK, d_in]);
            put(peft(layer, block, module, "B"), [d_out, RANK]);
        }
    }
    adapter
}

fn snapshot(model: &Tiny) -> LoraAdapter {
    BurnLora::from_module(model, &BurnNames::llama())
        .unwrap()
        .into_adapter()
}

fn bits(adapter: &LoraAdapter) -> Vec<(String, Vec<u32>)> {
    adapter
        .iter()
        .map(|e| {
            (
                e.key.canonical().to_owned(),
                e.tensor.as_slice().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn module_to_source_to_adapter_to_module_is_bit_exact() {
    let mut model = tiny();
    let names = BurnNames::llama();
    // burn's own init (A random, B zero) goes out and back unchanged …
    let initial = BurnLora::from_module(&model, &names).unwrap();
    assert_eq!(initial.adapter().len(), 2 * 3 * 2);
    let adapter = initial.clone().into_adapter();
    assert_eq!(write_lora(&mut model, &adapter, &names).unwrap(), 12);
    assert_eq!(bits(&snapshot(&model)), bits(initial.adapter()));

    // … and so does a hand-built adapter, through `&dyn TensorSource`.
    let global = peft_adapter(7);
    let source: &dyn TensorSource = &global;
    write_lora(&mut model, source, &names).unwrap();
    let back = BurnLora::from_module(&model, &names).unwrap();
    assert_eq!(bits(back.adapter()), bits(&global));
    // Read through the trait too, range by range.
    for entry in global.iter() {
        let key = entry.key.canonical();
        let mut out = vec![0.0f32; entry.tensor.len()];
        for (i, chunk) in out.chunks_mut(4).enumerate() {
            back.read_range(key, i * 4, chunk).unwrap();
        }
        assert_eq!(out, entry.tensor.as_slice(), "{key}");
    }
}

#[test]
fn burn_factors_are_the_transposes_of_hand_built_peft_tensors() {
    let mut model = tiny();
    let names = BurnNames::llama();
    let global = peft_adapter(3);
    write_lora(&mut model, &global, &names).unwrap();

    // The raw burn parameters: a = lora_Aᵀ [d_in, r], b = lora_Bᵀ [r, d_out].
    let v = &model.layers[1].attn.v_proj.weight;
    let lora = v.adapter().expect("v_proj carries LoRA");
    let a = lora.a.val();
    let b = lora.b.val();
    assert_eq!(a.dims(), [D, RANK]);
    assert_eq!(b.dims(), [RANK, KV]);
    let a = a.into_data().try_into_vec::<f32>().unwrap();
    let b = b.into_data().try_into_vec::<f32>().unwrap();
    let peft_a = global.get(&peft(1, "self_attn", "v_proj", "A")).unwrap();
    let peft_b = global.get(&peft(1, "self_attn", "v_proj", "B")).unwrap();
    for i in 0..D {
        for k in 0..RANK {
            assert_eq!(a[i * RANK + k], peft_a.as_slice()[k * D + i], "a[{i}, {k}]");
        }
    }
    for k in 0..RANK {
        for o in 0..KV {
            assert_eq!(
                b[k * KV + o],
                peft_b.as_slice()[o * RANK + k],
                "b[{k}, {o}]"
            );
        }
    }

    // And the model computes PEFT's ΔW = (α/r)·B·A, transposed to burn's [in, out].
    let effective = v.val().into_data().try_into_vec::<f32>().unwrap();
    let base = v.base().into_data().try_into_vec::<f32>().unwrap();
    let scale = (ALPHA / RANK as f64) as f32;
    for i in 0..D {
        for o in 0..KV {
            let delta: f32 = (0..RANK)
                .map(|k| peft_b.as_slice()[o * RANK + k] * peft_a.as_slice()[k * D + i])
                .sum::<f32>()
                * scale;
            let burn = effective[i * KV + o] - base[i * KV + o];
            assert!(
                (delta - burn).abs() < 1e-5,
                "ΔW[{o}, {i}]: {delta} vs {burn}"
            );
        }
    }
}

#[test]
fn the_conversion_function_is_a_tested_transpose() {
    let burn_b = LoraTensor::new("b", [2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let peft_b = burn_peft_transpose(&burn_b);
    assert_eq!(peft_b.shape(), [3, 2]);
    assert_eq!(peft_b.as_slice(), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert_eq!(burn_peft_transpose(&peft_b), burn_b);
    // Degenerate shapes survive too.
    let empty = LoraTensor::zeros("e", [0, 4]).unwrap();
    assert_eq!(burn_peft_transpose(&empty).shape(), [4, 0]);
}

#[test]
fn collected_tensors_and_the_public_regex_agree() {
    let model = tiny();
    let by_regex = model.collect(
        Some(PathFilter::new().with_regex(LORA_PATH_REGEX)),
        None,
        false,
    );
    let by_filter = model.collect(Some(lora_filter()), None, false);
    let names = |ts: &[burn::store::burn_pack::Tensor]| {
        ts.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&by_regex), names(&by_filter));
    let from_collected = BurnLora::from_collected(by_regex, &BurnNames::llama()).unwrap();
    assert_eq!(
        from_collected,
        BurnLora::from_module(&model, &BurnNames::llama()).unwrap()
    );
    assert_eq!(
        from_collected.burn_path(&peft(0, "mlp", "down_proj", "B")),
        Some("layers.0.mlp.down_proj.weight.lora.b")
    );
}

#[test]
fn half_precision_factors_widen_exactly() {
    // A collected f16 / bf16 factor reads as the same numbers in f32.
    let values: Vec<f32> = (0..RANK * D).map(|i| value(11, i)).collect();
    for dtype in [DType::F16, DType::BF16] {
        let data = TensorData::new(values.clone(), [D, RANK]).convert_dtype(dtype);
        let expected: Vec<f32> = data.clone().try_into_vec_as::<f32>().unwrap();
        let tensor = bridge::from_data(data, "layers.0.attn.q_proj.weight.lora.a".into(), None);
        let lora = BurnLora::from_collected([tensor], &BurnNames::llama()).unwrap();
        let peft_a = lora
            .adapter()
            .get(&peft(0, "self_attn", "q_proj", "A"))
            .unwrap();
        assert_eq!(peft_a.shape(), [RANK, D]);
        let back = burn_peft_transpose(peft_a);
        assert_eq!(back.as_slice(), expected.as_slice(), "{dtype:?}");
        // And narrowing the widened values gives back the same bits.
        let again = TensorData::new(back.into_vec(), [D, RANK]).convert_dtype(dtype);
        assert_eq!(
            again.as_bytes(),
            TensorData::new(values.clone(), [D, RANK])
                .convert_dtype(dtype)
                .as_bytes()
        );
    }
}

/// The error, and proof that the module did not move.
fn rejected(model: &mut Tiny, source: &LoraAdapter, names: &BurnNames) -> Error {
    let before = bits(&snapshot(model));
    let err = write_lora(model, source, names).unwrap_err();
    assert_eq!(bits(&snapshot(model)), before, "the module moved on {err}");
    err
}

#[test]
fn a_missing_tensor_is_a_typed_error_naming_it() {
    let mut model = tiny();
    let mut global = peft_adapter(1);
    let gone = peft(1, "mlp", "down_proj", "B");
    let mut without = LoraAdapter::new();
    for e in global.iter().filter(|e| e.key.canonical() != gone) {
        without.insert(e.key.canonical(), e.tensor.clone()).unwrap();
    }
    let err = rejected(&mut model, &without, &BurnNames::llama());
    assert!(
        matches!(&err, Error::MissingKey { tensor, present_in: "the burn module", missing_from: "the source" } if *tensor == gone),
        "{err}"
    );
    // Sanity: the complete adapter is accepted.
    write_lora(&mut model, &global, &BurnNames::llama()).unwrap();
    global.get_mut(&gone).unwrap().as_mut_slice()[0] = 9.0;
    write_lora(&mut model, &global, &BurnNames::llama()).unwrap();
    assert_eq!(snapshot(&model).get(&gone).unwrap().as_slice()[0], 9.0);
}

#[test]
fn an_extra_or_renamed_tensor_is_a_typed_error_naming_it() {
    let mut model = tiny();
    let mut global = peft_adapter(2);
    let extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    global
        .insert(extra, LoraTensor::zeros(extra, [RANK, D]).unwrap())
        .unwrap();
    let err = rejected(&mut model, &global, &BurnNames::llama());
    assert!(
        matches!(&err, Error::MissingKey { tensor, present_in: "the source", missing_from: "the burn module" } if tensor == extra),
        "{err}"
    );

    // A module path the name map does not know is refused, not skipped.
    let partial = BurnNames::table([(
        "layers.0.attn.q_proj.weight",
        "base_model.model.model.layers.0.self_attn.q_proj",
    )]);
    let err = BurnLora::from_module(&model, &partial).unwrap_err();
    assert!(
        matches!(&err, Error::UnmappedTensor { library: "burn", map, .. } if map == "table"),
        "{err}"
    );
    let err = rejected(&mut model, &peft_adapter(2), &partial);
    assert!(matches!(err, Error::UnmappedTensor { .. }), "{err}");

    // A renaming map sends tensors to other PEFT keys: the adapter's no longer fit.
    let renamed = BurnNames::from_fn("renamed", |param| {
        Some(format!("model.{}", param.trim_end_matches(".weight")))
    });
    let out = BurnLora::from_module(&model, &renamed).unwrap();
    assert!(
        out.shape_of("model.layers.0.attn.q_proj.lora_A.weight")
            .is_some()
    );
    let err = rejected(&mut model, &peft_adapter(2), &renamed);
    assert!(
        matches!(&err, Error::MissingKey { tensor, .. } if tensor.starts_with("model.layers.")),
        "{err}"
    );

    // Two burn paths on one PEFT key are a duplicate.
    let collapsing = BurnNames::from_fn("collapsing", |_| Some("m.layers.0.x".into()));
    let err = BurnLora::from_module(&model, &collapsing).unwrap_err();
    assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
    let err = rejected(&mut model, &peft_adapter(2), &collapsing);
    assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
}

#[test]
fn a_wrong_shape_is_a_typed_error_naming_it() {
    let mut model = tiny();
    let key = peft(0, "self_attn", "v_proj", "B");
    // The burn shape given in PEFT orientation (not transposed) is wrong.
    let mut global = peft_adapter(4);
    global
        .insert(&key, LoraTensor::zeros(&key, [RANK, KV]).unwrap())
        .unwrap();
    let err = rejected(&mut model, &global, &BurnNames::llama());
    assert!(
        matches!(&err, Error::ShapeMismatch { tensor, expected, found }
            if *tensor == key && expected == &[KV, RANK] && found == &[RANK, KV]),
        "{err}"
    );
    // A rank change is refused too.
    let mut global = peft_adapter(4);
    global
        .insert(&key, LoraTensor::zeros(&key, [KV, RANK + 1]).unwrap())
        .unwrap();
    let err = rejected(&mut model, &global, &BurnNames::llama());
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

#[test]
fn collected_tensors_that_are_not_lora_matrices_are_typed_errors() {
    let names = BurnNames::llama();
    // Not a LoRA path at all.
    let plain = bridge::from_data(
        TensorData::new(vec![0.0f32; 4], [2, 2]),
        "layers.0.attn.q_proj.weight".into(),
        None,
    );
    let err = BurnLora::from_collected([plain], &names).unwrap_err();
    assert!(
        matches!(&err, Error::UnmappedTensor { tensor, .. } if tensor == "layers.0.attn.q_proj.weight"),
        "{err}"
    );
    // Not a matrix.
    let cube = bridge::from_data(
        TensorData::new(vec![0.0f32; 8], [2, 2, 2]),
        "layers.0.attn.q_proj.weight.lora.a".into(),
        None,
    );
    let err = BurnLora::from_collected([cube], &names).unwrap_err();
    assert!(matches!(err, Error::NotAMatrix { .. }), "{err}");
    // f64 would not round-trip through f32.
    let wide = bridge::from_data(
        TensorData::new(vec![0.0f64; 4], [2, 2]),
        "layers.0.attn.q_proj.weight.lora.a".into(),
        None,
    );
    let err = BurnLora::from_collected([wide], &names).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedDtype { tensor, .. } if tensor.ends_with(".lora.a")),
        "{err}"
    );
    // Ranks of A and B must agree.
    let a = bridge::from_data(
        TensorData::new(vec![0.0f32; 6], [3, 2]),
        "layers.0.attn.q_proj.weight.lora.a".into(),
        None,
    );
    let b = bridge::from_data(
        TensorData::new(vec![0.0f32; 9], [3, 3]),
        "layers.0.attn.q_proj.weight.lora.b".into(),
        None,
    );
    let err = BurnLora::from_collected([a, b], &names).unwrap_err();
    assert!(matches!(err, Error::RankMismatch { .. }), "{err}");
    // Nothing collected is not an empty update.
    let err = BurnLora::from_collected([], &names).unwrap_err();
    assert!(matches!(err, Error::Empty { .. }), "{err}");
}

#[test]
fn a_module_without_lora_is_refused_both_ways() {
    let device = Device::flex();
    let bare = Tiny {
        layers: vec![Layer {
            attn: Attn {
                q_proj: LinearConfig::new(D, D).init(&device),
                v_proj: LinearConfig::new(D, KV).init(&device),
            },
            mlp: Mlp {
                down_proj: LinearConfig::new(FF, D).init(&device),
            },
        }],
    };
    let mut bare = bare;
    assert!(matches!(
        BurnLora::from_module(&bare, &BurnNames::llama()),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        write_lora(&mut bare, &peft_adapter(1), &BurnNames::llama()),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn the_public_types_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<BurnLora>();
    shared::<BurnNames>();
    let boxed: Box<dyn TensorSource + Send> =
        Box::new(BurnLora::from_module(&tiny(), &BurnNames::llama()).unwrap());
    assert_eq!(boxed.lora_keys().count(), 12);
}
