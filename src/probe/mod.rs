//! The LoRA-Probe: a linear classifier over probe features that scores a
//! ΔLoRA with P(malicious).
//!
//! * [`LinearProbe`] — weights, bias, the frozen [`FeatureSpec`] and the
//!   decision threshold; implements [`Probe`]; saved as safetensors with JSON
//!   metadata ([`LinearProbe::save`], [`LinearProbe::load`]).
//! * [`ProbeBuilder`] — fits the feature layout, builds the training matrix
//!   (optionally through a seeded [`SketchConfig`] so an `all_layers` matrix
//!   is never materialised) and runs a [`Trainer`];
//!   [`ProbeBuilder::default`] runs the default one, [`CalibratedParams`].
//! * [`CalibratedParams`] — the default trainer: C chosen by *group*
//!   k-fold (no run or client straddles folds), Platt-calibrated on
//!   out-of-fold scores and folded back into a plain linear probe, τ chosen
//!   by a [`Threshold`] policy (fixed, target false-positive rate, max F1)
//!   with the achieved rates and margin in a [`CalibrationReport`]. It is the
//!   one that holds on real deltas: on SmolLM2 PEFT deltas it flags 16 of 16
//!   malicious updates at its τ, where `LogisticParams::default()` at
//!   τ = 0.8 flags 6.
//! * [`LogisticParams`] — the plain, fast trainer that [`CalibratedParams`]
//!   runs inside: one class-balanced L2 logistic regression at a fixed C
//!   (multi-threaded L-BFGS, scikit-learn's objective), τ left at
//!   [`DEFAULT_THRESHOLD`]. With the `linfa` feature, `LinfaLogistic` and
//!   `LinfaSvm` are plain trainers too.
//! * [`eval`] — confusion counts, precision / recall / F1, ROC AUC, threshold
//!   selection and stratified k-fold cross-validation.
//! * [`Manifest`] — labelled adapters from a JSON-lines file.
//! * [`synthetic`] — a documented generator of separable feature matrices for
//!   tests and benchmarks.
//!
//! The default trainer chooses C, calibrates the scores and picks τ, here
//! for a false-positive budget of 5 %:
//!
//! ```
//! use safe_fedllm::probe::{CalibratedParams, Threshold, Trainer, synthetic::SyntheticConfig};
//!
//! let (x, labels) = SyntheticConfig::new(300, 64).separation(3.0).seed(3).generate()?;
//! let model = CalibratedParams::default()
//!     .threshold(Threshold::TargetFpr(0.05))
//!     .fit(x.view(), &labels)?;
//! let report = model.calibration.as_ref().expect("a calibrated fit reports");
//! assert!(report.threshold.false_positive_rate <= 0.05);
//! assert!(report.oof_roc_auc > 0.9);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```
//!
//! The plain trainer fits one C, and leaves the threshold to the caller:
//!
//! ```
//! use safe_fedllm::probe::eval::{select_threshold, roc_auc, ThresholdRule};
//! use safe_fedllm::probe::{LogisticParams, Trainer, synthetic::SyntheticConfig};
//!
//! // 300 synthetic L2-normalised feature rows, 30 % malicious.
//! let (x, labels) = SyntheticConfig::new(300, 64).separation(3.0).seed(3).generate()?;
//! let model = LogisticParams::default().c(10.0).fit(x.view(), &labels)?;
//! let scores = model.probabilities(x.view())?; // P(malicious) per row
//! assert!(roc_auc(&scores, &labels)? > 0.9);
//! let choice = select_threshold(&scores, &labels, ThresholdRule::TargetFalsePositiveRate(0.05))?;
//! assert!(choice.confusion.false_positive_rate() <= 0.05);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::features::FeatureSpec;
use crate::lora::TensorSource;

mod calibrate;
mod dataset;
pub mod eval;
pub(crate) mod kernels;
mod linear;
mod persist;
mod sketch;
pub mod synthetic;
mod train;

pub use calibrate::{
    CalibratedParams, CalibrationReport, GridPoint, Platt, Threshold, ThresholdReport,
    choose_threshold,
};
pub use dataset::{Manifest, ManifestEntry};
pub use linear::{LinearProbe, ProbeInfo, TrainingSummary};
pub use persist::{PROBE_FORMAT, PROBE_FORMAT_VERSION};
pub use sketch::{MAX_NNZ_PER_COLUMN, Sketch, SketchConfig};
pub use train::{
    ClassWeight, EarlyStopping, FitReport, Intercept, LinearModel, LogisticParams, ProbeBuilder,
    StopReason, Trainer, TrainerInfo, ValidLogisticParams, check_training_set,
};
#[cfg(feature = "linfa")]
pub use train::{LinfaLogistic, LinfaSvm};

/// Default decision threshold τ: a step is harmful when its score is ≥ 0.8
/// (Safe-FedLLM reference default).
pub const DEFAULT_THRESHOLD: f32 = 0.8;

/// The class of a training sample. The probe's positive class is always
/// [`Label::Malicious`]: scores are P(malicious).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// An update from benign fine-tuning.
    Benign,
    /// An update from malicious (harmful-data) fine-tuning.
    Malicious,
}

impl Label {
    /// True for [`Label::Malicious`].
    pub fn is_malicious(self) -> bool {
        self == Label::Malicious
    }

    /// `1.0` for malicious, `0.0` for benign: the target of the logistic loss.
    pub fn target(self) -> f64 {
        if self.is_malicious() { 1.0 } else { 0.0 }
    }

    /// Lower-case name, as manifests and JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Benign => "benign",
            Label::Malicious => "malicious",
        }
    }
}

/// Scores ΔLoRA updates with the probability that they come from malicious
/// fine-tuning.
///
/// The positive class is always *malicious*: a score of 1.0 means "certainly
/// malicious", whatever the trainer's own label convention was.
///
/// Implement it to plug an outside classifier into the defended round; only
/// the feature layout, the threshold and the score of one feature vector are
/// required:
///
/// ```
/// use safe_fedllm::features::{FeatureConfig, FeatureSpec, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
/// use safe_fedllm::probe::Probe;
///
/// /// An outside probe: a steep logistic on the first feature.
/// struct FirstFeature {
///     spec: FeatureSpec,
/// }
///
/// impl Probe for FirstFeature {
///     fn feature_spec(&self) -> &FeatureSpec {
///         &self.spec
///     }
///     fn threshold(&self) -> f32 {
///         0.5
///     }
///     fn score_features(&self, features: &[f32]) -> safe_fedllm::Result<f32> {
///         let x = features.first().copied().unwrap_or(0.0);
///         Ok(1.0 / (1.0 + (-10.0 * x).exp()))
///     }
/// }
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut delta = LoraAdapter::new();
/// delta.insert(key, LoraTensor::new("b", [2, 1], vec![0.8, 0.6])?)?;
/// let probe = FirstFeature { spec: FeatureConfig::new(Selection::FirstLayerB).fit(&[&delta])? };
/// let score = probe.score(&delta)?; // features L2-normalised: (0.8, 0.6)
/// assert!(probe.is_harmful(score));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub trait Probe: Send + Sync {
    /// The frozen feature layout the probe was trained on.
    fn feature_spec(&self) -> &FeatureSpec;

    /// Decision threshold τ: scores ≥ τ are harmful.
    fn threshold(&self) -> f32;

    /// P(malicious) for one feature vector of length `feature_spec().dim()`.
    fn score_features(&self, features: &[f32]) -> Result<f32>;

    /// P(malicious) for one delta.
    fn score<S: TensorSource + ?Sized>(&self, delta: &S) -> Result<f32>
    where
        Self: Sized,
    {
        let features = self.feature_spec().transform(delta)?;
        self.score_features(&features.values)
    }

    /// True when `score` is at or above the threshold.
    fn is_harmful(&self, score: f32) -> bool {
        score >= self.threshold()
    }

    /// P(malicious) for each delta of a batch, in order. Fails on the first
    /// delta that does not fit the feature layout.
    fn score_batch<S: TensorSource>(&self, deltas: &[S]) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        deltas.iter().map(|d| self.score(d)).collect()
    }

    /// P(malicious) for each row of a feature matrix (`[n, dim]`).
    fn score_matrix(&self, features: ArrayView2<'_, f32>) -> Result<Vec<f32>> {
        features
            .rows()
            .into_iter()
            .map(|row| match row.as_slice() {
                Some(values) => self.score_features(values),
                None => self.score_features(&row.to_vec()),
            })
            .collect()
    }
}
