//! The defended round end to end on tiny adapters with a toy linear probe:
//! weighting and aggregation, the safety gate, the trail check, rejected
//! reports, shadow scoring, evidence-level shadow skipping and the audit line.

use safe_fedllm::Error;
use safe_fedllm::aggregate::{FactorGate, FedAvg, SafetyGate, SkipReason};
use safe_fedllm::detect::{
    ClientEvidence, ClientId, ClientLevel, Detector, EvidenceLevel, EvidenceStatus, ShadowLevel,
    StepLevel, Verdict,
};
use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::round::{
    Admitted, DefendedRound, Disposition, OwnedReport as ClientReport, OwnedSteps as StepsReport,
    Rejection, RoundOutcome, RoundParams, ShadowBranch, TrailCheck, TrailStatus, borrow_reports,
    score_steps,
};

mod common;

use common::{A, B, adapter, global, probe};

fn benign(scale: f32) -> LoraAdapter {
    adapter(0.0, scale, 0.5 + scale)
}

fn malicious(scale: f32) -> LoraAdapter {
    adapter(scale, 0.0, 0.5 - scale)
}

fn value(a: &LoraAdapter, key: &str, i: usize) -> f32 {
    a.get(key).map(|t| t.as_slice()[i]).unwrap()
}

#[test]
fn client_level_round_weights_each_update_by_samples_times_factor() {
    let mut round = DefendedRound::new(
        probe(),
        ClientLevel::params().build().unwrap(),
        FedAvg::new(),
    );
    let reports = vec![
        ClientReport::new("a", benign(1.0), 100),
        ClientReport::new("b", benign(0.5), 50),
        ClientReport::new("c", benign(0.2), 80),
        ClientReport::new("evil", malicious(1.0), 120),
    ];
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    assert!(!out.skipped);
    let evil = out.client("evil").unwrap();
    assert_eq!(evil.verdict, Verdict::Malicious);
    assert!(evil.factor < 0.01);
    for c in &out.clients {
        assert_eq!(c.disposition, Disposition::Assessed);
        assert!((c.effective_weight - c.samples as f64 * c.factor).abs() < 1e-9);
        assert!(c.update_score.is_some());
    }
    // New global = Σ nₖwₖ·xₖ / Σ nₖwₖ, coordinate by coordinate, where xₖ is
    // the update as admitted (the default clips Δ to the median norm).
    let new = out.new_global.as_ref().unwrap();
    let total: f64 = out.clients.iter().map(|c| c.effective_weight).sum();
    let g = global();
    for (key, i) in [(B, 0), (B, 1), (A, 0)] {
        let expected: f64 = reports
            .iter()
            .zip(&out.clients)
            .map(|(r, c)| {
                let scale = match c.admission {
                    Admitted::Clipped { scale, .. } => scale,
                    _ => 1.0,
                };
                let base = f64::from(value(&g, key, i));
                let x = base + scale * (f64::from(value(&r.update, key, i)) - base);
                c.effective_weight * x
            })
            .sum::<f64>()
            / total;
        assert!(
            (f64::from(value(new, key, i)) - expected).abs() < 1e-5,
            "{key}[{i}]"
        );
    }
    let weights: f64 = out
        .clients
        .iter()
        .filter_map(|c| c.aggregation_weight)
        .sum();
    assert!((weights - 1.0).abs() < 1e-6);
    assert!(out.mean_factor > 0.2 && out.mean_factor < 1.0);
    assert!(out.timings.total_s >= out.timings.probe_s);
}

#[test]
fn safety_gate_skips_a_mostly_malicious_round() {
    let mut round = DefendedRound::new(
        probe(),
        ClientLevel::params().build().unwrap(),
        FedAvg::new(),
    );
    let reports = vec![
        ClientReport::new("a", benign(1.0), 100),
        ClientReport::new("m1", malicious(1.0), 100),
        ClientReport::new("m2", malicious(0.7), 100),
        ClientReport::new("m3", malicious(0.4), 100),
        ClientReport::new("m4", malicious(0.9), 100),
        ClientReport::new("m5", malicious(0.8), 100),
    ];
    let out = round.run(3, &global(), &borrow_reports(&reports)).unwrap();
    assert!(out.mean_factor < 0.2, "{}", out.mean_factor);
    assert!(out.skipped);
    assert!(out.new_global.is_none());
    assert!(matches!(
        out.skip_reason,
        Some(SkipReason::LowMeanSecurityFactor { mean, .. }) if mean < 0.2
    ));
    assert_eq!(out.timings.aggregate_s, 0.0);
    assert!(out.clients.iter().all(|c| c.aggregation_weight.is_none()));

    // With the gate off the same round aggregates.
    let mut open = DefendedRound::new(
        probe(),
        ClientLevel::params().build().unwrap(),
        FedAvg::plain(),
    )
    .with_params(RoundParams::default().gate(SafetyGate::new(0.0).unwrap()))
    .unwrap();
    assert!(
        !open
            .run(3, &global(), &borrow_reports(&reports))
            .unwrap()
            .skipped
    );
}

#[test]
fn step_level_scores_every_reported_step_against_the_global_adapter() {
    let mut round = DefendedRound::new(
        probe(),
        StepLevel::params().batch_size(4).build().unwrap(),
        FedAvg::new(),
    );
    let update = benign(1.0);
    let steps = vec![benign(0.3), malicious(0.5), update.clone()];
    let report =
        ClientReport::new("s", update, 12).with_steps(StepsReport::Adapters(steps.clone()));
    let out = round.run(0, &global(), &borrow_reports(&[report])).unwrap();
    let c = out.client("s").unwrap();
    assert_eq!(c.trail, TrailStatus::Verified);

    // The same factor as assessing the scores directly.
    let scores = score_steps(&probe(), &global(), &steps).unwrap();
    assert_eq!(scores.iter().filter(|&&s| s >= 0.8).count(), 1);
    let mut direct = StepLevel::params().batch_size(4).build().unwrap();
    let expected = direct
        .assess(
            0,
            &ClientId::from("s"),
            &ClientEvidence::new(12).with_steps(scores),
        )
        .unwrap();
    assert_eq!(c.factor, expected.factor);
    assert_eq!(c.verdict, Verdict::Malicious);
}

#[test]
fn a_trail_mismatch_zeroes_the_factor_and_keeps_the_update_out() {
    let detector = StepLevel::params().build().unwrap();
    let mut round = DefendedRound::new(probe(), detector, FedAvg::new());
    // Claims benign steps, then submits a malicious update.
    let liar = ClientReport::new("liar", malicious(1.0), 32)
        .with_steps(StepsReport::Adapters(vec![benign(0.2), benign(0.4)]));
    let honest = ClientReport::new("honest", benign(1.0), 32)
        .with_steps(StepsReport::Adapters(vec![benign(0.5), benign(1.0)]));
    let out = round
        .run(0, &global(), &borrow_reports(&[liar, honest]))
        .unwrap();
    let liar = out.client("liar").unwrap();
    assert_eq!(liar.disposition, Disposition::TrailMismatch);
    assert_eq!(liar.factor, 0.0);
    assert_eq!(liar.verdict, Verdict::Malicious);
    assert!(liar.trail.is_mismatch());
    assert!(
        liar.detail.contains("trail check failed"),
        "{}",
        liar.detail
    );
    assert!(liar.aggregation_weight.is_none());
    assert!(
        round
            .detector()
            .client_state(&ClientId::from("liar"))
            .is_none()
    );
    let new = out.new_global.unwrap();
    assert_eq!(new, benign(1.0));

    // A tolerance accepts a trail sent in lower precision.
    let mut tolerant =
        DefendedRound::new(probe(), StepLevel::params().build().unwrap(), FedAvg::new())
            .with_params(RoundParams::default().trail(TrailCheck::MaxAbs(1e-2)))
            .unwrap();
    let near = ClientReport::new("n", benign(1.0), 32)
        .with_steps(StepsReport::Adapters(vec![adapter(0.0, 1.001, 1.5)]));
    let out = tolerant
        .run(0, &global(), &borrow_reports(&[near]))
        .unwrap();
    assert_eq!(out.clients[0].trail, TrailStatus::Verified);
    assert!(
        DefendedRound::new(probe(), StepLevel::params().build().unwrap(), FedAvg::new())
            .with_params(RoundParams::default().trail(TrailCheck::MaxAbs(f32::NAN)))
            .is_err()
    );
}

#[test]
fn unusable_reports_are_rejected_without_stopping_the_round() {
    let mut round =
        DefendedRound::new(probe(), StepLevel::params().build().unwrap(), FedAvg::new())
            .with_params(
                RoundParams::default()
                    .accept_self_reported(true)
                    .gate(SafetyGate::new(0.1).unwrap()),
            )
            .unwrap();
    let mut wrong_shape = LoraAdapter::new();
    wrong_shape
        .insert(B, LoraTensor::new("b", [1, 2], vec![0.0, 1.0]).unwrap())
        .unwrap();
    wrong_shape
        .insert(A, LoraTensor::new("a", [1, 2], vec![0.0, 1.0]).unwrap())
        .unwrap();
    let mut nan = benign(1.0);
    nan.get_mut(B).unwrap().as_mut_slice()[0] = f32::NAN;
    let reports = vec![
        ClientReport::new("shape", wrong_shape, 10),
        ClientReport::new("nan", nan, 10),
        ClientReport::new("fake", benign(1.0), 10)
            .with_steps(StepsReport::Scores(vec![0.1, f32::NAN])),
        ClientReport::new("ok", benign(1.0), 10),
    ];
    let out = round.run(0, &global(), &borrow_reports(&reports)).unwrap();
    for id in ["shape", "nan", "fake"] {
        let c = out.client(id).unwrap();
        assert_eq!(c.disposition, Disposition::Rejected, "{id}");
        assert_eq!(c.factor, 0.0);
        assert_eq!(c.verdict, Verdict::Undecided);
        assert!(c.aggregation_weight.is_none());
        assert!(round.detector().client_state(&ClientId::from(id)).is_none());
    }
    assert!(matches!(
        out.client("shape").unwrap().admission.rejection(),
        Some(Rejection::ShapeMismatch { tensors }) if tensors.len() == 1 && tensors[0].tensor == B
    ));
    assert!(matches!(
        out.client("nan").unwrap().admission.rejection(),
        Some(Rejection::NonFinite { tensor, index: 0, .. }) if tensor == B
    ));
    assert!(matches!(
        out.client("fake").unwrap().admission.rejection(),
        Some(Rejection::InvalidEvidence { detail }) if detail.contains("invalid evidence")
    ));
    // Rejected reports count 0 in the gate's mean: 1 accepted of 4, on
    // probation at 0.5 → mean 0.125.
    assert!((out.mean_factor - out.client("ok").unwrap().factor / 4.0).abs() < 1e-12);
    assert_eq!(out.new_global.unwrap(), benign(1.0));
}

#[test]
fn round_level_faults_are_errors() {
    let mut round = DefendedRound::new(
        probe(),
        ClientLevel::params().build().unwrap(),
        FedAvg::new(),
    );
    assert!(matches!(
        round.run(0, &global(), &[]),
        Err(Error::Empty { .. })
    ));
    let twice = vec![
        ClientReport::new("x", benign(1.0), 1),
        ClientReport::new("x", benign(0.5), 1),
    ];
    // A repeated id is the clients' fault, not the round's: every copy is
    // rejected, and with nothing left the gate skips the round.
    let out = round.run(0, &global(), &borrow_reports(&twice)).unwrap();
    assert!(out.skipped && out.new_global.is_none());
    for c in &out.clients {
        assert_eq!(
            c.admission.rejection(),
            Some(&Rejection::DuplicateClient { copies: 2 })
        );
    }
}

#[test]
fn shadow_adapters_are_scored_against_the_shadow_base() {
    let shadow_base = adapter(0.0, 0.0, 0.0);
    let shadow_steps = vec![adapter(0.0, 0.5, 0.1), adapter(0.9, 0.0, 0.1)];
    let report = ClientReport::new("c", benign(1.0), 32)
        .with_shadow(StepsReport::Adapters(shadow_steps.clone()));

    // Without a shadow branch the adapters cannot be scored: rejected.
    let mut bare = DefendedRound::new(
        probe(),
        ShadowLevel::params().build().unwrap(),
        FedAvg::plain(),
    );
    let out = bare.run(0, &global(), &[report.as_report()]).unwrap();
    assert_eq!(out.clients[0].disposition, Disposition::Rejected);
    assert!(out.clients[0].detail.contains("shadow_branch"));

    let shadow = ShadowBranch::new(shadow_base.clone()).unwrap();
    let mut round = DefendedRound::new(
        probe(),
        ShadowLevel::params().build().unwrap(),
        FedAvg::new(),
    )
    .with_shadow(shadow);
    let out = round.run(0, &global(), &borrow_reports(&[report])).unwrap();
    // One of two shadow steps harmful, weighed by the distance each moved
    // from the one before (the first from the shadow base).
    let d1 = (0.5f64.powi(2) + 2.0 * 0.1f64.powi(2)).sqrt();
    let d2 = (0.9f64.powi(2) + 0.5f64.powi(2)).sqrt();
    let r = d2 / (d1 + d2);
    let factor = out.clients[0].factor;
    assert!((factor - (1.0 - r).powi(7)).abs() < 1e-6, "{factor}");
    let scores = score_steps(&probe(), &shadow_base, &shadow_steps).unwrap();
    assert!(scores[0] < 0.8 && scores[1] >= 0.8);
}

#[test]
fn evidence_level_stops_reading_shadow_evidence_of_frozen_clients() {
    let detector = EvidenceLevel::params().build().unwrap();
    let mut round = DefendedRound::new(probe(), detector, FactorGate::new(FedAvg::plain()))
        .with_params(
            RoundParams::default()
                .gate(SafetyGate::new(0.0).unwrap())
                .accept_self_reported(true),
        )
        .unwrap();
    let harmful = StepsReport::Scores(vec![0.9, 0.95]);
    let clean = StepsReport::Scores(vec![0.1, 0.2]);
    for r in 0..3 {
        let reports = vec![
            ClientReport::new("m", malicious(1.0), 32).with_shadow(harmful.clone()),
            ClientReport::new("b", benign(1.0), 32).with_shadow(clean.clone()),
            ClientReport::new("c", benign(0.9), 32).with_shadow(clean.clone()),
        ];
        round.run(r, &global(), &borrow_reports(&reports)).unwrap();
    }
    let m = ClientId::from("m");
    let status = |id: &ClientId| round.detector().client_state(id).map(|s| s.status.clone());
    assert_eq!(status(&m), Some(EvidenceStatus::FrozenMalicious));
    assert!(!round.needs_shadow(&m));
    // Frozen clients' shadow evidence is not read: not even a NaN rejects them.
    let reports = vec![
        ClientReport::new("m", malicious(1.0), 32).with_shadow(StepsReport::Scores(vec![f32::NAN])),
        ClientReport::new("b", benign(1.0), 32),
        ClientReport::new("c", benign(0.9), 32),
    ];
    let out = round.run(3, &global(), &borrow_reports(&reports)).unwrap();
    let mc = out.client("m").unwrap();
    assert_eq!(mc.disposition, Disposition::Assessed);
    assert_eq!(mc.factor, 0.0);
    assert!(mc.excluded.is_some(), "the factor gate drops it");
    assert!(out.client("b").unwrap().factor == 1.0);
    assert!(out.new_global.is_some());
}

#[test]
fn the_audit_record_is_one_json_line_that_reads_back() {
    let mut round = DefendedRound::new(
        probe(),
        ClientLevel::params().build().unwrap(),
        FedAvg::new(),
    );
    let reports = vec![
        ClientReport::new("a", benign(1.0), 10),
        ClientReport::new("evil", malicious(1.0), 10),
    ];
    let out = round.run(7, &global(), &borrow_reports(&reports)).unwrap();
    let mut log = Vec::new();
    out.write_json_line(&mut log).unwrap();
    out.write_json_line(&mut log).unwrap();
    let text = String::from_utf8(log).unwrap();
    assert_eq!(text.lines().count(), 2);
    let first = text.lines().next().unwrap();
    let back: RoundOutcome = serde_json::from_str(first).unwrap();
    assert!(
        back.new_global.is_none(),
        "the adapter is not part of the audit line"
    );
    let mut expected = out.clone();
    expected.new_global = None;
    assert_eq!(back, expected);
    let value: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(value["round"], 7);
    assert_eq!(value["level"], "client");
    assert_eq!(value["clients"][1]["verdict"], "malicious");
    assert_eq!(value["clients"][1]["disposition"], "assessed");
    assert!(value["timings"]["total_s"].is_number());
}
