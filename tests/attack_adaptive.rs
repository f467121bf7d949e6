//! The stronger attackers: just-under (knows the probe and τ), surrogate
//! (trains its own probe on its own runs) and sybil (K colluders inside the
//! admission bounds), each against a hand computation.

use safe_fedllm::attack::{Evasion, evade_probe, just_under, surrogate_probe, sybil};
use safe_fedllm::features::{FeatureConfig, Normalization, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor, TensorSource};
use safe_fedllm::probe::{CalibratedParams, Label, LinearProbe, Probe, ProbeBuilder};
use safe_fedllm::round::{Admission, Admitted, LabelledRun, NormBound, OverBound, SamplePolicy};
use safe_fedllm::{ClientId, Error};

const B0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const A0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

fn delta(b0: &[f32], a0: [f32; 2]) -> LoraDelta {
    let mut adapter = LoraAdapter::new();
    adapter
        .insert(
            B0,
            LoraTensor::new("b", [b0.len(), 1], b0.to_vec()).unwrap(),
        )
        .unwrap();
    adapter
        .insert(A0, LoraTensor::new("a", [1, 2], a0.to_vec()).unwrap())
        .unwrap();
    LoraDelta::from_adapter(adapter)
}

fn values(d: &LoraDelta, key: &str) -> Vec<f32> {
    d.as_adapter().get(key).unwrap().as_slice().to_vec()
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

fn probe(normalization: Normalization, weights: Vec<f32>, bias: f32, tau: f32) -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .normalization(normalization)
        .fit(&[&delta(&[3.0, 4.0], [1.0, 1.0])])
        .unwrap();
    LinearProbe::new(spec, weights, bias)
        .unwrap()
        .with_threshold(tau)
        .unwrap()
}

#[test]
fn just_under_sits_at_tau_minus_margin_by_the_closed_form() {
    // L2, w = (2, 0), b = −0.5, τ = 0.8, margin 0.1: target 0.7.
    // v = (30, 4): p = 30, q = 4; r = (logit(0.7) + 0.5)/2; p' = 4r/√(1 − r²).
    let p = probe(Normalization::L2, vec![2.0, 0.0], -0.5, 0.8);
    let d = delta(&[30.0, 4.0], [7.0, 8.0]);
    let r = (logit(0.7) + 0.5) / 2.0;
    let expected = 4.0 * r / (1.0 - r * r).sqrt();
    let out = just_under(&p, &d, 0.1).unwrap();
    let b = values(&out.delta, B0);
    assert!(
        (f64::from(b[0]) - expected).abs() < 1e-5,
        "{} vs {expected}",
        b[0]
    );
    assert_eq!(b[1], 4.0, "the orthogonal part is kept");
    assert_eq!(values(&out.delta, A0), [7.0, 8.0], "unprobed tensors kept");
    assert!((out.score_after - 0.7).abs() < 1e-5);
    assert!(
        out.score_before > 0.8,
        "flagged before: {}",
        out.score_before
    );
    assert!(out.score_after < p.threshold() && !p.is_harmful(out.score_after));
    let strong = d;

    // Without normalisation the logit is linear: 2·p' − 0.5 = logit(0.7).
    let raw = probe(Normalization::None, vec![2.0, 0.0], -0.5, 0.8);
    let out = just_under(&raw, &strong, 0.1).unwrap();
    let expected = (logit(0.7) + 0.5) / 2.0;
    assert!((f64::from(values(&out.delta, B0)[0]) - expected).abs() < 1e-6);
    assert_eq!(values(&out.delta, B0)[1], 4.0);

    // Already below τ − margin: sent as it is.
    let weak = delta(&[-3.0, 4.0], [7.0, 8.0]);
    let out = just_under(&p, &weak, 0.1).unwrap();
    assert_eq!(out.delta, weak);
}

#[test]
fn just_under_rejects_a_margin_outside_zero_tau() {
    let p = probe(Normalization::L2, vec![2.0, 0.0], -0.5, 0.8);
    let d = delta(&[3.0, 4.0], [7.0, 8.0]);
    for margin in [0.0, -0.1, 0.8, 0.9, f32::NAN] {
        assert!(
            matches!(
                just_under(&p, &d, margin),
                Err(Error::InvalidParameter { name: "margin", .. })
            ),
            "{margin}"
        );
    }
    // A target the probe cannot reach under L2 (below σ(b − ‖w‖) = σ(−2.5)).
    assert!(matches!(
        just_under(&p, &d, 0.75),
        Err(Error::InvalidParameter { name: "target", .. })
    ));
}

/// A tiny deterministic generator for the surrogate's runs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

/// Runs whose harmful steps lean along +x₁, benign ones along +x₂.
fn runs(seed: u64, per_class: usize) -> Vec<LabelledRun> {
    let mut rng = Lcg(seed);
    let mut out = Vec::new();
    for i in 0..2 * per_class {
        let harmful = i % 2 == 1;
        let steps = (0..4)
            .map(|_| {
                let lean = if harmful { [2.0, 0.5] } else { [0.5, 2.0] };
                let b = [
                    lean[0] + rng.next(),
                    lean[1] + rng.next(),
                    1.0 + rng.next(),
                    rng.next(),
                ];
                delta(&b, [rng.next(), rng.next()])
            })
            .collect();
        let label = if harmful {
            Label::Malicious
        } else {
            Label::Benign
        };
        out.push(LabelledRun::new(label, steps));
    }
    out
}

#[test]
fn surrogate_direction_is_the_one_removed() {
    let builder = ProbeBuilder::new(CalibratedParams::default().folds(3).seed(5));
    let surrogate = surrogate_probe(&builder, &runs(11, 6)).unwrap();
    let w: Vec<f64> = surrogate.weights().iter().map(|&x| f64::from(x)).collect();
    // The surrogate learned the harmful lean: +x₁ up, +x₂ down.
    assert!(w[0] > 0.0 && w[1] < 0.0, "{w:?}");

    let v = [3.0f32, 1.0, 1.0, 0.5];
    let d = delta(&v, [7.0, 8.0]);
    let out = evade_probe(&surrogate, &d, Evasion::Remove).unwrap();
    // By hand: v' = v − (v·ŵ)ŵ.
    let w_norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
    let vw: f64 = v.iter().zip(&w).map(|(&a, b)| f64::from(a) * b).sum();
    let got = values(&out.delta, B0);
    for j in 0..4 {
        let expected = f64::from(v[j]) - vw * w[j] / (w_norm * w_norm);
        assert!((f64::from(got[j]) - expected).abs() < 1e-5, "{j}");
    }
    // Nothing left along the surrogate's direction; the unprobed tensor kept.
    let left: f64 = got.iter().zip(&w).map(|(&a, b)| f64::from(a) * b).sum();
    assert!(left.abs() < 1e-4, "{left}");
    assert_eq!(values(&out.delta, A0), [7.0, 8.0]);
    assert!((out.change_norm - (vw / w_norm).abs()).abs() < 1e-6);

    // A server probe with another direction still sees part of it.
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .fit(&[&d])
        .unwrap();
    let server = LinearProbe::new(spec, vec![1.0, 0.0, 0.0, 1.0], 0.0).unwrap();
    let seen: f64 = got
        .iter()
        .zip([1.0, 0.0, 0.0, 1.0])
        .map(|(&a, b)| f64::from(a) * b)
        .sum();
    assert!(seen.abs() > 0.1, "{seen}");
    assert!(server.score(&out.delta).unwrap() != 0.5);
}

#[test]
fn a_surrogate_needs_both_classes() {
    let builder = ProbeBuilder::new(CalibratedParams::default().folds(3));
    let benign_only: Vec<LabelledRun> = runs(3, 4)
        .into_iter()
        .filter(|r| r.label == Label::Benign)
        .collect();
    assert!(matches!(
        surrogate_probe(&builder, &benign_only),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        surrogate_probe(&builder, &[]),
        Err(Error::Empty { .. })
    ));
}

fn norm(d: &LoraDelta) -> f64 {
    d.as_adapter()
        .iter()
        .flat_map(|e| e.tensor.as_slice())
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn sybils_sit_just_inside_each_norm_and_sample_policy() {
    // Others' norms 1, 2, 5 (lower median 2); counts 8, 16, 24 (median 16).
    let others = [
        delta(&[1.0, 0.0], [0.0, 0.0]),
        delta(&[0.0, 2.0], [0.0, 0.0]),
        delta(&[3.0, 4.0], [0.0, 0.0]),
    ];
    let counts = [24, 8, 16];
    let direction = delta(&[0.0, -6.0], [8.0, 0.0]); // norm 10
    let policy = |bound, samples| {
        let admission = Admission::default().norm_bound(bound).samples(samples);
        admission.check().unwrap();
        admission
    };
    let cases = [
        (
            NormBound::MedianMultiple(1.5),
            SamplePolicy::CapAtMedianMultiple(1.5),
            0.9 * 1.5 * 2.0,
            24,
        ),
        (
            NormBound::Absolute(4.0),
            SamplePolicy::CapAt(100),
            0.9 * 4.0,
            100,
        ),
        (NormBound::Unbounded, SamplePolicy::Trust, 10.0, 24),
        (
            NormBound::MedianMultiple(1.0),
            SamplePolicy::Uniform,
            0.9 * 2.0,
            1,
        ),
    ];
    for (bound, samples, want_norm, want_samples) in cases {
        let out = sybil(
            &direction,
            &others,
            &counts,
            &policy(bound, samples),
            4,
            0.1,
        )
        .unwrap();
        assert_eq!(out.len(), 4);
        for s in &out {
            assert!(
                (norm(&s.delta) - want_norm).abs() < 1e-5,
                "{bound:?}: {}",
                norm(&s.delta)
            );
            assert_eq!(s.samples, want_samples, "{samples:?}");
            // Same direction: (0, −0.6, 0.8, 0) × the norm.
            let b = values(&s.delta, B0);
            let a = values(&s.delta, A0);
            assert!((f64::from(b[1]) + 0.6 * want_norm).abs() < 1e-5);
            assert!((f64::from(a[0]) - 0.8 * want_norm).abs() < 1e-5);
            assert_eq!((b[0], a[1]), (0.0, 0.0));
        }
    }
}

#[test]
fn admission_lets_every_sybil_through_unclipped_and_bounds_their_pull() {
    // Global zero; others' norms 1, 2, 5; 4 colluders outnumber them, and
    // still the lower median over all 7 cannot drop below a colluder.
    let global = delta(&[0.0, 0.0], [0.0, 0.0]).as_adapter().clone();
    let others = [
        delta(&[1.0, 0.0], [0.0, 0.0]),
        delta(&[0.0, 2.0], [0.0, 0.0]),
        delta(&[3.0, 4.0], [0.0, 0.0]),
    ];
    let counts = [8u64, 8, 8];
    let direction = delta(&[0.0, -6.0], [8.0, 0.0]);
    for admission in [
        Admission::default(),
        Admission::default().over_bound(OverBound::Exclude),
        Admission::default()
            .norm_bound(NormBound::MedianMultiple(3.0))
            .over_bound(OverBound::Exclude),
    ] {
        let sybils = sybil(&direction, &others, &counts, &admission, 4, 0.01).unwrap();
        let ids: Vec<ClientId> = (0..7u32).map(ClientId::from).collect();
        let updates: Vec<LoraAdapter> = others
            .iter()
            .chain(sybils.iter().map(|s| &s.delta))
            .map(|d| d.as_adapter().clone())
            .collect();
        let samples: Vec<u64> = counts
            .iter()
            .copied()
            .chain(sybils.iter().map(|s| s.samples))
            .collect();
        let messages: Vec<(&ClientId, &dyn TensorSource, u64)> = ids
            .iter()
            .zip(&updates)
            .zip(&samples)
            .map(|((id, u), &n)| (id, u as &dyn TensorSource, n))
            .collect();
        let decisions = admission.admit(&global, &[B0], &messages).unwrap();
        let mut pull = 0.0;
        let total: u64 = decisions.iter().filter_map(|d| d.status.samples()).sum();
        for d in &decisions[3..] {
            match d.status {
                Admitted::Admitted { samples, norm } => {
                    assert_eq!(samples, 8, "the count is not capped");
                    pull += norm * samples as f64 / total as f64;
                }
                ref other => panic!("{admission:?}: a sybil was {other:?}"),
            }
        }
        // Four colluders at ≤ k·M each (M = 2, the others' lower median)
        // move a FedAvg global by at most 4·k·M·8/total (honest clients
        // beyond the bound may have been excluded, shrinking the total).
        let k = match admission.bound() {
            NormBound::MedianMultiple(k) => k,
            _ => unreachable!(),
        };
        assert!(pull <= 4.0 * k * 2.0 * 8.0 / total as f64 + 1e-9, "{pull}");
        assert!(
            pull > 0.9 * 4.0 * k * 2.0 * 8.0 / total as f64,
            "{pull}: pushes hard"
        );
    }
}

#[test]
fn sybil_rejects_what_it_cannot_build() {
    let others = [delta(&[1.0, 0.0], [0.0, 0.0])];
    let d = delta(&[0.0, -6.0], [8.0, 0.0]);
    let adm = Admission::default();
    assert!(matches!(
        sybil(&d, &others, &[8], &adm, 0, 0.1),
        Err(Error::InvalidParameter {
            name: "colluders",
            ..
        })
    ));
    for margin in [0.0, 1.0, f64::NAN] {
        assert!(matches!(
            sybil(&d, &others, &[8], &adm, 2, margin),
            Err(Error::InvalidParameter { name: "margin", .. })
        ));
    }
    // A median policy with nobody to take a median of.
    assert!(matches!(
        sybil(&d, &[], &[], &adm, 2, 0.1),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        sybil(
            &delta(&[f32::NAN, 0.0], [0.0, 0.0]),
            &others,
            &[8],
            &adm,
            2,
            0.1
        ),
        Err(Error::NonFinite { .. })
    ));
    // A zero direction stays zero (norm 0 is inside any bound).
    let zero = sybil(&delta(&[0.0, 0.0], [0.0, 0.0]), &others, &[8], &adm, 1, 0.1).unwrap();
    assert_eq!(norm(&zero[0].delta), 0.0);
}
