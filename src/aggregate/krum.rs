//! Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017,
//! "Machine learning with adversaries: Byzantine tolerant gradient descent").

use crate::aggregate::engine::{gram, into_sq_distances};
use crate::aggregate::linalg::Square;
use crate::aggregate::updates::{ValidUpdates, affine, check_affine, with_scan};
use crate::aggregate::{
    Aggregation, Aggregator, ClientId, ClientUpdate, ExclusionReason, SkipReason, Weighting,
};
use crate::error::{Result, check_parameter};
use crate::lora::LoraAdapter;

/// What Krum returns once it has found the best-scored client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KrumVariant {
    /// The paper (and Flower's `aggregate_krum`): the winner's update itself.
    #[default]
    Paper,
    /// The Safe-FedLLM reference code's "krum": the uniform mean of the winner
    /// and the n − f − 2 neighbours its score was computed over. This is closer
    /// to Multi-Krum than to Krum; it is offered to reproduce the paper's
    /// baseline numbers.
    WinnerNeighbourhood,
}

/// Krum: with n clients of which at most f are Byzantine, score each client by
/// the sum of squared Euclidean distances to its n − f − 2 nearest neighbours
/// and keep the lowest-scored one. Needs n ≥ 2f + 3.
///
/// Distances come from the n × n Gram matrix of the updates, computed in one
/// blocked pass; ties in the score go to the earlier client.
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
/// let round = Krum::new(1)?.aggregate(&global, &updates)?; // n = 8 ≥ 2f + 3
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// assert!(round.exclusion("c7").is_some()); // only the winner is kept
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Krum {
    f: usize,
    variant: KrumVariant,
}

impl Krum {
    /// Krum tolerating `f` Byzantine clients (the paper's variant): a
    /// convenience for [`AggregatorSpec::Krum`](crate::aggregate::AggregatorSpec::Krum),
    /// validated by the same [`check`](Self::check). Fails when 2f + 3
    /// overflows `usize`; n ≥ 2f + 3 is checked per round.
    pub fn new(f: usize) -> Result<Self> {
        let rule = Krum {
            f,
            variant: KrumVariant::Paper,
        };
        rule.check()?;
        Ok(rule)
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`new`](Self::new) and by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check).
    pub fn check(&self) -> Result<()> {
        check_affine("krum", "f", 2, self.f, 3, "f with 2f + 3 ≤ usize::MAX")
    }

    /// Sets the variant.
    pub fn variant(mut self, variant: KrumVariant) -> Self {
        self.variant = variant;
        self
    }
}

/// Multi-Krum: the mean of the m clients with the lowest Krum scores. Needs
/// n ≥ 2f + 3 and 1 ≤ m ≤ n.
///
/// The paper averages uniformly ([`Weighting::Uniform`], the default);
/// Flower's `aggregate_krum(…, to_keep = m)` weights the average by sample
/// counts ([`Weighting::Samples`]).
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
/// let round = MultiKrum::new(1, 4)?.aggregate(&global, &updates)?; // mean of the 4 best-scored
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// assert_eq!(round.contributions.len(), 4);
/// assert!(round.contribution("c7").is_none());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiKrum {
    f: usize,
    m: usize,
    weighting: Weighting,
}

impl MultiKrum {
    /// Multi-Krum keeping `m` ≥ 1 clients: a convenience for
    /// [`AggregatorSpec::MultiKrum`](crate::aggregate::AggregatorSpec::MultiKrum),
    /// validated by the same [`check`](Self::check). Fails when 2f + 3
    /// overflows `usize`; n ≥ 2f + 3 and m ≤ n are checked per round.
    pub fn new(f: usize, m: usize) -> Result<Self> {
        let rule = MultiKrum {
            f,
            m,
            weighting: Weighting::Uniform,
        };
        rule.check()?;
        Ok(rule)
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`new`](Self::new) and by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check).
    pub fn check(&self) -> Result<()> {
        check_affine(
            "multi_krum",
            "f",
            2,
            self.f,
            3,
            "f with 2f + 3 ≤ usize::MAX",
        )?;
        check_parameter(
            self.m > 0,
            "multi_krum",
            "m",
            self.m,
            "at least 1 client to keep",
        )
    }

    /// Sets the weighting of the final average.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }
}

/// Krum scores over `members` given their squared-distance matrix (m × m):
/// each score sums the `closest` smallest distances to the other members,
/// in ascending order (so two members with the same distances have the
/// same score, bit for bit). Rows are scored in parallel: at m = 10,000 the
/// m sorts of m values cost as much as the Gram matrix.
pub(crate) fn scores(dist: &Square, closest: usize) -> Vec<f64> {
    let rows: Vec<(usize, &[f64])> = dist.rows().enumerate().collect();
    let per_row = dist.m().saturating_mul(dist.m().max(2).ilog2() as usize);
    crate::parallel::map_items(&rows, per_row, |&(i, row)| {
        let mut others: Vec<f64> = row
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, d)| *d)
            .collect();
        let k = closest.min(others.len());
        if k < others.len() {
            others.select_nth_unstable_by(k, f64::total_cmp);
        }
        let nearest = others.get_mut(..k).unwrap_or(&mut []);
        // Unstable is exact here: total_cmp orders every bit pattern, so
        // equal keys are identical values.
        nearest.sort_unstable_by(f64::total_cmp);
        nearest.iter().sum()
    })
}

/// Member positions with their scores, sorted by ascending score. Exact ties (common: two
/// mutual nearest neighbours with one neighbour counted have equal scores)
/// go to the smaller key, the client id, so the choice does not depend on
/// the order in which updates arrive.
pub(crate) fn ranking<K: Ord>(scores: &[f64], keys: &[K]) -> Vec<(usize, f64)> {
    let mut order: Vec<(usize, f64)> = scores.iter().copied().enumerate().collect();
    order.sort_by(|&(a, sa), &(b, sb)| {
        sa.total_cmp(&sb)
            .then_with(|| keys.get(a).cmp(&keys.get(b)))
    });
    order
}

/// A first pass met a non-finite value: rescan (deferred). On a scanned
/// round every input is finite and the Gram entries and norms are f64 sums of
/// f32 products (at most 1.2e77 each), which cannot overflow: reaching this
/// there is a bug, reported as one.
pub(crate) fn poisoned(round: &ValidUpdates<'_>) -> Result<Option<Aggregation>> {
    if round.deferred {
        Ok(None)
    } else {
        Err(crate::Error::invariant(
            "aggregate::krum::poisoned",
            "a scanned round's Gram matrix and norms are finite",
            format!("{} clients, all scanned finite", round.clients.len()),
        ))
    }
}

fn check_n(round: &ValidUpdates<'_>, rule: &'static str, f: usize) -> Result<()> {
    round.require_checked(rule, affine(2, f, 3), format!("n ≥ 2f + 3 with f = {f}"))
}

/// Scores every usable client; `None` when the Gram matrix is not finite.
type Scored = (Vec<f64>, Vec<(usize, f64)>, Square);
fn score_round(round: &ValidUpdates<'_>, f: usize) -> Result<Option<Scored>> {
    let members = round.all();
    let n = members.len();
    let g = gram(round, &members)?;
    if !g.is_finite() {
        return Ok(None);
    }
    let dist = into_sq_distances(g);
    let s = scores(&dist, n.saturating_sub(f + 2).max(1));
    let ids: Vec<&ClientId> = round.clients.iter().map(|c| &c.id).collect();
    let order = ranking(&s, &ids);
    Ok(Some((s, order, dist)))
}

impl Aggregator for Krum {
    fn name(&self) -> &'static str {
        "krum"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.run(global, updates, self.f)
    }

    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        self.run(global, updates, self.f.saturating_sub(removed))
    }
}

impl Krum {
    /// Krum with budget `f` (the configured one, less removed clients).
    fn run(
        &self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        f: usize,
    ) -> Result<Aggregation> {
        with_scan(global, updates, |mut round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            check_n(&round, "krum", f)?;
            let Some((s, order, dist)) = score_round(&round, f)? else {
                return poisoned(&round);
            };
            let n = s.len();
            let Some(&(winner, _)) = order.first() else {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            };
            let members = match self.variant {
                KrumVariant::Paper => vec![winner],
                KrumVariant::WinnerNeighbourhood => {
                    let mut near: Vec<usize> = (0..n).filter(|&j| j != winner).collect();
                    near.sort_by(|&a, &b| dist.get(winner, a).total_cmp(&dist.get(winner, b)));
                    near.truncate(n.saturating_sub(f + 2).max(1));
                    near.insert(0, winner);
                    near.sort_unstable();
                    near
                }
            };
            for (i, &score) in s.iter().enumerate() {
                if !members.contains(&i) {
                    round.exclude(i, ExclusionReason::NotSelected { score });
                }
            }
            round.weighted_mean(&members, Weighting::Uniform, &[])
        })
    }
}

impl Aggregator for MultiKrum {
    fn name(&self) -> &'static str {
        "multi_krum"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.run(global, updates, self.f, self.m)
    }

    /// Runs with f − removed, and keeps at most m − removed clients (at
    /// least one): the m the rule was configured for counted the removed.
    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        removed: usize,
    ) -> Result<Aggregation> {
        let m = self.m.saturating_sub(removed).max(1);
        self.run(global, updates, self.f.saturating_sub(removed), m)
    }
}

impl MultiKrum {
    fn run(
        &self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        f: usize,
        m: usize,
    ) -> Result<Aggregation> {
        with_scan(global, updates, |mut round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            check_n(&round, "multi_krum", f)?;
            round.require("multi_krum", m, format!("m ≤ n with m = {m}"))?;
            let Some((_, order, _)) = score_round(&round, f)? else {
                return poisoned(&round);
            };
            let mut members: Vec<usize> = order.iter().take(m).map(|&(i, _)| i).collect();
            members.sort_unstable();
            for &(i, score) in order.iter().skip(m) {
                round.exclude(i, ExclusionReason::NotSelected { score });
            }
            round.weighted_mean(&members, self.weighting, &[])
        })
    }
}
