//! Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018, "The hidden vulnerability
//! of distributed learning in Byzantium").

use crate::aggregate::coordinate::sorted_reduce;
use crate::aggregate::engine::{gram, into_sq_distances, row};
use crate::aggregate::krum::{poisoned, ranking, scores};
use crate::aggregate::linalg::Square;
use crate::aggregate::updates::{affine, check_affine, with_scan};
use crate::aggregate::{Aggregation, Aggregator, ClientUpdate, ExclusionReason, SkipReason};
use crate::error::Result;
use crate::lora::LoraAdapter;

/// Bulyan over Krum. With n clients and at most f Byzantine (n ≥ 4f + 3):
/// 1. select θ = n − 2f clients by applying Krum repeatedly, each time to the
///    clients not yet selected (with n' remaining, a score sums the
///    max(1, n' − f − 2) smallest squared distances, as Flower does);
/// 2. per coordinate, average the β = θ − 2f selected values closest to the
///    selected values' median.
///
/// Matches Flower's `aggregate_bulyan(…, aggregation_rule=aggregate_krum)`,
/// except that the distance matrix is computed once (one pass over the
/// updates) instead of once per selection step.
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
/// let round = Bulyan::new(1)?.aggregate(&global, &updates)?; // n = 8 ≥ 4f + 3
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// assert!(round.contribution("c7").is_none());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulyan {
    f: usize,
}

impl Bulyan {
    /// Bulyan tolerating `f` Byzantine clients: a convenience for
    /// [`AggregatorSpec::Bulyan`](crate::aggregate::AggregatorSpec::Bulyan),
    /// validated by the same [`check`](Self::check). Fails when 4f + 3
    /// overflows `usize`; n ≥ 4f + 3 is checked per round.
    pub fn new(f: usize) -> Result<Self> {
        let rule = Bulyan { f };
        rule.check()?;
        Ok(rule)
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`new`](Self::new) and by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check).
    pub fn check(&self) -> Result<()> {
        check_affine("bulyan", "f", 4, self.f, 3, "f with 4f + 3 ≤ usize::MAX")
    }
}

impl Aggregator for Bulyan {
    fn name(&self) -> &'static str {
        "bulyan"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        run(global, updates, self.f)
    }

    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        run(global, updates, self.f.saturating_sub(removed))
    }
}

/// Bulyan with budget `f` (the configured one, less removed clients).
fn run(global: &LoraAdapter, updates: &[ClientUpdate<'_>], f: usize) -> Result<Aggregation> {
    with_scan(global, updates, |mut round| {
        if round.clients.is_empty() {
            return Ok(Some(round.skip(SkipReason::NoClientLeft)));
        }
        round.require_checked(
            "bulyan",
            affine(4, f, 3),
            format!("n ≥ 4f + 3 with f = {f}"),
        )?;
        let all = round.all();
        let n = all.len();
        let g = gram(&round, &all)?;
        if !g.is_finite() {
            return poisoned(&round);
        }
        let dist = into_sq_distances(g);
        // n ≥ 4f + 3 was checked above, so neither subtraction wraps.
        let theta = n.saturating_sub(2 * f);
        let beta = theta.saturating_sub(2 * f);
        let ids: Vec<&crate::aggregate::ClientId> = round.clients.iter().map(|c| &c.id).collect();
        let (selected, last_scores) = select(&dist, &ids, f, theta);
        for (i, score) in last_scores.iter().enumerate() {
            if let Some(score) = score {
                round.exclude(i, ExclusionReason::NotSelected { score: *score });
            }
        }
        let values = sorted_reduce(
            &round,
            &selected,
            |_| true,
            |sorted, len, m, out| closest_to_median_mean(sorted, len, m, beta, out),
            |sorted, len, m, out| closest_to_median_mean(sorted, len, m, beta, out),
        )?;
        round.coordinate_wise(&selected, values)
    })
}

/// Recursive Krum: θ picks from n; returns the picks (sorted) and, for
/// clients never picked, their score in the last step.
fn select<K: Ord>(
    dist: &Square,
    keys: &[K],
    f: usize,
    theta: usize,
) -> (Vec<usize>, Vec<Option<f64>>) {
    let n = keys.len();
    let mut remaining: Vec<usize> = (0..n).collect();
    let mut picked = Vec::with_capacity(theta);
    let mut last = vec![None; n];
    for _ in 0..theta {
        let r = remaining.len();
        let sub = dist.submatrix(&remaining);
        let s = scores(&sub, r.saturating_sub(f + 2).max(1));
        for (&i, &score) in remaining.iter().zip(&s) {
            if let Some(slot) = last.get_mut(i) {
                *slot = Some(score);
            }
        }
        let sub_keys: Vec<&K> = remaining.iter().filter_map(|&i| keys.get(i)).collect();
        let Some(&(best, _)) = ranking(&s, &sub_keys).first() else {
            break;
        };
        picked.push(remaining.remove(best));
    }
    for &i in &picked {
        if let Some(slot) = last.get_mut(i) {
            *slot = None;
        }
    }
    picked.sort_unstable();
    (picked, last)
}

/// A scalar the coordinate kernels run on: f32 (fast path) or f64 (the
/// overflow-free path for chunks whose f32 result is not finite).
pub(crate) trait Lane:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    /// 0.
    const ZERO: Self;
    /// 0.5.
    const HALF: Self;
    /// `n` as this type.
    fn count(n: usize) -> Self;
    /// `1 / n`, divided in this type.
    fn recip(n: usize) -> Self;
    /// Stored as f32 (f64 saturates at ±`f32::MAX`).
    fn store(self) -> f32;
}

impl Lane for f32 {
    const ZERO: Self = 0.0;
    const HALF: Self = 0.5;
    fn count(n: usize) -> Self {
        n as f32
    }
    fn recip(n: usize) -> Self {
        1.0 / n as f32
    }
    fn store(self) -> f32 {
        self
    }
}

impl Lane for f64 {
    const ZERO: Self = 0.0;
    const HALF: Self = 0.5;
    fn count(n: usize) -> Self {
        n as f64
    }
    fn recip(n: usize) -> Self {
        1.0 / n as f64
    }
    fn store(self) -> f32 {
        crate::aggregate::engine::saturate(self)
    }
}

/// Per coordinate of a column-sorted buffer of m rows: the mean of the β values
/// closest to the median.
///
/// In sorted order the β nearest values to the median form a window
/// [s, s + β). Sliding the window right pays while the value entering on the
/// right is strictly closer than the one leaving on the left; that condition
/// is monotone in s, so s = the number of positions where it holds. Counting
/// and masked summing are branch-free row operations, so this vectorises.
pub(crate) fn closest_to_median_mean<T: Lane>(
    sorted: &[T],
    len: usize,
    m: usize,
    beta: usize,
    out: &mut [f32],
) {
    let mut med = vec![T::ZERO; len];
    if m % 2 == 1 {
        med.copy_from_slice(row(sorted, len, m / 2));
    } else {
        let (lo, hi) = (row(sorted, len, m / 2 - 1), row(sorted, len, m / 2));
        for ((md, a), b) in med.iter_mut().zip(lo).zip(hi) {
            *md = (*a + *b) * T::HALF;
        }
    }
    let mut start = vec![T::ZERO; len];
    for s in 0..m.saturating_sub(beta) {
        let (left, right) = (row(sorted, len, s), row(sorted, len, s + beta));
        for (((st, l), r), md) in start.iter_mut().zip(left).zip(right).zip(&med) {
            *st = *st + T::count(usize::from(*r - *md < *md - *l));
        }
    }
    let mut acc = vec![T::ZERO; len];
    let width = T::count(beta);
    for r in 0..m {
        let rf = T::count(r);
        for ((a, v), st) in acc.iter_mut().zip(row(sorted, len, r)).zip(&start) {
            let inside = rf >= *st && rf < *st + width;
            *a = *a + if inside { *v } else { T::ZERO };
        }
    }
    let inv = T::recip(beta);
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = (*a * inv).store();
    }
}
