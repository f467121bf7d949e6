//! The top eigenvector of XᵀX for a tall or wide matrix X, without forming
//! XᵀX or XXᵀ: restarted Lanczos with full reorthogonalisation, each step
//! one product Xᵀ(Xv) (two passes over X, O(m·b)).
//!
//! Why Lanczos rather than plain power iteration: power iteration shrinks
//! the error by λ₂/λ₁ per product, so nearly equal top eigenvalues (clients
//! that are all alike, the common case) take thousands of products. A
//! Krylov space of k vectors converges like a Chebyshev polynomial of degree
//! k instead, and is exact once k reaches the rank (m − 1 for m centred
//! rows): a round of 9 clients is solved in 9 products.

use crate::aggregate::linalg::{Square, symmetric_eigen};

/// A row-major m × b matrix in f64.
pub(crate) struct Rows {
    pub(crate) cols: usize,
    pub(crate) data: Vec<f64>,
}

impl Rows {
    pub(crate) fn rows(&self) -> std::slice::ChunksExact<'_, f64> {
        self.data.chunks_exact(self.cols.max(1))
    }

    fn count(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }

    /// Xᵀ(Xv) into `out`, one pass over the rows.
    fn gram_times(&self, v: &[f64], out: &mut [f64]) {
        out.fill(0.0);
        for row in self.rows() {
            let xv = dot(row, v);
            out.iter_mut().zip(row).for_each(|(o, x)| *o += xv * x);
        }
    }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scales `v` to unit length; false when it is zero or not finite.
fn normalise(v: &mut [f64]) -> bool {
    let norm = dot(v, v).sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return false;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    true
}

/// Lanczos vectors kept per restart: memory 64·b f64 beside X.
const MAX_BASIS: usize = 64;

/// Products Xᵀ(Xv) allowed in all: bounds the time of a degenerate case.
const MAX_PRODUCTS: usize = 1024;

/// Converged when the Ritz residual ‖XᵀXv − θv‖ is at most this times θ.
const RESIDUAL_TOLERANCE: f64 = 1e-12;

/// The unit top eigenvector of XᵀX, started from `start`; `None` when XᵀX
/// maps the start to 0 (X is zero, or the start is orthogonal to its rows).
///
/// Stops when the Ritz residual is below 10⁻¹² θ, the Krylov space is
/// exhausted (exact), or after 1,024 products (when the top eigenvalues are so
/// close that any vector of their plane separates outliers as well).
pub(crate) fn top_eigenvector(x: &Rows, mut start: Vec<f64>) -> Option<Vec<f64>> {
    let basis = x.count().min(x.cols).clamp(1, MAX_BASIS);
    if !normalise(&mut start) {
        return None;
    }
    let mut v = start;
    let mut products = 0;
    let mut found = false;
    while products < MAX_PRODUCTS {
        let pass = lanczos_pass(x, &v, basis);
        products += pass.steps;
        let Some(ritz) = pass.ritz else { break };
        v = ritz;
        found = true;
        if pass.converged {
            break;
        }
    }
    found.then_some(v)
}

/// One restart's result.
struct Pass {
    /// The top Ritz vector, `None` when the start was mapped to 0.
    ritz: Option<Vec<f64>>,
    converged: bool,
    steps: usize,
}

/// Up to `basis` Lanczos steps from the unit vector `v`, then the top Ritz
/// pair of the tridiagonal matrix.
fn lanczos_pass(x: &Rows, v: &[f64], basis: usize) -> Pass {
    let mut q: Vec<Vec<f64>> = vec![v.to_vec()];
    let (mut alphas, mut betas) = (Vec::new(), Vec::new());
    let mut w = vec![0.0; v.len()];
    let mut residual_beta = 0.0;
    let mut exhausted = false;
    for j in 0..basis {
        let Some(qj) = q.get(j) else { break };
        x.gram_times(qj, &mut w);
        alphas.push(dot(qj, &w));
        // Full reorthogonalisation (twice is enough): keeps the basis
        // orthonormal in floating point, so no ghost eigenvalues.
        for _ in 0..2 {
            for qi in &q {
                let c = dot(qi, &w);
                w.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
            }
        }
        let beta = dot(&w, &w).sqrt();
        let scale = alphas.iter().fold(0.0f64, |m, a| m.max(a.abs()));
        // Also true for a NaN beta: stop rather than divide by it.
        let breaks_down = beta.is_nan() || beta <= 1e-13 * scale || beta.is_infinite();
        if breaks_down {
            exhausted = true;
            break;
        }
        residual_beta = beta;
        if j + 1 < basis {
            betas.push(beta);
            q.push(w.iter().map(|a| a / beta).collect());
        }
    }
    let steps = alphas.len();
    let k = steps;
    let t = Square::from_fn(k, |i, j| match i.abs_diff(j) {
        0 => alphas.get(i).copied().unwrap_or(0.0),
        1 => betas.get(i.min(j)).copied().unwrap_or(0.0),
        _ => 0.0,
    });
    let (values, vectors) = symmetric_eigen(&t);
    let theta = values.first().copied().unwrap_or(0.0);
    if theta.is_nan() || theta <= 0.0 {
        return Pass {
            ritz: None,
            converged: true,
            steps,
        };
    }
    let mut ritz = vec![0.0; v.len()];
    for (i, qi) in q.iter().enumerate().take(k) {
        let y = vectors.get(i, 0);
        ritz.iter_mut().zip(qi).for_each(|(r, b)| *r += y * b);
    }
    let last = vectors.get(k.saturating_sub(1), 0);
    let converged = exhausted || (residual_beta * last).abs() <= RESIDUAL_TOLERANCE * theta;
    let ritz = normalise(&mut ritz).then_some(ritz);
    Pass {
        converged: converged || ritz.is_none(),
        ritz,
        steps,
    }
}
