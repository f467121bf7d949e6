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
use safe_fedllm::lora::{LoraAdapter, LoraDelta, StorageDtype};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admission, Admitted, DefendedRound, NormBound, OverBound, OwnedReport, RoundOutcome,
    RoundParams, borrow_reports,
};

mod common;

use common::{A, B, adapter_with_a as adapter, global, probe};

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
///
/// A skipped round (the gate: with every new client on probation, a round
/// where most clients were rejected can fall below it) moves nothing.
fn a_movement(out: &RoundOutcome) -> f64 {
    let Some(new) = out.new_global.as_ref() else {
        assert!(out.skipped, "no new global, yet not skipped");
        return 0.0;
    };
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
        // f32 accumulation of identical honest values rounds at 1e-7.
        assert!(
            moved <= pull * (1.0 + 1e-5) + 1e-6,
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

/// `k` sybils among `n` clients: honest clients with norms 0.9 … (spread
/// 0.01) and 100 samples, sybils pushing lora_A with 9.9 × the honest median
/// norm and declaring 1.99 × the median count (just inside the bounds before
/// they were tightened).
fn sybil_round(n: usize, k: usize, admission: Admission) -> (RoundOutcome, f64) {
    let honest_norms: Vec<f32> = (0..n - k).map(|i| 0.9 + 0.01 * i as f32).collect();
    let mut reports: Vec<OwnedReport> = honest_norms
        .iter()
        .enumerate()
        .map(|(i, &y)| honest(i, y))
        .collect();
    // The lower median of all n norms, with the sybils above every honest one.
    let median = f64::from(honest_norms[(n - 1) / 2]);
    reports.extend((0..k).map(|i| a_pusher(&format!("sybil{i}"), 9.9 * median as f32, 199)));
    let out = round_with(DefenseLevel::Client, admission)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    (out, median)
}

#[test]
fn sybils_pushing_lora_a_inside_the_default_bounds_pull_no_more_than_as_many_honest_clients() {
    let n = 20;
    for k in [1, 3, n / 2 - 1] {
        let (out, median) = sybil_round(n, k, Admission::default());
        for i in 0..k {
            let sybil = out.client(&format!("sybil{i}")).unwrap();
            let Admitted::Clipped {
                samples,
                norm,
                scale,
                ..
            } = sybil.admission
            else {
                panic!("k = {k}: {:?}", sybil.admission);
            };
            assert_eq!(samples, 100, "k = {k}: capped at the median count");
            assert!((norm * scale - median).abs() < 1e-6, "k = {k}");
            assert_eq!(
                sybil.factor,
                out.client("h0").unwrap().factor,
                "benign-looking"
            );
        }
        // The goal: k sybils move the global by at most k median clients'
        // worth, k · M / n. Every value passes through f32 three times (the
        // clip g + s·(u − g), the FedAvg output, the reference 0.5), each
        // within half an ulp of values below 2 (2⁻²⁴): under 2.6e-7 over the
        // two lora_A coordinates, so 1e-6 of slack.
        let moved = a_movement(&out);
        let goal = k as f64 * median / n as f64;
        assert!(moved <= goal + 1e-6, "k = {k}: moved {moved} > {goal}");
        // And the sybils do pull (the bound is tight, not vacuous).
        assert!(moved >= 0.99 * goal, "k = {k}: moved {moved} < {goal}");

        // The bounds this replaced (count ≤ 2 × median, exclude beyond 10 ×
        // median) let the same sybils pull 13–19 × further.
        let old = Admission::default()
            .samples(safe_fedllm::round::SamplePolicy::CapAtMedianMultiple(2.0))
            .norm_bound(NormBound::MedianMultiple(10.0))
            .over_bound(OverBound::Exclude);
        let (old_out, _) = sybil_round(n, k, old);
        let old_moved = a_movement(&old_out);
        assert!(old_moved > 10.0 * goal, "k = {k}: {old_moved} vs {goal}");
    }
}
