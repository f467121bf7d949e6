use super::*;
use crate::detect::{ClientLevel, EvidenceLevel, Probation, Safeguards, ShadowLevel, StepLevel};

fn id(s: &str) -> ClientId {
    ClientId::from(s)
}

/// Client + step + shadow level, the paper's formulas alone (no probation,
/// no cap), so each source's factor is its formula's.
fn three_sources() -> Layered {
    let off = Safeguards::reference();
    LayeredParams::default()
        .sources(vec![
            LevelParams::Client(ClientLevel::params().safeguards(off)),
            LevelParams::Step(StepLevel::params().safeguards(off)),
            LevelParams::Shadow(ShadowLevel::params().safeguards(off)),
        ])
        .build()
        .unwrap()
}

/// What each level alone says about `e` in round 0 for a fresh client.
fn alone(e: &ClientEvidence) -> [f64; 3] {
    let mut d = three_sources();
    let mut factors = [0.0; 3];
    for (slot, source) in factors.iter_mut().zip(d.sources.iter_mut()) {
        *slot = source.clone().assess(0, &id("c"), e).unwrap().factor;
    }
    factors
}

/// Each source vetoes: harmful evidence in one source only (the other two
/// benign) gives a combined factor equal to that source's, far below the
/// others'.
#[test]
fn each_source_can_veto() {
    let benign_steps = vec![0.05f32; 4];
    let harmful_steps = vec![0.99f32; 4];
    let cases = [
        // Harmful update, benign trail and shadow: client level vetoes.
        ClientEvidence::new(64)
            .with_steps(benign_steps.clone())
            .with_last_step_score(Some(0.99))
            .with_shadow_steps(benign_steps.clone()),
        // Harmful trail, benign update and shadow: step level vetoes.
        ClientEvidence::new(64)
            .with_steps(harmful_steps.clone())
            .with_last_step_score(Some(0.05))
            .with_shadow_steps(benign_steps.clone()),
        // Harmful shadow, benign update and trail: shadow level vetoes.
        ClientEvidence::new(64)
            .with_steps(benign_steps.clone())
            .with_shadow_steps(harmful_steps.clone()),
    ];
    for (veto, e) in cases.iter().enumerate() {
        let solo = alone(e);
        let a = three_sources().assess(0, &id("c"), e).unwrap();
        let min = solo.iter().copied().fold(1.0, f64::min);
        assert_eq!(a.factor, min, "case {veto}: {solo:?}");
        assert_eq!(solo.get(veto).copied(), Some(min), "case {veto}: {solo:?}");
        for (other, f) in solo.iter().enumerate().filter(|&(j, _)| j != veto) {
            assert!(*f > 0.5, "case {veto}: source {other} is benign: {f}");
        }
        assert!(a.factor < 0.1, "case {veto}: {}", a.factor);
        assert_eq!(a.verdict, Verdict::Malicious, "case {veto}");
        assert_eq!(a.sources.len(), 3);
        let vetoing = a.sources.get(veto).unwrap();
        assert_eq!(vetoing.verdict, Verdict::Malicious, "case {veto}");
    }
}

/// A lying trail (every step benign) cannot lift the factor above what the
/// client level alone gives from the server-scored update.
#[test]
fn a_lying_trail_never_lifts_the_factor_above_the_update_alone() {
    let mut layered = Layered::params().build().unwrap();
    let mut client = ClientLevel::params().build().unwrap();
    for round in 0..6 {
        let update = if round % 2 == 0 { 0.95 } else { 0.6 };
        let e = ClientEvidence::new(64)
            .with_steps(vec![0.0; 8])
            .with_last_step_score(Some(update));
        let a = layered.assess(round, &id("liar"), &e).unwrap();
        let c = client.assess(round, &id("liar"), &e).unwrap();
        assert!(
            a.factor <= c.factor,
            "round {round}: {} > {}",
            a.factor,
            c.factor
        );
    }
}

/// An honest client is not pushed below its worst source: on probation at
/// every level it weighs the probation factor, not its square.
#[test]
fn an_honest_client_sits_at_its_worst_source() {
    let mut d = Layered::params().build().unwrap();
    let e = ClientEvidence::new(64)
        .with_steps(vec![0.05; 4])
        .with_last_step_score(Some(0.05));
    for round in 0..5 {
        let a = d.assess(round, &id("honest"), &e).unwrap();
        let worst = a.sources.iter().map(|s| s.factor).fold(1.0, f64::min);
        assert_eq!(a.factor, worst, "round {round}");
        assert_eq!(a.verdict, Verdict::Benign);
        if round < 3 {
            assert_eq!(a.factor, 0.5, "probation, round {round}");
        } else {
            assert!(a.factor > 0.9, "round {round}: {}", a.factor);
        }
    }
}

#[test]
fn product_compounds_and_still_vetoes() {
    let off = Safeguards::reference().probation(Probation::Off);
    let mut d = LayeredParams::default()
        .sources(vec![
            LevelParams::Client(ClientLevel::params().safeguards(off)),
            LevelParams::Step(StepLevel::params().safeguards(off)),
        ])
        .combine(Combine::Product)
        .build()
        .unwrap();
    let e = ClientEvidence::new(64)
        .with_steps(vec![0.1, 0.9])
        .with_last_step_score(Some(0.5));
    let a = d.assess(0, &id("c"), &e).unwrap();
    let product: f64 = a.sources.iter().map(|s| s.factor).product();
    assert!((a.factor - product).abs() < 1e-15);
    assert!(a.sources.iter().all(|s| a.factor <= s.factor));
}

#[test]
fn the_round_reads_the_union_of_what_the_sources_read() {
    let client_only = LayeredParams::default()
        .sources(vec![LevelParams::Client(ClientLevel::params())])
        .build()
        .unwrap();
    assert!(!client_only.uses_all_steps() && !client_only.uses_shadow());
    assert_eq!(client_only.shadow_need(&id("a")), ShadowNeed::Never);
    let d = LayeredParams::default()
        .sources(vec![
            LevelParams::Client(ClientLevel::params()),
            LevelParams::Step(StepLevel::params()),
            LevelParams::Evidence(EvidenceLevel::params()),
        ])
        .build()
        .unwrap();
    assert_eq!(d.level(), DefenseLevel::Layered);
    assert!(d.uses_all_steps() && d.uses_shadow());
    assert!(d.needs_shadow(&id("a")));
    assert_eq!(d.shadow_need(&id("a")), ShadowNeed::EveryRound);
    let any = AnyDetector::from(d);
    assert!(any.uses_all_steps() && any.uses_shadow());
}

/// Checkpoint after some rounds, resume, and the next rounds give
/// bit-identical assessments.
#[test]
fn state_round_trips_and_resumes_bit_identically() {
    let mut d = AnyDetector::from(three_sources());
    let e = |r: u32| {
        let s = (r as f32 * 0.17) % 1.0;
        ClientEvidence::new(64)
            .with_steps(vec![s, 1.0 - s, 0.3])
            .with_shadow_steps(vec![1.0 - s, 0.2])
    };
    for r in 0..3 {
        for c in ["a", "b"] {
            d.assess(r, &id(c), &e(r)).unwrap();
        }
    }
    let json = serde_json::to_string(&d).unwrap();
    assert!(json.starts_with(r#"{"level":"layered""#), "{json}");
    let mut resumed: AnyDetector = serde_json::from_str(&json).unwrap();
    assert_eq!(resumed, d);
    for r in 3..6 {
        for c in ["a", "b", "new"] {
            let x = d.assess(r, &id(c), &e(r)).unwrap();
            let y = resumed.assess(r, &id(c), &e(r)).unwrap();
            assert_eq!(x.factor.to_bits(), y.factor.to_bits());
            assert_eq!(x, y);
        }
    }
}

#[test]
fn tampered_layered_checkpoints_are_rejected() {
    let d = AnyDetector::from(three_sources());
    let json = serde_json::to_value(&d).unwrap();
    let restore = |tamper: &dyn Fn(&mut serde_json::Value)| {
        let mut j = json.clone();
        tamper(&mut j);
        serde_json::from_value::<AnyDetector>(j)
            .unwrap_err()
            .to_string()
    };
    let empty = restore(&|j| j["sources"] = serde_json::json!([]));
    assert!(empty.contains("layered source list"), "{empty}");
    let nested = restore(&|j| {
        let inner = j.clone();
        j["sources"] = serde_json::json!([inner]);
    });
    assert!(nested.contains("layered source"), "{nested}");
    let bad_source = restore(&|j| j["sources"][0]["params"]["pivot"] = 1.0.into());
    assert!(bad_source.contains("pivot"), "{bad_source}");
    let unknown = restore(&|j| j["extra"] = 1.into());
    assert!(unknown.contains("extra"), "{unknown}");
}

#[test]
fn invalid_settings_are_rejected_by_name() {
    match LayeredParams::default().sources(Vec::new()).build() {
        Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, "sources"),
        other => panic!("{other:?}"),
    }
    let bad = LayeredParams::default()
        .sources(vec![LevelParams::Client(ClientLevel::params().pivot(2.0))]);
    match bad.build() {
        Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, "pivot"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn settings_give_back_the_params() {
    let p = LayeredParams::default().combine(Combine::Product);
    assert_eq!(p.clone().build().unwrap().settings(), p);
}
