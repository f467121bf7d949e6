//! [`SafetyGate`], the one round-level safety gate, and [`FactorGate`]: run
//! any rule over the clients a detector trusts.

use serde::{Deserialize, Serialize};

use crate::aggregate::updates::{ValidUpdates, validate_headers};
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, Exclusion, ExclusionReason, SkipReason,
};
use crate::error::{Result, check_parameter};
use crate::lora::LoraAdapter;

/// Safe-FedLLM's safety gate (`skip_avg_weight`): skip the round, keeping the
/// global adapter, when the mean security factor of the round's clients is
/// **below** the threshold.
///
/// One type with one meaning wherever a gate is applied (the defended round,
/// [`FedAvg::gate`](crate::aggregate::FedAvg::gate),
/// [`FactorGate::gate`]): the threshold is an `f64` in [0, 1]; a mean exactly
/// at the threshold is applied; a threshold of 0 never skips. The mean is
/// taken over every *submitted* client, and a client excluded for non-finite
/// values counts as factor 0: an update that cannot be used cannot vouch for
/// the round (otherwise a NaN client declaring factor 1 could lift the mean of
/// a round that should be skipped).
///
/// ```
/// use safe_fedllm::aggregate::{SafetyGate, SkipReason};
///
/// let gate = SafetyGate::new(0.2)?;
/// assert_eq!(gate.skip_reason(0.2), None); // exactly at the threshold: applied
/// assert_eq!(
///     gate.skip_reason(0.05),
///     Some(SkipReason::LowMeanSecurityFactor { mean: 0.05, threshold: 0.2 })
/// );
/// assert_eq!(SafetyGate::new(0.0)?.skip_reason(0.0), None); // 0 never skips
/// assert!(SafetyGate::new(1.5).is_err());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSafetyGate", into = "RawSafetyGate")]
pub struct SafetyGate {
    threshold: f64,
}

/// The serialised form, validated on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSafetyGate {
    threshold: f64,
}

impl TryFrom<RawSafetyGate> for SafetyGate {
    type Error = crate::Error;

    fn try_from(raw: RawSafetyGate) -> Result<Self> {
        SafetyGate::new(raw.threshold)
    }
}

impl From<SafetyGate> for RawSafetyGate {
    fn from(gate: SafetyGate) -> Self {
        RawSafetyGate {
            threshold: gate.threshold,
        }
    }
}

impl Default for SafetyGate {
    /// The Safe-FedLLM reference's `skip_avg_weight` = 0.2.
    fn default() -> Self {
        SafetyGate {
            threshold: Self::REFERENCE_THRESHOLD,
        }
    }
}

impl SafetyGate {
    /// The reference implementation's threshold (0.2).
    pub const REFERENCE_THRESHOLD: f64 = 0.2;

    /// A gate with `threshold`; fails with
    /// [`Error::InvalidParameter`](crate::Error::InvalidParameter)
    /// unless it is finite and in [0, 1].
    pub fn new(threshold: f64) -> Result<Self> {
        check_parameter(
            (0.0..=1.0).contains(&threshold),
            "safety_gate",
            "threshold",
            threshold,
            "a value in [0, 1]",
        )?;
        Ok(SafetyGate { threshold })
    }

    /// The threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// `Some(reason)` when a round with this mean factor must be skipped:
    /// iff `mean < threshold`. A NaN mean (impossible with validated factors)
    /// skips: the gate fails closed.
    pub fn skip_reason(&self, mean: f64) -> Option<SkipReason> {
        (mean.is_nan() || mean < self.threshold).then_some(SkipReason::LowMeanSecurityFactor {
            mean,
            threshold: self.threshold,
        })
    }

    /// The gate's verdict on a validated round (the mean counts excluded
    /// non-finite clients as 0).
    pub(crate) fn check(&self, round: &ValidUpdates<'_>) -> Option<SkipReason> {
        self.skip_reason(round.mean_factor())
    }
}

/// Which security factors a [`FactorGate`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Admit {
    /// Factor > 0 (default): drop only the clients a detector zeroed.
    #[default]
    Positive,
    /// Factor ≥ the threshold.
    AtLeast(f64),
}

impl Admit {
    fn admits(self, factor: f64) -> bool {
        match self {
            Admit::Positive => factor > 0.0,
            Admit::AtLeast(t) => factor >= t,
        }
    }
}

/// Composes security factors with any rule by gating: clients whose factor is
/// not admitted are excluded
/// ([`ExclusionReason::BelowFactorGate`]) and the inner rule runs on the rest,
/// so its constraints (Krum's n ≥ 2f + 3, …) apply to the admitted clients.
/// Optionally ([`FactorGate::gate`]) the whole round is first put through a
/// [`SafetyGate`]; by default it is not (the defended round applies its own
/// gate once).
///
/// To *weight* by factors instead, give rules with a final mean
/// [`Weighting::SamplesTimesFactor`](crate::aggregate::Weighting::SamplesTimesFactor);
/// the two compose (a gated Multi-Krum weighting its average by nₖ·wₖ).
/// See the [module docs](crate::aggregate) for an example.
///
/// ```
/// # use safe_fedllm::aggregate::*;
/// # use safe_fedllm::lora::{LoraAdapter, LoraTensor};
/// # let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// # let adapter = |x: f32, y: f32| -> safe_fedllm::Result<LoraAdapter> {
/// #     let mut a = LoraAdapter::new();
/// #     a.insert(key, LoraTensor::new("b", [1, 2], vec![x, y])?)?;
/// #     Ok(a)
/// # };
/// # let global = adapter(0.0, 0.0)?;
/// # let value = |a: &Aggregation| a.new_global().map(|g| g.get(key).unwrap().as_slice().to_vec());
/// // Seven honest clients near (1, 1) and one attacker far away.
/// let clients: Vec<LoraAdapter> = [(1.0, 1.1), (1.2, 0.9), (0.8, 1.0), (1.1, 1.2), (0.9, 0.8), (1.0, 0.9), (0.95, 1.05), (60.0, -40.0)]
///     .into_iter()
///     .map(|(x, y)| adapter(x, y))
///     .collect::<Result<_, _>>()?;
/// let updates: Vec<ClientUpdate> =
///     clients.iter().enumerate().map(|(i, a)| ClientUpdate::new(format!("c{i}"), a, 100)).collect();
/// // The detector flagged c7 (factor 0); the gate drops it before a rule that ignores factors.
/// let updates: Vec<ClientUpdate> =
///     updates.into_iter().map(|u| if u.client.as_str() == "c7" { u.with_security_factor(0.0) } else { u }).collect();
/// let round = FactorGate::new(CoordinateMedian::new()).aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// assert!(round.exclusion("c7").is_some());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FactorGate<A> {
    inner: A,
    admit: Admit,
    gate: Option<SafetyGate>,
}

impl<A: Aggregator> FactorGate<A> {
    /// Admits clients with a positive factor; no round-level gate.
    pub fn new(inner: A) -> Self {
        FactorGate {
            inner,
            admit: Admit::Positive,
            gate: None,
        }
    }

    /// Sets which factors are admitted (an `AtLeast` threshold in [0, 1],
    /// validated by [`check`](Self::check)).
    pub fn admit(mut self, admit: Admit) -> Self {
        self.admit = admit;
        self
    }

    /// Puts the round through `gate` before anything else (`None`: no gate).
    pub fn gate(mut self, gate: impl Into<Option<SafetyGate>>) -> Self {
        self.gate = gate.into();
        self
    }

    /// Fails unless an `AtLeast` threshold is in [0, 1]: run before every
    /// round, so a setter never lets an out-of-range value reach the rule.
    pub fn check(&self) -> Result<()> {
        match self.admit {
            Admit::AtLeast(t) => check_parameter(
                (0.0..=1.0).contains(&t),
                "factor_gate",
                "admit",
                t,
                "a threshold in [0, 1]",
            ),
            Admit::Positive => Ok(()),
        }
    }

    /// The round-level gate, if any.
    pub fn safety_gate(&self) -> Option<SafetyGate> {
        self.gate
    }

    /// The wrapped rule.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The wrapped rule, mutable (for example to checkpoint FoolsGold's state).
    pub fn inner_mut(&mut self) -> &mut A {
        &mut self.inner
    }
}

impl<A: Aggregator> Aggregator for FactorGate<A> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.aggregate_after_removal(global, updates, 0)
    }

    /// Passes `removed` on to the inner rule. Clients this gate drops are
    /// *not* added: a low factor is the detector's opinion, not a proven lie,
    /// and spending the budget on a wrongly flagged honest client would let
    /// the rule pick an attacker among the rest.
    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        self.check()?;
        validate_headers(global, updates)?;
        if let Some(gate) = self.gate {
            // The mean must count non-finite updates as 0, which needs the scan.
            let round = ValidUpdates::prepare(global, updates)?;
            if let Some(reason) = gate.check(&round) {
                return Ok(round.skip(reason));
            }
        }
        let (admitted, gated): (Vec<_>, Vec<_>) = updates
            .iter()
            .cloned()
            .partition(|u| self.admit.admits(u.security_factor));
        let gated: Vec<Exclusion> = gated
            .into_iter()
            .map(|u| Exclusion {
                client: u.client,
                reason: ExclusionReason::BelowFactorGate {
                    factor: u.security_factor,
                },
            })
            .collect();
        if admitted.is_empty() {
            return Ok(Aggregation {
                outcome: crate::aggregate::Outcome::Skipped {
                    reason: SkipReason::NoClientLeft,
                },
                contributions: Vec::new(),
                exclusions: gated,
            });
        }
        let mut result = self
            .inner
            .aggregate_after_removal(global, &admitted, removed)?;
        let mut exclusions = gated;
        exclusions.append(&mut result.exclusions);
        result.exclusions = exclusions;
        Ok(result)
    }
}
