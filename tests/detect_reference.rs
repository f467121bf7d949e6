//! The detectors against reference vectors from an independent Python
//! implementation of SPEC.md §2 (`fixtures/detect/generate.py`, plain Python,
//! no third-party packages). Every scenario is replayed round by round through
//! the Rust detector; every factor must match to 1e-6 and, for the evidence
//! level, the freeze status after every assessment must match exactly.
//!
//! Each scenario is also replayed with a JSON checkpoint / resume after every
//! round: the factors must be bit-identical to the uninterrupted run.

use std::path::{Path, PathBuf};

use safe_fedllm::detect::{
    AnyDetector, ClientEvidence, ClientId, Detector, EvidenceStatus, Safeguards,
};
use serde::Deserialize;

const TOLERANCE: f64 = 1e-6;

#[derive(Deserialize)]
struct Scenario {
    name: String,
    level: String,
    params: serde_json::Value,
    rounds: Vec<Round>,
}

#[derive(Deserialize)]
struct Round {
    round: u32,
    clients: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    client: String,
    evidence: ClientEvidence,
    factor: f64,
    status: Option<String>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/detect")
}

fn scenarios() -> Vec<Scenario> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixtures/detect exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).expect("readable fixture");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

/// Builds the detector through its serde form: this also checks that the
/// Rust parameter names and defaults are the ones the generator writes.
///
/// The generator implements the reference's formulas, which count harmful
/// samples against the declared count and apply no protocol safeguard:
/// select that (unsafe, non-default) counting mode and
/// `Safeguards::reference()` here.
///
/// The generator writes τ among each level's settings, as the reference
/// does; here τ is the probe's and travels with the evidence, so it is taken
/// out of the settings and returned.
fn detector(s: &Scenario) -> (AnyDetector, f32) {
    let mut params = s.params.clone();
    let level_params = match s.level.as_str() {
        "evidence" => &mut params["shadow"],
        _ => &mut params,
    };
    let tau = level_params
        .as_object_mut()
        .and_then(|p| p.remove("threshold"))
        .and_then(|t| t.as_f64())
        .unwrap_or_else(|| panic!("{}: the generator writes τ", s.name)) as f32;
    let reference = serde_json::to_value(Safeguards::reference()).expect("serialisable");
    params["safeguards"] = reference.clone();
    match s.level.as_str() {
        "step" | "shadow" => params["counting"] = "reference".into(),
        "evidence" => {
            params["shadow"]["counting"] = "reference".into();
            params["shadow"]["safeguards"] = reference;
        }
        _ => {}
    }
    let json = serde_json::json!({
        "level": s.level,
        "params": params,
        "clients": {},
    });
    let d =
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{}: params rejected: {e}", s.name));
    (d, tau)
}

fn status_name(d: &AnyDetector, client: &ClientId) -> Option<&'static str> {
    let AnyDetector::Evidence(e) = d else {
        return None;
    };
    Some(match e.client_state(client).map(|s| &s.status) {
        None | Some(EvidenceStatus::Collecting) => "collecting",
        Some(EvidenceStatus::FrozenBenign { .. }) => "frozen_benign",
        Some(EvidenceStatus::FrozenMalicious) => "frozen_malicious",
    })
}

/// Replays a scenario; returns every factor in order.
fn replay(s: &Scenario, checkpoint_every_round: bool) -> Vec<f64> {
    let (mut d, tau) = detector(s);
    let mut factors = Vec::new();
    for round in &s.rounds {
        for entry in &round.clients {
            let id = ClientId::from(entry.client.as_str());
            let evidence = entry.evidence.clone().with_threshold(tau);
            let a = d
                .assess(round.round, &id, &evidence)
                .unwrap_or_else(|e| panic!("{} round {}: {e}", s.name, round.round));
            assert!(
                (a.factor - entry.factor).abs() <= TOLERANCE,
                "{} round {} client {}: rust {} vs python {} ({})",
                s.name,
                round.round,
                entry.client,
                a.factor,
                entry.factor,
                a.reason
            );
            assert!((0.0..=1.0).contains(&a.factor));
            assert!(!a.reason.is_empty());
            if let Some(expected) = &entry.status {
                assert_eq!(
                    status_name(&d, &id),
                    Some(expected.as_str()),
                    "{} round {} client {}",
                    s.name,
                    round.round,
                    entry.client
                );
            }
            factors.push(a.factor);
        }
        if checkpoint_every_round {
            let saved = serde_json::to_string(&d).expect("serialisable");
            d = serde_json::from_str(&saved).expect("resumable");
        }
    }
    factors
}

#[test]
fn every_level_has_reference_scenarios() {
    let all = scenarios();
    for level in ["step", "client", "shadow", "evidence"] {
        assert!(
            all.iter().filter(|s| s.level == level).count() >= 2,
            "level {level} lacks scenarios"
        );
    }
    let assessments: usize = all
        .iter()
        .flat_map(|s| &s.rounds)
        .map(|r| r.clients.len())
        .sum();
    assert!(assessments > 300, "{assessments}");
}

#[test]
fn factors_match_the_python_reference() {
    for s in scenarios() {
        replay(&s, false);
    }
}

#[test]
fn checkpoint_resume_every_round_gives_identical_factors() {
    for s in scenarios() {
        let straight = replay(&s, false);
        let resumed = replay(&s, true);
        assert_eq!(straight.len(), resumed.len());
        for (a, b) in straight.iter().zip(&resumed) {
            assert_eq!(a.to_bits(), b.to_bits(), "{}", s.name);
        }
    }
}

#[test]
fn scenarios_exercise_freezes_audits_and_missing_evidence() {
    let all = scenarios();
    let statuses: Vec<&str> = all
        .iter()
        .flat_map(|s| &s.rounds)
        .flat_map(|r| &r.clients)
        .filter_map(|c| c.status.as_deref())
        .collect();
    for wanted in ["collecting", "frozen_benign", "frozen_malicious"] {
        assert!(
            statuses.contains(&wanted),
            "no {wanted} state in the fixtures"
        );
    }
    let entries = || all.iter().flat_map(|s| &s.rounds).flat_map(|r| &r.clients);
    assert!(entries().any(|c| c.evidence.last_step_score.is_none()));
    assert!(entries().any(|c| c.evidence.shadow_last_score.is_none()));
    assert!(entries().any(|c| c.evidence.step_scores.is_empty() && c.evidence.samples > 0));
    assert!(entries().any(|c| c.factor == 0.0));
    assert!(entries().any(|c| c.factor > 0.0 && c.factor < 1.0));
}
