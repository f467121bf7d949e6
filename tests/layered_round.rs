//! The layered detector in a defended round and in a defense spec: each
//! source's say in the audit line, a liar in one source held to what the
//! server-scored update alone gives, the spec's round trips and typed errors.
//!
//! Setting: a toy linear probe over the layer-0 lora_B delta (+x is
//! malicious, +y benign), benign clients that move along +y, and liars.

use safe_fedllm::Error;
use safe_fedllm::aggregate::FedAvg;
use safe_fedllm::detect::{
    AnyDetector, ClientLevel, DefenseLevel, Detector, Layered, LayeredParams, LevelParams,
    Safeguards, ShadowLevel, StepLevel, Verdict,
};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    DefendedRound, DefenseSpec, DetectorSpec, OwnedReport, OwnedSteps, RoundOutcome, RoundParams,
    borrow_reports,
};

mod common;
use common::{B, b_adapter as adapter, b_global as global, b_probe as probe};

/// Four honest clients along +y with a two-step trail and a benign shadow.
fn honest() -> Vec<OwnedReport> {
    (0..4)
        .map(|i| {
            let y = 0.5 + 0.1 * i as f32;
            OwnedReport::new(format!("h{i}"), adapter(0.0, y), 100)
                .with_steps(OwnedSteps::Adapters(vec![
                    adapter(0.0, y / 2.0),
                    adapter(0.0, y),
                ]))
                .with_shadow(OwnedSteps::Scores(vec![0.1, 0.1]))
        })
        .collect()
}

/// A round over `sources` (min), reading self-reported scores so a trail or
/// shadow lie can be told in a line.
fn layered_round(sources: Vec<LevelParams>) -> DefendedRound<LinearProbe, AnyDetector, FedAvg> {
    let detector = AnyDetector::from(LayeredParams::default().sources(sources).build().unwrap());
    DefendedRound::new(probe(), detector, FedAvg::new())
        .with_params(RoundParams::default().accept_self_reported(true))
        .unwrap()
}

fn run(round: &mut DefendedRound<LinearProbe, AnyDetector, FedAvg>, r: u32) -> RoundOutcome {
    let mut reports = honest();
    reports.push(
        // The update is harmful (+x); the trail and the shadow report lie.
        OwnedReport::new("liar", adapter(1.0, 0.0), 100)
            .with_steps(OwnedSteps::Scores(vec![0.0; 6]))
            .with_shadow(OwnedSteps::Scores(vec![0.0; 6])),
    );
    round.run(r, &global(), &borrow_reports(&reports)).unwrap()
}

/// The x coordinate of the new global: only the liar moves it.
fn x_of(outcome: &RoundOutcome) -> f32 {
    outcome
        .new_global
        .as_ref()
        .map_or(0.0, |g| g.get(B).unwrap().as_slice()[0])
}

#[test]
fn a_lying_trail_or_shadow_is_held_to_the_update_alone() {
    // Step and shadow level without their safeguards (which would cap them
    // on the server-scored update too): the lie fools them completely.
    let off = Safeguards::reference();
    let sources = vec![
        LevelParams::Client(ClientLevel::params()),
        LevelParams::Step(StepLevel::params().safeguards(off)),
        LevelParams::Shadow(ShadowLevel::params().safeguards(off)),
    ];
    let mut layered = layered_round(sources);
    let mut client_only = DefendedRound::new(
        probe(),
        AnyDetector::from(ClientLevel::params().build().unwrap()),
        FedAvg::new(),
    );
    for r in 0..4 {
        let out = run(&mut layered, r);
        assert_eq!(out.level, DefenseLevel::Layered);
        let liar = out.client("liar").unwrap();
        let alone = run_client_only(&mut client_only, r);
        // The step and shadow sources believe the lie; the client source
        // does not, and it vetoes.
        let by_level = |l: DefenseLevel| {
            liar.sources
                .iter()
                .find(|s| s.level == l)
                .map(|s| s.factor)
                .unwrap()
        };
        assert!(by_level(DefenseLevel::Step) > 0.9, "round {r}");
        assert!(by_level(DefenseLevel::Shadow) > 0.9, "round {r}");
        assert_eq!(liar.factor, by_level(DefenseLevel::Client));
        assert!(
            liar.factor <= alone + 1e-15,
            "round {r}: {} > {alone}",
            liar.factor
        );
        assert_eq!(liar.verdict, Verdict::Malicious);
        // The bound on how far the liar moved the global: its weight share
        // times its x (1.0), with honest clients on probation at 0.5.
        let share = 100.0 * liar.factor / (4.0 * 100.0 * 0.5 + 100.0 * liar.factor);
        let x = x_of(&out);
        assert!(
            f64::from(x) <= share + 1e-6,
            "round {r}: x = {x}, share {share}"
        );
        assert!(x < 0.02, "round {r}: x = {x}");
        // Every source's say is in the audit line.
        let line = out.to_json_line().unwrap();
        assert!(line.contains(r#""sources":[{"level":"client""#), "{line}");
    }
}

fn run_client_only(round: &mut DefendedRound<LinearProbe, AnyDetector, FedAvg>, r: u32) -> f64 {
    let mut reports = honest();
    reports.push(OwnedReport::new("liar", adapter(1.0, 0.0), 100));
    let out = round.run(r, &global(), &borrow_reports(&reports)).unwrap();
    out.client("liar").unwrap().factor
}

#[test]
fn honest_clients_keep_their_weight_under_the_layered_detector() {
    let mut round = layered_round(Layered::params().levels().to_vec());
    for r in 0..5 {
        let reports = honest();
        let out = round.run(r, &global(), &borrow_reports(&reports)).unwrap();
        for c in &out.clients {
            let worst = c.sources.iter().map(|s| s.factor).fold(1.0, f64::min);
            assert_eq!(c.factor, worst);
            assert_eq!(c.verdict, Verdict::Benign, "round {r}");
            let expected = if r < 3 { 0.5 } else { 0.9 };
            assert!(c.factor >= expected, "round {r}: {}", c.factor);
        }
    }
}

const LAYERED_TOML: &str = r#"
[detector]
level = "layered"
combine = "min"

[[detector.sources]]
level = "client"
steepness = 12.0

[[detector.sources]]
level = "step"
decay = 0.9
"#;

#[test]
fn a_layered_spec_round_trips_and_builds() {
    let spec = DefenseSpec::from_toml(LAYERED_TOML).unwrap();
    let DetectorSpec::Layered(params) = &spec.detector else {
        panic!("{:?}", spec.detector);
    };
    let expected = LayeredParams::default().sources(vec![
        LevelParams::Client(ClientLevel::params().steepness(12.0)),
        LevelParams::Step(StepLevel::params().decay(0.9)),
    ]);
    assert_eq!(params, &expected);
    let json = spec.to_json().unwrap();
    assert_eq!(DefenseSpec::from_json(&json).unwrap(), spec);
    let toml = spec.to_toml().unwrap();
    assert_eq!(DefenseSpec::from_toml(&toml).unwrap(), spec, "{toml}");
    let valid = spec.check().unwrap();
    let round = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
    assert_eq!(round.detector().level(), DefenseLevel::Layered);
    assert!(round.detector().uses_all_steps());
    assert!(!round.detector().uses_shadow());
    // Inline tables work too, and the sources default to client + step.
    let inline = DefenseSpec::from_toml(
        "[detector]\nlevel = \"layered\"\nsources = [{ level = \"client\" }, { level = \"step\" }]\n",
    )
    .unwrap();
    let bare = DefenseSpec::from_toml("[detector]\nlevel = \"layered\"\n").unwrap();
    assert_eq!(inline, bare);
}

fn spec_key(text: &str) -> String {
    match DefenseSpec::from_toml(text).and_then(|s| s.check().map(|_| s)) {
        Err(Error::Spec { key, .. }) => key,
        other => panic!("{text}: expected Error::Spec, got {other:?}"),
    }
}

#[test]
fn unknown_keys_and_bad_values_in_a_layered_spec_are_typed_errors() {
    let misspelt = LAYERED_TOML.replace("steepness", "steepnes");
    assert!(spec_key(&misspelt).contains("steepnes"));
    let unknown_top = LAYERED_TOML.replace("combine = \"min\"", "combin = \"min\"");
    assert!(spec_key(&unknown_top).contains("combin"));
    let bad_rule = LAYERED_TOML.replace("\"min\"", "\"max\"");
    assert!(spec_key(&bad_rule).starts_with("detector"));
    let nested = "[detector]\nlevel = \"layered\"\nsources = [{ level = \"layered\" }]\n";
    assert!(spec_key(nested).starts_with("detector"));
    let empty = "[detector]\nlevel = \"layered\"\nsources = []\n";
    assert_eq!(spec_key(empty), "detector.sources");
    let out_of_range = LAYERED_TOML.replace("decay = 0.9", "decay = 1.5");
    assert_eq!(spec_key(&out_of_range), "detector.decay");
}

#[test]
fn a_checkpointed_layered_round_resumes_bit_identically() {
    let sources = Layered::params().levels().to_vec();
    let mut a = layered_round(sources.clone());
    for r in 0..2 {
        run(&mut a, r);
    }
    let json = serde_json::to_string(a.detector()).unwrap();
    let mut b = layered_round(sources);
    *b.detector_mut() = serde_json::from_str(&json).unwrap();
    for r in 2..5 {
        let (x, y) = (run(&mut a, r), run(&mut b, r));
        for (p, q) in x.clients.iter().zip(&y.clients) {
            assert_eq!(p.factor.to_bits(), q.factor.to_bits());
            assert_eq!(p.sources, q.sources);
        }
    }
    assert_eq!(a.detector(), b.detector());
}

#[test]
fn the_recommended_preset_is_the_example_spec_file() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/fed_llama/specs/recommended.toml");
    let mut file = DefenseSpec::from_file(&path).unwrap();
    file.probe.base_dir = None;
    assert_eq!(file, DefenseSpec::recommended());
    assert_eq!(
        DefenseSpec::preset("recommended").unwrap(),
        DefenseSpec::recommended()
    );
    let valid = DefenseSpec::recommended().check().unwrap();
    let round = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
    assert_eq!(round.detector().level(), DefenseLevel::Layered);
    // The crate's default stays the safe spec.
    assert_ne!(DefenseSpec::default(), DefenseSpec::recommended());
}
