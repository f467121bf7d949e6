//! Aggregation rules: every rule of the crate, built from the core's
//! [`AggregatorSpec`] (the `aggregator` section of a defense spec).

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::aggregate::{
    Admit, Aggregation, Aggregator as _, AggregatorSpec, AnyAggregator, ClientUpdate, FactorGate,
    Outcome, SafetyGate,
};
use safe_fedllm::lora::TensorSource;
use serde_json::Value;

use crate::adapter::to_arrays;
use crate::errors::{IntoPy, raise};
use crate::json::serde_to_py;
use crate::source::{Held, Source};
use crate::spec;

/// A rule as the standalone `Aggregator` runs it: the spec's rule, or that
/// rule behind a factor gate and/or safety gate of its own.
enum Built {
    Plain(AnyAggregator),
    Wrapped(FactorGate<AnyAggregator>),
}

impl Built {
    fn rule(&mut self) -> &mut dyn safe_fedllm::aggregate::Aggregator {
        match self {
            Built::Plain(r) => r,
            Built::Wrapped(r) => r,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Built::Plain(r) => r.name(),
            Built::Wrapped(r) => r.name(),
        }
    }
}

/// The core spec of `rule` with `settings` (a setting the rule does not
/// have, or a rule that does not exist, raises `SpecError` naming it).
pub fn rule_spec(
    rule: &str,
    mut settings: serde_json::Map<String, Value>,
) -> PyResult<AggregatorSpec> {
    settings.insert("rule".into(), rule.into());
    Ok(spec::with_section("aggregator", Value::Object(settings))?.aggregator)
}

/// `gate` as Python gives it: None (admit every factor), True (factor > 0)
/// or a threshold (factor ≥ it).
fn admit_of(gate: Option<&Bound<'_, PyAny>>) -> PyResult<Admit> {
    let Some(gate) = gate.filter(|g| !g.is_none()) else {
        return Ok(Admit::AtLeast(0.0));
    };
    if let Ok(flag) = gate.extract::<bool>() {
        return Ok(if flag {
            Admit::Positive
        } else {
            Admit::AtLeast(0.0)
        });
    }
    gate.extract::<f64>().map(Admit::AtLeast).map_err(|_| {
        raise(
            "InvalidParameterError",
            format!("gate = {gate} is invalid: expected True or a factor threshold in [0, 1]"),
            |d| {
                d.set_item("component", "factor_gate")?;
                d.set_item("name", "gate")?;
                d.set_item("value", gate.to_string())?;
                d.set_item("expected", "True or a factor threshold in [0, 1]")
            },
        )
    })
}

/// An aggregation rule, built from the core's `AggregatorSpec`: the same
/// names and defaults as the `aggregator` section of a defense spec.
///
/// `rule` is one of "fedavg" (weighting), "median", "trimmed_mean" (beta or
/// per_side), "krum" (f, variant), "multi_krum" (f, m, weighting), "bulyan"
/// (f), "geometric_median" (weighting, nu, tolerance, max_iterations),
/// "norm_clipping" (bound: a number or "median_norm"; weighting),
/// "foolsgold" (kappa, weighting), "flame" (noise_lambda, seed, weighting),
/// "dnc" (f, filter_fraction, subsample_dim, iterations, seed, weighting).
/// `weighting` is "uniform", "samples" or "samples_times_factor"; rules that
/// ignore factors drop factor-0 clients first (`drop_zero_factor`, default
/// True). A setting the rule does not have raises `SpecError` naming it.
///
/// Standalone only (a `DefendedRound` applies its own gates and refuses a
/// wrapped rule): `gate=True` (or a threshold) drops clients whose factor is
/// not admitted before the rule runs; `skip_avg_weight` skips the round when
/// the mean factor is below it.
///
/// >>> rule = Aggregator("krum", f=1)
/// >>> out = rule.aggregate(global_arrays, [("a", a, 100, 1.0), ("b", b, 100, 0.0), ...])
/// >>> out["skipped"], sorted(out["new_global"])
#[pyclass(module = "safe_fedllm._native")]
pub struct Aggregator {
    pub(crate) spec: AggregatorSpec,
    inner: Built,
}

impl Aggregator {
    /// The rule a `DefendedRound` runs: the spec's, unwrapped.
    pub(crate) fn for_round(&self) -> PyResult<AggregatorSpec> {
        match &self.inner {
            Built::Plain(_) => Ok(self.spec.clone()),
            Built::Wrapped(_) => Err(raise(
                "InvalidParameterError",
                "a DefendedRound applies its own safety gate and factor gate: give it an \
                 Aggregator built without `gate` / `skip_avg_weight`"
                    .into(),
                |d| {
                    d.set_item("component", "defended_round")?;
                    d.set_item("name", "aggregator")
                },
            )),
        }
    }
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
fn run_rule(
    rule: &mut Built,
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
    rule.rule().aggregate(&global, &updates)
}

/// An aggregation as a Python dict.
fn aggregation_to_py<'py>(
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
    #[pyo3(signature = (rule = "fedavg", *, gate = None, skip_avg_weight = None, **settings))]
    fn new(
        py: Python<'_>,
        rule: &str,
        gate: Option<&Bound<'_, PyAny>>,
        skip_avg_weight: Option<f64>,
        settings: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let spec = rule_spec(rule, spec::kwargs(py, settings)?)?;
        let built = spec.check().py()?;
        let wrapped = gate.is_some_and(|g| !g.is_none()) || skip_avg_weight.is_some();
        let inner = if wrapped {
            let safety_gate = skip_avg_weight.map(SafetyGate::new).transpose().py()?;
            let gated = FactorGate::new(built)
                .admit(admit_of(gate)?)
                .gate(safety_gate);
            gated.check().py()?;
            Built::Wrapped(gated)
        } else {
            Built::Plain(built)
        };
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

    /// The rule's name ("fedavg", "krum", …).
    #[getter]
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    /// The rule's spec: the `aggregator` section of a defense spec.
    #[getter]
    fn settings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        serde_to_py(py, &self.spec)
    }

    fn __repr__(&self) -> String {
        format!("Aggregator({:?})", self.inner.name())
    }
}
