//! The attacker's tests for the bounds a round puts on what an admitted
//! client can do: the magnitude and sample medians, the sybils that stay
//! inside them, the scale of a delta the probe sees, and the global the round
//! writes. Each test is named after the hole and asserts the typed outcome
//! and how far the global moved. (`attack_round.rs` holds the lies about
//! values, keys, counts and evidence.)
//!
//! Setting: a toy linear probe over the layer-0 lora_B delta (+x is
//! malicious, +y benign); honest clients move along +y, and lora_A is a
//! channel the probe does not read.

use safe_fedllm::Error;
use safe_fedllm::aggregate::FedAvg;
use safe_fedllm::detect::{AnyDetector, DefenseLevel};
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor, StorageDtype};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admission, Admitted, DefendedRound, NormBound, OverBound, OwnedReport, RoundOutcome,
    RoundParams, borrow_reports,
};

const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

/// lora_B = (x, y); lora_A = (a0, a1).
fn adapter(x: f32, y: f32, a: [f32; 2]) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    out.insert(B, LoraTensor::new("b", [2, 1], vec![x, y]).unwrap())
        .unwrap();
    out.insert(A, LoraTensor::new("a", [1, 2], a.to_vec()).unwrap())
        .unwrap();
    out
}

fn global() -> LoraAdapter {
    adapter(0.0, 0.0, [0.5, 0.5])
}

fn probe() -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(&adapter(1.0, 0.0, [0.5, 0.5]), &global()).unwrap()])
        .unwrap();
    LinearProbe::new(spec, vec![20.0, 0.0], -10.0).unwrap()
}

fn round(level: DefenseLevel) -> DefendedRound<LinearProbe, AnyDetector, FedAvg> {
    round_with(level, Admission::default())
}

fn round_with(
    level: DefenseLevel,
    admission: Admission,
) -> DefendedRound<LinearProbe, AnyDetector, FedAvg> {
    DefendedRound::new(
        probe(),
        AnyDetector::with_defaults(level).unwrap(),
        FedAvg::new(),
    )
    .with_params(RoundParams::default().admission(admission))
    .unwrap()
}

/// The default policy, and exclusion beyond 10 × the median: the medians
/// must hold under both.
fn policies() -> [(&'static str, Admission); 2] {
    let exclude = Admission::default()
        .norm_bound(NormBound::MedianMultiple(10.0))
        .unwrap()
        .over_bound(OverBound::Exclude);
    [
        ("default", Admission::default()),
        ("exclude at 10×", exclude),
    ]
}

/// An honest client: lora_B moves by `y` along +y (so ‖Δ‖ = y), lora_A stays.
fn honest(i: usize, y: f32) -> OwnedReport {
    OwnedReport::new(format!("h{i}"), adapter(0.0, y, [0.5, 0.5]), 100)
}

/// A client with a benign-looking (zero) lora_B that pushes lora_A by
/// `norm` along (1, 1)/√2: a channel the first-layer-B probe does not read.
fn a_pusher(name: &str, norm: f32, samples: u64) -> OwnedReport {
    let step = norm / std::f32::consts::SQRT_2;
    OwnedReport::new(name, adapter(0.0, 0.0, [0.5 + step, 0.5 + step]), samples)
}

/// ‖lora_A(new) − lora_A(global)‖₂: how far the global moved along the
/// channel honest clients leave alone.
fn a_movement(out: &RoundOutcome) -> f64 {
    let new = out.new_global.as_ref().expect("the round applied");
    let before = global();
    new.get(A)
        .unwrap()
        .as_slice()
        .iter()
        .zip(before.get(A).unwrap().as_slice())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The norm a client's update enters the rule with (0 when rejected), and,
/// when the bound was applied, the bound itself.
fn admitted_norm(status: &Admitted) -> (f64, Option<f64>) {
    match status {
        Admitted::Admitted { norm, .. } => (*norm, None),
        Admitted::Clipped { norm, scale, .. } => (norm * scale, Some(norm * scale)),
        Admitted::Rejected(safe_fedllm::round::Rejection::NormAboveBound { bound, .. }) => {
            (0.0, Some(*bound))
        }
        Admitted::Rejected(other) => panic!("unexpected rejection {other:?}"),
    }
}

#[test]
fn writing_the_global_refuses_values_that_overflow_f16_and_keeps_the_old_file() {
    // Every client (honestly) moves lora_A from 64,992 (exact in f16) to 66,000: a finite
    // global that f16 cannot hold.
    let start = adapter(0.0, 0.0, [64_992.0, 1.0]);
    let reports: Vec<OwnedReport> = (0..4)
        .map(|i| OwnedReport::new(format!("h{i}"), adapter(0.0, 0.1, [66_000.0, 1.0]), 100))
        .collect();
    let out = round(DefenseLevel::Client)
        .run(0, &start, &borrow_reports(&reports))
        .unwrap();
    let new = out.new_global.unwrap();
    assert_eq!(new.get(A).unwrap().as_slice()[0], 66_000.0);

    let dir = std::env::temp_dir().join(format!("sfl-write-global-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("global.safetensors");
    start.save(&path, StorageDtype::F16).unwrap();
    let before = std::fs::read(&path).unwrap();

    match new.save(&path, StorageDtype::F16) {
        Err(Error::StorageOverflow {
            tensor,
            index,
            value,
            dtype,
        }) => {
            assert_eq!(tensor, A);
            assert_eq!(index, 0);
            assert_eq!(value, 66_000.0);
            assert_eq!(dtype, "F16");
        }
        other => panic!("expected StorageOverflow, got {other:?}"),
    }
    // The file the next round reads is untouched: the global did not move on disk.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let reloaded = LoraAdapter::load(&path).unwrap();
    assert_eq!(reloaded.get(A).unwrap().as_slice()[0], 64_992.0);
    // BF16 holds 66,000 (rounded to 8 bits of mantissa: 66,048).
    new.save(&path, StorageDtype::Bf16).unwrap();
    let reloaded = LoraAdapter::load(&path).unwrap();
    assert!(reloaded.get(A).unwrap().as_slice()[0].is_finite());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tiny_deltas_are_normalised_and_score_like_the_unscaled_direction() {
    use safe_fedllm::detect::Verdict;
    use safe_fedllm::probe::Probe;

    let probe = probe();
    let unscaled = probe
        .score(&LoraDelta::between(&adapter(1.0, 0.2, [0.5, 0.5]), &global()).unwrap())
        .unwrap();
    assert!(unscaled > 0.99, "{unscaled}");
    // 1e-30 squares to 0 in f32; 1e-40 is subnormal and 1/‖Δ‖ overflows f32.
    for scale in [1e-20f32, 1e-30, 1e-40] {
        let tiny = adapter(scale, 0.2 * scale, [0.5, 0.5]);
        let score = probe
            .score(&LoraDelta::between(&tiny, &global()).unwrap())
            .unwrap();
        // 1e-40 is stored with 17 significant bits: its direction is off by ~1e-5.
        assert!(
            (score - unscaled).abs() < 1e-3,
            "{scale}: {score} vs {unscaled}"
        );

        let mut reports: Vec<OwnedReport> = (0..4)
            .map(|i| OwnedReport::new(format!("h{i}"), adapter(0.0, 0.5, [0.5, 0.5]), 100))
            .collect();
        reports.push(OwnedReport::new("tiny", tiny, 100));
        let out = round(DefenseLevel::Client)
            .run(0, &global(), &borrow_reports(&reports))
            .unwrap();
        let tiny = out.client("tiny").unwrap();
        assert_eq!(tiny.verdict, Verdict::Malicious, "{scale}");
        assert!(tiny.factor < 0.5, "{scale}: factor {}", tiny.factor);
        // Its pull on the malicious coordinate is at most its own size.
        let x = out.new_global.unwrap().get(B).unwrap().as_slice()[0];
        assert!(x.abs() <= scale, "{scale}: x moved to {x}");
    }
}

#[test]
fn medians_that_rejected_clients_set_let_no_attacker_through() {
    for (name, admission) in policies() {
        let multiple = match admission.bound() {
            NormBound::MedianMultiple(k) => k,
            other => panic!("{other:?}"),
        };
        let mut reports: Vec<OwnedReport> =
            (0..4).map(|i| honest(i, 0.5 + 0.1 * i as f32)).collect();
        // Ten sybils with huge updates and 0 samples: all rejected, and
        // (before) enough to drag the norm median to 1,000.
        reports.extend((0..10).map(|i| a_pusher(&format!("sybil{i}"), 1000.0, 0)));
        reports.push(a_pusher("attacker", 1000.0, 100));
        let out = round_with(DefenseLevel::Client, admission)
            .run(0, &global(), &borrow_reports(&reports))
            .unwrap();
        for i in 0..10 {
            let sybil = out.client(&format!("sybil{i}")).unwrap();
            assert_eq!(
                sybil.admission,
                Admitted::Rejected(safe_fedllm::round::Rejection::ZeroSamples),
                "{name}"
            );
        }
        // The eligible norms are 0.5, 0.6, 0.7, 0.8 and 1,000: the lower
        // median is 0.7 (f32 rounding aside).
        let attacker = out.client("attacker").unwrap();
        let (entered, bound) = admitted_norm(&attacker.admission);
        let bound = bound.expect("the attacker is held to the bound");
        assert!(bound <= multiple * 0.7 + 1e-5, "{name}: bound {bound}");
        assert!(entered <= 0.7 + 1e-5, "{name}: {:?}", attacker.admission);
        // It moves the global along A by at most its own share of the median:
        // 0.7 / 5 clients (0 when excluded); it moved 200 before.
        let moved = a_movement(&out);
        assert!(moved <= 0.7 / 5.0 * (1.0 + 1e-5), "{name}: moved {moved}");
    }
}

#[test]
fn half_the_clients_cannot_set_the_median_bound() {
    for (name, admission) in policies() {
        let multiple = match admission.bound() {
            NormBound::MedianMultiple(k) => k,
            other => panic!("{other:?}"),
        };
        // Ten honest clients (norms 0.5 … 1.4, 100 samples) and ten sybils
        // (norm 1,000 along A, declaring 10⁹ samples): exactly half.
        let mut reports: Vec<OwnedReport> =
            (0..10).map(|i| honest(i, 0.5 + 0.1 * i as f32)).collect();
        reports.extend((0..10).map(|i| a_pusher(&format!("sybil{i}"), 1000.0, 1_000_000_000)));
        let out = round_with(DefenseLevel::Client, admission)
            .run(0, &global(), &borrow_reports(&reports))
            .unwrap();
        let mut pull = 0.0;
        for i in 0..10 {
            let sybil = out.client(&format!("sybil{i}")).unwrap();
            let (entered, bound) = admitted_norm(&sybil.admission);
            // The lower median of the 20 norms is the largest honest one (1.4).
            let bound = bound.expect("held to the bound");
            assert!(bound <= multiple * 1.4 + 1e-5, "{name}: bound {bound}");
            // The sample cap is 2 × the lower median count (100), not half of 10⁹.
            assert!(sybil.samples <= 200, "{name}: {}", sybil.samples);
            pull += sybil.aggregation_weight.unwrap_or(0.0) * entered;
        }
        let moved = a_movement(&out);
        assert!(
            moved <= pull * (1.0 + 1e-5) + 1e-9,
            "{name}: {moved} > {pull}"
        );
        // Each sybil enters with at most the median norm and twice the median
        // count: ten of them move A by at most 10 · 2 · 1.4 / (10 + 20) ≈ 0.93.
        assert!(
            moved <= 10.0 * 2.0 * 1.4 / 30.0 + 1e-5,
            "{name}: moved {moved}"
        );
    }
}
