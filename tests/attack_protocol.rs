//! The attacker's tests for the round *protocol*: the evidence a client
//! chooses to send or withhold, the history it builds, the identities it uses
//! and the timing of audits. One named test per hole, each asserting the
//! typed outcome AND the bound on how far the global adapter moved.
//!
//! Setting (as in `attack_round.rs`): a toy linear probe over the layer-0
//! lora_B delta (+x is malicious, +y benign), honest clients that move along
//! +y, and an attacker whose update moves x to 1.

use safe_fedllm::ClientId;
use safe_fedllm::aggregate::{Aggregator, Bulyan, FactorGate, FedAvg, Krum, SkipReason};
use safe_fedllm::detect::{AnyDetector, ClientLevel, DefenseLevel, EvidenceStatus, Verdict};
use safe_fedllm::lora::{LoraAdapter, TensorSource};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admitted, AuditDraw, ClientOutcome, ClientReport, CommitmentStatus, DefendedRound, Disposition,
    OwnedReport, OwnedSteps, Provenance, Rejection, RoundOutcome, RoundParams, StepsReport,
    borrow_reports,
};

mod common;

use common::{B, global, probe};

const LEVELS: [DefenseLevel; 4] = [
    DefenseLevel::Step,
    DefenseLevel::Client,
    DefenseLevel::Shadow,
    DefenseLevel::Evidence,
];

/// The toy adapter with lora_A at the global's (0.5, 0.5).
fn adapter(x: f32, y: f32) -> LoraAdapter {
    common::adapter(x, y, 0.5)
}

type Round = DefendedRound<LinearProbe, AnyDetector, FedAvg>;

/// The safe defaults, except that client-computed shadow scores are read
/// (honest clients here report their shadow as scores).
fn round_with(level: DefenseLevel) -> Round {
    DefendedRound::new(
        probe(),
        AnyDetector::with_defaults(level).unwrap(),
        FedAvg::new(),
    )
    .with_params(RoundParams::default().accept_self_reported(true))
    .unwrap()
}

/// An honest message: a benign update with its two-step trail and a clean
/// shadow branch.
fn honest_report(id: &str, y: f32) -> OwnedReport {
    OwnedReport::new(id, adapter(0.0, y), 100)
        .with_steps(OwnedSteps::Adapters(vec![
            adapter(0.0, y / 2.0),
            adapter(0.0, y),
        ]))
        .with_shadow(OwnedSteps::Scores(vec![0.1, 0.1]))
}

fn honest() -> Vec<OwnedReport> {
    (0..4)
        .map(|i| honest_report(&format!("h{i}"), 0.5 + 0.1 * i as f32))
        .collect()
}

/// A malicious update (x = 1) that sends no step trail and no shadow report.
fn silent_attacker(id: &str) -> OwnedReport {
    OwnedReport::new(id, adapter(1.0, 0.0), 100)
}

fn run(round: &mut Round, r: u32, reports: &[OwnedReport]) -> RoundOutcome {
    round.run(r, &global(), &borrow_reports(reports)).unwrap()
}

/// The client level's raw factor for a score: the cap every level applies
/// to a round whose update the server scored malicious.
fn raw(score: f32) -> f64 {
    ClientLevel::params()
        .build()
        .unwrap()
        .settings()
        .raw_factor(f64::from(score))
}

/// Asserts the attacker's factor is at most the raw factor of its update's
/// server score, and that the global's malicious coordinate moved by at most
/// that factor's share of the round.
fn assert_capped(out: &RoundOutcome, attacker: &str, what: &str) -> f64 {
    let a: &ClientOutcome = out.client(attacker).unwrap();
    let s = a
        .update_score
        .expect("the server scores every admitted update");
    assert!(s > 0.99, "{what}: score {s}");
    assert_eq!(a.verdict, Verdict::Malicious, "{what}: {}", a.detail);
    assert!(
        a.factor <= raw(s) + 1e-12,
        "{what}: factor {} > raw {} ({})",
        a.factor,
        raw(s),
        a.detail
    );
    if let Some(new) = &out.new_global {
        let x = new.get(B).unwrap().as_slice()[0];
        let total: f64 = out.clients.iter().map(|c| c.effective_weight).sum();
        let bound = a.effective_weight / total;
        assert!(f64::from(x) <= bound + 1e-6, "{what}: x = {x} > {bound}");
        assert!(x < 0.01, "{what}: x = {x}");
    }
    a.factor
}

#[test]
fn silence_is_judged_on_the_server_scored_update_at_every_level() {
    for level in LEVELS {
        let mut reports = honest();
        reports.push(silent_attacker("quiet"));
        let out = run(&mut round_with(level), 0, &reports);
        assert!(!out.skipped, "{level}");
        assert_capped(&out, "quiet", &format!("{level}"));
    }
}

#[test]
fn a_malicious_update_is_capped_whatever_the_history_or_freeze_state() {
    // Honest for 22 rounds (past R = 20, where step and client levels freeze,
    // and long enough for the evidence level to freeze it benign), then a
    // silent malicious update every round.
    for level in LEVELS {
        let mut round = round_with(level);
        for r in 0..22 {
            let mut reports = honest();
            reports.push(honest_report("sleeper", 0.6));
            run(&mut round, r, &reports);
        }
        for r in 22..30 {
            let mut reports = honest();
            reports.push(silent_attacker("sleeper"));
            let out = run(&mut round, r, &reports);
            assert_capped(&out, "sleeper", &format!("{level} round {r}"));
        }
    }
}

#[test]
fn weight_does_not_come_back_in_a_malicious_round() {
    // Alternating honest and malicious rounds: the running mean (client
    // level) or Beta trust (step level) recovers between attacks, but every
    // malicious round is bounded by that round's raw factor.
    for level in [DefenseLevel::Client, DefenseLevel::Step] {
        let mut round = round_with(level);
        for r in 0..30 {
            let mut reports = honest();
            let malicious = r % 2 == 1;
            if malicious {
                reports.push(OwnedReport::new("flip", adapter(1.0, 0.0), 100).with_steps(
                    OwnedSteps::Adapters(vec![adapter(0.5, 0.0), adapter(1.0, 0.0)]),
                ));
            } else {
                reports.push(honest_report("flip", 0.6));
            }
            let out = run(&mut round, r, &reports);
            if malicious {
                assert_capped(&out, "flip", &format!("{level} round {r}"));
            }
        }
    }
}

/// Runs one step-level round in which the attacker's trail is `padding`
/// copies of the global followed by its malicious update; returns the
/// attacker's outcome, the detector's Beta state for it and the round.
fn padded_round(padding: usize) -> (ClientOutcome, (f64, f64), RoundOutcome) {
    let g = global();
    let evil = adapter(1.0, 0.0);
    let honest = honest();
    let mut trail: Vec<&dyn TensorSource> = vec![&g; padding];
    trail.push(&evil);
    let id = ClientId::from("padder");
    let mut reports = borrow_reports(&honest);
    reports.push(ClientReport::new(&id, &evil, 100).with_steps(StepsReport::Adapters(trail)));
    let mut round = round_with(DefenseLevel::Step);
    let out = round.run(0, &g, &reports).unwrap();
    let AnyDetector::Step(step) = round.detector() else {
        unreachable!("a step-level round")
    };
    let state = step.client_state(&id).unwrap();
    let attacker = out.client("padder").unwrap().clone();
    (attacker, (state.alpha, state.beta), out)
}

#[test]
fn trail_padding_with_copies_of_the_global_buys_nothing() {
    let (plain, plain_beta, _) = padded_round(0);
    assert_eq!(plain.verdict, Verdict::Malicious);
    for padding in [9, 9_999] {
        let (padded, beta, out) = padded_round(padding);
        assert_eq!(padded.verdict, Verdict::Malicious, "{padding}");
        assert!(
            padded.factor <= plain.factor,
            "{padding} copies: {} > {}",
            padded.factor,
            plain.factor
        );
        // Nor does it dilute what the level remembers.
        assert_eq!(beta, plain_beta, "{padding} copies");
        // "Verified" is only the last step; the audit shows what moved.
        assert_eq!(padded.step_evidence, Provenance::LastStepVerified);
        let trail = padded.step_trail.unwrap();
        assert_eq!((trail.steps, trail.moved), (padding + 1, 1));
        assert!((trail.distance - 1.0).abs() < 1e-12);
        assert_capped(&out, "padder", &format!("{padding} copies"));
    }
    // The unpadded one-step trail is the update itself: fully verified.
    assert_eq!(plain.step_evidence, Provenance::Verified);
}

#[test]
fn trail_padding_with_tiny_steps_weighs_by_distance() {
    // 99 benign-looking steps that barely move (1e-6 along +y each), then
    // the jump to the malicious update: the harmful share is the jump's
    // share of the distance travelled, ≈ 1, not 1/100.
    let steps: Vec<LoraAdapter> = (1..100)
        .map(|i| adapter(0.0, 1e-6 * i as f32))
        .chain([adapter(1.0, 0.0)])
        .collect();
    let honest = honest();
    let mut reports = honest.clone();
    reports.push(
        OwnedReport::new("creeper", adapter(1.0, 0.0), 100).with_steps(OwnedSteps::Adapters(steps)),
    );
    let mut round = round_with(DefenseLevel::Step);
    let out = run(&mut round, 0, &reports);
    let a = out.client("creeper").unwrap();
    assert_eq!(a.verdict, Verdict::Malicious);
    let AnyDetector::Step(step) = round.detector() else {
        unreachable!()
    };
    let state = step.client_state(&ClientId::from("creeper")).unwrap();
    // 100 moving steps × 16 samples; the benign ones travelled ~1e-4 of ~1.
    assert!(state.alpha < 0.95 + 1.0, "α = {}", state.alpha);
    assert!(state.beta > 0.95 + 1599.0, "β = {}", state.beta);
    assert_capped(&out, "creeper", "tiny steps");
}

#[test]
fn an_attacker_changing_identity_every_round_stays_on_probation() {
    // A mildly poisoned update (x = 0.3 beside a benign y) from a new id in
    // every round, before and after the levels freeze (R = 20).
    for level in [
        DefenseLevel::Client,
        DefenseLevel::Step,
        DefenseLevel::Evidence,
    ] {
        let mut round = round_with(level);
        for r in 0..26 {
            let mut reports = honest();
            reports.push(
                OwnedReport::new(format!("sybil{r}"), adapter(0.3, 0.6), 100)
                    .with_steps(OwnedSteps::Adapters(vec![adapter(0.3, 0.6)]))
                    .with_shadow(OwnedSteps::Scores(vec![0.1])),
            );
            let out = run(&mut round, r, &reports);
            let sybil = out.client(&format!("sybil{r}")).unwrap();
            // Below τ: probation, not the verdict cap, is what binds.
            let score = sybil.update_score.unwrap();
            assert!(score < 0.8, "{level}: score {score}");
            assert!(
                sybil.factor <= 0.5,
                "{level} round {r}: a new id weighs {} ({})",
                sybil.factor,
                sybil.detail
            );
            if r >= 3 {
                // Known honest clients left probation: the new id weighs less.
                let h0 = out.client("h0").unwrap().factor;
                assert!(h0 > sybil.factor, "{level} round {r}: {h0}");
            }
            let x = out.new_global.as_ref().unwrap().get(B).unwrap().as_slice()[0];
            let total: f64 = out.clients.iter().map(|c| c.effective_weight).sum();
            let bound = 0.3 * sybil.effective_weight / total;
            assert!(f64::from(x) <= bound + 1e-6, "{level} round {r}: x = {x}");
        }
    }
}

#[test]
fn a_never_seen_id_after_the_levels_froze_gets_the_probation_factor() {
    for level in [DefenseLevel::Client, DefenseLevel::Step] {
        let mut round = round_with(level);
        let reports = honest();
        let out = run(&mut round, 25, &reports);
        for c in &out.clients {
            assert!(c.factor <= 0.5, "{level}: {} {}", c.client, c.factor);
        }
    }
}

fn robust_round<A: Aggregator>(rule: A) -> DefendedRound<LinearProbe, AnyDetector, A> {
    DefendedRound::new(
        probe(),
        AnyDetector::with_defaults(DefenseLevel::Step).unwrap(),
        rule,
    )
    .with_params(RoundParams::default().accept_self_reported(true))
    .unwrap()
}

fn honest_n(n: usize) -> Vec<OwnedReport> {
    (0..n)
        .map(|i| honest_report(&format!("h{i}"), 0.5 + 0.05 * i as f32))
        .collect()
}

/// The three liars of a minimum-size round: a NaN, a declared 0 and a
/// trail that ends somewhere else than the update.
fn liars() -> Vec<(&'static str, OwnedReport)> {
    vec![
        ("nan", OwnedReport::new("liar", adapter(f32::NAN, 0.0), 100)),
        ("zero", OwnedReport::new("liar", adapter(1.0, 0.0), 0)),
        (
            "trail",
            OwnedReport::new("liar", adapter(1.0, 0.0), 100)
                .with_steps(OwnedSteps::Adapters(vec![adapter(0.0, 0.1)])),
        ),
    ]
}

/// The new global holds no malicious x and a y inside the honest range.
fn assert_inside_honest_hull(out: &RoundOutcome, honest: &[OwnedReport], what: &str) {
    assert!(!out.skipped, "{what}: {:?}", out.skip_reason);
    let new = out.new_global.as_ref().unwrap().get(B).unwrap().as_slice();
    let ys: Vec<f32> = honest
        .iter()
        .map(|r| r.update.get(B).unwrap().as_slice()[1])
        .collect();
    let (lo, hi) = ys
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &y| (l.min(y), h.max(y)));
    assert_eq!(new[0], 0.0, "{what}: x moved");
    assert!(new[1] >= lo && new[1] <= hi, "{what}: y = {}", new[1]);
}

#[test]
fn one_liar_in_a_minimum_size_round_never_fails_it() {
    for (rule, n) in [("krum", 5), ("bulyan", 7)] {
        for (lie, liar) in liars() {
            let what = format!("{rule} n = {n}, {lie}");
            let mut reports = honest_n(n - 1);
            reports.push(liar);
            let batch = borrow_reports(&reports);
            let out = match rule {
                "krum" => {
                    robust_round(FactorGate::new(Krum::new(1).unwrap())).run(0, &global(), &batch)
                }
                _ => {
                    robust_round(FactorGate::new(Bulyan::new(1).unwrap())).run(0, &global(), &batch)
                }
            }
            .unwrap_or_else(|e| panic!("{what}: the round failed: {e}"));
            let l = out.client("liar").unwrap();
            assert_eq!(l.factor, 0.0, "{what}");
            assert!(
                matches!(
                    l.disposition,
                    Disposition::Rejected | Disposition::TrailMismatch
                ),
                "{what}: {:?}",
                l.disposition
            );
            assert_inside_honest_hull(&out, &reports[..n - 1], &what);
        }
    }
}

#[test]
fn liars_beyond_the_budget_skip_the_round_with_a_typed_reason() {
    // Krum(f = 1) over 5 messages, 3 of them rejected: f − 3 = 0 leaves 2
    // clients where Krum needs 3. The round is skipped, not failed.
    let mut reports = honest_n(2);
    for i in 0..3 {
        reports.push(OwnedReport::new(
            format!("nan{i}"),
            adapter(f32::NAN, 0.0),
            100,
        ));
    }
    let out = robust_round(FactorGate::new(Krum::new(1).unwrap()))
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    assert!(out.skipped);
    assert!(out.new_global.is_none(), "the global stays where it was");
    match &out.skip_reason {
        Some(SkipReason::TooFewClients {
            rule,
            required,
            found,
            ..
        }) => {
            assert_eq!(rule, "krum");
            assert_eq!((*required, *found), (3, 2));
        }
        other => panic!("expected TooFewClients, got {other:?}"),
    }
}

#[test]
fn a_repeated_client_id_rejects_every_copy_not_the_round() {
    let mut reports = honest_n(5);
    reports.push(OwnedReport::new("twin", adapter(1.0, 0.0), 100));
    reports.push(OwnedReport::new("twin", adapter(0.0, 0.6), 100));
    let out = robust_round(FactorGate::new(Krum::new(1).unwrap()))
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    let twins: Vec<&ClientOutcome> = out
        .clients
        .iter()
        .filter(|c| c.client.as_str() == "twin")
        .collect();
    assert_eq!(twins.len(), 2);
    for t in twins {
        assert_eq!(t.disposition, Disposition::Rejected);
        assert_eq!(t.factor, 0.0);
        assert_eq!(
            t.admission,
            Admitted::Rejected(Rejection::DuplicateClient { copies: 2 })
        );
    }
    assert_inside_honest_hull(&out, &reports[..5], "twins");
    // FedAvg too: the twins weigh nothing.
    let out = round_with(DefenseLevel::Client)
        .run(0, &global(), &borrow_reports(&reports))
        .unwrap();
    assert_inside_honest_hull(&out, &reports[..5], "twins under FedAvg");
}

/// The "benign shadow only when asked" attacker against the evidence level.
/// Rounds 0..3 it behaves and is frozen benign; from round 3 on its update
/// still looks benign to the probe (the drift the shadow branch exists for)
/// but its honestly trained shadow branch is harmful. It sends a benign
/// shadow whenever the server asks for one and, under commit–reveal, has
/// committed to its real (harmful) shadow before it knew.
fn timing_attack(round: &mut Round, commit_reveal: bool) -> Vec<ClientOutcome> {
    let honest_shadow = OwnedSteps::Scores(vec![0.1, 0.1]);
    let harmful_shadow = OwnedSteps::Scores(vec![0.9, 0.95]);
    let mut seen = Vec::new();
    for r in 0..20 {
        let malicious = r >= 3;
        let sneak = ClientId::from("sneak");
        let mut reports = honest();
        let mut own = OwnedReport::new("sneak", adapter(0.0, 0.6), 100);
        if commit_reveal {
            own.shadow = if malicious {
                harmful_shadow.clone()
            } else {
                honest_shadow.clone()
            };
            own = own.commit_shadow(r).unwrap();
            // Asked only after the upload: too late to change the commitment.
            own.shadow = if round.opens(r, &sneak) {
                honest_shadow.clone()
            } else {
                OwnedSteps::None
            };
            for h in &mut reports {
                *h = h.clone().commit_shadow(r).unwrap();
                let id = h.client.clone();
                if !round.opens(r, &id) {
                    h.shadow = OwnedSteps::None;
                }
            }
        } else if !malicious || round.needs_shadow(&sneak) {
            own.shadow = honest_shadow.clone();
        }
        reports.push(own);
        let out = run(round, r, &reports);
        if malicious {
            for id in ["h0", "h1", "h2", "h3"] {
                let h = out.client(id).unwrap();
                assert!(h.factor > 0.5, "round {r}: honest {id} at {}", h.factor);
            }
            seen.push(out.client("sneak").unwrap().clone());
        }
    }
    seen
}

#[test]
fn announced_audits_let_a_timed_attacker_keep_full_weight() {
    // The reference schedule, reproduced: `needs_shadow` tells the attacker
    // when to behave.
    let seen = timing_attack(&mut round_with(DefenseLevel::Evidence), false);
    assert_eq!(seen.len(), 17);
    assert!(seen.iter().all(|c| c.factor == 1.0), "{seen:?}");
}

#[test]
fn commit_reveal_audits_catch_the_attacker_that_behaves_only_when_asked() {
    let draw = AuditDraw::new([42; 32], 0.2).unwrap();
    let mut round = round_with(DefenseLevel::Evidence).with_audits(draw);
    let seen = timing_attack(&mut round, true);
    let caught = seen
        .iter()
        .position(|c| c.shadow_commitment == Some(CommitmentStatus::Mismatch))
        .expect("an unpredictable audit opens the commitment within 17 rounds");
    let first = &seen[caught];
    assert_eq!(first.factor, 0.0);
    assert_eq!(first.verdict, Verdict::Malicious);
    assert_eq!(first.aggregation_weight.unwrap_or(0.0), 0.0);
    // From then on it never regains weight: un-frozen, every later round is
    // opened and broken, and three broken rounds freeze it malicious.
    for c in &seen[caught..] {
        assert_eq!(c.factor, 0.0, "{}", c.detail);
        assert_eq!(c.aggregation_weight.unwrap_or(0.0), 0.0);
    }
    let AnyDetector::Evidence(level) = round.detector() else {
        unreachable!()
    };
    let status = &level.client_state(&ClientId::from("sneak")).unwrap().status;
    // The failed audit plus `evidence_min` (3) broken rounds freeze it.
    let want = if seen.len() - caught > 3 {
        EvidenceStatus::FrozenMalicious
    } else {
        EvidenceStatus::Collecting
    };
    assert_eq!(*status, want, "caught in malicious round {caught}");
}

#[test]
fn under_commit_reveal_needs_shadow_says_nothing_about_the_schedule() {
    let draw = AuditDraw::new([1; 32], 0.2).unwrap();
    let mut round = round_with(DefenseLevel::Evidence).with_audits(draw);
    let id = ClientId::from("h0");
    for r in 0..12 {
        let reports: Vec<OwnedReport> = honest()
            .into_iter()
            .map(|h| h.commit_shadow(r).unwrap())
            .collect();
        // Every round, before training: "commit to a shadow branch".
        assert!(round.needs_shadow(&id), "round {r}");
        run(&mut round, r, &reports);
    }
    // A client that does not commit breaks the protocol: a failed audit.
    let mut reports = honest();
    reports.truncate(3);
    let mut quiet = honest_report("h3", 0.8);
    quiet.shadow = OwnedSteps::None;
    reports.push(quiet);
    let reports: Vec<OwnedReport> = reports
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            if i < 3 {
                h.commit_shadow(12).unwrap()
            } else {
                h
            }
        })
        .collect();
    let out = run(&mut round, 12, &reports);
    let q = out.client("h3").unwrap();
    assert_eq!(q.shadow_commitment, Some(CommitmentStatus::Missing));
    assert_eq!((q.factor, q.verdict), (0.0, Verdict::Malicious));
}
