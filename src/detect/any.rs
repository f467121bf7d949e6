//! [`AnyDetector`]: the four levels, and a layered detector, behind one
//! serialisable type.

use serde::{Deserialize, Serialize};

use crate::detect::{
    Assessment, ClientEvidence, ClientId, ClientLevel, DefenseLevel, Detector, EvidenceLevel,
    Layered, ShadowLevel, ShadowNeed, StepLevel,
};
use crate::error::Result;

/// One of the four levels or a [`Layered`] combination, chosen at run time,
/// checkpointed as one JSON value tagged with its level.
///
/// ```
/// use safe_fedllm::detect::{AnyDetector, ClientEvidence, ClientId, Detector, ShadowLevel};
///
/// let mut d = AnyDetector::from(ShadowLevel::params().build()?);
/// let e = ClientEvidence::new(32).with_shadow_steps(vec![0.1, 0.2]);
/// d.assess(0, &ClientId::from("a"), &e)?;
/// let checkpoint = serde_json::to_string(&d)?;
/// assert!(checkpoint.starts_with(r#"{"level":"shadow""#));
/// let resumed: AnyDetector = serde_json::from_str(&checkpoint)?;
/// assert_eq!(resumed, d);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case")]
pub enum AnyDetector {
    /// [`StepLevel`].
    Step(StepLevel),
    /// [`ClientLevel`].
    Client(ClientLevel),
    /// [`ShadowLevel`].
    Shadow(ShadowLevel),
    /// [`EvidenceLevel`].
    Evidence(EvidenceLevel),
    /// [`Layered`].
    Layered(Layered),
}

impl AnyDetector {
    /// A detector of the given level with the reference defaults.
    pub fn with_defaults(level: DefenseLevel) -> Result<Self> {
        Ok(match level {
            DefenseLevel::Step => StepLevel::params().build()?.into(),
            DefenseLevel::Client => ClientLevel::params().build()?.into(),
            DefenseLevel::Shadow => ShadowLevel::params().build()?.into(),
            DefenseLevel::Evidence => EvidenceLevel::params().build()?.into(),
            DefenseLevel::Layered => Layered::params().build()?.into(),
        })
    }

    fn inner(&self) -> &dyn Detector {
        match self {
            AnyDetector::Step(d) => d,
            AnyDetector::Client(d) => d,
            AnyDetector::Shadow(d) => d,
            AnyDetector::Evidence(d) => d,
            AnyDetector::Layered(d) => d,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Detector {
        match self {
            AnyDetector::Step(d) => d,
            AnyDetector::Client(d) => d,
            AnyDetector::Shadow(d) => d,
            AnyDetector::Evidence(d) => d,
            AnyDetector::Layered(d) => d,
        }
    }
}

impl Detector for AnyDetector {
    fn level(&self) -> DefenseLevel {
        self.inner().level()
    }

    fn uses_shadow(&self) -> bool {
        self.inner().uses_shadow()
    }

    fn uses_all_steps(&self) -> bool {
        self.inner().uses_all_steps()
    }

    fn assess(
        &mut self,
        round: u32,
        client: &ClientId,
        evidence: &ClientEvidence,
    ) -> Result<Assessment> {
        self.inner_mut().assess(round, client, evidence)
    }

    fn needs_shadow(&self, client: &ClientId) -> bool {
        self.inner().needs_shadow(client)
    }

    fn shadow_need(&self, client: &ClientId) -> ShadowNeed {
        self.inner().shadow_need(client)
    }
}

impl From<StepLevel> for AnyDetector {
    fn from(d: StepLevel) -> Self {
        AnyDetector::Step(d)
    }
}

impl From<ClientLevel> for AnyDetector {
    fn from(d: ClientLevel) -> Self {
        AnyDetector::Client(d)
    }
}

impl From<ShadowLevel> for AnyDetector {
    fn from(d: ShadowLevel) -> Self {
        AnyDetector::Shadow(d)
    }
}

impl From<EvidenceLevel> for AnyDetector {
    fn from(d: EvidenceLevel) -> Self {
        AnyDetector::Evidence(d)
    }
}

impl From<Layered> for AnyDetector {
    fn from(d: Layered) -> Self {
        AnyDetector::Layered(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_round_trips_through_json() {
        for level in [
            DefenseLevel::Step,
            DefenseLevel::Client,
            DefenseLevel::Shadow,
            DefenseLevel::Evidence,
            DefenseLevel::Layered,
        ] {
            let mut d = AnyDetector::with_defaults(level).unwrap();
            assert_eq!(d.level(), level);
            let e = ClientEvidence::new(16)
                .with_steps(vec![0.9])
                .with_shadow_steps(vec![0.9]);
            d.assess(0, &ClientId::from("a"), &e).unwrap();
            let json = serde_json::to_string(&d).unwrap();
            let back: AnyDetector = serde_json::from_str(&json).unwrap();
            assert_eq!(back, d, "{level}");
        }
    }
}
