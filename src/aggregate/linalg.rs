//! Small dense linear algebra on m × m matrices (m = number of clients).

use crate::error::{Error, Result};

/// A row-major m × m matrix of `f64` (Gram, distance and similarity matrices
/// over the clients of a round).
///
/// Its storage holds exactly m·m values by construction ([`Square::zeros`],
/// [`Square::from_fn`], or [`Square::new`], which checks the length), so the
/// callers index with `i, j < m` and never need a bounds check that could
/// only hide a bug behind a made-up value; rows come from `chunks_exact(m)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Square {
    m: usize,
    data: Vec<f64>,
}

impl Square {
    /// The m × m zero matrix.
    pub(crate) fn zeros(m: usize) -> Self {
        Square {
            m,
            data: vec![0.0; m * m],
        }
    }

    /// The m × m matrix with entry (i, j) = `f(i, j)`.
    pub(crate) fn from_fn(m: usize, mut f: impl FnMut(usize, usize) -> f64) -> Self {
        let data = (0..m)
            .flat_map(|i| (0..m).map(move |j| (i, j)))
            .map(|(i, j)| f(i, j))
            .collect();
        Square { m, data }
    }

    /// A row-major m × m matrix from its values; [`Error::Invariant`] unless
    /// `data` holds exactly m·m of them.
    pub(crate) fn new(m: usize, data: Vec<f64>) -> Result<Self> {
        if m.checked_mul(m) != Some(data.len()) {
            return Err(Error::invariant(
                "aggregate::linalg::Square::new",
                "an m × m matrix holds m·m values",
                format!("{} values for m = {m}", data.len()),
            ));
        }
        Ok(Square { m, data })
    }

    /// The side m.
    pub(crate) fn m(&self) -> usize {
        self.m
    }

    /// Entry (i, j), for i, j < m.
    #[inline]
    #[allow(clippy::indexing_slicing)] // constructed with len m·m; callers iterate i, j < m, so i·m + j < m·m
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        debug_assert!(
            i < self.m && j < self.m,
            "({i}, {j}) outside {0}×{0}",
            self.m
        );
        self.data[i * self.m + j]
    }

    /// Sets entry (i, j), for i, j < m.
    #[inline]
    #[allow(clippy::indexing_slicing)] // constructed with len m·m; callers iterate i, j < m, so i·m + j < m·m
    pub(crate) fn set(&mut self, i: usize, j: usize, value: f64) {
        debug_assert!(
            i < self.m && j < self.m,
            "({i}, {j}) outside {0}×{0}",
            self.m
        );
        self.data[i * self.m + j] = value;
    }

    /// The k × k matrix of the rows and columns `positions` (each < m), in
    /// that order.
    pub(crate) fn submatrix(&self, positions: &[usize]) -> Square {
        let data = positions
            .iter()
            .flat_map(|&i| positions.iter().map(move |&j| self.get(i, j)))
            .collect();
        Square {
            m: positions.len(),
            data,
        }
    }

    /// The m rows, each m long.
    pub(crate) fn rows(&self) -> std::slice::ChunksExact<'_, f64> {
        self.data.chunks_exact(self.m.max(1))
    }

    /// The m rows, mutably.
    pub(crate) fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, f64> {
        self.data.chunks_exact_mut(self.m.max(1))
    }

    /// The diagonal, G₀₀ … Gₘ₋₁ₘ₋₁.
    pub(crate) fn diagonal(&self) -> impl Iterator<Item = f64> + '_ {
        self.data.iter().step_by(self.m + 1).copied()
    }

    /// The values, row-major (m·m of them).
    pub(crate) fn as_slice(&self) -> &[f64] {
        &self.data
    }

    /// The values, row-major, mutably (m·m of them).
    pub(crate) fn as_mut_slice(&mut self) -> &mut [f64] {
        &mut self.data
    }

    /// True when every entry is finite.
    pub(crate) fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Copies the lower triangle onto the upper one (a symmetric matrix from
    /// an accumulator that filled j ≤ i only).
    ///
    /// In 64 × 64 blocks: mirroring row by row writes one column per row, a
    /// cache miss per value once m × m outgrows the caches (5 % of Krum at
    /// m = 10,000).
    pub(crate) fn mirror_lower(&mut self) {
        const B: usize = 64;
        let m = self.m;
        for ib in (0..m).step_by(B) {
            for jb in (0..=ib).step_by(B) {
                for i in ib..(ib + B).min(m) {
                    for j in jb..(jb + B).min(i) {
                        let lower = self.get(i, j);
                        self.set(j, i, lower);
                    }
                }
            }
        }
    }
}

/// Eigen-decomposition of a symmetric m × m matrix by cyclic Jacobi
/// rotations. Returns `(eigenvalues, eigenvectors)` with eigenvector k in
/// column k of `vectors`, sorted by descending eigenvalue.
///
/// m is at most a few hundred clients here, so O(m³) per sweep is nothing next
/// to one pass over the updates.
pub(crate) fn symmetric_eigen(matrix: &Square) -> (Vec<f64>, Square) {
    let m = matrix.m();
    let mut a = matrix.clone();
    let mut v = Square::from_fn(m, |i, j| if i == j { 1.0 } else { 0.0 });
    let scale: f64 = a.as_slice().iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..64 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a.get(i, j).powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * scale || off == 0.0 {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                rotate(&mut a, &mut v, p, q);
            }
        }
    }
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&x, &y| a.get(y, y).total_cmp(&a.get(x, x)));
    let values = order.iter().map(|&k| a.get(k, k)).collect();
    let mut vectors = Square::zeros(m);
    for (new_k, &k) in order.iter().enumerate() {
        for i in 0..m {
            vectors.set(i, new_k, v.get(i, k));
        }
    }
    (values, vectors)
}

/// One Jacobi rotation zeroing `a[p][q]` (p, q < m).
fn rotate(a: &mut Square, v: &mut Square, p: usize, q: usize) {
    let m = a.m();
    let apq = a.get(p, q);
    if apq == 0.0 {
        return;
    }
    let (app, aqq) = (a.get(p, p), a.get(q, q));
    let theta = (aqq - app) / (2.0 * apq);
    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
    let t = if theta == 0.0 { 1.0 } else { t };
    let c = 1.0 / (t * t + 1.0).sqrt();
    let s = t * c;
    for k in 0..m {
        let (akp, akq) = (a.get(k, p), a.get(k, q));
        a.set(k, p, c * akp - s * akq);
        a.set(k, q, s * akp + c * akq);
    }
    for k in 0..m {
        let (apk, aqk) = (a.get(p, k), a.get(q, k));
        a.set(p, k, c * apk - s * aqk);
        a.set(q, k, s * apk + c * aqk);
    }
    for k in 0..m {
        let (vkp, vkq) = (v.get(k, p), v.get(k, q));
        v.set(k, p, c * vkp - s * vkq);
        v.set(k, q, s * vkp + c * vkq);
    }
}

/// Median of a list (mean of the two middle values for an even count);
/// `None` for an empty list.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_of_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 3 (vector (1,1)/√2) and 1.
        let a = Square::new(2, vec![2.0, 1.0, 1.0, 2.0]).unwrap();
        let (values, vectors) = symmetric_eigen(&a);
        assert!((values[0] - 3.0).abs() < 1e-12);
        assert!((values[1] - 1.0).abs() < 1e-12);
        let (x, y) = (vectors.get(0, 0), vectors.get(1, 0));
        assert!((x.abs() - 0.5f64.sqrt()).abs() < 1e-12 && (x - y).abs() < 1e-12);
    }

    #[test]
    fn eigen_reconstructs_random_matrix() {
        let m = 7;
        let mut a = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..=i {
                let x = ((i * 31 + j * 17) % 11) as f64 - 5.0;
                a[i * m + j] = x;
                a[j * m + i] = x;
            }
        }
        let (values, vectors) = symmetric_eigen(&Square::new(m, a.clone()).unwrap());
        for i in 0..m {
            for j in 0..m {
                let r: f64 = (0..m)
                    .map(|k| vectors.get(i, k) * values[k] * vectors.get(j, k))
                    .sum();
                assert!(
                    (r - a[i * m + j]).abs() < 1e-9,
                    "({i},{j}) {r} vs {}",
                    a[i * m + j]
                );
            }
        }
    }

    #[test]
    fn square_of_the_wrong_length_is_an_invariant_error() {
        for (m, len) in [(3, 8), (3, 10), (0, 1), (2, 0)] {
            let err = Square::new(m, vec![0.0; len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Invariant { location: "aggregate::linalg::Square::new", ref detail, .. }
                        if detail == &format!("{len} values for m = {m}")
                ),
                "{err:?}"
            );
        }
        // A huge side whose m·m overflows is refused, not wrapped.
        assert!(matches!(
            Square::new(usize::MAX, Vec::new()),
            Err(Error::Invariant { .. })
        ));
        let ok = Square::new(2, vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(ok.rows().collect::<Vec<_>>(), [[1.0, 2.0], [3.0, 4.0]]);
        assert_eq!(ok.diagonal().collect::<Vec<_>>(), [1.0, 4.0]);
        assert_eq!(Square::new(0, Vec::new()).unwrap().rows().count(), 0);
    }

    #[test]
    fn mirror_lower_makes_the_matrix_symmetric() {
        let mut a = Square::new(3, vec![1.0, 0.0, 0.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0]).unwrap();
        a.mirror_lower();
        assert_eq!(a.as_slice(), [1.0, 2.0, 4.0, 2.0, 3.0, 5.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn median_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
