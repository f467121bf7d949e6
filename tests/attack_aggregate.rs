//! The attacker's tests for the aggregation rules: one named test per lie a
//! client (or a careless caller) can tell, each asserting the typed exclusion
//! or error **and** that the global adapter did not move beyond a stated bound.
//!
//! Setting: the global adapter is 0; seven honest clients send values near 1
//! (1 ± 0.1, deterministic); one liar sends the lie. Tensors hold more than 16
//! values, so the SIMD paths (packed min/max, 16-lane accumulators) run.
//!
//! Bounds, per rule, for a round with one liar:
//! * robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan, DnC): every
//!   coordinate of the new global lies in the honest clients' coordinate range;
//! * geometric median: the same range widened by 0.05 (the liar keeps a weight
//!   ∝ 1/distance, whose contribution is ≈ 0.01 whatever its size);
//! * norm clipping and FLAME: ‖new − global‖ ≤ the largest honest ‖Δ‖;
//! * FedAvg and FoolsGold (not magnitude defenses): the round succeeds and the
//!   new global is finite.
//!
//! A non-finite liar must be excluded with `NonFinite` under every rule, which
//! then makes every rule's result lie in the honest range.

use safe_fedllm::Error;
use safe_fedllm::aggregate::{
    Aggregation, Aggregator, Bulyan, ClientUpdate, ClipBound, CoordinateMedian, DnC,
    ExclusionReason, FactorGate, FedAvg, Flame, FoolsGold, GeometricMedian, Krum, MultiKrum,
    NormClipping, Outcome, SafetyGate, SkipReason, Trim, TrimmedMean, flatten, unflatten,
};
use safe_fedllm::lora::{
    AdapterView, LoraAdapter, LoraKey, LoraTensor, StorageDtype, TensorSource,
};

const KEY_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const KEY_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const HONEST: usize = 7;

fn template(a: [usize; 2], b: [usize; 2]) -> LoraAdapter {
    let mut t = LoraAdapter::new();
    t.insert(KEY_A, LoraTensor::zeros("a", a).unwrap()).unwrap();
    t.insert(KEY_B, LoraTensor::zeros("b", b).unwrap()).unwrap();
    t
}

/// lora_A [1, 40], lora_B [24, 1]: 64 values, both tensors > 16.
fn small() -> LoraAdapter {
    template([1, 40], [24, 1])
}

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Honest vectors near 1 (1 ± 0.1).
fn honest(global: &LoraAdapter, n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            (0..global.num_params())
                .map(|_| 1.0 + 0.1 * lcg(&mut state))
                .collect()
        })
        .collect()
}

fn adapters(global: &LoraAdapter, vectors: &[Vec<f32>]) -> Vec<LoraAdapter> {
    vectors
        .iter()
        .map(|v| unflatten(global, v).unwrap())
        .collect()
}

/// Honest clients `c0..c6` and the liar `liar` (last), 10 samples each.
fn round_of<'a>(clients: &'a [LoraAdapter], liar: &'a LoraAdapter) -> Vec<ClientUpdate<'a>> {
    let mut ups: Vec<ClientUpdate<'a>> = clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
        .collect();
    ups.push(ClientUpdate::new("liar", liar, 10));
    ups
}

#[derive(Clone, Copy, Debug)]
enum Bound {
    /// Inside the honest range, widened by the tolerance.
    Range(f32),
    /// ‖new − global‖ ≤ the largest honest ‖Δ‖.
    Norm,
    /// Finite only.
    Finite,
}

/// Every rule, with f = 1 where it has one, and its bound against a liar.
fn rules() -> Vec<(Box<dyn Aggregator>, Bound, bool)> {
    // (rule, bound for a finite liar, whether it must exclude a finite liar)
    vec![
        (Box::new(FedAvg::new()), Bound::Finite, false),
        (Box::new(CoordinateMedian::new()), Bound::Range(0.0), false),
        (
            Box::new(TrimmedMean::new(Trim::PerSide(1)).unwrap()),
            Bound::Range(0.0),
            false,
        ),
        (Box::new(Krum::new(1).unwrap()), Bound::Range(0.0), true),
        (
            Box::new(MultiKrum::new(1, 3).unwrap()),
            Bound::Range(0.0),
            true,
        ),
        (Box::new(Bulyan::new(1).unwrap()), Bound::Range(0.0), true),
        (Box::new(GeometricMedian::new()), Bound::Range(0.05), false),
        (
            Box::new(NormClipping::new(ClipBound::MedianNorm).unwrap()),
            Bound::Norm,
            false,
        ),
        (Box::new(FoolsGold::new()), Bound::Finite, false),
        (Box::new(Flame::new()), Bound::Norm, false),
        (Box::new(DnC::new(1).unwrap()), Bound::Range(0.0), true),
    ]
}

fn norm(v: &[f32], g: &[f32]) -> f64 {
    v.iter()
        .zip(g)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn assert_bound(
    rule: &str,
    bound: Bound,
    result: &Aggregation,
    global: &LoraAdapter,
    honest: &[Vec<f32>],
) {
    let new = flatten(
        result
            .new_global()
            .unwrap_or_else(|| panic!("{rule}: skipped: {:?}", result.outcome)),
    );
    let g = flatten(global);
    assert!(
        new.iter().all(|v| v.is_finite()),
        "{rule}: non-finite global"
    );
    match bound {
        Bound::Finite => {}
        Bound::Range(tol) => {
            for (k, v) in new.iter().enumerate() {
                let lo = honest.iter().map(|h| h[k]).fold(f32::INFINITY, f32::min);
                let hi = honest
                    .iter()
                    .map(|h| h[k])
                    .fold(f32::NEG_INFINITY, f32::max);
                assert!(
                    *v >= lo - tol && *v <= hi + tol,
                    "{rule}: [{k}] = {v} outside honest [{lo}, {hi}] ± {tol}"
                );
            }
        }
        Bound::Norm => {
            let max = honest.iter().map(|h| norm(h, &g)).fold(0.0, f64::max);
            let moved = norm(&new, &g);
            assert!(moved <= max * (1.0 + 1e-5), "{rule}: moved {moved} > {max}");
        }
    }
}

fn liar_with(global: &LoraAdapter, value: f32, at: Option<usize>) -> LoraAdapter {
    let d = global.num_params();
    let v: Vec<f32> = match at {
        // One poisoned coordinate in an otherwise honest-looking update.
        Some(k) => (0..d).map(|i| if i == k { value } else { 1.0 }).collect(),
        None => vec![value; d],
    };
    unflatten(global, &v).unwrap()
}

// ---------------------------------------------------------------- non-finite

#[test]
fn nan_in_long_tensor_is_excluded_by_median_not_dropped() {
    // The issue's case: median of [NaN, 1, 5] must not be 1.0 with the NaN
    // client listed as a contributor.
    let global = small();
    let d = global.num_params();
    let one = unflatten(&global, &vec![1.0; d]).unwrap();
    let five = unflatten(&global, &vec![5.0; d]).unwrap();
    let liar = liar_with(&global, f32::NAN, Some(20));
    let ups = [
        ClientUpdate::new("liar", &liar, 10),
        ClientUpdate::new("one", &one, 10),
        ClientUpdate::new("five", &five, 10),
    ];
    let result = CoordinateMedian::new().aggregate(&global, &ups).unwrap();
    assert!(matches!(
        result.exclusion("liar").map(|e| &e.reason),
        Some(ExclusionReason::NonFinite { index: 20, .. })
    ));
    assert!(result.contribution("liar").is_none());
    // Median of the two honest values is their mean, 3.0, at every coordinate.
    assert_eq!(flatten(result.new_global().unwrap()), vec![3.0; d]);
}

#[test]
fn nan_in_long_tensor_is_excluded_by_trimmed_mean() {
    let global = small();
    let h = honest(&global, HONEST, 1);
    let clients = adapters(&global, &h);
    let liar = liar_with(&global, f32::NAN, Some(50)); // inside lora_B (index 10)
    let result = TrimmedMean::new(Trim::PerSide(1))
        .unwrap()
        .aggregate(&global, &round_of(&clients, &liar))
        .unwrap();
    assert!(matches!(
        result.exclusion("liar").map(|e| &e.reason),
        Some(ExclusionReason::NonFinite { index: 10, .. })
    ));
    assert!(result.contribution("liar").is_none());
    assert_bound("trimmed_mean", Bound::Range(0.0), &result, &global, &h);
}

#[test]
fn nan_and_infinity_are_excluded_under_every_rule() {
    let global = small();
    let h = honest(&global, HONEST, 2);
    let clients = adapters(&global, &h);
    for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [Some(33), None] {
            let liar = liar_with(&global, value, at);
            for (mut rule, _, _) in rules() {
                let name = rule.name();
                let result = rule
                    .aggregate(&global, &round_of(&clients, &liar))
                    .unwrap_or_else(|e| panic!("{name} failed on {value}: {e}"));
                assert!(
                    matches!(
                        result.exclusion("liar").map(|e| &e.reason),
                        Some(ExclusionReason::NonFinite { .. })
                    ),
                    "{name}, {value} at {at:?}: {:?}",
                    result.exclusions
                );
                assert!(result.contribution("liar").is_none(), "{name}");
                // Without the liar every rule stays within the honest range
                // (norm-bounded rules included: they average honest updates).
                let bound = match name {
                    "geometric_median" => Bound::Range(1e-3),
                    "norm_clipping" | "flame" => Bound::Norm,
                    _ => Bound::Range(1e-6),
                };
                assert_bound(name, bound, &result, &global, &h);
            }
        }
    }
}

#[test]
fn nan_client_with_zero_weight_is_reported_non_finite() {
    // Zero samples: FedAvg never reads it, but the report must say NonFinite.
    let global = small();
    let h = honest(&global, 2, 3);
    let clients = adapters(&global, &h);
    let liar = liar_with(&global, f32::NAN, Some(5));
    let ups = [
        ClientUpdate::new("c0", &clients[0], 10),
        ClientUpdate::new("c1", &clients[1], 10),
        ClientUpdate::new("liar", &liar, 0),
    ];
    let result = FedAvg::new().aggregate(&global, &ups).unwrap();
    assert!(matches!(
        result.exclusion("liar").map(|e| &e.reason),
        Some(ExclusionReason::NonFinite { index: 5, .. })
    ));
    assert_bound("fedavg", Bound::Range(1e-6), &result, &global, &h);
}

// ------------------------------------------------------------- huge values

fn huge_value_under_every_rule(value: f32) {
    let global = small();
    let h = honest(&global, HONEST, 4);
    let clients = adapters(&global, &h);
    for liar in [
        liar_with(&global, value, None),
        liar_with(&global, value, Some(3)),
    ] {
        for (mut rule, bound, excludes) in rules() {
            let name = rule.name();
            let result = rule
                .aggregate(&global, &round_of(&clients, &liar))
                .unwrap_or_else(|e| panic!("{name} failed the round on {value}: {e}"));
            if excludes {
                assert!(result.exclusion("liar").is_some(), "{name}: liar kept");
                assert!(result.contribution("liar").is_none(), "{name}");
            }
            assert_bound(name, bound, &result, &global, &h);
        }
    }
}

#[test]
fn value_1e20_never_fails_a_round_and_is_bounded() {
    huge_value_under_every_rule(1e20);
}

#[test]
fn f32_max_never_fails_a_round_and_is_bounded() {
    huge_value_under_every_rule(f32::MAX);
    huge_value_under_every_rule(-f32::MAX);
}

#[test]
fn two_f32_max_clients_do_not_overflow_fedavg_or_the_median() {
    // (MAX + MAX)/2 overflows f32: the mean and the even median must not.
    let global = small();
    let d = global.num_params();
    let a = unflatten(&global, &vec![f32::MAX; d]).unwrap();
    let b = unflatten(&global, &vec![f32::MAX; d]).unwrap();
    let ups = [
        ClientUpdate::new("a", &a, 10),
        ClientUpdate::new("b", &b, 10),
    ];
    for mut rule in [
        Box::new(FedAvg::new()) as Box<dyn Aggregator>,
        Box::new(CoordinateMedian::new()),
        Box::new(TrimmedMean::new(Trim::PerSide(0)).unwrap()),
    ] {
        let result = rule.aggregate(&global, &ups).unwrap();
        let new = flatten(result.new_global().unwrap());
        assert!(
            new.iter().all(|v| *v == f32::MAX),
            "{}: {:?}",
            rule.name(),
            &new[..2]
        );
    }
}

// ---------------------------------------------------------------- FoolsGold

fn foolsgold_copy(scale: f32) {
    // Honest clients with unrelated directions (±1 coordinates); the liar is
    // `scale` × client 0: a copy whatever its magnitude.
    let global = small();
    let d = global.num_params();
    let mut state = 11u64;
    let h: Vec<Vec<f32>> = (0..5)
        .map(|_| {
            (0..d)
                .map(|_| if lcg(&mut state) > 0.0 { 1.0 } else { -1.0 })
                .collect()
        })
        .collect();
    let clients = adapters(&global, &h);
    let copy = unflatten(&global, &h[0].iter().map(|v| v * scale).collect::<Vec<_>>()).unwrap();
    let mut rule = FoolsGold::new();
    let result = rule.aggregate(&global, &round_of(&clients, &copy)).unwrap();
    for who in ["liar", "c0"] {
        assert!(
            matches!(
                result.exclusion(who).map(|e| &e.reason),
                Some(ExclusionReason::FoolsGoldZeroWeight { max_similarity }) if *max_similarity > 0.99
            ),
            "{scale}: {who}: {:?}",
            result.exclusions
        );
    }
    // The result averages the other honest clients: inside their range.
    assert_bound("foolsgold", Bound::Range(1e-6), &result, &global, &h[1..]);
}

#[test]
fn foolsgold_treats_a_1e20_times_copy_as_a_copy() {
    foolsgold_copy(1e20);
}

#[test]
fn foolsgold_treats_a_1e_minus_20_times_copy_as_a_copy() {
    foolsgold_copy(1e-20);
}

// ------------------------------------------------------------------- the gate

#[test]
fn nan_client_with_zero_samples_cannot_lift_the_gate() {
    // Honest factor 0.1, NaN client factor 1.0 with 0 samples: the mean must
    // count the NaN client as 0 → 0.05 < 0.2 → skipped.
    let global = small();
    let h = honest(&global, 1, 5);
    let clients = adapters(&global, &h);
    let liar = liar_with(&global, f32::NAN, Some(30));
    let ups = [
        ClientUpdate::new("honest", &clients[0], 10).with_security_factor(0.1),
        ClientUpdate::new("liar", &liar, 0).with_security_factor(1.0),
    ];
    let gate = SafetyGate::new(0.2).unwrap();
    let mut gated: Vec<Box<dyn Aggregator>> = vec![
        Box::new(FedAvg::new().gate(gate)),
        Box::new(FactorGate::new(FedAvg::new()).gate(gate)),
        Box::new(FactorGate::new(CoordinateMedian::new()).gate(gate)),
    ];
    for rule in &mut gated {
        let result = rule.aggregate(&global, &ups).unwrap();
        let Outcome::Skipped {
            reason: SkipReason::LowMeanSecurityFactor { mean, threshold },
        } = result.outcome
        else {
            panic!("{}: not skipped: {:?}", rule.name(), result.outcome);
        };
        assert!((mean - 0.05).abs() < 1e-12, "{}: mean {mean}", rule.name());
        assert_eq!(threshold, 0.2);
        assert!(matches!(
            result.exclusion("liar").map(|e| &e.reason),
            Some(ExclusionReason::NonFinite { .. })
        ));
        assert!(result.new_global().is_none(), "global must not move");
    }
}

fn gate_round(factors: [f64; 2], threshold: f64) -> Aggregation {
    let global = small();
    let h = honest(&global, 2, 6);
    let clients = adapters(&global, &h);
    let ups = [
        ClientUpdate::new("a", &clients[0], 10).with_security_factor(factors[0]),
        ClientUpdate::new("b", &clients[1], 10).with_security_factor(factors[1]),
    ];
    FedAvg::new()
        .gate(SafetyGate::new(threshold).unwrap())
        .aggregate(&global, &ups)
        .unwrap()
}

#[test]
fn gate_at_exactly_its_threshold_applies_the_round() {
    assert!(!gate_round([0.2, 0.2], 0.2).is_skipped());
    assert!(!gate_round([0.1, 0.3], 0.2).is_skipped()); // (0.1 + 0.3) / 2 = 0.2 in f64
}

#[test]
fn gate_just_below_its_threshold_skips_the_round() {
    let below = 0.2f64.next_down();
    let result = gate_round([below, below], 0.2);
    assert!(matches!(
        result.outcome,
        Outcome::Skipped {
            reason: SkipReason::LowMeanSecurityFactor { threshold: 0.2, .. }
        }
    ));
}

#[test]
fn gate_threshold_zero_never_skips() {
    let result = gate_round([0.0, 0.0], 0.0);
    // Not the gate: the weights are zero, so FedAvg has nothing to average.
    assert!(matches!(
        result.outcome,
        Outcome::Skipped {
            reason: SkipReason::ZeroTotalWeight
        }
    ));
    assert!(!gate_round([0.0, 1e-300], 0.0).is_skipped());
}

#[test]
fn fedavg_does_not_gate_unless_asked() {
    let global = small();
    let h = honest(&global, 1, 7);
    let clients = adapters(&global, &h);
    let ups = [ClientUpdate::new("a", &clients[0], 10).with_security_factor(0.01)];
    assert!(!FedAvg::new().aggregate(&global, &ups).unwrap().is_skipped());
    assert!(FedAvg::new().safety_gate().is_none());
}

#[test]
fn gate_threshold_outside_unit_interval_is_a_typed_error() {
    for bad in [f64::NAN, -0.1, 1.1, f64::INFINITY] {
        assert!(matches!(
            SafetyGate::new(bad),
            Err(Error::InvalidParameter {
                component: "safety_gate",
                ..
            })
        ));
    }
    // Deserialised gates are validated too.
    assert!(serde_json::from_str::<SafetyGate>(r#"{"threshold": 2.0}"#).is_err());
    let ok: SafetyGate = serde_json::from_str(r#"{"threshold": 0.25}"#).unwrap();
    assert_eq!(ok.threshold(), 0.25);
}

#[test]
fn security_factor_lies_are_typed_errors() {
    let global = small();
    let a = global.clone();
    for bad in [f64::NAN, f64::INFINITY, -1e-9, 1.0 + 1e-9] {
        let ups = [ClientUpdate::new("liar", &a, 1).with_security_factor(bad)];
        let err = FedAvg::new().aggregate(&global, &ups).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSecurityFactor { ref client, .. } if client == "liar"),
            "{err}"
        );
    }
}

// ------------------------------------------------------- huge parameters

fn too_few(result: safe_fedllm::Result<Aggregation>) {
    assert!(
        matches!(result, Err(Error::TooFewClients { .. })),
        "{:?}",
        result.map(|r| r.outcome)
    );
}

#[test]
fn huge_f_trim_and_m_are_typed_errors() {
    let param = |r: safe_fedllm::Result<()>| {
        assert!(matches!(r, Err(Error::InvalidParameter { .. })), "{r:?}");
    };
    param(Krum::new(usize::MAX).map(drop));
    param(MultiKrum::new(usize::MAX, 1).map(drop));
    param(Bulyan::new(1 << 62).map(drop));
    param(Bulyan::new(usize::MAX).map(drop));
    param(TrimmedMean::new(Trim::PerSide(usize::MAX)).map(drop));
    param(TrimmedMean::new(Trim::Fraction(f64::NAN)).map(drop));
    // Setters store what they are given; `check` rejects it, and so does
    // every round run with it (nothing is aggregated).
    let global = small();
    let h = honest(&global, HONEST, 8);
    let clients = adapters(&global, &h);
    let liar = liar_with(&global, 1.0, None);
    let ups = round_of(&clients, &liar);
    let unchecked: Vec<(Box<dyn Aggregator>, safe_fedllm::Result<()>)> = vec![
        {
            let r = DnC::new(1).unwrap().subsample_dim(usize::MAX);
            (Box::new(r.clone()), r.check())
        },
        {
            let r = DnC::new(1).unwrap().iterations(usize::MAX);
            (Box::new(r.clone()), r.check())
        },
        {
            let r = DnC::new(1).unwrap().filter_fraction(f64::INFINITY);
            (Box::new(r.clone()), r.check())
        },
        {
            let r = GeometricMedian::new().max_iterations(usize::MAX);
            (Box::new(r), r.check())
        },
        {
            let r = GeometricMedian::new().nu(f64::NAN);
            (Box::new(r), r.check())
        },
        {
            let r = Flame::new().noise_lambda(f64::INFINITY);
            (Box::new(r.clone()), r.check())
        },
        {
            let r = FoolsGold::new().kappa(-1.0);
            (Box::new(r.clone()), r.check())
        },
    ];
    for (mut rule, checked) in unchecked {
        param(checked);
        param(rule.aggregate(&global, &ups).map(drop));
    }

    // Representable but unmeetable: a typed error at aggregation, never a wrap.
    too_few(
        Krum::new((usize::MAX - 3) / 2)
            .unwrap()
            .aggregate(&global, &ups),
    );
    too_few(
        MultiKrum::new(1, usize::MAX)
            .unwrap()
            .aggregate(&global, &ups),
    );
    too_few(Bulyan::new(1 << 60).unwrap().aggregate(&global, &ups));
    too_few(
        TrimmedMean::new(Trim::PerSide((usize::MAX - 1) / 2))
            .unwrap()
            .aggregate(&global, &ups),
    );
    too_few(DnC::new(usize::MAX).unwrap().aggregate(&global, &ups));
    too_few(
        DnC::new(2)
            .unwrap()
            .filter_fraction(1e300)
            .aggregate(&global, &ups),
    );
}

// ------------------------------------------------------------ BF16 sources

/// Clients as BF16 safetensors bytes, their views, and the views' f32 copies.
fn bf16_round(n: usize) -> (LoraAdapter, Vec<Vec<u8>>) {
    // lora_A [8, 1000] spans two 4096-chunks; lora_B [1200, 8].
    let global = template([8, 1000], [1200, 8]);
    let h = honest(&global, n, 9);
    let bytes = adapters(&global, &h)
        .iter()
        .map(|a| a.to_bytes(StorageDtype::Bf16).unwrap())
        .collect();
    (global, bytes)
}

#[test]
fn bf16_views_aggregate_like_their_f32_copies() {
    let (global, bytes) = bf16_round(HONEST + 1);
    let views: Vec<AdapterView<'_>> = bytes
        .iter()
        .map(|b| AdapterView::parse(b).unwrap())
        .collect();
    let copies: Vec<LoraAdapter> = views.iter().map(|v| v.to_adapter().unwrap()).collect();
    let from_views: Vec<ClientUpdate<'_>> = views
        .iter()
        .enumerate()
        .map(|(i, v)| ClientUpdate::new(format!("c{i}"), v, 10 + i as u64))
        .collect();
    let from_copies: Vec<ClientUpdate<'_>> = copies
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10 + i as u64))
        .collect();
    for ((mut a, _, _), (mut b, _, _)) in rules().into_iter().zip(rules()) {
        let name = a.name();
        let x = a.aggregate(&global, &from_views).unwrap();
        let y = b.aggregate(&global, &from_copies).unwrap();
        let (x, y) = (
            flatten(x.new_global().unwrap()),
            flatten(y.new_global().unwrap()),
        );
        // Same f32 values through the same kernels: bit-exact.
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name}: BF16 views differ from their f32 copies"
        );
    }
}

#[test]
fn bf16_view_with_nan_is_excluded() {
    let global = template([8, 1000], [1200, 8]);
    let h = honest(&global, HONEST, 10);
    let clients = adapters(&global, &h);
    let liar = liar_with(&global, f32::NAN, Some(7777));
    let bytes = liar.to_bytes(StorageDtype::Bf16).unwrap();
    let view = AdapterView::parse(&bytes).unwrap();
    let mut ups: Vec<ClientUpdate<'_>> = clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
        .collect();
    ups.push(ClientUpdate::new("liar", &view, 10));
    for mut rule in [
        Box::new(CoordinateMedian::new()) as Box<dyn Aggregator>,
        Box::new(FedAvg::new()),
        Box::new(Krum::new(1).unwrap()),
    ] {
        let result = rule.aggregate(&global, &ups).unwrap();
        assert!(
            matches!(
                result.exclusion("liar").map(|e| &e.reason),
                Some(ExclusionReason::NonFinite { index: 7777, .. })
            ),
            "{}: {:?}",
            rule.name(),
            result.exclusions
        );
    }
}

/// An f32 adapter that hides its slices (as a device tensor would) and
/// records the longest read.
struct Opaque<'a> {
    inner: &'a LoraAdapter,
    longest: std::sync::atomic::AtomicUsize,
}

impl TensorSource for Opaque<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.inner.lora_keys()
    }
    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.inner.shape_of(canonical)
    }
    fn read_range(
        &self,
        canonical: &str,
        offset: usize,
        out: &mut [f32],
    ) -> safe_fedllm::Result<()> {
        self.longest
            .fetch_max(out.len(), std::sync::atomic::Ordering::Relaxed);
        self.inner.read_range(canonical, offset, out)
    }
}

#[test]
fn sources_without_f32_slices_are_read_in_bounded_chunks() {
    // A 300 000-value tensor: no read may convert it whole.
    let global = template([2, 150_000], [16, 2]);
    let h = honest(&global, 5, 12);
    let clients = adapters(&global, &h);
    let opaque: Vec<Opaque<'_>> = clients
        .iter()
        .map(|inner| Opaque {
            inner,
            longest: Default::default(),
        })
        .collect();
    let ups: Vec<ClientUpdate<'_>> = opaque
        .iter()
        .enumerate()
        .map(|(i, o)| ClientUpdate::new(format!("c{i}"), o, 10))
        .collect();
    let direct: Vec<ClientUpdate<'_>> = clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
        .collect();
    for mut rule in [
        Box::new(FedAvg::new()) as Box<dyn Aggregator>,
        Box::new(CoordinateMedian::new()),
        Box::new(Krum::new(1).unwrap()),
        Box::new(NormClipping::new(ClipBound::MedianNorm).unwrap()),
    ] {
        let x = rule.aggregate(&global, &ups).unwrap();
        let y = rule.aggregate(&global, &direct).unwrap();
        assert_eq!(x.new_global(), y.new_global(), "{}", rule.name());
    }
    // Also the non-finite scan of a scanned round (FoolsGold prepares one).
    FoolsGold::new().aggregate(&global, &ups).unwrap();
    for o in &opaque {
        let longest = o.longest.load(std::sync::atomic::Ordering::Relaxed);
        assert!(longest > 0 && longest <= 65_536, "read of {longest} values");
    }
}

/// A source whose f32 slice contradicts its declared shape.
struct Liar<'a>(&'a LoraAdapter, Vec<f32>);

impl TensorSource for Liar<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.0.lora_keys()
    }
    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.0.shape_of(canonical)
    }
    fn read_range(
        &self,
        canonical: &str,
        offset: usize,
        out: &mut [f32],
    ) -> safe_fedllm::Result<()> {
        self.0.read_range(canonical, offset, out)
    }
    fn as_f32(&self, _canonical: &str) -> Option<&[f32]> {
        Some(&self.1)
    }
}

#[test]
fn source_whose_slice_contradicts_its_shape_is_a_typed_error() {
    let global = small();
    let liar = Liar(&global, vec![1.0; 3]);
    let ups = [ClientUpdate::new("liar", &liar, 10)];
    let err = FedAvg::new().aggregate(&global, &ups).unwrap_err();
    assert!(
        matches!(&err, Error::Client { client, source }
            if client == "liar" && matches!(**source, Error::DataLength { found: 3, .. })),
        "{err}"
    );
}

#[test]
fn dnc_at_400_clients_runs_in_linear_work_and_drops_every_attacker() {
    // Time at scale: the n × n eigen-decomposition made 400 clients take
    // seconds per iteration (n³). Lanczos on the n × b sub-matrix takes
    // O(n·b) per product; no timing is asserted here, only that the round
    // completes with the right outcome.
    let global = small();
    let n = 400;
    let attackers = 20;
    let mut vectors = honest(&global, n - attackers, 11);
    // Attackers collude on one direction: +5 on every lora_A value.
    for i in 0..attackers {
        let mut v = honest(&global, 1, 1000 + i as u64).remove(0);
        v.iter_mut().take(40).for_each(|x| *x += 5.0);
        vectors.push(v);
    }
    let clients = adapters(&global, &vectors);
    let ups: Vec<ClientUpdate> = clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
        .collect();
    let result = DnC::new(attackers)
        .unwrap()
        .aggregate(&global, &ups)
        .unwrap();
    for i in n - attackers..n {
        let e = result
            .exclusion(&format!("c{i}"))
            .unwrap_or_else(|| panic!("attacker c{i} kept"));
        assert!(
            matches!(e.reason, ExclusionReason::DnCOutlier { .. }),
            "c{i}"
        );
    }
    // The global stays inside the honest range (1 ± 0.1) on every value:
    // no attacker's +5 got through.
    let new = flatten(result.new_global().unwrap());
    assert!(new.iter().all(|v| (0.9..=1.1).contains(v)), "{new:?}");
}
