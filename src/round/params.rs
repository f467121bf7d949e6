//! [`RoundParams`]: the defended round's settings besides its probe,
//! detector and aggregator.

use serde::{Deserialize, Serialize};

use crate::aggregate::SafetyGate;
use crate::error::{Error, Result};
use crate::round::admission::Admission;
use crate::round::trail::TrailCheck;

/// Settings of the defended round.
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`gate`](Self::gate) | [`SafetyGate::default`] (0.2) | `prefilter_skip_avg_weight` |
/// | [`trail`](Self::trail) | [`TrailCheck::Exact`] | (none: the reference trusts its own files) |
/// | [`admission`](Self::admission) | [`Admission::default`] (fails closed) | [`Admission::reference`] |
/// | [`accept_self_reported`](Self::accept_self_reported) | `false` | (the reference's clients compute nothing) |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundParams {
    pub(super) gate: SafetyGate,
    pub(super) trail: TrailCheck,
    pub(super) admission: Admission,
    #[serde(default)]
    pub(super) accept_self_reported: bool,
}

impl Default for RoundParams {
    fn default() -> Self {
        RoundParams {
            gate: SafetyGate::default(),
            trail: TrailCheck::Exact,
            admission: Admission::default(),
            accept_self_reported: false,
        }
    }
}

impl RoundParams {
    /// The safety gate: skip the round (global adapter unchanged) when the
    /// mean factor over the round's clients is *below* its threshold.
    pub fn gate(mut self, gate: SafetyGate) -> Self {
        self.gate = gate;
        self
    }

    /// How the last reported main-branch step is compared with the update.
    pub fn trail(mut self, check: TrailCheck) -> Self {
        self.trail = check;
        self
    }

    /// Whether client-computed scores ([`StepsReport::Scores`](crate::round::StepsReport::Scores)) are read.
    /// Default `false`: such a report is rejected
    /// ([`Rejection::InvalidEvidence`](crate::round::Rejection::InvalidEvidence)), because a client that scores itself
    /// can claim anything. Enable for simulations or trusted client code;
    /// the audit then marks them [`Provenance::SelfReported`](crate::round::Provenance::SelfReported).
    pub fn accept_self_reported(mut self, accept: bool) -> Self {
        self.accept_self_reported = accept;
        self
    }

    /// The admission policy.
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// The settings the reference implementation uses: its gate, no trail
    /// check, [`Admission::reference`]. **Unsafe against lying clients.**
    pub fn reference() -> Self {
        RoundParams {
            gate: SafetyGate::default(),
            trail: TrailCheck::Off,
            admission: Admission::reference(),
            accept_self_reported: true,
        }
    }

    /// The safety gate.
    pub fn safety_gate(&self) -> SafetyGate {
        self.gate
    }

    /// The admission policy.
    pub fn admission_policy(&self) -> &Admission {
        &self.admission
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        if let TrailCheck::MaxAbs(t) = self.trail
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(Error::InvalidParameter {
                component: "defended round",
                name: "trail",
                value: t.to_string(),
                expected: "a finite tolerance ≥ 0",
            });
        }
        self.admission.check()
    }
}
