//! The probe stage of a defended round: each admitted report scored by the
//! server (update, step trail, shadow report), checked against its trail and
//! turned into [`ClientEvidence`], then assessed into a [`ClientOutcome`].

use crate::aggregate::Aggregator;
use crate::detect::{ClientEvidence, Detector, Opening, Verdict};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::probe::Probe;
use crate::round::admission::{AdmissionDecision, Admitted, Rejection};
use crate::round::audit::{ClientOutcome, Disposition, Provenance, TrailSummary};
use crate::round::commit::{self, CommitmentStatus, ShadowPlan};
use crate::round::defended::DefendedRound;
use crate::round::report::{ClientReport, StepsReport};
use crate::round::steps::{score_step, score_steps, step_distances};
use crate::round::trail::{TrailStatus, check_trail};

/// What the probe stage produced for one admitted client.
pub(super) enum Scored {
    Accepted {
        evidence: ClientEvidence,
        trail: TrailStatus,
        steps: Provenance,
        shadow: Provenance,
        step_trail: Option<TrailSummary>,
        commitment: Option<CommitmentStatus>,
    },
    Rejected {
        rejection: Rejection,
        update_score: Option<f32>,
        trail: TrailStatus,
    },
}

/// One report after admission and scoring.
pub(super) struct Staged {
    pub(super) decision: AdmissionDecision,
    pub(super) scored: Scored,
}

impl<P: Probe, D: Detector + Clone, A: Aggregator> DefendedRound<P, D, A> {
    pub(super) fn score_report(
        &self,
        round: u32,
        global: &LoraAdapter,
        report: &ClientReport<'_>,
        decision: &AdmissionDecision,
    ) -> Scored {
        let samples = match &decision.status {
            Admitted::Rejected(rejection) => {
                return Scored::Rejected {
                    rejection: rejection.clone(),
                    update_score: None,
                    trail: TrailStatus::NotChecked,
                };
            }
            // Only a rejected status has no sample count; it returned above.
            admitted => admitted.samples().unwrap_or(0),
        };
        // The update is the client's last step: the server scores `update − global` itself.
        let update_score = match score_step(&self.probe, global, report.update) {
            Ok(s) => s,
            Err(e) => {
                return Scored::Rejected {
                    rejection: Rejection::Unreadable {
                        error: e.to_string(),
                    },
                    update_score: None,
                    trail: TrailStatus::NotChecked,
                };
            }
        };
        let rejected = |detail: String, trail: TrailStatus| Scored::Rejected {
            rejection: Rejection::InvalidEvidence { detail },
            update_score: Some(update_score),
            trail,
        };
        let trail = match self.check_trail(report) {
            Ok(t) => t,
            Err(e) => {
                return rejected(
                    format!("step trail unreadable: {e}"),
                    TrailStatus::NotChecked,
                );
            }
        };
        let reads_steps = self.detector.uses_all_steps();
        let plan = if self.detector.uses_shadow() {
            let need = self.detector.shadow_need(report.client);
            let scheduled = self.detector.needs_shadow(report.client);
            match commit::plan(self.audits.as_ref(), need, scheduled, round, report) {
                Ok(plan) => plan,
                Err(e) => return rejected(format!("shadow report unreadable: {e}"), trail),
            }
        } else {
            ShadowPlan {
                read: false,
                opening: Opening::Scheduled,
                status: None,
            }
        };
        let reads_shadow = plan.read;
        let self_reported = (reads_steps && matches!(report.steps, StepsReport::Scores(_)))
            || (reads_shadow && matches!(report.shadow, StepsReport::Scores(_)));
        if self_reported && !self.params.accept_self_reported {
            return rejected(
                "client-computed scores are not accepted (RoundParams::accept_self_reported)"
                    .to_owned(),
                trail,
            );
        }
        let mut evidence = ClientEvidence::new(samples)
            .with_threshold(self.probe.threshold())
            .with_last_step_score(Some(update_score));
        evidence.opening = plan.opening;
        let mut steps = Provenance::Absent;
        let mut step_trail = None;
        if reads_steps {
            match self.main_scores(global, &report.steps) {
                Ok((scores, distances)) => {
                    steps = provenance(&report.steps, &trail);
                    step_trail = TrailSummary::of(&distances);
                    evidence.step_scores = scores;
                    evidence.step_distances = distances;
                }
                Err(e) => return rejected(format!("step adapters rejected: {e}"), trail),
            }
        }
        let mut shadow = Provenance::Absent;
        if reads_shadow {
            match self.shadow_scores(&report.shadow) {
                Ok((scores, distances)) => {
                    shadow = match &report.shadow {
                        StepsReport::None => Provenance::Absent,
                        StepsReport::Scores(_) => Provenance::SelfReported,
                        StepsReport::Adapters(_) => Provenance::ServerScoredUnverified,
                    };
                    evidence = evidence
                        .with_shadow_steps(scores)
                        .with_shadow_distances(distances);
                }
                Err(e) => return rejected(format!("shadow steps rejected: {e}"), trail),
            }
        }
        if let Err(e) = evidence.validate(round, report.client) {
            return rejected(e.to_string(), trail);
        }
        Scored::Accepted {
            evidence,
            trail,
            steps,
            shadow,
            step_trail,
            commitment: plan.status,
        }
    }

    fn check_trail(&self, report: &ClientReport<'_>) -> Result<TrailStatus> {
        match &report.steps {
            StepsReport::Adapters(steps) => match steps.last() {
                Some(last) => check_trail(*last, report.update, self.params.trail),
                None => Ok(TrailStatus::NotChecked),
            },
            StepsReport::None | StepsReport::Scores(_) => Ok(TrailStatus::NotChecked),
        }
    }

    /// Scores and distances travelled of the main branch's steps (no
    /// distances for self-reported scores: the server saw no step).
    fn main_scores(&self, global: &LoraAdapter, steps: &StepsReport<'_>) -> Result<Branch> {
        match steps {
            StepsReport::None => Ok((Vec::new(), Vec::new())),
            StepsReport::Scores(s) => Ok((s.to_vec(), Vec::new())),
            StepsReport::Adapters(a) => Ok((
                score_steps(&self.probe, global, a)?,
                step_distances(global, a)?,
            )),
        }
    }

    fn shadow_scores(&self, steps: &StepsReport<'_>) -> Result<Branch> {
        match (steps, &self.shadow) {
            (StepsReport::None, _) => Ok((Vec::new(), Vec::new())),
            (StepsReport::Scores(s), _) => Ok((s.to_vec(), Vec::new())),
            (StepsReport::Adapters(a), Some(shadow)) => Ok((
                shadow.score_steps(&self.probe, a)?,
                step_distances(shadow.base(), a)?,
            )),
            (StepsReport::Adapters(_), None) => Err(Error::InvalidParameter {
                component: "defended round",
                name: "shadow_branch",
                value: "none".into(),
                expected: "a ShadowBranch (DefendedRound::with_shadow) to score shadow adapters against",
            }),
        }
    }
}

/// A branch's step scores and the distance each step travelled.
type Branch = (Vec<f32>, Vec<f64>);

/// Provenance of main-branch step scores: [`Provenance::Verified`] only for
/// a one-step trail that is the update itself.
fn provenance(steps: &StepsReport<'_>, trail: &TrailStatus) -> Provenance {
    match (steps, trail) {
        (StepsReport::None, _) => Provenance::Absent,
        (StepsReport::Scores(_), _) => Provenance::SelfReported,
        (StepsReport::Adapters(a), TrailStatus::Verified) if a.len() == 1 => Provenance::Verified,
        (StepsReport::Adapters(_), TrailStatus::Verified) => Provenance::LastStepVerified,
        (StepsReport::Adapters(_), _) => Provenance::ServerScoredUnverified,
    }
}

/// Assesses one staged report with the (copied) detector.
pub(super) fn assess<D: Detector>(
    detector: &mut D,
    round: u32,
    report: &ClientReport<'_>,
    staged: Staged,
) -> Result<ClientOutcome> {
    let Staged { decision, scored } = staged;
    // A rejected client reports no sample count: it contributes none.
    let samples = decision.status.samples().unwrap_or(0);
    let outcome = |disposition, factor: f64, verdict, detail, update_score, trail| ClientOutcome {
        client: report.client.clone(),
        declared_samples: decision.declared_samples,
        samples: if disposition == Disposition::Assessed {
            samples
        } else {
            0
        },
        admission: decision.status.clone(),
        disposition,
        factor,
        effective_weight: samples as f64 * factor,
        aggregation_weight: None,
        verdict,
        detail,
        sources: Vec::new(),
        update_score,
        trail,
        step_evidence: Provenance::Absent,
        shadow_evidence: Provenance::Absent,
        step_trail: None,
        shadow_commitment: None,
        excluded: None,
    };
    Ok(match scored {
        Scored::Rejected {
            rejection,
            update_score,
            trail,
        } => {
            let detail = serde_json::to_string(&rejection).unwrap_or_else(|e| e.to_string());
            let mut o = outcome(
                Disposition::Rejected,
                0.0,
                Verdict::Undecided,
                detail,
                update_score,
                trail,
            );
            if !matches!(decision.status, Admitted::Rejected(_)) {
                o.admission = Admitted::Rejected(rejection);
            }
            o
        }
        Scored::Accepted {
            evidence,
            trail: trail @ TrailStatus::Mismatch { .. },
            ..
        } => {
            let detail = match &trail {
                TrailStatus::Mismatch { reason } => format!("trail check failed: {reason}"),
                _ => String::new(),
            };
            outcome(
                Disposition::TrailMismatch,
                0.0,
                Verdict::Malicious,
                detail,
                evidence.last_step_score,
                trail,
            )
        }
        Scored::Accepted {
            evidence,
            trail,
            steps,
            shadow,
            step_trail,
            commitment,
        } => {
            let a = detector.assess(round, report.client, &evidence)?;
            let mut o = outcome(
                Disposition::Assessed,
                a.factor,
                a.verdict,
                a.reason,
                evidence.last_step_score,
                trail,
            );
            o.sources = a.sources;
            o.step_evidence = steps;
            o.shadow_evidence = shadow;
            o.step_trail = step_trail;
            o.shadow_commitment = commitment;
            o
        }
    })
}
