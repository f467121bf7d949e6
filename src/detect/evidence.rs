//! [`ClientEvidence`]: what one client's local training told the probe.

use serde::{Deserialize, Serialize};

use crate::detect::ClientId;
use crate::error::{Error, Result};
use crate::probe::DEFAULT_THRESHOLD;

/// One client's probe evidence for one round.
///
/// Scores are the probe's P(malicious) of a step's ΔLoRA. Each level reads
/// only what it needs:
///
/// * [`StepLevel`](super::StepLevel): `samples` and `step_scores`
///   (main branch, each step relative to the round's starting adapter);
/// * [`ClientLevel`](super::ClientLevel): `last_step_score`;
/// * [`ShadowLevel`](super::ShadowLevel): `samples` and `shadow_scores`
///   (each shadow step relative to the fixed shadow base);
/// * [`EvidenceLevel`](super::EvidenceLevel): `samples`, `shadow_scores` and
///   `shadow_last_score`.
///
/// The "last" scores are separate fields because the reference reads the
/// score of step number `max_steps`: a client that ran fewer steps (a small
/// local dataset) has step scores but no last-step score. The builder
/// methods [`with_steps`](Self::with_steps) and
/// [`with_shadow_steps`](Self::with_shadow_steps) set both from one list;
/// override the last score with [`with_last_step_score`](Self::with_last_step_score)
/// and [`with_shadow_last_score`](Self::with_shadow_last_score).
///
/// Absent fields deserialise to their defaults (no scores, 0 samples, the
/// default threshold).
///
/// **One threshold.** `threshold` is the τ of the probe that produced the
/// scores: a score ≥ τ is harmful. The levels carry no τ of their own, so a
/// probe calibrated for a target false-positive rate, or refreshed, decides
/// every level's verdicts; [`DefendedRound`](crate::round::DefendedRound)
/// sets it from [`Probe::threshold`](crate::probe::Probe::threshold).
///
/// Which of these evidence fields the server can verify is discussed in the
/// [`trail`](crate::round::trail) module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientEvidence {
    /// Samples the client trained on this round (`len(sub_dataset)`).
    pub samples: u64,
    /// τ of the probe that scored this evidence: a score ≥ τ is harmful.
    pub threshold: f32,
    /// Probe score of every main-branch local step, in order.
    pub step_scores: Vec<f32>,
    /// Probe score of the final main-branch step, when known.
    pub last_step_score: Option<f32>,
    /// Probe score of every shadow-branch step, in order.
    pub shadow_scores: Vec<f32>,
    /// Probe score of the final shadow-branch step, when known.
    pub shadow_last_score: Option<f32>,
    /// Distance (‖stepᵢ − stepᵢ₋₁‖₂, the first from the branch's base) each
    /// main-branch step travelled, when the server computed it from step
    /// adapters. Empty: every step weighs the same (the reference).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step_distances: Vec<f64>,
    /// Distance each shadow step travelled (as `step_distances`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow_distances: Vec<f64>,
    /// Whether the server opened the client's shadow commitment this round
    /// (commit–reveal audits); [`Opening::Scheduled`] when it does not use them.
    #[serde(skip_serializing_if = "Opening::is_scheduled")]
    pub opening: Opening,
}

/// What the server did with a client's shadow report this round.
///
/// Without commit–reveal ([`Opening::Scheduled`]) the evidence level audits a
/// frozen client on its own, announced schedule. With it, the server decides
/// after the upload, and the level follows that decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Opening {
    /// No commit–reveal: the level's own audit schedule applies.
    #[default]
    Scheduled,
    /// The server drew this client and the revealed report matched its
    /// commitment: the shadow scores are this round's audit.
    Opened,
    /// The client committed and was not drawn: no audit this round.
    Sealed,
    /// The client broke its commitment (none sent, nothing revealed, or a
    /// report that does not match): counts as a failed audit, r = 1.
    Broken,
}

impl Opening {
    fn is_scheduled(&self) -> bool {
        *self == Opening::Scheduled
    }
}

impl Default for ClientEvidence {
    fn default() -> Self {
        ClientEvidence {
            samples: 0,
            threshold: DEFAULT_THRESHOLD,
            step_scores: Vec::new(),
            last_step_score: None,
            shadow_scores: Vec::new(),
            shadow_last_score: None,
            step_distances: Vec::new(),
            shadow_distances: Vec::new(),
            opening: Opening::Scheduled,
        }
    }
}

impl ClientEvidence {
    /// Evidence with a sample count, no scores at all and the
    /// [`DEFAULT_THRESHOLD`].
    pub fn new(samples: u64) -> Self {
        ClientEvidence {
            samples,
            ..Self::default()
        }
    }

    /// Sets τ, the threshold of the probe that produced the scores.
    pub fn with_threshold(mut self, threshold: f32) -> Self {
        self.threshold = threshold;
        self
    }

    /// True when `score` is harmful under this evidence's τ.
    pub fn is_harmful(&self, score: f64) -> bool {
        score >= f64::from(self.threshold)
    }

    /// Sets the main-branch step scores; the last one becomes the last-step score.
    pub fn with_steps(mut self, scores: Vec<f32>) -> Self {
        self.last_step_score = scores.last().copied();
        self.step_scores = scores;
        self
    }

    /// Sets (or clears) the last main-branch step's score.
    pub fn with_last_step_score(mut self, score: Option<f32>) -> Self {
        self.last_step_score = score;
        self
    }

    /// Sets the shadow-branch step scores; the last one becomes the shadow
    /// last-step score.
    pub fn with_shadow_steps(mut self, scores: Vec<f32>) -> Self {
        self.shadow_last_score = scores.last().copied();
        self.shadow_scores = scores;
        self
    }

    /// Sets the distance each main-branch step travelled (one per step score).
    pub fn with_step_distances(mut self, distances: Vec<f64>) -> Self {
        self.step_distances = distances;
        self
    }

    /// Sets the distance each shadow step travelled (one per shadow score).
    pub fn with_shadow_distances(mut self, distances: Vec<f64>) -> Self {
        self.shadow_distances = distances;
        self
    }

    /// The main branch as the levels read it.
    pub(crate) fn main_branch(&self) -> super::Branch<'_> {
        super::Branch {
            scores: &self.step_scores,
            distances: &self.step_distances,
            update_score: self.last_step_score,
            threshold: self.threshold,
        }
    }

    /// The shadow branch as the levels read it.
    pub(crate) fn shadow_branch(&self) -> super::Branch<'_> {
        super::Branch {
            scores: &self.shadow_scores,
            distances: &self.shadow_distances,
            update_score: self.last_step_score,
            threshold: self.threshold,
        }
    }

    /// Sets (or clears) the last shadow step's score.
    pub fn with_shadow_last_score(mut self, score: Option<f32>) -> Self {
        self.shadow_last_score = score;
        self
    }

    /// Fails with [`Error::InvalidEvidence`] on a threshold outside [0, 1]
    /// or the first non-finite score.
    ///
    /// Scores outside [0, 1] but finite are accepted: the levels clamp them
    /// exactly as the reference does.
    pub fn validate(&self, round: u32, client: &ClientId) -> Result<()> {
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return Err(invalid(
                round,
                client,
                format!("threshold τ = {} is not in [0, 1]", self.threshold),
            ));
        }
        let lists = [
            ("step", self.step_scores.as_slice()),
            ("shadow step", self.shadow_scores.as_slice()),
        ];
        for (what, scores) in lists {
            if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
                return Err(invalid(round, client, format!("{what} score #{i} is {s}")));
            }
        }
        let lasts = [
            ("last step", self.last_step_score),
            ("last shadow step", self.shadow_last_score),
        ];
        for (what, score) in lasts {
            if let Some(s) = score.filter(|s| !s.is_finite()) {
                return Err(invalid(round, client, format!("{what} score is {s}")));
            }
        }
        let distances = [
            ("step", &self.step_distances, self.step_scores.len()),
            (
                "shadow step",
                &self.shadow_distances,
                self.shadow_scores.len(),
            ),
        ];
        for (what, d, steps) in distances {
            if !d.is_empty() && d.len() != steps {
                let reason = format!("{} {what} distances for {steps} {what} scores", d.len());
                return Err(invalid(round, client, reason));
            }
            if let Some((i, x)) = d
                .iter()
                .enumerate()
                .find(|(_, x)| !(x.is_finite() && **x >= 0.0))
            {
                let reason = format!("{what} distance #{i} is {x}");
                return Err(invalid(round, client, reason));
            }
        }
        Ok(())
    }
}

fn invalid(round: u32, client: &ClientId, reason: String) -> Error {
    Error::InvalidEvidence {
        client: client.clone(),
        round,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_steps_sets_the_last_score() {
        let e = ClientEvidence::new(4).with_steps(vec![0.1, 0.9]);
        assert_eq!(e.last_step_score, Some(0.9));
        let e = e.with_last_step_score(None);
        assert_eq!(e.last_step_score, None);
        assert_eq!(e.step_scores, [0.1, 0.9]);
    }

    #[test]
    fn nan_scores_are_rejected_with_the_client_and_round() {
        let id = ClientId::from("c7");
        let e = ClientEvidence::new(4).with_shadow_steps(vec![0.1, f32::NAN, 0.2]);
        match e.validate(3, &id) {
            Err(Error::InvalidEvidence {
                client,
                round,
                reason,
            }) => {
                assert_eq!(client, "c7");
                assert_eq!(round, 3);
                assert!(reason.contains("shadow step score #1"), "{reason}");
            }
            other => panic!("expected InvalidEvidence, got {other:?}"),
        }
        let e = ClientEvidence::new(4).with_last_step_score(Some(f32::INFINITY));
        assert!(matches!(
            e.validate(0, &id),
            Err(Error::InvalidEvidence { .. })
        ));
    }
}
