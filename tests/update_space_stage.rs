//! The update-space stage: a selection that keeps the detector's factors (the
//! selected clients are averaged with weights nₖ·wₖ), FLAME-style (the
//! recommended preset's) and Multi-Krum, checked by hand, then the
//! recommended preset against update-space attackers the probe does not see
//! (sign flip, IPM, stalled sybils, ALIE-style).
//!
//! Setting: a toy linear probe over the layer-0 lora_B delta (+x is
//! malicious, +y benign). Honest clients move along +y; the attackers here
//! never move along +x, so the probe calls every one of them benign.

use safe_fedllm::aggregate::{
    Aggregator, AggregatorSpec, ClientUpdate, ExclusionReason, Weighting,
};
use safe_fedllm::detect::Verdict;
use safe_fedllm::lora::LoraAdapter;
use safe_fedllm::round::{DefendedRound, DefenseSpec, OwnedReport, borrow_reports};

mod common;
use common::{B, b_adapter as adapter, b_global as global, b_probe as probe};

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

/// FLAME weighted by nₖ·wₖ, by hand. Directions (angle from +y): a 5.71°,
/// b −4.76°, c 0°, d 3.18°, e 180°. Single linkage on 1 − cos joins d–a
/// (2.53°), then c–d (3.18°): {a, c, d} is the first component of
/// ⌊5/2⌋ + 1 = 3, admitted; b (joining at 4.76°) and e are outside. The clip
/// bound is the median norm, e's 1.0: a (norm √1.01) is scaled by 1/√1.01,
/// c (0.8) and d (√0.8125) are not. Weights nₖ·wₖ with factors a 1.0,
/// c 1.0, d 0.2.
#[test]
fn flame_keeps_the_factors_of_the_clients_it_selects() {
    let spec = AggregatorSpec::Flame {
        noise_lambda: None,
        seed: None,
        weighting: Some(Weighting::SamplesTimesFactor),
    };
    let mut rule = spec.check().unwrap();
    let clients = [
        ("a", 0.1f32, 1.0f32, 1.0),
        ("b", -0.1, 1.2, 0.5),
        ("c", 0.0, 0.8, 1.0),
        ("d", 0.05, 0.9, 0.2),
        ("e", 0.0, -1.0, 1.0),
    ];
    let adapters: Vec<LoraAdapter> = clients.iter().map(|c| adapter(c.1, c.2)).collect();
    let updates: Vec<ClientUpdate<'_>> = clients
        .iter()
        .zip(&adapters)
        .map(|(c, a)| ClientUpdate::new(c.0, a, 100).with_security_factor(c.3))
        .collect();
    let out = rule.aggregate(&global(), &updates).unwrap();
    let new = out
        .new_global()
        .unwrap()
        .get(B)
        .unwrap()
        .as_slice()
        .to_vec();
    let clip_a = 1.0 / 1.01f64.sqrt();
    let want_x = (clip_a * 0.1 + 0.2 * 0.05) / 2.2;
    let want_y = (clip_a * 1.0 + 0.8 + 0.2 * 0.9) / 2.2;
    assert!((f64::from(new[0]) - want_x).abs() < 1e-6, "{new:?}");
    assert!((f64::from(new[1]) - want_y).abs() < 1e-6, "{new:?}");
    for id in ["b", "e"] {
        assert!(matches!(
            out.exclusion(id).map(|e| &e.reason),
            Some(ExclusionReason::OutsideMajorityCluster { .. })
        ));
    }
    assert!((out.contribution("d").unwrap().weight - 0.2 / 2.2).abs() < 1e-12);
}

/// Seven honest clients along +y (mean 1.0) and three attackers sending
/// `attack`: the new global's y under the recommended preset and under the
/// safe preset (FedAvg).
fn run(attack: f32, round: u32) -> (f32, f32) {
    let honest = [0.94f32, 0.97, 0.99, 1.0, 1.01, 1.03, 1.06];
    let mut reports: Vec<OwnedReport> = honest
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            let x = 0.01 * (i as f32 - 3.0);
            OwnedReport::new(format!("h{i}"), adapter(x, y), 100)
        })
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
    // Sign flip (−mean), IPM (−0.5·mean), colluders sending a zero (stalled)
    // update, and an ALIE-style update one σ below the mean.
    for attack in [-1.0f32, -0.5, 0.0, 0.97] {
        let (recommended, fedavg) = run(attack, 0);
        // The first three are outside the majority cluster by cosine; the
        // ALIE-style one is inside but within the honest range. The bound:
        // the global stays within the honest clients' range.
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

/// The recommended selection needs no Byzantine budget: rounds of two and
/// four clients are aggregated, over at least the ⌊n/2⌋ + 1 clients of the
/// majority cluster.
#[test]
fn the_recommended_selection_runs_on_any_round_size() {
    let valid = DefenseSpec::recommended().check().unwrap();
    for n in [2usize, 4] {
        let reports: Vec<OwnedReport> = (0..n)
            .map(|i| OwnedReport::new(format!("h{i}"), adapter(0.0, 1.0 + 0.01 * i as f32), 100))
            .collect();
        let mut r = DefendedRound::from_spec_with_probe(&valid, probe()).unwrap();
        let out = r.run(0, &global(), &borrow_reports(&reports)).unwrap();
        assert!(!out.skipped, "{n} clients");
        let weighed = out
            .clients
            .iter()
            .filter(|c| c.aggregation_weight.is_some())
            .count();
        assert!(weighed > n / 2, "{n} clients, {weighed} weighed");
    }
}

/// Multi-Krum with a proportional budget follows the round's size: four
/// clients keep all four (f = ⌊0.3·4⌋ = 1 is capped at ⌊(4 − 3)/2⌋ = 0);
/// ten keep seven (f = 3); two are too few for any selection (typed).
#[test]
fn proportional_multi_krum_follows_the_round_size() {
    let spec = AggregatorSpec::MultiKrum {
        f: None,
        m: None,
        fraction: Some(0.3),
        weighting: Some(Weighting::SamplesTimesFactor),
        drop_zero_factor: Some(false),
    };
    let adapters: Vec<LoraAdapter> = (0..10)
        .map(|i| adapter(0.0, 1.0 + 0.01 * i as f32))
        .collect();
    let updates: Vec<ClientUpdate<'_>> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 100))
        .collect();
    for (n, kept) in [(4usize, 4usize), (10, 7)] {
        let mut rule = spec.check().unwrap();
        let out = rule.aggregate(&global(), &updates[..n]).unwrap();
        assert_eq!(out.contributions.len(), kept, "{n} clients");
    }
    // One client removed before the rule counts against f: f = 3 − 1 = 2 of
    // the nine left, keep seven.
    let mut rule = spec.check().unwrap();
    let out = rule
        .aggregate_after_removal(&global(), &updates[..9], 1)
        .unwrap();
    assert_eq!(out.contributions.len(), 7);
    let mut rule = spec.check().unwrap();
    assert!(matches!(
        rule.aggregate(&global(), &updates[..2]),
        Err(safe_fedllm::Error::TooFewClients { .. })
    ));
}
