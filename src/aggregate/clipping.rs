//! Norm clipping (Sun, Kairouz, Suresh, McMahan 2019, "Can you really backdoor
//! federated learning?").

use crate::aggregate::engine::{finite, sq_norms};
use crate::aggregate::krum::poisoned;
use crate::aggregate::linalg::median;
use crate::aggregate::updates::with_scan;
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, SkipReason, Weighting};
use crate::error::{Error, Result, check_parameter};
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
/// // Every update Δ is scaled down to the median update norm before the mean.
/// let round = NormClipping::new(ClipBound::MedianNorm)?.aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormClipping {
    bound: ClipBound,
    weighting: Weighting,
}

impl NormClipping {
    /// Clipping to `bound`: a convenience for
    /// [`AggregatorSpec::NormClipping`](crate::aggregate::AggregatorSpec::NormClipping),
    /// validated by the same [`check`](Self::check).
    pub fn new(bound: ClipBound) -> Result<Self> {
        let rule = NormClipping {
            bound,
            weighting: Weighting::Uniform,
        };
        rule.check()?;
        Ok(rule)
    }

    /// Fails unless a fixed bound is finite and > 0: the one definition of
    /// the range, run by [`new`](Self::new) and by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check).
    pub fn check(&self) -> Result<()> {
        match self.bound {
            ClipBound::Fixed(m) => check_parameter(
                m > 0.0 && m.is_finite(),
                "norm_clipping",
                "bound",
                m,
                "a finite bound > 0",
            ),
            ClipBound::MedianNorm => Ok(()),
        }
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
                ClipBound::MedianNorm => median(&norms).ok_or_else(|| {
                    Error::invariant(
                        "aggregate::clipping",
                        "a round that reaches the clipping bound has at least one client",
                        "no norm",
                    )
                })?,
            };
            let scales: Vec<f64> = norms.iter().map(|&n| clip_scale(n, bound)).collect();
            round.weighted_mean(&members, self.weighting, &scales)
        })
    }
}
