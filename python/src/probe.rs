//! Probe features and the LoRA-Probe (train with calibration, score, save, load).

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use safe_fedllm::features::{FeatureConfig, Normalization, Selection};
use safe_fedllm::lora::LazyDelta;
use safe_fedllm::probe::eval::{ThresholdRule, select_threshold};
use safe_fedllm::probe::{
    CalibratedParams, Label, LinearProbe, LogisticParams, Probe as _, ProbeBuilder, Threshold,
};

use crate::errors::{IntoPy, raise};
use crate::json::to_py_json;
use crate::source::{Held, Source};

fn selection(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Selection> {
    let Some(obj) = obj else {
        return Ok(Selection::FirstLayerB);
    };
    if let Ok(s) = obj.extract::<String>() {
        return Ok(match s.as_str() {
            "first_layer_b" | "first_B" | "first_b" => Selection::FirstLayerB,
            "all_layers" => Selection::AllLayers,
            glob => Selection::Glob(glob.to_owned()),
        });
    }
    let keys: Vec<String> = obj.extract().map_err(|_| {
        raise(
            "InvalidParameterError",
            "selection must be 'first_layer_b', 'all_layers', a glob, or a list of keys".into(),
            |d| d.set_item("name", "selection"),
        )
    })?;
    Ok(Selection::Keys(keys))
}

fn normalization(name: &str) -> PyResult<Normalization> {
    match name {
        "l2" => Ok(Normalization::L2),
        "none" => Ok(Normalization::None),
        other => Err(raise(
            "InvalidParameterError",
            format!("normalization `{other}` is not 'l2' or 'none'"),
            |d| {
                d.set_item("name", "normalization")?;
                d.set_item("value", other)
            },
        )),
    }
}

pub(crate) fn label(obj: &Bound<'_, PyAny>) -> PyResult<Label> {
    if let Ok(b) = obj.extract::<bool>() {
        return Ok(if b { Label::Malicious } else { Label::Benign });
    }
    match obj.extract::<String>().ok().as_deref() {
        Some("malicious") => Ok(Label::Malicious),
        Some("benign") => Ok(Label::Benign),
        _ => Err(raise(
            "InvalidParameterError",
            "a label is True/'malicious' or False/'benign'".into(),
            |d| d.set_item("name", "labels"),
        )),
    }
}

fn extract_all<'py>(items: &Bound<'py, PyAny>) -> PyResult<Vec<Held<'py>>> {
    items
        .try_iter()?
        .map(|item| Held::extract(&item?))
        .collect()
}

fn sources<'a>(held: &'a [Held<'_>]) -> PyResult<Vec<Source<'a>>> {
    held.iter().map(Held::source).collect()
}

/// A frozen feature layout: which LoRA tensors, in which order, how scaled.
///
/// >>> spec = FeatureSpec.fit([delta1, delta2], selection="first_layer_b")
/// >>> spec.transform(delta1).shape
/// (spec.dim,)
#[pyclass(frozen, module = "safe_fedllm._native")]
pub struct FeatureSpec {
    pub(crate) inner: safe_fedllm::features::FeatureSpec,
}

#[pymethods]
impl FeatureSpec {
    /// Freezes the layout from training deltas (dicts of arrays or Adapters).
    #[staticmethod]
    #[pyo3(signature = (deltas, selection = None, normalization = "l2"))]
    fn fit(
        py: Python<'_>,
        deltas: &Bound<'_, PyAny>,
        selection: Option<&Bound<'_, PyAny>>,
        normalization: &str,
    ) -> PyResult<Self> {
        let config = FeatureConfig::new(self::selection(selection)?)
            .normalization(self::normalization(normalization)?);
        let held = extract_all(deltas)?;
        let views = sources(&held)?;
        let inner = py.detach(|| config.fit(&views)).py()?;
        Ok(FeatureSpec { inner })
    }

    /// The feature vector of one delta (float32, length `dim`).
    fn transform<'py>(
        &self,
        py: Python<'py>,
        delta: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let held = Held::extract(delta)?;
        let view = held.source()?;
        let features = py.detach(|| self.inner.transform(&view)).py()?;
        Ok(PyArray1::from_vec(py, features.values))
    }

    /// Length of every feature vector.
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    /// The canonical keys the features read, in order. A client's step trail
    /// needs only these tensors.
    #[getter]
    fn keys(&self) -> Vec<String> {
        self.inner.layout().iter().map(|b| b.key.clone()).collect()
    }

    /// The layout as JSON.
    fn to_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner)
            .map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))
    }

    /// A layout from `to_json`'s output.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        let inner = serde_json::from_str(text).map_err(|e| {
            raise("CheckpointError", format!("feature spec JSON: {e}"), |_| {
                Ok(())
            })
        })?;
        Ok(FeatureSpec { inner })
    }
}

/// The LoRA-Probe: P(malicious) = σ(wᵀx + b) over a frozen feature layout.
///
/// >>> probe = Probe.train(deltas, labels, c=10.0, calibrate="max_f1")
/// >>> probe.score(delta) >= probe.threshold
/// True
#[pyclass(frozen, module = "safe_fedllm._native")]
pub struct Probe {
    pub(crate) inner: LinearProbe,
}

#[pymethods]
impl Probe {
    /// Trains a probe on labelled deltas (class-balanced L2 logistic
    /// regression).
    ///
    /// By default (`calibrated=True`) it uses the crate's recommended
    /// trainer, the one that holds on real deltas: C chosen from `c_grid` by
    /// (group) k-fold cross-validation (`folds`, `seed`; `groups` keeps the
    /// samples of one run or client in one fold; a given `c` is a one-value
    /// grid), Platt scaling so scores are probabilities, and τ by
    /// `threshold_policy` ("fixed:0.8", "target-fpr:0.05" or "max-f1", or a
    /// fixed `threshold`) on the out-of-fold scores; the report is in
    /// `probe.info`. `calibrated=False` fits the plain logistic regression
    /// once, with τ = `threshold`. Settings left as None take the core's
    /// defaults.
    ///
    /// `labels`: True / "malicious" or False / "benign" per delta.
    /// `calibrate`: None (keep `threshold`), "max_f1", or a float: the target
    /// false-positive rate. Calibration scores `calibration = (deltas, labels)`
    /// when given (held-out data, recommended), else the training deltas.
    #[staticmethod]
    #[pyo3(signature = (deltas, labels, *, selection = None, normalization = "l2", c = None, max_iterations = None, threshold = None, calibrate = None, calibration = None, calibrated = true, c_grid = None, folds = None, seed = None, threshold_policy = None, groups = None))]
    #[allow(clippy::too_many_arguments)]
    fn train(
        py: Python<'_>,
        deltas: &Bound<'_, PyAny>,
        labels: &Bound<'_, PyAny>,
        selection: Option<&Bound<'_, PyAny>>,
        normalization: &str,
        c: Option<f64>,
        max_iterations: Option<usize>,
        threshold: Option<f32>,
        calibrate: Option<&Bound<'_, PyAny>>,
        calibration: Option<(Bound<'_, PyAny>, Bound<'_, PyAny>)>,
        calibrated: bool,
        c_grid: Option<Vec<f64>>,
        folds: Option<usize>,
        seed: Option<u64>,
        threshold_policy: Option<&str>,
        groups: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        let policy: Option<Threshold> = threshold_policy.map(str::parse).transpose().py()?;
        let config = FeatureConfig::new(self::selection(selection)?)
            .normalization(self::normalization(normalization)?);
        let labels: Vec<Label> = labels
            .try_iter()?
            .map(|l| label(&l?))
            .collect::<PyResult<_>>()?;
        let rule = match calibrate {
            None => None,
            Some(r) if r.extract::<String>().is_ok_and(|s| s == "max_f1") => {
                Some(ThresholdRule::MaxF1)
            }
            Some(r) => Some(ThresholdRule::TargetFalsePositiveRate(
                r.extract::<f64>().map_err(|_| {
                    raise(
                        "InvalidParameterError",
                        "calibrate is None, 'max_f1' or a target false-positive rate".into(),
                        |d| d.set_item("name", "calibrate"),
                    )
                })?,
            )),
        };
        let held = extract_all(deltas)?;
        let views = sources(&held)?;
        let (cal_held, cal_labels) = match &calibration {
            Some((d, l)) => (
                Some(extract_all(d)?),
                Some(
                    l.try_iter()?
                        .map(|l| label(&l?))
                        .collect::<PyResult<Vec<_>>>()?,
                ),
            ),
            None => (None, None),
        };
        let cal_views = cal_held.as_deref().map(sources).transpose()?;
        let inner = py
            .detach(|| -> safe_fedllm::Result<LinearProbe> {
                let mut base = LogisticParams::default();
                if let Some(n) = max_iterations {
                    base = base.max_iterations(n);
                }
                let probe = if calibrated {
                    // C by (group) k-fold, Platt scaling folded into the
                    // weights, τ by the threshold policy on out-of-fold scores.
                    let mut trainer = CalibratedParams::default().base(base);
                    if let Some(grid) = c_grid.or(c.map(|c| vec![c])) {
                        trainer = trainer.c_grid(grid);
                    }
                    if let Some(p) = policy.or(threshold.map(Threshold::Fixed)) {
                        trainer = trainer.threshold(p);
                    }
                    if let Some(k) = folds {
                        trainer = trainer.folds(k);
                    }
                    if let Some(s) = seed {
                        trainer = trainer.seed(s);
                    }
                    let builder = ProbeBuilder::new(trainer).features(config);
                    builder.fit_grouped(&views, &labels, groups.as_deref())?
                } else {
                    if let Some(c) = c {
                        base = base.c(c);
                    }
                    let mut builder = ProbeBuilder::new(base).features(config);
                    if let Some(t) = threshold {
                        builder = builder.threshold(t);
                    }
                    builder.fit_grouped(&views, &labels, groups.as_deref())?
                };
                let Some(rule) = rule else { return Ok(probe) };
                let (cal_v, cal_l) = match (&cal_views, &cal_labels) {
                    (Some(v), Some(l)) => (v.as_slice(), l.as_slice()),
                    _ => (views.as_slice(), labels.as_slice()),
                };
                let scores = cal_v
                    .iter()
                    .map(|d| probe.score(d))
                    .collect::<safe_fedllm::Result<Vec<f32>>>()?;
                let choice = select_threshold(&scores, cal_l, rule)?;
                probe.with_threshold(choice.threshold.clamp(0.0, 1.0))
            })
            .py()?;
        Ok(Probe { inner })
    }

    /// A probe from explicit weights (float32, length `spec.dim`) and bias.
    #[staticmethod]
    #[pyo3(signature = (spec, weights, bias, threshold = 0.8))]
    fn from_weights(
        spec: &FeatureSpec,
        weights: PyReadonlyArray1<'_, f32>,
        bias: f32,
        threshold: f32,
    ) -> PyResult<Self> {
        let inner = LinearProbe::new(spec.inner.clone(), weights.as_array().to_vec(), bias)
            .and_then(|p| p.with_threshold(threshold))
            .py()?;
        Ok(Probe { inner })
    }

    /// P(malicious) of a delta (a dict of arrays or an Adapter).
    fn score(&self, py: Python<'_>, delta: &Bound<'_, PyAny>) -> PyResult<f32> {
        let held = Held::extract(delta)?;
        let view = held.source()?;
        py.detach(|| self.inner.score(&view)).py()
    }

    /// P(malicious) of `update − base`, computed without materialising the
    /// delta (only the probe's feature tensors are read).
    fn score_update(
        &self,
        py: Python<'_>,
        update: &Bound<'_, PyAny>,
        base: &Bound<'_, PyAny>,
    ) -> PyResult<f32> {
        let (u, b) = (Held::extract(update)?, Held::extract(base)?);
        let (u, b) = (u.source()?, b.source()?);
        py.detach(|| LazyDelta::new(&u, &b).and_then(|d| self.inner.score(&d)))
            .py()
    }

    /// P(malicious) for each delta of a list.
    fn score_batch(&self, py: Python<'_>, deltas: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
        let held = extract_all(deltas)?;
        let views = sources(&held)?;
        py.detach(|| {
            views
                .iter()
                .map(|d| self.inner.score(d))
                .collect::<safe_fedllm::Result<Vec<f32>>>()
        })
        .py()
    }

    /// The probe's feature vector of a delta.
    fn features<'py>(
        &self,
        py: Python<'py>,
        delta: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let held = Held::extract(delta)?;
        let view = held.source()?;
        let features = py
            .detach(|| self.inner.feature_spec().transform(&view))
            .py()?;
        Ok(PyArray1::from_vec(py, features.values))
    }

    /// True when `score ≥ threshold`.
    fn is_harmful(&self, score: f32) -> bool {
        self.inner.is_harmful(score)
    }

    /// This probe with another threshold in [0, 1].
    fn with_threshold(&self, threshold: f32) -> PyResult<Self> {
        Ok(Probe {
            inner: self.inner.clone().with_threshold(threshold).py()?,
        })
    }

    /// Decision threshold τ.
    #[getter]
    fn threshold(&self) -> f32 {
        self.inner.threshold()
    }

    /// The frozen feature layout.
    #[getter]
    fn spec(&self) -> FeatureSpec {
        FeatureSpec {
            inner: self.inner.feature_spec().clone(),
        }
    }

    /// The canonical keys the probe reads (what a step trail must carry).
    #[getter]
    fn feature_keys(&self) -> Vec<String> {
        self.inner
            .feature_spec()
            .layout()
            .iter()
            .map(|b| b.key.clone())
            .collect()
    }

    /// The weights w (a copy).
    #[getter]
    fn weights<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, self.inner.weights())
    }

    /// The bias b.
    #[getter]
    fn bias(&self) -> f32 {
        self.inner.bias()
    }

    /// Trainer, fit report and training-set summary, as a dict.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(self.inner.info())
            .map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))?;
        to_py_json(py, &value)
    }

    /// Saves as safetensors (weights) with JSON metadata.
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).py()
    }

    /// Loads a probe saved by `save` (or by the Rust crate / CLI).
    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        Ok(Probe {
            inner: py.detach(|| LinearProbe::load(&path)).py()?,
        })
    }

    /// The saved form as bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.inner.to_bytes().py()?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// A probe from `to_bytes`' output.
    #[staticmethod]
    fn from_bytes(bytes: &[u8]) -> PyResult<Self> {
        Ok(Probe {
            inner: LinearProbe::from_bytes(bytes).py()?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Probe(dim={}, threshold={})",
            self.inner.feature_spec().dim(),
            self.inner.threshold()
        )
    }
}
