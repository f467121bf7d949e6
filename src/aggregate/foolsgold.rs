//! FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020, "The limitations of
//! federated learning in sybil settings").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::aggregate::engine::{self, panels, pieces};
use crate::aggregate::linalg::Square;
use crate::aggregate::updates::{ValidUpdates, scanned};
use crate::aggregate::{
    Aggregation, Aggregator, ClientId, ClientUpdate, ExclusionReason, SkipReason, Weighting,
};
use crate::error::{Error, Result, check_parameter};
use crate::lora::LoraAdapter;

/// FoolsGold's memory: each client's summed update history Hₖ = Σ_rounds Δₖ,
/// as a flat vector in sorted key order.
///
/// Serialisable so a server can checkpoint and resume. Its size is
/// (clients ever seen) × d floats: 20 clients of a 3.4 M-parameter adapter take
/// 272 MB, which is what the paper's definition needs (cosine similarity of
/// full histories).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FoolsGoldState {
    /// Histories by client.
    pub histories: BTreeMap<ClientId, Vec<f32>>,
}

/// FoolsGold: sybils pushing the same poisoned direction have update
/// histories that are more similar to each other than honest clients' are, so
/// a client's weight falls with its largest history cosine similarity.
///
/// Per round, with Hᵢ ← Hᵢ + Δᵢ and csᵢⱼ the cosine similarity of Hᵢ and Hⱼ
/// (csᵢᵢ = 0), vᵢ = maxⱼ csᵢⱼ:
/// 1. pardoning: if vᵢ < vⱼ then csᵢⱼ ← csᵢⱼ · vᵢ / vⱼ;
/// 2. αᵢ = 1 − maxⱼ csᵢⱼ, clipped to [0, 1], then divided by maxᵢ αᵢ;
/// 3. αᵢ = 1 becomes 0.99; logit αᵢ ← κ·(ln(αᵢ / (1 − αᵢ)) + 0.5), clipped
///    to [0, 1] (κ = 1 by default, the paper's confidence parameter).
///
/// The new global adapter is `global + Σ αᵢωᵢΔᵢ / Σ αᵢωᵢ` with ωᵢ the
/// [`Weighting`] (default uniform). The paper adds `Σ αᵢΔᵢ` scaled by the
/// learning rate; normalising by `Σ αᵢ` keeps the step size of FedAvg. Clients
/// with αᵢ = 0 are excluded ([`ExclusionReason::FoolsGoldZeroWeight`]); if all
/// are, the round is skipped. The paper's optional feature-importance
/// weighting of the similarity is not implemented.
#[derive(Debug, Clone, PartialEq)]
pub struct FoolsGold {
    kappa: f64,
    weighting: Weighting,
    state: FoolsGoldState,
}

impl Default for FoolsGold {
    /// κ = 1, uniform weighting, empty history.
    fn default() -> Self {
        FoolsGold {
            kappa: 1.0,
            weighting: Weighting::Uniform,
            state: FoolsGoldState::default(),
        }
    }
}

impl FoolsGold {
    /// κ = 1, uniform weighting, empty history.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Sets the logit confidence κ > 0.
        kappa: f64;
        /// Sets the weighting combined with FoolsGold's αᵢ.
        weighting: Weighting;
    }

    /// Validates the settings: the one definition of their ranges, run by
    /// [`AggregatorSpec::check`](crate::aggregate::AggregatorSpec::check) and
    /// before every round, so a setter never lets an out-of-range value reach
    /// the rule.
    pub fn check(&self) -> Result<()> {
        let k = self.kappa;
        check_parameter(
            k > 0.0 && k.is_finite(),
            "foolsgold",
            "kappa",
            k,
            "a finite value > 0",
        )
    }

    /// Resumes from a checkpointed state.
    pub fn with_state(mut self, state: FoolsGoldState) -> Self {
        self.state = state;
        self
    }

    /// The per-client histories (for checkpointing).
    pub fn state(&self) -> &FoolsGoldState {
        &self.state
    }

    /// FoolsGold weights α from the history Gram matrix; also returns each
    /// client's largest pardoned similarity.
    pub(crate) fn weights(&self, gram: &Square) -> (Vec<f64>, Vec<f64>) {
        let m = gram.m();
        // Normalised in f64, one norm at a time (‖i‖·‖j‖ of two 1e20 histories
        // would overflow f32), clamped to [−1, 1] against rounding; a
        // similarity that is not a number counts as 1 (a copy): it must never
        // be skipped by a max that ignores NaN.
        let norms: Vec<f64> = gram.diagonal().map(|d| d.max(0.0).sqrt()).collect();
        let mut cs = Square::zeros(m);
        for (i, ((row, out), &ni)) in gram.rows().zip(cs.rows_mut()).zip(&norms).enumerate() {
            for (j, ((gij, c), &nj)) in row.iter().zip(out.iter_mut()).zip(&norms).enumerate() {
                if i != j && ni > 0.0 && nj > 0.0 {
                    let cos = gij / ni / nj;
                    *c = if cos.is_nan() {
                        1.0
                    } else {
                        cos.clamp(-1.0, 1.0)
                    };
                }
            }
        }
        // Over the whole row, the diagonal's 0 included (as the reference's
        // `cs − I`).
        let row_max = |cs: &Square| -> Vec<f64> {
            cs.rows()
                .map(|row| {
                    row.iter().fold(
                        f64::NEG_INFINITY,
                        |a, &b| if b.is_nan() || b > a { b } else { a },
                    )
                })
                .collect()
        };
        let v = row_max(&cs);
        for (i, (row, vi)) in cs.rows_mut().zip(&v).enumerate() {
            for (j, (c, vj)) in row.iter_mut().zip(&v).enumerate() {
                if i != j && vi < vj && *vj > 0.0 {
                    *c *= vi / vj;
                }
            }
        }
        let max_sim = row_max(&cs);
        let mut alpha: Vec<f64> = max_sim
            .iter()
            .map(|s| {
                if s.is_nan() {
                    0.0
                } else {
                    (1.0 - s).clamp(0.0, 1.0)
                }
            })
            .collect();
        let top = alpha.iter().copied().fold(0.0, f64::max);
        if top <= 0.0 {
            return (vec![0.0; m], max_sim);
        }
        for a in &mut alpha {
            *a /= top;
            if *a >= 1.0 {
                *a = 0.99;
            }
            let logit = if *a <= 0.0 {
                f64::NEG_INFINITY
            } else {
                (*a / (1.0 - *a)).ln() + 0.5
            };
            *a = (self.kappa * logit).clamp(0.0, 1.0);
        }
        (alpha, max_sim)
    }
}

impl Aggregator for FoolsGold {
    fn name(&self) -> &'static str {
        "foolsgold"
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        updates: &[ClientUpdate<'_>],
    ) -> Result<Aggregation> {
        self.check()?;
        let mut round = ValidUpdates::prepare(global, updates)?;
        if round.clients.is_empty() {
            return Ok(round.skip(SkipReason::NoClientLeft));
        }
        let members = round.all();
        let m = members.len();
        for c in &round.clients {
            let history = self
                .state
                .histories
                .entry(c.id.clone())
                .or_insert_with(|| vec![0.0; round.dim]);
            if history.len() != round.dim {
                return Err(Error::DimensionMismatch {
                    what: format!("FoolsGold history of client `{}`", c.id),
                    expected: round.dim,
                    found: history.len(),
                });
            }
        }
        let gram = update_histories(&round, &mut self.state, m)?;
        let (alpha, max_sim) = self.weights(&gram);
        let mut kept = Vec::new();
        let mut weights = Vec::new();
        // alpha and max_sim have one entry per member (the Gram matrix is m × m).
        for ((&i, alpha), &max_similarity) in members.iter().zip(&alpha).zip(&max_sim) {
            let a = alpha * round.raw_weight(i, self.weighting);
            if a > 0.0 {
                kept.push(i);
                weights.push(a);
            } else {
                round.exclude(i, ExclusionReason::FoolsGoldZeroWeight { max_similarity });
            }
        }
        let total: f64 = weights.iter().sum();
        if kept.is_empty() || total <= 0.0 {
            return Ok(round.skip(SkipReason::ZeroTotalWeight));
        }
        weights.iter_mut().for_each(|w| *w /= total);
        // Σ wᵢ = 1 and no scaling: the mean of Δ added to g equals Σ wᵢxᵢ.
        scanned(round.combination(&kept, &weights, &[])?)
    }
}

/// Hᵢ += Δᵢ for every usable client, and the Gram matrix of the updated
/// histories, in one pass.
fn update_histories(
    round: &ValidUpdates<'_>,
    state: &mut FoolsGoldState,
    m: usize,
) -> Result<Square> {
    let ids: Vec<&ClientId> = round.clients.iter().map(|c| &c.id).collect();
    // Split every member's history at the chunk boundaries, in lockstep.
    let mut by_id: BTreeMap<&ClientId, &mut [f32]> = state
        .histories
        .iter_mut()
        .filter(|(id, _)| ids.contains(id))
        .map(|(id, h)| (id, h.as_mut_slice()))
        .collect();
    let mut rests: Vec<&mut [f32]> = ids.iter().filter_map(|id| by_id.remove(*id)).collect();
    // `aggregate` gave every client of the round a history of `round.dim`
    // values just before: one per client, each cut exactly by the spans.
    if rests.len() != m {
        return Err(crate::Error::invariant(
            "aggregate::foolsgold::update_histories",
            "every client of the round has a history",
            format!("{} histories for {m} clients", rests.len()),
        ));
    }
    let mut items = Vec::new();
    for span in pieces(round) {
        let mut cut = Vec::with_capacity(m);
        for rest in rests.iter_mut() {
            let taken = std::mem::take(rest);
            let available = taken.len();
            let Some((head, tail)) = taken.split_at_mut_checked(span.len) else {
                return Err(crate::Error::invariant(
                    "aggregate::foolsgold::update_histories",
                    "a client's history has the round's dimension",
                    format!("{available} values left for a span of {}", span.len),
                ));
            };
            cut.push(head);
            *rest = tail;
        }
        items.push((span.len, (span, cut)));
    }
    let members = round.all();
    // The Gram matrix of the updated histories, with the underflow fix-up: a
    // 1e-20 copy of another client must still have cosine 1 with it.
    engine::gram_of(
        m,
        panels(items),
        true,
        Vec::new,
        |scratch, (span, cut): (engine::Span, Vec<&mut [f32]>), w| {
            let chunk = engine::chunk_at(round, &members, span, scratch)?;
            for (i, (history, x)) in cut.into_iter().zip(&chunk.rows).enumerate() {
                let finite = crate::aggregate::simd::add_saturating(history, x, chunk.global);
                if let Some(out) = w.row(i) {
                    out.copy_from_slice(history);
                }
                w.settle(i, finite, |exact| {
                    for (e, h) in exact.iter_mut().zip(history.iter()) {
                        *e = f64::from(*h);
                    }
                });
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod kernel_tests {
    use crate::aggregate::simd::add_saturating;

    #[test]
    fn add_saturating_matches_the_scalar_definition_and_reports_non_finite() {
        for len in [0usize, 1, 15, 16, 17, 40] {
            let x: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let g: Vec<f32> = (0..len).map(|i| 0.25 * i as f32).collect();
            let mut h: Vec<f32> = (0..len)
                .map(|i| if i % 3 == 0 { f32::MAX } else { -1.0 })
                .collect();
            let expected: Vec<f32> = h
                .iter()
                .zip(&x)
                .zip(&g)
                .map(|((h, x), g)| (h + (x - g)).clamp(-f32::MAX, f32::MAX))
                .collect();
            assert!(add_saturating(&mut h, &x, &g));
            assert_eq!(h, expected, "len {len}");
            if len > 0 {
                h[len - 1] = f32::NAN;
                assert!(!add_saturating(&mut h, &x, &g), "len {len}");
                assert!(h[len - 1].is_nan());
            }
        }
    }
}
