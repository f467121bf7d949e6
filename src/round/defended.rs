//! The defended round: admission → probe → detector → safety gate →
//! aggregator, with an audit record.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::ClientId;
use crate::aggregate::{Aggregation, Aggregator, AnyAggregator, ClientUpdate, SkipReason};
use crate::detect::{AnyDetector, Detector, ShadowNeed};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraKey, TensorSource, checked_range};
use crate::probe::{LinearProbe, Probe};
use crate::round::admission::{AdmissionDecision, Admitted, Rejection};
use crate::round::audit::{ClientOutcome, Disposition, RoundOutcome, RoundTimings};
use crate::round::commit::{AuditDraw, AuditSpec};
use crate::round::params::RoundParams;
use crate::round::report::ClientReport;
use crate::round::scoring::{Staged, assess};
use crate::round::spec::ValidDefense;
use crate::round::steps::ShadowBranch;

/// One entry point for a defended round: admit each message, score it with
/// the probe, check the step trail, assess each client with the detector,
/// apply the safety gate once and hand the weighted updates to an
/// [`Aggregator`].
///
/// **Per-client faults never abort the round.** A message that fails
/// admission ([`Rejection`]) or whose evidence cannot be used is
/// [`Disposition::Rejected`] (factor 0, [`Verdict::Undecided`](crate::detect::Verdict::Undecided), not
/// aggregated, detector state untouched); a message whose last step differs
/// from its update is [`Disposition::TrailMismatch`] (factor 0,
/// [`Verdict::Malicious`](crate::detect::Verdict::Malicious)). Every message carrying a repeated client id is
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
    pub(super) probe: P,
    pub(super) detector: D,
    pub(super) aggregator: A,
    pub(super) params: RoundParams,
    pub(super) shadow: Option<ShadowBranch>,
    pub(super) audits: Option<AuditDraw>,
    /// The spec's audit rate, drawn once the server gives its secret.
    pub(super) audit_spec: Option<AuditSpec>,
    pub(super) spec_sha256: Option<String>,
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
            audit_spec: spec.spec().audits,
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
            audit_spec: None,
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
            audit_spec: self.audit_spec,
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
    /// against (needed when clients report [`StepsReport::Adapters`](crate::round::StepsReport::Adapters) for
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
        if self.audits.is_none() && self.audit_spec.is_none() {
            self.detector.needs_shadow(client)
        } else {
            self.detector.shadow_need(client) != ShadowNeed::Never
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

    /// Keys the audits of the spec's `[audits]` section with the server's
    /// `secret` (32 bytes from the OS's random source, kept off the spec:
    /// whoever knows it can predict every draw). A round built from a spec
    /// with audits refuses to run until it has one; a spec without audits
    /// is an error here, so a secret is never silently ignored.
    ///
    /// ```
    /// use safe_fedllm::features::{FeatureConfig, Selection};
    /// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
    /// use safe_fedllm::probe::LinearProbe;
    /// use safe_fedllm::round::{DefendedRound, DefenseSpec};
    /// # let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    /// # let adapter = |x: f32, y: f32| -> safe_fedllm::Result<LoraAdapter> {
    /// #     let mut a = LoraAdapter::new();
    /// #     a.insert(key, LoraTensor::new("b", [2, 1], vec![x, y])?)?;
    /// #     Ok(a)
    /// # };
    /// # let layout = FeatureConfig::new(Selection::FirstLayerB)
    /// #     .fit(&[LoraDelta::between(&adapter(1.0, 0.0)?, &adapter(0.0, 0.0)?)?])?;
    /// # let probe = || LinearProbe::new(layout.clone(), vec![20.0, 0.0], -10.0);
    ///
    /// let spec = DefenseSpec::from_toml("[detector]\nlevel = \"evidence\"\n[audits]\nrate = 0.25\n")?;
    /// let valid = spec.check()?;
    /// let keyed = DefendedRound::from_spec_with_probe(&valid, probe()?)?.with_audit_secret([7; 32])?;
    /// assert_eq!(keyed.audit_rate(), Some(0.25));
    /// // Without `[audits]`, a secret is refused.
    /// let plain = DefenseSpec::safe().check()?;
    /// assert!(DefendedRound::from_spec_with_probe(&plain, probe()?)?.with_audit_secret([7; 32]).is_err());
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn with_audit_secret(mut self, secret: [u8; 32]) -> Result<Self> {
        let spec = self.audit_spec.ok_or_else(|| Error::Spec {
            key: "audits".to_owned(),
            reason: "an audit secret was given but the spec sets no `[audits]` rate".to_owned(),
            suggestion: None,
        })?;
        self.audits = Some(spec.draw(secret)?);
        Ok(self)
    }

    /// The rate at which audited commitments are opened, if commit–reveal
    /// is on.
    pub fn audit_rate(&self) -> Option<f64> {
        self.audits
            .as_ref()
            .map(AuditDraw::rate)
            .or(self.audit_spec.map(|a| a.rate))
    }

    /// Fails when the spec asks for audits and the server gave no secret:
    /// running without them would fall back to the announced schedule a
    /// frozen client can game.
    fn check_audits_keyed(&self) -> Result<()> {
        match (&self.audit_spec, &self.audits) {
            (Some(spec), None) => Err(Error::Spec {
                key: "audits".to_owned(),
                reason: format!(
                    "the spec audits at rate {} but no server secret was given \
                     (DefendedRound::with_audit_secret)",
                    spec.rate
                ),
                suggestion: None,
            }),
            _ => Ok(()),
        }
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
        self.check_audits_keyed()?;
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
