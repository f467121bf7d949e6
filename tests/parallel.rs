//! Results do not depend on the number of threads: the same round or fit on a
//! 1-thread and a 3-thread rayon pool gives bit-identical outputs.
//!
//! The inputs are large enough to be split into many parts (the aggregation
//! engine groups chunks of 4096 coordinates, the trainer blocks of rows), so
//! the 3-thread runs really spread partial sums (Gram matrices, norms,
//! gradients) over workers; the 1-thread runs do everything on one. A split
//! or reduction order that followed the thread count changes the trainer's
//! low-order bits and fails its test. The aggregation engine adds f32 partial
//! sums in f64, which is close to exact in any order, so its grouping is also
//! checked directly (`aggregate::engine::drive::tests::drive_groups_depend_on_the_item_count_only`
//! and `parallel::tests`).

use ndarray::Array2;
use safe_fedllm::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ClipBound, CoordinateMedian, FedAvg, FoolsGold,
    GeometricMedian, Krum, MultiKrum, NormClipping, unflatten,
};
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, LoraAdapter, LoraTensor, StorageDtype, TensorSource};
use safe_fedllm::probe::{Label, LogisticParams, Trainer};

const KEY_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const KEY_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// 2 × 16 chunks of 4096 coordinates.
const HALF: usize = 16 * 4096;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Runs `f` on a 1-thread and a 3-thread pool and returns both results.
fn on_1_and_3<R: Send>(f: impl Fn() -> R + Sync) -> (R, R) {
    (pool(1).install(&f), pool(3).install(&f))
}

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
}

fn template() -> LoraAdapter {
    let mut t = LoraAdapter::new();
    t.insert(KEY_A, LoraTensor::zeros("a", [1, HALF]).unwrap())
        .unwrap();
    t.insert(KEY_B, LoraTensor::zeros("b", [HALF, 1]).unwrap())
        .unwrap();
    t
}

/// `n` clients with values of very different magnitudes (so the order of
/// floating-point additions shows in the low bits).
fn clients(n: usize, seed: u64) -> Vec<LoraAdapter> {
    let global = template();
    let mut state = seed;
    (0..n)
        .map(|k| {
            let scale = 10f32.powi(k as i32 % 5 - 2);
            let v: Vec<f32> = (0..2 * HALF).map(|_| lcg(&mut state) * scale).collect();
            unflatten(&global, &v).unwrap()
        })
        .collect()
}

fn updates<'a>(adapters: &'a [&'a dyn TensorSource]) -> Vec<ClientUpdate<'a>> {
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), *a, 10 + i as u64))
        .collect()
}

/// Runs `rule` on both pools, with `f32` clients and with BF16 uploads (read
/// through per-worker scratch buffers), and asserts bit-identical results.
fn assert_thread_independent(name: &str, make: impl Fn() -> Box<dyn Aggregator> + Sync) {
    let global = template();
    let owned = clients(9, 42);
    let bytes: Vec<Vec<u8>> = owned
        .iter()
        .map(|a| a.to_bytes(StorageDtype::Bf16).unwrap())
        .collect();
    let views: Vec<AdapterView<'_>> = bytes
        .iter()
        .map(|b| AdapterView::parse(b).unwrap())
        .collect();
    let f32_sources: Vec<&dyn TensorSource> =
        owned.iter().map(|a| a as &dyn TensorSource).collect();
    let bf16_sources: Vec<&dyn TensorSource> =
        views.iter().map(|v| v as &dyn TensorSource).collect();
    for (kind, sources) in [("f32", &f32_sources), ("bf16", &bf16_sources)] {
        let run = || -> Aggregation { make().aggregate(&global, &updates(sources)).unwrap() };
        let (one, three) = on_1_and_3(run);
        assert!(!one.is_skipped(), "{name} {kind}: skipped");
        // Debug prints every f32/f64 in its shortest round-trip form: equal
        // strings mean equal bits (weights, scores, the new global adapter).
        assert_eq!(
            format!("{one:?}"),
            format!("{three:?}"),
            "{name} {kind}: 1 vs 3 threads"
        );
    }
}

#[test]
fn fedavg_is_bit_identical_on_1_and_3_threads() {
    assert_thread_independent("fedavg", || Box::new(FedAvg::new()));
}

#[test]
fn coordinate_median_is_bit_identical_on_1_and_3_threads() {
    assert_thread_independent("median", || Box::new(CoordinateMedian::new()));
}

#[test]
fn krum_is_bit_identical_on_1_and_3_threads() {
    assert_thread_independent("krum", || Box::new(Krum::new(2).unwrap()));
    assert_thread_independent("multi-krum", || Box::new(MultiKrum::new(2, 4).unwrap()));
}

#[test]
fn norm_based_rules_are_bit_identical_on_1_and_3_threads() {
    assert_thread_independent("geomed", || Box::new(GeometricMedian::new()));
    assert_thread_independent("clipping", || {
        Box::new(NormClipping::new(ClipBound::MedianNorm).unwrap())
    });
    assert_thread_independent("foolsgold", || Box::new(FoolsGold::new()));
}

#[test]
fn probe_trainer_is_bit_identical_on_1_and_3_threads() {
    // 384 rows × 1024 columns: several row blocks, so the gradient is summed
    // from several partial buffers.
    let (rows, cols) = (384, 1024);
    let mut state = 7u64;
    let labels: Vec<Label> = (0..rows)
        .map(|i| {
            if i % 4 == 0 {
                Label::Malicious
            } else {
                Label::Benign
            }
        })
        .collect();
    let x = Array2::from_shape_fn((rows, cols), |(i, j)| {
        let shift = if i % 4 == 0 && j % 7 == 0 { 0.3 } else { 0.0 };
        lcg(&mut state) + shift
    });
    let fit = || {
        LogisticParams::default()
            .max_iterations(25)
            .fit(x.view(), &labels)
            .unwrap()
    };
    let (one, three) = on_1_and_3(fit);
    let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one.weights), bits(&three.weights));
    assert_eq!(one.bias.to_bits(), three.bias.to_bits());
    assert_eq!(format!("{:?}", one.report), format!("{:?}", three.report));
}

#[test]
fn l2_features_are_bit_identical_on_1_and_3_threads() {
    // 2 × 2^20 values: several parts of the feature transform, whose L2 norm
    // is summed per part.
    let big = 1 << 20;
    let mut adapter = LoraAdapter::new();
    let mut state = 3u64;
    let values = |state: &mut u64| (0..big).map(|_| lcg(state)).collect::<Vec<f32>>();
    adapter
        .insert(
            KEY_A,
            LoraTensor::new("a", [1, big], values(&mut state)).unwrap(),
        )
        .unwrap();
    adapter
        .insert(
            KEY_B,
            LoraTensor::new("b", [big, 1], values(&mut state)).unwrap(),
        )
        .unwrap();
    let spec = FeatureConfig::new(Selection::AllLayers)
        .fit(std::slice::from_ref(&adapter))
        .unwrap();
    let (one, three) = on_1_and_3(|| spec.transform(&adapter).unwrap().values);
    let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&one), bits(&three));
}
