//! Limited-memory BFGS over the `d + 1` parameters (weights, bias).
//!
//! L-BFGS (memory 10) with an Armijo backtracking line search, in `f64`
//! parameters over `f32` data. It stops when max|∇f| ≤ `tolerance`
//! (scikit-learn's `tol`, also applied to max|∇f| there), when the relative
//! decrease of f falls below 64·ε (as scikit-learn's), or after
//! `max_iterations`. Under early stopping it keeps the iterate with the lowest
//! validation loss.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::probe::train::{FitReport, StopReason};

use super::objective::Objective;
use super::{EarlyStopping, Intercept, ValidLogisticParams};

const SOLVER: &str = "logistic L-BFGS";
/// scikit-learn's `ftol` for lbfgs: 64 machine epsilons.
const OBJECTIVE_TOLERANCE: f64 = 64.0 * f64::EPSILON;
/// Armijo sufficient-decrease constant.
const ARMIJO: f64 = 1e-4;
/// Line-search trials before giving up on a direction.
const MAX_LINE_SEARCH: usize = 30;

/// The optimiser's settings, taken from [`ValidLogisticParams`].
pub(super) struct Lbfgs {
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
    pub(super) fn new(params: &ValidLogisticParams) -> Self {
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

    pub(super) fn minimise(
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
