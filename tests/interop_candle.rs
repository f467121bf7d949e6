//! candle ↔ PEFT interop (feature `candle`): bit-exact round trips in f32,
//! f16 and bf16 for tensors and `Var`s, range reads, and typed errors for
//! missing, renamed, extra and wrongly shaped tensors (nothing written after
//! each).

#![cfg(feature = "candle")]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use safe_fedllm::Error;
use safe_fedllm::interop::candle::{CandleLora, adapter_to_tensors};
use safe_fedllm::lora::{LoraAdapter, LoraTensor, TensorSource};

const RANK: usize = 3;
const D_IN: usize = 7;
const D_OUT: usize = 5;

fn key(layer: usize, module: &str, factor: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight")
}

fn value(seed: usize, i: usize) -> f32 {
    let x = (seed as u64 + 1)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add((i as u64).wrapping_mul(1_442_695_040_888_963_407))
        >> 40;
    (x as f32 / (1u64 << 24) as f32 - 0.5) * 0.41
}

fn shapes() -> Vec<(String, [usize; 2])> {
    let mut out = Vec::new();
    for layer in 0..2 {
        for module in ["q_proj", "v_proj"] {
            out.push((key(layer, module, "A"), [RANK, D_IN]));
            out.push((key(layer, module, "B"), [D_OUT, RANK]));
        }
    }
    out
}

/// A hand-built PEFT adapter, values rounded to `dtype` (so they are exactly
/// representable there).
fn adapter(seed: usize, dtype: DType) -> LoraAdapter {
    let mut adapter = LoraAdapter::new();
    for (n, (name, shape)) in shapes().into_iter().enumerate() {
        let raw: Vec<f32> = (0..shape[0] * shape[1])
            .map(|i| value(seed + n, i))
            .collect();
        let rounded = Tensor::from_vec(raw, shape.to_vec(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        adapter
            .insert(&name, LoraTensor::new(&name, shape, rounded).unwrap())
            .unwrap();
    }
    adapter
}

fn tensors(seed: usize, dtype: DType) -> HashMap<String, Tensor> {
    adapter_to_tensors(&adapter(seed, dtype), dtype, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Raw bits of a candle tensor in its own dtype.
fn raw_bits(t: &Tensor) -> Vec<u32> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| u32::from(x.to_bits()))
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| u32::from(x.to_bits()))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn all_bits(lora: &CandleLora) -> Vec<(String, DType, Vec<u32>)> {
    lora.lora_keys()
        .map(|k| {
            let t = lora.tensor(k.canonical()).unwrap();
            (k.canonical().to_owned(), t.dtype(), raw_bits(t))
        })
        .collect()
}

#[test]
fn tensors_to_source_to_adapter_to_tensors_is_bit_exact_in_every_dtype() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let original = tensors(1, dtype);
        let before: HashMap<String, Vec<u32>> = original
            .iter()
            .map(|(k, t)| (k.clone(), raw_bits(t)))
            .collect();
        let mut lora = CandleLora::from_tensors(original).unwrap();
        // Out as f32, unchanged (the widening is exact) …
        let out = lora.to_adapter().unwrap();
        assert_eq!(out, adapter(1, dtype), "{dtype:?}");
        // … back in, same dtype, same bits.
        lora.write_from(&out).unwrap();
        for (name, tensor) in lora.clone().into_tensors() {
            assert_eq!(tensor.dtype(), dtype);
            assert_eq!(raw_bits(&tensor), before[&name], "{dtype:?} {name}");
        }
        // A different adapter goes in and comes out exactly.
        let other = adapter(2, dtype);
        let source: &dyn TensorSource = &other;
        lora.write_from(source).unwrap();
        assert_eq!(lora.to_adapter().unwrap(), other, "{dtype:?}");
    }
}

#[test]
fn vars_are_set_in_place() {
    let init = tensors(3, DType::BF16);
    let vars: Vec<(String, Var)> = init
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let mut lora = CandleLora::from_vars(vars.iter().map(|(k, v)| (k, v))).unwrap();
    assert_eq!(lora.to_adapter().unwrap(), adapter(3, DType::BF16));
    let global = adapter(4, DType::BF16);
    lora.write_from(&global).unwrap();
    // The caller's variables (an optimiser's, a model's) see the new values.
    for (name, var) in &vars {
        let expected = LoraTensor::new(
            name,
            global.get(name).unwrap().shape(),
            var.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(&expected, global.get(name).unwrap(), "{name}");
        assert_eq!(var.dtype(), DType::BF16);
    }
}

#[test]
fn range_reads_convert_only_the_range_and_match_whole_reads() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let lora = CandleLora::from_tensors(tensors(5, dtype)).unwrap();
        let whole = lora.to_adapter().unwrap();
        let name = key(1, "v_proj", "A");
        let values = whole.get(&name).unwrap().as_slice();
        for (offset, len) in [(0, 1), (3, 5), (D_IN * RANK - 2, 2), (4, 0)] {
            let mut out = vec![f32::NAN; len];
            lora.read_range(&name, offset, &mut out).unwrap();
            assert_eq!(
                out,
                values[offset..offset + len],
                "{dtype:?} @{offset}+{len}"
            );
        }
        let mut out = [0.0f32; 3];
        let err = lora
            .read_range(&name, D_IN * RANK - 2, &mut out)
            .unwrap_err();
        assert!(matches!(err, Error::DataLength { .. }), "{err}");
        let err = lora.read_range(&name, usize::MAX, &mut out).unwrap_err();
        assert!(matches!(err, Error::DataLength { .. }), "{err}");
        let err = lora
            .read_range("nope.lora_A.weight", 0, &mut out)
            .unwrap_err();
        assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    }
}

#[test]
fn non_contiguous_tensors_read_in_logical_order() {
    // lora_A stored as the transpose of a [D_IN, RANK] tensor: a strided view.
    let a = adapter(6, DType::F32);
    let name_a = key(0, "q_proj", "A");
    let peft_a = a.get(&name_a).unwrap();
    let stored = Tensor::from_vec(peft_a.transposed().into_vec(), (D_IN, RANK), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(!stored.is_contiguous());
    let name_b = key(0, "q_proj", "B");
    let b = Tensor::from_slice(
        a.get(&name_b).unwrap().as_slice(),
        (D_OUT, RANK),
        &Device::Cpu,
    )
    .unwrap();
    let lora = CandleLora::from_tensors([(name_a.clone(), stored), (name_b, b)]).unwrap();
    let mut out = vec![0.0f32; RANK * D_IN];
    lora.copy_into(&name_a, &mut out).unwrap();
    assert_eq!(out, peft_a.as_slice());
    let mut part = [0.0f32; 4];
    lora.read_range(&name_a, 5, &mut part).unwrap();
    assert_eq!(part, peft_a.as_slice()[5..9]);
}

#[test]
fn adapter_names_with_an_adapter_segment_are_canonicalised() {
    let t = Tensor::zeros((RANK, D_IN), DType::F32, &Device::Cpu).unwrap();
    let raw = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight";
    let lora = CandleLora::from_tensors([(raw, t)]).unwrap();
    let canonical = key(0, "q_proj", "A");
    assert_eq!(lora.shape_of(&canonical), Some([RANK, D_IN]));
    assert_eq!(lora.name(&canonical), Some(raw));
    assert!(lora.into_tensors().contains_key(raw));
}

/// The error, and proof that nothing was written.
fn rejected(lora: &mut CandleLora, source: &LoraAdapter) -> Error {
    let before = all_bits(lora);
    let err = lora.write_from(source).unwrap_err();
    assert_eq!(all_bits(lora), before, "tensors moved on {err}");
    err
}

#[test]
fn missing_extra_and_misshaped_tensors_are_typed_errors_naming_them() {
    for dtype in [DType::F32, DType::BF16] {
        let mut lora = CandleLora::from_tensors(tensors(7, dtype)).unwrap();
        let full = adapter(8, dtype);

        // Missing.
        let gone = key(1, "q_proj", "B");
        let mut missing = LoraAdapter::new();
        for e in full.iter().filter(|e| e.key.canonical() != gone) {
            missing.insert(e.key.canonical(), e.tensor.clone()).unwrap();
        }
        let err = rejected(&mut lora, &missing);
        assert!(
            matches!(&err, Error::MissingKey { tensor, present_in: "the candle tensors", .. } if *tensor == gone),
            "{err}"
        );

        // Extra.
        let extra = key(0, "k_proj", "A");
        let mut more = full.clone();
        more.insert(&extra, LoraTensor::zeros(&extra, [RANK, D_IN]).unwrap())
            .unwrap();
        let err = rejected(&mut lora, &more);
        assert!(
            matches!(&err, Error::MissingKey { tensor, present_in: "the source", .. } if *tensor == extra),
            "{err}"
        );

        // Renamed: layer 1's v_proj under k_proj.
        let mut renamed = LoraAdapter::new();
        for e in full.iter() {
            let name = e
                .key
                .canonical()
                .replace("layers.1.self_attn.v_proj", "layers.1.self_attn.k_proj");
            renamed.insert(&name, e.tensor.clone()).unwrap();
        }
        let err = rejected(&mut lora, &renamed);
        assert!(
            matches!(&err, Error::MissingKey { tensor, .. } if tensor.contains("v_proj") || tensor.contains("k_proj")),
            "{err}"
        );

        // Wrong shape (transposed, as a burn-oriented tensor would be).
        let wrong = key(0, "v_proj", "A");
        let mut misshaped = full.clone();
        misshaped
            .insert(&wrong, full.get(&wrong).unwrap().transposed())
            .unwrap();
        let err = rejected(&mut lora, &misshaped);
        assert!(
            matches!(&err, Error::ShapeMismatch { tensor, expected, found }
                if *tensor == wrong && expected == &[RANK, D_IN] && found == &[D_IN, RANK]),
            "{err}"
        );

        // And the full adapter still goes in.
        lora.write_from(&full).unwrap();
        assert_eq!(lora.to_adapter().unwrap(), full);
    }
}

#[test]
fn inputs_that_are_not_lora_matrices_are_typed_errors() {
    let dev = Device::Cpu;
    let m = |dtype| Tensor::zeros((RANK, D_IN), dtype, &dev).unwrap();
    // A non-LoRA name (a base weight) is refused, not skipped.
    let err = CandleLora::from_tensors([("model.layers.0.self_attn.q_proj.weight", m(DType::F32))])
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotALoraKey { key } if key == "model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    // Two names for one tensor.
    let err = CandleLora::from_tensors([
        (key(0, "q_proj", "A"), m(DType::F32)),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight".into(),
            m(DType::F32),
        ),
    ])
    .unwrap_err();
    assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
    // Not a matrix.
    let cube = Tensor::zeros((2, 2, 2), DType::F32, &dev).unwrap();
    let err = CandleLora::from_tensors([(key(0, "q_proj", "A"), cube)]).unwrap_err();
    assert!(matches!(err, Error::NotAMatrix { .. }), "{err}");
    // Dtypes that do not round-trip through f32, or are not floats.
    for dtype in [DType::F64, DType::U8, DType::I64] {
        let err = CandleLora::from_tensors([(key(0, "q_proj", "A"), m(dtype))]).unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedDtype { tensor, .. } if *tensor == key(0, "q_proj", "A")),
            "{dtype:?}: {err}"
        );
    }
    // Ranks of A and B disagree.
    let err = CandleLora::from_tensors([
        (key(0, "q_proj", "A"), m(DType::F32)),
        (
            key(0, "q_proj", "B"),
            Tensor::zeros((D_OUT, RANK + 1), DType::F32, &dev).unwrap(),
        ),
    ])
    .unwrap_err();
    assert!(matches!(err, Error::RankMismatch { .. }), "{err}");
    // Nothing is not an update.
    let none: [(String, Tensor); 0] = [];
    assert!(matches!(
        CandleLora::from_tensors(none),
        Err(Error::Empty { .. })
    ));
    // Only float dtypes can be asked for on the way out.
    let err = adapter_to_tensors(&adapter(1, DType::F32), DType::U32, &dev).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
}

#[test]
fn a_fresh_checkpoint_round_trips_through_candle_safetensors() {
    let dir = std::env::temp_dir().join(format!("interop-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adapter.safetensors");
    let global = adapter(9, DType::F16);
    let tensors: HashMap<String, Tensor> = adapter_to_tensors(&global, DType::F16, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    // Read back by this crate's own parser, in PEFT names and orientation.
    let read = LoraAdapter::load(&path).unwrap();
    assert_eq!(bits(&read), bits(&global));
    std::fs::remove_dir_all(&dir).unwrap();
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
fn the_public_type_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<CandleLora>();
    let lora = CandleLora::from_tensors(tensors(10, DType::F16)).unwrap();
    let whole = lora.to_adapter().unwrap();
    // Read concurrently from two threads through `&dyn TensorSource`.
    let source: &dyn TensorSource = &lora;
    std::thread::scope(|s| {
        for entry in whole.iter() {
            s.spawn(move || {
                let key = entry.key.canonical();
                let mut out = vec![0.0f32; entry.tensor.len()];
                source.copy_into(key, &mut out).unwrap();
                assert_eq!(out, entry.tensor.as_slice(), "{key}");
            });
        }
    });
}
