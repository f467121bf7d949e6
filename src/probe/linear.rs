//! [`LinearProbe`]: s = σ(wᵀx + b) over a frozen feature layout.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::FeatureSpec;
use crate::probe::calibrate::CalibrationReport;
use crate::probe::kernels::{dot, first_non_finite, sigmoid};
use crate::probe::sketch::SketchConfig;
use crate::probe::train::{FitReport, TrainerInfo};
use crate::probe::{DEFAULT_THRESHOLD, Probe};

/// What the training set looked like.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Number of training samples.
    pub samples: usize,
    /// Benign samples among them.
    pub benign: usize,
    /// Malicious samples among them.
    pub malicious: usize,
    /// Width of the matrix the trainer saw (the sketch width when sketched).
    pub trained_dim: usize,
}

/// Provenance carried with a probe and saved in its metadata: the trainer and
/// its settings, what the fit did, the training set, and the sketch used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// Trainer name and settings.
    pub trainer: TrainerInfo,
    /// Iterations, convergence, objective.
    pub fit: FitReport,
    /// Class counts and dimensions.
    pub training: TrainingSummary,
    /// The random projection the weights were trained through, if any. The
    /// stored weights are already lifted back to the feature space
    /// (w = Pᵀ·w_sketch), so scoring does not need the sketch.
    pub sketch: Option<SketchConfig>,
    /// Cross-validated calibration and threshold choice, for a probe trained
    /// with [`CalibratedParams`](crate::probe::CalibratedParams): the chosen
    /// C, the Platt map (already folded into the weights), the out-of-fold
    /// AUC, ECE and Brier score, and the threshold with its out-of-fold FPR,
    /// recall and margin. Absent from files written before calibration
    /// existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationReport>,
}

impl ProbeInfo {
    /// Info for weights that were set by hand rather than trained.
    pub fn manual() -> Self {
        ProbeInfo {
            trainer: TrainerInfo {
                name: "manual".to_owned(),
                settings: serde_json::Value::Null,
            },
            fit: FitReport::default(),
            training: TrainingSummary::default(),
            sketch: None,
            calibration: None,
        }
    }
}

/// A logistic-regression probe: P(malicious) = σ(wᵀx + b), where x is the
/// feature vector the frozen [`FeatureSpec`] builds from a ΔLoRA.
///
/// Scoring is deterministic: the dot product has a fixed evaluation order, so
/// a saved and reloaded probe gives bit-identical scores.
///
/// ```
/// use safe_fedllm::features::{FeatureConfig, Selection};
/// use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraTensor};
/// use safe_fedllm::probe::{LinearProbe, Probe};
///
/// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
/// let mut adapter = LoraAdapter::new();
/// adapter.insert(key, LoraTensor::new("b", [2, 1], vec![3.0, 4.0])?)?;
/// let delta = LoraDelta::from_adapter(adapter);
/// let spec = FeatureConfig::new(Selection::FirstLayerB).fit(&[&delta])?;
///
/// // Features are (0.6, 0.8); logit = 10·0.6 − 5·0.8 − 2 = 0.
/// let probe = LinearProbe::new(spec, vec![10.0, -5.0], -2.0)?;
/// assert!((probe.score(&delta)? - 0.5).abs() < 1e-6);
/// assert!(!probe.is_harmful(0.5)); // default threshold 0.8
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbe {
    spec: FeatureSpec,
    weights: Vec<f32>,
    bias: f32,
    threshold: f32,
    info: ProbeInfo,
}

impl LinearProbe {
    /// A probe with the [`DEFAULT_THRESHOLD`] and [`ProbeInfo::manual`].
    ///
    /// Errors: [`Error::DimensionMismatch`] when `weights` is not
    /// `spec.dim()` long, [`Error::NonFiniteFeature`] for a non-finite weight
    /// and [`Error::InvalidParameter`] for a non-finite bias.
    pub fn new(spec: FeatureSpec, weights: Vec<f32>, bias: f32) -> Result<Self> {
        Self::with_info(spec, weights, bias, DEFAULT_THRESHOLD, ProbeInfo::manual())
    }

    /// A probe with every field given; validated like [`LinearProbe::new`],
    /// plus the threshold (finite, within `[0, 1]`).
    pub fn with_info(
        spec: FeatureSpec,
        weights: Vec<f32>,
        bias: f32,
        threshold: f32,
        info: ProbeInfo,
    ) -> Result<Self> {
        check_weights(&spec, &weights, bias)?;
        check_threshold(threshold)?;
        Ok(LinearProbe {
            spec,
            weights,
            bias,
            threshold,
            info,
        })
    }

    /// Returns the probe with another decision threshold (finite, in `[0, 1]`).
    pub fn with_threshold(mut self, threshold: f32) -> Result<Self> {
        check_threshold(threshold)?;
        self.threshold = threshold;
        Ok(self)
    }

    /// The weights w, one per feature.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// The bias b.
    pub fn bias(&self) -> f32 {
        self.bias
    }

    /// Trainer, fit report, training summary and sketch.
    pub fn info(&self) -> &ProbeInfo {
        &self.info
    }

    /// The logit wᵀx + b for one feature vector (checked like
    /// [`Probe::score_features`]).
    pub fn logit(&self, features: &[f32]) -> Result<f64> {
        if features.len() != self.weights.len() {
            return Err(Error::DimensionMismatch {
                what: "probe input".into(),
                expected: self.weights.len(),
                found: features.len(),
            });
        }
        let z = dot(&self.weights, features) + f64::from(self.bias);
        if z.is_finite() {
            return Ok(z);
        }
        // Only now pay for a scan: a non-finite input is rejected; finite
        // inputs so large that wᵀx overflows give ±∞ (score 1 or 0) or, for
        // ∞ − ∞, an error.
        match first_non_finite(features) {
            Some((column, value)) => Err(Error::NonFiniteFeature {
                what: "probe input",
                row: 0,
                column,
                value,
            }),
            None if z.is_nan() => Err(Error::NumericalFailure {
                solver: "probe scoring",
                iteration: 0,
                detail: "wᵀx overflowed to ∞ − ∞ (feature values too large for f32)".into(),
            }),
            None => Ok(z),
        }
    }
}

impl Probe for LinearProbe {
    fn feature_spec(&self) -> &FeatureSpec {
        &self.spec
    }

    fn threshold(&self) -> f32 {
        self.threshold
    }

    fn score_features(&self, features: &[f32]) -> Result<f32> {
        self.logit(features).map(|z| sigmoid(z) as f32)
    }
}

pub(crate) fn check_weights(spec: &FeatureSpec, weights: &[f32], bias: f32) -> Result<()> {
    if weights.len() != spec.dim() {
        return Err(Error::DimensionMismatch {
            what: "probe weights vs feature spec".into(),
            expected: spec.dim(),
            found: weights.len(),
        });
    }
    if let Some((column, value)) = first_non_finite(weights) {
        return Err(Error::NonFiniteFeature {
            what: "probe weights",
            row: 0,
            column,
            value,
        });
    }
    if !bias.is_finite() {
        return Err(Error::InvalidParameter {
            component: "linear probe",
            name: "bias",
            value: bias.to_string(),
            expected: "a finite number",
        });
    }
    Ok(())
}

pub(crate) fn check_threshold(threshold: f32) -> Result<()> {
    if (0.0..=1.0).contains(&threshold) {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            component: "linear probe",
            name: "threshold",
            value: threshold.to_string(),
            expected: "a probability in [0, 1]",
        })
    }
}
