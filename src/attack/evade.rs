//! Attacks on the LoRA-Probe itself: an attacker that knows the probe
//! (white-box, [`evade_probe`] and [`just_under`]) and one that knows only
//! the recipe and trains its own ([`surrogate_probe`]).

use serde::{Deserialize, Serialize};

use super::{finite, invalid};
use crate::error::{Error, Result};
use crate::features::Normalization;
use crate::lora::LoraDelta;
use crate::probe::{Label, LinearProbe, Probe, ProbeBuilder, Trainer};
use crate::round::LabelledRun;

/// What the probe-evasion attack removes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evasion {
    /// Remove the whole component along the probe direction: the probe then
    /// scores σ(b), its bias alone.
    Remove,
    /// Shrink the component just enough that the probe scores `target`
    /// (e.g. τ − 0.05), changing the update as little as possible. An
    /// update already scoring ≤ `target` is left as it is.
    ShrinkTo(f32),
}

/// The evaded update and what the attack did.
#[derive(Debug, Clone, PartialEq)]
pub struct EvasionOutcome {
    /// The update to send.
    pub delta: LoraDelta,
    /// Probe score of the original update.
    pub score_before: f32,
    /// Probe score of the evaded update.
    pub score_after: f32,
    /// L2 norm of the change made (in the raw, unnormalised update).
    pub change_norm: f64,
    /// The change relative to the norm of the probed tensors.
    pub relative_change: f64,
}

/// The white-box attacker that knows the linear probe: it keeps
/// its harmful training but removes from its update the component along the
/// probe's weight direction, mapped back onto the probed tensors.
///
/// Let v be the update's values on the probe's feature layout (before
/// normalisation), ŵ = w/‖w‖ restricted to the layout keys the update holds
/// (absent keys are zero-filled by the probe, so their weights do not
/// matter), p = vᵀŵ and q² = ‖v‖² − p². The probe's logit is ‖w‖·p/‖v‖ + b
/// under L2 normalisation (‖w‖·p + b without). The attack sends
/// v' = v − (p − p')·ŵ with
///
/// * [`Evasion::Remove`]: p' = 0;
/// * [`Evasion::ShrinkTo`]`(t)`: the p' whose logit is logit(t): with
///   r = (logit(t) − b)/‖w‖, p' = r·q/√(1 − r²) under L2, p' = r without.
///
/// Tensors outside the layout are untouched. Under L2 normalisation the
/// probe cannot see the update's size, so the attacker may also rescale the
/// result ([`scale`](super::scale)) to keep its strength.
///
/// Errors: [`Error::ShapeMismatch`] for a layout key of another shape,
/// [`Error::InvalidParameter`] for a target outside (0, 1) or below what the
/// probe can score (σ(b − ‖w‖) under L2), [`Error::NonFinite`] for a
/// non-finite update.
///
/// ```
/// use safe_fedllm::attack::{Evasion, evade_probe};
/// use safe_fedllm::features::{FeatureConfig, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::{LinearProbe, Probe};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut adapter = LoraAdapter::new();
/// adapter.insert(key, LoraTensor::new("b", [2, 1], vec![3.0, 4.0])?)?;
/// let delta = LoraDelta::from_adapter(adapter);
/// let spec = FeatureConfig::new(Selection::FirstLayerB).fit(&[&delta])?;
/// let probe = LinearProbe::new(spec, vec![10.0, 0.0], 0.0)?; // scores σ(6) ≈ 0.998
///
/// let outcome = evade_probe(&probe, &delta, Evasion::Remove)?;
/// assert_eq!(outcome.delta.as_adapter().get(key).map(|t| t.as_slice()), Some(&[0.0, 4.0][..]));
/// assert!((outcome.score_after - 0.5).abs() < 1e-6);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn evade_probe(
    probe: &LinearProbe,
    delta: &LoraDelta,
    evasion: Evasion,
) -> Result<EvasionOutcome> {
    let adapter = delta.as_adapter();
    adapter.check_finite()?;
    let weights = probe.weights();
    // Present layout blocks: (key, offset, len).
    let mut blocks = Vec::new();
    for block in probe.feature_spec().layout() {
        let Some(tensor) = adapter.get(&block.key) else {
            continue;
        };
        if tensor.shape() != block.shape {
            return Err(Error::ShapeMismatch {
                tensor: block.key.clone(),
                expected: block.shape.to_vec(),
                found: tensor.shape().to_vec(),
            });
        }
        blocks.push((block.key.clone(), block.offset, block.len()));
    }
    let weight_slice = |offset: usize, len: usize| -> Result<&[f32]> {
        offset
            .checked_add(len)
            .and_then(|end| weights.get(offset..end))
            .ok_or_else(|| Error::DimensionMismatch {
                what: "probe weights vs feature layout".into(),
                expected: offset.saturating_add(len),
                found: weights.len(),
            })
    };
    let (mut w_sq, mut vw, mut v_sq) = (0.0f64, 0.0f64, 0.0f64);
    for (key, offset, len) in &blocks {
        let w = weight_slice(*offset, *len)?;
        let v = adapter.get(key).map_or(&[][..], |t| t.as_slice());
        for (&w, &v) in w.iter().zip(v) {
            let (w, v) = (f64::from(w), f64::from(v));
            w_sq += w * w;
            vw += v * w;
            v_sq += v * v;
        }
    }
    let score_before = probe.score(delta)?;
    let w_norm = w_sq.sqrt();
    let l2 = probe.feature_spec().normalization() == Normalization::L2;
    let bias = f64::from(probe.bias());
    let p = if w_norm > 0.0 { vw / w_norm } else { 0.0 };
    let target_p = match evasion {
        Evasion::Remove => 0.0,
        Evasion::ShrinkTo(t) => {
            if !(t > 0.0 && t < 1.0) {
                return Err(invalid("target", t, "a probability in (0, 1)"));
            }
            if score_before <= t || w_norm == 0.0 {
                p
            } else {
                let logit = (f64::from(t) / (1.0 - f64::from(t))).ln();
                let r = (logit - bias) / w_norm;
                if l2 {
                    if r <= -1.0 {
                        return Err(invalid(
                            "target",
                            t,
                            "a score the probe can reach: above σ(b − ‖w‖) under L2 normalisation",
                        ));
                    }
                    let q = (v_sq - p * p).max(0.0).sqrt();
                    r * q / (1.0 - r * r).sqrt()
                } else {
                    r
                }
            }
        }
    };
    let shift = p - target_p;
    let mut out = adapter.clone();
    if shift != 0.0 && w_norm > 0.0 {
        for (key, offset, len) in &blocks {
            let w = weight_slice(*offset, *len)?;
            if let Some(tensor) = out.get_mut(key) {
                for (v, &w) in tensor.as_mut_slice().iter_mut().zip(w) {
                    *v = (f64::from(*v) - shift * f64::from(w) / w_norm) as f32;
                }
            }
        }
    }
    let evaded = finite(LoraDelta::from_adapter(out))?;
    let score_after = probe.score(&evaded)?;
    Ok(EvasionOutcome {
        delta: evaded,
        score_before,
        score_after,
        change_norm: shift.abs(),
        relative_change: if v_sq > 0.0 {
            shift.abs() / v_sq.sqrt()
        } else {
            0.0
        },
    })
}

/// The just-under attacker: it knows the probe's weights **and** its
/// threshold τ, and scales its update's component along the probe direction
/// so that the probe scores τ − `margin`, just below the decision: as much
/// of the harmful direction as the threshold lets through, where
/// [`Evasion::Remove`] gives all of it up. An update already scoring at most
/// τ − `margin` is sent as it is.
///
/// This is [`evade_probe`] with [`Evasion::ShrinkTo`]`(τ − margin)`, whose
/// closed form for a logistic probe under L2 normalisation is
/// p' = r·q/√(1 − r²), r = (logit(τ − margin) − b)/‖w‖.
///
/// Errors: [`Error::InvalidParameter`] for a `margin` outside (0, τ) (the
/// target must be a probability) or a target the probe cannot score; the
/// errors of [`evade_probe`] otherwise.
///
/// ```
/// use safe_fedllm::attack::just_under;
/// use safe_fedllm::features::{FeatureConfig, Normalization, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::{LinearProbe, Probe};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut adapter = LoraAdapter::new();
/// adapter.insert(key, LoraTensor::new("b", [2, 1], vec![3.0, 4.0])?)?;
/// let delta = LoraDelta::from_adapter(adapter);
/// let spec = FeatureConfig::new(Selection::FirstLayerB)
///     .normalization(Normalization::None)
///     .fit(&[&delta])?;
/// // logit = x₀: scores σ(3) ≈ 0.95, above τ = 0.8.
/// let probe = LinearProbe::new(spec, vec![1.0, 0.0], 0.0)?.with_threshold(0.8)?;
/// let out = just_under(&probe, &delta, 0.05)?;
/// assert!((out.score_after - 0.75).abs() < 1e-5 && out.score_after < probe.threshold());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn just_under(probe: &LinearProbe, delta: &LoraDelta, margin: f32) -> Result<EvasionOutcome> {
    let tau = probe.threshold();
    if !(margin.is_finite() && margin > 0.0 && margin < tau) {
        return Err(invalid(
            "margin",
            margin,
            "in (0, τ): the target τ − margin must be a probability",
        ));
    }
    evade_probe(probe, delta, Evasion::ShrinkTo(tau - margin))
}

/// The surrogate attacker's probe: it knows how the server trains its probe
/// (the recipe: trainer, features, threshold policy) but not the server's
/// data or probe, so it runs the same recipe on its own labelled local runs
/// (benign and harmful data of its own). Each run is one cross-validation
/// group, as the server's trainer is given. Pass the result to
/// [`evade_probe`] to remove the surrogate's direction: what evades the
/// server's probe is only what the two directions share.
///
/// Errors: [`Error::Empty`] when the runs lack either class; the trainer's
/// errors otherwise.
pub fn surrogate_probe<T: Trainer>(
    builder: &ProbeBuilder<T>,
    runs: &[LabelledRun],
) -> Result<LinearProbe> {
    let mut deltas = Vec::new();
    let mut labels = Vec::new();
    let mut groups = Vec::new();
    for (group, run) in runs.iter().enumerate() {
        for step in &run.steps {
            deltas.push(step);
            labels.push(run.label);
            groups.push(group);
        }
    }
    for (label, what) in [
        (Label::Benign, "benign surrogate runs"),
        (Label::Malicious, "harmful surrogate runs"),
    ] {
        if !labels.contains(&label) {
            return Err(Error::Empty { what });
        }
    }
    builder.fit_grouped(&deltas, &labels, Some(&groups))
}
