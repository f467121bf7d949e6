//! The attacker's tests for the defended round: one named test per lie a
//! client can tell in its message (values, keys, sample count, step trail,
//! shadow report), each asserting the typed rejection or bound AND that the
//! liar did not move the global adapter.
//!
//! Setting: a toy linear probe over the layer-0 lora_B delta (+x is
//! malicious, +y benign), benign clients that move along +y, and liars.

use safe_fedllm::ClientId;
use safe_fedllm::aggregate::{
    Aggregation, Aggregator, ClientUpdate, FactorGate, FedAvg, SafetyGate, SkipReason,
};
use safe_fedllm::detect::{
    AnyDetector, ClientLevel, DefenseLevel, EvidenceLevel, Safeguards, ShadowLevel, StepLevel,
    Verdict,
};
use safe_fedllm::features::FeatureSpec;
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::probe::{LinearProbe, Probe};
use safe_fedllm::round::{
    Admission, Admitted, DefendedRound, Disposition, NormBound, OverBound, OwnedReport, OwnedSteps,
    Provenance, Rejection, RoundParams, SamplePolicy, borrow_reports,
};

mod common;

use common::{A, B, adapter, global, probe};

fn benign(y: f32) -> LoraAdapter {
    adapter(0.0, y, 0.5)
}

fn malicious(x: f32) -> LoraAdapter {
    adapter(x, 0.0, 0.5)
}

/// Largest |new − reference| over every value of the two adapters.
fn max_diff(a: &LoraAdapter, b: &LoraAdapter) -> f32 {
    a.iter()
        .flat_map(|e| {
            let other = b.get(e.key.canonical()).unwrap().as_slice();
            e.tensor
                .as_slice()
                .iter()
                .zip(other)
                .map(|(x, y)| (x - y).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

fn detector(level: DefenseLevel) -> AnyDetector {
    AnyDetector::with_defaults(level).unwrap()
}

/// The safe defaults, except that client-computed shadow scores are read
/// (as in a simulation with trusted client code), so shadow-level lies can
/// be told in a few lines. `self_reported_scores_are_rejected_by_default`
/// checks the real default.
fn params() -> RoundParams {
    RoundParams::default().accept_self_reported(true)
}

fn round_with(level: DefenseLevel) -> DefendedRound<LinearProbe, AnyDetector, FedAvg> {
    DefendedRound::new(probe(), detector(level), FedAvg::new())
        .with_params(params())
        .unwrap()
}

/// Four honest clients at 100 samples, with their step and shadow trails
/// (every step benign).
fn honest() -> Vec<OwnedReport> {
    (0..4)
        .map(|i| {
            let y = 0.5 + 0.1 * i as f32;
            OwnedReport::new(format!("h{i}"), benign(y), 100)
                .with_steps(OwnedSteps::Adapters(vec![benign(y / 2.0), benign(y)]))
                .with_shadow(OwnedSteps::Scores(vec![0.1, 0.1]))
        })
        .collect()
}

/// The global the honest clients alone produce (equal counts, factor ≈ 1).
fn honest_only(level: DefenseLevel) -> LoraAdapter {
    let reports = honest();
    round_with(level)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap()
        .new_global
        .unwrap()
}

#[test]
fn inflated_sample_count_cannot_make_the_attacker_the_global_at_any_level() {
    for level in [
        DefenseLevel::Step,
        DefenseLevel::Client,
        DefenseLevel::Shadow,
        DefenseLevel::Evidence,
    ] {
        for lie in [1_000_000_000u64, u64::MAX] {
            let mut reports = honest();
            reports.push(
                OwnedReport::new("liar", malicious(1.0), lie)
                    .with_steps(OwnedSteps::Adapters(vec![malicious(0.5), malicious(1.0)]))
                    .with_shadow(OwnedSteps::Scores(vec![0.99, 0.99])),
            );
            let out = round_with(level)
                .run(0, &global(), &borrow_reports(&reports))
                .unwrap();
            let liar = out.client("liar").unwrap();
            assert_eq!(liar.verdict, Verdict::Malicious, "{level} {lie}");
            // Step level: 2 harmful steps × 16 against the Beta prior (1, 1)
            // decayed by 0.95 gives 0.95 / 33.9 ≈ 0.028; the others ≈ 0.
            assert!(liar.factor < 0.03, "{level} {lie}: factor {}", liar.factor);
            // Admission caps the count at the round's lower median (100).
            assert_eq!(liar.samples, 100, "{level}");
            assert_eq!(liar.declared_samples, lie);
            let new = out.new_global.unwrap();
            // The malicious coordinate (lora_B x) moves by at most the liar's
            // capped weight share: 100·0.03 / (400 + 100·0.03) < 0.0075, where
            // trusting the count would have moved it to ≈ 1.
            let x = new.get(B).unwrap().as_slice()[0];
            assert!(x < 0.015, "{level} {lie}: attacker moved x to {x}");
            // The liar (norm 1.0) is eligible for the norm median: one rank
            // up (0.6 → 0.7) lets the honest clients keep up to 0.05 more of
            // their own y, beside its own ≤ 0.0075 on x.
            assert!(max_diff(&new, &honest_only(level)) < 0.0575, "{level}");
        }
    }
}

#[test]
fn trusting_the_count_reproduces_the_dilution_the_default_prevents() {
    // The reference (trust the count, count from samples) is what the paper
    // does: under it the liar's declared count wins. Kept to show why the
    // defaults differ.
    let mut reports = honest();
    reports.push(
        OwnedReport::new("liar", malicious(1.0), 1_000_000_000)
            .with_steps(OwnedSteps::Scores(vec![0.99; 10])),
    );
    let step = StepLevel::params()
        .counting(safe_fedllm::detect::SampleCounting::Reference)
        .safeguards(Safeguards::reference())
        .build()
        .unwrap();
    let mut round = DefendedRound::new(probe(), step, FedAvg::new())
        .with_params(RoundParams::reference())
        .unwrap();
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let liar = out.client("liar").unwrap();
    assert!(liar.factor > 0.99, "{}", liar.factor);
    let x = out.new_global.unwrap().get(B).unwrap().as_slice()[0];
    assert!(
        x > 0.99,
        "the reference lets the liar become the global: x = {x}"
    );
}

#[test]
fn zero_samples_are_rejected_and_cannot_whitewash_harmful_shadow_steps() {
    let mut reports = honest();
    reports.push(
        OwnedReport::new("zero", malicious(1.0), 0)
            .with_shadow(OwnedSteps::Scores(vec![0.99, 0.99])),
    );
    let mut round = round_with(DefenseLevel::Shadow);
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let zero = out.client("zero").unwrap();
    assert_eq!(zero.disposition, Disposition::Rejected);
    assert_eq!(zero.admission.rejection(), Some(&Rejection::ZeroSamples));
    assert_eq!(zero.factor, 0.0);
    assert!(max_diff(&out.new_global.unwrap(), &honest_only(DefenseLevel::Shadow)) < 1e-6);
    // Even under the uniform policy (counts ignored, 0 admitted), the shadow
    // share comes from the steps: factor (1 − 1)^7 = 0.
    let uniform = Admission::default().samples(SamplePolicy::Uniform);
    let mut round = DefendedRound::new(probe(), detector(DefenseLevel::Shadow), FedAvg::new())
        .with_params(params().admission(uniform))
        .unwrap();
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let zero = out.client("zero").unwrap();
    assert_eq!(zero.disposition, Disposition::Assessed);
    assert_eq!(zero.factor, 0.0);
    assert_eq!(zero.verdict, Verdict::Malicious);
}

#[test]
fn a_zero_sample_client_cannot_vouch_for_a_factor_gated_median() {
    let mut reports = honest();
    reports.push(
        OwnedReport::new("zero", malicious(50.0), 0).with_shadow(OwnedSteps::Scores(vec![0.99])),
    );
    let rule = FactorGate::new(safe_fedllm::aggregate::CoordinateMedian::new());
    let mut round = DefendedRound::new(probe(), detector(DefenseLevel::Shadow), rule)
        .with_params(params())
        .unwrap();
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    assert_eq!(
        out.client("zero").unwrap().disposition,
        Disposition::Rejected
    );
    assert!(out.client("zero").unwrap().aggregation_weight.is_none());
    let x = out.new_global.unwrap().get(B).unwrap().as_slice()[0];
    assert_eq!(x, 0.0);
}

#[test]
fn nan_update_is_rejected_and_never_aggregated() {
    for (i, poison) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .enumerate()
    {
        let mut reports = honest();
        let mut nan = benign(0.5);
        nan.get_mut(A).unwrap().as_mut_slice()[1] = poison;
        reports.push(OwnedReport::new("nan", nan, 100));
        let mut round = round_with(DefenseLevel::Client);
        let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
        let c = out.client("nan").unwrap();
        assert!(
            matches!(c.admission.rejection(), Some(Rejection::NonFinite { tensor, index: 1, .. }) if tensor == A),
            "case {i}: {:?}",
            c.admission
        );
        assert_eq!(c.factor, 0.0);
        assert!(c.aggregation_weight.is_none());
        let new = out.new_global.as_ref().unwrap();
        assert!(new.iter().all(|e| e.tensor.first_non_finite().is_none()));
        assert!(max_diff(new, &honest_only(DefenseLevel::Client)) < 1e-6);
        // The JSON audit line carries the typed reason, value as text.
        let line = out.to_json_line().unwrap();
        assert!(line.contains(r#""reason":"non_finite""#), "{line}");
    }
}

#[test]
fn nan_client_with_zero_samples_counts_zero_in_the_gate() {
    // One honest client with a low factor beside a NaN client declaring 0
    // samples: the gate's mean must be honest/2, not (honest + 1)/2.
    let mut nan = malicious(1.0);
    nan.get_mut(B).unwrap().as_mut_slice()[0] = f32::NAN;
    let reports = vec![
        OwnedReport::new("low", adapter(0.3, 0.0, 0.5), 100),
        OwnedReport::new("nan", nan, 0),
    ];
    let mut round = round_with(DefenseLevel::Client);
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let low = out.client("low").unwrap().factor;
    assert!(low < 0.4, "{low}");
    assert!((out.mean_factor - low / 2.0).abs() < 1e-12);
    assert!(out.skipped);
    assert!(matches!(
        out.skip_reason,
        Some(SkipReason::LowMeanSecurityFactor { .. })
    ));
}

#[test]
fn huge_update_is_clipped_to_the_median_norm_by_default_under_every_level() {
    for magnitude in [1e20f32, f32::MAX] {
        for level in [DefenseLevel::Client, DefenseLevel::Shadow] {
            let mut reports = honest();
            reports.push(
                OwnedReport::new("huge", benign(magnitude), 100)
                    .with_shadow(OwnedSteps::Scores(vec![0.1])),
            );
            let mut round = round_with(level);
            let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
            let c = out.client("huge").unwrap();
            // Norms 0.5, 0.6, 0.7, 0.8 and huge: the lower median is 0.7.
            let Admitted::Clipped { norm, scale, .. } = c.admission else {
                panic!("{level} {magnitude}: {:?}", c.admission);
            };
            assert!((norm * scale - 0.7).abs() < 1e-6, "{level} {magnitude}");
            // It pulls like one median client: y moves by at most 0.7 / 5
            // from the honest clients' own global (and x not at all).
            let new = out.new_global.unwrap();
            assert!(new.get(B).unwrap().as_slice()[0] == 0.0);
            let moved = max_diff(&new, &honest_only(level));
            assert!(moved <= 0.7 / 5.0 + 1e-6, "{level}: moved {moved}");
        }
    }
}

#[test]
fn huge_update_is_excluded_beyond_a_median_multiple_under_the_exclude_policy() {
    let policy = Admission::default()
        .norm_bound(NormBound::MedianMultiple(10.0))
        .over_bound(OverBound::Exclude);
    for magnitude in [1e20f32, f32::MAX] {
        let mut reports = honest();
        reports.push(OwnedReport::new("huge", benign(magnitude), 100));
        let mut round = DefendedRound::new(probe(), detector(DefenseLevel::Client), FedAvg::new())
            .with_params(RoundParams::default().admission(policy.clone()))
            .unwrap();
        let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
        let c = out.client("huge").unwrap();
        assert!(
            matches!(c.admission.rejection(), Some(Rejection::NormAboveBound { norm, bound }) if norm > bound),
            "{magnitude}: {:?}",
            c.admission
        );
        // Nothing else is clipped (every honest norm is below 10 × 0.7), so the
        // global is the honest clients' mean.
        let y = out.new_global.unwrap().get(B).unwrap().as_slice()[1];
        assert!((y - 0.65).abs() < 1e-6, "{magnitude}: y = {y}");
    }
}

#[test]
fn huge_update_is_clipped_to_the_bound_under_the_clip_policy() {
    let policy = Admission::default()
        .norm_bound(NormBound::Absolute(1.0))
        .over_bound(OverBound::Clip);
    let mut reports = honest();
    reports.push(OwnedReport::new("huge", benign(f32::MAX), 100));
    let mut round = DefendedRound::new(probe(), detector(DefenseLevel::Client), FedAvg::new())
        .with_params(RoundParams::default().admission(policy))
        .unwrap();
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let c = out.client("huge").unwrap();
    let Admitted::Clipped { scale, .. } = c.admission else {
        panic!("expected a clipped admission, got {:?}", c.admission);
    };
    assert!(scale > 0.0 && scale < 1e-30);
    // Every honest client (norm ≤ 0.8) is admitted as sent.
    for h in ["h0", "h1", "h2", "h3"] {
        assert!(matches!(
            out.client(h).unwrap().admission,
            Admitted::Admitted { .. }
        ));
    }
    // The clipped client's Δ has norm 1, so y moves by at most its weight
    // (1/5 of the mass) beyond the honest mean.
    let new = out.new_global.unwrap();
    let y = new.get(B).unwrap().as_slice()[1];
    assert!(y.is_finite() && y < 0.65 + 0.2 + 1e-3, "{y}");
}

#[test]
fn update_without_the_probed_keys_is_rejected_not_scored_benign() {
    // Evasion by omission: drop the probed lora_B of layer 0.
    let mut evasive = LoraAdapter::new();
    evasive
        .insert(A, LoraTensor::new("a", [1, 2], vec![9.0, 9.0]).unwrap())
        .unwrap();
    let mut reports = honest();
    reports.push(OwnedReport::new("evasive", evasive, 100));
    let mut round = round_with(DefenseLevel::Client);
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    let c = out.client("evasive").unwrap();
    assert!(
        matches!(c.admission.rejection(), Some(Rejection::KeyMismatch { missing, extra }) if missing == &[B.to_owned()] && extra.is_empty()),
        "{:?}",
        c.admission
    );
    assert_eq!(c.factor, 0.0);
    assert_ne!(c.verdict, Verdict::Benign);
    assert!(max_diff(&out.new_global.unwrap(), &honest_only(DefenseLevel::Client)) < 1e-6);
}

#[test]
fn probed_keys_missing_from_the_whole_round_are_a_typed_rejection() {
    // A probe trained on a layer the round's adapters do not have (a
    // misconfigured server, or a global without that layer): every client
    // is rejected with the keys named instead of being zero-filled to a
    // "benign" score.
    let mut g = LoraAdapter::new();
    g.insert(A, LoraTensor::new("a", [1, 2], vec![0.5, 0.5]).unwrap())
        .unwrap();
    let mut u = g.clone();
    u.get_mut(A).unwrap().as_mut_slice()[0] = 0.6;
    let reports = vec![OwnedReport::new("c", u, 10)];
    let mut round = round_with(DefenseLevel::Client);
    let out = round.run(0, &g, &borrow_reports(&reports)).unwrap();
    assert!(matches!(
        out.client("c").unwrap().admission.rejection(),
        Some(Rejection::MissingProbeKeys { keys }) if keys == &[B.to_owned()]
    ));
    assert!(out.skipped);
}

#[test]
fn extra_and_reshaped_keys_are_all_listed() {
    let mut odd = benign(0.5);
    odd.insert(
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
        LoraTensor::new("x", [2, 1], vec![1.0, 1.0]).unwrap(),
    )
    .unwrap();
    let mut reshaped = LoraAdapter::new();
    reshaped
        .insert(B, LoraTensor::new("b", [1, 2], vec![0.0, 1.0]).unwrap())
        .unwrap();
    reshaped
        .insert(A, LoraTensor::new("a", [2, 1], vec![0.5, 0.5]).unwrap())
        .unwrap();
    let mut reports = honest();
    reports.push(OwnedReport::new("extra", odd, 100));
    reports.push(OwnedReport::new("reshaped", reshaped, 100));
    let out = round_with(DefenseLevel::Client)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    assert!(matches!(
        out.client("extra").unwrap().admission.rejection(),
        Some(Rejection::KeyMismatch { missing, extra }) if missing.is_empty() && extra.len() == 1
    ));
    assert!(matches!(
        out.client("reshaped").unwrap().admission.rejection(),
        Some(Rejection::ShapeMismatch { tensors }) if tensors.len() == 2
    ));
}

#[test]
fn a_lying_step_trail_is_caught_by_the_trail_check() {
    // The trail claims benign steps but ends somewhere else than the update.
    let mut reports = honest();
    reports.push(
        OwnedReport::new("liar", malicious(1.0), 100)
            .with_steps(OwnedSteps::Adapters(vec![benign(0.1), benign(0.2)])),
    );
    let out = round_with(DefenseLevel::Step)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    let liar = out.client("liar").unwrap();
    assert_eq!(liar.disposition, Disposition::TrailMismatch);
    assert_eq!(liar.factor, 0.0);
    assert!(liar.trail.is_mismatch());
    // Honest trails end at their update: only their last step is verified.
    assert_eq!(
        out.client("h0").unwrap().step_evidence,
        Provenance::LastStepVerified
    );
    let new = out.new_global.unwrap();
    assert_eq!(new.get(B).unwrap().as_slice()[0], 0.0, "the liar's x");
    // Its trail is checked after admission, so its norm (1.0) is eligible
    // for the median: one rank up (0.6 → 0.7), which lets the honest clients
    // keep more of their own updates: (0.7 + 0.7) − (0.6 + 0.6) over 4 = 0.05.
    assert!(max_diff(&new, &honest_only(DefenseLevel::Step)) < 0.05 + 1e-6);
}

#[test]
fn self_reported_scores_are_rejected_by_default() {
    let mut reports = honest();
    reports.push(
        OwnedReport::new("liar", malicious(1.0), 100)
            .with_shadow(OwnedSteps::Scores(vec![0.01, 0.01])),
    );
    let mut round = DefendedRound::new(probe(), detector(DefenseLevel::Shadow), FedAvg::new());
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    for c in &out.clients {
        assert_eq!(c.disposition, Disposition::Rejected, "{}", c.client);
        assert!(matches!(
            c.admission.rejection(),
            Some(Rejection::InvalidEvidence { detail }) if detail.contains("client-computed")
        ));
    }
    assert!(out.skipped);
}

#[test]
fn self_reported_scores_are_marked_in_the_audit() {
    let reports = vec![
        OwnedReport::new("a", benign(0.5), 100).with_steps(OwnedSteps::Scores(vec![0.1])),
        OwnedReport::new("b", benign(0.6), 100).with_shadow(OwnedSteps::Scores(vec![0.1])),
    ];
    let out = round_with(DefenseLevel::Step)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    assert_eq!(
        out.client("a").unwrap().step_evidence,
        Provenance::SelfReported
    );
    let out = round_with(DefenseLevel::Evidence)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    assert_eq!(
        out.client("b").unwrap().shadow_evidence,
        Provenance::SelfReported
    );
    assert!(
        out.to_json_line()
            .unwrap()
            .contains(r#""shadow_evidence":"self_reported""#)
    );
}

#[test]
fn a_lying_shadow_report_is_self_reported_and_cannot_beat_the_server_scored_update() {
    // The shadow branch is unverifiable: a liar reports clean shadow steps.
    // The audit says so, and the update's own score (server-computed) caps
    // the factor whatever the shadow branch claims.
    let mut reports = honest();
    reports.push(
        OwnedReport::new("liar", malicious(1.0), 100)
            .with_shadow(OwnedSteps::Scores(vec![0.01, 0.01])),
    );
    let out = round_with(DefenseLevel::Shadow)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    let liar = out.client("liar").unwrap();
    assert_eq!(liar.shadow_evidence, Provenance::SelfReported);
    let s = liar.update_score.unwrap();
    assert!(s > 0.99);
    assert_eq!(liar.verdict, Verdict::Malicious);
    let raw = ClientLevel::params()
        .build()
        .unwrap()
        .settings()
        .raw_factor(f64::from(s));
    assert!(liar.factor <= raw, "{} > {raw}", liar.factor);
}

#[test]
fn the_gate_applies_at_exactly_its_threshold_and_skips_just_below() {
    // One client with factor exactly 1 (shadow r = 0) and four rejected
    // (NaN): mean = 1/5 = 0.2.
    let mut reports =
        vec![OwnedReport::new("ok", benign(0.5), 100).with_shadow(OwnedSteps::Scores(vec![0.0]))];
    for i in 0..4 {
        let mut nan = benign(0.5);
        nan.get_mut(B).unwrap().as_mut_slice()[0] = f32::NAN;
        reports.push(OwnedReport::new(format!("nan{i}"), nan, 100));
    }
    let run = |threshold: f64| {
        DefendedRound::new(probe(), detector(DefenseLevel::Shadow), FedAvg::new())
            .with_params(params().gate(SafetyGate::new(threshold).unwrap()))
            .unwrap()
            .run(0, &global(), &borrow_reports(&reports))
            .unwrap()
    };
    let at = run(0.2);
    assert_eq!(at.mean_factor, 0.2);
    assert!(!at.skipped, "a mean equal to the threshold is applied");
    assert_eq!(at.new_global.unwrap(), benign(0.5));
    assert!(run(0.200_000_001).skipped);
    // Threshold 0 never skips on the gate.
    let zero = run(0.0);
    assert!(!zero.skipped);
    // One gate only: the default FedAvg does not skip on its own.
    assert!(!run(0.1).skipped);
}

#[test]
fn a_failed_round_leaves_detector_state_untouched() {
    // An aggregator that fails after the detector has assessed everyone.
    struct Failing;
    impl Aggregator for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn aggregate(
            &mut self,
            _: &LoraAdapter,
            _: &[ClientUpdate<'_>],
        ) -> safe_fedllm::Result<Aggregation> {
            Err(safe_fedllm::Error::Empty {
                what: "a test rule",
            })
        }
    }
    let reports = honest();
    let mut round = DefendedRound::new(probe(), ClientLevel::params().build().unwrap(), Failing)
        .with_params(RoundParams::default().gate(SafetyGate::new(0.0).unwrap()))
        .unwrap();
    let before = serde_json::to_string(round.detector()).unwrap();
    assert!(round.run(0, &global(), &borrow_reports(&reports)).is_err());
    assert_eq!(serde_json::to_string(round.detector()).unwrap(), before);
    assert!(
        round
            .detector()
            .client_state(&ClientId::from("h0"))
            .is_none()
    );
}

#[test]
fn shadow_and_evidence_levels_zero_an_attacker_with_a_huge_count_under_a_gated_rule() {
    for level in [DefenseLevel::Shadow, DefenseLevel::Evidence] {
        let mut reports = honest();
        reports.push(
            OwnedReport::new("liar", malicious(1.0), u64::MAX)
                .with_shadow(OwnedSteps::Scores(vec![0.99; 4])),
        );
        let rule = FactorGate::new(safe_fedllm::aggregate::CoordinateMedian::new());
        let d = match level {
            DefenseLevel::Shadow => AnyDetector::from(ShadowLevel::params().build().unwrap()),
            _ => AnyDetector::from(EvidenceLevel::params().build().unwrap()),
        };
        let mut round = DefendedRound::new(probe(), d, rule)
            .with_params(params())
            .unwrap();
        let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
        assert_eq!(out.client("liar").unwrap().factor, 0.0, "{level}");
        let x = out.new_global.unwrap().get(B).unwrap().as_slice()[0];
        assert_eq!(x, 0.0, "{level}");
    }
}

#[test]
fn malformed_feature_spec_is_a_typed_error_not_a_panic() {
    let spec = serde_json::to_value(probe().feature_spec()).unwrap();
    let mut huge = spec.clone();
    huge["dim"] = serde_json::json!(usize::MAX);
    assert!(serde_json::from_value::<FeatureSpec>(huge).is_err());
    let mut overflow = spec.clone();
    overflow["layout"][0]["shape"] = serde_json::json!([usize::MAX, 3]);
    assert!(serde_json::from_value::<FeatureSpec>(overflow).is_err());
    let mut gap = spec.clone();
    gap["layout"][0]["offset"] = serde_json::json!(5);
    assert!(serde_json::from_value::<FeatureSpec>(gap).is_err());
    // The untouched spec still loads.
    assert!(serde_json::from_value::<FeatureSpec>(spec).is_ok());
}

#[test]
fn client_level_checkpoint_with_impossible_round_count_is_rejected() {
    let mut d = ClientLevel::params().build().unwrap();
    use safe_fedllm::detect::{ClientEvidence, Detector};
    d.assess(
        0,
        &ClientId::from("c"),
        &ClientEvidence::new(1).with_last_step_score(Some(0.1)),
    )
    .unwrap();
    let mut json = serde_json::to_value(&d).unwrap();
    json["clients"]["c"]["rounds"] = serde_json::json!(u64::MAX);
    let err = serde_json::from_value::<ClientLevel>(json).unwrap_err();
    assert!(err.to_string().contains("rounds"), "{err}");
}

#[test]
fn invalid_admission_settings_are_typed_errors() {
    for (bad, name) in [
        (
            Admission::default().samples(SamplePolicy::CapAt(0)),
            "samples",
        ),
        (
            Admission::default().samples(SamplePolicy::CapAtMedianMultiple(f64::NAN)),
            "samples",
        ),
        (
            Admission::default().norm_bound(NormBound::Absolute(-1.0)),
            "norm_bound",
        ),
        (
            Admission::default().norm_bound(NormBound::MedianMultiple(f64::INFINITY)),
            "norm_bound",
        ),
    ] {
        let named = |e: safe_fedllm::Error| matches!(e, safe_fedllm::Error::InvalidParameter { component: "admission", name: n, .. } if n == name);
        assert!(named(bad.check().unwrap_err()), "{bad:?}");
        // A round is never built on it, so no client is admitted under it.
        let built = DefendedRound::new(probe(), detector(DefenseLevel::Client), FedAvg::new())
            .with_params(params().admission(bad.clone()));
        assert!(named(built.err().unwrap()), "{bad:?}");
    }
    assert!(SafetyGate::new(1.5).is_err());
    // A policy deserialised from JSON is re-checked before use.
    let bad: Admission = serde_json::from_str(
        r#"{"samples":{"policy":"cap_at","value":0},"norm_bound":{"bound":"unbounded"},"over_bound":"exclude","require_probe_keys":true}"#,
    )
    .unwrap();
    assert!(bad.check().is_err());
}

#[test]
fn huge_sketch_settings_are_typed_errors_not_aborts() {
    use safe_fedllm::probe::SketchConfig;
    for (dim, nnz) in [
        (2_147_483_648usize, 1usize),
        (usize::MAX, 1),
        (1 << 20, 1 << 20),
    ] {
        let mut config = SketchConfig::new(dim, 7);
        config.nnz_per_column = nnz;
        assert!(config.build(40_960).is_err(), "dim {dim} nnz {nnz}");
    }
    // A table of input_dim × nnz entries that cannot be allocated.
    let mut config = SketchConfig::new(1 << 10, 7);
    config.nnz_per_column = 64;
    assert!(config.build(usize::MAX / 2).is_err());
}

#[test]
fn zero_samples_are_rejected_under_every_level() {
    for level in [
        DefenseLevel::Step,
        DefenseLevel::Client,
        DefenseLevel::Shadow,
        DefenseLevel::Evidence,
    ] {
        let mut reports = honest();
        reports.push(
            OwnedReport::new("zero", malicious(1.0), 0)
                .with_steps(OwnedSteps::Adapters(vec![benign(0.1), malicious(1.0)]))
                .with_shadow(OwnedSteps::Scores(vec![0.01])),
        );
        let out = round_with(level)
            .run(0, &global(), &borrow_reports(&reports))
            .unwrap();
        let zero = out.client("zero").unwrap();
        assert_eq!(
            zero.admission.rejection(),
            Some(&Rejection::ZeroSamples),
            "{level}"
        );
        assert_eq!(zero.factor, 0.0, "{level}");
        assert!(zero.aggregation_weight.is_none(), "{level}");
        assert!(
            max_diff(&out.new_global.unwrap(), &honest_only(level)) < 1e-6,
            "{level}"
        );
    }
}

/// An upload whose `lora_A` cannot be read (a truncated file, a failing
/// store): every other value reads as the wrapped adapter's.
struct FailsOnA(LoraAdapter);

impl safe_fedllm::lora::TensorSource for FailsOnA {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &safe_fedllm::lora::LoraKey> + '_> {
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
        if canonical == A {
            return Err(safe_fedllm::Error::Empty {
                what: "the uploaded bytes of lora_A",
            });
        }
        self.0.read_range(canonical, offset, out)
    }
}

#[test]
fn an_unreadable_upload_is_rejected_alone_and_the_others_keep_their_norms() {
    // Admission reads every sound update in one shared pass; a failed read
    // must reject its client only, never the round or its neighbours.
    let honest = honest();
    let broken = FailsOnA(malicious(50.0));
    let broken_id = ClientId::from("broken");
    let mut reports = borrow_reports(&honest);
    reports.push(safe_fedllm::round::ClientReport::new(
        &broken_id, &broken, 100,
    ));
    let mut round = round_with(DefenseLevel::Client);
    let out = round.run(0, &global(), &reports).unwrap();
    let c = out.client("broken").unwrap();
    assert!(
        matches!(c.admission.rejection(), Some(Rejection::Unreadable { error }) if error.contains("lora_A")),
        "{:?}",
        c.admission
    );
    assert_eq!(c.factor, 0.0);
    assert!(c.aggregation_weight.is_none());
    for (i, h) in out
        .clients
        .iter()
        .filter(|c| c.client.as_str() != "broken")
        .enumerate()
    {
        assert!(h.admission.rejection().is_none(), "h{i}: {:?}", h.admission);
    }
    let new = out.new_global.as_ref().unwrap();
    assert!(max_diff(new, &honest_only(DefenseLevel::Client)) < 1e-6);
}

#[test]
fn admission_norms_from_the_shared_pass_equal_each_update_read_alone() {
    // ‖u − g‖ by hand for lora_B = (0, y), lora_A = (0.5, 0.5) against the
    // global (0, 0, 0.5, 0.5): exactly y. A norm bound at 1.0 × the lower
    // median clips exactly the clients above it, by median / y.
    let honest = honest();
    let admission = Admission::default()
        .norm_bound(NormBound::MedianMultiple(1.0))
        .over_bound(OverBound::Clip);
    let messages: Vec<_> = honest
        .iter()
        .map(|r| {
            (
                &r.client,
                &r.update as &dyn safe_fedllm::lora::TensorSource,
                r.samples,
            )
        })
        .collect();
    let decisions = admission.admit(&global(), &[B], &messages).unwrap();
    // Norms 0.5, 0.6, 0.7, 0.8: lower median 0.6.
    for (d, y) in decisions.iter().zip([0.5f64, 0.6, 0.7, 0.8]) {
        match &d.status {
            Admitted::Admitted { .. } => assert!(y <= 0.6 + 1e-6, "{y}: {:?}", d.status),
            Admitted::Clipped { scale, .. } => {
                assert!((scale - 0.6 / y).abs() < 1e-6, "{y}: {:?}", d.status)
            }
            other => panic!("{y}: {other:?}"),
        }
    }
}
