//! Aggregators: input validation, exclusions, composition with security
//! factors, hand-computed cases from the rules' papers, and properties
//! (permutation invariance, coordinate-wise bounds, Krum returns an input).

use proptest::prelude::*;
use safe_fedllm::Error;
use safe_fedllm::aggregate::{
    Admit, Aggregation, Aggregator, Bulyan, ClientUpdate, ClipBound, CoordinateMedian, DnC,
    ExclusionReason, FactorGate, FedAvg, Flame, FoolsGold, GeometricMedian, Krum, KrumVariant,
    MultiKrum, NormClipping, Outcome, SafetyGate, SkipReason, Trim, TrimmedMean, Weighting,
    flatten, unflatten,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};

const KEY_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const KEY_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// An adapter with lora_A `[1, a]` and lora_B `[b, 1]`.
fn template(a: usize, b: usize) -> LoraAdapter {
    let mut t = LoraAdapter::new();
    t.insert(KEY_A, LoraTensor::zeros("a", [1, a]).unwrap())
        .unwrap();
    t.insert(KEY_B, LoraTensor::zeros("b", [b, 1]).unwrap())
        .unwrap();
    t
}

/// Adapters of the template's layout holding the given flat vectors.
fn adapters(template: &LoraAdapter, vectors: &[Vec<f32>]) -> Vec<LoraAdapter> {
    vectors
        .iter()
        .map(|v| unflatten(template, v).unwrap())
        .collect()
}

fn updates(clients: &[LoraAdapter]) -> Vec<ClientUpdate<'_>> {
    clients
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 10))
        .collect()
}

fn result_vec(result: &Aggregation) -> Vec<f32> {
    flatten(result.new_global().expect("round not skipped"))
}

fn run(rule: &mut dyn Aggregator, global: &LoraAdapter, clients: &[LoraAdapter]) -> Aggregation {
    rule.aggregate(global, &updates(clients)).unwrap()
}

fn assert_vec_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: [{i}] {x} vs {y}"
        );
    }
}

/// Every rule, with parameters valid for `n` ≥ 7 clients.
fn all_rules() -> Vec<(&'static str, Box<dyn Aggregator>)> {
    vec![
        ("fedavg", Box::new(FedAvg::new())),
        ("median", Box::new(CoordinateMedian::new())),
        (
            "trimmed_mean",
            Box::new(TrimmedMean::new(Trim::Fraction(0.2)).unwrap()),
        ),
        ("krum", Box::new(Krum::new(1).unwrap())),
        ("multi_krum", Box::new(MultiKrum::new(1, 3).unwrap())),
        ("bulyan", Box::new(Bulyan::new(1).unwrap())),
        ("geometric_median", Box::new(GeometricMedian::new())),
        (
            "norm_clipping",
            Box::new(NormClipping::new(ClipBound::MedianNorm).unwrap()),
        ),
        ("foolsgold", Box::new(FoolsGold::new())),
        ("flame", Box::new(Flame::new())),
        ("dnc", Box::new(DnC::new(1).unwrap().subsample_dim(100_000))),
    ]
}

/// Deterministic pseudo-random vectors.
fn random_vectors(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            (0..d)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------- validation

#[test]
fn empty_round_is_an_error() {
    let global = template(2, 2);
    for (name, mut rule) in all_rules() {
        let err = rule.aggregate(&global, &[]).unwrap_err();
        assert!(matches!(err, Error::Empty { .. }), "{name}: {err}");
    }
}

#[test]
fn duplicate_client_is_an_error() {
    let global = template(2, 2);
    let a = global.clone();
    let ups = [ClientUpdate::new("x", &a, 1), ClientUpdate::new("x", &a, 1)];
    let err = FedAvg::new().aggregate(&global, &ups).unwrap_err();
    assert!(
        matches!(err, Error::DuplicateClient { ref client } if client == "x"),
        "{err}"
    );
}

#[test]
fn security_factor_outside_unit_interval_is_an_error() {
    let global = template(2, 2);
    let a = global.clone();
    for bad in [1.5f64, -0.1, f64::NAN, f64::INFINITY] {
        let ups = [ClientUpdate::new("x", &a, 1).with_security_factor(bad)];
        let err = FedAvg::new().aggregate(&global, &ups).unwrap_err();
        assert!(
            matches!(err, Error::InvalidSecurityFactor { ref client, .. } if client == "x"),
            "{err}"
        );
    }
}

#[test]
fn missing_and_extra_keys_name_client_and_tensor() {
    let global = template(2, 2);
    let mut missing = LoraAdapter::new();
    missing
        .insert(KEY_A, LoraTensor::zeros("a", [1, 2]).unwrap())
        .unwrap();
    let ok = global.clone();
    let ups = [
        ClientUpdate::new("good", &ok, 1),
        ClientUpdate::new("bad", &missing, 1),
    ];
    let err = CoordinateMedian::new()
        .aggregate(&global, &ups)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Client { client, source }
            if client == "bad" && matches!(source.as_ref(),
                Error::MissingKey { tensor, present_in: "the global adapter", .. } if tensor == KEY_B)),
        "{err}"
    );
    let mut extra = global.clone();
    let key_v = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight";
    extra
        .insert(key_v, LoraTensor::zeros("v", [1, 2]).unwrap())
        .unwrap();
    let ups = [ClientUpdate::new("extra", &extra, 1)];
    let err = Krum::new(0).unwrap().aggregate(&global, &ups).unwrap_err();
    assert!(
        matches!(&err, Error::Client { client, source }
            if client == "extra" && matches!(source.as_ref(),
                Error::MissingKey { tensor, present_in: "the client's update", .. } if tensor == key_v)),
        "{err}"
    );
}

#[test]
fn shape_mismatch_names_client_tensor_and_shapes() {
    let global = template(2, 2);
    let mut wrong = LoraAdapter::new();
    wrong
        .insert(KEY_A, LoraTensor::zeros("a", [1, 3]).unwrap())
        .unwrap();
    wrong
        .insert(KEY_B, LoraTensor::zeros("b", [2, 1]).unwrap())
        .unwrap();
    let ups = [ClientUpdate::new("wrong", &wrong, 1)];
    let err = FedAvg::new().aggregate(&global, &ups).unwrap_err();
    assert!(
        matches!(&err, Error::Client { client, source }
            if client == "wrong" && matches!(source.as_ref(),
                Error::ShapeMismatch { tensor, expected, found }
                    if tensor == KEY_A && expected == &[1, 2] && found == &[1, 3])),
        "{err}"
    );
}

#[test]
fn non_finite_global_is_an_error() {
    let global = unflatten(&template(2, 2), &[0.0, f32::NAN, 0.0, 0.0]).unwrap();
    let client = template(2, 2);
    let err = FedAvg::new()
        .aggregate(&global, &updates(&[client]))
        .unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}

#[test]
fn robustness_constraints_are_typed_errors() {
    let global = template(2, 2);
    let clients = adapters(&global, &random_vectors(6, 4, 1));
    let too_few = |rule: &mut dyn Aggregator, required: usize| {
        let err = rule.aggregate(&global, &updates(&clients)).unwrap_err();
        assert!(
            matches!(err, Error::TooFewClients { required: r, found: 6, .. } if r == required),
            "{}: {err}",
            rule.name()
        );
    };
    too_few(&mut Krum::new(2).unwrap(), 7); // n ≥ 2f + 3
    too_few(&mut MultiKrum::new(2, 2).unwrap(), 7);
    too_few(&mut MultiKrum::new(1, 7).unwrap(), 7); // m ≤ n
    too_few(&mut Bulyan::new(1).unwrap(), 7); // n ≥ 4f + 3
    too_few(&mut TrimmedMean::new(Trim::PerSide(3)).unwrap(), 7); // n > 2k
    too_few(&mut DnC::new(6).unwrap(), 7); // n > ⌊c·f⌋
}

#[test]
fn invalid_parameters_are_rejected_by_check() {
    let param = |r: Result<(), Error>| {
        assert!(matches!(r, Err(Error::InvalidParameter { .. })), "{r:?}");
    };
    param(TrimmedMean::new(Trim::Fraction(0.5)).map(drop));
    param(TrimmedMean::new(Trim::Fraction(-0.1)).map(drop));
    param(TrimmedMean::new(Trim::Fraction(f64::NAN)).map(drop));
    param(MultiKrum::new(1, 0).map(drop));
    param(NormClipping::new(ClipBound::Fixed(0.0)).map(drop));
    param(NormClipping::new(ClipBound::Fixed(f64::INFINITY)).map(drop));
    param(SafetyGate::new(1.5).map(drop));
    param(GeometricMedian::new().nu(0.0).check());
    param(GeometricMedian::new().tolerance(-1.0).check());
    param(GeometricMedian::new().max_iterations(0).check());
    param(FoolsGold::new().kappa(0.0).check());
    param(Flame::new().noise_lambda(-1.0).check());
    param(DnC::new(1).unwrap().iterations(0).check());
    param(DnC::new(1).unwrap().subsample_dim(0).check());
    param(DnC::new(1).unwrap().filter_fraction(0.0).check());
    param(
        FactorGate::new(FedAvg::new())
            .admit(Admit::AtLeast(2.0))
            .check(),
    );
}

// ------------------------------------------------------------ non-finite policy

/// A layout big enough (16 chunks of 4096) to run on several threads.
fn big_template() -> LoraAdapter {
    template(8 * 4096, 8 * 4096)
}

#[test]
fn non_finite_updates_are_excluded_never_averaged() {
    for (global, label) in [(template(3, 4), "small"), (big_template(), "multi-chunk")] {
        let d = global.num_params();
        let mut vectors = random_vectors(9, d, 7);
        let clean = adapters(&global, &vectors);
        vectors[2][d - 1] = f32::NAN;
        vectors[5][1] = f32::INFINITY;
        let dirty = adapters(&global, &vectors);
        for (name, mut rule) in all_rules() {
            let result = run(rule.as_mut(), &global, &dirty);
            for (client, index) in [("c2", d - 1), ("c5", 1)] {
                let e = result
                    .exclusion(client)
                    .unwrap_or_else(|| panic!("{name}: {client} kept"));
                let ExclusionReason::NonFinite {
                    index: i, tensor, ..
                } = &e.reason
                else {
                    panic!("{name}: {client} excluded for {:?}", e.reason);
                };
                let expected = if index < d / 2 {
                    (KEY_A, index)
                } else {
                    (KEY_B, index - d / 2)
                };
                assert_eq!((tensor.as_str(), *i), expected, "{name}");
            }
            // Same as running the rule on the finite clients alone.
            let finite: Vec<ClientUpdate> = updates(&clean)
                .into_iter()
                .filter(|u| u.client.as_str() != "c2" && u.client.as_str() != "c5")
                .collect();
            let (_, mut fresh) = all_rules().into_iter().find(|(n, _)| *n == name).unwrap();
            let reference = fresh.aggregate(&global, &finite).unwrap();
            let got = result_vec(&result);
            assert!(got.iter().all(|v| v.is_finite()), "{name} {label}");
            assert_vec_close(
                &got,
                &result_vec(&reference),
                1e-5,
                &format!("{name} {label}"),
            );
        }
    }
}

#[test]
fn a_round_of_only_non_finite_updates_is_skipped() {
    let global = template(2, 2);
    let clients = adapters(
        &global,
        &[
            vec![f32::NAN, 0.0, 0.0, 0.0],
            vec![0.0, 0.0, f32::NEG_INFINITY, 0.0],
        ],
    );
    for mut rule in [
        Box::new(FedAvg::plain()) as Box<dyn Aggregator>,
        Box::new(CoordinateMedian::new()),
        Box::new(Krum::new(0).unwrap()),
        Box::new(FoolsGold::new()),
    ] {
        let result = run(rule.as_mut(), &global, &clients);
        assert!(
            matches!(
                result.outcome,
                Outcome::Skipped {
                    reason: SkipReason::NoClientLeft
                }
            ),
            "{}",
            rule.name()
        );
        assert_eq!(result.exclusions.len(), 2);
    }
}

// ------------------------------------------------------ FedAvg and its gate

#[test]
fn fedavg_weighs_by_samples_times_factor() {
    let global = template(1, 1);
    let clients = adapters(
        &global,
        &[vec![1.0, 1.0], vec![4.0, -2.0], vec![100.0, 100.0]],
    );
    let ups = [
        ClientUpdate::new("a", &clients[0], 30).with_security_factor(1.0),
        ClientUpdate::new("b", &clients[1], 10).with_security_factor(0.5),
        ClientUpdate::new("c", &clients[2], 50).with_security_factor(0.0),
    ];
    let result = FedAvg::new().aggregate(&global, &ups).unwrap();
    // weights 30 and 5: (30·1 + 5·4) / 35 and (30·1 − 5·2) / 35
    assert_vec_close(
        &result_vec(&result),
        &[50.0 / 35.0, 20.0 / 35.0],
        1e-6,
        "fedavg",
    );
    assert!((result.contribution("a").unwrap().weight - 30.0 / 35.0).abs() < 1e-12);
    assert_eq!(
        result.exclusion("c").unwrap().reason,
        ExclusionReason::ZeroWeight
    );
}

#[test]
fn fedavg_gate_skips_rounds_with_low_mean_factor() {
    let global = template(1, 1);
    let clients = adapters(&global, &[vec![1.0, 1.0], vec![2.0, 2.0]]);
    let ups = [
        ClientUpdate::new("a", &clients[0], 10).with_security_factor(0.3),
        ClientUpdate::new("b", &clients[1], 10).with_security_factor(0.0),
    ];
    // FedAvg::new() does not gate: the reference's gate is asked for.
    let result = FedAvg::new()
        .gate(SafetyGate::default())
        .aggregate(&global, &ups)
        .unwrap();
    let Outcome::Skipped {
        reason: SkipReason::LowMeanSecurityFactor { mean, threshold },
    } = result.outcome
    else {
        panic!("not skipped: {:?}", result.outcome);
    };
    assert!((mean - 0.15).abs() < 1e-6 && threshold == 0.2);
    // Without the gate (the default) the flagged client is excluded and the other kept.
    let open = FedAvg::new().aggregate(&global, &ups).unwrap();
    assert_eq!(result_vec(&open), [1.0, 1.0]);
    // All weights zero and no gate: skipped, never a silent plain mean.
    let zero = [ClientUpdate::new("z", &clients[0], 10).with_security_factor(0.0)];
    let result = FedAvg::new().gate(None).aggregate(&global, &zero).unwrap();
    assert!(matches!(
        result.outcome,
        Outcome::Skipped {
            reason: SkipReason::ZeroTotalWeight
        }
    ));
}

#[test]
fn gate_mean_counts_non_finite_updates_as_zero() {
    let global = template(1, 1);
    let clients = adapters(
        &global,
        &[vec![1.0, 1.0], vec![f32::NAN, 2.0], vec![f32::NAN, 2.0]],
    );
    let ups = updates(&clients); // all factors 1.0; two non-finite → mean 1/3
    let result = FedAvg::new()
        .gate(SafetyGate::new(0.5).unwrap())
        .aggregate(&global, &ups)
        .unwrap();
    assert!(matches!(
        result.outcome,
        Outcome::Skipped {
            reason: SkipReason::LowMeanSecurityFactor { .. }
        }
    ));
    assert_eq!(result.exclusions.len(), 2);
}

// ------------------------------------------------------------- composition

#[test]
fn factor_gate_runs_krum_over_trusted_clients() {
    let global = template(1, 1);
    let values = [0.0f32, 0.1, -0.1, 0.2, 5.0, 5.1, 5.2];
    let clients = adapters(
        &global,
        &values.iter().map(|&v| vec![v, v]).collect::<Vec<_>>(),
    );
    let mut ups = updates(&clients);
    // Without the gate, Krum (f = 2, n = 7) picks from the benign majority.
    // Flag three benign clients: Krum over the rest would pick a malicious one…
    for u in ups.iter_mut().take(3) {
        u.security_factor = 0.0;
    }
    let err = FactorGate::new(Krum::new(2).unwrap())
        .aggregate(&global, &ups)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooFewClients {
                found: 4,
                required: 7,
                ..
            }
        ),
        "{err}"
    );
    // …and with f = 0 over the 4 admitted it does, as it should given its input.
    let result = FactorGate::new(Krum::new(0).unwrap())
        .aggregate(&global, &ups)
        .unwrap();
    assert_eq!(
        result
            .exclusions
            .iter()
            .filter(|e| matches!(e.reason, ExclusionReason::BelowFactorGate { .. }))
            .count(),
        3
    );
    assert_eq!(result.contributions.len(), 1);
    // Threshold admission and the round-level gate.
    ups[3].security_factor = 0.4;
    let gate = FactorGate::new(CoordinateMedian::new()).admit(Admit::AtLeast(0.5));
    let result = gate.clone().aggregate(&global, &ups).unwrap();
    assert_eq!(result.contributions.len(), 3);
    assert_eq!(result_vec(&result), [5.1, 5.1]);
    let mut strict = gate.gate(SafetyGate::new(0.9).unwrap());
    assert!(strict.aggregate(&global, &ups).unwrap().is_skipped());
}

#[test]
fn weighting_composes_factors_into_multi_krum() {
    let global = template(1, 1);
    let clients = adapters(
        &global,
        &[
            vec![0.0, 0.0],
            vec![1.0, 1.0],
            vec![0.5, 0.5],
            vec![9.0, 9.0],
            vec![0.2, 0.2],
        ],
    );
    let mut ups = updates(&clients);
    ups[1].security_factor = 0.0;
    let mut rule = MultiKrum::new(1, 4)
        .unwrap()
        .weighting(Weighting::SamplesTimesFactor);
    let result = rule.aggregate(&global, &ups).unwrap();
    // Multi-Krum keeps 0, 1, 0.5, 0.2 (9 is the outlier); factor 0 drops c1 from the mean.
    assert_eq!(
        result.exclusion("c1").unwrap().reason,
        ExclusionReason::ZeroWeight
    );
    assert!(matches!(
        result.exclusion("c3").unwrap().reason,
        ExclusionReason::NotSelected { .. }
    ));
    assert_vec_close(
        &result_vec(&result),
        &[0.7 / 3.0, 0.7 / 3.0],
        1e-6,
        "multi-krum",
    );
}

// ------------------------------------------------------ hand-computed cases

#[test]
fn trimmed_mean_reference_code_trims_one_per_side() {
    let global = template(1, 1);
    let clients = adapters(
        &global,
        &[
            vec![1.0, 10.0],
            vec![2.0, 20.0],
            vec![3.0, 30.0],
            vec![4.0, 40.0],
            vec![100.0, -100.0],
        ],
    );
    let result = run(
        &mut TrimmedMean::new(Trim::PerSide(1)).unwrap(),
        &global,
        &clients,
    );
    assert_vec_close(&result_vec(&result), &[3.0, 20.0], 1e-6, "trim 1"); // (2+3+4)/3, (10+20+30)/3
    // β = 0.1 with 5 clients trims ⌊0.5⌋ = 0: the plain mean (Yin et al.'s β).
    let result = run(
        &mut TrimmedMean::new(Trim::Fraction(0.1)).unwrap(),
        &global,
        &clients,
    );
    assert_vec_close(&result_vec(&result), &[22.0, 0.0], 1e-6, "beta 0.1");
}

#[test]
fn krum_winner_neighbourhood_variant_averages_the_neighbours() {
    let global = template(1, 1);
    let values = [0.0f32, 1.0, 3.0, 10.0, 30.0];
    let clients = adapters(
        &global,
        &values.iter().map(|&v| vec![v, 0.0]).collect::<Vec<_>>(),
    );
    // f = 1: scores sum the n − f − 2 = 2 nearest squared distances.
    // 0: 1 + 9 = 10; 1: 1 + 4 = 5; 3: 4 + 9 = 13; 10: 49 + 81; 30: 400 + …
    let paper = run(&mut Krum::new(1).unwrap(), &global, &clients);
    assert_eq!(result_vec(&paper), [1.0, 0.0]);
    assert_eq!(
        paper.exclusion("c0").unwrap().reason,
        ExclusionReason::NotSelected { score: 10.0 }
    );
    let reference = run(
        &mut Krum::new(1)
            .unwrap()
            .variant(KrumVariant::WinnerNeighbourhood),
        &global,
        &clients,
    );
    assert_vec_close(
        &result_vec(&reference),
        &[4.0 / 3.0, 0.0],
        1e-6,
        "neighbourhood",
    ); // mean of 1, 0, 3
}

#[test]
fn geometric_median_of_collinear_points_is_the_middle_one() {
    let global = template(1, 1);
    let clients = adapters(&global, &[vec![0.0, 0.0], vec![1.0, 0.0], vec![10.0, 0.0]]);
    let result = run(
        &mut GeometricMedian::new().weighting(Weighting::Uniform),
        &global,
        &clients,
    );
    assert_vec_close(&result_vec(&result), &[1.0, 0.0], 1e-3, "collinear");
    let weights: f64 = result.contributions.iter().map(|c| c.weight).sum();
    assert!((weights - 1.0).abs() < 1e-9);
}

#[test]
fn geometric_median_of_a_square_with_an_outlier_stays_near_the_centre() {
    let global = template(1, 1);
    let pts = [
        [1.0, 1.0],
        [-1.0, 1.0],
        [1.0, -1.0],
        [-1.0, -1.0],
        [1000.0, 1000.0],
    ];
    let clients = adapters(&global, &pts.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
    let result = run(
        &mut GeometricMedian::new().weighting(Weighting::Uniform),
        &global,
        &clients,
    );
    let z = result_vec(&result);
    // The mean is at (200, 200); the geometric median of this configuration
    // lies on the diagonal inside the square (the outlier's pull is one unit vector).
    assert!(
        z[0] > 0.0 && z[0] < 1.0 && (z[0] - z[1]).abs() < 1e-4,
        "{z:?}"
    );
}

#[test]
fn norm_clipping_fixed_and_median_bounds() {
    let global = unflatten(&template(1, 1), &[1.0, 1.0]).unwrap();
    let clients = adapters(&global, &[vec![4.0, 5.0], vec![1.0, 2.0]]); // Δ = (3,4) and (0,1)
    let result = run(
        &mut NormClipping::new(ClipBound::Fixed(1.0)).unwrap(),
        &global,
        &clients,
    );
    // clip → (0.6, 0.8) and (0, 1); mean (0.3, 0.9); plus global.
    assert_vec_close(&result_vec(&result), &[1.3, 1.9], 1e-6, "fixed");
    assert!((result.contribution("c0").unwrap().scale - 0.2).abs() < 1e-9);
    let three = adapters(&global, &[vec![2.0, 1.0], vec![1.0, 3.0], vec![11.0, 1.0]]); // norms 1, 2, 10
    let result = run(
        &mut NormClipping::new(ClipBound::MedianNorm).unwrap(),
        &global,
        &three,
    );
    // bound 2: (1,0), (0,2), (2,0); mean (1, 2/3).
    assert_vec_close(
        &result_vec(&result),
        &[2.0, 1.0 + 2.0 / 3.0],
        1e-6,
        "median",
    );
}

#[test]
fn foolsgold_zeroes_identical_sybils_and_keeps_history() {
    let global = template(1, 2); // d = 3
    let clients = adapters(
        &global,
        &[
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.0, 1.0],
            vec![0.0, 0.0, 1.0],
        ],
    );
    let mut fg = FoolsGold::new();
    let result = run(&mut fg, &global, &clients);
    // Honest: max similarity 0 after pardoning → α = 1 → 0.99 → logit clipped to 1.
    // Sybils: similarity 1 → α = 0 → excluded.
    assert_vec_close(&result_vec(&result), &[0.5, 0.5, 0.0], 1e-6, "foolsgold");
    for sybil in ["c2", "c3"] {
        assert!(
            matches!(result.exclusion(sybil).unwrap().reason, ExclusionReason::FoolsGoldZeroWeight { max_similarity } if (max_similarity - 1.0).abs() < 1e-9)
        );
    }
    assert_eq!(fg.state().histories.len(), 4);
    // Second round: the sybils now differ slightly, but their history still matches.
    let round2 = adapters(
        &global,
        &[
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.0, 0.1, 1.0],
            vec![0.1, 0.0, 1.0],
        ],
    );
    let result = run(&mut fg, &global, &round2);
    assert!(result.exclusion("c2").is_some() && result.exclusion("c3").is_some());
    assert_eq!(
        fg.state().histories[&safe_fedllm::aggregate::ClientId::from("c2")],
        vec![0.0, 0.1, 2.0]
    );
    // The state survives a serde round trip.
    let json = serde_json::to_string(fg.state()).unwrap();
    let restored: safe_fedllm::aggregate::FoolsGoldState = serde_json::from_str(&json).unwrap();
    assert_eq!(&restored, fg.state());
}

#[test]
fn flame_admits_the_majority_direction_and_clips_to_the_median_norm() {
    let global = template(1, 1);
    // Three updates pointing along +x (cosine distance ≈ 0), two along −y.
    let clients = adapters(
        &global,
        &[
            vec![1.0, 0.0],
            vec![2.0, 0.1],
            vec![4.0, 0.0],
            vec![0.0, -3.0],
            vec![0.1, -5.0],
        ],
    );
    let result = run(&mut Flame::new(), &global, &clients);
    for outlier in ["c3", "c4"] {
        assert!(matches!(
            result.exclusion(outlier).unwrap().reason,
            ExclusionReason::OutsideMajorityCluster { .. }
        ));
    }
    // Norms: 1, 2.0025, 4, 3, 5.001 → median S = 3; c2 clipped to (3, 0).
    let expected = [(1.0 + 2.0 + 3.0) / 3.0, 0.1 / 3.0];
    assert_vec_close(&result_vec(&result), &expected, 1e-5, "flame");
}

#[test]
fn flame_noise_is_seeded_and_scaled() {
    let global = template(64, 64);
    let vectors: Vec<Vec<f32>> = (0..5).map(|i| vec![0.01 * (i as f32 + 1.0); 128]).collect();
    let clients = adapters(&global, &vectors);
    let quiet = result_vec(&run(&mut Flame::new(), &global, &clients));
    let noisy = |seed| {
        result_vec(&run(
            &mut Flame::new().noise_lambda(0.5).seed(seed),
            &global,
            &clients,
        ))
    };
    let (a, b, c) = (noisy(1), noisy(1), noisy(2));
    assert_eq!(a, b, "same seed, same noise");
    assert_ne!(a, c, "different seed");
    // σ = λ·S with S the median norm (0.03·√128 ≈ 0.339): empirical std ≈ 0.17.
    let diffs: Vec<f32> = a.iter().zip(&quiet).map(|(x, y)| x - y).collect();
    let std = (diffs.iter().map(|d| d * d).sum::<f32>() / diffs.len() as f32).sqrt();
    let sigma = 0.5 * 0.03 * 128f32.sqrt();
    assert!((std - sigma).abs() < 0.25 * sigma, "std {std} vs σ {sigma}");
}

#[test]
fn dnc_drops_the_outlier_along_the_top_direction() {
    let global = template(4, 4); // d = 8
    let mut vectors = random_vectors(6, 8, 3);
    for v in &mut vectors {
        v.iter_mut().for_each(|x| *x *= 0.01);
    }
    vectors[4].iter_mut().for_each(|x| *x += 3.0);
    let clients = adapters(&global, &vectors);
    let result = run(&mut DnC::new(1).unwrap().iterations(3), &global, &clients);
    assert!(matches!(
        result.exclusion("c4").unwrap().reason,
        ExclusionReason::DnCOutlier { .. }
    ));
    assert_eq!(result.exclusions.len(), 1);
    let mean: Vec<f32> = (0..8)
        .map(|k| [0, 1, 2, 3, 5].iter().map(|&i| vectors[i][k]).sum::<f32>() / 5.0)
        .collect();
    assert_vec_close(&result_vec(&result), &mean, 1e-5, "dnc");
}

#[test]
fn multi_chunk_rules_match_a_per_coordinate_reference() {
    let global = big_template();
    let d = global.num_params();
    let vectors = random_vectors(6, d, 11);
    let clients = adapters(&global, &vectors);
    let column = |k: usize| -> Vec<f32> {
        let mut c: Vec<f32> = vectors.iter().map(|v| v[k]).collect();
        c.sort_by(f32::total_cmp);
        c
    };
    let median = result_vec(&run(&mut CoordinateMedian::new(), &global, &clients));
    let trimmed = result_vec(&run(
        &mut TrimmedMean::new(Trim::PerSide(1)).unwrap(),
        &global,
        &clients,
    ));
    let mean = result_vec(&run(&mut FedAvg::plain(), &global, &clients));
    for k in (0..d).step_by(97) {
        let c = column(k);
        assert!((median[k] - (c[2] + c[3]) / 2.0).abs() < 1e-6, "median {k}");
        assert!(
            (trimmed[k] - (c[1] + c[2] + c[3] + c[4]) / 4.0).abs() < 1e-6,
            "trimmed {k}"
        );
        assert!(
            (mean[k] - c.iter().sum::<f32>() / 6.0).abs() < 1e-5,
            "mean {k}"
        );
    }
}

// --------------------------------------------------------------- properties

fn permuted<'a>(clients: &'a [LoraAdapter], perm: &[usize]) -> Vec<ClientUpdate<'a>> {
    perm.iter()
        .map(|&i| ClientUpdate::new(format!("c{i}"), &clients[i], 10 + i as u64))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rules_are_permutation_invariant(seed in 0u64..1000, rot in 1usize..7) {
        let global = template(3, 2);
        let clients = adapters(&global, &random_vectors(7, 5, seed));
        let identity: Vec<usize> = (0..7).collect();
        let mut perm = identity.clone();
        perm.rotate_left(rot);
        perm.swap(0, 3);
        for (name, mut rule) in all_rules() {
            if name == "dnc" { continue; } // checked below with full sampling
            let a = rule.aggregate(&global, &permuted(&clients, &identity)).unwrap();
            let (_, mut fresh) = all_rules().into_iter().find(|(n, _)| *n == name).unwrap();
            let b = fresh.aggregate(&global, &permuted(&clients, &perm)).unwrap();
            assert_vec_close(&result_vec(&a), &result_vec(&b), 1e-5, name);
            let mut ca: Vec<_> = a.contributions.iter().map(|c| c.client.clone()).collect();
            let mut cb: Vec<_> = b.contributions.iter().map(|c| c.client.clone()).collect();
            ca.sort();
            cb.sort();
            prop_assert_eq!(ca, cb, "{}", name);
        }
        let mut dnc = DnC::new(1).unwrap();
        let a = dnc.aggregate(&global, &permuted(&clients, &identity)).unwrap();
        let b = dnc.aggregate(&global, &permuted(&clients, &perm)).unwrap();
        assert_vec_close(&result_vec(&a), &result_vec(&b), 1e-5, "dnc");
    }

    #[test]
    fn coordinate_wise_rules_stay_inside_the_input_range(seed in 0u64..1000, n in 7usize..12) {
        let global = template(4, 3);
        let vectors = random_vectors(n, 7, seed);
        let clients = adapters(&global, &vectors);
        let rules: Vec<Box<dyn Aggregator>> = vec![
            Box::new(CoordinateMedian::new()),
            Box::new(TrimmedMean::new(Trim::Fraction(0.2)).unwrap()),
            Box::new(Bulyan::new(1).unwrap()),
        ];
        for mut rule in rules {
            let out = result_vec(&run(rule.as_mut(), &global, &clients));
            for (k, v) in out.iter().enumerate() {
                let lo = vectors.iter().map(|c| c[k]).fold(f32::INFINITY, f32::min);
                let hi = vectors.iter().map(|c| c[k]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(*v >= lo && *v <= hi, "{} coordinate {}: {} not in [{}, {}]", rule.name(), k, v, lo, hi);
            }
        }
    }

    #[test]
    fn krum_returns_one_of_its_inputs(seed in 0u64..1000, n in 5usize..10, f in 0usize..2) {
        let global = template(3, 3);
        let vectors = random_vectors(n, 6, seed);
        let clients = adapters(&global, &vectors);
        let out = result_vec(&run(&mut Krum::new(f).unwrap(), &global, &clients));
        prop_assert!(vectors.contains(&out));
    }
}

/// Honest clients near 1.0 and one attacker at 1000 in every coordinate.
fn honest_and_attacker(global: &LoraAdapter, honest: usize) -> Vec<LoraAdapter> {
    let dim = flatten(global).len();
    let mut vectors: Vec<Vec<f32>> = (0..honest)
        .map(|i| vec![1.0 + 0.01 * i as f32; dim])
        .collect();
    vectors.push(vec![1000.0; dim]);
    adapters(global, &vectors)
}

#[test]
fn trimmed_mean_and_dnc_count_removed_liars_against_their_budget() {
    let global = template(2, 2);
    // Two clients left after one liar was removed from three: the trimmed
    // mean (k = 1) and DnC (f = 1) alone need three and two, but one of the
    // budget is spent on the liar.
    let two = adapters(&global, &[vec![1.0; 4], vec![3.0; 4]]);
    let ups = updates(&two);
    let mut trimmed = TrimmedMean::new(Trim::PerSide(1)).unwrap();
    assert!(matches!(
        trimmed.aggregate(&global, &ups),
        Err(Error::TooFewClients { .. })
    ));
    let out = trimmed.aggregate_after_removal(&global, &ups, 1).unwrap();
    assert_eq!(result_vec(&out), [2.0; 4]); // k − 1 = 0: the plain mean
    let mut dnc = DnC::new(2).unwrap();
    assert!(matches!(
        dnc.aggregate(&global, &ups),
        Err(Error::TooFewClients { .. })
    ));
    assert!(dnc.aggregate_after_removal(&global, &ups, 1).is_ok());
    // A fraction counts the n submitted: β = 0.25 of 6 + 2 is two per side,
    // all of it spent on the two liars (of the 6 left alone it trims one).
    let mut six = vec![vec![1.0; 4]; 5];
    six.push(vec![7.0; 4]);
    let six = adapters(&global, &six);
    let mut fraction = TrimmedMean::new(Trim::Fraction(0.25)).unwrap();
    let alone = fraction.aggregate(&global, &updates(&six)).unwrap();
    assert_eq!(result_vec(&alone), [1.0; 4]);
    let out = fraction
        .aggregate_after_removal(&global, &updates(&six), 2)
        .unwrap();
    assert_eq!(result_vec(&out), [2.0; 4]);

    // What is left of the budget still holds an attacker among the rest to
    // the honest range: k = 2 with one liar removed trims one per side, f = 2
    // with one removed drops one per iteration.
    let clients = honest_and_attacker(&global, 4);
    let ups = updates(&clients);
    let mut trimmed = TrimmedMean::new(Trim::PerSide(2)).unwrap();
    let out = trimmed.aggregate_after_removal(&global, &ups, 1).unwrap();
    assert!(
        result_vec(&out).iter().all(|v| (1.0..=1.04).contains(v)),
        "{:?}",
        result_vec(&out)
    );
    let mut dnc = DnC::new(2).unwrap();
    let out = dnc.aggregate_after_removal(&global, &ups, 1).unwrap();
    assert!(out.contribution("c4").is_none(), "the attacker is dropped");
    assert!(
        result_vec(&out).iter().all(|v| (1.0..=1.04).contains(v)),
        "{:?}",
        result_vec(&out)
    );
}
