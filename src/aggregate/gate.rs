//! [`FactorGate`]: run any rule over the clients a detector trusts.

use crate::aggregate::fedavg::safety_gate;
use crate::aggregate::round::{Round, param_error, validate_headers};
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, Exclusion, ExclusionReason, SkipReason,
};
use crate::error::Result;
use crate::lora::LoraAdapter;

/// Which security factors a [`FactorGate`] lets through.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Admit {
    /// Factor > 0 (default): drop only the clients a detector zeroed.
    #[default]
    Positive,
    /// Factor ≥ the threshold.
    AtLeast(f32),
}

impl Admit {
    fn admits(self, factor: f32) -> bool {
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
/// Optionally the whole round is skipped first when the mean factor is below a
/// threshold, as in Safe-FedLLM's safety gate.
///
/// To *weight* by factors instead, give rules with a final mean
/// [`Weighting::SamplesTimesFactor`](crate::aggregate::Weighting::SamplesTimesFactor);
/// the two compose (a gated Multi-Krum weighting its average by nₖ·wₖ).
/// See the [module docs](crate::aggregate) for an example.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorGate<A> {
    inner: A,
    admit: Admit,
    skip_avg_weight: Option<f32>,
}

impl<A: Aggregator> FactorGate<A> {
    /// Admits clients with a positive factor; no round-level gate.
    pub fn new(inner: A) -> Self {
        FactorGate {
            inner,
            admit: Admit::Positive,
            skip_avg_weight: None,
        }
    }

    /// Sets which factors are admitted. Fails unless an `AtLeast` threshold is in [0, 1].
    pub fn admit(mut self, admit: Admit) -> Result<Self> {
        if let Admit::AtLeast(t) = admit
            && !(0.0..=1.0).contains(&t)
        {
            return Err(param_error(
                "factor_gate",
                "admit",
                t,
                "a threshold in [0, 1]",
            ));
        }
        self.admit = admit;
        Ok(self)
    }

    /// Skips the round when the mean factor of the round's clients is below
    /// `threshold` (`None` = never). Fails unless the threshold is in [0, 1].
    pub fn skip_avg_weight(mut self, threshold: Option<f32>) -> Result<Self> {
        if let Some(t) = threshold
            && !(0.0..=1.0).contains(&t)
        {
            return Err(param_error(
                "factor_gate",
                "skip_avg_weight",
                t,
                "a value in [0, 1]",
            ));
        }
        self.skip_avg_weight = threshold;
        Ok(self)
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
        validate_headers(global, updates)?;
        if self.skip_avg_weight.is_some() {
            // The mean must count non-finite updates as 0, which needs the scan.
            let round = Round::prepare(global, updates)?;
            if let Some(reason) = safety_gate(&round, self.skip_avg_weight) {
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
        let mut result = self.inner.aggregate(global, &admitted)?;
        let mut exclusions = gated;
        exclusions.append(&mut result.exclusions);
        result.exclusions = exclusions;
        Ok(result)
    }
}
