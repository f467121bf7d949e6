//! Security-weighted FedAvg with the Safe-FedLLM safety gate.

use crate::aggregate::round::{Round, param_error, with_scan};
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, SkipReason, Weighting};
use crate::error::Result;
use crate::lora::LoraAdapter;

/// Federated averaging (McMahan et al., AISTATS 2017) with Safe-FedLLM's
/// security weighting and safety gate (SPEC §2).
///
/// Client k's weight is nₖ·wₖ (sample count × security factor) by default, and
/// the new global adapter is `Σ nₖwₖ·xₖ / Σ nₖwₖ`. Before averaging, the gate
/// compares the mean security factor over the round's clients with
/// `skip_avg_weight` (default 0.2): below it, the round is skipped and the
/// global adapter stays unchanged. A client whose weight is zero is reported as
/// excluded ([`ExclusionReason::ZeroWeight`](crate::aggregate::ExclusionReason::ZeroWeight)).
///
/// Non-finite updates are excluded before the gate and count as factor 0 in
/// its mean: an update that cannot be used cannot vouch for the round.
///
/// ```
/// use safe_fedllm::aggregate::{Aggregator, ClientUpdate, FedAvg};
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
///
/// let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
/// let one = |v: f32| -> safe_fedllm::Result<LoraAdapter> {
///     let mut a = LoraAdapter::new();
///     a.insert(key, LoraTensor::new("b", [1, 1], vec![v])?)?;
///     Ok(a)
/// };
/// let (global, benign, flagged) = (one(0.0)?, one(1.0)?, one(9.0)?);
/// let updates = [
///     ClientUpdate::new("benign", &benign, 30).with_security_factor(1.0),
///     ClientUpdate::new("flagged", &flagged, 10).with_security_factor(0.0),
/// ];
/// let round = FedAvg::new().aggregate(&global, &updates)?;
/// let new_global = round.new_global().expect("mean factor 0.5 passes the 0.2 gate");
/// assert_eq!(new_global.get(key).map(|t| t.as_slice()), Some(&[1.0f32][..]));
/// assert!(round.exclusion("flagged").is_some());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvg {
    weighting: Weighting,
    skip_avg_weight: Option<f32>,
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg {
            weighting: Weighting::SamplesTimesFactor,
            skip_avg_weight: Some(0.2),
        }
    }
}

impl FedAvg {
    /// Safe-FedLLM defaults: weights nₖ·wₖ, skip below a mean factor of 0.2.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plain FedAvg: weights nₖ, no gate (Flower's `aggregate`).
    pub fn plain() -> Self {
        FedAvg {
            weighting: Weighting::Samples,
            skip_avg_weight: None,
        }
    }

    /// Sets the weighting.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// Sets the gate's threshold on the mean security factor (`None` = no
    /// gate). Fails unless the threshold is in [0, 1].
    pub fn skip_avg_weight(mut self, threshold: Option<f32>) -> Result<Self> {
        if let Some(t) = threshold
            && !(0.0..=1.0).contains(&t)
        {
            return Err(param_error(
                "fedavg",
                "skip_avg_weight",
                t,
                "a value in [0, 1]",
            ));
        }
        self.skip_avg_weight = threshold;
        Ok(self)
    }
}

/// The safety gate: `Some(reason)` when the round must be skipped.
pub(crate) fn safety_gate(round: &Round<'_>, threshold: Option<f32>) -> Option<SkipReason> {
    let threshold = threshold?;
    let mean = round.mean_factor();
    (mean < f64::from(threshold)).then_some(SkipReason::LowMeanSecurityFactor { mean, threshold })
}

impl Aggregator for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        with_scan(global, updates, |round| {
            if let Some(reason) = safety_gate(&round, self.skip_avg_weight) {
                // Unscanned, the mean counts non-finite updates at their
                // factor: rescan so the report lists them.
                return Ok((!round.deferred).then(|| round.skip(reason)));
            }
            let members = round.all();
            round.weighted_mean(&members, self.weighting, &[])
        })
    }
}
