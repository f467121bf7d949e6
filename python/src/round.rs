//! The defended round: probe → detector → safety gate → rule, with its audit line.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::ClientId;
use safe_fedllm::aggregate::AnyAggregator;
use safe_fedllm::detect::{AnyDetector, DEFAULT_SHADOW_LEARNING_RATE, DefenseLevel};
use safe_fedllm::lora::TensorSource;
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admission, ClientReport, DefendedRound as CoreRound, DefenseSpec, ShadowBranch, StepsReport,
    ValidDefense,
};
use serde_json::Value;

use crate::adapter::to_arrays;
use crate::aggregate::Aggregator;
use crate::detect::{Detector, level_name, spec_of};
use crate::errors::{IntoPy, raise};
use crate::json::to_py_json;
use crate::probe::Probe;
use crate::refused::{Refusal, Refused};
use crate::source::{Held, Source};
use crate::spec;

/// Step evidence from Python: None, a list of scores, or a list of updates.
enum PySteps<'py> {
    None,
    Scores(Vec<f32>),
    Updates(Vec<Held<'py>>),
}

impl<'py> PySteps<'py> {
    fn extract(obj: Option<Bound<'py, PyAny>>) -> PyResult<Self> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(PySteps::None);
        };
        if let Ok(scores) = obj.extract::<Vec<f32>>() {
            return Ok(PySteps::Scores(scores));
        }
        Ok(PySteps::Updates(
            obj.try_iter()?
                .map(|s| Held::extract(&s?))
                .collect::<PyResult<_>>()?,
        ))
    }

    fn views(&self) -> PyResult<StepViews<'_>> {
        Ok(match self {
            PySteps::None => StepViews::None,
            PySteps::Scores(s) => StepViews::Scores(s.as_slice()),
            PySteps::Updates(h) => {
                StepViews::Updates(h.iter().map(Held::source).collect::<PyResult<_>>()?)
            }
        })
    }
}

/// Borrowed step evidence (zero-copy views of the arrays).
enum StepViews<'a> {
    None,
    Scores(&'a [f32]),
    Updates(Vec<Source<'a>>),
}

impl StepViews<'_> {
    fn report(&self) -> StepsReport<'_> {
        match self {
            StepViews::None => StepsReport::None,
            StepViews::Scores(s) => StepsReport::Scores(s),
            StepViews::Updates(v) => {
                StepsReport::Adapters(v.iter().map(|s| s as &dyn TensorSource).collect())
            }
        }
    }
}

/// One report from Python: readable evidence, or a refusal the core's
/// admission records as a rejection (see [`crate::refused`]).
enum Body<'py> {
    Readable {
        update: Held<'py>,
        steps: PySteps<'py>,
        shadow: PySteps<'py>,
    },
    Refused(Refusal),
}

struct PyReport<'py> {
    client: ClientId,
    samples: u64,
    body: Body<'py>,
}

impl<'py> PyReport<'py> {
    /// Only a report without a `client` is an error (the caller's bug); any
    /// problem with what the client sent becomes a refusal of that client.
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let field = |name: &str| -> Option<Bound<'py, PyAny>> {
            obj.get_item(name).ok().filter(|v| !v.is_none())
        };
        let client = field("client").ok_or_else(|| {
            raise(
                "InputTypeError",
                "a report needs the field `client`".to_owned(),
                |d| d.set_item("field", "client"),
            )
        })?;
        let client = ClientId::from(client.str()?.extract::<String>()?);
        let samples = field("samples").map(|s| s.extract::<u64>());
        let body = match field("refused") {
            Some(reason) => Body::Refused(refusal_of(&reason)?),
            None => {
                let readable = Self::readable(field("update"), field("steps"), field("shadow"));
                match (samples.as_ref(), readable) {
                    (Some(Err(e)), _) => Body::Refused(refusal_from_error(obj.py(), e)),
                    (_, Err(e)) => Body::Refused(refusal_from_error(obj.py(), &e)),
                    (None, Ok(_)) => Body::Refused(Refusal {
                        code: "no_samples".to_owned(),
                        detail: "the report declares no sample count".to_owned(),
                    }),
                    (Some(Ok(_)), Ok(body)) => body,
                }
            }
        };
        Ok(PyReport {
            client,
            samples: samples.and_then(Result::ok).unwrap_or(0),
            body,
        })
    }

    fn readable(
        update: Option<Bound<'py, PyAny>>,
        steps: Option<Bound<'py, PyAny>>,
        shadow: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Body<'py>> {
        let update = update.ok_or_else(|| {
            raise(
                "InputTypeError",
                "the report carries no update".to_owned(),
                |d| d.set_item("field", "update"),
            )
        })?;
        let update = Held::extract(&update)?;
        // Names, ranks and layout are checked here, per client, so that a bad
        // array refuses its sender instead of failing the round.
        update.source()?;
        let steps = PySteps::extract(steps)?;
        steps.views()?;
        let shadow = PySteps::extract(shadow)?;
        shadow.views()?;
        Ok(Body::Readable {
            update,
            steps,
            shadow,
        })
    }
}

/// `refused` as Python gives it: a reason string, or a `(code, detail)` pair.
fn refusal_of(obj: &Bound<'_, PyAny>) -> PyResult<Refusal> {
    if let Ok((code, detail)) = obj.extract::<(String, String)>() {
        return Ok(Refusal { code, detail });
    }
    Ok(Refusal {
        code: "refused".to_owned(),
        detail: obj.str()?.extract()?,
    })
}

/// A per-client extraction error as a refusal: the exception's class name
/// is the code, its message the detail.
fn refusal_from_error(py: Python<'_>, err: &PyErr) -> Refusal {
    let code = err
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Error".to_owned());
    Refusal {
        code,
        detail: err.value(py).to_string(),
    }
}

/// The zero-copy views of one report (a refused one reads nothing).
enum ReportView<'a> {
    Readable(Source<'a>, StepViews<'a>, StepViews<'a>),
    Refused(Refused<'a>),
}

impl<'a> ReportView<'a> {
    fn of(report: &'a PyReport<'_>, global: &dyn TensorSource) -> PyResult<Self> {
        Ok(match &report.body {
            Body::Readable {
                update,
                steps,
                shadow,
            } => ReportView::Readable(update.source()?, steps.views()?, shadow.views()?),
            Body::Refused(r) => ReportView::Refused(Refused::new(global, r)),
        })
    }

    fn report<'r>(&'r self, client: &'r ClientId, samples: u64) -> ClientReport<'r> {
        match self {
            ReportView::Readable(update, steps, shadow) => {
                ClientReport::new(client, update as &dyn TensorSource, samples)
                    .with_steps(steps.report())
                    .with_shadow(shadow.report())
            }
            ReportView::Refused(r) => ClientReport::new(client, r as &dyn TensorSource, samples),
        }
    }
}

fn value(v: &impl serde::Serialize) -> PyResult<Value> {
    serde_json::to_value(v).map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))
}

/// The spec the keyword constructor describes: the given detector's and
/// rule's settings, the gate, trail, admission policy (`None`: the safe
/// default; `"reference"`; or the spec's `admission` section as a dict) and
/// `accept_self_reported`, read by the core's spec parser.
fn keyword_spec(
    py: Python<'_>,
    detector: &Detector,
    aggregator: &Aggregator,
    skip_avg_weight: f64,
    trail: Option<&Bound<'_, PyAny>>,
    admission: Option<&Bound<'_, PyAny>>,
    accept_self_reported: bool,
) -> PyResult<DefenseSpec> {
    let mut sections = serde_json::Map::new();
    sections.insert("detector".into(), value(&spec_of(&detector.inner))?);
    sections.insert("aggregator".into(), value(&aggregator.for_round()?)?);
    sections.insert(
        "gate".into(),
        serde_json::json!({ "threshold": skip_avg_weight }),
    );
    if let Some(trail) = trail.filter(|t| !t.is_none()) {
        sections.insert("trail".into(), spec::to_json(py, trail)?);
    }
    if let Some(policy) = admission.filter(|a| !a.is_none()) {
        let value = if policy.extract::<String>().is_ok_and(|s| s == "reference") {
            value(&Admission::reference())?
        } else {
            spec::to_json(py, policy)?
        };
        sections.insert("admission".into(), value);
    }
    sections.insert("accept_self_reported".into(), accept_self_reported.into());
    DefenseSpec::from_json(&Value::Object(sections).to_string()).py()
}

/// One defended round runner: probe → detector level → safety gate → rule,
/// keeping the detector's state across rounds.
///
/// >>> rnd = DefendedRound(probe, Detector("client"), Aggregator("fedavg"), skip_avg_weight=0.2)
/// >>> out = rnd.run(0, global_arrays, [{"client": "7", "update": arrays, "samples": 100}, ...])
/// >>> out["skipped"], out["clients"][0]["factor"], out["audit_line"]
///
/// Each report is a dict with `client`, `update` (dict of float32 arrays or
/// an Adapter), `samples`, and optional `steps` / `shadow`: a list of step
/// adapters (verifiable: scored by the server, last one checked against the
/// update) or a list of self-reported scores (unverifiable).
///
/// A report may instead carry `refused`: a reason string or a `(code,
/// detail)` pair for a reply the caller could not use (a failed reply, a
/// dropped node). A report whose arrays, steps or count cannot be read (a
/// float64 array, a 3-D array, a non-LoRA name, a negative count) is refused
/// the same way, with the exception's class as the code. A refused client is
/// rejected by the round's own admission stage (`reason: "unreadable"` in the
/// audit, with the refusal's text): factor 0 in the safety gate's mean, no
/// detector update, no weight in the aggregate. Only a report without
/// `client` raises.
#[pyclass(module = "safe_fedllm._native")]
pub struct DefendedRound {
    inner: CoreRound<LinearProbe, AnyDetector, AnyAggregator>,
    /// The checked spec's header: `{"spec": …, "spec_sha256": …}`.
    header: Value,
}

impl DefendedRound {
    fn assemble(
        py: Python<'_>,
        valid: &ValidDefense,
        probe: Option<&Probe>,
        shadow_base: Option<&Bound<'_, PyAny>>,
        shadow_learning_rate: f64,
    ) -> PyResult<Self> {
        let mut inner = match probe {
            Some(p) => CoreRound::from_spec_with_probe(valid, p.inner.clone()),
            None => CoreRound::from_spec(valid),
        }
        .py()?;
        if let Some(base) = shadow_base.filter(|b| !b.is_none()) {
            let held = Held::extract(base)?;
            let view = held.source()?;
            let base = py.detach(|| view.to_adapter()).py()?;
            inner = inner
                .with_shadow(ShadowBranch::with_learning_rate(base, shadow_learning_rate).py()?);
        }
        let header = serde_json::from_str(&valid.header_json().py()?)
            .map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))?;
        Ok(DefendedRound { inner, header })
    }
}

#[pymethods]
impl DefendedRound {
    /// The keyword form: a spec is assembled from the arguments (the
    /// detector's and the rule's settings, `skip_avg_weight` as the gate,
    /// `trail` as "exact", "off" or `{"max_abs": tol}`, `admission` as None,
    /// "reference" or the spec's `admission` section) and checked like any
    /// other; the detector's state is kept.
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (probe, detector, aggregator, *, skip_avg_weight = 0.2, trail = None, admission = None, accept_self_reported = false, shadow_base = None, shadow_learning_rate = DEFAULT_SHADOW_LEARNING_RATE))]
    fn new(
        py: Python<'_>,
        probe: &Probe,
        detector: &Detector,
        aggregator: &Aggregator,
        skip_avg_weight: f64,
        trail: Option<&Bound<'_, PyAny>>,
        admission: Option<&Bound<'_, PyAny>>,
        accept_self_reported: bool,
        shadow_base: Option<&Bound<'_, PyAny>>,
        shadow_learning_rate: f64,
    ) -> PyResult<Self> {
        let spec = keyword_spec(
            py,
            detector,
            aggregator,
            skip_avg_weight,
            trail,
            admission,
            accept_self_reported,
        )?;
        let valid = spec.check().py()?;
        let mut round = Self::assemble(py, &valid, Some(probe), shadow_base, shadow_learning_rate)?;
        *round.inner.detector_mut() = detector.inner.clone();
        Ok(round)
    }

    /// The round a defense spec describes: a dict (the spec's JSON form) or
    /// the path of a spec file (TOML or JSON). The spec's probe is loaded
    /// unless `probe` is given (for a spec that names none). A relative
    /// probe path is read against `base_dir` when given, else against the
    /// spec file's folder (a dict's: the working directory). Misspelt keys
    /// and out-of-range values raise `SpecError` (`key`, `reason`,
    /// `suggestion`). Every audit line records the spec's SHA-256.
    ///
    /// A spec with an `audits` section needs `audit_secret`: the server's
    /// 32 secret bytes (`os.urandom(32)`, kept out of the spec, which is
    /// shared and logged); without it the round refuses to run.
    ///
    /// >>> rnd = DefendedRound.from_spec({"detector": {"level": "client"}}, probe=probe)
    /// >>> rnd = DefendedRound.from_spec("defense.toml")
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (spec, *, probe = None, base_dir = None, shadow_base = None, shadow_learning_rate = DEFAULT_SHADOW_LEARNING_RATE, audit_secret = None))]
    fn from_spec(
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        probe: Option<&Probe>,
        base_dir: Option<PathBuf>,
        shadow_base: Option<&Bound<'_, PyAny>>,
        shadow_learning_rate: f64,
        audit_secret: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let valid = spec::read(py, spec, base_dir)?.check().py()?;
        let round = Self::assemble(py, &valid, probe, shadow_base, shadow_learning_rate)?;
        match audit_secret {
            None => Ok(round),
            Some(secret) => {
                let len = secret.len();
                let secret = <[u8; 32]>::try_from(secret).map_err(|_| {
                    safe_fedllm::Error::InvalidParameter {
                        component: "audits",
                        name: "secret",
                        value: format!("{len} bytes"),
                        expected: "32 bytes (os.urandom(32))",
                    }
                });
                let inner = round.inner.with_audit_secret(secret.py()?).py()?;
                Ok(DefendedRound { inner, ..round })
            }
        }
    }

    /// SHA-256 of the spec this round was built from (what every audit
    /// line records).
    #[getter]
    fn spec_sha256<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py_json(py, self.header.get("spec_sha256").unwrap_or(&Value::Null))
    }

    /// The spec this round was built from, as a dict (its canonical JSON form).
    #[getter]
    fn spec<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py_json(py, self.header.get("spec").unwrap_or(&Value::Null))
    }

    /// The probe this round scores with (its τ is the one every level decides with).
    #[getter]
    fn probe(&self) -> Probe {
        Probe {
            inner: self.inner.probe().clone(),
        }
    }

    /// Runs round `round` (0-based) from `global_` (the adapter the clients
    /// started from). Returns the audit record as a dict plus
    /// `new_global` (dict of arrays, or None when the round is skipped) and
    /// `audit_line` (the JSON line to append to an audit log).
    fn run<'py>(
        &mut self,
        py: Python<'py>,
        round: u32,
        global_: &Bound<'py, PyAny>,
        reports: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let global = Held::extract(global_)?;
        let items: Vec<PyReport<'py>> = reports
            .try_iter()?
            .map(|r| PyReport::extract(&r?))
            .collect::<PyResult<_>>()?;
        let global_view = global.source()?;
        let views = items
            .iter()
            .map(|r| ReportView::of(r, &global_view))
            .collect::<PyResult<Vec<_>>>()?;
        let meta: Vec<(ClientId, u64)> = items
            .iter()
            .map(|r| (r.client.clone(), r.samples))
            .collect();
        let inner = &mut self.inner;
        let outcome = py
            .detach(|| -> safe_fedllm::Result<_> {
                // The global is copied once (the core keeps it as an owned
                // adapter); every client update and step is read in place.
                let global = global_view.to_adapter()?;
                let reports: Vec<ClientReport<'_>> = meta
                    .iter()
                    .zip(&views)
                    .map(|((client, samples), view)| view.report(client, *samples))
                    .collect();
                inner.run(round, &global, &reports)
            })
            .py()?;
        let line = outcome.to_json_line().py()?;
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))?;
        let out = to_py_json(py, &value)?;
        let dict = out.cast::<PyDict>()?;
        match &outcome.new_global {
            Some(a) => dict.set_item("new_global", to_arrays(py, a)?)?,
            None => dict.set_item("new_global", py.None())?,
        }
        dict.set_item("audit_line", line)?;
        Ok(out)
    }

    /// Whether `client` should train a shadow branch this round.
    fn needs_shadow(&self, client: String) -> bool {
        self.inner.needs_shadow(&client.into())
    }

    /// A copy of the detector (settings and state).
    #[getter]
    fn detector(&self) -> Detector {
        Detector {
            inner: self.inner.detector().clone(),
        }
    }

    /// The detector's state as JSON (write it after every round to resume).
    fn detector_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.detector())
            .map_err(|e| raise("CheckpointError", e.to_string(), |_| Ok(())))
    }

    /// Restores the detector's state from `detector_json`'s output; the
    /// level must match.
    fn load_detector_json(&mut self, text: &str) -> PyResult<()> {
        let restored: AnyDetector = serde_json::from_str(text).map_err(|e| {
            raise(
                "CheckpointError",
                format!("detector checkpoint: {e}"),
                |_| Ok(()),
            )
        })?;
        let want: DefenseLevel = safe_fedllm::detect::Detector::level(self.inner.detector());
        let got = safe_fedllm::detect::Detector::level(&restored);
        if want != got {
            return Err(raise(
                "CheckpointError",
                format!(
                    "checkpoint is {}-level, this round runs {}-level",
                    level_name(got),
                    level_name(want)
                ),
                |d| {
                    d.set_item("expected", level_name(want))?;
                    d.set_item("found", level_name(got))
                },
            ));
        }
        *self.inner.detector_mut() = restored;
        Ok(())
    }

    /// The level this round's detector implements.
    #[getter]
    fn level(&self) -> &'static str {
        level_name(safe_fedllm::detect::Detector::level(self.inner.detector()))
    }
}
