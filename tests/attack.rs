//! Attack helpers (issue 11 item 4): each checked against a hand
//! computation, and each rejecting what it cannot turn into a finite update.

use safe_fedllm::Error;
use safe_fedllm::attack::{
    Evasion, alie, alie_z_max, evade_probe, gaussian_noise, ipm, scale, sign_flip,
};
use safe_fedllm::features::{FeatureConfig, Normalization, Selection};
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
use safe_fedllm::probe::{LinearProbe, Probe};

const B0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
const A0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B1: &str = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";

fn delta(b0: [f32; 2], a0: [f32; 2]) -> LoraDelta {
    let mut adapter = LoraAdapter::new();
    adapter
        .insert(B0, LoraTensor::new("b", [2, 1], b0.to_vec()).unwrap())
        .unwrap();
    adapter
        .insert(A0, LoraTensor::new("a", [1, 2], a0.to_vec()).unwrap())
        .unwrap();
    LoraDelta::from_adapter(adapter)
}

fn values(d: &LoraDelta, key: &str) -> Vec<f32> {
    d.as_adapter().get(key).unwrap().as_slice().to_vec()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn sign_flip_and_scale_match_hand_computation() {
    let d = delta([1.0, -2.0], [0.5, 0.0]);
    let flipped = sign_flip(&d).unwrap();
    assert_eq!(values(&flipped, B0), [-1.0, 2.0]);
    assert_eq!(values(&flipped, A0), [-0.5, 0.0]);
    let scaled = scale(&d, 10.0).unwrap();
    assert_eq!(values(&scaled, B0), [10.0, -20.0]);
    assert_eq!(values(&scaled, A0), [5.0, 0.0]);
    // Overflow and nonsense factors are errors, not infinite updates.
    assert!(matches!(scale(&d, f32::MAX), Err(Error::NonFinite { .. })));
    assert!(matches!(
        scale(&d, f32::NAN),
        Err(Error::InvalidParameter { name: "factor", .. })
    ));
    let poisoned = delta([f32::INFINITY, 0.0], [0.0, 0.0]);
    assert!(matches!(sign_flip(&poisoned), Err(Error::NonFinite { .. })));
}

#[test]
fn gaussian_noise_is_seeded_with_the_stated_spread() {
    let mut adapter = LoraAdapter::new();
    adapter
        .insert(
            B0,
            LoraTensor::new("b", [20_000, 1], vec![1.0; 20_000]).unwrap(),
        )
        .unwrap();
    let d = LoraDelta::from_adapter(adapter);
    let a = gaussian_noise(&d, 0.5, 7).unwrap();
    let b = gaussian_noise(&d, 0.5, 7).unwrap();
    let c = gaussian_noise(&d, 0.5, 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let noise: Vec<f64> = values(&a, B0).iter().map(|&v| f64::from(v) - 1.0).collect();
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let std = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((std - 0.5).abs() < 0.02, "std {std}");
    assert_eq!(gaussian_noise(&d, 0.0, 1).unwrap(), d);
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            gaussian_noise(&d, bad, 1),
            Err(Error::InvalidParameter { name: "sigma", .. })
        ));
    }
}

#[test]
fn alie_is_mean_plus_z_std_per_coordinate() {
    let benign = [
        delta([1.0, 2.0], [0.0, 4.0]),
        delta([3.0, 2.0], [2.0, 4.0]),
        delta([5.0, 2.0], [1.0, 1.0]),
    ];
    // Coordinate by hand: b0 = (1,3,5): mean 3, population std √(8/3);
    // (2,2,2): mean 2, std 0; a0 = (0,2,1): mean 1, std √(2/3);
    // (4,4,1): mean 3, std √2.
    let z = -1.5f64;
    let attack = alie(&benign, z as f32).unwrap();
    let expect = |mean: f64, var: f64| (mean + z * var.sqrt()) as f32;
    let b = values(&attack, B0);
    let a = values(&attack, A0);
    for (got, want) in b.iter().zip([expect(3.0, 8.0 / 3.0), expect(2.0, 0.0)]) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
    for (got, want) in a.iter().zip([expect(1.0, 2.0 / 3.0), expect(3.0, 2.0)]) {
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
    // z from the paper: n = 50, f = 12 → Φ⁻¹(0.72) = 0.5828; n = 10, f = 2 →
    // s = 6 − 2 = 4, Φ⁻¹(0.6) = 0.2533.
    assert!((alie_z_max(50, 12).unwrap() - 0.582_841_5).abs() < 1e-6);
    assert!((alie_z_max(10, 2).unwrap() - 0.253_347_1).abs() < 1e-6);
    assert!(alie_z_max(10, 10).is_err());
    assert!(alie_z_max(0, 0).is_err());
}

#[test]
fn ipm_is_minus_epsilon_times_the_benign_mean() {
    let benign = [
        delta([1.0, 2.0], [0.0, 4.0]),
        delta([3.0, -2.0], [2.0, 4.0]),
    ];
    let attack = ipm(&benign, 0.1).unwrap();
    let b = values(&attack, B0);
    let a = values(&attack, A0);
    for (got, want) in b.iter().chain(&a).zip([-0.2, 0.0, -0.1, -0.4]) {
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
    }
}

#[test]
fn benign_sets_that_do_not_line_up_are_rejected() {
    assert!(matches!(alie(&[], 1.0), Err(Error::Empty { .. })));
    assert!(matches!(ipm(&[], 1.0), Err(Error::Empty { .. })));
    let mut other = LoraAdapter::new();
    other
        .insert(B1, LoraTensor::new("b", [2, 1], vec![0.0, 0.0]).unwrap())
        .unwrap();
    other
        .insert(A0, LoraTensor::new("a", [1, 2], vec![0.0, 0.0]).unwrap())
        .unwrap();
    let mismatched = [
        delta([1.0, 2.0], [0.0, 0.0]),
        LoraDelta::from_adapter(other),
    ];
    assert!(matches!(
        alie(&mismatched, 1.0),
        Err(Error::AttackInput { index: 1, .. })
    ));
    let mut wide = LoraAdapter::new();
    wide.insert(B0, LoraTensor::new("b", [1, 2], vec![0.0, 0.0]).unwrap())
        .unwrap();
    wide.insert(A0, LoraTensor::new("a", [1, 2], vec![0.0, 0.0]).unwrap())
        .unwrap();
    let reshaped = [delta([1.0, 2.0], [0.0, 0.0]), LoraDelta::from_adapter(wide)];
    assert!(matches!(
        ipm(&reshaped, 1.0),
        Err(Error::AttackInput { index: 1, ref tensor, .. }) if tensor == B0
    ));
    let poisoned = [
        delta([1.0, 2.0], [0.0, 0.0]),
        delta([f32::NAN, 0.0], [0.0, 0.0]),
    ];
    assert!(matches!(alie(&poisoned, 1.0), Err(Error::NonFinite { .. })));
    assert!(matches!(
        ipm(&poisoned[..1], f32::INFINITY),
        Err(Error::InvalidParameter { .. })
    ));
}

/// A probe over the layer-0 lora_B (2 features) with weights (1, 0), bias 0.
fn probe(normalization: Normalization) -> LinearProbe {
    let spec = FeatureConfig::new(Selection::FirstLayerB)
        .normalization(normalization)
        .fit(&[&delta([3.0, 4.0], [1.0, 1.0])])
        .unwrap();
    LinearProbe::new(spec, vec![1.0, 0.0], 0.0).unwrap()
}

#[test]
fn probe_evasion_removes_the_probe_direction() {
    let p = probe(Normalization::L2);
    let d = delta([3.0, 4.0], [7.0, 8.0]);
    // Features (0.6, 0.8): score σ(0.6).
    let out = evade_probe(&p, &d, Evasion::Remove).unwrap();
    assert!((f64::from(out.score_before) - sigmoid(0.6)).abs() < 1e-6);
    assert_eq!(values(&out.delta, B0), [0.0, 4.0]);
    assert_eq!(
        values(&out.delta, A0),
        [7.0, 8.0],
        "unprobed tensors untouched"
    );
    assert!((out.score_after - 0.5).abs() < 1e-6);
    assert!((out.change_norm - 3.0).abs() < 1e-9);
    assert!((out.relative_change - 0.6).abs() < 1e-9);
}

#[test]
fn probe_evasion_shrinks_just_below_the_target() {
    // L2: logit = p'/√(16 + p'²) = logit(0.55) = r ⇒ p' = 4r/√(1 − r²).
    let p = probe(Normalization::L2);
    let d = delta([3.0, 4.0], [7.0, 8.0]);
    let r = (0.55f64 / 0.45).ln();
    let expected = 4.0 * r / (1.0 - r * r).sqrt();
    let out = evade_probe(&p, &d, Evasion::ShrinkTo(0.55)).unwrap();
    let b = values(&out.delta, B0);
    assert!(
        (f64::from(b[0]) - expected).abs() < 1e-5,
        "{} vs {expected}",
        b[0]
    );
    assert_eq!(b[1], 4.0);
    assert!((out.score_after - 0.55).abs() < 1e-5);
    // Already below the target: nothing changes.
    let low = evade_probe(&p, &d, Evasion::ShrinkTo(0.9)).unwrap();
    assert_eq!(low.delta, d);
    assert_eq!(low.change_norm, 0.0);
    // Below what the probe can score under L2 (σ(−1) ≈ 0.269): error.
    assert!(matches!(
        evade_probe(&p, &d, Evasion::ShrinkTo(0.2)),
        Err(Error::InvalidParameter { name: "target", .. })
    ));
    assert!(evade_probe(&p, &d, Evasion::ShrinkTo(1.0)).is_err());

    // Without normalisation: logit = p' ⇒ p' = logit(0.3) exactly.
    let raw = probe(Normalization::None);
    let out = evade_probe(&raw, &d, Evasion::ShrinkTo(0.3)).unwrap();
    let expected = (0.3f64 / 0.7).ln();
    assert!((f64::from(values(&out.delta, B0)[0]) - expected).abs() < 1e-6);
    assert!((out.score_after - 0.3).abs() < 1e-6);
}

#[test]
fn probe_evasion_rejects_a_reshaped_or_poisoned_update() {
    let p = probe(Normalization::L2);
    let mut wide = LoraAdapter::new();
    wide.insert(B0, LoraTensor::new("b", [1, 2], vec![3.0, 4.0]).unwrap())
        .unwrap();
    assert!(matches!(
        evade_probe(&p, &LoraDelta::from_adapter(wide), Evasion::Remove),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        evade_probe(&p, &delta([f32::NAN, 0.0], [0.0, 0.0]), Evasion::Remove),
        Err(Error::NonFinite { .. })
    ));
    // A delta without the probed key: nothing to remove, score σ(b).
    let mut other = LoraAdapter::new();
    other
        .insert(A0, LoraTensor::new("a", [1, 2], vec![1.0, 1.0]).unwrap())
        .unwrap();
    let untouched = LoraDelta::from_adapter(other);
    let out = evade_probe(&p, &untouched, Evasion::Remove).unwrap();
    assert_eq!(out.delta, untouched);
    assert_eq!(out.score_after, p.score(&untouched).unwrap());
}
