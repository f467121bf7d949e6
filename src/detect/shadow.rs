//! Shadow-level: `(1 − r)^η` over the steps of a shadow branch trained from a
//! fixed base.

use serde::{Deserialize, Serialize};

use crate::detect::{
    Assessment, ClientEvidence, ClientId, DEFAULT_BATCH_SIZE, DEFAULT_ETA, DEFAULT_GRAD_ACCUM,
    DefenseLevel, Detector, MissingEvidence, Opening, Safeguards, SampleCounting, Verdict,
    branch_counts, check_positive_finite, check_positive_int, check_unit, safeguard,
};
use crate::error::{Error, Result};

/// Unchecked shadow-level settings; [`ShadowLevelParams::build`] validates them.
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`eta`](Self::eta) η | 7 | `(1.0 - r) ** 7` |
/// | [`batch_size`](Self::batch_size) | 16 | `batch_size` |
/// | [`grad_accum`](Self::grad_accum) | 1 | `gradient_accumulation_steps` |
/// | [`min_weight`](Self::min_weight) | 0.0 | `prefilter_min_weight` |
/// | [`missing_steps`](Self::missing_steps) | [`MissingEvidence::FromUpdate`] | [`MissingEvidence::Benign`]: no harmful step recorded → r = 0 |
/// | [`counting`](Self::counting) | [`SampleCounting::Steps`] | [`SampleCounting::Reference`] |
/// | [`safeguards`](Self::safeguards) | [`Safeguards::default`] (verdict cap) | [`Safeguards::reference`] |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShadowLevelParams {
    pub(crate) eta: f64,
    pub(crate) batch_size: u64,
    pub(crate) grad_accum: u64,
    pub(crate) min_weight: f64,
    pub(crate) missing_steps: MissingEvidence,
    #[serde(default)]
    pub(crate) counting: SampleCounting,
    #[serde(default)]
    pub(crate) safeguards: Safeguards,
}

impl Default for ShadowLevelParams {
    fn default() -> Self {
        ShadowLevelParams {
            eta: DEFAULT_ETA,
            batch_size: DEFAULT_BATCH_SIZE,
            grad_accum: DEFAULT_GRAD_ACCUM,
            min_weight: 0.0,
            missing_steps: MissingEvidence::FromUpdate,
            counting: SampleCounting::Steps,
            safeguards: Safeguards::default(),
        }
    }
}

impl ShadowLevelParams {
    setters! {
        /// Exponent η (> 0): a larger η punishes a small harmful share harder
        /// (η = 7 halves the weight at r ≈ 0.094).
        eta: f64;
        /// Per-device batch size (≥ 1).
        batch_size: u64;
        /// Gradient-accumulation steps (≥ 1).
        grad_accum: u64;
        /// Lower bound ∈ [0, 1] of every factor.
        min_weight: f64;
        /// How a client that reports no shadow step (or none that moved) counts.
        /// Default [`MissingEvidence::FromUpdate`]: r from the server's score of
        /// the update (r = 1 when it is harmful or unknown, else 0).
        /// [`MissingEvidence::Benign`] is the reference (r = 0, factor 1: silence
        /// pays); [`MissingEvidence::Malicious`] sets r = 1 (factor 0).
        missing_steps: MissingEvidence;
        /// How the harmful share r is counted. Default [`SampleCounting::Steps`]
        /// (r = harmful shadow steps / shadow steps: no declared count can
        /// dilute it); [`SampleCounting::Reference`] reproduces the paper.
        counting: SampleCounting;
        /// The protocol safeguards: a round whose update scores ≥ τ is capped
        /// at the client level's raw factor for that score, whatever the shadow
        /// branch says. The shadow level keeps no identities, so probation does
        /// not apply to it (a new id is judged exactly like an old one); inside
        /// the evidence level the evidence level's own safeguards are read.
        /// [`Safeguards::reference`] reproduces the paper.
        safeguards: Safeguards;
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        const LEVEL: &str = "shadow level";
        self.safeguards.check()?;
        check_positive_finite(LEVEL, "eta", self.eta)?;
        check_positive_int(LEVEL, "batch_size", self.batch_size)?;
        check_positive_int(LEVEL, "grad_accum", self.grad_accum)?;
        check_unit(LEVEL, "min_weight", self.min_weight)
    }

    /// Validates the settings and builds the detector.
    pub fn build(self) -> Result<ShadowLevel> {
        self.check()?;
        Ok(ShadowLevel { params: self })
    }

    /// The harmful share r of this round's shadow steps and whether the
    /// steps were missing.
    pub(crate) fn harmful_ratio(&self, evidence: &ClientEvidence) -> ShadowRatio {
        let per_step = self.batch_size.saturating_mul(self.grad_accum);
        let counts = branch_counts(
            self.counting,
            evidence.shadow_branch(),
            per_step,
            evidence.samples,
            self.missing_steps,
        );
        ShadowRatio {
            harmful_steps: counts.harmful_steps,
            harmful: counts.harmful,
            samples: counts.harmful + counts.benign,
            ratio: counts.ratio(),
            missing: counts.missing,
        }
    }

    /// `(1 − r)^η`.
    pub(crate) fn factor(&self, ratio: f64) -> f64 {
        (1.0 - ratio.clamp(0.0, 1.0)).powf(self.eta)
    }
}

/// The harmful share of one round's shadow steps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShadowRatio {
    pub(crate) harmful_steps: usize,
    pub(crate) harmful: f64,
    pub(crate) samples: f64,
    pub(crate) ratio: f64,
    pub(crate) missing: bool,
}

impl ShadowRatio {
    pub(crate) fn describe(&self, steps: usize, eta: f64, factor: f64) -> String {
        if self.missing {
            format!(
                "no shadow step scores for {} samples: r = {} ⇒ (1 − r)^{eta} = {factor:.6}",
                self.samples, self.ratio
            )
        } else {
            format!(
                "{}/{steps} shadow steps harmful: r = {:.3}/{:.3} = {:.6} ⇒ (1 − r)^{eta} = {factor:.6}",
                self.harmful_steps, self.harmful, self.samples, self.ratio
            )
        }
    }
}

/// **Shadow-level** detection: the probe was trained on deltas from the
/// *initial* adapter, and the global adapter drifts away from it over rounds,
/// so every client also trains a **shadow branch**: the same local steps on
/// the same data, from a fixed shadow base (the round-0 adapter) at a fixed
/// learning rate (5e-5; see [`ShadowBranch`](crate::round::ShadowBranch)). The probe
/// scores each shadow step's delta from the shadow base;
/// r = harmful samples / samples and w = (1 − r)^η (η = 7). Stateless: it runs
/// every round.
///
/// **When to use:** when the global model moves far from the probe's
/// training distribution (many rounds, large learning rates).
/// **Cost:** doubles each client's local compute (two training runs).
/// **Threat model:** the shadow branch is computed by the client, on data
/// the server never sees; the server can recompute the scores from shadow
/// adapters the client sends, but cannot verify they were trained on the
/// same data as the real update. It defends against clients that train
/// honestly on harmful data (the paper's threat), not against a client that
/// trains its shadow branch on benign data to launder a harmful update.
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, ShadowLevel};
///
/// let mut d = ShadowLevel::params().build()?;
/// // 4 steps × 16 samples, one harmful: r = 16/64 = 0.25, w = 0.75^7.
/// let e = ClientEvidence::new(64).with_shadow_steps(vec![0.1, 0.95, 0.2, 0.3]);
/// let a = d.assess(0, &ClientId::from("c"), &e)?;
/// assert!((a.factor - 0.75f64.powi(7)).abs() < 1e-12);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ShadowLevelRepr")]
pub struct ShadowLevel {
    params: ShadowLevelParams,
}

#[derive(Deserialize)]
struct ShadowLevelRepr {
    params: ShadowLevelParams,
}

impl TryFrom<ShadowLevelRepr> for ShadowLevel {
    type Error = Error;

    fn try_from(repr: ShadowLevelRepr) -> Result<Self> {
        repr.params.build()
    }
}

impl ShadowLevel {
    /// Settings with the reference defaults.
    pub fn params() -> ShadowLevelParams {
        ShadowLevelParams::default()
    }

    /// The validated settings.
    pub fn settings(&self) -> &ShadowLevelParams {
        &self.params
    }
}

impl Detector for ShadowLevel {
    fn level(&self) -> DefenseLevel {
        DefenseLevel::Shadow
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        evidence.validate(round, client)?;
        let p = &self.params;
        let mut ratio = p.harmful_ratio(evidence);
        if evidence.opening == Opening::Broken {
            ratio.ratio = 1.0;
            ratio.harmful = ratio.harmful.max(1.0);
        }
        let factor = p.factor(ratio.ratio);
        let verdict = match (ratio.missing, ratio.harmful > 0.0) {
            (true, false) => Verdict::Undecided,
            (_, false) => Verdict::Benign,
            _ => Verdict::Malicious,
        };
        let (capped_factor, verdict, capped) = p.safeguards.apply(
            factor,
            verdict,
            evidence,
            u64::MAX,
            safeguard::reference_raw_factor,
        );
        let mut reason = ratio.describe(evidence.shadow_scores.len(), p.eta, factor) + &capped;
        if evidence.opening == Opening::Broken {
            reason.insert_str(0, "shadow commitment broken, counted r = 1; ");
        }
        Ok(Assessment::new(
            capped_factor,
            p.min_weight,
            verdict,
            reason,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_declared_samples_cannot_hide_harmful_shadow_steps() {
        let e = ClientEvidence::new(0).with_shadow_steps(vec![0.99, 0.1]);
        let mut d = ShadowLevel::params().build().unwrap();
        let a = d.assess(0, &ClientId::from("c"), &e).unwrap();
        assert!((a.factor - 0.5f64.powi(7)).abs() < 1e-12, "{}", a.factor);
        assert_eq!(a.verdict, Verdict::Malicious);
        // The reference divides by the declared count: 0 samples, factor 1.
        let mut reference = ShadowLevel::params()
            .counting(SampleCounting::Reference)
            .build()
            .unwrap();
        assert_eq!(
            reference
                .assess(0, &ClientId::from("c"), &e)
                .unwrap()
                .factor,
            1.0
        );
    }

    #[test]
    fn a_huge_declared_count_cannot_dilute_the_shadow_share() {
        let e = ClientEvidence::new(u64::MAX).with_shadow_steps(vec![0.99; 4]);
        let mut d = ShadowLevel::params().build().unwrap();
        assert_eq!(d.assess(0, &ClientId::from("c"), &e).unwrap().factor, 0.0);
        let mut reference = ShadowLevel::params()
            .counting(SampleCounting::Reference)
            .build()
            .unwrap();
        assert!(
            reference
                .assess(0, &ClientId::from("c"), &e)
                .unwrap()
                .factor
                > 0.999
        );
    }

    #[test]
    fn missing_shadow_steps_follow_the_policy() {
        let e = ClientEvidence::new(16);
        let id = ClientId::from("c");
        let mut reference = ShadowLevel::params()
            .missing_steps(MissingEvidence::Benign)
            .build()
            .unwrap();
        assert_eq!(reference.assess(0, &id, &e).unwrap().factor, 1.0);
        // The default reads the server's score of the update instead.
        let mut default = ShadowLevel::params().build().unwrap();
        let harmful = e.clone().with_last_step_score(Some(0.9));
        let a = default.assess(0, &id, &harmful).unwrap();
        assert_eq!((a.factor, a.verdict), (0.0, Verdict::Malicious));
        let benign = e.clone().with_last_step_score(Some(0.1));
        assert_eq!(default.assess(0, &id, &benign).unwrap().factor, 1.0);
        let mut safer = ShadowLevel::params()
            .missing_steps(MissingEvidence::Malicious)
            .build()
            .unwrap();
        let a = safer.assess(0, &id, &e).unwrap();
        assert_eq!(a.factor, 0.0);
        assert_eq!(a.verdict, Verdict::Malicious);
    }

    #[test]
    fn eta_must_be_positive() {
        assert!(matches!(
            ShadowLevel::params().eta(0.0).build(),
            Err(Error::InvalidParameter { name: "eta", .. })
        ));
    }
}
