//! The default trainer: class-weighted L2 logistic regression minimised by a
//! multi-threaded L-BFGS.
//!
//! # Objective
//!
//! With targets tᵢ ∈ {0, 1} (1 = malicious), sample weights cᵢ from the
//! [`ClassWeight`], S = Σcᵢ and zᵢ = wᵀxᵢ + b:
//!
//! ```text
//! f(w, b) = (1/S) Σᵢ cᵢ·[ln(1 + e^{zᵢ}) − tᵢ·zᵢ]  +  ‖w‖² / (2·C·S)
//! ```
//!
//! This is exactly what scikit-learn's `LogisticRegression(C=C,
//! class_weight=…, solver="lbfgs")` minimises (its `0.5‖w‖² + C·Σ cᵢ·ℓᵢ`
//! divided by C·S; the intercept is not penalised), so the same `C` gives the
//! same model. The Safe-FedLLM reference recipe (BCE with
//! `pos_weight = #benign/#malicious`, weight decay) is the same loss:
//! [`ClassWeight::Balanced`] gives the classes weights n/(2·n_class), whose
//! ratio is that `pos_weight`; its decoupled weight decay plays the role of
//! the L2 term.
//!
//! # Solver
//!
//! L-BFGS (memory 10) with an Armijo backtracking line search, in `f64`
//! parameters over `f32` data. Each evaluation is **one pass** over the rows:
//! per row the dot product zᵢ = wᵀxᵢ and the gradient update
//! g += rᵢ·xᵢ are done while the row is in cache, and rows are split into
//! blocks (rayon tasks on the caller's pool, see [`crate::parallel`]), each
//! with its own gradient buffer. Block boundaries depend on n and d only and
//! the blocks' partial sums are added in block order, so the fitted model is
//! bit-for-bit the same on any number of threads. It stops
//! when max|∇f| ≤ `tolerance` (scikit-learn's `tol`, also applied to max|∇f|
//! there), when the relative decrease of f falls below 64·ε (as
//! scikit-learn's), or after `max_iterations`.
//!
//! A dual (kernel) formulation would only pay when n² ≪ n·iterations, i.e.
//! for a few dozen samples; the primal pass costs n·d per evaluation, the Gram
//! matrix n²·d once, so at n = 2,000 the primal wins by two orders of
//! magnitude and is the only route implemented.
//!
//! # Early stopping
//!
//! [`EarlyStopping::Validation`] holds out a stratified, seeded fraction of
//! the samples, evaluates the class-weighted validation loss after every
//! iteration, stops after `patience` iterations without improvement and keeps
//! the best iterate — the reference recipe's regulariser. It is off by default:
//! the L2 objective is strictly convex with a unique minimiser, so stopping
//! early only trades accuracy for time.

use std::collections::VecDeque;

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::parallel::{MIN_PART_WORK, map_parts, part_count, split_ranges};
use crate::probe::Label;
use crate::probe::kernels::{axpy, dot, logistic_loss, sigmoid};
use crate::probe::train::{
    FitReport, LinearModel, StopReason, Trainer, TrainerInfo, check_both_classes,
    check_training_set, class_counts,
};
use crate::rng::Rng;

const SOLVER: &str = "logistic L-BFGS";
/// scikit-learn's `ftol` for lbfgs: 64 machine epsilons.
const OBJECTIVE_TOLERANCE: f64 = 64.0 * f64::EPSILON;
/// Armijo sufficient-decrease constant.
const ARMIJO: f64 = 1e-4;
/// Line-search trials before giving up on a direction.
const MAX_LINE_SEARCH: usize = 30;

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

/// Settings of the default trainer (unchecked; [`LogisticParams::check`] or
/// [`Trainer::fit`] validates them).
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
    /// Inverse regularisation strength, as scikit-learn's `C`.
    pub fn c(mut self, c: f64) -> Self {
        self.c = c;
        self
    }

    /// Sample weighting.
    pub fn class_weight(mut self, class_weight: ClassWeight) -> Self {
        self.class_weight = class_weight;
        self
    }

    /// Bias term or none.
    pub fn intercept(mut self, intercept: Intercept) -> Self {
        self.intercept = intercept;
        self
    }

    /// Iteration limit.
    pub fn max_iterations(mut self, max_iterations: usize) -> Self {
        self.max_iterations = max_iterations;
        self
    }

    /// Convergence tolerance on the largest gradient component.
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Number of L-BFGS correction pairs kept.
    pub fn memory(mut self, memory: usize) -> Self {
        self.memory = memory;
        self
    }

    /// Kept for compatibility (configurations and saved parameters that set
    /// it still load and validate); it no longer changes anything.
    ///
    /// The trainer runs on the caller's current rayon pool, like all of the
    /// crate's parallel work: cap its threads with
    /// `rayon::ThreadPoolBuilder::new().num_threads(n).build()?.install(|| ..)`
    /// or `RAYON_NUM_THREADS` (see the [`aggregate`](crate::aggregate) module
    /// docs). The fitted model is the same on any number of threads.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Early stopping policy.
    pub fn early_stopping(mut self, early_stopping: EarlyStopping) -> Self {
        self.early_stopping = early_stopping;
        self
    }

    /// Validates every setting.
    pub fn check(&self) -> Result<ValidLogisticParams> {
        ensure(
            self.c.is_finite() && self.c > 0.0,
            "c",
            self.c,
            "finite, > 0",
        )?;
        ensure(
            self.tolerance.is_finite() && self.tolerance >= 0.0,
            "tolerance",
            self.tolerance,
            "finite, >= 0",
        )?;
        ensure(
            self.max_iterations >= 1,
            "max_iterations",
            self.max_iterations,
            ">= 1",
        )?;
        ensure(
            (1..=1000).contains(&self.memory),
            "memory",
            self.memory,
            "1 ..= 1000",
        )?;
        ensure(self.threads <= 1024, "threads", self.threads, "0 ..= 1024")?;
        if let ClassWeight::Custom { benign, malicious } = self.class_weight {
            for w in [benign, malicious] {
                ensure(w.is_finite() && w > 0.0, "class_weight", w, "finite, > 0")?;
            }
        }
        if let EarlyStopping::Validation {
            fraction, patience, ..
        } = self.early_stopping
        {
            ensure(
                fraction > 0.0 && fraction <= 0.5,
                "early_stopping.fraction",
                fraction,
                "in (0, 0.5]",
            )?;
            ensure(patience >= 1, "early_stopping.patience", patience, ">= 1")?;
        }
        Ok(ValidLogisticParams(self.clone()))
    }
}

fn ensure(
    ok: bool,
    name: &'static str,
    value: impl ToString,
    expected: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            component: "logistic trainer",
            name,
            value: value.to_string(),
            expected,
        })
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

/// The invariant [`Objective`] relies on: `data` is `[labels.len(), dim]`
/// row-major and every row index names a labelled row. Callers build all
/// three from one checked training set, so a failure is a bug.
fn check_layout(data: &[f32], dim: usize, rows: &[usize], labels: &[Label]) -> Result<()> {
    let fits = labels.len().checked_mul(dim) == Some(data.len());
    match rows.iter().find(|&&i| i >= labels.len()) {
        Some(&i) => Err(Error::invariant(
            "probe::train::logistic::solve",
            "every row index names a labelled row of the training matrix",
            format!("row {i} of {} labelled rows", labels.len()),
        )),
        None if !fits => Err(Error::invariant(
            "probe::train::logistic::solve",
            "the training matrix is [labels, dim] row-major",
            format!("{} values for {} labels × {dim}", data.len(), labels.len()),
        )),
        None => Ok(()),
    }
}

/// Training and validation row indices among `rows` (all of them for
/// training when early stopping is off). Each class keeps at least one
/// training sample.
fn split_rows(
    rows: &[usize],
    labels: &[Label],
    early: &EarlyStopping,
) -> Result<(Vec<usize>, Option<Vec<usize>>)> {
    let EarlyStopping::Validation { fraction, seed, .. } = *early else {
        return Ok((rows.to_vec(), None));
    };
    let mut rng = Rng::new(seed);
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for class in [Label::Benign, Label::Malicious] {
        let mut class_rows: Vec<usize> = rows
            .iter()
            .copied()
            .filter(|&i| labels.get(i) == Some(&class))
            .collect();
        rng.shuffle(&mut class_rows);
        let held = ((class_rows.len() as f64 * fraction).round() as usize)
            .min(class_rows.len().saturating_sub(1));
        valid.extend(class_rows.iter().take(held));
        train.extend(class_rows.iter().skip(held));
    }
    train.sort_unstable();
    valid.sort_unstable();
    let train_labels: Vec<Label> = train
        .iter()
        .filter_map(|&i| labels.get(i).copied())
        .collect();
    check_both_classes(&train_labels)?;
    let valid = (!valid.is_empty()).then_some(valid);
    Ok((train, valid))
}

/// The weighted, L2-penalised logistic loss over a subset of rows.
struct Objective<'a> {
    data: &'a [f32],
    dim: usize,
    rows: Vec<usize>,
    /// Per row (aligned with `rows`): target tᵢ and weight cᵢ/S.
    targets: Vec<f64>,
    weights: Vec<f64>,
    /// 1/(C·S); 0 for a validation objective (C = ∞).
    l2: f64,
    intercept: Intercept,
}

/// Fewest rows per block of an evaluation: a block's gradient buffer (d
/// values, summed into the total at the end) then costs at most 1/64 of the
/// block's own pass over its rows.
const MIN_ROWS_PER_BLOCK: usize = 64;

/// One block's share of an evaluation.
struct Partial {
    loss: f64,
    grad: Vec<f32>,
    grad_bias: f64,
}

impl<'a> Objective<'a> {
    fn new(
        params: &ValidLogisticParams,
        data: &'a [f32],
        dim: usize,
        rows: Vec<usize>,
        labels: &[Label],
        c: f64,
    ) -> Self {
        // Every row has a label (checked in `solve`), so `row_labels` stays
        // aligned with `rows`.
        let row_labels: Vec<Label> = rows
            .iter()
            .filter_map(|&i| labels.get(i).copied())
            .collect();
        let (benign, malicious) = class_counts(&row_labels);
        let (w_benign, w_malicious) = class_weights(&params.0.class_weight, benign, malicious);
        let sum = w_benign * benign as f64 + w_malicious * malicious as f64;
        let weights = row_labels
            .iter()
            .map(|l| if l.is_malicious() { w_malicious } else { w_benign } / sum)
            .collect();
        Objective {
            data,
            dim,
            rows,
            targets: row_labels.iter().map(|l| l.target()).collect(),
            weights,
            l2: 1.0 / (c * sum),
            intercept: params.0.intercept,
        }
    }

    /// Row `i` of the matrix. `solve` checked that `data` is
    /// `[labels, dim]` and that every row index is below the label count, so
    /// the range is always inside `data` and the empty fallback is unreachable.
    fn row(&self, i: usize) -> &[f32] {
        self.data
            .get(i * self.dim..(i + 1) * self.dim)
            .unwrap_or(&[])
    }

    /// f(w) and, when `grad` is given, ∇f(w) — in one pass over the rows.
    fn evaluate(&self, w: &[f64], grad: Option<&mut [f64]>) -> Result<f64> {
        let w32: Vec<f32> = w.iter().take(self.dim).map(|&v| v as f32).collect();
        let bias = match self.intercept {
            Intercept::Fit => split_solution(w, self.dim)?.1,
            Intercept::Zero => 0.0,
        };
        let with_grad = grad.is_some();
        let n = self.rows.len();
        let blocks = part_count(n.saturating_mul(self.dim), MIN_PART_WORK)
            .min(n / MIN_ROWS_PER_BLOCK)
            .max(1);
        let ranges = split_ranges(n, blocks);
        let partials = map_parts(ranges, |range| self.partial(range, &w32, bias, with_grad));
        let penalty: f64 = w.iter().take(self.dim).map(|v| v * v).sum::<f64>() * 0.5 * self.l2;
        let loss = partials.iter().map(|p| p.loss).sum::<f64>() + penalty;
        if let Some(grad) = grad {
            self.reduce_gradient(w, &partials, grad);
        }
        Ok(loss)
    }

    fn partial(
        &self,
        range: std::ops::Range<usize>,
        w: &[f32],
        bias: f64,
        with_grad: bool,
    ) -> Partial {
        let mut grad = if with_grad {
            vec![0.0f32; self.dim]
        } else {
            Vec::new()
        };
        let mut loss = 0.0;
        let mut grad_bias = 0.0;
        for k in range {
            let (Some(&i), Some(&t), Some(&c)) =
                (self.rows.get(k), self.targets.get(k), self.weights.get(k))
            else {
                continue;
            };
            let x = self.row(i);
            let z = dot(w, x) + bias;
            let margin = if t > 0.5 { z } else { -z };
            loss += c * logistic_loss(margin);
            if with_grad {
                let r = c * (sigmoid(z) - t);
                grad_bias += r;
                axpy(r as f32, x, &mut grad);
            }
        }
        Partial {
            loss,
            grad,
            grad_bias,
        }
    }

    /// Adds the blocks' gradients coordinate by coordinate, always in block
    /// order (coordinate ranges are rayon tasks when the sum is large).
    fn reduce_gradient(&self, w: &[f64], partials: &[Partial], grad: &mut [f64]) {
        // grad and w both hold dim weights then the bias.
        let coords = grad.len().min(self.dim).min(w.len());
        let (data_grad, _) = grad.split_at_mut(coords);
        let (data_w, _) = w.split_at(coords);
        let parts = part_count(coords.saturating_mul(partials.len()), MIN_PART_WORK);
        let per_part = coords.div_ceil(parts).max(1);
        let slices: Vec<(usize, &mut [f64], &[f64])> = data_grad
            .chunks_mut(per_part)
            .zip(data_w.chunks(per_part))
            .enumerate()
            .map(|(k, (chunk, w_chunk))| (k * per_part, chunk, w_chunk))
            .collect();
        map_parts(slices, |(start, chunk, w_chunk)| {
            for (offset, (g, wj)) in chunk.iter_mut().zip(w_chunk).enumerate() {
                let j = start + offset;
                let data: f64 = partials
                    .iter()
                    .filter_map(|p| p.grad.get(j))
                    .map(|&v| f64::from(v))
                    .sum();
                *g = data + self.l2 * wj;
            }
        });
        if let Some(g) = grad.get_mut(self.dim) {
            *g = match self.intercept {
                Intercept::Fit => partials.iter().map(|p| p.grad_bias).sum(),
                Intercept::Zero => 0.0,
            };
        }
    }
}

fn class_weights(weight: &ClassWeight, benign: usize, malicious: usize) -> (f64, f64) {
    let n = (benign + malicious) as f64;
    match *weight {
        ClassWeight::Balanced => (
            n / (2.0 * benign.max(1) as f64),
            n / (2.0 * malicious.max(1) as f64),
        ),
        ClassWeight::Uniform => (1.0, 1.0),
        ClassWeight::Custom { benign, malicious } => (benign, malicious),
    }
}

/// Limited-memory BFGS over the `d + 1` parameters (weights, bias).
struct Lbfgs {
    max_iterations: usize,
    tolerance: f64,
    memory: usize,
    patience: Option<usize>,
}

/// Correction pairs (s, y, 1/sᵀy), newest last.
struct History {
    pairs: VecDeque<(Vec<f64>, Vec<f64>, f64)>,
    capacity: usize,
}

impl History {
    fn push(&mut self, s: Vec<f64>, y: Vec<f64>) {
        let sy = vdot(&s, &y);
        if sy <= 1e-12 * norm(&s) * norm(&y) {
            return; // curvature condition fails: skip the pair
        }
        if self.pairs.len() == self.capacity {
            self.pairs.pop_front();
        }
        self.pairs.push_back((s, y, 1.0 / sy));
    }

    /// −H·g by the two-loop recursion (H₀ = γI, γ = sᵀy/yᵀy of the newest pair).
    fn direction(&self, g: &[f64]) -> Vec<f64> {
        let mut q: Vec<f64> = g.to_vec();
        let mut alphas = Vec::with_capacity(self.pairs.len());
        for (s, y, rho) in self.pairs.iter().rev() {
            let a = rho * vdot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, y)| *q -= a * y);
            alphas.push(a);
        }
        if let Some((s, y, _)) = self.pairs.back() {
            let gamma = vdot(s, y) / vdot(y, y);
            q.iter_mut().for_each(|q| *q *= gamma);
        }
        for ((s, y, rho), a) in self.pairs.iter().zip(alphas.iter().rev()) {
            let b = rho * vdot(y, &q);
            q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
        }
        q.iter_mut().for_each(|q| *q = -*q);
        q
    }
}

/// Best iterate seen on the validation objective.
struct Best {
    loss: f64,
    point: Vec<f64>,
    stale: usize,
}

impl Lbfgs {
    fn new(params: &ValidLogisticParams) -> Self {
        let p = &params.0;
        Lbfgs {
            max_iterations: p.max_iterations,
            tolerance: p.tolerance,
            memory: p.memory,
            patience: match p.early_stopping {
                EarlyStopping::Off => None,
                EarlyStopping::Validation { patience, .. } => Some(patience),
            },
        }
    }

    fn minimise(
        &self,
        f: &Objective<'_>,
        valid: Option<&Objective<'_>>,
        init: Option<&[f64]>,
    ) -> Result<(Vec<f64>, FitReport)> {
        let n = f.dim + 1;
        let mut x = match init {
            Some(start) if start.len() == n && start.iter().all(|v| v.is_finite()) => {
                start.to_vec()
            }
            _ => vec![0.0f64; n],
        };
        if f.intercept == Intercept::Zero
            && let Some(b) = x.get_mut(f.dim)
        {
            *b = 0.0;
        }
        let mut g = vec![0.0f64; n];
        let mut fx = finite(f.evaluate(&x, Some(&mut g))?, 0, "objective")?;
        let mut report = FitReport {
            evaluations: 1,
            stop: StopReason::MaxIterations,
            ..FitReport::default()
        };
        let mut history = History {
            pairs: VecDeque::new(),
            capacity: self.memory,
        };
        let mut best = match valid {
            Some(v) => Some(Best {
                loss: v.evaluate(&x, None)?,
                point: x.clone(),
                stale: 0,
            }),
            None => None,
        };
        for iteration in 1..=self.max_iterations {
            if max_abs(&g) <= self.tolerance {
                report.stop = StopReason::GradientTolerance;
                break;
            }
            let Some((x_new, g_new, f_new, evals)) =
                self.line_search(f, &x, fx, &g, &history, iteration)?
            else {
                report.stop = StopReason::LineSearch;
                break;
            };
            report.evaluations += evals;
            report.iterations = iteration;
            let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
            let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
            history.push(s, y);
            let decrease = (fx - f_new) / fx.abs().max(f_new.abs()).max(1.0);
            (x, g, fx) = (x_new, g_new, f_new);
            if decrease <= OBJECTIVE_TOLERANCE {
                report.stop = StopReason::ObjectiveTolerance;
                break;
            }
            if let (Some(best), Some(valid), Some(patience)) = (best.as_mut(), valid, self.patience)
                && track_best(best, valid, &x)? >= patience
            {
                report.stop = StopReason::EarlyStopping;
                break;
            }
        }
        if let Some(best) = best {
            report.validation_loss = Some(best.loss);
            if best.loss < valid.map_or(Ok(f64::INFINITY), |v| v.evaluate(&x, None))? {
                x = best.point;
                fx = f.evaluate(&x, Some(&mut g))?;
            }
        }
        report.objective = Some(fx);
        report.gradient_max = Some(max_abs(&g));
        Ok((x, report))
    }

    /// Armijo backtracking along the L-BFGS direction (steepest descent when
    /// the direction is not a descent direction). Returns the new point, its
    /// gradient and value, and the number of evaluations; `None` when no step
    /// decreased f.
    #[allow(clippy::type_complexity)]
    fn line_search(
        &self,
        f: &Objective<'_>,
        x: &[f64],
        fx: f64,
        g: &[f64],
        history: &History,
        iteration: usize,
    ) -> Result<Option<(Vec<f64>, Vec<f64>, f64, usize)>> {
        let mut dir = history.direction(g);
        let mut slope = vdot(g, &dir);
        let descent = slope < 0.0;
        let first = history.pairs.is_empty() || !descent;
        if !descent {
            dir = g.iter().map(|v| -v).collect();
            slope = -vdot(g, g);
        }
        let mut step = if first { 1.0 / norm(&dir) } else { 1.0 };
        let mut g_new = vec![0.0; x.len()];
        for trial in 1..=MAX_LINE_SEARCH {
            let x_new: Vec<f64> = x.iter().zip(&dir).map(|(x, d)| x + step * d).collect();
            let f_new = f.evaluate(&x_new, Some(&mut g_new))?;
            if f_new.is_finite() && f_new <= fx + ARMIJO * step * slope {
                finite(max_abs(&g_new), iteration, "gradient")?;
                return Ok(Some((x_new, g_new, f_new, trial)));
            }
            // Minimiser of the quadratic through f(0), f'(0) and f(step),
            // kept within [0.1, 0.5]·step.
            let curvature = f_new - fx - slope * step;
            let quadratic = if f_new.is_finite() && curvature > 0.0 {
                -slope * step * step / (2.0 * curvature)
            } else {
                0.1 * step
            };
            step = quadratic.clamp(0.1 * step, 0.5 * step);
        }
        Ok(None)
    }
}

/// Updates the best validation iterate; returns iterations since the best.
fn track_best(best: &mut Best, valid: &Objective<'_>, x: &[f64]) -> Result<usize> {
    let loss = valid.evaluate(x, None)?;
    if loss < best.loss {
        best.loss = loss;
        best.point = x.to_vec();
        best.stale = 0;
    } else {
        best.stale += 1;
    }
    Ok(best.stale)
}

fn finite(value: f64, iteration: usize, what: &str) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::NumericalFailure {
            solver: SOLVER,
            iteration,
            detail: format!("{what} is {value}"),
        })
    }
}

fn vdot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn norm(a: &[f64]) -> f64 {
    vdot(a, a).sqrt()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// Central finite differences of f agree with the analytic gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        let x = Array2::from_shape_fn((7, 3), |(i, j)| ((i * 3 + j) as f32 * 0.7).sin());
        let labels: Vec<Label> = (0..7)
            .map(|i| {
                if i % 3 == 0 {
                    Label::Malicious
                } else {
                    Label::Benign
                }
            })
            .collect();
        let params = LogisticParams::default().c(0.5).threads(2).check().unwrap();
        let data = x.as_slice().unwrap();
        let f = Objective::new(&params, data, 3, (0..7).collect(), &labels, 0.5);
        let w = [0.3, -0.2, 0.5, 0.1];
        let mut g = [0.0; 4];
        f.evaluate(&w, Some(&mut g)).unwrap();
        for j in 0..4 {
            let h = 1e-3;
            let mut up = w;
            let mut down = w;
            up[j] += h;
            down[j] -= h;
            let numeric =
                (f.evaluate(&up, None).unwrap() - f.evaluate(&down, None).unwrap()) / (2.0 * h);
            assert!(
                (numeric - g[j]).abs() < 1e-5,
                "coordinate {j}: {numeric} vs {}",
                g[j]
            );
        }
    }

    #[test]
    fn split_keeps_both_classes_in_training() {
        let labels = [
            Label::Benign,
            Label::Benign,
            Label::Malicious,
            Label::Benign,
        ];
        let (train, valid) = split_rows(
            &[0, 1, 2, 3],
            &labels,
            &EarlyStopping::Validation {
                fraction: 0.5,
                patience: 1,
                seed: 0,
            },
        )
        .unwrap();
        assert!(train.contains(&2));
        assert_eq!(train.len() + valid.map_or(0, |v| v.len()), 4);
    }
}
