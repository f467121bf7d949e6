//! The defense spec: the shared fixture (`fixtures/spec/`), round trips
//! through JSON and TOML, typed errors for every misspelt key and
//! out-of-range value per section, and the one τ moving verdicts.

use safe_fedllm::aggregate::AggregatorSpec;
use safe_fedllm::detect::{
    ClientLevelParams, EvidenceLevelParams, ShadowLevelParams, StepLevelParams, Verdict,
};
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{AdapterView, LoraAdapter, LoraDelta, LoraTensor, TensorSource, read_file};
use safe_fedllm::probe::synthetic::SyntheticConfig;
use safe_fedllm::probe::{CalibratedParams, LinearProbe, Probe, ProbeBuilder, Threshold};
use safe_fedllm::round::{
    AuditSpec, ClientReport, DefendedRound, DefenseSpec, DetectorSpec, RoundOutcome, ValidDefense,
};
use safe_fedllm::{ClientId, Error};
use serde_json::Value;

mod common;

use common::{projection, spec_fixture as fixture};

const KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// The fixture's uploads: (client, file, declared samples).
const UPLOADS: [(&str, &str, u64); 4] = [
    ("alice", "alice.safetensors", 100),
    ("bob", "bob.safetensors", 100),
    ("carol", "carol.safetensors", 120),
    ("mallory", "mallory.safetensors", 100),
];

fn run_fixture() -> RoundOutcome {
    let spec = DefenseSpec::from_file(fixture("defense.toml"))
        .unwrap()
        .check()
        .unwrap();
    let mut round = DefendedRound::from_spec(&spec).unwrap();
    let global = LoraAdapter::load(fixture("global.safetensors")).unwrap();
    let bytes: Vec<Vec<u8>> = UPLOADS
        .iter()
        .map(|(_, f, _)| read_file(&fixture(f), &Default::default()).unwrap())
        .collect();
    let views: Vec<AdapterView> = bytes
        .iter()
        .map(|b| AdapterView::parse(b).unwrap())
        .collect();
    let ids: Vec<ClientId> = UPLOADS.iter().map(|(c, _, _)| ClientId::from(*c)).collect();
    let reports: Vec<ClientReport> = UPLOADS
        .iter()
        .zip(&ids)
        .zip(&views)
        .map(|(((_, _, n), id), v)| ClientReport::new(id, v as &dyn TensorSource, *n))
        .collect();
    round.run(0, &global, &reports).unwrap()
}

#[test]
fn the_fixture_spec_gives_the_expected_round() {
    let outcome = run_fixture();
    // What the spec says, checked on its own terms.
    let mallory = outcome.client("mallory").unwrap();
    assert_eq!(mallory.verdict, Verdict::Malicious);
    assert!(mallory.factor < 0.01, "{}", mallory.factor);
    assert!(!outcome.skipped);
    assert_eq!(outcome.threshold, 0.9); // the spec's τ, not the default 0.8
    for c in ["alice", "bob", "carol"] {
        assert_eq!(outcome.client(c).unwrap().verdict, Verdict::Benign);
    }
    // And what the command-line tool and Python must reproduce.
    let line: Value = serde_json::from_str(&outcome.to_json_line().unwrap()).unwrap();
    let got = projection(&line);
    let path = fixture("expected.json");
    if std::env::var_os("SAFE_FEDLLM_REGENERATE").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("expected.json")).unwrap();
    assert_eq!(got, expected);
}

#[test]
fn the_audit_line_and_header_carry_the_spec_hash() {
    let spec = DefenseSpec::from_file(fixture("defense.toml")).unwrap();
    let valid = spec.check().unwrap();
    let outcome = run_fixture();
    assert_eq!(outcome.spec_sha256.as_deref(), Some(valid.sha256()));
    let header: Value = serde_json::from_str(&valid.header_json().unwrap()).unwrap();
    assert_eq!(header["spec_sha256"], valid.sha256());
    // The header's spec is the whole spec: reading it back gives the same hash.
    let back = DefenseSpec::from_json(&header["spec"].to_string()).unwrap();
    assert_eq!(back.check().unwrap().sha256(), valid.sha256());
    // A different setting is a different hash.
    let mut other = spec.clone();
    other.accept_self_reported = true;
    assert_ne!(other.check().unwrap().sha256(), valid.sha256());
}

fn specs_to_round_trip() -> Vec<DefenseSpec> {
    let mut specs = vec![
        DefenseSpec::safe(),
        DefenseSpec::reference(),
        DefenseSpec::from_file(fixture("defense.toml")).unwrap(),
    ];
    let detectors = [
        DetectorSpec::Step(StepLevelParams::default().decay(0.9)),
        DetectorSpec::Client(ClientLevelParams::default().steepness(7.0)),
        DetectorSpec::Shadow(ShadowLevelParams::default().eta(3.0)),
        DetectorSpec::Evidence(EvidenceLevelParams::default().evidence_min(2)),
    ];
    for d in detectors {
        specs.push(DefenseSpec {
            detector: d,
            ..DefenseSpec::safe()
        });
    }
    for rule in [
        r#"{"rule":"median"}"#,
        r#"{"rule":"trimmed_mean","beta":0.1}"#,
        r#"{"rule":"krum","f":1,"variant":"winner_neighbourhood"}"#,
        r#"{"rule":"multi_krum","f":1,"m":3,"weighting":"samples"}"#,
        r#"{"rule":"bulyan","f":1}"#,
        r#"{"rule":"geometric_median","max_iterations":50}"#,
        r#"{"rule":"norm_clipping","bound":"median_norm"}"#,
        r#"{"rule":"norm_clipping","bound":3.5}"#,
        r#"{"rule":"foolsgold","kappa":1.0}"#,
        r#"{"rule":"flame","seed":3}"#,
        r#"{"rule":"dnc","f":2,"subsample_dim":100}"#,
    ] {
        specs.push(DefenseSpec {
            aggregator: serde_json::from_str(rule).unwrap(),
            ..DefenseSpec::safe()
        });
    }
    specs.push(DefenseSpec {
        detector: DetectorSpec::Evidence(EvidenceLevelParams::default()),
        audits: Some(AuditSpec { rate: 0.25 }),
        ..DefenseSpec::safe()
    });
    specs
}

#[test]
fn specs_round_trip_through_json_and_toml() {
    for spec in specs_to_round_trip() {
        let json = spec.to_json().unwrap();
        let mut from_json = DefenseSpec::from_json(&json).unwrap();
        from_json.probe.base_dir = spec.probe.base_dir.clone();
        assert_eq!(from_json, spec, "{json}");
        let toml = spec.to_toml().unwrap();
        let mut from_toml = DefenseSpec::from_toml(&toml).unwrap();
        from_toml.probe.base_dir = spec.probe.base_dir.clone();
        assert_eq!(from_toml, spec, "{toml}");
        spec.check().unwrap();
    }
}

/// The key an [`Error::Spec`] names, and its suggestion.
fn spec_error(result: Result<DefenseSpec, Error>) -> (String, Option<String>) {
    match result {
        Err(Error::Spec {
            key, suggestion, ..
        }) => (key, suggestion),
        other => panic!("expected Error::Spec, got {other:?}"),
    }
}

#[test]
fn a_misspelt_key_in_every_section_is_named_with_a_suggestion() {
    let cases = [
        ("trial = \"exact\"\n", "trial", Some("trail")),
        (
            "[gate]\nthreshhold = 0.3\n",
            "gate.threshhold",
            Some("threshold"),
        ),
        (
            "[admission]\nrequire_probe_key = true\n",
            "admission.require_probe_key",
            Some("require_probe_keys"),
        ),
        (
            "[detector]\nlevel = \"client\"\nsteepnes = 3.0\n",
            "detector.steepnes",
            Some("steepness"),
        ),
        (
            "[detector]\nlevel = \"step\"\ndecai = 0.9\n",
            "detector.decai",
            Some("decay"),
        ),
        (
            "[detector]\nlevel = \"shadow\"\netaa = 2.0\n",
            "detector.etaa",
            Some("eta"),
        ),
        (
            "[detector]\nlevel = \"evidence\"\nevidence_mni = 2\n",
            "detector.evidence_mni",
            Some("evidence_min"),
        ),
        (
            "[detector]\nlevel = \"clinet\"\n",
            "detector.level",
            Some("client"),
        ),
        (
            "[aggregator]\nrule = \"krum\"\nf = 1\nvarient = \"paper\"\n",
            "aggregator.varient",
            Some("variant"),
        ),
        (
            "[aggregator]\nrule = \"krumm\"\nf = 1\n",
            "aggregator.rule",
            Some("krum"),
        ),
        (
            "[probe]\npaht = \"p.safetensors\"\n",
            "probe.paht",
            Some("path"),
        ),
        (
            "[probe.inline]\nweights = [1.0]\nbias = 0.0\nbias2 = 1.0\n",
            "probe.inline.bias2",
            None,
        ),
        ("[audits]\nrat = 0.25\n", "audits.rat", Some("rate")),
        ("[audits]\nrate = 0.25\nsecret = 7\n", "audits.secret", None),
    ];
    for (text, key, suggestion) in cases {
        let (k, s) = spec_error(DefenseSpec::from_toml(text));
        assert_eq!(k, key, "{text}");
        if let Some(expected) = suggestion {
            assert_eq!(s.as_deref(), Some(expected), "{text}");
        }
    }
    // The same in JSON.
    let (k, s) = spec_error(DefenseSpec::from_json(r#"{"gate": {"threshhold": 0.3}}"#));
    assert_eq!(
        (k.as_str(), s.as_deref()),
        ("gate.threshhold", Some("threshold"))
    );
}

#[test]
fn an_out_of_range_value_in_every_section_is_a_typed_error_naming_it() {
    let check = |text: &str| {
        DefenseSpec::from_toml(text).and_then(|s| s.check().map(|v: ValidDefense| v.spec().clone()))
    };
    let cases = [
        ("[probe]\nthreshold = 1.5\n", "probe.threshold"),
        ("[gate]\nthreshold = 1.5\n", "gate"),
        (
            "[admission]\nsamples = { policy = \"cap_at\", value = 0 }\n",
            "admission.samples",
        ),
        (
            "[detector]\nlevel = \"client\"\nsteepness = -1.0\n",
            "detector.steepness",
        ),
        (
            "[detector]\nlevel = \"step\"\ndecay = 1.5\n",
            "detector.decay",
        ),
        (
            "[detector]\nlevel = \"shadow\"\neta = 0.0\n",
            "detector.eta",
        ),
        (
            "[aggregator]\nrule = \"trimmed_mean\"\nbeta = 0.7\n",
            "aggregator.beta",
        ),
        (
            "[aggregator]\nrule = \"multi_krum\"\nf = 1\nm = 0\n",
            "aggregator.m",
        ),
        ("trail = { max_abs = -1.0 }\n", "trail"),
        ("[audits]\nrate = 0.0\n", "audits.rate"),
        ("[audits]\nrate = 1.5\n", "audits.rate"),
        ("[audits]\nrate = nan\n", "audits.rate"),
    ];
    for (text, key) in cases {
        let (k, _) = spec_error(check(text));
        assert!(k.starts_with(key), "{text}: key {k}, expected {key}");
    }
}

#[test]
fn presets_are_specs() {
    assert_eq!(DefenseSpec::preset("default").unwrap(), DefenseSpec::safe());
    assert_eq!(
        DefenseSpec::preset("reference").unwrap(),
        DefenseSpec::reference()
    );
    let (key, suggestion) = spec_error(DefenseSpec::preset("refrence"));
    assert_eq!(key, "preset");
    assert_eq!(suggestion.as_deref(), Some("reference"));
    // A spec that names no probe needs one from the caller, and refuses a
    // second one when it names its own.
    let valid = DefenseSpec::safe().check().unwrap();
    assert!(matches!(
        DefendedRound::from_spec(&valid),
        Err(Error::Spec { .. })
    ));
    let named = DefenseSpec::from_file(fixture("defense.toml"))
        .unwrap()
        .check()
        .unwrap();
    let probe = toy_probe(0.8);
    assert!(DefendedRound::from_spec_with_probe(&named, probe.clone()).is_err());
    assert!(DefendedRound::from_spec_with_probe(&valid, probe).is_ok());
    let _ = AggregatorSpec::default();
}

// ------------------------------------------------------------------ one τ

fn adapter(values: &[f32]) -> LoraAdapter {
    let mut a = LoraAdapter::new();
    a.insert(
        KEY,
        LoraTensor::new("b", [values.len(), 1], values.to_vec()).unwrap(),
    )
    .unwrap();
    a
}

/// A probe over two features: +x is malicious.
fn toy_probe(threshold: f32) -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::from_adapter(adapter(&[1.0, 0.0]))])
        .unwrap();
    LinearProbe::new(spec, vec![6.0, -6.0], 0.0)
        .unwrap()
        .with_threshold(threshold)
        .unwrap()
}

/// The verdict a round built from `spec` with `probe` gives `update`.
fn verdict_of(probe: LinearProbe, update: &LoraAdapter) -> (Verdict, f32) {
    let valid = DefenseSpec::safe().check().unwrap();
    let mut round = DefendedRound::from_spec_with_probe(&valid, probe).unwrap();
    let global = adapter(&[0.0, 0.0]);
    let id = ClientId::from("c");
    let outcome = round
        .run(0, &global, &[ClientReport::new(&id, update, 64)])
        .unwrap();
    let c = outcome.client("c").unwrap();
    (c.verdict, c.update_score.unwrap())
}

#[test]
fn the_probes_threshold_decides_the_rounds_verdict() {
    // Score σ(6·(0.8 − 0.6)) ≈ 0.77 for this update.
    let update = adapter(&[0.8, 0.6]);
    let (strict, score) = verdict_of(toy_probe(0.5), &update);
    let (lenient, same) = verdict_of(toy_probe(0.962), &update);
    assert_eq!(score, same);
    assert!(0.5 < score && score < 0.962, "{score}");
    assert_eq!(strict, Verdict::Malicious);
    assert_eq!(lenient, Verdict::Benign);
    // The spec's τ replaces the probe's.
    let spec = DefenseSpec::from_json(r#"{"probe": {"threshold": 0.99}}"#)
        .unwrap()
        .check()
        .unwrap();
    let mut round = DefendedRound::from_spec_with_probe(&spec, toy_probe(0.5)).unwrap();
    assert_eq!(round.probe().threshold(), 0.99);
    let global = adapter(&[0.0, 0.0]);
    let id = ClientId::from("c");
    let outcome = round
        .run(0, &global, &[ClientReport::new(&id, &update, 64)])
        .unwrap();
    assert_eq!(outcome.client("c").unwrap().verdict, Verdict::Benign);
}

#[test]
fn a_target_fpr_calibrated_probe_and_a_refresh_move_verdicts() {
    // Labelled two-feature deltas: benign along −x, malicious along +x.
    let (x, labels) = SyntheticConfig::new(200, 2)
        .separation(3.0)
        .seed(5)
        .generate()
        .unwrap();
    let deltas: Vec<LoraDelta> = x
        .rows()
        .into_iter()
        .map(|r| LoraDelta::from_adapter(adapter(&r.to_vec())))
        .collect();
    let groups: Vec<usize> = (0..200).map(|i| i / 5).collect();
    let calibrated =
        ProbeBuilder::new(CalibratedParams::default().threshold(Threshold::TargetFpr(0.0)))
            .features(FeatureConfig::new(Selection::FirstLayerB))
            .fit_grouped(&deltas, &labels, Some(&groups))
            .unwrap();
    let tau = calibrated.threshold();
    assert_ne!(tau, 0.8, "the calibration chose its own τ");
    // An update whose score lies between the calibrated τ and 0.8: walk
    // between a benign and a malicious sample until the score is there.
    let target = (f64::from(tau) + 0.8) / 2.0;
    let benign = x
        .row(labels.iter().position(|l| !l.is_malicious()).unwrap())
        .to_vec();
    let malicious = x
        .row(labels.iter().position(|l| l.is_malicious()).unwrap())
        .to_vec();
    let mix = |t: f32| -> LoraAdapter {
        let v: Vec<f32> = benign
            .iter()
            .zip(&malicious)
            .map(|(b, m)| b + t * (m - b))
            .collect();
        adapter(&v)
    };
    let score = |t: f32| f64::from(calibrated.score(&LoraDelta::from_adapter(mix(t))).unwrap());
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if (score(mid) < target) == (score(0.0) < score(1.0)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let update = mix((lo + hi) / 2.0);
    let (at_calibrated, s) = verdict_of(calibrated.clone(), &update);
    let (at_default, _) = verdict_of(calibrated.clone().with_threshold(0.8).unwrap(), &update);
    assert!(
        (f64::from(s) - target).abs() < 0.05,
        "score {s}, target {target}"
    );
    assert_ne!(at_calibrated, at_default, "τ = {tau} vs 0.8 at score {s}");

    // A refresh (a new probe between rounds) moves the next round's verdict.
    let valid = DefenseSpec::safe().check().unwrap();
    let mut round = DefendedRound::from_spec_with_probe(&valid, calibrated.clone()).unwrap();
    let global = adapter(&[0.0, 0.0]);
    let id = ClientId::from("c");
    let first = round
        .run(0, &global, &[ClientReport::new(&id, &update, 64)])
        .unwrap();
    round.set_probe(calibrated.with_threshold(0.8).unwrap());
    let second = round
        .run(1, &global, &[ClientReport::new(&id, &update, 64)])
        .unwrap();
    assert_eq!(first.client("c").unwrap().verdict, at_calibrated);
    assert_eq!(second.client("c").unwrap().verdict, at_default);
    assert_eq!(second.threshold, 0.8);
}

#[test]
fn an_audited_spec_runs_only_with_the_servers_secret_which_the_spec_never_holds() {
    let text = "[detector]\nlevel = \"evidence\"\n[audits]\nrate = 0.25\n";
    let valid = DefenseSpec::from_toml(text).unwrap().check().unwrap();
    // The secret is not a spec setting: the spec (and its hash, and the run
    // header) are the same whatever secret the server holds.
    assert!(!valid.header_json().unwrap().contains("secret"));
    let global = adapter(&[0.0, 0.0]);
    let id = ClientId::from("c");
    let update = adapter(&[0.0, 1.0]);
    let reports = [ClientReport::new(&id, &update, 64)];

    // Without the secret the round refuses to run, and changes nothing.
    let mut unkeyed = DefendedRound::from_spec_with_probe(&valid, toy_probe(0.5)).unwrap();
    // Every client the level may audit commits every round, keyed or not.
    assert!(unkeyed.needs_shadow(&id));
    match unkeyed.run(0, &global, &reports) {
        Err(Error::Spec { key, .. }) => assert_eq!(key, "audits"),
        other => panic!("expected Error::Spec at `audits`, got {other:?}"),
    }
    let fresh = DefendedRound::from_spec_with_probe(&valid, toy_probe(0.5)).unwrap();
    assert_eq!(unkeyed.detector(), fresh.detector());

    // Keyed, it runs at the spec's rate.
    let mut keyed = DefendedRound::from_spec_with_probe(&valid, toy_probe(0.5))
        .unwrap()
        .with_audit_secret([9; 32])
        .unwrap();
    assert_eq!(keyed.audit_rate(), Some(0.25));
    let outcome = keyed.run(0, &global, &reports).unwrap();
    assert_eq!(outcome.spec_sha256.as_deref(), Some(valid.sha256()));

    // A secret for a spec without audits is refused rather than ignored.
    let plain = DefenseSpec::safe().check().unwrap();
    let refused = DefendedRound::from_spec_with_probe(&plain, toy_probe(0.5))
        .unwrap()
        .with_audit_secret([9; 32]);
    assert!(matches!(refused, Err(Error::Spec { ref key, .. }) if key == "audits"));
}
