//! The LoRA-Probe: a linear classifier over probe features that scores a
//! ΔLoRA with P(malicious).

use crate::error::Result;
use crate::features::FeatureSpec;
use crate::lora::TensorSource;

/// Default decision threshold τ: a step is harmful when its score is ≥ 0.8
/// (Safe-FedLLM reference default).
pub const DEFAULT_THRESHOLD: f32 = 0.8;

/// Scores ΔLoRA updates with the probability that they come from malicious
/// fine-tuning.
///
/// The positive class is always *malicious*: a score of 1.0 means "certainly
/// malicious", whatever the trainer's own label convention was.
pub trait Probe: Send + Sync {
    /// The frozen feature layout the probe was trained on.
    fn feature_spec(&self) -> &FeatureSpec;

    /// Decision threshold τ: scores ≥ τ are harmful.
    fn threshold(&self) -> f32;

    /// P(malicious) for one feature vector of length `feature_spec().dim()`.
    fn score_features(&self, features: &[f32]) -> Result<f32>;

    /// P(malicious) for one delta.
    fn score<S: TensorSource>(&self, delta: &S) -> Result<f32>
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
}
