//! Aggregation rules: every rule of the crate, optionally behind a factor gate.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::aggregate::{
    Admit, Aggregation, Aggregator as _, Bulyan, ClientUpdate, ClipBound, CoordinateMedian, DnC,
    FactorGate, FedAvg, Flame, FoolsGold, GeometricMedian, Krum, KrumVariant, MultiKrum,
    NormClipping, Outcome, Trim, TrimmedMean, Weighting,
};
use safe_fedllm::lora::TensorSource;
use serde::{Deserialize, Serialize};

use crate::adapter::to_arrays;
use crate::detect::kwargs_json;
use crate::errors::{IntoPy, raise};
use crate::json::serde_to_py;
use crate::source::{Held, Source};

/// A boxed rule the bindings can keep in a `Send + Sync` pyclass.
pub type BoxedRule = Box<dyn safe_fedllm::aggregate::Aggregator + Send + Sync>;

/// A rule and its settings, as given from Python (kept so the rule can be
/// rebuilt, e.g. inside a `DefendedRound`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Rule name.
    #[serde(default)]
    pub rule: String,
    f: Option<usize>,
    m: Option<usize>,
    beta: Option<f64>,
    per_side: Option<usize>,
    variant: Option<String>,
    weighting: Option<String>,
    skip_avg_weight: Option<f64>,
    nu: Option<f64>,
    tolerance: Option<f64>,
    max_iterations: Option<usize>,
    bound: Option<serde_json::Value>,
    kappa: Option<f64>,
    noise_lambda: Option<f64>,
    seed: Option<u64>,
    filter_fraction: Option<f64>,
    subsample_dim: Option<usize>,
    iterations: Option<usize>,
    /// Wrap in a factor gate: `true` (factor > 0) or a threshold.
    gate: Option<serde_json::Value>,
    gate_skip_avg_weight: Option<f64>,
}

fn bad(param: &str, value: impl std::fmt::Display, expected: &str) -> PyErr {
    raise(
        "InvalidParameterError",
        format!("parameter `{param}` = {value} is invalid: expected {expected}"),
        |d| {
            d.set_item("param", param)?;
            d.set_item("value", value.to_string())?;
            d.set_item("expected", expected)
        },
    )
}

impl RuleSpec {
    /// Parses `rule` and Python keyword arguments.
    pub fn parse(py: Python<'_>, rule: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut map = kwargs_json(py, kwargs)?;
        map.insert("rule".into(), rule.into());
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| bad("settings", e, "settings of this rule"))
    }

    fn weighting(&self, default: Weighting) -> PyResult<Weighting> {
        match self.weighting.as_deref() {
            None => Ok(default),
            Some("uniform") => Ok(Weighting::Uniform),
            Some("samples") => Ok(Weighting::Samples),
            Some("samples_times_factor") => Ok(Weighting::SamplesTimesFactor),
            Some(other) => Err(bad(
                "weighting",
                other,
                "uniform, samples or samples_times_factor",
            )),
        }
    }

    fn need_f(&self) -> PyResult<usize> {
        self.f
            .ok_or_else(|| bad("f", "None", "the number of Byzantine clients to tolerate"))
    }

    /// Builds the rule (validated by the crate's constructors).
    pub fn build(&self) -> PyResult<BoxedRule> {
        let w = |d| self.weighting(d);
        let inner: BoxedRule = match self.rule.as_str() {
            "fedavg" => {
                let mut r = FedAvg::new().weighting(w(Weighting::SamplesTimesFactor)?);
                if let Some(t) = self.skip_avg_weight {
                    r = r.skip_avg_weight(Some(t)).py()?;
                }
                Box::new(r)
            }
            "median" | "coordinate_median" => Box::new(CoordinateMedian::new()),
            "trimmed_mean" => {
                let trim = match (self.beta, self.per_side) {
                    (Some(b), None) => Trim::Fraction(b),
                    (None, Some(k)) => Trim::PerSide(k),
                    (None, None) => Trim::PerSide(1),
                    _ => return Err(bad("beta/per_side", "both", "one of beta or per_side")),
                };
                Box::new(TrimmedMean::new(trim).py()?)
            }
            "krum" => {
                let variant = match self.variant.as_deref() {
                    None | Some("paper") => KrumVariant::Paper,
                    Some("winner_neighbourhood") => KrumVariant::WinnerNeighbourhood,
                    Some(other) => {
                        return Err(bad("variant", other, "paper or winner_neighbourhood"));
                    }
                };
                Box::new(Krum::new(self.need_f()?).py()?.variant(variant))
            }
            "multi_krum" => {
                let m = self
                    .m
                    .ok_or_else(|| bad("m", "None", "the number of selected clients"))?;
                Box::new(
                    MultiKrum::new(self.need_f()?, m)
                        .py()?
                        .weighting(w(Weighting::Uniform)?),
                )
            }
            "bulyan" => Box::new(Bulyan::new(self.need_f()?).py()?),
            "geometric_median" => {
                let mut r = GeometricMedian::new().weighting(w(Weighting::Uniform)?);
                if let Some(nu) = self.nu {
                    r = r.nu(nu).py()?;
                }
                if let Some(t) = self.tolerance {
                    r = r.tolerance(t).py()?;
                }
                if let Some(i) = self.max_iterations {
                    r = r.max_iterations(i).py()?;
                }
                Box::new(r)
            }
            "norm_clipping" => {
                let bound = match &self.bound {
                    None => ClipBound::MedianNorm,
                    Some(serde_json::Value::String(s)) if s == "median" => ClipBound::MedianNorm,
                    Some(v) => ClipBound::Fixed(
                        v.as_f64()
                            .ok_or_else(|| bad("bound", v, "a number > 0 or 'median'"))?,
                    ),
                };
                Box::new(
                    NormClipping::new(bound)
                        .py()?
                        .weighting(w(Weighting::Uniform)?),
                )
            }
            "foolsgold" => {
                let mut r = FoolsGold::new().weighting(w(Weighting::Uniform)?);
                if let Some(k) = self.kappa {
                    r = r.kappa(k).py()?;
                }
                Box::new(r)
            }
            "flame" => {
                let mut r = Flame::new().weighting(w(Weighting::Uniform)?);
                if let Some(l) = self.noise_lambda {
                    r = r.noise_lambda(l).py()?;
                }
                if let Some(s) = self.seed {
                    r = r.seed(s);
                }
                Box::new(r)
            }
            "dnc" => {
                let mut r = DnC::new(self.need_f()?)
                    .py()?
                    .weighting(w(Weighting::Uniform)?);
                if let Some(c) = self.filter_fraction {
                    r = r.filter_fraction(c).py()?;
                }
                if let Some(b) = self.subsample_dim {
                    r = r.subsample_dim(b).py()?;
                }
                if let Some(i) = self.iterations {
                    r = r.iterations(i).py()?;
                }
                if let Some(s) = self.seed {
                    r = r.seed(s);
                }
                Box::new(r)
            }
            other => {
                return Err(bad(
                    "rule",
                    other,
                    "fedavg, median, trimmed_mean, krum, multi_krum, bulyan, geometric_median, norm_clipping, foolsgold, flame or dnc",
                ));
            }
        };
        let admit = match &self.gate {
            None | Some(serde_json::Value::Bool(false)) => return Ok(inner),
            Some(serde_json::Value::Bool(true)) => Admit::Positive,
            Some(v) => Admit::AtLeast(
                v.as_f64()
                    .ok_or_else(|| bad("gate", v, "True or a factor threshold"))?,
            ),
        };
        Ok(Box::new(
            FactorGate::new(inner)
                .admit(admit)
                .py()?
                .skip_avg_weight(self.gate_skip_avg_weight)
                .py()?,
        ))
    }
}

/// An aggregation rule.
///
/// `rule` is one of "fedavg" (security-weighted; `skip_avg_weight` adds the
/// safety gate, off by default: a `DefendedRound` applies its own), "median", "trimmed_mean" (beta or
/// per_side), "krum" (f, variant), "multi_krum" (f, m), "bulyan" (f),
/// "geometric_median" (nu, tolerance, max_iterations), "norm_clipping"
/// (bound: float or "median"), "foolsgold" (kappa), "flame" (noise_lambda,
/// seed), "dnc" (f, filter_fraction, subsample_dim, iterations, seed).
/// `weighting` ("uniform", "samples", "samples_times_factor") applies to
/// rules whose last step is a mean; `gate=True` (or a threshold) drops
/// clients whose security factor is not admitted before the rule runs.
///
/// >>> rule = Aggregator("krum", f=1, gate=True)
/// >>> out = rule.aggregate(global_arrays, [("a", a, 100, 1.0), ("b", b, 100, 0.0), ...])
/// >>> out["skipped"], sorted(out["new_global"])
#[pyclass(module = "safe_fedllm._native")]
pub struct Aggregator {
    pub(crate) spec: RuleSpec,
    inner: BoxedRule,
}

/// One client's update from a Python tuple `(client, update, samples[, factor])`.
pub struct PyUpdate<'py> {
    pub client: String,
    pub held: Held<'py>,
    pub samples: u64,
    pub factor: f64,
}

impl<'py> PyUpdate<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let len = obj.len()?;
        let client: String = obj.get_item(0)?.str()?.extract()?;
        let held = Held::extract(&obj.get_item(1)?)?;
        let samples: u64 = obj.get_item(2)?.extract()?;
        let factor: f64 = if len > 3 {
            obj.get_item(3)?.extract()?
        } else {
            1.0
        };
        Ok(PyUpdate {
            client,
            held,
            samples,
            factor,
        })
    }
}

/// Runs a rule on borrowed updates: the client arrays are read in place;
/// only the global adapter is copied (the rules take it owned).
pub fn run_rule(
    rule: &mut BoxedRule,
    global: &Source<'_>,
    updates: &[(String, Source<'_>, u64, f64)],
) -> safe_fedllm::Result<Aggregation> {
    let global = global.to_adapter()?;
    let updates: Vec<ClientUpdate<'_>> = updates
        .iter()
        .map(|(c, s, n, f)| {
            ClientUpdate::new(c.as_str(), s as &dyn TensorSource, *n).with_security_factor(*f)
        })
        .collect();
    rule.aggregate(&global, &updates)
}

/// An aggregation as a Python dict.
pub fn aggregation_to_py<'py>(
    py: Python<'py>,
    aggregation: &Aggregation,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    match &aggregation.outcome {
        Outcome::Updated(adapter) => {
            out.set_item("skipped", false)?;
            out.set_item("skip_reason", py.None())?;
            out.set_item("new_global", to_arrays(py, adapter)?)?;
        }
        Outcome::Skipped { reason } => {
            out.set_item("skipped", true)?;
            out.set_item("skip_reason", serde_to_py(py, reason)?)?;
            out.set_item("new_global", py.None())?;
        }
    }
    out.set_item(
        "contributions",
        serde_to_py(py, &aggregation.contributions)?,
    )?;
    out.set_item("exclusions", serde_to_py(py, &aggregation.exclusions)?)?;
    Ok(out)
}

#[pymethods]
impl Aggregator {
    #[new]
    #[pyo3(signature = (rule = "fedavg", **settings))]
    fn new(py: Python<'_>, rule: &str, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let spec = RuleSpec::parse(py, rule, settings)?;
        let inner = spec.build()?;
        Ok(Aggregator { spec, inner })
    }

    /// Aggregates one round.
    ///
    /// `global_` is the adapter the clients started from; `updates` a list of
    /// `(client, update, samples)` or `(client, update, samples, factor)`
    /// tuples, each update a dict of float32 arrays or an `Adapter`.
    /// Returns `{"skipped", "skip_reason", "new_global" (dict or None),
    /// "contributions", "exclusions"}`. A client holding NaN/inf is excluded,
    /// never averaged; mismatched keys/shapes raise `MissingKeyError` /
    /// `ShapeMismatchError` naming the client.
    fn aggregate<'py>(
        &mut self,
        py: Python<'py>,
        global_: &Bound<'py, PyAny>,
        updates: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let global = Held::extract(global_)?;
        let items: Vec<PyUpdate<'py>> = updates
            .try_iter()?
            .map(|u| PyUpdate::extract(&u?))
            .collect::<PyResult<_>>()?;
        let global_view = global.source()?;
        let views: Vec<(String, Source<'_>, u64, f64)> = items
            .iter()
            .map(|u| Ok((u.client.clone(), u.held.source()?, u.samples, u.factor)))
            .collect::<PyResult<_>>()?;
        let rule = &mut self.inner;
        let aggregation = py.detach(|| run_rule(rule, &global_view, &views)).py()?;
        aggregation_to_py(py, &aggregation)
    }

    /// The rule's name ("fedavg", "krum", …; "factor_gate(…)" when gated).
    #[getter]
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    /// The settings this rule was built from.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        serde_to_py(py, &self.spec)
    }

    fn __repr__(&self) -> String {
        format!("Aggregator({:?})", self.inner.name())
    }
}
