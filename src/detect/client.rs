//! Client-level: a piecewise sigmoid of the last step's score, averaged over
//! the client's rounds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detect::{
    Assessment, ClientEvidence, ClientId, DEFAULT_ACTIVE_ROUNDS, DEFAULT_PIVOT, DEFAULT_STEEPNESS,
    DefenseLevel, Detector, LevelRepr, MissingEvidence, Safeguards, Verdict, check_positive_finite,
    check_state, check_unit, safeguard,
};
use crate::error::{Error, Result, check_parameter};

/// Unchecked client-level settings; [`ClientLevelParams::build`] validates them.
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`steepness`](Self::steepness) k | 10 | `k = 10.0` |
/// | [`pivot`](Self::pivot) | 0.8 | the `0.8` in the piecewise sigmoid |
/// | [`active_rounds`](Self::active_rounds) R | `Some(20)` | `prefilter_round` |
/// | [`min_weight`](Self::min_weight) | 0.0 | `prefilter_min_weight` |
/// | [`missing_score`](Self::missing_score) | [`MissingEvidence::Malicious`] | missing → s = 1 |
/// | [`safeguards`](Self::safeguards) | [`Safeguards::default`] (verdict cap, probation) | [`Safeguards::reference`] (none) |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLevelParams {
    steepness: f64,
    pivot: f64,
    active_rounds: Option<u32>,
    min_weight: f64,
    missing_score: MissingEvidence,
    #[serde(default)]
    safeguards: Safeguards,
}

impl Default for ClientLevelParams {
    fn default() -> Self {
        ClientLevelParams {
            steepness: DEFAULT_STEEPNESS,
            pivot: DEFAULT_PIVOT,
            active_rounds: Some(DEFAULT_ACTIVE_ROUNDS),
            min_weight: 0.0,
            missing_score: MissingEvidence::Malicious,
            safeguards: Safeguards::default(),
        }
    }
}

impl ClientLevelParams {
    setters! {
        /// Slope k (> 0) of both sigmoid halves.
        steepness: f64;
        /// Pivot p ∈ (0, 1) where the two sigmoid halves meet (t = 0.5 there,
        /// up to the halves' saturation): scores below p map into [0, 0.5],
        /// scores above into [0.5, 1].
        pivot: f64;
        /// Rounds 0..R update the mean; from round R on every client keeps its
        /// mean (1.0 for a client never assessed). `None` updates every round.
        active_rounds: Option<u32>;
        /// Lower bound ∈ [0, 1] of every factor (the stored mean is not clamped).
        min_weight: f64;
        /// How a missing last-step score counts. Default
        /// [`MissingEvidence::Malicious`]: s = 1, as in the reference
        /// ([`MissingEvidence::FromUpdate`] is the same here: the last step is
        /// the update).
        missing_score: MissingEvidence;
        /// The protocol safeguards: in a round whose update scores ≥ τ the
        /// factor is at most that round's raw factor (also after the level
        /// froze), and a new identity is on probation (a never-seen id after
        /// round R gets the probation factor, not 1.0). [`Safeguards::reference`]
        /// reproduces the paper's running mean alone.
        safeguards: Safeguards;
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        const LEVEL: &str = "client level";
        check_positive_finite(LEVEL, "steepness", self.steepness)?;
        let pivot = self.pivot;
        let ok = pivot.is_finite() && pivot > 0.0 && pivot < 1.0;
        check_parameter(ok, LEVEL, "pivot", pivot, "a number in (0, 1)")?;
        check_unit(LEVEL, "min_weight", self.min_weight)?;
        self.safeguards.check()
    }

    /// Validates the settings and builds a detector with no client state.
    pub fn build(self) -> Result<ClientLevel> {
        self.check()?;
        Ok(ClientLevel {
            params: self,
            clients: BTreeMap::new(),
        })
    }

    fn is_active(&self, round: u32) -> bool {
        self.active_rounds.is_none_or(|r| round < r)
    }

    /// The reference's raw factor 1 − t(s) for a score clamped to [0, 1].
    ///
    /// t(s) = 0.5·σ(k(s/p − 0.5)) for s ≤ p, else 0.5 + 0.5·σ(k((s − p)/(1 − p) − 0.5)).
    pub fn raw_factor(&self, score: f64) -> f64 {
        safeguard::raw_factor(score, self.steepness, self.pivot)
    }
}

/// One client's running mean of raw factors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientMeanState {
    /// Mean of the raw factors over the client's active rounds.
    pub mean: f64,
    /// Number of active rounds averaged.
    pub rounds: u64,
}

/// **Client-level** detection: only the *last* local step's ΔLoRA (the
/// submitted update minus the round's starting adapter) is scored, giving s;
/// a piecewise sigmoid maps it to t ∈ [0, 1] (k = 10 around 0.8) and the
/// factor is the running mean of 1 − t over the client's rounds.
///
/// **When to use:** the cheapest level and the one a server can fully verify:
/// it needs nothing but the submitted update. **Threat model:** a client
/// whose final update looks benign passes, whatever it did in between; the
/// running mean forgives a client that turns malicious late only slowly
/// (and not at all after R rounds). A missing score counts as s = 1
/// (malicious), as in the reference.
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, ClientLevel, Detector, Safeguards};
///
/// // The paper's running mean alone (no probation for the new id).
/// let mut d = ClientLevel::params().safeguards(Safeguards::reference()).build()?;
/// let id = ClientId::from("bob");
/// let a = d.assess(0, &id, &ClientEvidence::new(64).with_last_step_score(Some(0.4)))?;
/// // s = 0.4 = pivot / 2: t = 0.5·σ(0) = 0.25, factor 0.75 (up to 0.4's f32 rounding).
/// assert!((a.factor - 0.75).abs() < 1e-6);
/// // A missing score counts as s = 1: raw factor 1 − (0.5 + 0.5·σ(5)).
/// let b = d.assess(1, &id, &ClientEvidence::new(64))?;
/// let raw = 0.5 - 0.5 / (1.0 + (-5.0f64).exp());
/// assert!((b.factor - (0.75 + raw) / 2.0).abs() < 1e-6);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LevelRepr<ClientLevelParams, ClientMeanState>")]
pub struct ClientLevel {
    params: ClientLevelParams,
    clients: BTreeMap<ClientId, ClientMeanState>,
}

impl TryFrom<LevelRepr<ClientLevelParams, ClientMeanState>> for ClientLevel {
    type Error = Error;

    fn try_from(repr: LevelRepr<ClientLevelParams, ClientMeanState>) -> Result<Self> {
        let (params, clients) = repr.checked(ClientLevelParams::check, |_, state| {
            let ok = (0.0..=1.0).contains(&state.mean);
            check_state("running mean", ok, state.mean)?;
            // Rounds are u32: no client can have been averaged over more.
            let ok = state.rounds <= u64::from(u32::MAX);
            check_state("rounds averaged", ok, state.rounds)
        })?;
        Ok(ClientLevel { params, clients })
    }
}

impl ClientLevel {
    /// Settings with the reference defaults.
    pub fn params() -> ClientLevelParams {
        ClientLevelParams::default()
    }

    /// The validated settings.
    pub fn settings(&self) -> &ClientLevelParams {
        &self.params
    }

    /// A client's running mean, if it was ever assessed in an active round.
    pub fn client_state(&self, client: &ClientId) -> Option<&ClientMeanState> {
        self.clients.get(client)
    }
}

impl Detector for ClientLevel {
    fn level(&self) -> DefenseLevel {
        DefenseLevel::Client
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        evidence.validate(round, client)?;
        let p = &self.params;
        if !p.is_active(round) {
            return Ok(self.frozen(round, client, evidence));
        }
        let (score, note) = match (evidence.last_step_score, p.missing_score) {
            (Some(s), _) => (f64::from(s), ""),
            (None, MissingEvidence::Malicious | MissingEvidence::FromUpdate) => {
                (1.0, " (missing, counted as 1)")
            }
            (None, MissingEvidence::Benign) => (0.0, " (missing, counted as 0)"),
        };
        let raw = p.raw_factor(score);
        let state = self
            .clients
            .entry(client.clone())
            .or_insert(ClientMeanState {
                mean: 1.0,
                rounds: 0,
            });
        let n = state.rounds as f64;
        state.mean = (state.mean * n + raw) / (n + 1.0);
        state.rounds = state.rounds.saturating_add(1);
        let verdict = if evidence.is_harmful(score) {
            Verdict::Malicious
        } else {
            Verdict::Benign
        };
        let (factor, verdict, capped) =
            p.safeguards
                .apply(state.mean, verdict, evidence, state.rounds, |s| {
                    p.raw_factor(s)
                });
        let reason = format!(
            "last-step score {score:.6}{note}: raw factor {raw:.6}, mean over {} rounds {:.6}{capped}",
            state.rounds, state.mean
        );
        Ok(Assessment::new(factor, p.min_weight, verdict, reason))
    }
}

impl ClientLevel {
    /// The frozen phase: the client's learned mean (the prior for a client
    /// never assessed while learning), bounded by the safeguards.
    fn frozen(&self, round: u32, client: &ClientId, evidence: &ClientEvidence) -> Assessment {
        let p = &self.params;
        let state = self.clients.get(client);
        let mean = state.map_or(1.0, |s| s.mean);
        let learned = state.map_or(0, |s| s.rounds);
        let (factor, verdict, capped) =
            p.safeguards
                .apply(mean, Verdict::Undecided, evidence, learned, |s| {
                    p.raw_factor(s)
                });
        let reason = format!(
            "client-level frozen from round {} on (round {round}): keeps mean factor {mean:.6}{capped}",
            // Not active means active_rounds is Some(r) with round ≥ r.
            p.active_rounds.unwrap_or_default()
        );
        Assessment::new(factor, p.min_weight, verdict, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_factor_is_monotone_and_in_unit_range() {
        let p = ClientLevelParams::default();
        let mut prev = f64::INFINITY;
        for i in 0..=1000 {
            let f = p.raw_factor(f64::from(i) / 1000.0);
            assert!((0.0..=1.0).contains(&f));
            assert!(f <= prev, "not monotone at {i}");
            prev = f;
        }
        assert_eq!(p.raw_factor(-3.0), p.raw_factor(0.0));
        assert_eq!(p.raw_factor(7.0), p.raw_factor(1.0));
    }

    #[test]
    fn frozen_never_seen_client_gets_one_in_the_reference_only() {
        let mut safe = ClientLevel::params()
            .active_rounds(Some(2))
            .build()
            .unwrap();
        let a = safe
            .assess(2, &ClientId::from("z"), &ClientEvidence::new(1))
            .unwrap();
        assert_eq!(a.factor, 0.5);
        let mut d = ClientLevel::params()
            .active_rounds(Some(2))
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let a = d
            .assess(2, &ClientId::from("z"), &ClientEvidence::new(1))
            .unwrap();
        assert_eq!(a.factor, 1.0);
        assert_eq!(a.verdict, Verdict::Undecided);
    }

    #[test]
    fn safer_and_reference_missing_policies_differ() {
        let e = ClientEvidence::new(8);
        let id = ClientId::from("c");
        let mut reference = ClientLevel::params().build().unwrap();
        let mut lenient = ClientLevel::params()
            .missing_score(MissingEvidence::Benign)
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let r = reference.assess(0, &id, &e).unwrap();
        let l = lenient.assess(0, &id, &e).unwrap();
        assert!(r.factor < 0.01, "{}", r.factor);
        assert!(l.factor > 0.99, "{}", l.factor);
        assert_eq!(r.verdict, Verdict::Malicious);
    }

    #[test]
    fn invalid_pivot_and_steepness_are_rejected() {
        for (params, name) in [
            (ClientLevel::params().pivot(1.0), "pivot"),
            (ClientLevel::params().pivot(0.0), "pivot"),
            (ClientLevel::params().steepness(0.0), "steepness"),
            (ClientLevel::params().steepness(f64::INFINITY), "steepness"),
        ] {
            match params.build() {
                Err(Error::InvalidParameter { name: param, .. }) => assert_eq!(param, name),
                other => panic!("expected InvalidParameter, got {other:?}"),
            }
        }
    }
}
