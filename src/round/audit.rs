//! The audit record of a defended round: one JSON line, typed reasons.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::ClientId;
use crate::aggregate::{ExclusionReason, SkipReason};
use crate::detect::{DefenseLevel, SourceAssessment, Verdict};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::round::admission::Admitted;
use crate::round::commit::CommitmentStatus;
use crate::round::trail::TrailStatus;

/// What happened to a report before aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Admitted, scored and assessed by the detector; handed to the aggregator.
    Assessed,
    /// The last reported step differs from the update: factor 0, not
    /// aggregated, detector state untouched.
    TrailMismatch,
    /// Rejected by admission or because its evidence could not be used:
    /// factor 0, not aggregated, detector state untouched.
    Rejected,
}

/// Where a piece of evidence came from, so an auditor knows what was proven.
///
/// "Verified" means one thing here: every score the detector read was
/// computed by the server from the submitted update itself. Anything else the
/// client sent is a claim, even when the server scored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// The level does not read this evidence, or the client sent none.
    Absent,
    /// Every score was computed by the server from the update itself: a
    /// one-step trail whose step equals the update.
    Verified,
    /// Scored by the server from step adapters the client sent, whose last
    /// step equals the update (checked); the steps before it are claims the
    /// server cannot check. They weigh by the distance they travelled
    /// ([`ClientOutcome::step_trail`]), so repeated adapters count for nothing.
    LastStepVerified,
    /// Scored by the server from adapters the client sent that cannot be
    /// verified (a trail whose end was not checked; any shadow branch: the
    /// client trains it alone).
    ServerScoredUnverified,
    /// Scores the client computed itself: nothing about them is proven.
    SelfReported,
}

/// One client's line in the round's audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientOutcome {
    /// The client.
    pub client: ClientId,
    /// The sample count it declared.
    pub declared_samples: u64,
    /// The sample count it aggregated with (after the admission policy; 0
    /// when rejected).
    pub samples: u64,
    /// What admission made of its message.
    pub admission: Admitted,
    /// Assessed, trail mismatch, or rejected.
    pub disposition: Disposition,
    /// Its security factor in [0, 1] (0 unless assessed).
    pub factor: f64,
    /// `samples × factor`: the effective sample count.
    pub effective_weight: f64,
    /// Its normalised weight in the aggregate, when it contributed.
    pub aggregation_weight: Option<f64>,
    /// The detector's verdict ([`Verdict::Malicious`] for a failed trail
    /// check, [`Verdict::Undecided`] for a rejected report).
    pub verdict: Verdict,
    /// The detector's explanation (the numbers behind the factor), or what
    /// made the evidence unusable.
    pub detail: String,
    /// Each source's factor, verdict and reason, for a layered detector
    /// ([`Layered`](crate::detect::Layered)); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceAssessment>,
    /// The probe's score of `update − global` (the last step), when computed.
    /// Always server-computed.
    pub update_score: Option<f32>,
    /// The trail check's result.
    pub trail: TrailStatus,
    /// Provenance of the main-branch step scores the detector read.
    pub step_evidence: Provenance,
    /// Provenance of the shadow-branch scores the detector read.
    pub shadow_evidence: Provenance,
    /// The main-branch step trail the server measured (step adapters only).
    #[serde(default)]
    pub step_trail: Option<TrailSummary>,
    /// What became of its shadow commitment (commit–reveal audits only).
    #[serde(default)]
    pub shadow_commitment: Option<CommitmentStatus>,
    /// Why the aggregator left the client out, if it did.
    pub excluded: Option<ExclusionReason>,
}

/// How far a reported step trail moved, as the server measured it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrailSummary {
    /// Steps reported.
    pub steps: usize,
    /// Steps that moved (distance > 0); the others carry no weight.
    pub moved: usize,
    /// Total distance travelled, Σ ‖stepᵢ − stepᵢ₋₁‖₂.
    pub distance: f64,
}

impl TrailSummary {
    /// The summary of a trail's distances, `None` when it has no step.
    pub(crate) fn of(distances: &[f64]) -> Option<Self> {
        (!distances.is_empty()).then(|| TrailSummary {
            steps: distances.len(),
            moved: distances.iter().filter(|&&d| d > 0.0).count(),
            distance: distances.iter().sum(),
        })
    }
}

/// Wall-clock time spent in each stage, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundTimings {
    /// Admission (structure, values, norms, counts).
    pub admission_s: f64,
    /// Probe scoring (update, steps, shadow steps) and trail checks.
    pub probe_s: f64,
    /// Detector assessments.
    pub detect_s: f64,
    /// The aggregator (0 when the round was skipped).
    pub aggregate_s: f64,
    /// The whole round.
    pub total_s: f64,
}

/// The result of one defended round; serialises to one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Round number (0-based).
    pub round: u32,
    /// The detector's level.
    pub level: DefenseLevel,
    /// The aggregator's name.
    pub aggregator: String,
    /// One entry per report, in report order.
    pub clients: Vec<ClientOutcome>,
    /// Mean factor over every report (rejected ones count 0).
    pub mean_factor: f64,
    /// The safety gate's threshold.
    pub skip_avg_weight: f64,
    /// τ of the probe every level decided with this round.
    pub threshold: f32,
    /// SHA-256 of the [`DefenseSpec`](crate::round::DefenseSpec) the round
    /// was built from, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_sha256: Option<String>,
    /// True when the global adapter stays unchanged.
    pub skipped: bool,
    /// Why the round was skipped.
    pub skip_reason: Option<SkipReason>,
    /// Stage timings.
    pub timings: RoundTimings,
    /// The new global adapter (`None` when skipped). Not part of the audit line.
    #[serde(skip)]
    pub new_global: Option<LoraAdapter>,
}

impl RoundOutcome {
    /// The audit record as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Serialize {
            what: "round outcome",
            reason: format!("round {}: {e}", self.round),
        })
    }

    /// Appends the audit record and a newline to `out` (an audit log).
    pub fn write_json_line(&self, mut out: impl Write) -> Result<()> {
        let line = self.to_json_line()?;
        writeln!(out, "{line}").map_err(|source| Error::Write {
            what: "audit log",
            source,
        })
    }

    /// The outcome of one client.
    pub fn client(&self, client: &str) -> Option<&ClientOutcome> {
        self.clients.iter().find(|c| c.client.as_str() == client)
    }
}
