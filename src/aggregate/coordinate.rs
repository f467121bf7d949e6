//! Coordinate-wise rules: median and trimmed mean (Yin et al., ICML 2018,
//! "Byzantine-robust distributed learning: towards optimal statistical rates").

use crate::aggregate::engine::{
    self, extremes_network, pruned_network, row, saturate, sort_columns, sorting_network,
};
use crate::aggregate::updates::{ValidUpdates, affine, check_affine, with_scan};
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, SkipReason};
use crate::error::{Result, check_parameter};
use crate::lora::LoraAdapter;

/// Coordinate-wise median: each coordinate of the new adapter is the median of
/// the clients' values at that coordinate (for an even count, the mean of the
/// two middle values, as `numpy.median` and Flower's `aggregate_median`).
///
/// Robust to fewer than half of the clients being arbitrary; no
/// hyper-parameter. Sample counts and security factors do not weight it (use
/// [`FactorGate`](crate::aggregate::FactorGate) to gate by factor).
///
/// Each chunk of coordinates is sorted with a branch-free sorting network over
/// the clients, which vectorises across coordinates.
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
/// let round = CoordinateMedian::new().aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CoordinateMedian;

impl CoordinateMedian {
    /// The rule.
    pub fn new() -> Self {
        CoordinateMedian
    }
}

impl Aggregator for CoordinateMedian {
    fn name(&self) -> &'static str {
        "median"
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
            let m = members.len();
            let values = sorted_reduce(
                &round,
                &members,
                |r| (m - 1) / 2 <= r && r <= m / 2,
                median_of_sorted,
                median_of_sorted_wide,
            )?;
            round.coordinate_wise(&members, values)
        })
    }
}

/// Writes the per-coordinate median of a column-sorted buffer of m rows.
pub(crate) fn median_of_sorted(sorted: &[f32], len: usize, m: usize, out: &mut [f32]) {
    if m % 2 == 1 {
        out.copy_from_slice(row(sorted, len, m / 2));
    } else {
        let (lo, hi) = (row(sorted, len, m / 2 - 1), row(sorted, len, m / 2));
        for ((o, a), b) in out.iter_mut().zip(lo).zip(hi) {
            *o = (a + b) * 0.5;
        }
    }
}

/// [`median_of_sorted`] in f64 (the two middle values of an even count can
/// overflow f32 when added: `f32::MAX + f32::MAX`).
fn median_of_sorted_wide(sorted: &[f64], len: usize, m: usize, out: &mut [f32]) {
    if m % 2 == 1 {
        for (o, v) in out.iter_mut().zip(row(sorted, len, m / 2)) {
            *o = saturate(*v);
        }
    } else {
        let (lo, hi) = (row(sorted, len, m / 2 - 1), row(sorted, len, m / 2));
        for ((o, a), b) in out.iter_mut().zip(lo).zip(hi) {
            *o = saturate((a + b) * 0.5);
        }
    }
}

/// Maps `reduce(sorted_buffer, len, m, out)` over chunks whose columns were
/// sorted across the `members` (only the needed rows are in sorted place);
/// `wide` is the f64 version, run on a chunk whose f32 result is not finite.
pub(crate) fn sorted_reduce<F, W>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    needed_rows: impl Fn(usize) -> bool,
    reduce: F,
    wide: W,
) -> Result<engine::Mapped>
where
    F: Fn(&[f32], usize, usize, &mut [f32]) + Sync,
    W: Fn(&[f64], usize, usize, &mut [f32]) + Sync,
{
    let network = pruned_network(&sorting_network(members.len()), needed_rows);
    reduce_with_network(round, members, &network, reduce, wide)
}

/// Maps `reduce(buffer, len, m, out)` over chunks after applying `network`
/// to the columns of the `members`' values.
///
/// A chunk holding a NaN or ±∞ is never sorted or reduced: its output is NaN,
/// which makes the round rescan and exclude the client (SIMD min/max would
/// drop the NaN and let its client pass as a contributor). A chunk whose f32
/// result overflows although every input is finite is reduced again by
/// `wide` in f64.
pub(crate) fn reduce_with_network<F, W>(
    round: &ValidUpdates<'_>,
    members: &[usize],
    network: &[(usize, usize)],
    reduce: F,
    wide: W,
) -> Result<engine::Mapped>
where
    F: Fn(&[f32], usize, usize, &mut [f32]) + Sync,
    W: Fn(&[f64], usize, usize, &mut [f32]) + Sync,
{
    let m = members.len();
    // The kernel sorts m rows per chunk: every comparator must join two of
    // them (`sort_network` relies on it and cannot report per chunk).
    if let Some(&(a, b)) = network.iter().find(|&&(a, b)| !(a < b && b < m)) {
        return Err(crate::Error::invariant(
            "aggregate::coordinate",
            "a sorting network for m rows compares rows a < b < m",
            format!("comparator ({a}, {b}) for m = {m}"),
        ));
    }
    engine::map(
        round,
        members,
        || (Vec::new(), Vec::new()),
        |(buf, wide_buf): &mut (Vec<f32>, Vec<f64>), chunk, out| {
            let (len, finite) = sort_columns(chunk, network, buf);
            if !finite {
                out.iter_mut().for_each(|o| *o = f32::NAN);
                return;
            }
            reduce(buf, len, m, out);
            if !engine::all_finite(out) {
                wide_buf.clear();
                wide_buf.extend(buf.iter().map(|v| f64::from(*v)));
                wide(wide_buf, len, m, out);
            }
        },
    )
}

/// How many values a [`TrimmedMean`] drops at each end of every coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trim {
    /// Drop ⌊β·m⌋ per side for m clients, β in [0, 0.5) (Yin et al.'s β;
    /// Flower's `proportiontocut`, following `scipy.stats.trim_mean`).
    Fraction(f64),
    /// Drop exactly k per side; needs m > 2k. `PerSide(1)` is what the
    /// Safe-FedLLM reference code's trimmed mean does regardless of m.
    PerSide(usize),
}

/// Coordinate-wise trimmed mean: per coordinate, sort the clients' values,
/// drop the k smallest and k largest, and average the rest.
///
/// The paper's parameter is the fraction β ([`Trim::Fraction`]); the
/// Safe-FedLLM reference code always trims one value per side
/// ([`Trim::PerSide`]`(1)`), which is the paper's rule only when β·m rounds
/// down to 1. Unweighted, like the median.
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
/// // Drop the largest and smallest value of every coordinate, average the rest.
/// let round = TrimmedMean::new(Trim::PerSide(1))?.aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimmedMean {
    trim: Trim,
}

impl TrimmedMean {
    /// The trimmed mean dropping `trim` per side: a convenience for
    /// [`AggregatorSpec::TrimmedMean`](crate::aggregate::AggregatorSpec::TrimmedMean),
    /// validated by the same [`check`](Self::check). Whether n suffices is
    /// checked per round ([`Error::TooFewClients`](crate::Error::TooFewClients)).
    pub fn new(trim: Trim) -> Result<Self> {
        let rule = TrimmedMean { trim };
        rule.check()?;
        Ok(rule)
    }

    /// Fails with [`Error::InvalidParameter`](crate::Error::InvalidParameter)
    /// unless β is in [0, 0.5), or for a per-side count whose constraint
    /// n ≥ 2k + 1 cannot be computed: the one definition of the ranges, run
    /// by [`new`](Self::new) and by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check).
    pub fn check(&self) -> Result<()> {
        match self.trim {
            Trim::Fraction(beta) => check_parameter(
                (0.0..0.5).contains(&beta),
                "trimmed_mean",
                "beta",
                beta,
                "a fraction in [0, 0.5)",
            ),
            Trim::PerSide(k) => check_affine(
                "trimmed_mean",
                "per_side",
                2,
                k,
                1,
                "a count k with 2k + 1 ≤ usize::MAX",
            ),
        }
    }

    /// Values dropped per side for m clients.
    pub fn per_side(&self, m: usize) -> usize {
        match self.trim {
            Trim::Fraction(beta) => (beta * m as f64).floor() as usize,
            Trim::PerSide(k) => k,
        }
    }

    /// Values dropped per side for the m clients left after `removed`
    /// proven liars were taken out of the round: the budget k (for a
    /// fraction, of the n = m + removed clients submitted) counts them, so
    /// k − removed (at least 0).
    fn per_side_after_removal(&self, m: usize, removed: usize) -> usize {
        self.per_side(m.saturating_add(removed))
            .saturating_sub(removed)
    }
}

impl Aggregator for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed_mean"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.aggregate_after_removal(global, updates, 0)
    }

    /// Trims k − removed per side (see [`Aggregator::aggregate_after_removal`]).
    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        with_scan(global, updates, |round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            let m = round.clients.len();
            let k = self.per_side_after_removal(m, removed);
            round.require_checked(
                "trimmed_mean",
                affine(2, k, 1),
                format!("n > 2k with k = {k} per side"),
            )?;
            let members = round.all();
            // m ≥ 2k + 1 was checked just above.
            let kept = m.saturating_sub(k.saturating_mul(2)) as f32;
            // Only the k smallest and k largest must be put in place: the
            // middle rows then hold exactly the kept values, in some order.
            let pruned = pruned_network(&sorting_network(m), |r| r < k || r >= m - k);
            let bubbles = extremes_network(m, k);
            let network = if bubbles.len() < pruned.len() {
                bubbles
            } else {
                pruned
            };
            let values = reduce_with_network(
                &round,
                &members,
                &network,
                |sorted, len, m, out| {
                    out.iter_mut().for_each(|o| *o = 0.0);
                    for r in k..m - k {
                        for (o, v) in out.iter_mut().zip(row(sorted, len, r)) {
                            *o += v;
                        }
                    }
                    out.iter_mut().for_each(|o| *o /= kept);
                },
                |sorted, len, m, out| {
                    let mut sum = vec![0.0f64; len];
                    for r in k..m - k {
                        for (s, v) in sum.iter_mut().zip(row(sorted, len, r)) {
                            *s += v;
                        }
                    }
                    for (o, s) in out.iter_mut().zip(&sum) {
                        *o = saturate(s / f64::from(kept));
                    }
                },
            )?;
            round.coordinate_wise(&members, values)
        })
    }
}
