//! Step-level: a Beta trust over the harmful share of every local step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detect::{
    Assessment, BranchCounts, ClientEvidence, ClientId, DEFAULT_ACTIVE_ROUNDS, DEFAULT_BATCH_SIZE,
    DEFAULT_DECAY, DEFAULT_GRAD_ACCUM, DefenseLevel, Detector, MissingEvidence, SampleCounting,
    Verdict, apply_min_weight, branch_counts, check_positive_int, check_state, check_unit,
    invalid_param,
};
use crate::error::{Error, Result};

/// Unchecked step-level settings; [`StepLevelParams::build`] validates them.
///
/// | setting | default | reference name |
/// |---|---|---|
/// | [`decay`](Self::decay) γ | 0.95 | `time_decay_factor` |
/// | [`batch_size`](Self::batch_size) | 16 | `batch_size` |
/// | [`grad_accum`](Self::grad_accum) | 1 | `gradient_accumulation_steps` |
/// | [`active_rounds`](Self::active_rounds) R | `Some(20)` | `prefilter_round` |
/// | [`min_weight`](Self::min_weight) | 0.0 | `prefilter_min_weight` |
/// | [`prior`](Self::prior) (α₀, β₀) | (1, 1) | initial `alpha_beta` |
/// | [`missing_steps`](Self::missing_steps) | [`MissingEvidence::Benign`] | (no harmful step recorded) |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepLevelParams {
    decay: f64,
    batch_size: u64,
    grad_accum: u64,
    active_rounds: Option<u32>,
    min_weight: f64,
    prior: (f64, f64),
    missing_steps: MissingEvidence,
    #[serde(default)]
    counting: SampleCounting,
}

impl Default for StepLevelParams {
    fn default() -> Self {
        StepLevelParams {
            decay: DEFAULT_DECAY,
            batch_size: DEFAULT_BATCH_SIZE,
            grad_accum: DEFAULT_GRAD_ACCUM,
            active_rounds: Some(DEFAULT_ACTIVE_ROUNDS),
            min_weight: 0.0,
            prior: (1.0, 1.0),
            missing_steps: MissingEvidence::Benign,
            counting: SampleCounting::Steps,
        }
    }
}

impl StepLevelParams {
    /// Decay γ ∈ [0, 1] applied to (α, β) before each round's counts are
    /// added: older rounds weigh γ, γ², … so a client that turns malicious
    /// loses trust within a few rounds.
    pub fn decay(mut self, decay: f64) -> Self {
        self.decay = decay;
        self
    }

    /// Per-device batch size (≥ 1): each harmful step stands for
    /// `batch_size × grad_accum` harmful samples.
    pub fn batch_size(mut self, batch_size: u64) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Gradient-accumulation steps (≥ 1).
    pub fn grad_accum(mut self, grad_accum: u64) -> Self {
        self.grad_accum = grad_accum;
        self
    }

    /// Rounds 0..R update the trust; from round R on every client keeps its
    /// last factor (a client never assessed gets the prior's α₀/(α₀+β₀)).
    /// `None` updates every round.
    pub fn active_rounds(mut self, rounds: Option<u32>) -> Self {
        self.active_rounds = rounds;
        self
    }

    /// Lower bound ∈ [0, 1] of every factor.
    pub fn min_weight(mut self, min_weight: f64) -> Self {
        self.min_weight = min_weight;
        self
    }

    /// Initial Beta parameters (α₀, β₀), both finite and ≥ 0.
    pub fn prior(mut self, alpha: f64, beta: f64) -> Self {
        self.prior = (alpha, beta);
        self
    }

    /// How a client that reports samples but no step scores is counted.
    /// Default [`MissingEvidence::Benign`] (the reference: no harmful step was
    /// recorded, so zero harmful samples).
    pub fn missing_steps(mut self, policy: MissingEvidence) -> Self {
        self.missing_steps = policy;
        self
    }

    /// How harmful and benign samples are counted. Default
    /// [`SampleCounting::Steps`] (no declared count can dilute a verdict);
    /// [`SampleCounting::Reference`] reproduces the paper.
    pub fn counting(mut self, counting: SampleCounting) -> Self {
        self.counting = counting;
        self
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        check_unit("step level", "decay", self.decay)?;
        check_positive_int("step level", "batch_size", self.batch_size)?;
        check_positive_int("step level", "grad_accum", self.grad_accum)?;
        check_unit("step level", "min_weight", self.min_weight)?;
        let (a, b) = self.prior;
        if !(a.is_finite() && b.is_finite() && a >= 0.0 && b >= 0.0) {
            return Err(invalid_param(
                "step level",
                "prior",
                format!("({a}, {b})"),
                "two finite numbers ≥ 0",
            ));
        }
        Ok(())
    }

    /// Validates the settings and builds a detector with no client state.
    pub fn build(self) -> Result<StepLevel> {
        self.check()?;
        Ok(StepLevel {
            params: self,
            clients: BTreeMap::new(),
        })
    }

    fn samples_per_step(&self) -> u64 {
        self.batch_size.saturating_mul(self.grad_accum)
    }

    fn is_active(&self, round: u32) -> bool {
        self.active_rounds.is_none_or(|r| round < r)
    }
}

/// One client's Beta trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepClientState {
    /// Decayed benign-sample count α.
    pub alpha: f64,
    /// Decayed harmful-sample count β.
    pub beta: f64,
    /// The factor of the client's last active round (after `min_weight`),
    /// kept for the frozen phase.
    pub last_factor: Option<f64>,
}

/// **Step-level** detection: the probe scores the ΔLoRA after *every* local
/// step; harmful samples = harmful steps × batch × grad-accum (capped at the
/// client's samples), benign = the rest, and a per-client Beta trust
/// α ← γα + benign, β ← γβ + harmful gives w = α / (α + β)
/// (w = 1 when α + β = 0, as in the reference).
///
/// **When to use:** the finest-grained signal; a client that mixes a few
/// harmful batches into benign training loses weight in proportion. **Cost:**
/// one probe evaluation per local step (cheap, a dot product) but the server
/// must see every step's adapter (or trust client-computed scores).
/// **Threat model:** intermediate steps are self-reported; only the last one
/// can be checked against the submitted update (the [`trail`](crate::round::trail)
/// check). A client can fabricate benign-looking intermediate steps as long
/// as the final update scores benign too — and the last step is what the
/// probe sees at client level anyway.
///
/// Only the first R rounds update (reference `prefilter_round`); afterwards
/// factors are frozen.
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, StepLevel, Verdict};
///
/// let mut d = StepLevel::params().active_rounds(Some(1)).build()?;
/// let id = ClientId::from(3u32);
/// let benign = ClientEvidence::new(32).with_steps(vec![0.1, 0.2]);
/// let first = d.assess(0, &id, &benign)?;
/// assert!((first.factor - 32.95 / 33.9).abs() < 1e-12);
/// // Round 1 ≥ R: frozen, even on harmful evidence.
/// let harmful = ClientEvidence::new(32).with_steps(vec![0.9, 0.9]);
/// let frozen = d.assess(1, &id, &harmful)?;
/// assert_eq!(frozen.factor, first.factor);
/// assert_eq!(frozen.verdict, Verdict::Undecided);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StepLevelRepr")]
pub struct StepLevel {
    params: StepLevelParams,
    clients: BTreeMap<ClientId, StepClientState>,
}

#[derive(Deserialize)]
struct StepLevelRepr {
    params: StepLevelParams,
    clients: BTreeMap<ClientId, StepClientState>,
}

impl TryFrom<StepLevelRepr> for StepLevel {
    type Error = Error;

    fn try_from(repr: StepLevelRepr) -> Result<Self> {
        repr.params.check()?;
        for state in repr.clients.values() {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            check_state("Beta α", ok(state.alpha), state.alpha)?;
            check_state("Beta β", ok(state.beta), state.beta)?;
            if let Some(f) = state.last_factor {
                check_state("factor", (0.0..=1.0).contains(&f), f)?;
            }
        }
        Ok(StepLevel {
            params: repr.params,
            clients: repr.clients,
        })
    }
}

impl StepLevel {
    /// Settings with the reference defaults, to adjust and [`build`](StepLevelParams::build).
    pub fn params() -> StepLevelParams {
        StepLevelParams::default()
    }

    /// The validated settings.
    pub fn settings(&self) -> &StepLevelParams {
        &self.params
    }

    /// A client's trust state, if it was ever assessed in an active round.
    pub fn client_state(&self, client: &ClientId) -> Option<&StepClientState> {
        self.clients.get(client)
    }

    fn prior_trust(&self) -> f64 {
        let (a, b) = self.params.prior;
        trust(a, b)
    }

    fn frozen(&self, round: u32, client: &ClientId) -> Assessment {
        let p = &self.params;
        let (factor, source) = match self.clients.get(client) {
            Some(StepClientState {
                last_factor: Some(f),
                ..
            }) => (*f, "its last factor"),
            Some(s) => (trust(s.alpha, s.beta), "its current trust"),
            None => (self.prior_trust(), "the prior trust (never assessed)"),
        };
        let reason = format!(
            "step-level frozen from round {} on (round {round}): keeps {source} {factor:.6}",
            // Not active means active_rounds is Some(r) with round ≥ r.
            p.active_rounds.unwrap_or_default()
        );
        Assessment::new(factor, p.min_weight, Verdict::Undecided, reason)
    }
}

fn trust(alpha: f64, beta: f64) -> f64 {
    let total = alpha + beta;
    if total > 0.0 { alpha / total } else { 1.0 }
}

impl Detector for StepLevel {
    fn level(&self) -> DefenseLevel {
        DefenseLevel::Step
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        evidence.validate(round, client)?;
        if !self.params.is_active(round) {
            return Ok(self.frozen(round, client));
        }
        let p = &self.params;
        let samples = evidence.samples;
        let counts = branch_counts(
            p.counting,
            &evidence.step_scores,
            evidence.threshold,
            p.samples_per_step(),
            samples,
            p.missing_steps,
        );
        let BranchCounts {
            harmful_steps,
            harmful,
            benign,
            missing,
        } = counts;
        let (a0, b0) = p.prior;
        let state = self
            .clients
            .entry(client.clone())
            .or_insert(StepClientState {
                alpha: a0,
                beta: b0,
                last_factor: None,
            });
        state.alpha = state.alpha * p.decay + benign as f64;
        state.beta = state.beta * p.decay + harmful as f64;
        let factor = apply_min_weight(trust(state.alpha, state.beta), p.min_weight);
        state.last_factor = Some(factor);
        let verdict = match (missing, harmful) {
            (true, 0) => Verdict::Undecided,
            (_, 0) => Verdict::Benign,
            _ => Verdict::Malicious,
        };
        let reason = if missing {
            format!(
                "no step scores for {samples} samples, counted as {:?} per policy; \
                 Beta trust α={:.4} β={:.4}",
                p.missing_steps, state.alpha, state.beta
            )
        } else {
            format!(
                "{harmful_steps}/{} steps scored ≥ {}: {harmful} harmful, {benign} benign samples \
                 ({:?} counting); Beta trust α={:.4} β={:.4}",
                evidence.step_scores.len(),
                evidence.threshold,
                p.counting,
                state.alpha,
                state.beta
            )
        };
        Ok(Assessment::new(factor, p.min_weight, verdict, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::from(s)
    }

    #[test]
    fn defaults_are_the_reference_values() {
        let p = StepLevelParams::default();
        assert_eq!(p.decay, 0.95);
        assert_eq!(p.samples_per_step(), 16);
        assert_eq!(p.active_rounds, Some(20));
        assert_eq!(p.min_weight, 0.0);
        assert_eq!(p.prior, (1.0, 1.0));
    }

    #[test]
    fn never_seen_client_in_frozen_phase_gets_the_prior() {
        let mut d = StepLevel::params().active_rounds(Some(0)).build().unwrap();
        let a = d
            .assess(0, &id("x"), &ClientEvidence::new(10).with_steps(vec![0.9]))
            .unwrap();
        assert_eq!(a.factor, 0.5);
        assert!(d.client_state(&id("x")).is_none());
    }

    #[test]
    fn missing_steps_policy_changes_the_count() {
        let e = ClientEvidence::new(32);
        let mut reference = StepLevel::params()
            .counting(SampleCounting::Reference)
            .build()
            .unwrap();
        let a = reference.assess(0, &id("a"), &e).unwrap();
        assert!((a.factor - 32.95 / 33.9).abs() < 1e-12);
        assert_eq!(a.verdict, Verdict::Undecided);
        let mut safer = StepLevel::params()
            .counting(SampleCounting::Reference)
            .missing_steps(MissingEvidence::Malicious)
            .build()
            .unwrap();
        let b = safer.assess(0, &id("a"), &e).unwrap();
        assert!((b.factor - 0.95 / 33.9).abs() < 1e-12);
        assert_eq!(b.verdict, Verdict::Malicious);
        // Counting from steps, a missing trail is worth one step (16 samples).
        let mut steps = StepLevel::params()
            .missing_steps(MissingEvidence::Malicious)
            .build()
            .unwrap();
        let c = steps.assess(0, &id("a"), &e).unwrap();
        assert!((c.factor - 0.95 / 17.9).abs() < 1e-12, "{}", c.factor);
    }

    #[test]
    fn a_huge_declared_count_cannot_dilute_harmful_steps() {
        let e = ClientEvidence::new(1_000_000_000).with_steps(vec![0.99; 10]);
        let mut safe = StepLevel::params().build().unwrap();
        let a = safe.assess(0, &id("liar"), &e).unwrap();
        // β = 0.95 + 160, α = 0.95: factor ≈ 0.006.
        assert!((a.factor - 0.95 / 161.9).abs() < 1e-12, "{}", a.factor);
        let mut reference = StepLevel::params()
            .counting(SampleCounting::Reference)
            .build()
            .unwrap();
        let b = reference.assess(0, &id("liar"), &e).unwrap();
        assert!(b.factor > 0.9999, "the reference is diluted: {}", b.factor);
    }

    #[test]
    fn min_weight_bounds_the_factor_below() {
        let mut d = StepLevel::params().min_weight(0.3).build().unwrap();
        let e = ClientEvidence::new(160).with_steps(vec![0.99; 10]);
        let a = d.assess(0, &id("m"), &e).unwrap();
        assert_eq!(a.factor, 0.3);
    }

    #[test]
    fn invalid_settings_are_rejected_by_name() {
        let cases = [
            (StepLevel::params().decay(1.5), "decay"),
            (StepLevel::params().decay(f64::NAN), "decay"),
            (StepLevel::params().batch_size(0), "batch_size"),
            (StepLevel::params().grad_accum(0), "grad_accum"),
            (StepLevel::params().min_weight(2.0), "min_weight"),
            (StepLevel::params().prior(-1.0, 1.0), "prior"),
        ];
        for (params, name) in cases {
            match params.build() {
                Err(Error::InvalidParameter { name: param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: expected InvalidParameter, got {other:?}"),
            }
        }
    }

    #[test]
    fn corrupt_checkpoint_is_rejected() {
        let mut d = StepLevel::params().build().unwrap();
        d.assess(0, &id("a"), &ClientEvidence::new(16).with_steps(vec![0.1]))
            .unwrap();
        let json = serde_json::to_string(&d).unwrap();
        let bad = json.replace("\"alpha\":", "\"alpha\":-");
        assert!(serde_json::from_str::<StepLevel>(&bad).is_err());
        let back: StepLevel = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
    }
}
