//! Detectors: every level, with JSON checkpoints.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::ClientId;
use safe_fedllm::detect::{AnyDetector, ClientEvidence, DefenseLevel, Detector as _};
use safe_fedllm::probe::DEFAULT_THRESHOLD;
use safe_fedllm::round::DetectorSpec;
use serde_json::Value;

use crate::errors::{IntoPy, raise};
use crate::json::serde_to_py;
use crate::spec;

pub(crate) fn level_name(level: DefenseLevel) -> &'static str {
    match level {
        DefenseLevel::Step => "step",
        DefenseLevel::Client => "client",
        DefenseLevel::Shadow => "shadow",
        DefenseLevel::Evidence => "evidence",
        DefenseLevel::Layered => "layered",
    }
}

/// The core spec of `level` with `settings`: the `detector` section of a
/// defense spec (a setting the level does not have raises `SpecError`).
pub(crate) fn level_spec(
    level: &str,
    mut settings: serde_json::Map<String, Value>,
) -> PyResult<DetectorSpec> {
    settings.insert("level".into(), level.into());
    Ok(spec::with_section("detector", Value::Object(settings))?.detector)
}

/// The spec a detector was built from (its settings, without its state).
pub(crate) fn spec_of(detector: &AnyDetector) -> DetectorSpec {
    match detector {
        AnyDetector::Step(d) => DetectorSpec::Step(d.settings().clone()),
        AnyDetector::Client(d) => DetectorSpec::Client(d.settings().clone()),
        AnyDetector::Shadow(d) => DetectorSpec::Shadow(d.settings().clone()),
        AnyDetector::Evidence(d) => DetectorSpec::Evidence(d.settings().clone()),
        AnyDetector::Layered(d) => DetectorSpec::Layered(d.settings()),
    }
}

/// A Safe-FedLLM detector: turns a client's probe scores into a security factor.
///
/// `level` is "step", "client", "shadow", "evidence" or "layered"; keyword
/// arguments are that level's settings, named as in the `detector` section
/// of a defense spec (the evidence level's shadow settings under
/// `shadow={...}`; a layered detector's `sources=[{"level": "client"}, ...]`
/// and `combine="min"`). A setting the level does not have raises `SpecError`
/// naming it; an out-of-range value raises `InvalidParameterError`. τ is
/// the probe's, never a detector setting.
///
/// >>> d = Detector("client")
/// >>> d.assess(0, "alice", 100, last_score=0.95)["verdict"]
/// 'malicious'
/// >>> d2 = Detector.from_json(d.to_json())   # checkpoint and resume
#[pyclass(module = "safe_fedllm._native")]
pub struct Detector {
    pub(crate) inner: AnyDetector,
}

#[pymethods]
impl Detector {
    #[new]
    #[pyo3(signature = (level = "client", **settings))]
    fn new(py: Python<'_>, level: &str, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let inner = level_spec(level, spec::kwargs(py, settings)?)?
            .check()
            .py()?;
        Ok(Detector { inner })
    }

    /// Assesses one client for one round and updates its state.
    ///
    /// Returns `{"factor": float, "verdict": "benign"|"malicious"|"undecided", "reason": str}`.
    /// Scores are P(malicious) from the probe; a NaN score raises
    /// `InvalidEvidenceError` (client, round) and leaves the state unchanged.
    /// `threshold` is τ of the probe that produced the scores (the levels
    /// carry none of their own).
    #[pyo3(signature = (round, client, samples, *, steps = None, last_score = None, shadow_steps = None, shadow_last_score = None, threshold = DEFAULT_THRESHOLD))]
    #[allow(clippy::too_many_arguments)]
    fn assess<'py>(
        &mut self,
        py: Python<'py>,
        round: u32,
        client: String,
        samples: u64,
        steps: Option<Vec<f32>>,
        last_score: Option<f32>,
        shadow_steps: Option<Vec<f32>>,
        shadow_last_score: Option<f32>,
        threshold: f32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut evidence = ClientEvidence::new(samples).with_threshold(threshold);
        if let Some(s) = steps {
            evidence = evidence.with_steps(s);
        }
        if last_score.is_some() {
            evidence = evidence.with_last_step_score(last_score);
        }
        if let Some(s) = shadow_steps {
            evidence = evidence.with_shadow_steps(s);
        }
        if shadow_last_score.is_some() {
            evidence = evidence.with_shadow_last_score(shadow_last_score);
        }
        let assessment = self
            .inner
            .assess(round, &ClientId::from(client), &evidence)
            .py()?;
        serde_to_py(py, &assessment)
    }

    /// Whether `client` should train a shadow branch this round.
    fn needs_shadow(&self, client: String) -> bool {
        self.inner.needs_shadow(&ClientId::from(client))
    }

    /// "step", "client", "shadow" or "evidence".
    #[getter]
    fn level(&self) -> &'static str {
        level_name(self.inner.level())
    }

    /// The whole state (settings and every client's memory) as JSON.
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner)
            .map_err(|e| raise("CheckpointError", e.to_string(), |_| Ok(())))
    }

    /// A detector from `to_json`'s output; settings and state are re-validated
    /// (raises `CheckpointError` or `InvalidParameterError`).
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let inner = serde_json::from_str(text).map_err(|e| {
            raise(
                "CheckpointError",
                format!("detector checkpoint: {e}"),
                |d| d.set_item("kind", "invalid_checkpoint"),
            )
        })?;
        Ok(Detector { inner })
    }

    /// The same detector (settings and state), independent of this one.
    fn copy(&self) -> Self {
        Detector {
            inner: self.inner.clone(),
        }
    }

    /// The detector's spec: the `detector` section of a defense spec.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        serde_to_py(py, &spec_of(&self.inner))
    }

    fn __repr__(&self) -> String {
        format!("Detector(level={:?})", level_name(self.inner.level()))
    }
}
