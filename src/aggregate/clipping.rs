//! Norm clipping (Sun, Kairouz, Suresh, McMahan 2019, "Can you really backdoor
//! federated learning?").

use crate::aggregate::engine::{finite, sq_norms};
use crate::aggregate::krum::poisoned;
use crate::aggregate::linalg::median;
use crate::aggregate::round::{param_error, with_scan};
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, SkipReason, Weighting};
use crate::error::Result;
use crate::lora::LoraAdapter;

/// The norm bound M of [`NormClipping`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipBound {
    /// A fixed bound M > 0 (Sun et al.).
    Fixed(f64),
    /// The median of the round's update norms (as in FLAME): adapts to the
    /// scale of honest updates without a tuned constant.
    MedianNorm,
}

/// Norm clipping: every update Δₖ = xₖ − global is scaled to norm at most M,
/// `Δₖ · min(1, M / ‖Δₖ‖)`, and the new global adapter is
/// `global + Σ aₖ·clip(Δₖ)` with aₖ the normalised [`Weighting`] (default
/// uniform, as in the paper). Reads the updates twice (norms, then the sum).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormClipping {
    bound: ClipBound,
    weighting: Weighting,
}

impl NormClipping {
    /// Fails unless a fixed bound is finite and > 0.
    pub fn new(bound: ClipBound) -> Result<Self> {
        if let ClipBound::Fixed(m) = bound
            && !(m > 0.0 && m.is_finite())
        {
            return Err(param_error(
                "norm_clipping",
                "bound",
                m,
                "a finite bound > 0",
            ));
        }
        Ok(NormClipping {
            bound,
            weighting: Weighting::Uniform,
        })
    }

    /// Sets the weighting of the final mean.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }
}

/// `min(1, bound / norm)` (1 for a zero update).
pub(crate) fn clip_scale(norm: f64, bound: f64) -> f64 {
    if norm > bound { bound / norm } else { 1.0 }
}

impl Aggregator for NormClipping {
    fn name(&self) -> &'static str {
        "norm_clipping"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        with_scan(global, updates, |round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            let members = round.all();
            let squares = sq_norms(&round, &members)?;
            if !finite(&squares) {
                return poisoned(&round);
            }
            let norms: Vec<f64> = squares.iter().map(|s| s.sqrt()).collect();
            let bound = match self.bound {
                ClipBound::Fixed(m) => m,
                ClipBound::MedianNorm => median(&norms).unwrap_or(0.0),
            };
            let scales: Vec<f64> = norms.iter().map(|&n| clip_scale(n, bound)).collect();
            round.weighted_mean(&members, self.weighting, &scales)
        })
    }
}
