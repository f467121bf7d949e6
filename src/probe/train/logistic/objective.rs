//! The class-weighted, L2-penalised logistic loss and its gradient.
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
//! Each evaluation is **one pass** over the rows: per row the dot product
//! zᵢ = wᵀxᵢ and the gradient update g += rᵢ·xᵢ are done while the row is in
//! cache, and rows are split into blocks (rayon tasks on the caller's pool,
//! see [`crate::parallel`]), each with its own gradient buffer. Block
//! boundaries depend on n and d only and the blocks' partial sums are added
//! in block order, so the fitted model is bit-for-bit the same on any number
//! of threads.

use crate::error::{Error, Result};
use crate::parallel::{MIN_PART_WORK, map_parts, part_count, split_ranges};
use crate::probe::Label;
use crate::probe::kernels::{axpy, dot, logistic_loss, sigmoid};
use crate::probe::train::{check_both_classes, class_counts};
use crate::rng::Rng;

use super::{ClassWeight, EarlyStopping, Intercept, ValidLogisticParams, split_solution};

/// The invariant [`Objective`] relies on: `data` is `[labels.len(), dim]`
/// row-major and every row index names a labelled row. Callers build all
/// three from one checked training set, so a failure is a bug.
pub(super) fn check_layout(
    data: &[f32],
    dim: usize,
    rows: &[usize],
    labels: &[Label],
) -> Result<()> {
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
pub(super) fn split_rows(
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
pub(super) struct Objective<'a> {
    data: &'a [f32],
    pub(super) dim: usize,
    rows: Vec<usize>,
    /// Per row (aligned with `rows`): target tᵢ and weight cᵢ/S.
    targets: Vec<f64>,
    weights: Vec<f64>,
    /// 1/(C·S); 0 for a validation objective (C = ∞).
    l2: f64,
    pub(super) intercept: Intercept,
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
    pub(super) fn new(
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
    pub(super) fn evaluate(&self, w: &[f64], grad: Option<&mut [f64]>) -> Result<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::LogisticParams;
    use ndarray::Array2;

    /// Central finite differences of f agree with the analytic gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        let x = Array2::from_shape_fn((7, 3), |(i, j)| ((i * 3 + j) as f32 * 0.7).sin());
        // Rows 0, 3 and 6 malicious.
        let (b, m) = (Label::Benign, Label::Malicious);
        let labels = [m, b, b, m, b, b, m];
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
