//! Invariant: under the default admission, whatever the clients send (values,
//! sample counts), the defended round's new global stays within the admission
//! bound: ‖new − global‖₂ ≤ 10 × the round's median update norm (over the
//! clients with finite updates), the default `NormBound::MedianMultiple(10)`.
#![no_main]

mod common;

use common::{Bytes, KEY_B, adapter, flat};
use libfuzzer_sys::fuzz_target;
use safe_fedllm::ClientId;
use safe_fedllm::aggregate::FedAvg;
use safe_fedllm::detect::ClientLevel;
use safe_fedllm::features::{FeatureConfig, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta};
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{ClientReport, DefendedRound};

fn norm(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Mean of the middle two for an even count, as admission computes it.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let global = adapter([0.0, 0.5, -0.5, 0.25]);
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[LoraDelta::between(&adapter([0.0, 0.5, 0.5, 0.25]), &global).expect("delta")])
        .expect("spec");
    assert_eq!(spec.layout().first().map(|b| b.key.as_str()), Some(KEY_B));
    // A permissive probe (every score 0.5 < τ): the bound must come from admission alone.
    let probe = LinearProbe::new(spec, vec![0.0, 0.0], 0.0).expect("probe");
    let detector = ClientLevel::params().build().expect("detector");
    let mut round = DefendedRound::new(probe, detector, FedAvg::new());

    let n = 1 + usize::from(bytes.u8() % 7);
    let updates: Vec<LoraAdapter> = (0..n)
        .map(|_| adapter([bytes.f32(), bytes.f32(), bytes.f32(), bytes.f32()]))
        .collect();
    let ids: Vec<ClientId> = (0..n).map(|i| ClientId::from(format!("c{i}"))).collect();
    let counts: Vec<u64> = (0..n).map(|_| bytes.count()).collect();
    let reports: Vec<ClientReport> = ids
        .iter()
        .zip(&updates)
        .zip(&counts)
        .map(|((id, u), &c)| ClientReport::new(id, u, c))
        .collect();
    let outcome = round
        .run(0, &global, &reports)
        .expect("per-client faults never fail a round");

    let g = flat(&global);
    let norms: Vec<f64> = updates
        .iter()
        .map(flat)
        .filter(|u| u.iter().all(|v| v.is_finite()))
        .map(|u| norm(&u, &g))
        .collect();
    let bound = 10.0 * median(norms);
    match &outcome.new_global {
        None => assert!(outcome.skipped),
        Some(new) => {
            let moved = norm(&flat(new), &g);
            // f32 rounding of global + Δ: a few ulps of the largest magnitude.
            let slack = 1e-5 * (bound + 1.0);
            assert!(
                moved <= bound + slack,
                "moved {moved} beyond the bound {bound}: {}",
                outcome.to_json_line().unwrap_or_default()
            );
        }
    }
});
