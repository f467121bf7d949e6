//! [`Layered`]: several levels read the same round's evidence, and one factor
//! per client comes out, in which every source can veto.
//!
//! The levels differ in what they read, and so in what a lying client can
//! fake: client level reads only the update the server scores itself; step
//! level also reads the step trail (whose steps before the last are claims);
//! shadow and evidence level read the shadow report (the client trains the
//! shadow branch alone). A layered detector runs each configured level on the
//! same [`ClientEvidence`] and combines their factors with [`Combine`].

use serde::{Deserialize, Serialize};

use crate::detect::{
    AnyDetector, Assessment, ClientEvidence, ClientId, ClientLevelParams, DefenseLevel, Detector,
    EvidenceLevelParams, ShadowLevelParams, ShadowNeed, StepLevelParams, Verdict,
};
use crate::error::{Error, Result, check_parameter};

/// How a [`Layered`] detector turns its sources' factors into one.
///
/// **Why the minimum is the default.** The attacker of interest lies in one
/// source (a fabricated step trail, a fabricated shadow report) and is honest,
/// or at least not caught, in the others. Under [`Combine::Min`] a source can
/// only *lower* the combined factor: a lying trail that makes the step level
/// say 1.0 leaves the factor at most what the client level, reading nothing
/// but the server-scored update, says. The same holds for any source, so each
/// source is a veto and no source is a vouch. The minimum also never pushes an
/// honest client below its worst source: a new honest client on probation
/// (0.5 at every level) weighs 0.5, not 0.5ᵏ.
///
/// [`Combine::Product`] also lets every source veto (every factor is in
/// [0, 1], so the product is at most each), and compounds doubts that the
/// minimum ignores (two sources at 0.6 give 0.36); it costs honest clients
/// the same compounding (probation in two sources gives 0.25).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The smallest source factor. The default.
    #[default]
    Min,
    /// The product of the source factors.
    Product,
}

impl Combine {
    fn apply(self, factors: impl Iterator<Item = f64>) -> f64 {
        match self {
            Combine::Min => factors.fold(1.0, f64::min),
            Combine::Product => factors.product(),
        }
    }
}

/// One source level and its settings, as written in a layered spec (tag
/// `level`). A layered detector is not a source: nesting adds nothing the
/// minimum (or product) of the flat list does not give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case")]
pub enum LevelParams {
    /// [`StepLevel`](crate::detect::StepLevel).
    Step(StepLevelParams),
    /// [`ClientLevel`](crate::detect::ClientLevel).
    Client(ClientLevelParams),
    /// [`ShadowLevel`](crate::detect::ShadowLevel).
    Shadow(ShadowLevelParams),
    /// [`EvidenceLevel`](crate::detect::EvidenceLevel).
    Evidence(EvidenceLevelParams),
}

impl LevelParams {
    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        match self {
            LevelParams::Step(p) => p.check(),
            LevelParams::Client(p) => p.check(),
            LevelParams::Shadow(p) => p.check(),
            LevelParams::Evidence(p) => p.check(),
        }
    }

    /// Validates the settings and builds the level, with no client state.
    pub fn build(self) -> Result<AnyDetector> {
        Ok(match self {
            LevelParams::Step(p) => p.build()?.into(),
            LevelParams::Client(p) => p.build()?.into(),
            LevelParams::Shadow(p) => p.build()?.into(),
            LevelParams::Evidence(p) => p.build()?.into(),
        })
    }

    /// The settings a built level runs with; `None` for a layered detector.
    pub fn of(detector: &AnyDetector) -> Option<Self> {
        Some(match detector {
            AnyDetector::Step(d) => LevelParams::Step(d.settings().clone()),
            AnyDetector::Client(d) => LevelParams::Client(d.settings().clone()),
            AnyDetector::Shadow(d) => LevelParams::Shadow(d.settings().clone()),
            AnyDetector::Evidence(d) => LevelParams::Evidence(d.settings().clone()),
            AnyDetector::Layered(_) => return None,
        })
    }
}

/// Unchecked layered settings; [`LayeredParams::build`] validates them.
///
/// | setting | default |
/// |---|---|
/// | [`sources`](Self::sources) | client level, then step level (each with its defaults) |
/// | [`combine`](Self::combine) | [`Combine::Min`] |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayeredParams {
    sources: Vec<LevelParams>,
    combine: Combine,
}

impl Default for LayeredParams {
    /// Client level (the server-scored update, which no trail or shadow lie
    /// can change) and step level (the trail, weighted by the distance each
    /// step moved), combined by their minimum.
    fn default() -> Self {
        LayeredParams {
            sources: vec![
                LevelParams::Client(ClientLevelParams::default()),
                LevelParams::Step(StepLevelParams::default()),
            ],
            combine: Combine::Min,
        }
    }
}

impl LayeredParams {
    setters! {
        /// The levels to run, at least one; each keeps its own per-client
        /// state. Include the client level: it is the one source computed
        /// from the update alone, the floor no other source's lie can lift.
        sources: Vec<LevelParams>;
        /// How the sources' factors are combined.
        combine: Combine;
    }

    /// The source levels' settings, in order.
    pub fn levels(&self) -> &[LevelParams] {
        &self.sources
    }

    /// Validates the settings: at least one source, each valid.
    pub fn check(&self) -> Result<()> {
        check_parameter(
            !self.sources.is_empty(),
            "layered detector",
            "sources",
            "[]",
            "at least one level",
        )?;
        self.sources.iter().try_for_each(LevelParams::check)
    }

    /// Validates the settings and builds the detector, with no client state.
    pub fn build(self) -> Result<Layered> {
        self.check()?;
        let sources = self
            .sources
            .into_iter()
            .map(LevelParams::build)
            .collect::<Result<Vec<_>>>()?;
        Ok(Layered {
            combine: self.combine,
            sources,
        })
    }
}

/// One source's assessment inside a layered one: what each level said, for
/// the audit line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceAssessment {
    /// The source's level.
    pub level: DefenseLevel,
    /// Its factor in [0, 1].
    pub factor: f64,
    /// Its verdict.
    pub verdict: Verdict,
    /// Its explanation.
    pub reason: String,
}

/// **Layered** detection: several levels assess the same evidence, each with
/// its own state, and [`Combine`] (by default the minimum) turns their
/// factors into one, so each source can veto and none can vouch.
///
/// The verdict is Malicious when any source says so, else Benign when any
/// source decided, else Undecided. Every source's factor, verdict and reason
/// is kept in [`Assessment::sources`] (and the round's audit line).
///
/// The round gives it the union of what its sources read: every step's score
/// when a source reads steps ([`Detector::uses_all_steps`]), the shadow report
/// when a source reads it ([`Detector::uses_shadow`]), and a shadow schedule
/// that is the most demanding of its sources' ([`Detector::shadow_need`]).
///
/// ```
/// use safe_fedllm::detect::{ClientEvidence, ClientId, Detector, Layered, Verdict};
///
/// // Client level + step level, combined by their minimum (the defaults).
/// let mut d = Layered::params().build()?;
/// let id = ClientId::from("liar");
/// // A fabricated benign trail, but the update the server scored is harmful.
/// let e = ClientEvidence::new(64)
///     .with_steps(vec![0.1, 0.1, 0.1])
///     .with_last_step_score(Some(0.95));
/// let a = d.assess(0, &id, &e)?;
/// assert_eq!(a.verdict, Verdict::Malicious);
/// let client = a.sources.iter().map(|s| s.factor).fold(1.0, f64::min);
/// assert_eq!(a.factor, client);
/// assert!(a.factor < 0.1, "{}", a.factor);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LayeredRepr")]
pub struct Layered {
    combine: Combine,
    sources: Vec<AnyDetector>,
}

/// A layered checkpoint as read, checked by [`Layered::try_from`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayeredRepr {
    combine: Combine,
    sources: Vec<AnyDetector>,
}

impl TryFrom<LayeredRepr> for Layered {
    type Error = Error;

    /// Each source re-validates its own settings and state; the list must be
    /// one a [`LayeredParams::build`] could produce: non-empty, no layered
    /// source.
    fn try_from(repr: LayeredRepr) -> Result<Self> {
        if repr.sources.is_empty() {
            return Err(Error::InvalidCheckpoint {
                what: "layered source list",
                value: "[]".to_owned(),
            });
        }
        if repr
            .sources
            .iter()
            .any(|s| matches!(s, AnyDetector::Layered(_)))
        {
            return Err(Error::InvalidCheckpoint {
                what: "layered source",
                value: "a layered detector".to_owned(),
            });
        }
        Ok(Layered {
            combine: repr.combine,
            sources: repr.sources,
        })
    }
}

impl Layered {
    /// Settings with the defaults (client + step level, minimum).
    pub fn params() -> LayeredParams {
        LayeredParams::default()
    }

    /// The settings it runs with (each source's own settings).
    pub fn settings(&self) -> LayeredParams {
        LayeredParams {
            sources: self.sources.iter().filter_map(LevelParams::of).collect(),
            combine: self.combine,
        }
    }

    /// The source levels, in order (for checkpoint inspection).
    pub fn sources(&self) -> &[AnyDetector] {
        &self.sources
    }
}

impl Detector for Layered {
    fn level(&self) -> DefenseLevel {
        DefenseLevel::Layered
    }

    fn uses_shadow(&self) -> bool {
        self.sources.iter().any(Detector::uses_shadow)
    }

    fn uses_all_steps(&self) -> bool {
        self.sources.iter().any(Detector::uses_all_steps)
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        evidence.validate(round, client)?;
        let mut sources = Vec::with_capacity(self.sources.len());
        for source in &mut self.sources {
            let a = source.assess(round, client, evidence)?;
            sources.push(SourceAssessment {
                level: source.level(),
                factor: a.factor,
                verdict: a.verdict,
                reason: a.reason,
            });
        }
        let factor = self.combine.apply(sources.iter().map(|s| s.factor));
        let verdict = combined_verdict(&sources);
        let parts: Vec<String> = sources
            .iter()
            .map(|s| format!("{} {:.6} ({})", s.level, s.factor, s.verdict))
            .collect();
        let reason = format!(
            "{:?} of {} sources: {} → {factor:.6}",
            self.combine,
            sources.len(),
            parts.join(", ")
        );
        Ok(Assessment {
            factor: factor.clamp(0.0, 1.0),
            verdict,
            reason,
            sources,
        })
    }

    /// The most demanding source's need: every round over audit rounds
    /// over never.
    fn shadow_need(&self, client: &ClientId) -> ShadowNeed {
        let rank = |n: ShadowNeed| match n {
            ShadowNeed::Never => 0,
            ShadowNeed::Audit => 1,
            ShadowNeed::EveryRound => 2,
        };
        self.sources
            .iter()
            .map(|s| s.shadow_need(client))
            .max_by_key(|&n| rank(n))
            .unwrap_or(ShadowNeed::Never)
    }

    fn needs_shadow(&self, client: &ClientId) -> bool {
        self.sources.iter().any(|s| s.needs_shadow(client))
    }
}

/// Malicious when any source says so, else Benign when any decided.
fn combined_verdict(sources: &[SourceAssessment]) -> Verdict {
    let says = |v| sources.iter().any(|s| s.verdict == v);
    if says(Verdict::Malicious) {
        Verdict::Malicious
    } else if says(Verdict::Benign) {
        Verdict::Benign
    } else {
        Verdict::Undecided
    }
}

#[cfg(test)]
#[path = "layered_tests.rs"]
mod tests;
