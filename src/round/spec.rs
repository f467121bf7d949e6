//! [`DefenseSpec`]: one serialisable description of a defended round — the
//! probe and its τ, admission, detector level, aggregation rule and safety
//! gate — that Rust, the command-line tool, Python, Flower and the
//! `fed_llama` example all read.
//!
//! It follows the crate's one configuration idiom: the spec is the unchecked
//! form (serde, JSON or TOML); [`DefenseSpec::check`] validates every section
//! and gives a [`ValidDefense`]; only that builds a
//! [`DefendedRound`](crate::round::DefendedRound)
//! ([`DefendedRound::from_spec`](crate::round::DefendedRound::from_spec)).
//! A setting left out takes its component's default, defined once on the
//! component. An unknown or misspelt key is an [`Error::Spec`] naming the key
//! (with the closest known key), never a silent default.
//!
//! ```
//! use safe_fedllm::round::DefenseSpec;
//!
//! let spec = DefenseSpec::from_toml(r#"
//!     trail = "exact"
//!     [detector]
//!     level = "client"
//!     steepness = 12.0
//!     [aggregator]
//!     rule = "fedavg"
//!     [gate]
//!     threshold = 0.25
//! "#)?;
//! let valid = spec.check()?;
//! assert_eq!(valid.spec().gate.threshold(), 0.25);
//! assert_eq!(valid.sha256().len(), 64); // recorded in every audit line
//!
//! let typo = DefenseSpec::from_toml("[detector]\nlevel = \"client\"\nsteepnes = 12.0\n");
//! let message = typo.unwrap_err().to_string();
//! assert!(message.contains("detector.steepnes") && message.contains("did you mean `steepness`"), "{message}");
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::aggregate::{AggregatorSpec, AnyAggregator, SafetyGate};
use crate::detect::{
    AnyDetector, ClientLevelParams, EvidenceLevelParams, ShadowLevelParams, StepLevelParams,
};
use crate::error::{Error, Result};
use crate::features::FeatureSpec;
use crate::probe::LinearProbe;
use crate::round::admission::Admission;
use crate::round::commit::AuditSpec;
use crate::round::params::RoundParams;
use crate::round::trail::TrailCheck;

/// A whole defense, as written down, saved, diffed and reviewed.
///
/// | key | default | meaning |
/// |---|---|---|
/// | `probe` | none | `path` to a saved probe or an `inline` one; optional `threshold` overriding its τ |
/// | `admission` | [`Admission::default`] | sample policy, norm bound, probe keys |
/// | `detector` | client level | `level` and that level's settings |
/// | `aggregator` | FedAvg (nₖ·wₖ) | `rule` and that rule's settings ([`AggregatorSpec`]) |
/// | `gate` | `threshold = 0.2` | the one safety gate ([`SafetyGate`]) |
/// | `trail` | `"exact"` | how a step trail's end is checked ([`TrailCheck`]) |
/// | `accept_self_reported` | `false` | read client-computed scores |
/// | `audits` | none | commit–reveal audit `rate` ([`AuditSpec`]); the secret is the server's, never in the spec |
///
/// τ lives in one place: the probe. Every level decides with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenseSpec {
    /// The probe, and optionally its τ.
    #[serde(skip_serializing_if = "ProbeSpec::is_empty")]
    pub probe: ProbeSpec,
    /// The admission policy.
    pub admission: Admission,
    /// The detector level and its settings.
    pub detector: DetectorSpec,
    /// The aggregation rule and its settings.
    pub aggregator: AggregatorSpec,
    /// The safety gate.
    pub gate: SafetyGate,
    /// How the end of a step trail is checked against the update.
    pub trail: TrailCheck,
    /// Whether client-computed scores are read (marked self-reported).
    pub accept_self_reported: bool,
    /// Commit–reveal audits of frozen clients (the secret is not here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audits: Option<AuditSpec>,
}

/// Where the probe comes from, and its τ.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeSpec {
    /// A probe saved with [`LinearProbe::save`]. A relative path read from a
    /// spec file is taken relative to that file's folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A probe written into the spec itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineProbe>,
    /// Replaces the probe's own τ (for example the one its calibration chose).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Folder relative paths are resolved against (the spec file's).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

impl ProbeSpec {
    fn is_empty(&self) -> bool {
        self.path.is_none() && self.inline.is_none() && self.threshold.is_none()
    }

    fn check(&self) -> Result<()> {
        if self.path.is_some() && self.inline.is_some() {
            return Err(spec_error(
                "probe",
                "give either `path` or `inline`, not both",
            ));
        }
        if let Some(t) = self.threshold
            && !(t.is_finite() && (0.0..=1.0).contains(&t))
        {
            return Err(spec_error(
                "probe.threshold",
                &format!("{t} is not a threshold in [0, 1]"),
            ));
        }
        if let Some(inline) = &self.inline {
            inline
                .build()
                .map_err(|e| spec_error("probe.inline", &e.to_string()))?;
        }
        Ok(())
    }

    /// Whether the spec names a probe (a path or an inline one).
    pub fn names_a_probe(&self) -> bool {
        self.path.is_some() || self.inline.is_some()
    }

    /// Loads the named probe, with the spec's τ applied.
    fn load(&self) -> Result<LinearProbe> {
        let probe = match (&self.path, &self.inline) {
            (Some(path), None) => LinearProbe::load(self.resolve(path))?,
            (None, Some(inline)) => inline.build()?,
            _ => {
                return Err(spec_error(
                    "probe",
                    "no `path` or `inline` probe: name one, or pass a probe to \
                     DefendedRound::from_spec_with_probe",
                ));
            }
        };
        self.apply_threshold(probe)
    }

    fn apply_threshold(&self, probe: LinearProbe) -> Result<LinearProbe> {
        match self.threshold {
            Some(t) => probe.with_threshold(t),
            None => Ok(probe),
        }
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        match &self.base_dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }
}

/// A linear probe written out in the spec: its feature layout, weights, bias
/// and τ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineProbe {
    /// The frozen feature layout.
    pub feature_spec: FeatureSpec,
    /// One weight per feature.
    pub weights: Vec<f32>,
    /// The bias.
    pub bias: f32,
    /// τ (default: the crate's default threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

impl InlineProbe {
    fn build(&self) -> Result<LinearProbe> {
        let probe = LinearProbe::new(self.feature_spec.clone(), self.weights.clone(), self.bias)?;
        match self.threshold {
            Some(t) => probe.with_threshold(t),
            None => Ok(probe),
        }
    }
}

/// A detector level and its settings, as written in a spec (tag `level`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "level", rename_all = "snake_case")]
pub enum DetectorSpec {
    /// [`StepLevel`](crate::detect::StepLevel).
    Step(StepLevelParams),
    /// [`ClientLevel`](crate::detect::ClientLevel).
    Client(ClientLevelParams),
    /// [`ShadowLevel`](crate::detect::ShadowLevel).
    Shadow(ShadowLevelParams),
    /// [`EvidenceLevel`](crate::detect::EvidenceLevel).
    Evidence(EvidenceLevelParams),
}

impl Default for DetectorSpec {
    /// Client level: it reads only the update the server scores itself.
    fn default() -> Self {
        DetectorSpec::Client(ClientLevelParams::default())
    }
}

impl DetectorSpec {
    /// Validates the settings and builds the detector, with no client state.
    pub fn check(&self) -> Result<AnyDetector> {
        Ok(match self {
            DetectorSpec::Step(p) => p.clone().build()?.into(),
            DetectorSpec::Client(p) => p.clone().build()?.into(),
            DetectorSpec::Shadow(p) => p.clone().build()?.into(),
            DetectorSpec::Evidence(p) => p.clone().build()?.into(),
        })
    }
}

/// A checked [`DefenseSpec`]: every section validated and built. Only this
/// builds a [`DefendedRound`](crate::round::DefendedRound).
#[derive(Debug, Clone)]
pub struct ValidDefense {
    spec: DefenseSpec,
    detector: AnyDetector,
    aggregator: AnyAggregator,
    params: RoundParams,
    sha256: String,
}

impl ValidDefense {
    /// The spec, as written.
    pub fn spec(&self) -> &DefenseSpec {
        &self.spec
    }

    /// SHA-256 (hex) of the spec's canonical JSON: what each audit line records.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The run header: the full spec and its hash, one JSON line, so a
    /// round can be reproduced from its log.
    pub fn header_json(&self) -> Result<String> {
        let header = serde_json::json!({ "spec": self.spec, "spec_sha256": self.sha256 });
        serde_json::to_string(&header).map_err(|e| Error::Serialize {
            what: "defense spec header",
            reason: e.to_string(),
        })
    }

    pub(crate) fn load_probe(&self) -> Result<LinearProbe> {
        self.spec.probe.load()
    }

    pub(crate) fn given_probe(&self, probe: LinearProbe) -> Result<LinearProbe> {
        if self.spec.probe.names_a_probe() {
            return Err(spec_error(
                "probe",
                "the spec names a probe and another was given: use DefendedRound::from_spec",
            ));
        }
        self.spec.probe.apply_threshold(probe)
    }

    pub(crate) fn parts(&self) -> (AnyDetector, AnyAggregator, RoundParams) {
        (
            self.detector.clone(),
            self.aggregator.clone(),
            self.params.clone(),
        )
    }
}

impl DefenseSpec {
    /// The safe defaults: fail-closed admission, client level, FedAvg
    /// weighted by nₖ·wₖ, the 0.2 gate, exact trail check.
    pub fn safe() -> Self {
        DefenseSpec::default()
    }

    /// The reference implementation's settings, for reproducing the paper:
    /// trusted counts, no norm bound, zero-filled probe keys, no trail check,
    /// self-reported scores read. **Unsafe against lying clients.**
    pub fn reference() -> Self {
        DefenseSpec {
            admission: Admission::reference(),
            trail: TrailCheck::Off,
            accept_self_reported: true,
            ..DefenseSpec::default()
        }
    }

    /// A preset by name: `"default"` ([`DefenseSpec::safe`]) or `"reference"`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "default" | "safe" => Ok(DefenseSpec::safe()),
            "reference" => Ok(DefenseSpec::reference()),
            other => Err(Error::Spec {
                key: "preset".to_owned(),
                reason: format!("unknown preset `{other}`"),
                suggestion: closest(other, &["default", "reference"]),
            }),
        }
    }

    /// Validates every section and builds its components.
    pub fn check(&self) -> Result<ValidDefense> {
        self.probe.check()?;
        self.admission
            .check()
            .map_err(|e| section_error("admission", e))?;
        let detector = self
            .detector
            .check()
            .map_err(|e| section_error("detector", e))?;
        let aggregator = self
            .aggregator
            .check()
            .map_err(|e| section_error("aggregator", e))?;
        let params = RoundParams::default()
            .gate(self.gate)
            .trail(self.trail)
            .admission(self.admission.clone())
            .accept_self_reported(self.accept_self_reported);
        params.check().map_err(|e| section_error("trail", e))?;
        if let Some(audits) = &self.audits {
            audits.check().map_err(|e| section_error("audits", e))?;
        }
        Ok(ValidDefense {
            spec: self.clone(),
            detector,
            aggregator,
            params,
            sha256: self.sha256()?,
        })
    }

    /// The spec's canonical JSON (fields in declaration order).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Serialize {
            what: "defense spec",
            reason: e.to_string(),
        })
    }

    /// The spec as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Serialize {
            what: "defense spec",
            reason: e.to_string(),
        })
    }

    /// Reads a spec from JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(path_error)
    }

    /// Reads a spec from TOML.
    pub fn from_toml(text: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| Error::Spec {
            key: "<toml>".to_owned(),
            reason: e.to_string(),
            suggestion: None,
        })?;
        serde_path_to_error::deserialize(de).map_err(path_error)
    }

    /// Reads a spec file: TOML when the name ends in `.toml`, JSON otherwise.
    /// A relative probe path is taken relative to the file's folder.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let parsed = if is_toml {
            Self::from_toml(&text)
        } else {
            Self::from_json(&text)
        };
        let mut spec = parsed.map_err(|e| Error::in_file(path, e))?;
        spec.probe.base_dir = path.parent().map(Path::to_owned);
        Ok(spec)
    }

    /// SHA-256 (hex) of the canonical JSON.
    fn sha256(&self) -> Result<String> {
        let json = serde_json::to_string(self).map_err(|e| Error::Serialize {
            what: "defense spec",
            reason: e.to_string(),
        })?;
        Ok(Sha256::digest(json.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

fn spec_error(key: &str, reason: &str) -> Error {
    Error::Spec {
        key: key.to_owned(),
        reason: reason.to_owned(),
        suggestion: None,
    }
}

/// A component's check error, under the spec key it came from.
fn section_error(section: &str, error: Error) -> Error {
    let key = match &error {
        Error::InvalidParameter { name, .. } => format!("{section}.{name}"),
        _ => section.to_owned(),
    };
    Error::Spec {
        key,
        reason: error.to_string(),
        suggestion: None,
    }
}

/// A serde error with the path of the key it happened at, and for an
/// unknown key the closest known one.
fn path_error<E: std::fmt::Display>(error: serde_path_to_error::Error<E>) -> Error {
    let path = error.path().to_string();
    let reason = error.inner().to_string();
    let (key, suggestion) = match unknown_field(&reason) {
        Some((field, expected, is_field)) => {
            // The path ends at the key holding the bad name: an unknown
            // field's own key, or the tag (`level`, `rule`) of an unknown variant.
            // The path ends at the key holding the bad name (an unknown
            // field's own key, the tag of an unknown variant), except inside
            // a tagged section (`detector`, `aggregator`), whose content
            // serde reads as a whole: there the field is appended.
            let ends_at_field = path == field || path.ends_with(&format!(".{field}"));
            let key = if path == "." || path.is_empty() {
                field.clone()
            } else if is_field && !ends_at_field {
                format!("{path}.{field}")
            } else {
                path
            };
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            (key, closest(&field, &expected))
        }
        None => (path, None),
    };
    Error::Spec {
        key,
        reason: first_line(&reason),
        suggestion,
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown
/// variant"), as the name and the expected names.
fn unknown_field(message: &str) -> Option<(String, Vec<String>, bool)> {
    let (rest, is_field) = match message.split_once("unknown field `") {
        Some((_, rest)) => (rest, true),
        None => (message.split_once("unknown variant `")?.1, false),
    };
    let (field, tail) = rest.split_once('`')?;
    let expected = tail
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((field.to_owned(), expected, is_field))
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().trim().to_owned()
}

/// The known name closest to `given`, when it is plausibly a misspelling.
fn closest(given: &str, known: &[&str]) -> Option<String> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(given, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_reads_serde_messages() {
        let (f, e, is_field) =
            unknown_field("unknown field `ff`, expected one of `f`, `variant`").unwrap();
        assert_eq!(f, "ff");
        assert_eq!(e, ["f", "variant"]);
        assert!(is_field);
        assert!(
            !unknown_field("unknown variant `krumm`, expected `krum`")
                .unwrap()
                .2
        );
        assert_eq!(unknown_field("invalid type: string"), None);
    }

    #[test]
    fn closest_only_suggests_plausible_names() {
        assert_eq!(
            closest("steepnes", &["steepness", "pivot"]).as_deref(),
            Some("steepness")
        );
        assert_eq!(closest("zzz", &["steepness", "pivot"]), None);
    }
}
