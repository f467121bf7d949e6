//! Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the
//! Byzantine: optimizing model poisoning attacks and defenses for federated
//! learning").

use crate::aggregate::engine::{client_read_error, segment_key};
use crate::aggregate::lanczos::{Rows, dot, top_eigenvector};
use crate::aggregate::updates::{Seg, ValidUpdates, scanned};
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ExclusionReason, SkipReason, Weighting,
};
use crate::error::{Error, Result, check_parameter};
use crate::lora::LoraAdapter;
use crate::rng::{Rng, gaussian_at};

/// DnC: repeatedly project the centred updates on their top singular
/// direction over a random subset of coordinates, and drop the clients with
/// the largest projections.
///
/// For each of `iterations` rounds: sample b coordinates without replacement
/// (all of them when b ≥ d), centre the n × b sub-matrix of updates on its
/// mean, take its top right singular vector v, score sᵢ = ⟨Δᵢ − μ, v⟩², and
/// keep the n − ⌊c·f⌋ lowest-scored clients. Clients kept in every iteration
/// form the good set; the result is `global + mean of their Δ` with the
/// [`Weighting`] (default uniform, as in the paper). Needs n > ⌊c·f⌋.
///
/// Defaults follow the paper's evaluation: b = 10 000, c = 1, 5 iterations,
/// seed 0. The top right singular vector of the centred n × b sub-matrix X is
/// found by restarted Lanczos on XᵀX: each step is one product Xᵀ(Xv), two
/// passes over X, O(n·b), and XᵀX or XXᵀ is never formed. Memory: n·b f64
/// for X plus at most 64 Lanczos vectors of b; no n × n matrix and no cubic
/// decomposition. It stops at a Ritz residual below 10⁻¹²·λ₁, at the rank
/// of X (exact: at most n − 1 steps), or after 1,024 products (top
/// eigenvalues so close that either direction separates outliers as well).
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
/// let round = DnC::new(1)?.seed(7).aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// assert!(round.contribution("c7").is_none()); // the attacker is the top outlier
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DnC {
    f: usize,
    filter_fraction: f64,
    subsample_dim: usize,
    iterations: usize,
    seed: u64,
    weighting: Weighting,
}

impl DnC {
    /// Largest accepted [`subsample_dim`](Self::subsample_dim) (2²⁰).
    pub const MAX_SUBSAMPLE_DIM: usize = 1 << 20;

    /// Largest accepted [`iterations`](Self::iterations).
    pub const MAX_ITERATIONS: usize = 1000;

    /// DnC expecting at most `f` malicious clients, paper defaults otherwise:
    /// a convenience for [`AggregatorSpec::DnC`](crate::aggregate::AggregatorSpec::DnC),
    /// validated by the same [`check`](Self::check). Any f is accepted here;
    /// n > ⌊c·f⌋ is checked per round with checked arithmetic
    /// ([`Error::TooFewClients`](crate::Error::TooFewClients)).
    pub fn new(f: usize) -> Result<Self> {
        let rule = DnC {
            f,
            filter_fraction: 1.0,
            subsample_dim: 10_000,
            iterations: 5,
            seed: 0,
            weighting: Weighting::Uniform,
        };
        rule.check()?;
        Ok(rule)
    }

    /// Sets the filtering fraction c > 0 (⌊c·f⌋ clients dropped per iteration).
    pub fn filter_fraction(mut self, c: f64) -> Self {
        self.filter_fraction = c;
        self
    }

    /// Sets the number of sampled coordinates b, 1 ≤ b ≤ [`DnC::MAX_SUBSAMPLE_DIM`].
    ///
    /// The n × b sub-matrix is gathered in f64, so b is bounded: a huge b
    /// would materialise every update (n·d f64) instead of a sample.
    pub fn subsample_dim(mut self, b: usize) -> Self {
        self.subsample_dim = b;
        self
    }

    /// Sets the number of iterations, 1 ≤ iterations ≤ [`DnC::MAX_ITERATIONS`]
    /// (the paper uses 5; each iteration reads b coordinates of every client
    /// and decomposes an n × n matrix, so an unbounded count is a hang).
    pub fn iterations(mut self, iterations: usize) -> Self {
        self.iterations = iterations;
        self
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`new`](Self::new), by [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check)
    /// and before every round, so a setter never lets an out-of-range value
    /// reach the rule.
    pub fn check(&self) -> Result<()> {
        let c = self.filter_fraction;
        check_parameter(
            c > 0.0 && c.is_finite(),
            "dnc",
            "filter_fraction",
            c,
            "a finite value > 0",
        )?;
        let b = self.subsample_dim;
        check_parameter(
            (1..=Self::MAX_SUBSAMPLE_DIM).contains(&b),
            "dnc",
            "subsample_dim",
            b,
            "1 ≤ b ≤ 1048576 (DnC::MAX_SUBSAMPLE_DIM)",
        )?;
        let n = self.iterations;
        check_parameter(
            (1..=Self::MAX_ITERATIONS).contains(&n),
            "dnc",
            "iterations",
            n,
            "1 ≤ iterations ≤ 1000 (DnC::MAX_ITERATIONS)",
        )
    }

    /// Sets the sampling seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the weighting of the final mean.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// Clients dropped per iteration, ⌊c·f'⌋, with f' = f − `liars` (at
    /// least 0): the proven liars already taken out count against f.
    fn dropped(&self, liars: usize) -> usize {
        (self.filter_fraction * self.f.saturating_sub(liars) as f64).floor() as usize
    }
}

/// b distinct flat indices of 0..d, sorted (Floyd's algorithm); all of them when b ≥ d.
fn sample_indices(rng: &mut Rng, d: usize, b: usize) -> Vec<usize> {
    if b >= d {
        return (0..d).collect();
    }
    let mut chosen = std::collections::BTreeSet::new();
    for j in d - b..d {
        let t = rng.index(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

/// Subtracts the column means.
fn centre(x: &mut Rows) {
    let cols = x.cols.max(1);
    let m = x.data.len() / cols;
    let mut mean = vec![0.0; x.cols];
    for row in x.rows() {
        mean.iter_mut()
            .zip(row)
            .for_each(|(mu, v)| *mu += v / m as f64);
    }
    for row in x.data.chunks_exact_mut(cols) {
        row.iter_mut().zip(&mean).for_each(|(v, mu)| *v -= mu);
    }
}

/// The clients' updates at the sampled coordinates.
fn gather(round: &ValidUpdates<'_>, indices: &[usize]) -> Result<Rows> {
    // Sampled indices are < d, the offsets start at 0 and every segment of
    // every usable client has the global tensor's length: a place outside is
    // a bug, reported with the index.
    let outside = |flat: usize| {
        Error::invariant(
            "aggregate::dnc::gather",
            "a sampled index lies inside the flat vector, in the global and in every client",
            format!("index {flat} of d = {}", round.dim),
        )
    };
    // (segment, index in it, global value) of each sampled flat index.
    let places = indices
        .iter()
        .map(|&flat| {
            let seg = round
                .offsets
                .partition_point(|&o| o <= flat)
                .saturating_sub(1);
            let start = round.offsets.get(seg).ok_or_else(|| outside(flat))?;
            let k = flat - start;
            let g = round
                .global
                .get(seg)
                .and_then(|s| s.get(k))
                .ok_or_else(|| outside(flat))?;
            Ok((seg, k, f64::from(*g), flat))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut data = Vec::with_capacity(round.clients.len().saturating_mul(places.len()));
    for c in &round.clients {
        for &(seg, k, g, flat) in &places {
            let x = match c.segments.get(seg) {
                Some(Seg::Slice(values)) => *values.get(k).ok_or_else(|| outside(flat))?,
                Some(Seg::Read(source)) => {
                    let mut one = [0.0f32];
                    source
                        .read_range(segment_key(round, seg)?, k, &mut one)
                        .map_err(|e| client_read_error(&c.id, e))?;
                    let [x] = one;
                    x
                }
                None => return Err(outside(flat)),
            };
            data.push(f64::from(x) - g);
        }
    }
    Ok(Rows {
        cols: places.len(),
        data,
    })
}

/// Outlier scores sᵢ = ⟨xᵢ − μ, v⟩² of the rows, v the top right singular
/// vector of the centred sub-matrix (the top eigenvector of XᵀX, by
/// [Lanczos](crate::aggregate::lanczos)).
///
/// The start vector is a fixed Gaussian draw per sampled coordinate (hashed
/// from `seed` and the flat index), so it does not depend on the clients'
/// order, and is orthogonal to the top direction with probability 0.
fn outlier_scores(mut x: Rows, indices: &[usize], seed: u64) -> Vec<f64> {
    centre(&mut x);
    let start = indices
        .iter()
        .map(|&flat| gaussian_at(seed, flat as u64))
        .collect();
    match top_eigenvector(&x, start) {
        Some(v) => x.rows().map(|row| dot(row, &v).powi(2)).collect(),
        None => vec![0.0; x.rows().len()],
    }
}

impl Aggregator for DnC {
    fn name(&self) -> &'static str {
        "dnc"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.aggregate_after_removal(global, updates, 0)
    }

    /// Runs with f − removed (see [`Aggregator::aggregate_after_removal`]).
    fn aggregate_after_removal(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
        liars: usize,
    ) -> Result<Aggregation> {
        self.check()?;
        let mut round = ValidUpdates::prepare(global, updates)?;
        if round.clients.is_empty() {
            return Ok(round.skip(SkipReason::NoClientLeft));
        }
        let removed = self.dropped(liars);
        round.require_checked(
            "dnc",
            removed.checked_add(1),
            format!("n > ⌊c·f⌋ = {removed}"),
        )?;
        let m = round.clients.len();
        let mut rng = Rng::new(self.seed);
        let mut flagged: Vec<Option<f64>> = vec![None; m];
        for _ in 0..self.iterations {
            let indices = sample_indices(&mut rng, round.dim, self.subsample_dim);
            let scores = outlier_scores(gather(&round, &indices)?, &indices, self.seed);
            if scores.len() != m {
                return Err(Error::invariant(
                    "aggregate::dnc",
                    "one outlier score per usable client",
                    format!("{} scores for {m} clients", scores.len()),
                ));
            }
            let mut order: Vec<(usize, f64)> = scores.into_iter().enumerate().collect();
            order.sort_by(|&(a, sa), &(b, sb)| sb.total_cmp(&sa).then(a.cmp(&b)));
            for &(i, s) in order.iter().take(removed) {
                // i < m = flagged.len() (checked just above).
                if let Some(flag) = flagged.get_mut(i) {
                    *flag = Some(flag.map_or(s, |old: f64| old.max(s)));
                }
            }
        }
        let mut members = Vec::new();
        for (i, flag) in flagged.iter().enumerate() {
            match flag {
                Some(score) => round.exclude(i, ExclusionReason::DnCOutlier { score: *score }),
                None => members.push(i),
            }
        }
        scanned(round.weighted_mean(&members, self.weighting, &[])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::linalg::{Square, symmetric_eigen};

    /// The scores from the exact top eigenpair of K = XXᵀ: sᵢ = λ₁uᵢ².
    fn exact_scores(rows: &[Vec<f64>]) -> Vec<f64> {
        let m = rows.len();
        let b = rows[0].len();
        let mean: Vec<f64> = (0..b)
            .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / m as f64)
            .collect();
        let centred: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| r.iter().zip(&mean).map(|(x, mu)| x - mu).collect())
            .collect();
        let k = Square::from_fn(m, |i, j| dot(&centred[i], &centred[j]));
        let (values, vectors) = symmetric_eigen(&k);
        (0..m)
            .map(|i| values[0].max(0.0) * vectors.get(i, 0).powi(2))
            .collect()
    }

    fn rows(m: usize, b: usize, seed: u64) -> Vec<Vec<f64>> {
        (0..m)
            .map(|i| {
                (0..b)
                    .map(|j| gaussian_at(seed, (i * b + j) as u64) * (1.0 + j as f64))
                    .collect()
            })
            .collect()
    }

    fn power_scores(rows: &[Vec<f64>]) -> Vec<f64> {
        let b = rows[0].len();
        let x = Rows {
            cols: b,
            data: rows.concat(),
        };
        let indices: Vec<usize> = (0..b).map(|j| 3 * j + 1).collect();
        outlier_scores(x, &indices, 42)
    }

    #[test]
    fn power_iteration_matches_the_exact_top_eigenpair() {
        // m > b (the b × b side is the small one), m < b, and one outlier.
        let mut with_outlier = rows(12, 30, 5);
        with_outlier[7].iter_mut().for_each(|x| *x += 25.0);
        for (name, data) in [
            ("m > b", rows(40, 6, 1)),
            ("m < b", rows(9, 50, 2)),
            ("outlier", with_outlier),
        ] {
            let want = exact_scores(&data);
            let got = power_scores(&data);
            let scale = want.iter().copied().fold(0.0, f64::max);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-7 * scale, "{name} [{i}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn a_zero_sub_matrix_scores_zero() {
        let scores = power_scores(&[vec![1.0, 2.0], vec![1.0, 2.0], vec![1.0, 2.0]]);
        assert_eq!(scores, [0.0, 0.0, 0.0]);
    }
}
