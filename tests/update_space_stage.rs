//! The update-space stage of the recommended defense: Multi-Krum selection
//! that keeps the detector's factors (the selected clients are averaged with
//! weights nₖ·wₖ), checked by hand, then against update-space attackers the
//! probe does not see (sign flip, IPM, sybils, ALIE-style).
//!
//! Setting: a toy linear probe over the layer-0 lora_B delta (+x is
//! malicious, +y benign). Honest clients move along +y; the attackers here
//! never move along +x, so the probe calls every one of them benign.

use safe_fedllm::aggregate::{
    Aggregator, AggregatorSpec, ClientUpdate, ExclusionReason, Weighting,
};
use safe_fedllm::detect::Verdict;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{DefendedRound, DefenseSpec, OwnedReport, borrow_reports};

const B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn adapter(x: f32, y: f32) -> LoraAdapter {
    let mut out = LoraAdapter::new();
    out.insert(B, LoraTensor::new("b", [2, 1], vec![x, y]).unwrap())
        .unwrap();
    out
}

fn global() -> LoraAdapter {
    adapter(0.0, 0.0)
}

fn probe() -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(&adapter(1.0, 0.0), &global()).unwrap()])
        .unwrap();
    LinearProbe::new(spec, vec![20.0, 0.0], -10.0).unwrap()
}

fn y_of(a: &LoraAdapter) -> f32 {
    a.get(B).unwrap().as_slice()[1]
}

/// Five clients along y, f = 1, keep m = 3. Krum scores sum the n − f − 2 = 2
/// smallest squared distances: d 0.0025 + 0.0025 = 0.005, a and b 0.0025 +
/// 0.01 = 0.0125, c 0.01 + 0.0225 = 0.0325, e (the sign flip at −1) ≥ 3.61.
/// Multi-Krum keeps d, a, b; their mean weighted by nₖ·wₖ with factors 1.0,
/// 0.5, 0.2 is (1.0·1.0 + 0.5·1.1 + 0.2·1.05) / 1.7 = 1.76 / 1.7.
#[test]
fn multi_krum_keeps_the_factors_of_the_clients_it_selects() {
    let spec = AggregatorSpec::MultiKrum {
        f: Some(1),
        m: Some(3),
        fraction: None,
        weighting: Some(Weighting::SamplesTimesFactor),
        drop_zero_factor: Some(false),
    };
    let mut rule = spec.check().unwrap();
    let clients = [
        ("a", 1.0, 1.0),
        ("b", 1.1, 0.5),
        ("c", 0.9, 1.0),
        ("d", 1.05, 0.2),
        ("e", -1.0, 1.0),
    ];
    let adapters: Vec<LoraAdapter> = clients.iter().map(|c| adapter(0.0, c.1)).collect();
    let updates: Vec<ClientUpdate<'_>> = clients
        .iter()
        .zip(&adapters)
        .map(|(c, a)| ClientUpdate::new(c.0, a, 100).with_security_factor(c.2))
        .collect();
    let out = rule.aggregate(&global(), &updates).unwrap();
    let y = f64::from(y_of(out.new_global().unwrap()));
    assert!((y - 1.76 / 1.7).abs() < 1e-6, "y = {y}");
    for id in ["c", "e"] {
        assert!(matches!(
            out.exclusion(id).map(|e| &e.reason),
            Some(ExclusionReason::NotSelected { .. })
        ));
    }
    let weight = |id: &str| out.contribution(id).unwrap().weight;
    assert!((weight("a") - 1.0 / 1.7).abs() < 1e-12);
    assert!((weight("b") - 0.5 / 1.7).abs() < 1e-12);
    assert!((weight("d") - 0.2 / 1.7).abs() < 1e-12);
}

/// Seven honest clients along +y (mean 1.0) and three attackers sending
/// `attack`: the new global's y under the recommended preset and under the
/// safe preset (FedAvg).
fn run(attack: f32, round: u32) -> (f32, f32) {
    let honest = [0.94f32, 0.97, 0.99, 1.0, 1.01, 1.03, 1.06];
    let mut reports: Vec<OwnedReport> = honest
        .iter()
        .enumerate()
        .map(|(i, &y)| OwnedReport::new(format!("h{i}"), adapter(0.0, y), 100))
        .collect();
    for i in 0..3 {
        reports.push(OwnedReport::new(format!("z{i}"), adapter(0.0, attack), 100));
    }
    let mut ys = [0.0f32; 2];
    for (slot, spec) in ys
        .iter_mut()
        .zip([DefenseSpec::recommended(), DefenseSpec::safe()])
    {
        let valid = spec.check().unwrap();
        let mut r = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
        let out = r.run(round, &global(), &borrow_reports(&reports)).unwrap();
        for c in out
            .clients
            .iter()
            .filter(|c| c.client.as_str().starts_with('z'))
        {
            // The probe does not see these attacks.
            assert_eq!(c.verdict, Verdict::Benign, "{attack}");
        }
        *slot = y_of(out.new_global.as_ref().unwrap());
    }
    (ys[0], ys[1])
}

#[test]
fn update_space_attackers_the_probe_misses_do_not_move_the_recommended_global() {
    // Sign flip (−mean), IPM (−0.5·mean), sybils just inside the honest
    // norm pointing away (+0.3 and 0.0: a stalled update), and an
    // ALIE-style update one σ below the mean.
    for attack in [-1.0f32, -0.5, 0.0, 0.3, 0.97] {
        let (recommended, fedavg) = run(attack, 0);
        // Multi-Krum keeps 7 of 10; every honest mean of 7 − k honest plus k
        // attackers at ≥ 0.97 is within 0.03 of 1.0. The bound: the global
        // stays within the honest clients' range.
        assert!(
            (0.94..=1.06).contains(&recommended),
            "attack {attack}: recommended y = {recommended}"
        );
        if attack < 0.5 {
            // FedAvg is pulled by 3/10 of the gap (clipping at the median
            // norm leaves the direction).
            assert!(fedavg < 0.8, "attack {attack}: FedAvg y = {fedavg}");
        }
    }
}

/// The recommended selection follows the round's size: four clients keep
/// all four (f = ⌊0.3·4⌋ = 1 is capped at ⌊(4 − 3)/2⌋ = 0), two cannot be
/// selected among and the round is skipped, typed, the global unchanged.
#[test]
fn the_recommended_selection_follows_the_round_size() {
    let valid = DefenseSpec::recommended().check().unwrap();
    let reports = |n: usize| -> Vec<OwnedReport> {
        (0..n)
            .map(|i| OwnedReport::new(format!("h{i}"), adapter(0.0, 1.0 + 0.01 * i as f32), 100))
            .collect()
    };
    let mut r = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
    let four = r.run(0, &global(), &borrow_reports(&reports(4))).unwrap();
    assert!(!four.skipped);
    assert!(four.clients.iter().all(|c| c.aggregation_weight.is_some()));
    let mut r = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
    let two = r.run(0, &global(), &borrow_reports(&reports(2))).unwrap();
    assert!(two.skipped);
    assert!(two.new_global.is_none());
    let reason = serde_json::to_string(&two.skip_reason).unwrap();
    assert!(reason.contains("multi_krum"), "{reason}");
}
