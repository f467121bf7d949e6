//! [`Safeguards`]: what every level adds on top of its reference formula so
//! that a client cannot buy weight with silence, history or a new identity.
//!
//! The reference levels trust the evidence a client chooses to send: a client
//! that sends nothing is judged benign at three of the four levels, a client
//! with a good history keeps its weight in a round whose update the probe
//! calls malicious, and a never-seen identity starts fully trusted. The
//! safeguards close these gaps with one rule each, identical at every level:
//!
//! * **The verdict on the update caps the factor** ([`VerdictCap::Current`]).
//!   The server always scores the submitted update itself
//!   (`ClientEvidence::last_step_score` in the defended round). When that
//!   score is ≥ τ, the factor is at most the client level's raw factor for
//!   that score, `1 − t(s)`, in every round, whatever the client's history,
//!   freeze status or active phase. At the step level a round whose own
//!   steps are harmful is also capped by that round's benign share.
//! * **New identities are on probation** ([`Probation::Rounds`]). During its
//!   first `rounds` assessments a client's factor is at most `factor`, and a
//!   client the level never assessed while it was learning (a new id after
//!   the step and client levels froze) keeps the probation factor: changing
//!   identity never buys more than the probation weight.
//!
//! [`Safeguards::reference`] turns both off to reproduce the paper (and the
//! reference vectors in `fixtures/detect/`).

use serde::{Deserialize, Serialize};

use crate::detect::{ClientEvidence, DEFAULT_PIVOT, DEFAULT_STEEPNESS, Verdict, check_unit};
use crate::error::{Result, check_parameter};

/// Whether a Malicious verdict on this round's update bounds the factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictCap {
    /// The reference: the level's formula alone (running mean, Beta trust,
    /// frozen weight) decides, so history can outweigh a malicious update.
    Off,
    /// The factor of a round whose update scores ≥ τ is at most the client
    /// level's raw factor for that score. The default.
    #[default]
    Current,
}

/// How a level weighs an identity it has not seen before.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probation {
    /// The reference: a new identity gets the level's prior (1.0 at the
    /// client level, the Beta prior at the step level).
    Off,
    /// The factor is at most `factor` during a client's first `rounds`
    /// assessments, and is `factor` for a client the level never assessed
    /// while learning (after the step and client levels froze).
    Rounds {
        /// Assessments a new identity spends on probation (≥ 1).
        rounds: u32,
        /// The most a client on probation can weigh, in [0, 1].
        factor: f64,
    },
}

/// Default probation: three assessments (the evidence level's `evidence_min`)
/// at half weight.
pub const DEFAULT_PROBATION: Probation = Probation::Rounds {
    rounds: 3,
    factor: 0.5,
};

impl Default for Probation {
    fn default() -> Self {
        DEFAULT_PROBATION
    }
}

/// The protocol safeguards of one level: a Malicious verdict on the
/// server-scored update caps the factor at that score's raw factor in every
/// round ([`VerdictCap`]), and new identities are on probation
/// ([`Probation`]). Why, and what each closes: `docs/threat-model.md`,
/// "Protocol safeguards".
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`verdict_cap`](Self::verdict_cap) | [`VerdictCap::Current`] | [`VerdictCap::Off`] |
/// | [`probation`](Self::probation) | 3 assessments at ≤ 0.5 | [`Probation::Off`] |
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Safeguards {
    verdict_cap: VerdictCap,
    probation: Probation,
}

impl Safeguards {
    /// Every safeguard off: the paper's formulas alone. **Unsafe against
    /// lying, silent or churning clients**; for reproducing the paper only.
    pub fn reference() -> Self {
        Safeguards {
            verdict_cap: VerdictCap::Off,
            probation: Probation::Off,
        }
    }

    setters! {
        /// Sets the verdict cap.
        verdict_cap: VerdictCap;
        /// Sets the probation of new identities.
        probation: Probation;
    }

    /// The verdict cap.
    pub fn cap(&self) -> VerdictCap {
        self.verdict_cap
    }

    /// The probation policy.
    pub fn probation_policy(&self) -> Probation {
        self.probation
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        if let Probation::Rounds { rounds, factor } = self.probation {
            check_unit("safeguards", "probation factor", factor)?;
            let expected = "an integer ≥ 1 (use Probation::Off for none)";
            check_parameter(
                rounds >= 1,
                "safeguards",
                "probation rounds",
                rounds,
                expected,
            )?;
        }
        Ok(())
    }

    /// Applies both safeguards to a level's raw factor (before `min_weight`).
    ///
    /// The update is malicious when its score is ≥ the evidence's τ.
    /// `assessed` is how many times the level has assessed the client,
    /// this round included; `raw` maps an update score to the client level's
    /// raw factor. Returns the capped factor, the verdict (Malicious when the
    /// update scored ≥ τ) and a note for the reason ("" when nothing capped).
    pub(crate) fn apply(
        &self,
        factor: f64,
        verdict: Verdict,
        evidence: &ClientEvidence,
        assessed: u64,
        raw: impl Fn(f64) -> f64,
    ) -> (f64, Verdict, String) {
        let (mut factor, mut verdict, mut note) = (factor, verdict, String::new());
        let threshold = evidence.threshold;
        if let (VerdictCap::Current, Some(s)) = (self.verdict_cap, evidence.last_step_score) {
            let s = f64::from(s);
            if evidence.is_harmful(s) {
                let cap = raw(s);
                verdict = Verdict::Malicious;
                if factor > cap {
                    factor = cap;
                    note.push_str(&format!(
                        "; update scored {s:.6} ≥ τ = {threshold}: capped at its raw factor {cap:.6}"
                    ));
                }
            }
        }
        if let Probation::Rounds { rounds, factor: p } = self.probation
            && assessed <= u64::from(rounds)
            && factor > p
        {
            factor = p;
            note.push_str(&format!(
                "; probation (assessment {assessed} of {rounds}): capped at {p}"
            ));
        }
        (factor, verdict, note)
    }
}

/// The client level's raw factor `1 − t(s)` for a score clamped to [0, 1],
/// with slope `k` and pivot `p` (see
/// [`ClientLevelParams::raw_factor`](super::ClientLevelParams::raw_factor)).
pub(crate) fn raw_factor(score: f64, k: f64, p: f64) -> f64 {
    let s = score.clamp(0.0, 1.0);
    let t = if s <= p {
        0.5 * sigmoid(k * (s / p - 0.5))
    } else {
        0.5 + 0.5 * sigmoid(k * ((s - p) / (1.0 - p) - 0.5))
    };
    1.0 - t
}

/// The raw factor with the reference curve (k = 10, pivot 0.8): the cap the
/// levels without a curve of their own (step, shadow, evidence) apply.
pub(crate) fn reference_raw_factor(score: f64) -> f64 {
    raw_factor(score, DEFAULT_STEEPNESS, DEFAULT_PIVOT)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_bounds_a_malicious_update_and_marks_it() {
        let e = ClientEvidence::new(1).with_last_step_score(Some(1.0));
        let g = Safeguards::default().probation(Probation::Off);
        let (f, v, note) = g.apply(0.9, Verdict::Benign, &e, 50, reference_raw_factor);
        assert!((f - reference_raw_factor(1.0)).abs() < 1e-15);
        assert_eq!(v, Verdict::Malicious);
        assert!(note.contains("capped"), "{note}");
        let (f, v, _) =
            Safeguards::reference().apply(0.9, Verdict::Benign, &e, 50, reference_raw_factor);
        assert_eq!((f, v), (0.9, Verdict::Benign));
    }

    #[test]
    fn probation_caps_only_the_first_rounds() {
        let e = ClientEvidence::new(1).with_last_step_score(Some(0.1));
        let g = Safeguards::default();
        for (assessed, want) in [(1, 0.5), (3, 0.5), (4, 0.9)] {
            let (f, ..) = g.apply(0.9, Verdict::Benign, &e, assessed, reference_raw_factor);
            assert_eq!(f, want, "assessment {assessed}");
        }
    }

    #[test]
    fn invalid_probation_is_rejected() {
        for p in [
            Probation::Rounds {
                rounds: 0,
                factor: 0.5,
            },
            Probation::Rounds {
                rounds: 2,
                factor: 1.5,
            },
        ] {
            assert!(Safeguards::default().probation(p).check().is_err(), "{p:?}");
        }
    }
}
