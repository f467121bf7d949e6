//! Geometric median by smoothed Weiszfeld iterations (RFA: Pillutla, Kakade,
//! Harchaoui, IEEE Trans. Signal Processing 2022, "Robust aggregation for
//! federated learning").

use crate::aggregate::engine::{gram, sq_distances};
use crate::aggregate::krum::poisoned;
use crate::aggregate::linalg::{Square, median};
use crate::aggregate::updates::with_scan;
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ExclusionReason, SkipReason, Weighting,
};
use crate::error::{Error, Result, check_parameter};
use crate::lora::LoraAdapter;

/// The (weighted) geometric median `argmin_z Σ αᵢ‖z − xᵢ‖`, computed with RFA's
/// smoothed Weiszfeld algorithm:
///
/// `βᵢ = αᵢ / max(ν, ‖z − xᵢ‖)`, `z ← Σ βᵢxᵢ / Σ βᵢ`, until an iteration moves
/// z by less than `tolerance` × the median distance from z to the clients, or
/// after `max_iterations` iterations.
///
/// Two choices differ from RFA, both because one client can be arbitrarily
/// far away: RFA starts from the weighted mean and stops when the objective
/// improves by less than `tolerance` × its value. A client at 1e20 drags the
/// mean to ~1e19 and dominates the objective, so the relative improvement
/// falls below the tolerance while z is still ~1e12 away from the honest
/// clients. Here z starts at the weighted mean of the majority nearest the
/// medoid, and the stopping rule is measured against the *median* distance,
/// which a minority cannot inflate. The minimiser is the same.
///
/// Defaults: αᵢ ∝ sample count ([`Weighting::Samples`], RFA's αᵢ), ν = 1e-6,
/// tolerance 1e-6, at most 100 iterations (RFA reports that 3 suffice in
/// practice).
///
/// Every iterate is a convex combination `z = Σ cᵢxᵢ`, so
/// `‖z − xᵢ‖² = cᵀGc − 2(Gc)ᵢ + Gᵢᵢ` with G the clients' Gram matrix. The
/// iterations therefore run on the m coefficients; the updates are read twice
/// in total (Gram matrix, final combination) whatever the iteration count.
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
/// let round = GeometricMedian::new().aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeometricMedian {
    weighting: Weighting,
    nu: f64,
    tolerance: f64,
    max_iterations: usize,
}

impl Default for GeometricMedian {
    fn default() -> Self {
        GeometricMedian {
            weighting: Weighting::Samples,
            nu: 1e-6,
            tolerance: 1e-6,
            max_iterations: 100,
        }
    }
}

impl GeometricMedian {
    /// Largest accepted [`max_iterations`](Self::max_iterations).
    pub const MAX_ITERATIONS: usize = 100_000;

    /// The rule with RFA's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets the weights αᵢ.
        weighting: Weighting;
        /// Sets the smoothing ν > 0 (a distance below ν counts as ν).
        nu: f64;
        /// Sets the relative objective tolerance (≥ 0).
        tolerance: f64;
        /// Sets the iteration cap, 1 ≤ cap ≤ [`GeometricMedian::MAX_ITERATIONS`]
        /// (each iteration is O(n²) on the coefficients; RFA reports that 3
        /// suffice, and an unbounded cap would let a stalled round hang).
        max_iterations: usize;
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check) and
    /// before every round, so a setter never lets an out-of-range value reach
    /// the rule.
    pub fn check(&self) -> Result<()> {
        const RULE: &str = "geometric_median";
        let nu = self.nu;
        check_parameter(
            nu > 0.0 && nu.is_finite(),
            RULE,
            "nu",
            nu,
            "a finite value > 0",
        )?;
        let t = self.tolerance;
        check_parameter(
            t >= 0.0 && t.is_finite(),
            RULE,
            "tolerance",
            t,
            "a finite value ≥ 0",
        )?;
        let n = self.max_iterations;
        check_parameter(
            (1..=Self::MAX_ITERATIONS).contains(&n),
            RULE,
            "max_iterations",
            n,
            "1 ≤ max_iterations ≤ 100000 (GeometricMedian::MAX_ITERATIONS)",
        )
    }

    /// Weiszfeld on coefficients: returns the final convex weights c.
    ///
    /// [`Error::Invariant`] unless `gram` is m × m for the m weights `alpha`.
    pub(crate) fn solve(&self, gram: &Square, alpha: &[f64]) -> Result<Vec<f64>> {
        let m = alpha.len();
        if gram.m() != m {
            return Err(Error::invariant(
                "aggregate::geomed::solve",
                "the Gram matrix has one row per weighted client",
                format!("{0}×{0} Gram matrix for {m} weights", gram.m()),
            ));
        }
        let total: f64 = alpha.iter().sum();
        // Gc and the distances ‖Δᵢ − Σⱼ cⱼΔⱼ‖ = √(cᵀGc − 2(Gc)ᵢ + Gᵢᵢ); every
        // vector here has m entries, the rows of G too.
        let distances = |c: &[f64]| -> Vec<f64> {
            let gc: Vec<f64> = gram
                .rows()
                .map(|row| row.iter().zip(c).map(|(g, c)| g * c).sum())
                .collect();
            let cgc: f64 = c.iter().zip(&gc).map(|(a, b)| a * b).sum();
            gc.iter()
                .zip(gram.diagonal())
                .map(|(gci, gii)| (cgc - 2.0 * gci + gii).max(0.0).sqrt())
                .collect()
        };
        let mut c = self.start(gram, alpha, total);
        let mut dist = distances(&c);
        for _ in 0..self.max_iterations {
            let beta: Vec<f64> = alpha
                .iter()
                .zip(&dist)
                .map(|(a, d)| a / d.max(self.nu))
                .collect();
            let sum: f64 = beta.iter().sum();
            let next: Vec<f64> = beta.iter().map(|b| b / sum).collect();
            // ‖z' − z‖² = (c' − c)ᵀ G (c' − c).
            let step: Vec<f64> = next.iter().zip(&c).map(|(a, b)| a - b).collect();
            let moved = gram
                .rows()
                .zip(&step)
                .map(|(row, s)| {
                    let row: f64 = row.iter().zip(&step).map(|(g, s)| g * s).sum();
                    s * row
                })
                .sum::<f64>()
                .max(0.0)
                .sqrt();
            c = next;
            dist = distances(&c);
            // m ≥ 1 (the caller skips a round without weighted clients), so
            // the median exists; with none there would be no scale to move by.
            let scale = median(&dist).unwrap_or(0.0);
            if moved <= self.tolerance * scale {
                break;
            }
        }
        Ok(c)
    }

    /// The starting point: the weighted mean of the ⌊m/2⌋ + 1 clients
    /// nearest to the medoid (the client with the least weighted distance to
    /// all others). RFA starts from the plain weighted mean, which one client
    /// at 1e20 drags arbitrarily far, leaving Weiszfeld dozens of iterations
    /// to walk back; a majority around the medoid cannot be dragged by a
    /// minority.
    fn start(&self, gram: &Square, alpha: &[f64], total: f64) -> Vec<f64> {
        let m = alpha.len();
        let dist = sq_distances(gram);
        let d = |i: usize, j: usize| dist.get(i, j).sqrt();
        let cost = |k: usize| -> f64 { alpha.iter().enumerate().map(|(i, a)| a * d(k, i)).sum() };
        let Some(medoid) = (0..m).min_by(|&a, &b| cost(a).total_cmp(&cost(b))) else {
            return alpha.iter().map(|a| a / total).collect();
        };
        let mut near: Vec<usize> = (0..m).collect();
        near.sort_by(|&a, &b| d(medoid, a).total_cmp(&d(medoid, b)).then(a.cmp(&b)));
        near.truncate(m / 2 + 1);
        // The majority nearest the medoid, as flags in client order.
        let mut chosen = vec![false; m];
        for &i in &near {
            if let Some(flag) = chosen.get_mut(i) {
                *flag = true;
            }
        }
        let sum: f64 = near.iter().filter_map(|&i| alpha.get(i)).sum();
        alpha
            .iter()
            .zip(&chosen)
            .map(|(a, &chosen)| if chosen { a / sum } else { 0.0 })
            .collect()
    }
}

impl Aggregator for GeometricMedian {
    fn name(&self) -> &'static str {
        "geometric_median"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.check()?;
        with_scan(global, updates, |mut round| {
            let mut members = Vec::new();
            let mut alpha = Vec::new();
            for i in round.all() {
                let a = round.raw_weight(i, self.weighting);
                if a > 0.0 {
                    members.push(i);
                    alpha.push(a);
                } else {
                    round.exclude(i, ExclusionReason::ZeroWeight);
                }
            }
            if members.is_empty() {
                let reason = if round.clients.is_empty() {
                    SkipReason::NoClientLeft
                } else {
                    SkipReason::ZeroTotalWeight
                };
                return Ok(Some(round.skip(reason)));
            }
            let g = gram(&round, &members)?;
            if !g.is_finite() {
                return poisoned(&round);
            }
            let c = self.solve(&g, &alpha)?;
            round.combination(&members, &c, &[])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_with_a_gram_matrix_of_another_size_is_an_invariant_error() {
        let gram = Square::zeros(3);
        let err = GeometricMedian::new()
            .solve(&gram, &[1.0, 1.0])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invariant {
                    location: "aggregate::geomed::solve",
                    ..
                }
            ),
            "{err:?}"
        );
        // The matching size solves.
        let c = GeometricMedian::new().solve(&gram, &[1.0; 3]).unwrap();
        assert_eq!(c.len(), 3);
    }
}
