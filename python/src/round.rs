//! The defended round: probe → detector → safety gate → rule, with its audit line.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::ClientId;
use safe_fedllm::aggregate::SafetyGate;
use safe_fedllm::detect::{AnyDetector, DEFAULT_SHADOW_LEARNING_RATE, DefenseLevel};
use safe_fedllm::lora::TensorSource;
use safe_fedllm::probe::LinearProbe;
use safe_fedllm::round::{
    Admission, ClientReport, DefendedRound as CoreRound, DefenseSpec, NormBound, OverBound,
    RoundParams, SamplePolicy, ShadowBranch, StepsReport, TrailCheck,
};

use crate::adapter::to_arrays;
use crate::aggregate::{Aggregator, BoxedRule};
use crate::detect::{Detector, level_name};
use crate::errors::{IntoPy, raise};
use crate::json::to_py_json;
use crate::probe::Probe;
use crate::refused::{Refusal, Refused};
use crate::source::{Held, Source};

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
                |d| d.set_item("key", "client"),
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
                |d| d.set_item("key", "update"),
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

fn bad(param: &str, value: impl std::fmt::Display, expected: &str) -> PyErr {
    raise(
        "InvalidParameterError",
        format!("admission `{param}` = {value} is invalid: expected {expected}"),
        |d| {
            d.set_item("param", param)?;
            d.set_item("value", value.to_string())?;
            d.set_item("expected", expected)
        },
    )
}

/// `(name, value)` of a one-entry dict like `{"cap_at": 512}`, or `(name, None)` of a string.
fn tagged<'py>(obj: &Bound<'py, PyAny>) -> PyResult<(String, Option<Bound<'py, PyAny>>)> {
    if let Ok(name) = obj.extract::<String>() {
        return Ok((name, None));
    }
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| bad("policy", obj, "a name or a one-entry dict"))?;
    match dict.iter().next() {
        Some((k, v)) if dict.len() == 1 => Ok((k.extract()?, Some(v))),
        _ => Err(bad("policy", obj, "a one-entry dict")),
    }
}

/// The admission policy from Python: None (the safe default), "reference",
/// or a dict with any of `samples`, `norm_bound`, `over_bound`, `require_probe_keys`.
fn admission(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Admission> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Admission::default());
    };
    if obj.extract::<String>().is_ok_and(|s| s == "reference") {
        return Ok(Admission::reference());
    }
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| bad("admission", obj, "None, 'reference' or a dict"))?;
    let mut policy = Admission::default();
    for (k, v) in dict.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "samples" => {
                let (name, value) = tagged(&v)?;
                let sample = match (name.as_str(), value) {
                    ("trust", None) => SamplePolicy::Trust,
                    ("uniform", None) => SamplePolicy::Uniform,
                    ("cap_at", Some(n)) => SamplePolicy::CapAt(n.extract()?),
                    ("cap_at_median_multiple", Some(x)) => {
                        SamplePolicy::CapAtMedianMultiple(x.extract()?)
                    }
                    _ => {
                        return Err(bad(
                            "samples",
                            &v,
                            "'trust', 'uniform', {'cap_at': n} or {'cap_at_median_multiple': x}",
                        ));
                    }
                };
                policy = policy.samples(sample).py()?;
            }
            "norm_bound" => {
                let bound = if v.is_none() {
                    NormBound::Unbounded
                } else {
                    let (name, value) = tagged(&v)?;
                    match (name.as_str(), value) {
                        ("unbounded", None) => NormBound::Unbounded,
                        ("absolute", Some(x)) => NormBound::Absolute(x.extract()?),
                        ("median_multiple", Some(x)) => NormBound::MedianMultiple(x.extract()?),
                        _ => {
                            return Err(bad(
                                "norm_bound",
                                &v,
                                "None, {'absolute': x} or {'median_multiple': x}",
                            ));
                        }
                    }
                };
                policy = policy.norm_bound(bound).py()?;
            }
            "over_bound" => {
                policy = policy.over_bound(match v.extract::<String>()?.as_str() {
                    "exclude" => OverBound::Exclude,
                    "clip" => OverBound::Clip,
                    other => return Err(bad("over_bound", other, "'exclude' or 'clip'")),
                });
            }
            "require_probe_keys" => policy = policy.require_probe_keys(v.extract()?),
            other => {
                return Err(bad(
                    other,
                    &v,
                    "samples, norm_bound, over_bound or require_probe_keys",
                ));
            }
        }
    }
    Ok(policy)
}

/// A spec from a dict (its JSON form) or a file path.
fn read_spec(py: Python<'_>, spec: &Bound<'_, PyAny>) -> PyResult<DefenseSpec> {
    if spec.is_instance_of::<PyDict>() {
        let text: String = py
            .import("json")?
            .call_method1("dumps", (spec,))?
            .extract()?;
        return DefenseSpec::from_json(&text).py();
    }
    let path: std::path::PathBuf = spec.extract().map_err(|_| {
        raise(
            "InputTypeError",
            "a defense spec is a dict or the path of a .toml / .json file".into(),
            |_| Ok(()),
        )
    })?;
    DefenseSpec::from_file(path).py()
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
    inner: CoreRound<LinearProbe, AnyDetector, BoxedRule>,
}

#[pymethods]
impl DefendedRound {
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
        let trail = match trail {
            None => TrailCheck::Exact,
            Some(t) if t.extract::<String>().is_ok_and(|s| s == "exact") => TrailCheck::Exact,
            Some(t) if t.extract::<String>().is_ok_and(|s| s == "off") => TrailCheck::Off,
            Some(t) => TrailCheck::MaxAbs(t.extract::<f32>().map_err(|_| {
                raise(
                    "InvalidParameterError",
                    "trail is 'exact', 'off' or an absolute tolerance".into(),
                    |d| d.set_item("param", "trail"),
                )
            })?),
        };
        let params = RoundParams::default()
            .gate(SafetyGate::new(skip_avg_weight).py()?)
            .trail(trail)
            .admission(self::admission(admission)?)
            .accept_self_reported(accept_self_reported);
        let mut inner = CoreRound::new(
            probe.inner.clone(),
            detector.inner.clone(),
            aggregator.spec.build()?,
        )
        .with_params(params)
        .py()?;
        if let Some(base) = shadow_base {
            let held = Held::extract(base)?;
            let view = held.source()?;
            let base = py.detach(|| view.to_adapter()).py()?;
            inner = inner
                .with_shadow(ShadowBranch::with_learning_rate(base, shadow_learning_rate).py()?);
        }
        Ok(DefendedRound { inner })
    }

    /// The round a defense spec describes: a dict (the spec's JSON form) or
    /// the path of a spec file (TOML or JSON). The spec's probe is loaded
    /// unless `probe` is given (for a spec that names none). Misspelt keys
    /// and out-of-range values raise `SpecError` (`key`, `reason`,
    /// `suggestion`). Every audit line records the spec's SHA-256.
    ///
    /// >>> rnd = DefendedRound.from_spec({"detector": {"level": "client"}}, probe=probe)
    /// >>> rnd = DefendedRound.from_spec("defense.toml")
    #[staticmethod]
    #[pyo3(signature = (spec, *, probe = None, shadow_base = None, shadow_learning_rate = DEFAULT_SHADOW_LEARNING_RATE))]
    fn from_spec(
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        probe: Option<&Probe>,
        shadow_base: Option<&Bound<'_, PyAny>>,
        shadow_learning_rate: f64,
    ) -> PyResult<Self> {
        let spec = read_spec(py, spec)?;
        let valid = spec.check().py()?;
        let core = match probe {
            Some(p) => CoreRound::from_spec_with_probe(&valid, p.inner.clone()),
            None => CoreRound::from_spec(&valid),
        }
        .py()?;
        let mut inner = core.map_aggregator(|a| Box::new(a) as BoxedRule);
        if let Some(base) = shadow_base {
            let held = Held::extract(base)?;
            let view = held.source()?;
            let base = py.detach(|| view.to_adapter()).py()?;
            inner = inner
                .with_shadow(ShadowBranch::with_learning_rate(base, shadow_learning_rate).py()?);
        }
        Ok(DefendedRound { inner })
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
