//! Dense `f32` kernels shared by scoring and training.
//!
//! Sixteen independent `f32` lanes let the compiler vectorise without
//! `-ffast-math`; partial sums of 4,096-value blocks are added in `f64`, so a
//! dot product over millions of coordinates keeps its precision. The order of
//! operations is fixed, so the same inputs always give bit-identical results.

const LANES: usize = 16;
const BLOCK: usize = 4096;

/// `a · b` over the common length; `f32` lanes within blocks, `f64` across.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (ab, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        total += f64::from(dot_block(ab, bb));
    }
    total
}

fn dot_block(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((acc, x), y) in acc.iter_mut().zip(x).zip(y) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha · x` over the common length.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// First non-finite value of a slice, with its index.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .position(|v| !v.is_finite())
        .and_then(|i| values.get(i).map(|&v| (i, v)))
}

/// Logistic function, stable for large |z|.
pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `ln(1 + e^{-m})`, stable for large |m|: the logistic loss at margin `m`.
pub(crate) fn logistic_loss(margin: f64) -> f64 {
    if margin > 0.0 {
        (-margin).exp().ln_1p()
    } else {
        -margin + margin.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..10_001).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..10_001).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn loss_and_sigmoid_are_stable() {
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-15);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((logistic_loss(0.0) - 2f64.ln()).abs() < 1e-15);
        assert!((logistic_loss(-1000.0) - 1000.0).abs() < 1e-9);
        assert!(logistic_loss(1000.0) >= 0.0);
    }
}
