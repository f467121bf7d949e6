//! Detectors: turn one client's probe evidence for a round into a security
//! factor in [0, 1] (step-, client-, shadow- and evidence-level).
//!
//! Safe-FedLLM weights each client's update by `samples × w`, where the
//! *security factor* `w` comes from LoRA-Probe scores (P(malicious)) of the
//! client's local training. The four levels differ in which scores they read
//! and in how much memory they keep across rounds:
//!
//! | level | reads | state per client | runs |
//! |---|---|---|---|
//! | [`StepLevel`] | every local step's score | Beta trust (α, β) | first R rounds, then frozen |
//! | [`ClientLevel`] | the last step's score | running mean | first R rounds, then frozen |
//! | [`ShadowLevel`] | every *shadow* step's score | none | every round |
//! | [`EvidenceLevel`] | shadow steps + the last shadow step | evidence, freeze, audit | every round |
//!
//! [`Layered`] runs several of them on the same evidence and keeps the
//! minimum of their factors, so every source can veto and none can vouch.
//!
//! Every level implements [`Detector`]. All detector state is serde
//! (de)serialisable, so a server can checkpoint between rounds and resume with
//! bit-identical factors; deserialisation re-validates parameters and state.
//! [`AnyDetector`] wraps the four levels (and [`Layered`]) in one
//! serialisable enum for servers that choose the level at run time.
//!
//! Detectors are pure: scores and step counts in, a factor out. They never see
//! an update, a file or a sample count a client could inflate: the defended
//! round ([`crate::round`]) admits each client's message, computes or
//! collects the scores, and hands the detector only what survived admission.
//! What each level can verify, and what a client could fake, is documented
//! in `docs/detectors.md`, `docs/threat-model.md` and on each level.
//!
//! ```
//! use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, Safeguards, StepLevel, Verdict};
//!
//! // Reference defaults: γ = 0.95, batch 16 × grad-accum 1, τ = 0.8, R = 20,
//! // and the paper's formula alone (the default safeguards would also keep a
//! // new id on probation, at most 0.5, for its first three rounds).
//! let mut detector = StepLevel::params().safeguards(Safeguards::reference()).build()?;
//! let alice = ClientId::from("alice");
//!
//! // 160 samples, 10 steps, 3 of them scored harmful (≥ 0.8): 48 harmful samples.
//! let scores = [0.1, 0.2, 0.9, 0.1, 0.85, 0.3, 0.1, 0.95, 0.2, 0.1];
//! let evidence = ClientEvidence::new(160).with_steps(scores.to_vec());
//! let a = detector.assess(0, &alice, &evidence)?;
//! // α = 0.95 + 112, β = 0.95 + 48
//! assert!((a.factor - 112.95 / 161.9).abs() < 1e-12);
//! assert_eq!(a.verdict, Verdict::Malicious);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

mod any;
mod client;
mod evidence;
mod evidence_level;
mod layered;
mod safeguard;
mod shadow;
mod step;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_parameter};

pub use any::AnyDetector;
pub use client::{ClientLevel, ClientLevelParams};
pub use evidence::{ClientEvidence, Opening};
pub use evidence_level::{EvidenceLevel, EvidenceLevelParams, EvidenceStatus};
pub use layered::{Combine, Layered, LayeredParams, LevelParams, SourceAssessment};
pub use safeguard::{DEFAULT_PROBATION, Probation, Safeguards, VerdictCap};
pub use shadow::{ShadowLevel, ShadowLevelParams};
pub use step::{StepLevel, StepLevelParams};

/// One branch's step evidence as the levels read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Branch<'a> {
    /// Probe score of every step, in order.
    pub scores: &'a [f32],
    /// Distance each step travelled from the one before (empty: every step
    /// weighs the same, as in the reference).
    pub distances: &'a [f64],
    /// The server's score of the submitted update, read when the branch is
    /// missing under [`MissingEvidence::FromUpdate`].
    pub update_score: Option<f32>,
    /// τ of the probe that scored the branch: a score ≥ τ is harmful.
    pub threshold: f32,
}

/// Harmful and benign sample counts of one branch's steps under `counting`.
///
/// Under [`SampleCounting::Steps`] with distances, a step weighs by the
/// distance it travelled: steps that did not move count for nothing, and the
/// harmful share is the harmful steps' share of the distance, so a trail
/// cannot be diluted by repeating adapters. The mass added to the level's
/// memory is (moving steps) × samples per step.
///
/// `missing` (no scores at all, or no step that moved) is counted per
/// `policy`: one step's worth under [`SampleCounting::Steps`], the declared
/// count under the reference.
pub(crate) fn branch_counts(
    counting: SampleCounting,
    branch: Branch<'_>,
    samples_per_step: u64,
    declared: u64,
    policy: MissingEvidence,
) -> BranchCounts {
    let threshold = branch.threshold;
    let harmful_steps = count_harmful(branch.scores, threshold);
    let per_step = samples_per_step as f64;
    let (missing, harmful, benign) = match counting {
        SampleCounting::Steps => match distance_share(branch, threshold) {
            Some((moving, share)) => {
                let mass = moving as f64 * per_step;
                (false, share * mass, (1.0 - share) * mass)
            }
            None => {
                let bad = missing_is_harmful(policy, branch.update_score, threshold);
                (
                    true,
                    if bad { per_step } else { 0.0 },
                    if bad { 0.0 } else { per_step },
                )
            }
        },
        SampleCounting::Reference => {
            let missing = branch.scores.is_empty() && declared > 0;
            let harmful = if missing {
                let bad = missing_is_harmful(policy, branch.update_score, threshold);
                if bad { declared } else { 0 }
            } else {
                harmful_samples(harmful_steps, samples_per_step, declared)
            };
            (missing, harmful as f64, (declared - harmful) as f64)
        }
    };
    BranchCounts {
        harmful_steps,
        harmful,
        benign,
        missing,
    }
}

/// (moving steps, harmful share of the distance travelled), or `None` when
/// no step carries weight. Without distances every step moves one unit.
fn distance_share(branch: Branch<'_>, threshold: f32) -> Option<(usize, f64)> {
    let unit = branch.distances.is_empty();
    let weight = |i: usize| {
        if unit {
            1.0
        } else {
            branch.distances.get(i).copied().unwrap_or(0.0)
        }
    };
    let (mut moving, mut total, mut bad) = (0usize, 0.0f64, 0.0f64);
    for (i, &s) in branch.scores.iter().enumerate() {
        let w = weight(i);
        if w > 0.0 {
            moving += 1;
            total += w;
            if s >= threshold {
                bad += w;
            }
        }
    }
    (moving > 0 && total > 0.0).then(|| (moving, (bad / total).clamp(0.0, 1.0)))
}

/// Whether missing evidence counts as harmful under `policy`.
fn missing_is_harmful(policy: MissingEvidence, update_score: Option<f32>, threshold: f32) -> bool {
    match policy {
        MissingEvidence::Benign => false,
        MissingEvidence::Malicious => true,
        MissingEvidence::FromUpdate => update_score.is_none_or(|s| s >= threshold),
    }
}

/// One branch's steps as harmful and benign sample counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BranchCounts {
    /// Steps scored ≥ τ.
    pub harmful_steps: usize,
    /// Harmful samples (distance-weighted: not always a whole number).
    pub harmful: f64,
    /// Benign samples.
    pub benign: f64,
    /// True when the branch reported no usable step.
    pub missing: bool,
}

impl BranchCounts {
    /// harmful / (harmful + benign), 0 when both are 0.
    pub fn ratio(&self) -> f64 {
        let total = self.harmful + self.benign;
        if total > 0.0 {
            (self.harmful / total).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Reference decay γ of the step-level Beta trust.
pub const DEFAULT_DECAY: f64 = 0.95;
/// Reference number of rounds R during which step- and client-level update.
pub const DEFAULT_ACTIVE_ROUNDS: u32 = 20;
/// Reference per-device batch size (samples per step = batch × grad-accum).
pub const DEFAULT_BATCH_SIZE: u64 = 16;
/// Reference gradient-accumulation steps.
pub const DEFAULT_GRAD_ACCUM: u64 = 1;
/// Reference shadow / evidence exponent η in `(1 − r)^η`.
pub const DEFAULT_ETA: f64 = 7.0;
/// Reference slope k of the client-level piecewise sigmoid.
pub const DEFAULT_STEEPNESS: f64 = 10.0;
/// Reference pivot of the client-level piecewise sigmoid.
pub const DEFAULT_PIVOT: f64 = 0.8;
/// Reference number of consecutive agreeing verdicts that freeze a client.
pub const DEFAULT_EVIDENCE_MIN: usize = 3;
/// Reference number of participating rounds between audits of a client
/// frozen as benign.
pub const DEFAULT_AUDIT_INTERVAL: u32 = 5;
/// Reference learning rate of the shadow branch.
pub const DEFAULT_SHADOW_LEARNING_RATE: f64 = 5e-5;

pub use crate::client::ClientId;

/// Which Safe-FedLLM defence level a detector implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefenseLevel {
    /// Beta trust over the harmful share of every local step ([`StepLevel`]).
    Step,
    /// Piecewise sigmoid of the last step's score, averaged ([`ClientLevel`]).
    Client,
    /// `(1 − r)^η` over the shadow branch's steps ([`ShadowLevel`]).
    Shadow,
    /// Shadow level with evidence memory, freezing and audits ([`EvidenceLevel`]).
    Evidence,
    /// Several levels combined, each able to veto ([`Layered`]).
    Layered,
}

impl DefenseLevel {
    /// True when the level reads shadow-branch scores (and so the client must
    /// train a shadow branch, doubling its local compute). False for
    /// [`DefenseLevel::Layered`], whose answer depends on its sources: ask the
    /// detector ([`Detector::uses_shadow`]).
    pub fn uses_shadow(self) -> bool {
        matches!(self, DefenseLevel::Shadow | DefenseLevel::Evidence)
    }

    /// True when the level reads the score of every main-branch step. False
    /// for [`DefenseLevel::Layered`]: ask the detector
    /// ([`Detector::uses_all_steps`]).
    pub fn uses_all_steps(self) -> bool {
        matches!(self, DefenseLevel::Step)
    }
}

impl fmt::Display for DefenseLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefenseLevel::Step => "step-level",
            DefenseLevel::Client => "client-level",
            DefenseLevel::Shadow => "shadow-level",
            DefenseLevel::Evidence => "evidence-level",
            DefenseLevel::Layered => "layered",
        })
    }
}

/// What the detector concluded about a client this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// This round's evidence (or the frozen record) says benign.
    Benign,
    /// This round's evidence (or the frozen record) says malicious.
    Malicious,
    /// The detector did not look at new evidence (frozen phase of step- and
    /// client-level, a client never seen), or the evidence was inconclusive.
    Undecided,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Benign => "benign",
            Verdict::Malicious => "malicious",
            Verdict::Undecided => "undecided",
        })
    }
}

/// How the step and shadow levels turn step verdicts into a harmful share.
///
/// The reference multiplies harmful steps by the batch size and subtracts
/// them from the client's *declared* sample count: a client that declares
/// 10⁹ samples dilutes any number of harmful steps to a harmful share of ~0
/// (factor ≈ 1), and one that declares 0 samples has no harmful share at all.
/// [`SampleCounting::Steps`], the default, takes the share from the steps
/// alone, so no declared count can change a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleCounting {
    /// Harmful = harmful steps × samples per step, benign = benign steps ×
    /// samples per step; the declared count is never read. The default.
    #[default]
    Steps,
    /// The reference: harmful = harmful steps × samples per step capped at
    /// the declared count, benign = declared count − harmful. **Unsafe
    /// against lying clients**; for reproducing the paper only.
    Reference,
}

/// How a level treats evidence the client did not provide.
///
/// The reference is asymmetric: a missing last-step score counts as
/// malicious (s = 1) at client level but as benign at evidence level, and a
/// client with no harmful-step record counts as fully benign at step, shadow
/// and evidence level: silence pays. The default here is
/// [`MissingEvidence::FromUpdate`] everywhere: missing evidence is judged on
/// the update the server scored itself, never on a benign default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingEvidence {
    /// Missing evidence counts as benign (score 0 / no harmful step).
    Benign,
    /// Missing evidence counts as malicious (score 1 / every step harmful).
    Malicious,
    /// Missing evidence is replaced by the server's score of the submitted
    /// update (`ClientEvidence::last_step_score`, which the defended round
    /// always computes): one step with that score, or a last score equal to
    /// it. Without that score too, it counts as malicious. The default.
    FromUpdate,
}

/// One client's security factor for one round, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// Security factor in [0, 1], already clamped below by `min_weight`.
    pub factor: f64,
    /// The detector's verdict for this round.
    pub verdict: Verdict,
    /// Human-readable explanation (the numbers that produced the factor).
    pub reason: String,
    /// What each source said, for a [`Layered`] detector (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceAssessment>,
}

impl Assessment {
    /// A single level's assessment (no sources).
    pub fn single(factor: f64, verdict: Verdict, reason: String) -> Self {
        Assessment {
            factor,
            verdict,
            reason,
            sources: Vec::new(),
        }
    }

    fn new(factor: f64, min_weight: f64, verdict: Verdict, reason: String) -> Self {
        Self::single(apply_min_weight(factor, min_weight), verdict, reason)
    }
}

/// Turns one client's evidence for one round into a security factor, keeping
/// per-client state across rounds.
///
/// Rounds are numbered from 0 (the reference's `round_num`). Call
/// [`Detector::assess`] once per participating client per round, in any
/// client order: the state of one client never influences another's factor.
///
/// An outside detector only needs [`Detector::assess`] (plus its level); [`DefendedRound`](crate::round::DefendedRound) runs it like the
/// built-in levels:
///
/// ```
/// use safe_fedllm::ClientId;
/// use safe_fedllm::detect::{Assessment, ClientEvidence, DefenseLevel, Detector, Verdict};
///
/// /// An outside detector without memory: factor 1 − (last-step score).
/// #[derive(Clone)]
/// struct OneMinusScore;
///
/// impl Detector for OneMinusScore {
///     fn level(&self) -> DefenseLevel {
///         DefenseLevel::Client
///     }
///     fn assess(
///         &mut self,
///         _round: u32,
///         _client: &ClientId,
///         evidence: &ClientEvidence,
///     ) -> safe_fedllm::Result<Assessment> {
///         // A missing score counts as malicious (the safe choice).
///         let s = f64::from(evidence.last_step_score.unwrap_or(1.0)).clamp(0.0, 1.0);
///         // τ is the probe's, carried by the evidence.
///         let verdict = if evidence.is_harmful(s) { Verdict::Malicious } else { Verdict::Benign };
///         Ok(Assessment::single(1.0 - s, verdict, format!("1 - s, s = {s}")))
///     }
/// }
///
/// let mut detector = OneMinusScore;
/// let client = ClientId::from("c1");
/// let evidence = ClientEvidence::new(64).with_last_step_score(Some(0.9));
/// let assessment = detector.assess(0, &client, &evidence)?;
/// assert_eq!(assessment.verdict, Verdict::Malicious);
/// assert!((assessment.factor - 0.1).abs() < 1e-6);
/// assert_eq!(detector.assess(1, &client, &ClientEvidence::new(64))?.factor, 0.0);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub trait Detector: Send + Sync {
    /// The level this detector implements.
    fn level(&self) -> DefenseLevel;

    /// True when the detector reads shadow-branch scores: the round then
    /// scores the shadow report. By default the level's
    /// ([`DefenseLevel::uses_shadow`]); a [`Layered`] detector answers for
    /// its sources.
    fn uses_shadow(&self) -> bool {
        self.level().uses_shadow()
    }

    /// True when the detector reads every main-branch step's score: the
    /// round then scores the step trail. By default the level's
    /// ([`DefenseLevel::uses_all_steps`]); a [`Layered`] detector answers for
    /// its sources.
    fn uses_all_steps(&self) -> bool {
        self.level().uses_all_steps()
    }

    /// Assesses `client` in `round` from its evidence, updating its state.
    ///
    /// Errors only on invalid evidence ([`Error::InvalidEvidence`]: a
    /// non-finite score); missing evidence is handled by the level's
    /// documented [`MissingEvidence`] policy.
    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment>;

    /// When the level reads `client`'s shadow branch: the part of its
    /// schedule that does not depend on the round. A server running
    /// commit–reveal audits asks every client whose need is not
    /// [`ShadowNeed::Never`] to commit every round, opens
    /// [`ShadowNeed::EveryRound`] clients always and draws among
    /// [`ShadowNeed::Audit`] clients in secret.
    fn shadow_need(&self, client: &ClientId) -> ShadowNeed {
        let _ = client;
        if self.uses_shadow() {
            ShadowNeed::EveryRound
        } else {
            ShadowNeed::Never
        }
    }

    /// Whether the client needs to train a shadow branch this round.
    ///
    /// True every round for [`ShadowLevel`]; for [`EvidenceLevel`] false once
    /// a client is frozen, except in its audit rounds (the reference's
    /// `use_shadow`); false for levels that do not read shadow scores.
    fn needs_shadow(&self, client: &ClientId) -> bool {
        let _ = client;
        self.uses_shadow()
    }
}

/// When a level reads a client's shadow branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowNeed {
    /// Never (levels without a shadow branch; clients frozen malicious).
    Never,
    /// Every round (shadow level; evidence level while collecting).
    EveryRound,
    /// Only in audit rounds (evidence level, frozen benign).
    Audit,
}

/// The factor clamped below by `min_weight` (the reference's
/// `max(factor, min_weight)`).
fn apply_min_weight(factor: f64, min_weight: f64) -> f64 {
    factor.max(min_weight)
}

/// Harmful samples as the reference counts them: `harmful steps × samples per
/// step`, capped at the client's sample count.
pub fn harmful_samples(harmful_steps: usize, samples_per_step: u64, samples: u64) -> u64 {
    let steps = u64::try_from(harmful_steps).unwrap_or(u64::MAX);
    steps.saturating_mul(samples_per_step).min(samples)
}

/// Number of scores at or above `threshold`.
fn count_harmful(scores: &[f32], threshold: f32) -> usize {
    scores.iter().filter(|&&s| s >= threshold).count()
}

fn check_unit(component: &'static str, param: &'static str, value: f64) -> Result<()> {
    let ok = value.is_finite() && (0.0..=1.0).contains(&value);
    check_parameter(ok, component, param, value, "a finite number in [0, 1]")
}

fn check_positive_finite(component: &'static str, param: &'static str, value: f64) -> Result<()> {
    let ok = value.is_finite() && value > 0.0;
    check_parameter(ok, component, param, value, "a finite number > 0")
}

fn check_positive_int(component: &'static str, param: &'static str, value: u64) -> Result<()> {
    check_parameter(value > 0, component, param, value, "an integer ≥ 1")
}

/// A level's checkpoint as read: its settings and per-client states, both
/// unchecked until [`LevelRepr::checked`].
#[derive(Deserialize)]
struct LevelRepr<P, S> {
    params: P,
    clients: BTreeMap<ClientId, S>,
}

impl<P, S> LevelRepr<P, S> {
    /// The settings and client states, once `check` accepts the settings and
    /// `check_state` every client's state: a checkpoint is untrusted input, so
    /// a level is rebuilt only from values its own updates could produce.
    fn checked(
        self,
        check: impl FnOnce(&P) -> Result<()>,
        check_state: impl Fn(&P, &S) -> Result<()>,
    ) -> Result<(P, BTreeMap<ClientId, S>)> {
        check(&self.params)?;
        for state in self.clients.values() {
            check_state(&self.params, state)?;
        }
        Ok((self.params, self.clients))
    }
}

/// Checks a value restored from a checkpoint.
fn check_state(what: &'static str, ok: bool, value: impl fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidCheckpoint {
            what,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harmful_samples_is_capped_at_the_sample_count() {
        assert_eq!(harmful_samples(3, 16, 160), 48);
        assert_eq!(harmful_samples(11, 16, 160), 160);
        assert_eq!(harmful_samples(usize::MAX, u64::MAX, 7), 7);
        assert_eq!(harmful_samples(0, 16, 0), 0);
    }

    #[test]
    fn count_harmful_uses_greater_or_equal() {
        assert_eq!(count_harmful(&[0.8, 0.79, 0.81, 1.0], 0.8), 3);
    }

    /// Restores `d` from its checkpoint after `tamper` and returns the error
    /// (the untampered checkpoint must restore `d` itself).
    fn restore_tampered<T>(d: &T, tamper: impl Fn(&mut serde_json::Value)) -> String
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let mut json = serde_json::to_value(d).unwrap();
        let back: T = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(&back, d);
        tamper(&mut json);
        serde_json::from_value::<T>(json).unwrap_err().to_string()
    }

    /// The one client's state in a level's checkpoint.
    fn client_state(json: &mut serde_json::Value) -> &mut serde_json::Value {
        json["clients"]
            .as_object_mut()
            .unwrap()
            .values_mut()
            .next()
            .unwrap()
    }

    /// A checkpoint is untrusted input: each level refuses settings its
    /// `check` refuses and client states its own updates cannot produce,
    /// naming the value.
    #[test]
    fn tampered_level_checkpoints_are_rejected() {
        let id = ClientId::from("c");
        let e = ClientEvidence::new(32)
            .with_steps(vec![0.1, 0.9])
            .with_shadow_steps(vec![0.1, 0.2]);
        let mut step = StepLevel::params().build().unwrap();
        let mut client = ClientLevel::params().build().unwrap();
        let mut evidence = EvidenceLevel::params().build().unwrap();
        step.assess(0, &id, &e).unwrap();
        client.assess(0, &id, &e).unwrap();
        evidence.assess(0, &id, &e).unwrap();

        let cases = [
            (
                restore_tampered(&step, |j| j["params"]["decay"] = 2.0.into()),
                "parameter `decay` = 2",
            ),
            (
                restore_tampered(&step, |j| client_state(j)["alpha"] = (-1.0).into()),
                "invalid Beta α: -1",
            ),
            (
                restore_tampered(&step, |j| client_state(j)["last_factor"] = 2.0.into()),
                "invalid factor: 2",
            ),
            (
                restore_tampered(&client, |j| j["params"]["pivot"] = 1.0.into()),
                "parameter `pivot` = 1",
            ),
            (
                restore_tampered(&client, |j| client_state(j)["mean"] = 1.5.into()),
                "invalid running mean: 1.5",
            ),
            (
                restore_tampered(&client, |j| {
                    client_state(j)["rounds"] = (u64::from(u32::MAX) + 1).into()
                }),
                "invalid rounds averaged",
            ),
            (
                restore_tampered(&evidence, |j| j["params"]["evidence_min"] = 0.into()),
                "parameter `evidence_min` = 0",
            ),
            (
                restore_tampered(&evidence, |j| {
                    client_state(j)["evidence"][0]["factor"] = 3.0.into()
                }),
                "invalid evidence factor: 3",
            ),
            (
                restore_tampered(&evidence, |j| {
                    let entry = client_state(j)["evidence"][0].clone();
                    client_state(j)["evidence"] = vec![entry; 4].into();
                }),
                "invalid evidence count: 4",
            ),
            (
                restore_tampered(&evidence, |j| {
                    client_state(j)["status"] =
                        serde_json::json!({"status": "frozen_benign", "weight": 2.0});
                }),
                "invalid frozen weight: 2",
            ),
        ];
        for (err, expected) in cases {
            assert!(err.contains(expected), "{err:?} does not name {expected:?}");
        }
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<StepLevel>();
        assert_send_sync::<ClientLevel>();
        assert_send_sync::<ShadowLevel>();
        assert_send_sync::<EvidenceLevel>();
        assert_send_sync::<AnyDetector>();
        assert_send_sync::<Layered>();
        assert_send_sync::<ClientEvidence>();
        assert_send_sync::<Assessment>();
        assert_send_sync::<Box<dyn Detector>>();
    }
}
