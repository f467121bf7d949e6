//! Detectors: every level, with JSON checkpoints.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::ClientId;
use safe_fedllm::detect::{
    AnyDetector, ClientEvidence, ClientLevelParams, DefenseLevel, Detector as _,
    EvidenceLevelParams, ShadowLevelParams, StepLevelParams,
};
use safe_fedllm::probe::DEFAULT_THRESHOLD;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::errors::{IntoPy, raise};
use crate::json::serde_to_py;

pub(crate) fn level(name: &str) -> PyResult<DefenseLevel> {
    match name {
        "step" => Ok(DefenseLevel::Step),
        "client" => Ok(DefenseLevel::Client),
        "shadow" => Ok(DefenseLevel::Shadow),
        "evidence" => Ok(DefenseLevel::Evidence),
        other => Err(raise(
            "InvalidParameterError",
            format!("level `{other}` is not one of step, client, shadow, evidence"),
            |d| {
                d.set_item("param", "level")?;
                d.set_item("value", other)
            },
        )),
    }
}

pub(crate) fn level_name(level: DefenseLevel) -> &'static str {
    match level {
        DefenseLevel::Step => "step",
        DefenseLevel::Client => "client",
        DefenseLevel::Shadow => "shadow",
        DefenseLevel::Evidence => "evidence",
    }
}

/// Python kwargs as a JSON object (through `json.dumps`, so tuples become arrays).
pub(crate) fn kwargs_json(
    py: Python<'_>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<serde_json::Map<String, Value>> {
    let Some(kwargs) = kwargs else {
        return Ok(serde_json::Map::new());
    };
    let text: String = py
        .import("json")?
        .call_method1("dumps", (kwargs,))?
        .extract()?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(raise(
            "InvalidParameterError",
            "detector settings must be JSON-serialisable keyword arguments".into(),
            |_| Ok(()),
        )),
    }
}

fn json_err(e: impl std::fmt::Display) -> PyErr {
    raise(
        "InvalidParameterError",
        format!("detector settings: {e}"),
        |_| Ok(()),
    )
}

/// Default params of one level, overridden by `overrides` (unknown names are errors).
fn params<P: Default + Serialize + DeserializeOwned>(
    overrides: &serde_json::Map<String, Value>,
    nested: Option<&str>,
) -> PyResult<P> {
    let mut base = serde_json::to_value(P::default()).map_err(json_err)?;
    for (k, v) in overrides {
        let Value::Object(obj) = &mut base else {
            return Err(json_err("not an object"));
        };
        if obj.contains_key(k) {
            obj.insert(k.clone(), v.clone());
            continue;
        }
        match nested.and_then(|n| obj.get_mut(n)) {
            Some(Value::Object(inner)) if inner.contains_key(k) => {
                inner.insert(k.clone(), v.clone());
            }
            _ => {
                return Err(raise(
                    "InvalidParameterError",
                    format!("unknown detector setting `{k}` for this level"),
                    |d| {
                        d.set_item("param", k)?;
                        d.set_item("value", v.to_string())
                    },
                ));
            }
        }
    }
    serde_json::from_value(base).map_err(json_err)
}

/// A Safe-FedLLM detector: turns a client's probe scores into a security factor.
///
/// `level` is "step", "client", "shadow" or "evidence"; keyword arguments
/// override the reference defaults (threshold, active_rounds, min_weight,
/// decay, batch_size, grad_accum, prior, missing_steps, steepness, pivot,
/// missing_score, eta, evidence_min, audit_interval, missing_last_score).
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
        let overrides = kwargs_json(py, settings)?;
        let inner: AnyDetector = match self::level(level)? {
            DefenseLevel::Step => params::<StepLevelParams>(&overrides, None)?
                .build()
                .map(AnyDetector::from),
            DefenseLevel::Client => params::<ClientLevelParams>(&overrides, None)?
                .build()
                .map(AnyDetector::from),
            DefenseLevel::Shadow => params::<ShadowLevelParams>(&overrides, None)?
                .build()
                .map(AnyDetector::from),
            DefenseLevel::Evidence => params::<EvidenceLevelParams>(&overrides, Some("shadow"))?
                .build()
                .map(AnyDetector::from),
        }
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

    fn __repr__(&self) -> String {
        format!("Detector(level={:?})", level_name(self.inner.level()))
    }
}
