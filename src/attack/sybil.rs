//! Colluding clients (sybils): K identities that push one direction, each
//! just inside the round's admission bounds.

use super::{finite, invalid, scale};
use crate::error::{Error, Result};
use crate::lora::LoraDelta;
use crate::round::{Admission, NormBound, SamplePolicy};

/// One colluder's message: its update and the sample count it declares.
#[derive(Debug, Clone, PartialEq)]
pub struct SybilUpdate {
    /// The update Δ (relative to the round's global adapter).
    pub delta: LoraDelta,
    /// The sample count to declare (its FedAvg weight).
    pub samples: u64,
}

/// K colluders pushing `direction`, each as long and as heavy as
/// `admission` lets an update be without clipping or capping it.
///
/// `others` are the updates of every other client of the round and
/// `others_samples` their declared counts (an omniscient attacker, as in
/// ALIE and IPM). Each colluder sends `direction` rescaled to
/// ‖Δ‖₂ = (1 − `margin`) × the bound and declares the largest count the
/// policy leaves as it is:
///
/// | policy | colluder norm | declared count |
/// |---|---|---|
/// | [`NormBound::Unbounded`] | ‖direction‖ (nothing to stay under) | |
/// | [`NormBound::Absolute`]`(b)` | (1 − margin)·b | |
/// | [`NormBound::MedianMultiple`]`(k)` | (1 − margin)·k·M, M the lower median of ‖others‖ | |
/// | [`SamplePolicy::Trust`] | | the largest of `others_samples` (a plausible count) |
/// | [`SamplePolicy::CapAt`]`(c)` | | c |
/// | [`SamplePolicy::CapAtMedianMultiple`]`(k)` | | ⌊k·median of `others_samples`⌋ |
/// | [`SamplePolicy::Uniform`] | | 1 |
///
/// The round's medians are taken over every eligible client, colluders
/// included. They still cannot pull the bound below a colluder: a lower
/// median over the others plus K equal values s ≤ k·M is at least
/// min(s, M) (fewer than half the values lie below either), so each
/// colluder stays within the bound however many there are. The same holds
/// for the sample cap. This holds when `others` is the complete set of the
/// round's other eligible clients.
///
/// Errors: [`Error::InvalidParameter`] for `colluders` = 0 or a `margin`
/// outside (0, 1); [`Error::Empty`] when a median policy has no other
/// client to take a median of; [`Error::NonFinite`] for a non-finite
/// update.
///
/// ```
/// use safe_fedllm::attack::sybil;
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::round::Admission;
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let delta = |a: f32, b: f32| -> safe_fedllm::Result<LoraDelta> {
///     let mut adapter = LoraAdapter::new();
///     adapter.insert(key, LoraTensor::new("b", [2, 1], vec![a, b])?)?;
///     Ok(LoraDelta::from_adapter(adapter))
/// };
/// // Norms 1, 2, 5: the default admission clips at the lower median, 2.
/// let others = [delta(1.0, 0.0)?, delta(0.0, 2.0)?, delta(3.0, 4.0)?];
/// let out = sybil(&delta(0.0, -10.0)?, &others, &[8, 16, 8], &Admission::default(), 3, 0.01)?;
/// assert_eq!(out.len(), 3);
/// let values = out[0].delta.as_adapter().get(key).map(|t| t.as_slice().to_vec());
/// let v = values.unwrap_or_default();
/// assert!(v[0] == 0.0 && (v[1] + 1.98).abs() < 1e-6); // 0.99 × 2, pointing down
/// assert_eq!(out[0].samples, 8);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn sybil(
    direction: &LoraDelta,
    others: &[LoraDelta],
    others_samples: &[u64],
    admission: &Admission,
    colluders: usize,
    margin: f64,
) -> Result<Vec<SybilUpdate>> {
    if colluders == 0 {
        return Err(invalid("colluders", 0.0, "at least one colluder"));
    }
    if !(margin > 0.0 && margin < 1.0) {
        return Err(invalid("margin", margin as f32, "in (0, 1)"));
    }
    admission.check()?;
    direction.as_adapter().check_finite()?;
    let own = delta_norm(direction);
    let target = match admission.bound() {
        NormBound::Unbounded => own,
        NormBound::Absolute(b) => (1.0 - margin) * b,
        NormBound::MedianMultiple(k) => {
            let norms = others.iter().map(delta_norm).collect::<Vec<_>>();
            (1.0 - margin) * k * lower_median(norms, "other clients' updates")?
        }
    };
    let factor = if own > 0.0 { target / own } else { 0.0 };
    let delta = finite(scale(direction, factor as f32)?)?;
    let samples = match admission.sample_policy() {
        SamplePolicy::Trust => others_samples.iter().copied().max().unwrap_or(1),
        SamplePolicy::CapAt(c) => c,
        SamplePolicy::CapAtMedianMultiple(k) => {
            let counts = others_samples.iter().map(|&c| c as f64).collect();
            let median = lower_median(counts, "other clients' sample counts")?;
            // f64 → u64 saturates; admission's cap is at least 1.
            (median * k).floor().max(1.0) as u64
        }
        SamplePolicy::Uniform => 1,
    };
    Ok(vec![SybilUpdate { delta, samples }; colluders])
}

/// ‖Δ‖₂ over every tensor, in f64 (as admission measures it).
fn delta_norm(delta: &LoraDelta) -> f64 {
    delta
        .as_adapter()
        .iter()
        .flat_map(|e| e.tensor.as_slice())
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The ⌈m/2⌉-th smallest of m values (admission's lower median).
fn lower_median(mut values: Vec<f64>, what: &'static str) -> Result<f64> {
    values.sort_by(f64::total_cmp);
    let index = values.len().div_ceil(2).saturating_sub(1);
    values.get(index).copied().ok_or(Error::Empty { what })
}
