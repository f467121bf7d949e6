//! Small dense linear algebra on m × m matrices (m = number of clients).

/// Eigen-decomposition of a symmetric m × m matrix (row-major) by cyclic
/// Jacobi rotations. Returns `(eigenvalues, eigenvectors)` with eigenvector k
/// in column k of the row-major `vectors`, sorted by descending eigenvalue.
///
/// m is at most a few hundred clients here, so O(m³) per sweep is nothing next
/// to one pass over the updates.
pub(crate) fn symmetric_eigen(matrix: &[f64], m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = matrix.to_vec();
    a.resize(m * m, 0.0);
    let mut v = vec![0.0; m * m];
    for i in 0..m {
        set(&mut v, m, i, i, 1.0);
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..64 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| get(&a, m, i, j).powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-14 * scale || off == 0.0 {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                rotate(&mut a, &mut v, m, p, q);
            }
        }
    }
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&x, &y| get(&a, m, y, y).total_cmp(&get(&a, m, x, x)));
    let values = order.iter().map(|&k| get(&a, m, k, k)).collect();
    let mut vectors = vec![0.0; m * m];
    for (new_k, &k) in order.iter().enumerate() {
        for i in 0..m {
            set(&mut vectors, m, i, new_k, get(&v, m, i, k));
        }
    }
    (values, vectors)
}

/// One Jacobi rotation zeroing `a[p][q]`.
fn rotate(a: &mut [f64], v: &mut [f64], m: usize, p: usize, q: usize) {
    let apq = get(a, m, p, q);
    if apq == 0.0 {
        return;
    }
    let (app, aqq) = (get(a, m, p, p), get(a, m, q, q));
    let theta = (aqq - app) / (2.0 * apq);
    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
    let t = if theta == 0.0 { 1.0 } else { t };
    let c = 1.0 / (t * t + 1.0).sqrt();
    let s = t * c;
    for k in 0..m {
        let (akp, akq) = (get(a, m, k, p), get(a, m, k, q));
        set(a, m, k, p, c * akp - s * akq);
        set(a, m, k, q, s * akp + c * akq);
    }
    for k in 0..m {
        let (apk, aqk) = (get(a, m, p, k), get(a, m, q, k));
        set(a, m, p, k, c * apk - s * aqk);
        set(a, m, q, k, s * apk + c * aqk);
    }
    for k in 0..m {
        let (vkp, vkq) = (get(v, m, k, p), get(v, m, k, q));
        set(v, m, k, p, c * vkp - s * vkq);
        set(v, m, k, q, s * vkp + c * vkq);
    }
}

pub(crate) fn get(a: &[f64], m: usize, i: usize, j: usize) -> f64 {
    a.get(i * m + j).copied().unwrap_or(0.0)
}

pub(crate) fn set(a: &mut [f64], m: usize, i: usize, j: usize, value: f64) {
    if let Some(slot) = a.get_mut(i * m + j) {
        *slot = value;
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
        let (values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((values[0] - 3.0).abs() < 1e-12);
        assert!((values[1] - 1.0).abs() < 1e-12);
        let (x, y) = (vectors[0], vectors[2]);
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
        let (values, vectors) = symmetric_eigen(&a, m);
        for i in 0..m {
            for j in 0..m {
                let r: f64 = (0..m)
                    .map(|k| vectors[i * m + k] * values[k] * vectors[j * m + k])
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
    fn median_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
