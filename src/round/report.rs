//! What a client sends the server at the end of a round: its update, the
//! sample count it declares, its step trail, its shadow report and the
//! commitment to that report, borrowed ([`ClientReport`]) or owned
//! ([`OwnedReport`]).

use crate::ClientId;
use crate::error::Result;
use crate::lora::{LoraAdapter, LoraKey, TensorSource};
use crate::round::commit::ShadowCommitment;

/// A branch's step evidence as a client reports it.
#[derive(Clone, Default)]
pub enum StepsReport<'a> {
    /// Nothing reported.
    #[default]
    None,
    /// The adapter after every local step, in order. The server scores each
    /// against the branch's base (the round's global adapter for the main
    /// branch, the [`ShadowBranch`](crate::round::ShadowBranch) base for the shadow branch) and, for the
    /// main branch, checks that the last one equals the update
    /// ([`check_trail`](crate::round::check_trail)).
    Adapters(Vec<&'a dyn TensorSource>),
    /// Scores the client computed itself. Unverifiable: marked
    /// [`Provenance::SelfReported`](crate::round::Provenance::SelfReported) in the audit. Use in simulations or with
    /// trusted client code only.
    Scores(&'a [f32]),
}

impl std::fmt::Debug for StepsReport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepsReport::None => f.write_str("None"),
            StepsReport::Adapters(a) => write!(f, "Adapters({} steps)", a.len()),
            StepsReport::Scores(s) => f.debug_tuple("Scores").field(s).finish(),
        }
    }
}

/// What one client sends the server at the end of a round, borrowed from
/// wherever the server keeps it (owned adapters, validated views over
/// upload bytes or an mmap, numpy arrays behind Python).
#[derive(Clone, Debug)]
pub struct ClientReport<'a> {
    /// Who sent it.
    pub client: &'a ClientId,
    /// Its adapter after local training (full weights, not a delta).
    pub update: &'a dyn TensorSource,
    /// The sample count it declares. Admission decides what it is worth.
    pub samples: u64,
    /// Main-branch step evidence (read by [`StepLevel`](crate::detect::StepLevel)).
    pub steps: StepsReport<'a>,
    /// Shadow-branch step evidence (read by the shadow and evidence levels).
    /// Under commit–reveal audits, the revealed report of an opened client.
    pub shadow: StepsReport<'a>,
    /// The client's commitment to its shadow report, uploaded with the
    /// update (commit–reveal audits, [`DefendedRound::with_audits`](crate::round::DefendedRound::with_audits)).
    pub shadow_commitment: Option<ShadowCommitment>,
}

impl std::fmt::Debug for dyn TensorSource + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.lora_keys().map(LoraKey::canonical).collect();
        write!(f, "TensorSource({} tensors)", keys.len())
    }
}

impl<'a> ClientReport<'a> {
    /// A report with an update and declared sample count, and no step evidence.
    pub fn new(client: &'a ClientId, update: &'a dyn TensorSource, samples: u64) -> Self {
        ClientReport {
            client,
            update,
            samples,
            steps: StepsReport::None,
            shadow: StepsReport::None,
            shadow_commitment: None,
        }
    }

    /// Sets the main-branch step evidence.
    pub fn with_steps(mut self, steps: StepsReport<'a>) -> Self {
        self.steps = steps;
        self
    }

    /// Sets the shadow-branch step evidence.
    pub fn with_shadow(mut self, shadow: StepsReport<'a>) -> Self {
        self.shadow = shadow;
        self
    }

    /// Sets the commitment to the shadow report.
    pub fn with_shadow_commitment(mut self, commitment: ShadowCommitment) -> Self {
        self.shadow_commitment = Some(commitment);
        self
    }
}

/// Owned step evidence, for [`OwnedReport`].
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OwnedSteps {
    /// Nothing reported.
    #[default]
    None,
    /// The adapter after every local step, in order.
    Adapters(Vec<LoraAdapter>),
    /// Scores the client computed itself (self-reported).
    Scores(Vec<f32>),
}

impl OwnedSteps {
    fn borrow(&self) -> StepsReport<'_> {
        match self {
            OwnedSteps::None => StepsReport::None,
            OwnedSteps::Adapters(a) => {
                StepsReport::Adapters(a.iter().map(|x| x as &dyn TensorSource).collect())
            }
            OwnedSteps::Scores(s) => StepsReport::Scores(s),
        }
    }
}

/// A client message that owns its tensors (simulations, tests, servers that
/// decode uploads into [`LoraAdapter`]s); [`OwnedReport::as_report`] lends it
/// to [`DefendedRound::run`](crate::round::DefendedRound::run).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedReport {
    /// Who sent it.
    pub client: ClientId,
    /// Its adapter after local training.
    pub update: LoraAdapter,
    /// The sample count it declares.
    pub samples: u64,
    /// Main-branch step evidence.
    pub steps: OwnedSteps,
    /// Shadow-branch step evidence.
    pub shadow: OwnedSteps,
    /// The commitment to the shadow report (commit–reveal audits).
    pub shadow_commitment: Option<ShadowCommitment>,
}

impl OwnedReport {
    /// A report with an update and declared sample count, and no step evidence.
    pub fn new(client: impl Into<ClientId>, update: LoraAdapter, samples: u64) -> Self {
        OwnedReport {
            client: client.into(),
            update,
            samples,
            steps: OwnedSteps::None,
            shadow: OwnedSteps::None,
            shadow_commitment: None,
        }
    }

    /// Sets the main-branch step evidence.
    pub fn with_steps(mut self, steps: OwnedSteps) -> Self {
        self.steps = steps;
        self
    }

    /// Sets the shadow-branch step evidence.
    pub fn with_shadow(mut self, shadow: OwnedSteps) -> Self {
        self.shadow = shadow;
        self
    }

    /// Sets the commitment to the shadow report.
    pub fn with_shadow_commitment(mut self, commitment: ShadowCommitment) -> Self {
        self.shadow_commitment = Some(commitment);
        self
    }

    /// Commits to this report's shadow evidence for `round` (what an honest
    /// client uploads with its update).
    pub fn commit_shadow(mut self, round: u32) -> Result<Self> {
        let commitment = ShadowCommitment::of(round, &self.client, &self.shadow.borrow())?;
        self.shadow_commitment = Some(commitment);
        Ok(self)
    }

    /// The borrowed form [`DefendedRound::run`](crate::round::DefendedRound::run) reads.
    pub fn as_report(&self) -> ClientReport<'_> {
        ClientReport {
            client: &self.client,
            update: &self.update,
            samples: self.samples,
            steps: self.steps.borrow(),
            shadow: self.shadow.borrow(),
            shadow_commitment: self.shadow_commitment,
        }
    }
}

/// Borrows a slice of owned reports for [`DefendedRound::run`](crate::round::DefendedRound::run).
pub fn borrow_reports(reports: &[OwnedReport]) -> Vec<ClientReport<'_>> {
    reports.iter().map(OwnedReport::as_report).collect()
}
