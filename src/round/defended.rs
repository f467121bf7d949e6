//! The defended round: admission → probe → detector → safety gate →
//! aggregator, with an audit record.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::ClientId;
use crate::aggregate::{
    Aggregation, Aggregator, AnyAggregator, ClientUpdate, SafetyGate, SkipReason,
};
use crate::detect::{
    AnyDetector, ClientEvidence, DefenseLevel, Detector, Opening, ShadowNeed, Verdict,
};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraKey, TensorSource, checked_range};
use crate::probe::{LinearProbe, Probe};
use crate::round::admission::{Admission, AdmissionDecision, Admitted, Rejection};
use crate::round::audit::{
    ClientOutcome, Disposition, Provenance, RoundOutcome, RoundTimings, TrailSummary,
};
use crate::round::commit::{self, AuditDraw, CommitmentStatus, ShadowPlan};
use crate::round::report::{ClientReport, StepsReport};
use crate::round::spec::ValidDefense;
use crate::round::steps::{ShadowBranch, score_step, score_steps, step_distances};
use crate::round::trail::{TrailCheck, TrailStatus, check_trail};

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
    gate: SafetyGate,
    trail: TrailCheck,
    admission: Admission,
    #[serde(default)]
    accept_self_reported: bool,
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

    /// Whether client-computed scores ([`StepsReport::Scores`]) are read.
    /// Default `false`: such a report is rejected
    /// ([`Rejection::InvalidEvidence`]), because a client that scores itself
    /// can claim anything. Enable for simulations or trusted client code;
    /// the audit then marks them [`Provenance::SelfReported`].
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

/// One entry point for a defended round: admit each message, score it with
/// the probe, check the step trail, assess each client with the detector,
/// apply the safety gate once and hand the weighted updates to an
/// [`Aggregator`].
///
/// **Per-client faults never abort the round.** A message that fails
/// admission ([`Rejection`]) or whose evidence cannot be used is
/// [`Disposition::Rejected`] (factor 0, [`Verdict::Undecided`], not
/// aggregated, detector state untouched); a message whose last step differs
/// from its update is [`Disposition::TrailMismatch`] (factor 0,
/// [`Verdict::Malicious`]). Every message carrying a repeated client id is
/// rejected ([`Rejection::DuplicateClient`]). Rejected and mismatched clients
/// count against the rule's Byzantine budget
/// ([`Aggregator::aggregate_after_removal`]); a rule still short of clients
/// skips the round ([`SkipReason::TooFewClients`]). Round-level faults are
/// errors: no reports, a non-finite global adapter, another aggregator error.
///
/// **A failed round changes nothing**: the detector assesses a copy of its
/// state, committed only when the round completes (applied or skipped), so a
/// server can retry a round that returned an error.
///
/// **One gate.** The mean factor over *all* reports (rejected ones count 0,
/// stricter than the reference, which never rejects) below
/// `skip_avg_weight` skips the round. The aggregator should not gate again
/// (`FedAvg::new()` does not); it receives every assessed client with its
/// factor, and weighted FedAvg weighs (admitted count)·factor. Rules that
/// ignore factors (Krum, median, …) should be wrapped in
/// [`FactorGate`](crate::aggregate::FactorGate) to drop factor-0 clients.
///
/// ```
/// use safe_fedllm::ClientId;
/// use safe_fedllm::aggregate::FedAvg;
/// use safe_fedllm::detect::{ClientLevel, Verdict};
/// use safe_fedllm::features::{FeatureConfig, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::LinearProbe;
/// use safe_fedllm::round::{ClientReport, DefendedRound};
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
/// let ids = [ClientId::from("a"), ClientId::from("b"), ClientId::from("evil")];
/// let updates = [adapter(0.0, 1.0)?, adapter(0.0, 0.5)?, adapter(1.0, 0.0)?];
/// let reports: Vec<ClientReport> =
///     ids.iter().zip(&updates).map(|(id, u)| ClientReport::new(id, u, 100)).collect();
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
    audits: Option<AuditDraw>,
    spec_sha256: Option<String>,
}

/// What the probe stage produced for one admitted client.
enum Scored {
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
struct Staged {
    decision: AdmissionDecision,
    scored: Scored,
}

impl DefendedRound<LinearProbe, AnyDetector, AnyAggregator> {
    /// The round a checked [`DefenseSpec`](crate::round::DefenseSpec)
    /// describes, with the probe it names (loaded from its path or built
    /// inline, with the spec's τ if it sets one). Every audit line records
    /// the spec's hash.
    ///
    /// ```
    /// use safe_fedllm::round::{DefendedRound, DefenseSpec};
    ///
    /// let spec = DefenseSpec::from_json(r#"{"probe": {"path": "no-such-probe.safetensors"}}"#)?;
    /// let valid = spec.check()?;
    /// assert!(DefendedRound::from_spec(&valid).is_err()); // the file is missing: a typed error
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn from_spec(spec: &ValidDefense) -> Result<Self> {
        let probe = spec.load_probe()?;
        Ok(Self::assemble(spec, probe))
    }

    /// The round a checked spec describes, with a probe the caller holds
    /// (for specs that name none, such as the presets). The spec's τ, if it
    /// sets one, replaces the probe's.
    pub fn from_spec_with_probe(spec: &ValidDefense, probe: LinearProbe) -> Result<Self> {
        let probe = spec.given_probe(probe)?;
        Ok(Self::assemble(spec, probe))
    }

    fn assemble(spec: &ValidDefense, probe: LinearProbe) -> Self {
        let (detector, aggregator, params) = spec.parts();
        DefendedRound {
            probe,
            detector,
            aggregator,
            params,
            shadow: None,
            audits: None,
            spec_sha256: Some(spec.sha256().to_owned()),
        }
    }
}

impl<P: Probe, D: Detector + Clone, A: Aggregator> DefendedRound<P, D, A> {
    /// A round with the safe default settings ([`RoundParams::default`]) and
    /// no shadow branch.
    pub fn new(probe: P, detector: D, aggregator: A) -> Self {
        DefendedRound {
            probe,
            detector,
            aggregator,
            params: RoundParams::default(),
            shadow: None,
            audits: None,
            spec_sha256: None,
        }
    }

    /// The same round with its aggregator wrapped or converted (for example
    /// boxed behind `dyn Aggregator`), keeping its state and spec hash.
    pub fn map_aggregator<B: Aggregator>(self, f: impl FnOnce(A) -> B) -> DefendedRound<P, D, B> {
        DefendedRound {
            probe: self.probe,
            detector: self.detector,
            aggregator: f(self.aggregator),
            params: self.params,
            shadow: self.shadow,
            audits: self.audits,
            spec_sha256: self.spec_sha256,
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

    /// The settings.
    pub fn params(&self) -> &RoundParams {
        &self.params
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

    /// The aggregator, mutable (for checkpointing a stateful rule).
    pub fn aggregator_mut(&mut self) -> &mut A {
        &mut self.aggregator
    }

    /// The probe.
    pub fn probe(&self) -> &P {
        &self.probe
    }

    /// Replaces the probe and returns the old one: a probe refresh
    /// ([`ProbeRefresh`](crate::round::ProbeRefresh)) between rounds. The
    /// detector's per-client state is kept; only later rounds are scored with
    /// the new probe.
    pub fn set_probe(&mut self, probe: P) -> P {
        std::mem::replace(&mut self.probe, probe)
    }

    /// The shadow branch, if set.
    pub fn shadow(&self) -> Option<&ShadowBranch> {
        self.shadow.as_ref()
    }

    /// Whether `client` should train a shadow branch this round (tell the
    /// client before local training; see [`Detector::needs_shadow`]).
    pub fn needs_shadow(&self, client: &ClientId) -> bool {
        match &self.audits {
            None => self.detector.needs_shadow(client),
            Some(_) => self.detector.shadow_need(client) != ShadowNeed::Never,
        }
    }

    /// Audits frozen clients by commit–reveal ([`commit`](crate::round::commit)):
    /// every client the level may audit must commit to its shadow report
    /// each round ([`needs_shadow`](Self::needs_shadow) is true for it every
    /// round, so it says nothing about the schedule), and `draw` decides
    /// after the upload which commitments to open. A client that breaks its
    /// commitment fails the audit.
    pub fn with_audits(mut self, draw: AuditDraw) -> Self {
        self.audits = Some(draw);
        self
    }

    /// Whether `client`'s shadow report is to be revealed this round: ask
    /// only after its upload (and commitment) arrived. Without commit–reveal
    /// this is the announced schedule, [`needs_shadow`](Self::needs_shadow).
    pub fn opens(&self, round: u32, client: &ClientId) -> bool {
        let need = self.detector.shadow_need(client);
        match &self.audits {
            None => self.detector.needs_shadow(client),
            Some(draw) => match need {
                ShadowNeed::Never => false,
                ShadowNeed::EveryRound => true,
                ShadowNeed::Audit => draw.opens(round, client),
            },
        }
    }

    /// Runs one round. `global` is the adapter the clients started from.
    pub fn run(
        &mut self,
        round: u32,
        global: &LoraAdapter,
        reports: &[ClientReport<'_>],
    ) -> Result<RoundOutcome> {
        let start = Instant::now();
        check_reports(reports)?;
        let level = self.detector.level();

        let admission_start = Instant::now();
        let probe_keys: Vec<&str> = self
            .probe
            .feature_spec()
            .layout()
            .iter()
            .map(|b| b.key.as_str())
            .collect();
        let decisions = self.admit(global, &probe_keys, reports)?;
        let admission_s = admission_start.elapsed().as_secs_f64();

        let probe_start = Instant::now();
        let staged: Vec<Staged> = reports
            .iter()
            .zip(decisions)
            .map(|(report, decision)| {
                let scored = self.score_report(round, global, report, &decision, level);
                Staged { decision, scored }
            })
            .collect();
        let probe_s = probe_start.elapsed().as_secs_f64();

        // The detector assesses a copy: the real state changes only when the
        // round completes.
        let detect_start = Instant::now();
        let mut detector = self.detector.clone();
        let mut clients = Vec::with_capacity(reports.len());
        for (report, staged) in reports.iter().zip(staged) {
            clients.push(assess(&mut detector, round, report, staged)?);
        }
        let detect_s = detect_start.elapsed().as_secs_f64();

        let mean_factor = clients.iter().map(|c| c.factor).sum::<f64>() / clients.len() as f64;
        let gate = self.params.gate;
        let mut outcome = RoundOutcome {
            round,
            level,
            aggregator: self.aggregator.name().to_owned(),
            clients,
            mean_factor,
            skip_avg_weight: gate.threshold(),
            threshold: self.probe.threshold(),
            spec_sha256: self.spec_sha256.clone(),
            skipped: false,
            skip_reason: None,
            timings: RoundTimings {
                admission_s,
                probe_s,
                detect_s,
                ..RoundTimings::default()
            },
            new_global: None,
        };
        if let Some(reason) = gate.skip_reason(mean_factor) {
            outcome.skipped = true;
            outcome.skip_reason = Some(reason);
        } else {
            let aggregate_start = Instant::now();
            let aggregation = self.aggregate(global, reports, &outcome.clients)?;
            outcome.timings.aggregate_s = aggregate_start.elapsed().as_secs_f64();
            record_aggregation(&mut outcome, aggregation);
        }
        self.detector = detector;
        outcome.timings.total_s = start.elapsed().as_secs_f64();
        Ok(outcome)
    }

    /// Admission, with every copy of a repeated client id rejected before
    /// it (so duplicates never enter the round's medians).
    fn admit(
        &self,
        global: &LoraAdapter,
        probe_keys: &[&str],
        reports: &[ClientReport<'_>],
    ) -> Result<Vec<AdmissionDecision>> {
        let mut copies: BTreeMap<&ClientId, usize> = BTreeMap::new();
        for r in reports {
            *copies.entry(r.client).or_default() += 1;
        }
        let repeated = |r: &ClientReport<'_>| copies.get(r.client).copied().unwrap_or(0) > 1;
        let messages: Vec<(&ClientId, &dyn TensorSource, u64)> = reports
            .iter()
            .filter(|r| !repeated(r))
            .map(|r| (r.client, r.update, r.samples))
            .collect();
        let mut admitted = self
            .params
            .admission
            .admit(global, probe_keys, &messages)?
            .into_iter();
        let mut decisions = Vec::with_capacity(reports.len());
        for r in reports {
            let decision = if repeated(r) {
                Some(AdmissionDecision {
                    client: r.client.clone(),
                    declared_samples: r.samples,
                    status: Admitted::Rejected(Rejection::DuplicateClient {
                        copies: copies.get(r.client).copied().unwrap_or(0),
                    }),
                })
            } else {
                admitted.next()
            };
            decisions.push(decision.ok_or_else(|| {
                Error::invariant(
                    "round::defended::admit",
                    "admission returns one decision per message",
                    format!("{} reports", reports.len()),
                )
            })?);
        }
        Ok(decisions)
    }

    fn score_report(
        &self,
        round: u32,
        global: &LoraAdapter,
        report: &ClientReport<'_>,
        decision: &AdmissionDecision,
        level: DefenseLevel,
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
        let reads_steps = level.uses_all_steps();
        let plan = if level.uses_shadow() {
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

    fn aggregate(
        &mut self,
        global: &LoraAdapter,
        reports: &[ClientReport<'_>],
        clients: &[ClientOutcome],
    ) -> Result<Aggregation> {
        let sources: Vec<(&ClientOutcome, Clipped<'_>)> = reports
            .iter()
            .zip(clients)
            .filter(|(_, c)| c.disposition == Disposition::Assessed)
            .map(|(r, c)| (c, Clipped::new(r.update, global, &c.admission)))
            .collect();
        let updates: Vec<ClientUpdate<'_>> = sources
            .iter()
            .map(|(c, source)| {
                ClientUpdate::new(c.client.clone(), source as &dyn TensorSource, c.samples)
                    .with_security_factor(c.factor.clamp(0.0, 1.0))
            })
            .collect();
        if updates.is_empty() {
            return Ok(skipped(SkipReason::NoClientLeft));
        }
        // Rejected and trail-mismatched clients count against the rule's
        // Byzantine budget; a rule still left without enough clients skips
        // the round (typed) rather than failing it for everyone.
        let removed = reports.len().saturating_sub(updates.len());
        match self
            .aggregator
            .aggregate_after_removal(global, &updates, removed)
        {
            Err(Error::TooFewClients {
                rule,
                constraint,
                required,
                found,
            }) => Ok(skipped(SkipReason::TooFewClients {
                rule: rule.to_owned(),
                constraint,
                required,
                found,
            })),
            other => other,
        }
    }
}

fn skipped(reason: SkipReason) -> Aggregation {
    Aggregation {
        outcome: crate::aggregate::Outcome::Skipped { reason },
        contributions: Vec::new(),
        exclusions: Vec::new(),
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
fn assess<D: Detector>(
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
            o.step_evidence = steps;
            o.shadow_evidence = shadow;
            o.step_trail = step_trail;
            o.shadow_commitment = commitment;
            o
        }
    })
}

fn record_aggregation(outcome: &mut RoundOutcome, aggregation: Aggregation) {
    for c in &mut outcome.clients {
        if let Some(contribution) = aggregation.contribution(c.client.as_str()) {
            c.aggregation_weight = Some(contribution.weight);
        }
        if let Some(exclusion) = aggregation.exclusion(c.client.as_str()) {
            c.excluded = Some(exclusion.reason.clone());
        }
    }
    match aggregation.outcome {
        crate::aggregate::Outcome::Updated(adapter) => outcome.new_global = Some(adapter),
        crate::aggregate::Outcome::Skipped { reason } => {
            outcome.skipped = true;
            outcome.skip_reason = Some(reason);
        }
    }
}

fn check_reports(reports: &[ClientReport<'_>]) -> Result<()> {
    if reports.is_empty() {
        return Err(Error::Empty {
            what: "the round's client reports",
        });
    }
    Ok(())
}

/// An admitted update as the aggregator sees it: as sent, or with its delta
/// scaled to the norm bound (`global + scale·(update − global)`).
struct Clipped<'a> {
    update: &'a dyn TensorSource,
    global: &'a LoraAdapter,
    scale: Option<f32>,
}

impl<'a> Clipped<'a> {
    fn new(update: &'a dyn TensorSource, global: &'a LoraAdapter, admitted: &Admitted) -> Self {
        let scale = match admitted {
            Admitted::Clipped { scale, .. } => Some(*scale as f32),
            _ => None,
        };
        Clipped {
            update,
            global,
            scale,
        }
    }
}

impl TensorSource for Clipped<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.update.lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.update.shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        self.update.read_range(canonical, offset, out)?;
        let Some(scale) = self.scale else {
            return Ok(());
        };
        let range = checked_range(self.global, canonical, offset, out.len())?;
        let base = self
            .global
            .as_f32(canonical)
            .and_then(|b| b.get(range))
            .ok_or_else(|| Error::MissingKey {
                tensor: canonical.to_owned(),
                present_in: "the update",
                missing_from: "the global adapter",
            })?;
        out.iter_mut()
            .zip(base)
            .for_each(|(o, g)| *o = g + scale * (*o - g));
        Ok(())
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        match self.scale {
            None => self.update.as_f32(canonical),
            Some(_) => None,
        }
    }
}
