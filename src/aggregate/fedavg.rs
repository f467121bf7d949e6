//! Security-weighted FedAvg, with Safe-FedLLM's safety gate when asked.

use crate::aggregate::updates::with_scan;
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, SafetyGate, Weighting};
use crate::error::Result;
use crate::lora::LoraAdapter;

/// Federated averaging (McMahan et al., AISTATS 2017) with Safe-FedLLM's
/// security weighting (SPEC §2).
///
/// Client k's weight is nₖ·wₖ (sample count × security factor) by default, and
/// the new global adapter is `Σ nₖwₖ·xₖ / Σ nₖwₖ`. A client whose weight is
/// zero is reported as excluded
/// ([`ExclusionReason::ZeroWeight`](crate::aggregate::ExclusionReason::ZeroWeight)).
///
/// **No gate by default.** Safe-FedLLM skips a round whose mean security
/// factor is below `skip_avg_weight`; the defended round applies that
/// [`SafetyGate`] once, before aggregating, so a rule that gated again would
/// skip rounds its caller meant to apply (a gate of 0 must never skip). Used
/// on its own, FedAvg gates when asked: [`FedAvg::gate`]. Non-finite updates
/// are excluded and count as factor 0 in the gate's mean.
///
/// ```
/// use safe_fedllm::aggregate::{Aggregator, ClientUpdate, FedAvg, SafetyGate};
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
/// let mut rule = FedAvg::new().gate(SafetyGate::new(0.2)?);
/// let round = rule.aggregate(&global, &updates)?;
/// let new_global = round.new_global().expect("mean factor 0.5 passes the 0.2 gate");
/// assert_eq!(new_global.get(key).map(|t| t.as_slice()), Some(&[1.0f32][..]));
/// assert!(round.exclusion("flagged").is_some());
///
/// // Both flagged: mean factor 0 < 0.2, the round is skipped.
/// let updates = [ClientUpdate::new("flagged", &flagged, 10).with_security_factor(0.0)];
/// assert!(rule.aggregate(&global, &updates)?.is_skipped());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvg {
    weighting: Weighting,
    gate: Option<SafetyGate>,
}

impl Default for FedAvg {
    fn default() -> Self {
        FedAvg {
            weighting: Weighting::SamplesTimesFactor,
            gate: None,
        }
    }
}

impl FedAvg {
    /// Safe-FedLLM weighting nₖ·wₖ, no gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plain FedAvg: weights nₖ, no gate (Flower's `aggregate`).
    pub fn plain() -> Self {
        FedAvg {
            weighting: Weighting::Samples,
            gate: None,
        }
    }

    /// Sets the weighting.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// Skips rounds that `gate` rejects (the reference's FedAvg on its own:
    /// `FedAvg::new().gate(SafetyGate::default())`; `None`: no gate).
    pub fn gate(mut self, gate: impl Into<Option<SafetyGate>>) -> Self {
        self.gate = gate.into();
        self
    }

    /// The gate, if any.
    pub fn safety_gate(&self) -> Option<SafetyGate> {
        self.gate
    }
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
            if let Some(reason) = self.gate.and_then(|g| g.check(&round)) {
                // Unscanned, the mean counts non-finite updates at their
                // factor: rescan so the report lists them.
                return Ok((!round.deferred).then(|| round.skip(reason)));
            }
            let members = round.all();
            round.weighted_mean(&members, self.weighting, &[])
        })
    }
}
