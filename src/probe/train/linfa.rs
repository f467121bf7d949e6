//! linfa trainers (cargo feature `linfa`): logistic regression and a linear
//! SVM with Platt-calibrated probabilities.
//!
//! Both reduce to a [`LinearModel`] — P(malicious) = σ(wᵀx + b) — so the probe
//! they produce scores, saves and loads like any other. They are exact but
//! slow at high dimension (linfa-logistic ≈ 27 s and linfa-svm ≈ 34 s for
//! 2,000 × 16,384 on the project's machine; see BENCHMARKS.md): use them as
//! reference trainers, and [`LogisticParams`](super::LogisticParams) for speed.

use linfa::composing::platt_scaling::{PlattParams, platt_newton_method};
use linfa::param_guard::ParamGuard;
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use linfa_svm::Svm;
use ndarray::{Array1, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::probe::Label;
use crate::probe::train::{
    FitReport, LinearModel, StopReason, Trainer, TrainerInfo, check_training_set, class_counts,
};

fn failed(trainer: &'static str, err: impl std::fmt::Display) -> Error {
    Error::TrainerFailed {
        trainer,
        reason: err.to_string(),
    }
}

fn targets(labels: &[Label]) -> Array1<bool> {
    labels.iter().map(|l| l.is_malicious()).collect()
}

fn positive(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            component: "linfa trainer",
            name,
            value: value.to_string(),
            expected: "finite, > 0",
        })
    }
}

/// linfa-logistic's `LogisticRegression` (L2 strength `alpha`, no class
/// weighting).
///
/// linfa-logistic calls the *more frequent* label its positive class, so
/// with few malicious samples its probabilities are P(benign). This trainer
/// reads `labels()` and negates w and b when the positive class is benign:
/// the result is always P(malicious).
///
/// Defaults: `alpha` 1.0, `max_iterations` 100, `gradient_tolerance` 1e-4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinfaLogistic {
    /// L2 penalty strength (finite, > 0).
    pub alpha: f64,
    /// Iteration limit of linfa's L-BFGS (≥ 1).
    pub max_iterations: u64,
    /// Gradient tolerance (finite, > 0).
    pub gradient_tolerance: f64,
}

impl Default for LinfaLogistic {
    fn default() -> Self {
        LinfaLogistic {
            alpha: 1.0,
            max_iterations: 100,
            gradient_tolerance: 1e-4,
        }
    }
}

impl Trainer for LinfaLogistic {
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel> {
        const NAME: &str = "linfa-logistic";
        positive("alpha", self.alpha)?;
        positive("gradient_tolerance", self.gradient_tolerance)?;
        if self.max_iterations == 0 {
            return Err(Error::InvalidParameter {
                component: "linfa trainer",
                name: "max_iterations",
                value: "0".into(),
                expected: ">= 1",
            });
        }
        check_training_set(x, labels)?;
        let dataset = Dataset::new(x.to_owned(), targets(labels));
        let model = LogisticRegression::<f32>::default()
            .alpha(self.alpha as f32)
            .max_iterations(self.max_iterations)
            .gradient_tolerance(self.gradient_tolerance as f32)
            .fit(&dataset)
            .map_err(|e| failed(NAME, e))?;
        // P(positive) = σ(wᵀx + b); P(malicious) = σ(±(wᵀx + b)).
        let sign = if model.labels().pos.class { 1.0 } else { -1.0 };
        Ok(LinearModel {
            weights: model.params().iter().map(|w| sign * w).collect(),
            bias: sign * model.intercept(),
            trainer: TrainerInfo {
                name: NAME.to_owned(),
                settings: crate::probe::train::settings_json(self, "probe::train::linfa")?,
            },
            report: FitReport::default(),
            calibration: None,
        })
    }
}

/// linfa-svm's C-SVM with a linear kernel, class-balanced penalties
/// (C·n/(2·n_class) per class) and Platt-scaled probabilities.
///
/// The SVM is fitted with boolean targets (true = malicious), its decision
/// value f(x) = wᵀx − ρ is read back (w by probing the linear hyperplane with
/// unit vectors), and linfa's own `platt_newton_method` fits P = 1/(1 +
/// e^{A·f + B}) on the training decision values — the same calibration
/// `Svm::<f32, Pr>` runs, but with A and B in hand, so the probe is the exact
/// linear model σ(−A·wᵀx + A·ρ − B).
///
/// Defaults: `c` 1.0, `eps` 1e-3 (linfa's solver tolerance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinfaSvm {
    /// Penalty C (finite, > 0), scaled per class for balance.
    pub c: f64,
    /// SMO stopping tolerance (finite, > 0).
    pub eps: f64,
}

impl Default for LinfaSvm {
    fn default() -> Self {
        LinfaSvm { c: 1.0, eps: 1e-3 }
    }
}

impl Trainer for LinfaSvm {
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel> {
        const NAME: &str = "linfa-svm";
        positive("c", self.c)?;
        positive("eps", self.eps)?;
        check_training_set(x, labels)?;
        let (benign, malicious) = class_counts(labels);
        let n = labels.len() as f64;
        let c_pos = (self.c * n / (2.0 * malicious as f64)) as f32;
        let c_neg = (self.c * n / (2.0 * benign as f64)) as f32;
        let targets = targets(labels);
        let dataset = Dataset::new(x.to_owned(), targets.clone());
        let svm = Svm::<f32, bool>::params()
            .linear_kernel()
            .pos_neg_weights(c_pos, c_neg)
            .eps(self.eps as f32)
            .fit(&dataset)
            .map_err(|e| failed(NAME, e))?;
        let weights = hyperplane(&svm, x.ncols());
        let decisions: Array1<f32> = x
            .rows()
            .into_iter()
            .map(|row| svm.weighted_sum(&row) - svm.rho)
            .collect();
        let platt = PlattParams::<f32, ()>::default()
            .check()
            .map_err(|e| failed(NAME, e))?;
        let (a, b) = platt_newton_method(decisions.view(), targets.view(), &platt)
            .map_err(|e| failed(NAME, e))?;
        Ok(LinearModel {
            weights: weights.iter().map(|w| -a * w).collect(),
            bias: a * svm.rho - b,
            trainer: TrainerInfo {
                name: NAME.to_owned(),
                settings: crate::probe::train::settings_json(self, "probe::train::linfa")?,
            },
            report: FitReport {
                stop: StopReason::Unreported,
                ..FitReport::default()
            },
            calibration: None,
        })
    }
}

/// w of a linear-kernel SVM: wⱼ = `weighted_sum`(eⱼ), read one unit vector at a time
/// (linfa keeps the hyperplane private; d probes of O(d) each).
fn hyperplane(svm: &Svm<f32, bool>, dim: usize) -> Vec<f32> {
    let mut unit = Array1::<f32>::zeros(dim);
    (0..dim)
        .map(|j| {
            if let Some(v) = unit.get_mut(j) {
                *v = 1.0;
            }
            let w = svm.weighted_sum(&unit);
            if let Some(v) = unit.get_mut(j) {
                *v = 0.0;
            }
            w
        })
        .collect()
}
