//! FLAME (Nguyen et al., USENIX Security 2022, "FLAME: Taming backdoors in
//! federated learning").

use crate::aggregate::clipping::clip_scale;
use crate::aggregate::engine::{self, gram};
use crate::aggregate::krum::poisoned;
use crate::aggregate::linalg::{Square, median};
use crate::aggregate::updates::with_scan;
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ExclusionReason, Outcome, SkipReason, Weighting,
};
use crate::error::{Error, Result, check_parameter};
use crate::lora::LoraAdapter;
use crate::rng::{gaussian_at, mix64};

/// FLAME: filter by clustering, bound by clipping, then (optionally) add noise.
///
/// 1. **Clustering.** Pairwise cosine distances 1 − cos(Δᵢ, Δⱼ) of the updates
///    (from the Gram matrix). Clients outside the majority cluster are excluded
///    ([`ExclusionReason::OutsideMajorityCluster`]).
/// 2. **Clipping.** S = median of ‖Δᵢ‖ over all usable clients; each admitted
///    update is scaled by min(1, S / ‖Δᵢ‖).
/// 3. **Aggregation.** `global + Σ aᵢ·clip(Δᵢ)`, aᵢ the normalised
///    [`Weighting`] over admitted clients (default uniform, as in the paper).
/// 4. **Noise** (optional, off by default): Gaussian noise of standard
///    deviation λ·S added to every coordinate; the paper uses λ = 0.001 for
///    NLP models. Noise is drawn per coordinate from (seed, round, coordinate),
///    so a round replays bit for bit for a given seed.
///
/// **Simplified clustering (differs from the paper).** The paper runs HDBSCAN
/// with `min_cluster_size` = ⌊n/2⌋ + 1 and `min_samples` = 1 on the cosine
/// distances. With `min_samples` = 1 HDBSCAN's mutual-reachability distance is
/// the plain distance, so its hierarchy is the single-linkage one; this crate
/// walks that hierarchy (Kruskal's algorithm on the distances) and admits the
/// **first component to reach ⌊n/2⌋ + 1 members**: the tightest majority
/// group under single linkage. HDBSCAN instead selects clusters by
/// excess-of-mass stability and labels points that fall out of the cluster as
/// noise by their λ = 1/distance; it may therefore admit a slightly different
/// set (in particular, clients that join the majority at a larger distance
/// than the one that completed it are always outliers here). The paper also
/// computes distances on the local models rather than the updates; the two
/// differ only by the shared global adapter, which dominates LoRA weights and
/// would hide the differences between clients.
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
/// let mut flame = Flame::new().seed(7); // seeded noise: a round replays bit for bit
/// let round = flame.aggregate(&global, &updates)?;
/// let [x, y] = value(&round).unwrap()[..] else { unreachable!() };
/// assert!((x - 1.0).abs() < 0.3 && (y - 1.0).abs() < 0.3, "({x}, {y})");
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Flame {
    noise_lambda: f64,
    seed: u64,
    weighting: Weighting,
    rounds: u64,
}

impl Default for Flame {
    fn default() -> Self {
        Flame {
            noise_lambda: 0.0,
            seed: 0,
            weighting: Weighting::Uniform,
            rounds: 0,
        }
    }
}

impl Flame {
    /// No noise, uniform weighting, seed 0.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets the noise level λ ≥ 0 (σ = λ·S; 0 = no noise).
        noise_lambda: f64;
        /// Sets the noise seed.
        seed: u64;
        /// Sets the weighting of the final mean.
        weighting: Weighting;
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check) and
    /// before every round, so a setter never lets an out-of-range value reach
    /// the rule.
    pub fn check(&self) -> Result<()> {
        let l = self.noise_lambda;
        check_parameter(
            l >= 0.0 && l.is_finite(),
            "flame",
            "noise_lambda",
            l,
            "a finite value ≥ 0",
        )
    }
}

/// Single-linkage majority cluster over a distance matrix: returns
/// (admitted flags, each client's link distance to the majority component).
pub(crate) fn majority_cluster(dist: &Square) -> Result<(Vec<bool>, Vec<f64>)> {
    let m = dist.m();
    let need = m / 2 + 1;
    let mut edges: Vec<(f64, usize, usize)> = Vec::with_capacity(m * m / 2);
    for (i, row) in dist.rows().enumerate() {
        for (j, d) in row.iter().enumerate().skip(i + 1) {
            edges.push((*d, i, j));
        }
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut parent: Vec<usize> = (0..m).collect();
    let mut size = vec![1usize; m];
    let mut link = vec![0.0f64; m];
    let mut majority: Option<usize> = (need <= 1).then_some(0);
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while let Some(&p) = parent.get(x) {
            if p == x {
                break;
            }
            // Parents are node indices < m (set only by the union below), so
            // the lookup cannot miss; `p` is the value a root would give.
            let gp = parent.get(p).copied().unwrap_or(p);
            if let Some(slot) = parent.get_mut(x) {
                *slot = gp;
            }
            x = gp;
        }
        x
    }
    let mut admitted = vec![false; m];
    if let Some(first) = majority
        && let Some(a) = admitted.get_mut(first)
    {
        *a = true;
    }
    for (d, i, j) in edges {
        let (ri, rj) = (find(&mut parent, i), find(&mut parent, j));
        if ri == rj {
            continue;
        }
        let (Some(&size_i), Some(&size_j)) = (size.get(ri), size.get(rj)) else {
            return Err(Error::invariant(
                "aggregate::flame::majority_cluster",
                "union-find roots are client positions < m",
                format!("roots {ri}, {rj} for m = {m}"),
            ));
        };
        let (big, small) = if size_i >= size_j { (ri, rj) } else { (rj, ri) };
        let merged = size_i + size_j;
        if let Some(p) = parent.get_mut(small) {
            *p = big;
        }
        if let Some(s) = size.get_mut(big) {
            *s = merged;
        }
        match majority {
            None if merged >= need => {
                majority = Some(big);
                for (k, (a, l)) in admitted.iter_mut().zip(link.iter_mut()).enumerate() {
                    if find(&mut parent, k) == big {
                        *a = true;
                        *l = d;
                    }
                }
            }
            Some(_) => {
                // Record when the others would join the majority component.
                let root = majority.map(|r| find(&mut parent, r));
                for (k, (a, l)) in admitted.iter().zip(link.iter_mut()).enumerate() {
                    if !a && *l == 0.0 && Some(find(&mut parent, k)) == root {
                        *l = d;
                    }
                }
            }
            None => {}
        }
    }
    Ok((admitted, link))
}

impl Aggregator for Flame {
    fn name(&self) -> &'static str {
        "flame"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.check()?;
        with_scan(global, updates, |mut round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            let all = round.all();
            let m = all.len();
            let g = gram(&round, &all)?;
            if !g.is_finite() {
                return poisoned(&round);
            }
            let norms: Vec<f64> = g.diagonal().map(|d| d.max(0.0).sqrt()).collect();
            let mut cosine_distance = Square::zeros(m);
            let pairs = g.rows().zip(cosine_distance.rows_mut()).zip(&norms);
            for (i, ((row, out), ni)) in pairs.enumerate() {
                for (j, ((gij, o), nj)) in row.iter().zip(out.iter_mut()).zip(&norms).enumerate() {
                    let denom = ni * nj;
                    let cos = if denom > 0.0 { gij / denom } else { 0.0 };
                    *o = if i == j { 0.0 } else { 1.0 - cos };
                }
            }
            let (admitted, link) = majority_cluster(&cosine_distance)?;
            let Some(bound) = median(&norms) else {
                return Err(Error::invariant(
                    "aggregate::flame",
                    "a round that reaches the clipping bound has at least one client",
                    format!("{m} norms"),
                ));
            };
            let mut members = Vec::new();
            let mut scales = Vec::new();
            let clients = admitted.iter().zip(&norms).zip(&link).enumerate();
            for (i, ((&admitted, &norm), &link_distance)) in clients {
                if admitted {
                    members.push(i);
                    scales.push(clip_scale(norm, bound));
                } else {
                    round.exclude(i, ExclusionReason::OutsideMajorityCluster { link_distance });
                }
            }
            let Some(mut result) = round.weighted_mean(&members, self.weighting, &scales)? else {
                return Ok(None);
            };
            let round_seed = mix64(self.seed ^ mix64(self.rounds));
            // A seed counter: wrapping after 2⁶⁴ rounds only repeats noise.
            self.rounds = self.rounds.wrapping_add(1);
            let sigma = self.noise_lambda * bound;
            if sigma > 0.0
                && let Outcome::Updated(adapter) = &mut result.outcome
            {
                add_noise(adapter, sigma, round_seed);
            }
            Ok(Some(result))
        })
    }
}

/// Adds N(0, σ²) to every coordinate, coordinate c drawing from (seed, c).
fn add_noise(adapter: &mut LoraAdapter, sigma: f64, seed: u64) {
    let mut items = Vec::new();
    let mut offset = 0u64;
    for (_, tensor) in adapter.iter_mut() {
        let values = tensor.as_mut_slice();
        let len = values.len() as u64;
        for (k, piece) in values.chunks_mut(engine::CHUNK).enumerate() {
            items.push((offset + (k * engine::CHUNK) as u64, piece));
        }
        offset += len;
    }
    engine::drive(
        items,
        || (),
        |_, (start, piece): (u64, &mut [f32])| {
            for (k, v) in piece.iter_mut().enumerate() {
                *v += (sigma * gaussian_at(seed, start + k as u64)) as f32;
            }
        },
    );
}
