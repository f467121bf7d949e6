//! The logistic trainer: class-weighted L2 logistic regression minimised by a
//! multi-threaded L-BFGS.
//!
//! This file holds the settings ([`LogisticParams`] → [`ValidLogisticParams`])
//! and the fit driver; `objective` holds the class-balanced loss and its
//! gradient, `lbfgs` the optimiser that minimises it.
//!
//! The model is fitted in the primal: a dual (kernel) formulation would only
//! pay when n² ≪ n·iterations, i.e. for a few dozen samples; the primal pass
//! costs n·d per evaluation, the Gram matrix n²·d once, so at n = 2,000 the
//! primal wins by two orders of magnitude and is the only route implemented.
//!
//! # Early stopping
//!
//! [`EarlyStopping::Validation`] holds out a stratified, seeded fraction of
//! the samples, evaluates the class-weighted validation loss after every
//! iteration, stops after `patience` iterations without improvement and keeps
//! the best iterate — the reference recipe's regulariser. It is off by default:
//! the L2 objective is strictly convex with a unique minimiser, so stopping
//! early only trades accuracy for time.

mod lbfgs;
mod objective;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use self::lbfgs::Lbfgs;
use self::objective::{Objective, check_layout, split_rows};
use crate::error::{Error, Result, check_parameter};
use crate::probe::Label;
use crate::probe::train::{FitReport, LinearModel, Trainer, TrainerInfo, check_training_set};

/// How samples are weighted in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeight {
    /// Each class weighs n/(2·n_class) per sample, so both classes count
    /// equally (scikit-learn's `"balanced"`; the reference's `pos_weight`).
    /// The default: malicious updates are rare.
    Balanced,
    /// Every sample weighs 1.
    Uniform,
    /// Explicit per-sample weights per class (finite, > 0).
    Custom {
        /// Weight of a benign sample.
        benign: f64,
        /// Weight of a malicious sample.
        malicious: f64,
    },
}

/// Whether the model has a bias term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intercept {
    /// Fit an unpenalised bias b (the default, as scikit-learn).
    Fit,
    /// b = 0.
    Zero,
}

/// Early stopping on a held-out validation split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStopping {
    /// Optimise to convergence (the default).
    Off,
    /// Hold out `fraction` of each class (seeded), stop after `patience`
    /// iterations without a lower validation loss, keep the best iterate.
    /// The reference recipe uses fraction 0.1 and patience 15.
    Validation {
        /// Share of each class held out, in (0, 0.5].
        fraction: f64,
        /// Iterations without improvement before stopping, ≥ 1.
        patience: usize,
        /// Seed of the split.
        seed: u64,
    },
}

impl EarlyStopping {
    /// The reference recipe's split: 10 % held out, patience 15, seed 0.
    pub fn reference() -> Self {
        EarlyStopping::Validation {
            fraction: 0.1,
            patience: 15,
            seed: 0,
        }
    }
}

/// Settings of the plain logistic trainer (unchecked; [`LogisticParams::check`]
/// or [`Trainer::fit`] validates them).
///
/// One fit at a fixed C, fast, and the probe keeps τ at
/// [`DEFAULT_THRESHOLD`](crate::probe::DEFAULT_THRESHOLD) unless told
/// otherwise. At the default `C = 1` the L2 penalty squeezes scores towards
/// 0.5, so τ = 0.8 can miss most malicious updates of a perfectly separable
/// set; the default trainer,
/// [`CalibratedParams`](crate::probe::CalibratedParams), runs this one inside
/// and chooses C, calibrates the scores and picks τ.
///
/// | setting | default | valid |
/// |---|---|---|
/// | `c` (inverse L2 strength, scikit-learn's `C`) | 1.0 | finite, > 0 |
/// | `class_weight` | [`ClassWeight::Balanced`] | custom weights finite, > 0 |
/// | `intercept` | [`Intercept::Fit`] | |
/// | `max_iterations` | 100 | ≥ 1 |
/// | `tolerance` (on max\|∇f\|) | 1e-4 | finite, ≥ 0 |
/// | `memory` (L-BFGS pairs) | 10 | 1 ..= 1000 |
/// | `threads` (ignored, see [`LogisticParams::threads`]) | 0 | ≤ 1024 |
/// | `early_stopping` | [`EarlyStopping::Off`] | fraction in (0, 0.5], patience ≥ 1 |
///
/// ```
/// use safe_fedllm::probe::{Label, LogisticParams, Trainer, synthetic::SyntheticConfig};
///
/// let (x, labels) = SyntheticConfig::new(120, 32).seed(1).generate()?;
/// let model = LogisticParams::default().c(10.0).fit(x.view(), &labels)?;
/// assert!(model.report.stop.converged());
///
/// let bad = LogisticParams::default().c(-1.0).fit(x.view(), &labels);
/// assert!(matches!(bad, Err(safe_fedllm::Error::InvalidParameter { name: "c", .. })));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogisticParams {
    c: f64,
    class_weight: ClassWeight,
    intercept: Intercept,
    max_iterations: usize,
    tolerance: f64,
    memory: usize,
    threads: usize,
    early_stopping: EarlyStopping,
}

impl Default for LogisticParams {
    fn default() -> Self {
        LogisticParams {
            c: 1.0,
            class_weight: ClassWeight::Balanced,
            intercept: Intercept::Fit,
            max_iterations: 100,
            tolerance: 1e-4,
            memory: 10,
            threads: 0,
            early_stopping: EarlyStopping::Off,
        }
    }
}

impl LogisticParams {
    setters! {
        /// Inverse regularisation strength, as scikit-learn's `C`.
        c: f64;
        /// Sample weighting.
        class_weight: ClassWeight;
        /// Bias term or none.
        intercept: Intercept;
        /// Iteration limit.
        max_iterations: usize;
        /// Convergence tolerance on the largest gradient component.
        tolerance: f64;
        /// Number of L-BFGS correction pairs kept.
        memory: usize;
        /// Kept for compatibility (configurations and saved parameters that set
        /// it still load and validate); it no longer changes anything.
        ///
        /// The trainer runs on the caller's current rayon pool, like all of the
        /// crate's parallel work: cap its threads with
        /// `rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(|| ..)`
        /// or `RAYON_NUM_THREADS` (see the [`aggregate`](crate::aggregate) module
        /// docs). The fitted model is the same on any number of threads.
        threads: usize;
        /// Early stopping policy.
        early_stopping: EarlyStopping;
    }

    /// Validates every setting.
    pub fn check(&self) -> Result<ValidLogisticParams> {
        const TRAINER: &str = "logistic trainer";
        let c = self.c;
        check_parameter(c.is_finite() && c > 0.0, TRAINER, "c", c, "finite, > 0")?;
        let tol = self.tolerance;
        let ok = tol.is_finite() && tol >= 0.0;
        check_parameter(ok, TRAINER, "tolerance", tol, "finite, >= 0")?;
        let iterations = self.max_iterations;
        let ok = iterations >= 1;
        check_parameter(ok, TRAINER, "max_iterations", iterations, ">= 1")?;
        let ok = (1..=1000).contains(&self.memory);
        check_parameter(ok, TRAINER, "memory", self.memory, "1 ..= 1000")?;
        let ok = self.threads <= 1024;
        check_parameter(ok, TRAINER, "threads", self.threads, "0 ..= 1024")?;
        if let ClassWeight::Custom { benign, malicious } = self.class_weight {
            for w in [benign, malicious] {
                let ok = w.is_finite() && w > 0.0;
                check_parameter(ok, TRAINER, "class_weight", w, "finite, > 0")?;
            }
        }
        if let EarlyStopping::Validation {
            fraction, patience, ..
        } = self.early_stopping
        {
            let (name, ok) = ("early_stopping.fraction", fraction > 0.0 && fraction <= 0.5);
            check_parameter(ok, TRAINER, name, fraction, "in (0, 0.5]")?;
            let name = "early_stopping.patience";
            check_parameter(patience >= 1, TRAINER, name, patience, ">= 1")?;
        }
        Ok(ValidLogisticParams(self.clone()))
    }
}

impl Trainer for LogisticParams {
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel> {
        self.check()?.fit(x, labels)
    }
}

/// Checked [`LogisticParams`]: the only type that fits.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidLogisticParams(LogisticParams);

impl ValidLogisticParams {
    /// The settings.
    pub fn params(&self) -> &LogisticParams {
        &self.0
    }
}

impl Trainer for ValidLogisticParams {
    fn fit(&self, x: ArrayView2<'_, f32>, labels: &[Label]) -> Result<LinearModel> {
        check_training_set(x, labels)?;
        let x = x.as_standard_layout();
        let data = x.as_slice().ok_or(Error::Empty {
            what: "contiguous training matrix",
        })?;
        let dim = x.ncols();
        let rows: Vec<usize> = (0..labels.len()).collect();
        let (solution, report) = self.solve(data, dim, &rows, labels, self.0.c, None)?;
        self.model(solution, report, dim)
    }
}

impl ValidLogisticParams {
    /// Minimises the objective over a subset of the rows of a row-major
    /// `[n, dim]` matrix, at inverse strength `c`, starting from `init`
    /// (`dim + 1` values: weights then bias) or from zero. The calibrated
    /// trainer's cross-validation runs every fold through here: no row is
    /// copied, and each C of the grid starts from the previous C's solution
    /// (scikit-learn's warm start along the path).
    ///
    /// The caller has checked the matrix (finite, one label per row); the
    /// subset must hold both classes.
    pub(crate) fn solve(
        &self,
        data: &[f32],
        dim: usize,
        rows: &[usize],
        labels: &[Label],
        c: f64,
        init: Option<&[f64]>,
    ) -> Result<(Vec<f64>, FitReport)> {
        check_layout(data, dim, rows, labels)?;
        let (train_rows, valid_rows) = split_rows(rows, labels, &self.0.early_stopping)?;
        let train = Objective::new(self, data, dim, train_rows, labels, c);
        let valid =
            valid_rows.map(|rows| Objective::new(self, data, dim, rows, labels, f64::INFINITY));
        Lbfgs::new(self).minimise(&train, valid.as_ref(), init)
    }

    /// Wraps a solution (weights then bias) as a [`LinearModel`].
    pub(crate) fn model(
        &self,
        solution: Vec<f64>,
        report: FitReport,
        dim: usize,
    ) -> Result<LinearModel> {
        let (weights, bias) = split_solution(&solution, dim)?;
        Ok(LinearModel {
            weights: weights.iter().map(|&w| w as f32).collect(),
            bias: bias as f32,
            trainer: TrainerInfo {
                name: "logistic-lbfgs".to_owned(),
                settings: settings_json(&self.0, "probe::train::logistic")?,
            },
            report,
            calibration: None,
        })
    }
}

/// A solution's `dim` weights and its bias ([`Error::Invariant`] unless it
/// holds exactly `dim + 1` values: the optimiser works on that vector).
pub(crate) fn split_solution(solution: &[f64], dim: usize) -> Result<(&[f64], f64)> {
    match solution.split_at_checked(dim) {
        Some((weights, &[bias])) => Ok((weights, bias)),
        _ => Err(Error::invariant(
            "probe::train::logistic",
            "a solution holds dim weights then the bias",
            format!("{} values for dim = {dim}", solution.len()),
        )),
    }
}

/// A trainer's settings as JSON for [`TrainerInfo`]. The settings are plain
/// structs that always serialise; a failure is a bug, reported as
/// [`Error::Invariant`] rather than recorded as `null`.
pub(crate) fn settings_json<T: Serialize>(
    settings: &T,
    location: &'static str,
) -> Result<serde_json::Value> {
    serde_json::to_value(settings).map_err(|e| {
        Error::invariant(
            location,
            "trainer settings serialise to JSON",
            e.to_string(),
        )
    })
}
