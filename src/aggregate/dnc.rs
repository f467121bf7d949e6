//! Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the
//! Byzantine: optimizing model poisoning attacks and defenses for federated
//! learning").

use crate::aggregate::engine::{client_read_error, segment_key};
use crate::aggregate::linalg::{Square, symmetric_eigen};
use crate::aggregate::round::{Round, Seg, param_error, scanned};
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ExclusionReason, SkipReason, Weighting,
};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::rng::Rng;

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
/// seed 0. The top singular pair comes from the n × n matrix K = XXᵀ of the
/// centred sub-matrix X (sᵢ = λ₁uᵢ² for its top eigenpair (λ₁, u)), so the cost
/// is n × b per iteration plus an n × n eigen-decomposition.
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

    /// DnC expecting at most `f` malicious clients, paper defaults otherwise.
    /// Any f is accepted here; n > ⌊c·f⌋ is checked per round with checked
    /// arithmetic ([`Error::TooFewClients`](crate::Error::TooFewClients)).
    pub fn new(f: usize) -> Result<Self> {
        Ok(DnC {
            f,
            filter_fraction: 1.0,
            subsample_dim: 10_000,
            iterations: 5,
            seed: 0,
            weighting: Weighting::Uniform,
        })
    }

    /// Sets the filtering fraction c > 0 (⌊c·f⌋ clients dropped per iteration).
    pub fn filter_fraction(mut self, c: f64) -> Result<Self> {
        if !(c > 0.0 && c.is_finite()) {
            return Err(param_error(
                "dnc",
                "filter_fraction",
                c,
                "a finite value > 0",
            ));
        }
        self.filter_fraction = c;
        Ok(self)
    }

    /// Sets the number of sampled coordinates b, 1 ≤ b ≤ [`DnC::MAX_SUBSAMPLE_DIM`].
    ///
    /// The n × b sub-matrix is gathered in f64, so b is bounded: a huge b
    /// would materialise every update (n·d f64) instead of a sample.
    pub fn subsample_dim(mut self, b: usize) -> Result<Self> {
        if b == 0 || b > Self::MAX_SUBSAMPLE_DIM {
            return Err(param_error(
                "dnc",
                "subsample_dim",
                b,
                "1 ≤ b ≤ 1048576 (DnC::MAX_SUBSAMPLE_DIM)",
            ));
        }
        self.subsample_dim = b;
        Ok(self)
    }

    /// Sets the number of iterations, 1 ≤ iterations ≤ [`DnC::MAX_ITERATIONS`]
    /// (the paper uses 5; each iteration reads b coordinates of every client
    /// and decomposes an n × n matrix, so an unbounded count is a hang).
    pub fn iterations(mut self, iterations: usize) -> Result<Self> {
        if iterations == 0 || iterations > Self::MAX_ITERATIONS {
            return Err(param_error(
                "dnc",
                "iterations",
                iterations,
                "1 ≤ iterations ≤ 1000 (DnC::MAX_ITERATIONS)",
            ));
        }
        self.iterations = iterations;
        Ok(self)
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

    fn removed(&self) -> usize {
        (self.filter_fraction * self.f as f64).floor() as usize
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

/// The clients' updates at the sampled coordinates, as m rows of b (in f64:
/// the sub-matrix products below cannot overflow).
fn gather(round: &Round<'_>, indices: &[usize]) -> Result<Vec<Vec<f64>>> {
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
    round
        .clients
        .iter()
        .map(|c| {
            places
                .iter()
                .map(|&(seg, k, g, flat)| {
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
                    Ok(f64::from(x) - g)
                })
                .collect()
        })
        .collect()
}

/// Outlier scores sᵢ = ⟨xᵢ − μ, v⟩² for the rows of one sub-matrix.
fn outlier_scores(rows: &[Vec<f64>]) -> Vec<f64> {
    let m = rows.len();
    let b = rows.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; b];
    for r in rows {
        mean.iter_mut()
            .zip(r)
            .for_each(|(mu, x)| *mu += x / m as f64);
    }
    let centred: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| r.iter().zip(&mean).map(|(x, mu)| x - mu).collect())
        .collect();
    let mut k = Square::zeros(m);
    for (i, a) in centred.iter().enumerate() {
        for (j, b) in centred.iter().enumerate().take(i + 1) {
            let v: f64 = a.iter().zip(b).map(|(a, b)| a * b).sum();
            k.set(i, j, v);
            k.set(j, i, v);
        }
    }
    let (values, vectors) = symmetric_eigen(&k);
    // No eigenvalue only for m = 0 rows: then there is no client to score.
    let Some(&top) = values.first() else {
        return Vec::new();
    };
    let lambda = top.max(0.0);
    // The top eigenvector is column 0 of `vectors` (m ≥ 1 here).
    (0..m).map(|i| lambda * vectors.get(i, 0).powi(2)).collect()
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
        let mut round = Round::prepare(global, updates)?;
        if round.clients.is_empty() {
            return Ok(round.skip(SkipReason::NoClientLeft));
        }
        let removed = self.removed();
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
            let scores = outlier_scores(&gather(&round, &indices)?);
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
