//! Evidence-level: shadow-level plus per-client memory, freezing and audits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detect::shadow::ShadowLevelParams;
use crate::detect::{
    Assessment, ClientEvidence, ClientId, DEFAULT_AUDIT_INTERVAL, DEFAULT_EVIDENCE_MIN,
    DefenseLevel, Detector, LevelRepr, MissingEvidence, Opening, Safeguards, ShadowNeed, Verdict,
    check_positive_int, check_state, safeguard,
};
use crate::error::{Error, Result};

/// Unchecked evidence-level settings; [`EvidenceLevelParams::build`]
/// validates them.
///
/// | setting | default | reference |
/// |---|---|---|
/// | [`shadow`](Self::shadow) | [`ShadowLevelParams`] defaults (η = 7, batch 16 × 1; τ is the probe's) | `evidence_eta`, … |
/// | [`evidence_min`](Self::evidence_min) | 3 | `evidence_min` |
/// | [`audit_interval`](Self::audit_interval) | 5 | `audit_interval` |
/// | [`missing_last_score`](Self::missing_last_score) | [`MissingEvidence::FromUpdate`] | [`MissingEvidence::Benign`]: missing → benign |
/// | [`safeguards`](Self::safeguards) | [`Safeguards::default`] | [`Safeguards::reference`] |
///
/// `min_weight` and the missing-shadow-steps policy are the shadow
/// settings' ([`ShadowLevelParams::min_weight`], [`ShadowLevelParams::missing_steps`]);
/// the shadow settings' safeguards are not read (these are).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvidenceLevelParams {
    shadow: ShadowLevelParams,
    evidence_min: usize,
    audit_interval: u32,
    missing_last_score: MissingEvidence,
    #[serde(default)]
    safeguards: Safeguards,
}

impl Default for EvidenceLevelParams {
    fn default() -> Self {
        EvidenceLevelParams {
            shadow: ShadowLevelParams::default(),
            evidence_min: DEFAULT_EVIDENCE_MIN,
            audit_interval: DEFAULT_AUDIT_INTERVAL,
            missing_last_score: MissingEvidence::FromUpdate,
            safeguards: Safeguards::default(),
        }
    }
}

impl EvidenceLevelParams {
    setters! {
        /// The shadow-level settings used for the per-round factor (η, batch,
        /// grad-accum, `min_weight`, missing
        /// shadow steps).
        shadow: ShadowLevelParams;
        /// Consecutive agreeing verdicts (≥ 1) that freeze a client.
        evidence_min: usize;
        /// A client frozen as benign is audited in every `audit_interval`-th round it
        /// takes part in (≥ 1), counted from its freeze or last audit.
        audit_interval: u32;
        /// How a missing last shadow-step score counts. Default
        /// [`MissingEvidence::FromUpdate`]: the verdict on the update the server
        /// scored itself, so a client that withholds its shadow cannot collect
        /// benign evidence or pass an audit by doing so.
        /// [`MissingEvidence::Benign`] reproduces the reference (whose client
        /// level does the opposite); [`MissingEvidence::Malicious`] is stricter.
        missing_last_score: MissingEvidence;
        /// The protocol safeguards: in a round whose update scores ≥ τ the
        /// factor is at most the client level's raw factor for that score, also
        /// while the client is frozen benign; a new identity is on probation.
        /// [`Safeguards::reference`] reproduces the paper.
        safeguards: Safeguards;
    }

    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        const LEVEL: &str = "evidence level";
        self.shadow.check()?;
        self.safeguards.check()?;
        check_positive_int(LEVEL, "evidence_min", self.evidence_min as u64)?;
        check_positive_int(LEVEL, "audit_interval", u64::from(self.audit_interval))
    }

    /// Validates the settings and builds a detector with no client state.
    pub fn build(self) -> Result<EvidenceLevel> {
        self.check()?;
        Ok(EvidenceLevel {
            params: self,
            clients: BTreeMap::new(),
        })
    }
}

/// Where a client stands in the evidence protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum EvidenceStatus {
    /// Collecting evidence; the factor is this round's shadow factor.
    Collecting,
    /// Frozen as benign: the factor is `weight` until an audit fails.
    FrozenBenign {
        /// Mean of the `evidence_min` agreeing factors that froze it.
        weight: f64,
    },
    /// Frozen as malicious: factor 0 for good (no more shadow training).
    FrozenMalicious,
}

/// One evidence record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceEntry {
    /// Round it was recorded in.
    pub round: u32,
    /// That round's shadow factor (before `min_weight`).
    pub factor: f64,
    /// That round's verdict: last shadow step's score ≥ τ.
    pub malicious: bool,
}

/// One client's evidence state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceClientState {
    /// Freeze status.
    pub status: EvidenceStatus,
    /// Evidence collected since the last restart (at most `evidence_min`).
    pub evidence: Vec<EvidenceEntry>,
    /// Participating rounds since the freeze or the last audit.
    pub audit_counter: u32,
    /// Rounds the client was assessed in (probation counts these).
    #[serde(default)]
    pub rounds: u64,
}

impl Default for EvidenceClientState {
    fn default() -> Self {
        EvidenceClientState {
            status: EvidenceStatus::Collecting,
            evidence: Vec::new(),
            audit_counter: 0,
            rounds: 0,
        }
    }
}

/// **Evidence-level** detection (in the reference code after the paper's
/// first version): shadow-level plus memory.
///
/// Each round a collecting client records (w, malicious) where w is the
/// shadow factor (1 − r)^η and *malicious* means its last shadow step scored
/// ≥ τ. When its last `evidence_min` (3) records all agree it is frozen:
///
/// * all malicious → w = 0 for good, and it no longer trains a shadow branch
///   ([`Detector::needs_shadow`] is false);
/// * all benign → w = the mean of those `evidence_min` factors (the records
///   since the last restart, which are exactly the agreeing ones), and it
///   trains a shadow branch only in audit rounds: every `audit_interval` (5)
///   rounds *it takes part in*, counted from the freeze or the last audit.
///   An audit whose last shadow step scores ≥ τ un-freezes it, clears its
///   evidence and gives w = 0 that round; a passed audit keeps the frozen
///   weight and restarts the count.
///
/// Disagreeing records restart collection (the records are cleared; the
/// round's factor is still that round's shadow factor). A missing last
/// shadow score counts as benign by default (the reference); see
/// [`EvidenceLevelParams::missing_last_score`] for the safer choice.
///
/// **Not monotone:** unlike the other levels, a harsher last step can *raise*
/// this round's factor. A client whose last verdict turns malicious breaks a
/// benign streak and receives its raw shadow factor, which can exceed the
/// benign-freeze mean it would otherwise have been given (see the unit test
/// `a_verdict_flip_can_raise_the_factor`). This is the reference's
/// behaviour, kept as is; it is bounded by the shadow factor itself.
///
/// **When to use:** long runs with stable client populations: frozen
/// clients cost no shadow training, and a client caught three times is
/// excluded for good. **Cost:** like [`ShadowLevel`](super::ShadowLevel)
/// while collecting; far less once most clients are frozen. **Threat
/// model:** as shadow level, plus: a client that behaves for
/// `evidence_min` rounds is frozen benign and then only checked every
/// `audit_interval` rounds — harmful updates between audits pass with the
/// frozen weight. Pair it with a robust aggregator, or audit more often.
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, EvidenceLevel, EvidenceStatus};
///
/// let mut d = EvidenceLevel::params().build()?;
/// let id = ClientId::from("m");
/// let harmful = ClientEvidence::new(32).with_shadow_steps(vec![0.9, 0.95]);
/// for round in 0..3 {
///     d.assess(round, &id, &harmful)?;
/// }
/// assert_eq!(d.client_state(&id).map(|s| &s.status), Some(&EvidenceStatus::FrozenMalicious));
/// assert!(!d.needs_shadow(&id));
/// // Frozen for good, whatever it reports later.
/// let benign = ClientEvidence::new(32).with_shadow_steps(vec![0.1, 0.1]);
/// assert_eq!(d.assess(3, &id, &benign)?.factor, 0.0);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LevelRepr<EvidenceLevelParams, EvidenceClientState>")]
pub struct EvidenceLevel {
    params: EvidenceLevelParams,
    clients: BTreeMap<ClientId, EvidenceClientState>,
}

impl TryFrom<LevelRepr<EvidenceLevelParams, EvidenceClientState>> for EvidenceLevel {
    type Error = Error;

    fn try_from(repr: LevelRepr<EvidenceLevelParams, EvidenceClientState>) -> Result<Self> {
        let (params, clients) = repr.checked(EvidenceLevelParams::check, |params, state| {
            if let EvidenceStatus::FrozenBenign { weight } = state.status {
                check_state("frozen weight", (0.0..=1.0).contains(&weight), weight)?;
            }
            for e in &state.evidence {
                check_state("evidence factor", (0.0..=1.0).contains(&e.factor), e.factor)?;
            }
            let n = state.evidence.len();
            check_state("evidence count", n <= params.evidence_min, n)
        })?;
        Ok(EvidenceLevel { params, clients })
    }
}

impl EvidenceLevel {
    /// Settings with the reference defaults.
    pub fn params() -> EvidenceLevelParams {
        EvidenceLevelParams::default()
    }

    /// The validated settings.
    pub fn settings(&self) -> &EvidenceLevelParams {
        &self.params
    }

    /// A client's evidence state, if it was ever assessed.
    pub fn client_state(&self, client: &ClientId) -> Option<&EvidenceClientState> {
        self.clients.get(client)
    }

    /// This round's verdict from the last shadow score: true = malicious.
    fn last_is_malicious(&self, evidence: &ClientEvidence) -> (bool, String) {
        let tau = evidence.threshold;
        if evidence.opening == Opening::Broken {
            return (true, "shadow commitment broken".to_owned());
        }
        match evidence.shadow_last_score {
            Some(s) => (s >= tau, format!("last shadow score {s:.6} vs τ = {tau}")),
            None => {
                let policy = self.params.missing_last_score;
                let malicious = match (policy, evidence.last_step_score) {
                    (MissingEvidence::Benign, _) => false,
                    (MissingEvidence::Malicious, _) | (MissingEvidence::FromUpdate, None) => true,
                    (MissingEvidence::FromUpdate, Some(s)) => s >= tau,
                };
                (
                    malicious,
                    format!("last shadow score missing, counted {policy:?}"),
                )
            }
        }
    }

    fn frozen_benign(
        &mut self,
        client: &ClientId,
        weight: f64,
        evidence: &ClientEvidence,
    ) -> Assessment {
        let interval = self.params.audit_interval;
        let min_weight = self.params.shadow.min_weight;
        let (malicious, why) = self.last_is_malicious(evidence);
        let state = self.clients.entry(client.clone()).or_default();
        match evidence.opening {
            Opening::Scheduled => {
                state.audit_counter = state.audit_counter.saturating_add(1);
                if state.audit_counter < interval {
                    let reason = format!(
                        "frozen benign with weight {weight:.6}; next audit in {} round(s)",
                        interval - state.audit_counter
                    );
                    return Assessment::new(weight, min_weight, Verdict::Benign, reason);
                }
            }
            Opening::Sealed => {
                let reason = format!("frozen benign with weight {weight:.6}; commitment not drawn");
                return Assessment::new(weight, min_weight, Verdict::Benign, reason);
            }
            Opening::Opened | Opening::Broken => {}
        }
        state.audit_counter = 0;
        if malicious {
            *state = EvidenceClientState {
                rounds: state.rounds,
                ..EvidenceClientState::default()
            };
            let reason = format!("audit failed ({why}): un-frozen, evidence cleared");
            Assessment::new(0.0, min_weight, Verdict::Malicious, reason)
        } else {
            let reason = format!("audit passed ({why}): keeps frozen weight {weight:.6}");
            Assessment::new(weight, min_weight, Verdict::Benign, reason)
        }
    }

    fn collect(&mut self, round: u32, client: &ClientId, evidence: &ClientEvidence) -> Assessment {
        let p = &self.params;
        let mut ratio = p.shadow.harmful_ratio(evidence);
        if evidence.opening == Opening::Broken {
            ratio.ratio = 1.0;
        }
        let factor = p.shadow.factor(ratio.ratio);
        let shadow_reason = ratio.describe(evidence.shadow_scores.len(), p.shadow.eta, factor);
        let (malicious, why) = self.last_is_malicious(evidence);
        let (min_weight, needed) = (p.shadow.min_weight, p.evidence_min);
        let state = self.clients.entry(client.clone()).or_default();
        state.evidence.push(EvidenceEntry {
            round,
            factor,
            malicious,
        });
        let verdict = if malicious {
            Verdict::Malicious
        } else {
            Verdict::Benign
        };
        let n = state.evidence.len();
        if n >= needed {
            let recent: Vec<&EvidenceEntry> = state.evidence.iter().skip(n - needed).collect();
            if recent.iter().all(|e| e.malicious) {
                state.status = EvidenceStatus::FrozenMalicious;
                state.audit_counter = 0;
                let reason =
                    format!("{needed} consecutive malicious verdicts ({why}): frozen malicious");
                return Assessment::new(0.0, min_weight, Verdict::Malicious, reason);
            }
            if recent.iter().all(|e| !e.malicious) {
                let weight = recent.iter().map(|e| e.factor).sum::<f64>() / needed as f64;
                state.status = EvidenceStatus::FrozenBenign { weight };
                state.audit_counter = 0;
                let reason = format!(
                    "{needed} consecutive benign verdicts ({why}): frozen benign with the mean \
                     factor {weight:.6}"
                );
                return Assessment::new(weight, min_weight, Verdict::Benign, reason);
            }
            state.evidence.clear();
            let reason =
                format!("{shadow_reason}; {why}; evidence disagrees, collection restarted");
            return Assessment::new(factor, min_weight, verdict, reason);
        }
        let reason = format!("{shadow_reason}; {why}; evidence {n}/{needed}");
        Assessment::new(factor, min_weight, verdict, reason)
    }
}

impl Detector for EvidenceLevel {
    fn level(&self) -> DefenseLevel {
        DefenseLevel::Evidence
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        evidence.validate(round, client)?;
        let status = self.clients.get(client).map(|s| s.status.clone());
        let a = match status {
            Some(EvidenceStatus::FrozenMalicious) => Assessment::new(
                0.0,
                self.params.shadow.min_weight,
                Verdict::Malicious,
                "frozen malicious".to_owned(),
            ),
            Some(EvidenceStatus::FrozenBenign { weight }) => {
                self.frozen_benign(client, weight, evidence)
            }
            Some(EvidenceStatus::Collecting) | None => self.collect(round, client, evidence),
        };
        let state = self.clients.entry(client.clone()).or_default();
        state.rounds = state.rounds.saturating_add(1);
        let p = &self.params;
        let (factor, verdict, capped) = p.safeguards.apply(
            a.factor,
            a.verdict,
            evidence,
            state.rounds,
            safeguard::reference_raw_factor,
        );
        Ok(Assessment::new(
            factor,
            p.shadow.min_weight,
            verdict,
            a.reason + &capped,
        ))
    }

    /// The reference's `use_shadow`: collecting clients train a shadow
    /// branch every round; clients frozen malicious never again; clients
    /// frozen benign only in their audit round (the reference's default
    /// `audit_interval` there is 10 while the detector's is 5; here both use
    /// the one configured value).
    fn shadow_need(&self, client: &ClientId) -> ShadowNeed {
        match self.clients.get(client).map(|s| &s.status) {
            None | Some(EvidenceStatus::Collecting) => ShadowNeed::EveryRound,
            Some(EvidenceStatus::FrozenMalicious) => ShadowNeed::Never,
            Some(EvidenceStatus::FrozenBenign { .. }) => ShadowNeed::Audit,
        }
    }

    fn needs_shadow(&self, client: &ClientId) -> bool {
        match self
            .clients
            .get(client)
            .map(|s| (&s.status, s.audit_counter))
        {
            None | Some((EvidenceStatus::Collecting, _)) => true,
            Some((EvidenceStatus::FrozenMalicious, _)) => false,
            Some((EvidenceStatus::FrozenBenign { .. }, counter)) => {
                counter.saturating_add(1) >= self.params.audit_interval
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn benign() -> ClientEvidence {
        ClientEvidence::new(32).with_shadow_steps(vec![0.1, 0.2])
    }

    fn harmful() -> ClientEvidence {
        ClientEvidence::new(32).with_shadow_steps(vec![0.1, 0.9])
    }

    #[test]
    fn benign_client_is_frozen_with_the_mean_then_audited() {
        let mut d = EvidenceLevel::params()
            .safeguards(Safeguards::reference())
            .build()
            .unwrap();
        let id = ClientId::from("b");
        // r = 16/32 for harmful-first-step evidence with a benign last step.
        let mixed = ClientEvidence::new(32).with_shadow_steps(vec![0.9, 0.1]);
        let f0 = d.assess(0, &id, &mixed).unwrap().factor;
        assert!((f0 - 0.5f64.powi(7)).abs() < 1e-15);
        d.assess(1, &id, &benign()).unwrap();
        let frozen = d.assess(2, &id, &benign()).unwrap();
        assert!((frozen.factor - (f0 + 2.0) / 3.0).abs() < 1e-15);
        // Rounds 3..6 are not audits: frozen weight even with harmful evidence.
        for round in 3..7 {
            assert!(!d.needs_shadow(&id) || round == 7);
            let a = d.assess(round, &id, &harmful()).unwrap();
            assert_eq!(a.factor, frozen.factor);
        }
        assert!(d.needs_shadow(&id));
        // Round 7 is the 5th participating round after the freeze: audit fails.
        let audit = d.assess(7, &id, &harmful()).unwrap();
        assert_eq!(audit.factor, 0.0);
        assert_eq!(
            d.client_state(&id).map(|s| s.status.clone()),
            Some(EvidenceStatus::Collecting)
        );
        assert!(d.client_state(&id).is_some_and(|s| s.evidence.is_empty()));
    }

    #[test]
    fn a_verdict_flip_can_raise_the_factor() {
        let id = ClientId::from("f");
        // Five of ten steps harmful, last step benign: r = 0.5.
        let half = ClientEvidence::new(160)
            .with_shadow_steps(vec![0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]);
        let clean = ClientEvidence::new(160).with_shadow_steps(vec![0.1; 10]);
        let mut flipped = vec![0.1; 10];
        flipped[9] = 0.9;
        let flipped = ClientEvidence::new(160).with_shadow_steps(flipped);
        let mut a = EvidenceLevel::params().build().unwrap();
        let mut b = a.clone();
        for d in [&mut a, &mut b] {
            d.assess(0, &id, &half).unwrap();
            d.assess(1, &id, &half).unwrap();
        }
        let frozen = a.assess(2, &id, &clean).unwrap().factor;
        let caught = b.assess(2, &id, &flipped).unwrap().factor;
        assert!((frozen - (2.0 * 0.5f64.powi(7) + 1.0) / 3.0).abs() < 1e-15);
        assert!((caught - 0.9f64.powi(7)).abs() < 1e-15);
        assert!(caught > frozen);
    }

    #[test]
    fn disagreeing_evidence_restarts_collection() {
        let mut d = EvidenceLevel::params().build().unwrap();
        let id = ClientId::from("x");
        d.assess(0, &id, &benign()).unwrap();
        d.assess(1, &id, &benign()).unwrap();
        let a = d.assess(2, &id, &harmful()).unwrap();
        assert!((a.factor - 0.5f64.powi(7)).abs() < 1e-15);
        assert!(d.client_state(&id).is_some_and(|s| s.evidence.is_empty()));
    }

    #[test]
    fn missing_last_score_policies() {
        let silent = ClientEvidence::new(32)
            .with_shadow_steps(vec![0.1, 0.1])
            .with_shadow_last_score(None);
        let id = ClientId::from("s");
        let mut reference = EvidenceLevel::params()
            .missing_last_score(MissingEvidence::Benign)
            .build()
            .unwrap();
        let mut safer = EvidenceLevel::params()
            .missing_last_score(MissingEvidence::Malicious)
            .build()
            .unwrap();
        for round in 0..3 {
            reference.assess(round, &id, &silent).unwrap();
            safer.assess(round, &id, &silent).unwrap();
        }
        assert_eq!(
            reference.client_state(&id).map(|s| s.status.clone()),
            Some(EvidenceStatus::FrozenBenign { weight: 1.0 })
        );
        assert_eq!(
            safer.client_state(&id).map(|s| s.status.clone()),
            Some(EvidenceStatus::FrozenMalicious)
        );
    }

    #[test]
    fn zero_settings_are_rejected() {
        assert!(matches!(
            EvidenceLevel::params().evidence_min(0).build(),
            Err(Error::InvalidParameter {
                name: "evidence_min",
                ..
            })
        ));
        assert!(matches!(
            EvidenceLevel::params().audit_interval(0).build(),
            Err(Error::InvalidParameter {
                name: "audit_interval",
                ..
            })
        ));
    }
}
