//! Step-level: a Beta trust over the harmful share of every local step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detect::{
    Assessment, BranchCounts, ClientEvidence, ClientId, DEFAULT_ACTIVE_ROUNDS, DEFAULT_BATCH_SIZE,
    DEFAULT_DECAY, DEFAULT_GRAD_ACCUM, DefenseLevel, Detector, LevelRepr, MissingEvidence,
    Safeguards, SampleCounting, Verdict, apply_min_weight, branch_counts, check_positive_int,
    check_state, check_unit, safeguard,
};
use crate::error::{Error, Result, check_parameter};

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
/// | [`missing_steps`](Self::missing_steps) | [`MissingEvidence::FromUpdate`] | [`MissingEvidence::Benign`] (no harmful step recorded) |
/// | [`counting`](Self::counting) | [`SampleCounting::Steps`] | [`SampleCounting::Reference`] |
/// | [`safeguards`](Self::safeguards) | [`Safeguards::default`] | [`Safeguards::reference`] |
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
    #[serde(default)]
    safeguards: Safeguards,
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
            missing_steps: MissingEvidence::FromUpdate,
            counting: SampleCounting::Steps,
            safeguards: Safeguards::default(),
        }
    }
}

impl StepLevelParams {
    setters! {
        /// Decay γ ∈ [0, 1] applied to (α, β) before each round's counts are
        /// added: older rounds weigh γ, γ², … so a client that turns malicious
        /// loses trust within a few rounds.
        decay: f64;
        /// Per-device batch size (≥ 1): each harmful step stands for
        /// `batch_size × grad_accum` harmful samples.
        batch_size: u64;
        /// Gradient-accumulation steps (≥ 1).
        grad_accum: u64;
        /// Rounds 0..R update the trust; from round R on every client keeps its
        /// last factor (a client never assessed gets the prior's α₀/(α₀+β₀)).
        /// `None` updates every round.
        active_rounds: Option<u32>;
        /// Lower bound ∈ [0, 1] of every factor.
        min_weight: f64;
        /// How a client that reports no step (or no step that moved) is
        /// counted. Default [`MissingEvidence::FromUpdate`]: as one step scored
        /// like the update the server scored itself. [`MissingEvidence::Benign`]
        /// is the reference (no harmful step was recorded, so zero harmful
        /// samples: silence pays).
        missing_steps: MissingEvidence;
        /// How harmful and benign samples are counted. Default
        /// [`SampleCounting::Steps`] (no declared count can dilute a verdict);
        /// [`SampleCounting::Reference`] reproduces the paper.
        counting: SampleCounting;
        /// The protocol safeguards: a round whose update scores ≥ τ, or whose
        /// own steps are harmful, is capped at that round's raw factor, whatever
        /// the Beta trust (also after the level froze); a new identity is on
        /// probation. [`Safeguards::reference`] reproduces the paper.
        safeguards: Safeguards;
    }

    /// Initial Beta parameters (α₀, β₀), both finite and ≥ 0.
    pub fn prior(mut self, alpha: f64, beta: f64) -> Self {
        self.prior = (alpha, beta);
        self
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        const LEVEL: &str = "step level";
        self.safeguards.check()?;
        check_unit(LEVEL, "decay", self.decay)?;
        check_positive_int(LEVEL, "batch_size", self.batch_size)?;
        check_positive_int(LEVEL, "grad_accum", self.grad_accum)?;
        check_unit(LEVEL, "min_weight", self.min_weight)?;
        let (a, b) = self.prior;
        let ok = a.is_finite() && b.is_finite() && a >= 0.0 && b >= 0.0;
        check_parameter(
            ok,
            LEVEL,
            "prior",
            format!("({a}, {b})"),
            "two finite numbers ≥ 0",
        )
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
    /// Active rounds the client was assessed in (probation counts these).
    #[serde(default)]
    pub rounds: u64,
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
/// factors are frozen, except that the [`Safeguards`] still cap a round whose
/// update the server scores malicious.
///
/// With a trail of step adapters the server also knows how far each step
/// moved (`ClientEvidence::step_distances`): steps weigh by that distance, so
/// repeating an adapter (a step that does not move) adds nothing.
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, Safeguards, StepLevel, Verdict};
///
/// let mut d = StepLevel::params()
///     .active_rounds(Some(1))
///     .safeguards(Safeguards::reference())
///     .build()?;
/// let id = ClientId::from(3u32);
/// let benign = ClientEvidence::new(32).with_steps(vec![0.1, 0.2]);
/// let first = d.assess(0, &id, &benign)?;
/// assert!((first.factor - 32.95 / 33.9).abs() < 1e-12);
/// // Round 1 ≥ R: frozen, even on harmful evidence.
/// let harmful = ClientEvidence::new(32).with_steps(vec![0.9, 0.9]);
/// let frozen = d.assess(1, &id, &harmful)?;
/// assert_eq!(frozen.factor, first.factor);
/// assert_eq!(frozen.verdict, Verdict::Undecided);
///
/// // With the default safeguards, the harmful last step (0.9) caps the frozen
/// // factor at the client level's raw factor for 0.9: 1 − (0.5 + 0.5·σ(0)) = 0.25.
/// let mut guarded = StepLevel::params().active_rounds(Some(1)).build()?;
/// guarded.assess(0, &id, &benign)?;
/// let capped = guarded.assess(1, &id, &harmful)?;
/// assert_eq!(capped.verdict, Verdict::Malicious);
/// assert!((capped.factor - 0.25).abs() < 1e-5);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LevelRepr<StepLevelParams, StepClientState>")]
pub struct StepLevel {
    params: StepLevelParams,
    clients: BTreeMap<ClientId, StepClientState>,
}

impl TryFrom<LevelRepr<StepLevelParams, StepClientState>> for StepLevel {
    type Error = Error;

    fn try_from(repr: LevelRepr<StepLevelParams, StepClientState>) -> Result<Self> {
        let (params, clients) = repr.checked(StepLevelParams::check, |_, state| {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            check_state("Beta α", ok(state.alpha), state.alpha)?;
            check_state("Beta β", ok(state.beta), state.beta)?;
            match state.last_factor {
                Some(f) => check_state("factor", (0.0..=1.0).contains(&f), f),
                None => Ok(()),
            }
        })?;
        Ok(StepLevel { params, clients })
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

    fn frozen(&self, round: u32, client: &ClientId, evidence: &ClientEvidence) -> Assessment {
        let p = &self.params;
        let state = self.clients.get(client);
        let (factor, source) = match state {
            Some(StepClientState {
                last_factor: Some(f),
                ..
            }) => (*f, "its last factor"),
            Some(s) => (trust(s.alpha, s.beta), "its current trust"),
            None => (self.prior_trust(), "the prior trust (never assessed)"),
        };
        let learned = state.map_or(0, |s| s.rounds);
        let (factor, verdict, capped) = p.safeguards.apply(
            factor,
            Verdict::Undecided,
            evidence,
            learned,
            safeguard::reference_raw_factor,
        );
        let reason = format!(
            "step-level frozen from round {} on (round {round}): keeps {source} {factor:.6}{capped}",
            // Not active means active_rounds is Some(r) with round ≥ r.
            p.active_rounds.unwrap_or_default()
        );
        Assessment::new(factor, p.min_weight, verdict, reason)
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
            return Ok(self.frozen(round, client, evidence));
        }
        let p = &self.params;
        let samples = evidence.samples;
        let counts = branch_counts(
            p.counting,
            evidence.main_branch(),
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
                rounds: 0,
            });
        state.alpha = state.alpha * p.decay + benign;
        state.beta = state.beta * p.decay + harmful;
        state.rounds = state.rounds.saturating_add(1);
        let verdict = match (missing, harmful > 0.0) {
            (true, false) => Verdict::Undecided,
            (_, false) => Verdict::Benign,
            _ => Verdict::Malicious,
        };
        let mut factor = trust(state.alpha, state.beta);
        // This round's own raw factor: its benign share. A malicious round is
        // bounded by it, not only by the trust history built before it.
        let round_share = 1.0 - counts.ratio();
        if p.safeguards.cap() == super::VerdictCap::Current && verdict == Verdict::Malicious {
            factor = factor.min(round_share);
        }
        let (factor, verdict, capped) = p.safeguards.apply(
            factor,
            verdict,
            evidence,
            state.rounds,
            safeguard::reference_raw_factor,
        );
        let factor = apply_min_weight(factor, p.min_weight);
        state.last_factor = Some(factor);
        let reason = if missing {
            format!(
                "no step scores (or no step that moved) for {samples} samples, counted as {:?} \
                 per policy; Beta trust α={:.4} β={:.4}{capped}",
                p.missing_steps, state.alpha, state.beta
            )
        } else {
            format!(
                "{harmful_steps}/{} steps scored ≥ {}: {harmful:.3} harmful, {benign:.3} benign \
                 samples ({:?} counting, round share {round_share:.6}); Beta trust α={:.4} \
                 β={:.4}{capped}",
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
        let e = ClientEvidence::new(10).with_steps(vec![0.9]);
        let mut d = StepLevel::params()
            .active_rounds(Some(0))
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let a = d.assess(0, &id("x"), &e).unwrap();
        assert_eq!(a.factor, 0.5);
        assert!(d.client_state(&id("x")).is_none());
        // With the safeguards the malicious update caps the frozen prior.
        let mut safe = StepLevel::params().active_rounds(Some(0)).build().unwrap();
        let b = safe.assess(0, &id("x"), &e).unwrap();
        assert!((b.factor - safeguard::reference_raw_factor(0.9)).abs() < 1e-6);
        assert_eq!(b.verdict, Verdict::Malicious);
    }

    #[test]
    fn missing_steps_policy_changes_the_count() {
        let e = ClientEvidence::new(32);
        let reference_params = StepLevel::params()
            .counting(SampleCounting::Reference)
            .missing_steps(MissingEvidence::Benign)
            .safeguards(Safeguards::reference());
        let mut reference = reference_params.clone().build().unwrap();
        let a = reference.assess(0, &id("a"), &e).unwrap();
        assert!((a.factor - 32.95 / 33.9).abs() < 1e-12);
        assert_eq!(a.verdict, Verdict::Undecided);
        let mut safer = reference_params
            .missing_steps(MissingEvidence::Malicious)
            .build()
            .unwrap();
        let b = safer.assess(0, &id("a"), &e).unwrap();
        assert!((b.factor - 0.95 / 33.9).abs() < 1e-12);
        assert_eq!(b.verdict, Verdict::Malicious);
        // Counting from steps, a missing trail is worth one step (16 samples).
        let mut steps = StepLevel::params()
            .missing_steps(MissingEvidence::Malicious)
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let c = steps.assess(0, &id("a"), &e).unwrap();
        assert!((c.factor - 0.95 / 17.9).abs() < 1e-12, "{}", c.factor);
        // The default judges silence on the server-scored update.
        let mut default = StepLevel::params()
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let benign = e.clone().with_last_step_score(Some(0.1));
        let d = default.assess(0, &id("b"), &benign).unwrap();
        assert!((d.factor - 16.95 / 17.9).abs() < 1e-12, "{}", d.factor);
        let harmful = e.with_last_step_score(Some(0.9));
        let h = default.assess(0, &id("h"), &harmful).unwrap();
        assert!((h.factor - 0.95 / 17.9).abs() < 1e-12, "{}", h.factor);
        assert_eq!(h.verdict, Verdict::Malicious);
    }

    #[test]
    fn a_huge_declared_count_cannot_dilute_harmful_steps() {
        let e = ClientEvidence::new(1_000_000_000).with_steps(vec![0.99; 10]);
        let unguarded = StepLevel::params().safeguards(Safeguards::reference());
        let mut safe = unguarded.clone().build().unwrap();
        let a = safe.assess(0, &id("liar"), &e).unwrap();
        // β = 0.95 + 160, α = 0.95: factor ≈ 0.006.
        assert!((a.factor - 0.95 / 161.9).abs() < 1e-12, "{}", a.factor);
        // Every step harmful: this round's benign share, 0, caps the factor.
        let mut guarded = StepLevel::params().build().unwrap();
        assert_eq!(guarded.assess(0, &id("liar"), &e).unwrap().factor, 0.0);
        let mut reference = unguarded
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
