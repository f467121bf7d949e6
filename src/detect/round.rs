//! The defended round: probe → detector → safety gate → aggregator, with an
//! audit record.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregation, Aggregator, ClientUpdate};
use crate::detect::helpers::{ShadowBranch, score_steps};
use crate::detect::trail::{TrailCheck, TrailStatus, check_trail};
use crate::detect::{
    ClientEvidence, ClientId, DEFAULT_SKIP_AVG_WEIGHT, DefenseLevel, Detector, Verdict, check_unit,
    invalid_param,
};
use crate::error::{Error, Result};
use crate::lora::{LazyDelta, LoraAdapter};
use crate::probe::Probe;

/// A branch's step evidence as a client reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StepsReport {
    /// Nothing reported.
    #[default]
    None,
    /// The adapter after every local step, in order. The server scores each
    /// against the branch's base (the round's global adapter for the main
    /// branch, the [`ShadowBranch`] base for the shadow branch) and, for the
    /// main branch, checks that the last one equals the update
    /// ([`trail`](super::trail)).
    Adapters(Vec<LoraAdapter>),
    /// Scores the client computed itself. Unverifiable: use in simulations
    /// or with trusted client code only.
    Scores(Vec<f32>),
}

/// What one client sends the server at the end of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientReport {
    /// Who sent it.
    pub client: ClientId,
    /// Its adapter after local training (full weights, not a delta).
    pub update: LoraAdapter,
    /// Samples it trained on (FedAvg weight nₖ).
    pub samples: u64,
    /// Main-branch step evidence (read by [`StepLevel`](super::StepLevel)).
    pub steps: StepsReport,
    /// Shadow-branch step evidence (read by the shadow and evidence levels).
    pub shadow: StepsReport,
}

impl ClientReport {
    /// A report with an update and sample count, and no step evidence.
    pub fn new(client: impl Into<ClientId>, update: LoraAdapter, samples: u64) -> Self {
        ClientReport {
            client: client.into(),
            update,
            samples,
            steps: StepsReport::None,
            shadow: StepsReport::None,
        }
    }

    /// Sets the main-branch step evidence.
    pub fn with_steps(mut self, steps: StepsReport) -> Self {
        self.steps = steps;
        self
    }

    /// Sets the shadow-branch step evidence.
    pub fn with_shadow(mut self, shadow: StepsReport) -> Self {
        self.shadow = shadow;
        self
    }
}

/// Settings of the defended round.
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`skip_avg_weight`](Self::skip_avg_weight) | 0.2 | `prefilter_skip_avg_weight` |
/// | [`trail`](Self::trail) | [`TrailCheck::Exact`] | (none: the reference trusts its own files) |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundParams {
    skip_avg_weight: f64,
    trail: TrailCheck,
}

impl Default for RoundParams {
    fn default() -> Self {
        RoundParams {
            skip_avg_weight: DEFAULT_SKIP_AVG_WEIGHT,
            trail: TrailCheck::Exact,
        }
    }
}

impl RoundParams {
    /// Skip the round (global adapter unchanged) when the mean factor over
    /// the round's clients is below this value ∈ [0, 1]; 0 never skips.
    pub fn skip_avg_weight(mut self, threshold: f64) -> Self {
        self.skip_avg_weight = threshold;
        self
    }

    /// How the last reported main-branch step is compared with the update.
    pub fn trail(mut self, check: TrailCheck) -> Self {
        self.trail = check;
        self
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        check_unit("skip_avg_weight", self.skip_avg_weight)?;
        if let TrailCheck::MaxAbs(t) = self.trail
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(invalid_param("trail", t, "a finite tolerance ≥ 0"));
        }
        Ok(())
    }
}

/// What happened to a report before aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Scored and assessed by the detector; handed to the aggregator.
    Assessed,
    /// The last reported step differs from the update: factor 0, not
    /// aggregated, detector state untouched.
    TrailMismatch,
    /// The update, step adapters or reported scores could not be used:
    /// factor 0, not aggregated, detector state untouched.
    Rejected,
}

/// One client's line in the round's audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientOutcome {
    /// The client.
    pub client: ClientId,
    /// Samples it reported.
    pub samples: u64,
    /// Assessed, trail mismatch, or rejected.
    pub disposition: Disposition,
    /// Its security factor in [0, 1].
    pub factor: f64,
    /// `samples × factor`: the reference's effective sample count.
    pub effective_weight: f64,
    /// Its normalised weight in the aggregate, when it contributed.
    pub aggregation_weight: Option<f64>,
    /// The detector's verdict (or [`Verdict::Malicious`] for a failed trail
    /// check, [`Verdict::Undecided`] for a rejected report).
    pub verdict: Verdict,
    /// Why: the detector's reason, the trail mismatch, or the rejection.
    pub reason: String,
    /// The probe's score of `update − global` (the last step), when computed.
    pub update_score: Option<f32>,
    /// The trail check's result.
    pub trail: TrailStatus,
    /// Why the aggregator left the client out, if it did.
    pub excluded: Option<String>,
}

/// Wall-clock time spent in each stage, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundTimings {
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
    /// True when the global adapter stays unchanged.
    pub skipped: bool,
    /// Why the round was skipped.
    pub skip_reason: Option<String>,
    /// Stage timings.
    pub timings: RoundTimings,
    /// The new global adapter (`None` when skipped). Not part of the audit line.
    #[serde(skip)]
    pub new_global: Option<LoraAdapter>,
}

impl RoundOutcome {
    /// The audit record as one line of JSON (no trailing newline).
    pub fn to_json_line(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::InvalidMetadata {
            field: "round outcome".into(),
            value: format!("round {}", self.round),
            reason: e.to_string(),
        })
    }

    /// Appends the audit record and a newline to `out` (an audit log).
    pub fn write_json_line(&self, mut out: impl Write) -> Result<()> {
        let line = self.to_json_line()?;
        writeln!(out, "{line}").map_err(|source| Error::Io {
            path: "<audit log>".into(),
            source,
        })
    }

    /// The outcome of one client.
    pub fn client(&self, client: &str) -> Option<&ClientOutcome> {
        self.clients.iter().find(|c| c.client.as_str() == client)
    }
}

/// One entry point for a defended round: score each report with the probe,
/// check the step trail, assess each client with the detector, apply the
/// safety gate and hand the weighted updates to an [`Aggregator`].
///
/// Per-client faults never abort the round: a report whose update or step
/// adapters do not fit the global adapter or the probe's feature layout, or
/// whose self-reported scores are not finite, is **rejected** (factor 0,
/// [`Verdict::Undecided`], not aggregated, detector state untouched); a
/// report whose last step differs from its update gets factor 0 and
/// [`Verdict::Malicious`] (not aggregated, detector state untouched: its
/// evidence is not trusted). See [`Disposition`]. Round-level faults are errors: no reports, a repeated client id,
/// an aggregator error (the detector state has then already advanced:
/// checkpoint it before [`run`](Self::run) if you need to retry).
///
/// The safety gate is applied here, before the aggregator, so any rule is
/// gated: mean factor over *all* reports (rejected ones count 0, stricter
/// than the reference, which never rejects) below `skip_avg_weight` → the
/// round is skipped. The aggregator then receives every assessed client with
/// its factor as `security_factor`: weighted FedAvg weighs nₖ·wₖ, so a
/// factor of 0 removes the client; rules that ignore factors (Krum, median,
/// …) should be wrapped in [`FactorGate`](crate::aggregate::FactorGate) to
/// drop them.
///
/// ```
/// use safe_fedllm::aggregate::FedAvg;
/// use safe_fedllm::detect::{ClientLevel, ClientReport, DefendedRound, Verdict};
/// use safe_fedllm::features::{FeatureConfig, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::LinearProbe;
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let adapter = |x: f32, y: f32| -> safe_fedllm::Result<LoraAdapter> {
///     let mut a = LoraAdapter::new();
///     a.insert(key, LoraTensor::new("b", [2, 1], vec![x, y])?)?;
///     Ok(a)
/// };
/// let global = adapter(0.0, 0.0)?;
/// let spec = FeatureConfig::new(Selection::FirstLayerB)
///     .fit(&[LoraDelta::between(&adapter(1.0, 0.0)?, &global)?])?;
/// // A toy probe: updates along +x are malicious.
/// let probe = LinearProbe::new(spec, vec![20.0, 0.0], -10.0)?;
///
/// let mut round = DefendedRound::new(probe, ClientLevel::params().build()?, FedAvg::new());
/// let reports = vec![
///     ClientReport::new("a", adapter(0.0, 1.0)?, 100),
///     ClientReport::new("b", adapter(0.0, 0.5)?, 100),
///     ClientReport::new("evil", adapter(1.0, 0.0)?, 100),
/// ];
/// let outcome = round.run(0, &global, &reports)?;
/// assert!(!outcome.skipped);
/// let evil = outcome.client("evil").unwrap();
/// assert_eq!(evil.verdict, Verdict::Malicious);
/// assert!(evil.factor < 0.01);
/// let line = outcome.to_json_line()?; // one audit line per round
/// assert!(line.starts_with(r#"{"round":0,"level":"client""#));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub struct DefendedRound<P, D, A> {
    probe: P,
    detector: D,
    aggregator: A,
    params: RoundParams,
    shadow: Option<ShadowBranch>,
}

/// What the probe stage produced for one client.
enum Scored {
    Accepted {
        evidence: ClientEvidence,
        trail: TrailStatus,
    },
    Rejected {
        reason: String,
        update_score: Option<f32>,
        trail: TrailStatus,
    },
}

impl<P: Probe, D: Detector, A: Aggregator> DefendedRound<P, D, A> {
    /// A round with the reference settings ([`RoundParams::default`]) and no
    /// shadow branch.
    pub fn new(probe: P, detector: D, aggregator: A) -> Self {
        DefendedRound {
            probe,
            detector,
            aggregator,
            params: RoundParams::default(),
            shadow: None,
        }
    }

    /// Replaces the settings (validated).
    pub fn with_params(mut self, params: RoundParams) -> Result<Self> {
        params.check()?;
        self.params = params;
        Ok(self)
    }

    /// Sets the shadow branch whose base shadow-step adapters are scored
    /// against (needed when clients report [`StepsReport::Adapters`] for
    /// their shadow branch).
    pub fn with_shadow(mut self, shadow: ShadowBranch) -> Self {
        self.shadow = Some(shadow);
        self
    }

    /// The detector (for checkpointing its state).
    pub fn detector(&self) -> &D {
        &self.detector
    }

    /// The detector, mutable (for restoring a checkpoint).
    pub fn detector_mut(&mut self) -> &mut D {
        &mut self.detector
    }

    /// The aggregator.
    pub fn aggregator(&self) -> &A {
        &self.aggregator
    }

    /// The probe.
    pub fn probe(&self) -> &P {
        &self.probe
    }

    /// The shadow branch, if set.
    pub fn shadow(&self) -> Option<&ShadowBranch> {
        self.shadow.as_ref()
    }

    /// Whether `client` should train a shadow branch this round (tell the
    /// client before local training; see [`Detector::needs_shadow`]).
    pub fn needs_shadow(&self, client: &ClientId) -> bool {
        self.detector.needs_shadow(client)
    }

    /// Runs one round. `global` is the adapter the clients started from.
    pub fn run(
        &mut self,
        round: u32,
        global: &LoraAdapter,
        reports: &[ClientReport],
    ) -> Result<RoundOutcome> {
        let start = Instant::now();
        check_reports(reports)?;
        let level = self.detector.level();

        let probe_start = Instant::now();
        let scored: Vec<Scored> = reports
            .iter()
            .map(|r| self.score_report(round, global, r, level))
            .collect();
        let probe_s = secs(probe_start.elapsed());

        let detect_start = Instant::now();
        let mut clients = Vec::with_capacity(reports.len());
        for (report, scored) in reports.iter().zip(scored) {
            clients.push(self.assess(round, report, scored)?);
        }
        let detect_s = secs(detect_start.elapsed());

        let mean_factor = clients.iter().map(|c| c.factor).sum::<f64>() / clients.len() as f64;
        let mut outcome = RoundOutcome {
            round,
            level,
            aggregator: self.aggregator.name().to_owned(),
            clients,
            mean_factor,
            skip_avg_weight: self.params.skip_avg_weight,
            skipped: false,
            skip_reason: None,
            timings: RoundTimings {
                probe_s,
                detect_s,
                ..RoundTimings::default()
            },
            new_global: None,
        };
        if mean_factor < self.params.skip_avg_weight {
            outcome.skipped = true;
            outcome.skip_reason = Some(format!(
                "mean security factor {mean_factor:.6} < skip_avg_weight {}",
                self.params.skip_avg_weight
            ));
        } else {
            let aggregate_start = Instant::now();
            let aggregation = self.aggregate(global, reports, &outcome.clients)?;
            outcome.timings.aggregate_s = secs(aggregate_start.elapsed());
            record_aggregation(&mut outcome, aggregation);
        }
        outcome.timings.total_s = secs(start.elapsed());
        Ok(outcome)
    }

    fn score_report(
        &self,
        round: u32,
        global: &LoraAdapter,
        report: &ClientReport,
        level: DefenseLevel,
    ) -> Scored {
        let update_score = match self.score_update(global, &report.update) {
            Ok(s) => s,
            Err(e) => {
                return Scored::Rejected {
                    reason: format!("update rejected: {e}"),
                    update_score: None,
                    trail: TrailStatus::NotChecked,
                };
            }
        };
        let mut evidence =
            ClientEvidence::new(report.samples).with_last_step_score(Some(update_score));
        let rejected = |reason: String, trail: TrailStatus| Scored::Rejected {
            reason,
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
        if level.uses_all_steps() {
            match self.main_scores(global, &report.steps) {
                Ok(scores) => evidence.step_scores = scores,
                Err(e) => return rejected(format!("step adapters rejected: {e}"), trail),
            }
        }
        if level.uses_shadow() && self.detector.needs_shadow(&report.client) {
            match self.shadow_scores(&report.shadow) {
                Ok(scores) => evidence = evidence.with_shadow_steps(scores),
                Err(e) => return rejected(format!("shadow steps rejected: {e}"), trail),
            }
        }
        if let Err(e) = evidence.validate(round, &report.client) {
            return rejected(e.to_string(), trail);
        }
        Scored::Accepted { evidence, trail }
    }

    fn score_update(&self, global: &LoraAdapter, update: &LoraAdapter) -> Result<f32> {
        let delta = LazyDelta::new(update, global)?;
        let features = self.probe.feature_spec().transform(&delta)?;
        let score = self.probe.score_features(&features.values)?;
        if score.is_finite() {
            Ok(score)
        } else {
            Err(Error::NonFinite {
                tensor: "probe score of the update".into(),
                index: 0,
                value: score,
            })
        }
    }

    fn check_trail(&self, report: &ClientReport) -> Result<TrailStatus> {
        match &report.steps {
            StepsReport::Adapters(steps) => match steps.last() {
                Some(last) => check_trail(last, &report.update, self.params.trail),
                None => Ok(TrailStatus::NotChecked),
            },
            StepsReport::None | StepsReport::Scores(_) => Ok(TrailStatus::NotChecked),
        }
    }

    fn main_scores(&self, global: &LoraAdapter, steps: &StepsReport) -> Result<Vec<f32>> {
        match steps {
            StepsReport::None => Ok(Vec::new()),
            StepsReport::Scores(s) => Ok(s.clone()),
            StepsReport::Adapters(a) => score_steps(&self.probe, global, a),
        }
    }

    fn shadow_scores(&self, steps: &StepsReport) -> Result<Vec<f32>> {
        match (steps, &self.shadow) {
            (StepsReport::None, _) => Ok(Vec::new()),
            (StepsReport::Scores(s), _) => Ok(s.clone()),
            (StepsReport::Adapters(a), Some(shadow)) => shadow.score_steps(&self.probe, a),
            (StepsReport::Adapters(_), None) => Err(invalid_param(
                "shadow_branch",
                "none",
                "a ShadowBranch (DefendedRound::with_shadow) to score shadow adapters against",
            )),
        }
    }

    fn assess(
        &mut self,
        round: u32,
        report: &ClientReport,
        scored: Scored,
    ) -> Result<ClientOutcome> {
        let outcome =
            |disposition, factor: f64, verdict, reason, update_score, trail| ClientOutcome {
                client: report.client.clone(),
                samples: report.samples,
                disposition,
                factor,
                effective_weight: report.samples as f64 * factor,
                aggregation_weight: None,
                verdict,
                reason,
                update_score,
                trail,
                excluded: None,
            };
        Ok(match scored {
            Scored::Rejected {
                reason,
                update_score,
                trail,
            } => outcome(
                Disposition::Rejected,
                0.0,
                Verdict::Undecided,
                reason,
                update_score,
                trail,
            ),
            Scored::Accepted {
                evidence,
                trail: trail @ TrailStatus::Mismatch { .. },
            } => {
                let reason = match &trail {
                    TrailStatus::Mismatch { reason } => format!("trail check failed: {reason}"),
                    _ => String::new(),
                };
                outcome(
                    Disposition::TrailMismatch,
                    0.0,
                    Verdict::Malicious,
                    reason,
                    evidence.last_step_score,
                    trail,
                )
            }
            Scored::Accepted { evidence, trail } => {
                let a = self.detector.assess(round, &report.client, &evidence)?;
                outcome(
                    Disposition::Assessed,
                    a.factor,
                    a.verdict,
                    a.reason,
                    evidence.last_step_score,
                    trail,
                )
            }
        })
    }

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        reports: &[ClientReport],
        clients: &[ClientOutcome],
    ) -> Result<Aggregation> {
        let updates: Vec<ClientUpdate<'_>> = reports
            .iter()
            .zip(clients)
            .filter(|(_, c)| c.disposition == Disposition::Assessed)
            .map(|(r, c)| {
                ClientUpdate::new(r.client.clone(), &r.update, r.samples)
                    .with_security_factor(c.factor.clamp(0.0, 1.0))
            })
            .collect();
        if updates.is_empty() {
            return Err(Error::Empty {
                what: "the round's accepted client updates",
            });
        }
        self.aggregator.aggregate(global, &updates)
    }
}

fn record_aggregation(outcome: &mut RoundOutcome, aggregation: Aggregation) {
    for c in &mut outcome.clients {
        if let Some(contribution) = aggregation.contribution(c.client.as_str()) {
            c.aggregation_weight = Some(contribution.weight);
        }
        if let Some(exclusion) = aggregation.exclusion(c.client.as_str()) {
            c.excluded = Some(format!("{:?}", exclusion.reason));
        }
    }
    match aggregation.outcome {
        crate::aggregate::Outcome::Updated(adapter) => outcome.new_global = Some(adapter),
        crate::aggregate::Outcome::Skipped { reason } => {
            outcome.skipped = true;
            outcome.skip_reason = Some(format!("aggregator skipped: {reason:?}"));
        }
    }
}

fn check_reports(reports: &[ClientReport]) -> Result<()> {
    if reports.is_empty() {
        return Err(Error::Empty {
            what: "the round's client reports",
        });
    }
    let mut seen = BTreeSet::new();
    for r in reports {
        if !seen.insert(&r.client) {
            return Err(Error::DuplicateClient {
                client: r.client.to_string(),
            });
        }
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
