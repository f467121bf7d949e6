//! Training: the [`Trainer`] trait, its output [`LinearModel`], and
//! [`ProbeBuilder`], which turns labelled deltas into a [`LinearProbe`].

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_length};
use crate::features::{FeatureConfig, FeatureSpec};
use crate::lora::TensorSource;
use crate::parallel::{MIN_PART_WORK, map_parts, part_count, split_ranges};
use crate::probe::calibrate::{CalibratedParams, CalibrationReport};
use crate::probe::dataset::Manifest;
use crate::probe::kernels::{dot, sigmoid};
use crate::probe::linear::{LinearProbe, ProbeInfo, TrainingSummary, check_threshold};
use crate::probe::sketch::{Sketch, SketchConfig};
use crate::probe::{DEFAULT_THRESHOLD, Label};

#[cfg(feature = "linfa")]
mod linfa;
mod logistic;

#[cfg(feature = "linfa")]
pub use self::linfa::{LinfaLogistic, LinfaSvm};
#[cfg(feature = "linfa")]
pub(crate) use logistic::settings_json;
pub(crate) use logistic::split_solution;
pub use logistic::{ClassWeight, EarlyStopping, Intercept, LogisticParams, ValidLogisticParams};

/// Fits a linear model s = σ(wᵀx + b), s = P(malicious), to a feature matrix.
///
/// Implementations validate their settings at `fit` (a nonsense value is an
/// [`Error::InvalidParameter`]) and the data (see [`check_training_set`]).
pub trait Trainer {
    /// Fits to `x` (`[n, d]`, one row per sample) and one label per row.
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel>;

    /// Fits with a group id per row (the run or client a sample came from).
    ///
    /// Samples of one group are not independent (the steps of one run look
    /// alike), so a trainer that cross-validates must keep each group inside
    /// one fold — [`CalibratedParams`](crate::probe::CalibratedParams) does. Trainers that do not
    /// cross-validate ignore the groups (this default).
    fn fit_grouped(
        &self,
        x: ArrayView2<'_, f32>,
        labels: &[Label],
        groups: Option<&[usize]>,
    ) -> Result<LinearModel> {
        let _ = groups;
        self.fit(x, labels)
    }
}

/// A trainer's name and settings, saved with the probe so a fit can be
/// reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerInfo {
    /// Trainer name (e.g. `"logistic-lbfgs"`).
    pub name: String,
    /// Its settings, as the trainer serialises them.
    pub settings: serde_json::Value,
}

/// Why an optimiser stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The largest gradient component fell below the tolerance (converged).
    GradientTolerance,
    /// The relative objective decrease fell below machine precision (converged).
    ObjectiveTolerance,
    /// The validation loss stopped improving; the best iterate was kept.
    EarlyStopping,
    /// The iteration limit was reached before convergence.
    MaxIterations,
    /// No step along the search direction decreased the objective (the
    /// iterate is as good as rounding allows).
    LineSearch,
    /// The trainer does not report how it stopped (external trainers, or
    /// weights set by hand).
    #[default]
    Unreported,
}

impl StopReason {
    /// True when the optimiser met its convergence criterion.
    pub fn converged(self) -> bool {
        matches!(
            self,
            StopReason::GradientTolerance | StopReason::ObjectiveTolerance
        )
    }
}

/// What a fit did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Optimiser iterations.
    pub iterations: usize,
    /// Objective/gradient evaluations (each one pass over the data).
    pub evaluations: usize,
    /// Why it stopped.
    pub stop: StopReason,
    /// Final objective value, when the trainer reports it.
    pub objective: Option<f64>,
    /// Largest absolute gradient component at the end, when reported.
    pub gradient_max: Option<f64>,
    /// Validation loss of the kept iterate, under early stopping.
    pub validation_loss: Option<f64>,
}

/// A fitted linear model: P(malicious) = σ(wᵀx + b).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Weights, one per column of the training matrix.
    pub weights: Vec<f32>,
    /// Bias.
    pub bias: f32,
    /// The trainer that produced it.
    pub trainer: TrainerInfo,
    /// What the fit did.
    pub report: FitReport,
    /// How the probabilities were calibrated and the threshold chosen, for a
    /// [`CalibratedParams`](crate::probe::CalibratedParams) fit (the Platt map is already folded into
    /// `weights` and `bias`); `None` for a plain fit.
    pub calibration: Option<CalibrationReport>,
}

impl LinearModel {
    /// P(malicious) for every row of `x`.
    pub fn probabilities(&self, x: ArrayView2<'_, f32>) -> Result<Vec<f32>> {
        if x.ncols() != self.weights.len() {
            return Err(Error::DimensionMismatch {
                what: "model input".into(),
                expected: self.weights.len(),
                found: x.ncols(),
            });
        }
        let bias = f64::from(self.bias);
        Ok(x.rows()
            .into_iter()
            .map(|row| {
                let z = match row.as_slice() {
                    Some(values) => dot(&self.weights, values),
                    None => dot(&self.weights, &row.to_vec()),
                };
                sigmoid(z + bias) as f32
            })
            .collect())
    }
}

/// Checks a training set: one label per row, at least one sample of each
/// class, every value finite.
///
/// Errors: [`Error::LengthMismatch`], [`Error::Empty`], [`Error::MissingClass`],
/// [`Error::NonFiniteFeature`] (with row and column).
pub fn check_training_set(x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<()> {
    check_length("labels for feature rows", x.nrows(), labels.len())?;
    if x.nrows() == 0 || x.ncols() == 0 {
        return Err(Error::Empty {
            what: "training feature matrix",
        });
    }
    check_both_classes(labels)?;
    check_finite(x, "training features")
}

pub(crate) fn check_both_classes(labels: &[Label]) -> Result<()> {
    for (class, missing) in [(Label::Malicious, "malicious"), (Label::Benign, "benign")] {
        if !labels.contains(&class) {
            return Err(Error::MissingClass {
                missing,
                samples: labels.len(),
            });
        }
    }
    Ok(())
}

/// Finds the first non-finite value, scanning row blocks as rayon tasks
/// (one block on the calling thread for small matrices). A
/// row's `f32` sum is finite for every finite row except astronomically large
/// ones, so the precise scan runs only where the sum is not.
pub(crate) fn check_finite(x: ArrayView2<'_, f32>, what: &'static str) -> Result<()> {
    let parts = part_count(x.len(), MIN_PART_WORK);
    let ranges = split_ranges(x.nrows(), parts);
    let first_bad = map_parts(ranges, |rows| first_bad_in_rows(x, rows))
        .into_iter()
        .flatten()
        .min_by_key(|&(row, column, _)| (row, column));
    match first_bad {
        Some((row, column, value)) => Err(Error::NonFiniteFeature {
            what,
            row,
            column,
            value,
        }),
        None => Ok(()),
    }
}

fn first_bad_in_rows(
    x: ArrayView2<'_, f32>,
    rows: std::ops::Range<usize>,
) -> Option<(usize, usize, f32)> {
    rows.into_iter().find_map(|r| {
        let row = x.row(r);
        if row.sum().is_finite() {
            return None;
        }
        row.iter()
            .position(|v| !v.is_finite())
            .and_then(|c| row.get(c).map(|&v| (r, c, v)))
    })
}

/// Counts of each class.
pub(crate) fn class_counts(labels: &[Label]) -> (usize, usize) {
    let malicious = labels.iter().filter(|l| l.is_malicious()).count();
    (labels.len() - malicious, malicious)
}

/// Builds a [`LinearProbe`] from labelled deltas: fits the feature layout,
/// builds the training matrix (through a sketch when one is set), runs the
/// trainer and attaches the threshold and provenance.
///
/// Defaults: the given trainer ([`ProbeBuilder::default`] gives the default
/// trainer, [`CalibratedParams`](crate::probe::CalibratedParams)),
/// [`FeatureConfig::default`] (`first_layer_b`, L2), no sketch, and the
/// threshold the trainer chose (a
/// [`CalibratedParams`](crate::probe::CalibratedParams) fit picks τ by its [`Threshold`](crate::probe::Threshold)
/// policy on out-of-fold scores), else [`DEFAULT_THRESHOLD`]. An explicit
/// [`ProbeBuilder::threshold`] overrides both.
///
/// With the plain trainer on four deltas (too few for the default trainer's
/// five folds) and a threshold set by hand:
///
/// ```
/// use safe_fedllm::features::{FeatureConfig, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::{Label, LogisticParams, Probe, ProbeBuilder};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let delta = |a: f32, b: f32| -> safe_fedllm::Result<LoraDelta> {
///     let mut adapter = LoraAdapter::new();
///     adapter.insert(key, LoraTensor::new("b", [2, 1], vec![a, b])?)?;
///     Ok(LoraDelta::from_adapter(adapter))
/// };
/// let deltas = vec![delta(1.0, 0.1)?, delta(0.9, 0.2)?, delta(0.1, 1.0)?, delta(0.2, 0.9)?];
/// let labels = [Label::Benign, Label::Benign, Label::Malicious, Label::Malicious];
///
/// let probe = ProbeBuilder::new(LogisticParams::default().c(100.0))
///     .threshold(0.6)
///     .fit(&deltas, &labels)?;
/// assert!(probe.score(&delta(0.0, 1.0)?)? > 0.6);
/// assert!(probe.score(&delta(1.0, 0.0)?)? < 0.4);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ProbeBuilder<T> {
    trainer: T,
    features: FeatureConfig,
    sketch: Option<SketchConfig>,
    threshold: Option<f32>,
}

/// The default trainer, [`CalibratedParams::default`]: C by group k-fold,
/// Platt-calibrated scores and τ by its [`Threshold`](crate::probe::Threshold)
/// policy. [`ProbeBuilder::new`] takes any other trainer, such as the plain
/// [`LogisticParams`].
///
/// ```
/// use safe_fedllm::probe::{CalibratedParams, ProbeBuilder};
///
/// assert_eq!(ProbeBuilder::default().trainer(), &CalibratedParams::default());
/// ```
impl Default for ProbeBuilder<CalibratedParams> {
    fn default() -> Self {
        ProbeBuilder::new(CalibratedParams::default())
    }
}

impl<T: Trainer> ProbeBuilder<T> {
    /// A builder with the default settings around `trainer`.
    pub fn new(trainer: T) -> Self {
        ProbeBuilder {
            trainer,
            features: FeatureConfig::default(),
            sketch: None,
            threshold: None,
        }
    }

    /// Sets the feature selection and normalisation.
    pub fn features(mut self, features: FeatureConfig) -> Self {
        self.features = features;
        self
    }

    /// Trains through a seeded random projection (see [`SketchConfig`]); the
    /// saved weights are lifted back to the full feature space.
    pub fn sketch(mut self, sketch: SketchConfig) -> Self {
        self.sketch = Some(sketch);
        self
    }

    /// Sets the decision threshold (checked at fit: finite, in `[0, 1]`),
    /// overriding the one a calibrated trainer would choose.
    pub fn threshold(mut self, threshold: f32) -> Self {
        self.threshold = Some(threshold);
        self
    }

    fn check_threshold(&self) -> Result<()> {
        self.threshold.map_or(Ok(()), check_threshold)
    }

    /// The trainer.
    pub fn trainer(&self) -> &T {
        &self.trainer
    }

    /// Fits the feature layout on `deltas`, then trains on them.
    pub fn fit<D: TensorSource>(&self, deltas: &[D], labels: &[Label]) -> Result<LinearProbe> {
        self.fit_grouped(deltas, labels, None)
    }

    /// As [`ProbeBuilder::fit`], with a group id per delta (run or client) so
    /// that cross-validation never splits a group (see
    /// [`Trainer::fit_grouped`]).
    pub fn fit_grouped<D: TensorSource>(
        &self,
        deltas: &[D],
        labels: &[Label],
        groups: Option<&[usize]>,
    ) -> Result<LinearProbe> {
        self.check_threshold()?;
        let spec = self.features.fit(deltas)?;
        check_length("labels for deltas", deltas.len(), labels.len())?;
        let sketch = self.build_sketch(spec.dim())?;
        let x = feature_matrix(&spec, deltas, sketch.as_ref())?;
        self.train(spec, x.view(), labels, groups, sketch.as_ref())
    }

    /// Trains on `deltas` with an already frozen layout.
    pub fn fit_with_spec<D: TensorSource>(
        &self,
        spec: FeatureSpec,
        deltas: &[D],
        labels: &[Label],
    ) -> Result<LinearProbe> {
        self.check_threshold()?;
        check_length("labels for deltas", deltas.len(), labels.len())?;
        let sketch = self.build_sketch(spec.dim())?;
        let x = feature_matrix(&spec, deltas, sketch.as_ref())?;
        self.train(spec, x.view(), labels, None, sketch.as_ref())
    }

    /// Trains on a feature matrix built with `spec` (rows `spec.dim()` wide,
    /// before any sketch; the sketch, if set, is applied here row by row).
    pub fn fit_features(
        &self,
        spec: FeatureSpec,
        x: ArrayView2<'_, f32>,
        labels: &[Label],
    ) -> Result<LinearProbe> {
        self.fit_features_grouped(spec, x, labels, None)
    }

    /// As [`ProbeBuilder::fit_features`], with a group id per row.
    pub fn fit_features_grouped(
        &self,
        spec: FeatureSpec,
        x: ArrayView2<'_, f32>,
        labels: &[Label],
        groups: Option<&[usize]>,
    ) -> Result<LinearProbe> {
        self.check_threshold()?;
        if x.ncols() != spec.dim() {
            return Err(Error::DimensionMismatch {
                what: "training matrix vs feature spec".into(),
                expected: spec.dim(),
                found: x.ncols(),
            });
        }
        match self.build_sketch(spec.dim())? {
            None => self.train(spec, x, labels, groups, None),
            Some(sketch) => {
                let projected = project_rows(&sketch, x)?;
                self.train(spec, projected.view(), labels, groups, Some(&sketch))
            }
        }
    }

    /// Trains on the labelled adapters of a manifest, streaming: the layout is
    /// fitted from file headers, then each file becomes its (sketched) row.
    /// The manifest's groups ([`Manifest::groups`]) go to the trainer.
    pub fn fit_manifest(&self, manifest: &Manifest) -> Result<LinearProbe> {
        self.check_threshold()?;
        let spec = manifest.fit_spec(&self.features)?;
        let sketch = self.build_sketch(spec.dim())?;
        let x = manifest.feature_matrix(&spec, sketch.as_ref())?;
        let groups = manifest.groups();
        self.train(
            spec,
            x.view(),
            &manifest.labels(),
            Some(&groups),
            sketch.as_ref(),
        )
    }

    fn build_sketch(&self, dim: usize) -> Result<Option<Sketch>> {
        self.sketch.map(|config| config.build(dim)).transpose()
    }

    fn train(
        &self,
        spec: FeatureSpec,
        x: ArrayView2<'_, f32>,
        labels: &[Label],
        groups: Option<&[usize]>,
        sketch: Option<&Sketch>,
    ) -> Result<LinearProbe> {
        let model = self.trainer.fit_grouped(x, labels, groups)?;
        let threshold = match (self.threshold, &model.calibration) {
            (Some(explicit), _) => explicit,
            (None, Some(calibration)) => calibration.threshold.threshold,
            (None, None) => DEFAULT_THRESHOLD,
        };
        let weights = match sketch {
            Some(sketch) => sketch.lift(&model.weights)?,
            None => model.weights,
        };
        let (benign, malicious) = class_counts(labels);
        let info = ProbeInfo {
            trainer: model.trainer,
            fit: model.report,
            training: TrainingSummary {
                samples: labels.len(),
                benign,
                malicious,
                trained_dim: x.ncols(),
            },
            sketch: sketch.map(|s| *s.config()),
            calibration: model.calibration,
        };
        LinearProbe::with_info(spec, weights, model.bias, threshold, info)
    }
}

/// One feature row per delta; through the sketch when given, so only the
/// `[n, k]` sketched matrix is ever allocated (plus one `dim`-long scratch row).
pub(crate) fn feature_matrix<D: TensorSource>(
    spec: &FeatureSpec,
    deltas: &[D],
    sketch: Option<&Sketch>,
) -> Result<Array2<f32>> {
    let Some(sketch) = sketch else {
        return spec.transform_batch(deltas).map(|(x, _)| x);
    };
    let mut x = Array2::<f32>::zeros((deltas.len(), sketch.output_dim()));
    let mut scratch = vec![0.0f32; spec.dim()];
    for (mut row, delta) in x.rows_mut().into_iter().zip(deltas) {
        spec.transform_into(delta, &mut scratch)?;
        write_projection(sketch, &scratch, row.as_slice_mut())?;
    }
    Ok(x)
}

fn project_rows(sketch: &Sketch, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
    let mut out = Array2::<f32>::zeros((x.nrows(), sketch.output_dim()));
    for (mut dst, src) in out.rows_mut().into_iter().zip(x.rows()) {
        let src = src.to_vec();
        write_projection(sketch, &src, dst.as_slice_mut())?;
    }
    Ok(out)
}

fn write_projection(sketch: &Sketch, features: &[f32], row: Option<&mut [f32]>) -> Result<()> {
    match row {
        Some(row) => sketch.project(features, row),
        None => Err(Error::Empty {
            what: "contiguous row of the sketched matrix",
        }),
    }
}
