//! FLAME (Nguyen et al., USENIX Security 2022, "FLAME: Taming backdoors in
//! federated learning").

use crate::aggregate::clipping::clip_scale;
use crate::aggregate::engine::{self, gram};
use crate::aggregate::krum::poisoned;
use crate::aggregate::linalg::median;
use crate::aggregate::rng::{gaussian_at, mix};
use crate::aggregate::round::{param_error, with_scan};
use crate::aggregate::{
    Aggregation, Aggregator, ClientUpdate, ExclusionReason, Outcome, SkipReason, Weighting,
};
use crate::error::Result;
use crate::lora::LoraAdapter;

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

    /// Sets the noise level λ ≥ 0 (σ = λ·S; 0 = no noise).
    pub fn noise_lambda(mut self, lambda: f64) -> Result<Self> {
        if !(lambda >= 0.0 && lambda.is_finite()) {
            return Err(param_error(
                "flame",
                "noise_lambda",
                lambda,
                "a finite value ≥ 0",
            ));
        }
        self.noise_lambda = lambda;
        Ok(self)
    }

    /// Sets the noise seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the weighting of the final mean.
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }
}

/// Single-linkage majority cluster over a distance matrix: returns
/// (admitted flags, each client's link distance to the majority component).
pub(crate) fn majority_cluster(dist: &[f64], m: usize) -> (Vec<bool>, Vec<f64>) {
    let need = m / 2 + 1;
    let mut edges: Vec<(f64, usize, usize)> = Vec::with_capacity(m * m / 2);
    for i in 0..m {
        for j in i + 1..m {
            edges.push((dist.get(i * m + j).copied().unwrap_or(0.0), i, j));
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
        let (big, small) = if size.get(ri) >= size.get(rj) {
            (ri, rj)
        } else {
            (rj, ri)
        };
        let merged = size.get(big).copied().unwrap_or(0) + size.get(small).copied().unwrap_or(0);
        if let Some(p) = parent.get_mut(small) {
            *p = big;
        }
        if let Some(s) = size.get_mut(big) {
            *s = merged;
        }
        match majority {
            None if merged >= need => {
                majority = Some(big);
                for k in 0..m {
                    if find(&mut parent, k) == big {
                        admitted[k] = true;
                        link[k] = d;
                    }
                }
            }
            Some(_) => {
                // Record when the others would join the majority component.
                let root = majority.map(|r| find(&mut parent, r));
                for k in 0..m {
                    if !admitted[k] && link[k] == 0.0 && Some(find(&mut parent, k)) == root {
                        link[k] = d;
                    }
                }
            }
            None => {}
        }
    }
    (admitted, link)
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
        with_scan(global, updates, |mut round| {
            if round.clients.is_empty() {
                return Ok(Some(round.skip(SkipReason::NoClientLeft)));
            }
            let all = round.all();
            let m = all.len();
            let g = gram(&round, &all)?;
            if !engine::finite(&g) {
                return poisoned(&round);
            }
            let norms: Vec<f64> = (0..m)
                .map(|i| g.get(i * m + i).copied().unwrap_or(0.0).max(0.0).sqrt())
                .collect();
            let mut cosine_distance = vec![0.0; m * m];
            for i in 0..m {
                for j in 0..m {
                    let denom = norms[i] * norms[j];
                    let cos = if denom > 0.0 {
                        g.get(i * m + j).copied().unwrap_or(0.0) / denom
                    } else {
                        0.0
                    };
                    cosine_distance[i * m + j] = if i == j { 0.0 } else { 1.0 - cos };
                }
            }
            let (admitted, link) = majority_cluster(&cosine_distance, m);
            let bound = median(&norms).unwrap_or(0.0);
            let mut members = Vec::new();
            let mut scales = Vec::new();
            for i in 0..m {
                if admitted[i] {
                    members.push(i);
                    scales.push(clip_scale(norms[i], bound));
                } else {
                    round.exclude(
                        i,
                        ExclusionReason::OutsideMajorityCluster {
                            link_distance: link[i],
                        },
                    );
                }
            }
            let Some(mut result) = round.weighted_mean(&members, self.weighting, &scales)? else {
                return Ok(None);
            };
            let round_seed = mix(self.seed ^ mix(self.rounds));
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
