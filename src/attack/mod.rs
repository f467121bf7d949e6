//! Attack helpers for your own evaluations: the classic update-space
//! attacks on federated aggregation, and an adaptive attack on the
//! LoRA-Probe itself.
//!
//! A defense is only as good as the attacks it was tried against. These
//! functions turn honest ΔLoRA updates ([`LoraDelta`], PEFT orientation)
//! into malicious ones so a user can run them through a defended round and
//! see what holds. Each follows its paper's definition:
//!
//! | helper | paper | malicious update |
//! |---|---|---|
//! | [`sign_flip`] | Damaskinos et al. 2018 (Byzantine "reversed gradient"); Fang et al. 2020 | −Δ |
//! | [`scale`] | Bagdasaryan et al. 2020 ("How to backdoor federated learning": model replacement boosts by n/η) | λ·Δ |
//! | [`gaussian_noise`] | Blanchard et al. 2017 (Krum's Gaussian Byzantine worker) | Δ + N(0, σ²I), seeded |
//! | [`alie`] | Baruch, Baruch, Goldberg 2019 ("A Little Is Enough") | μⱼ + z·σⱼ per coordinate over benign updates |
//! | [`ipm`] | Xie, Koyejo, Gupta 2020 ("Fall of Empires", inner-product manipulation) | −ε·mean of benign updates |
//! | [`evade_probe`] | white-box adaptive attacker (knows the linear probe) | Δ minus (or capped in) its component along the probe's weight direction |
//! | [`just_under`] | white-box adaptive attacker that also knows τ | Δ with its probe component scaled so the score is τ − margin |
//! | [`surrogate_probe`] | grey-box attacker: knows the recipe, not the server's probe | a probe of its own, trained on its own runs, for [`evade_probe`] |
//! | [`sybil`] | colluding clients (Fang et al. 2020; Baruch et al. 2019) | K copies of one direction, each just inside the round's [`Admission`](crate::round::Admission) bounds |
//!
//! Every helper returns a new delta with the same keys and shapes, and
//! fails with a typed [`Error`] rather than emit a non-finite value (scaling
//! an update by 1e30 overflows: that is an [`Error::NonFinite`], not an
//! infinite update).
//!
//! ```
//! use safe_fedllm::attack::{alie, ipm, sign_flip};
//! use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
//!
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
//! let delta = |a: f32, b: f32| -> safe_fedllm::Result<LoraDelta> {
//!     let mut adapter = LoraAdapter::new();
//!     adapter.insert(key, LoraTensor::new("b", [2, 1], vec![a, b])?)?;
//!     Ok(LoraDelta::from_adapter(adapter))
//! };
//! let benign = [delta(1.0, 2.0)?, delta(3.0, 2.0)?];
//! let values = |d: &LoraDelta| d.as_adapter().get(key).map(|t| t.as_slice().to_vec());
//! assert_eq!(values(&sign_flip(&benign[0])?), Some(vec![-1.0, -2.0]));
//! // mean (2, 2), population std (1, 0): z = 1.5 gives (3.5, 2).
//! assert_eq!(values(&alie(&benign, 1.5)?), Some(vec![3.5, 2.0]));
//! assert_eq!(values(&ipm(&benign, 0.5)?), Some(vec![-1.0, -1.0]));
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

mod evade;
mod sybil;

pub use evade::{Evasion, EvasionOutcome, evade_probe, just_under, surrogate_probe};
pub use sybil::{SybilUpdate, sybil};

use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraDelta};
use crate::rng::Rng;

/// −Δ: the update pushed the other way.
pub fn sign_flip(delta: &LoraDelta) -> Result<LoraDelta> {
    map_values(delta, |_, v| -v)
}

/// λ·Δ: a boosted (λ > 1) or damped update. `factor` must be finite.
pub fn scale(delta: &LoraDelta, factor: f32) -> Result<LoraDelta> {
    if !factor.is_finite() {
        return Err(invalid("factor", factor, "a finite number"));
    }
    map_values(delta, |_, v| v * factor)
}

/// Δ + ε, ε ~ N(0, σ²) independently per coordinate, from a seeded
/// generator (the same seed gives the same noise on every platform). With
/// `sigma` large this is the Gaussian Byzantine worker of Blanchard et al.;
/// apply it to [`scale`]`(Δ, 0)` for pure noise. `sigma` must be finite and
/// ≥ 0.
pub fn gaussian_noise(delta: &LoraDelta, sigma: f32, seed: u64) -> Result<LoraDelta> {
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(invalid("sigma", sigma, "finite, >= 0"));
    }
    let mut rng = Rng::new(seed);
    map_values(delta, |_, v| v + (rng.normal() * f64::from(sigma)) as f32)
}

/// "A Little Is Enough" (Baruch et al. 2019): per coordinate j, μⱼ + z·σⱼ
/// where μ and σ are the mean and the population standard deviation (divide
/// by n) of the benign updates the attacker sees. Small |z| keeps the update
/// inside the benign spread, so distance- and median-based rules accept it;
/// the paper's choice is [`alie_z_max`]. The paper moves *against* the
/// benign direction: pass a negative `z` for μ − |z|·σ.
///
/// Errors: [`Error::Empty`] for no benign update, [`Error::AttackInput`]
/// when the benign updates disagree on keys or shapes, a non-finite `z`.
pub fn alie(benign: &[LoraDelta], z: f32) -> Result<LoraDelta> {
    if !z.is_finite() {
        return Err(invalid("z", z, "a finite number"));
    }
    per_coordinate(benign, |values| {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        mean + f64::from(z) * var.sqrt()
    })
}

/// The z of Baruch et al. 2019 (§4): with n workers of which f are
/// malicious, s = ⌊n/2 + 1⌋ − f benign workers must be "won over", and
/// z_max = Φ⁻¹((n − s)/n), Φ the standard normal CDF.
///
/// Errors: [`Error::InvalidParameter`] when n = 0, f ≥ n or (n − s)/n is not
/// in (0, 1) (no finite z).
///
/// ```
/// // n = 50, f = 12: s = 26 − 12 = 14, z = Φ⁻¹(0.72) ≈ 0.583.
/// let z = safe_fedllm::attack::alie_z_max(50, 12)?;
/// assert!((z - 0.5828).abs() < 1e-3);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn alie_z_max(n: usize, f: usize) -> Result<f64> {
    if n == 0 || f >= n {
        return Err(invalid("f", f as f32, "0 <= f < n, n >= 1"));
    }
    let s = (n / 2 + 1).saturating_sub(f) as f64;
    let p = (n as f64 - s) / n as f64;
    if !(p > 0.0 && p < 1.0) {
        return Err(invalid(
            "n",
            n as f32,
            "n and f such that (n - s)/n lies in (0, 1)",
        ));
    }
    Ok(inverse_normal_cdf(p))
}

/// Inner-product manipulation (Xie et al. 2020): −ε × the mean of the benign
/// updates. Small ε (the paper uses 0.1 against median and Krum, larger
/// against the mean) makes the aggregate's inner product with the true
/// update negative while staying close to it.
///
/// Errors: as [`alie`], plus a non-finite `epsilon`.
pub fn ipm(benign: &[LoraDelta], epsilon: f32) -> Result<LoraDelta> {
    if !epsilon.is_finite() {
        return Err(invalid("epsilon", epsilon, "a finite number"));
    }
    per_coordinate(benign, |values| {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        -f64::from(epsilon) * mean
    })
}

/// A delta whose every coordinate is `rule` applied to that coordinate's
/// values across the benign updates (ALIE and IPM differ only in `rule`).
fn per_coordinate(benign: &[LoraDelta], rule: impl Fn(&[f64]) -> f64) -> Result<LoraDelta> {
    let first = check_same_layout(benign)?;
    let mut out = first.as_adapter().clone();
    let mut values = Vec::with_capacity(benign.len());
    for (key, tensor) in out.iter_mut() {
        let columns: Vec<&[f32]> = benign
            .iter()
            .filter_map(|d| d.as_adapter().get(key.canonical()).map(|t| t.as_slice()))
            .collect();
        for (j, v) in tensor.as_mut_slice().iter_mut().enumerate() {
            values.clear();
            values.extend(
                columns
                    .iter()
                    .filter_map(|c| c.get(j))
                    .map(|&x| f64::from(x)),
            );
            *v = rule(&values) as f32;
        }
    }
    finite(LoraDelta::from_adapter(out))
}

fn map_values(delta: &LoraDelta, mut f: impl FnMut(usize, f32) -> f32) -> Result<LoraDelta> {
    let mut out: LoraAdapter = delta.as_adapter().clone();
    out.check_finite()?;
    for (_, tensor) in out.iter_mut() {
        for (j, v) in tensor.as_mut_slice().iter_mut().enumerate() {
            *v = f(j, *v);
        }
    }
    finite(LoraDelta::from_adapter(out))
}

/// The attack's output must be finite: an overflow is an error, never an
/// infinite update handed to the caller's round.
fn finite(delta: LoraDelta) -> Result<LoraDelta> {
    delta.as_adapter().check_finite()?;
    Ok(delta)
}

/// All benign updates hold the same keys with the same shapes, and are
/// finite; returns the first.
fn check_same_layout(benign: &[LoraDelta]) -> Result<&LoraDelta> {
    let first = benign.first().ok_or(Error::Empty {
        what: "benign updates",
    })?;
    for (index, delta) in benign.iter().enumerate() {
        delta.as_adapter().check_finite()?;
        let (a, b) = (first.as_adapter(), delta.as_adapter());
        let missing = a
            .keys()
            .find(|k| b.get(k).is_none())
            .or_else(|| b.keys().find(|k| a.get(k).is_none()));
        if let Some(key) = missing {
            return Err(Error::AttackInput {
                index,
                tensor: key.to_owned(),
                reason: "holds a different set of LoRA keys than benign update 0",
            });
        }
        for entry in a.iter() {
            let name = entry.key.canonical();
            if b.get(name).map(|t| t.shape()) != Some(entry.tensor.shape()) {
                return Err(Error::AttackInput {
                    index,
                    tensor: name.to_owned(),
                    reason: "has a different shape than in benign update 0",
                });
            }
        }
    }
    Ok(first)
}

fn invalid(name: &'static str, value: f32, expected: &'static str) -> Error {
    Error::InvalidParameter {
        component: "attack",
        name,
        value: value.to_string(),
        expected,
    }
}

/// Φ⁻¹(p) for p in (0, 1), by Acklam's rational approximation (relative
/// error < 1.2e-9: ample for choosing an attack's z).
fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::inverse_normal_cdf;

    #[test]
    fn inverse_normal_cdf_matches_tables() {
        // Φ⁻¹ from standard tables.
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_985),
            (0.72, 0.582_841_507),
            (0.01, -2.326_347_874),
            (0.999, 3.090_232_306),
        ] {
            assert!((inverse_normal_cdf(p) - z).abs() < 1e-7, "{p}");
        }
    }
}
