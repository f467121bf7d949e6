//! Hot loops, compiled twice: for the baseline target and, on x86-64 CPUs
//! that have them, with AVX2 + FMA (selected at run time).
//!
//! The loops are plain Rust written so that they vectorise (fixed-width
//! accumulator arrays, unconditional stores); the AVX2 copies only widen the
//! vectors. The one `unsafe` per kernel is the call into the
//! `#[target_feature]` copy, made only after `is_x86_feature_detected!`
//! confirmed the CPU supports the features.

/// Lower triangle of one block's Gram matrix, written to `out` (m × m,
/// row-major): `out[i][j] = ⟨rowᵢ, rowⱼ⟩` in f32 for j ≤ i (the upper triangle
/// is left as it is). `buf` holds m rows of `len`.
///
/// The products are f32 for speed: the caller checks the block for
/// non-finite entries (an f32 overflow of finite inputs, or a non-finite
/// input) and recomputes it in f64 when needed.
pub(crate) fn gram_chunk(buf: &[f32], m: usize, len: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { gram_chunk_avx2(buf, m, len, acc) };
        return;
    }
    gram_chunk_impl::<false>(buf, m, len, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gram_chunk_avx2(buf: &[f32], m: usize, len: usize, acc: &mut [f32]) {
    gram_chunk_impl::<true>(buf, m, len, acc);
}

const LANES: usize = 16;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Four dot products sharing the left operand: each `a` block is loaded once
/// for four rows, which keeps the kernel compute-bound rather than load-bound.
#[inline(always)]
fn dot4<const FMA: bool>(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    let n = a.len() - a.len() % LANES;
    let blocks = a[..n].chunks_exact(LANES);
    let [b0, b1, b2, b3] = b.map(|r| r.get(..n).unwrap_or_default().chunks_exact(LANES));
    for ((((x, y0), y1), y2), y3) in blocks.zip(b0).zip(b1).zip(b2).zip(b3) {
        for k in 0..LANES {
            acc[0][k] = madd::<FMA>(x[k], y0[k], acc[0][k]);
            acc[1][k] = madd::<FMA>(x[k], y1[k], acc[1][k]);
            acc[2][k] = madd::<FMA>(x[k], y2[k], acc[2][k]);
            acc[3][k] = madd::<FMA>(x[k], y3[k], acc[3][k]);
        }
    }
    let mut out = [0.0f32; 4];
    for (o, (lane, row)) in out.iter_mut().zip(acc.iter().zip(b)) {
        let tail: f32 = a[n..]
            .iter()
            .zip(row.get(n..).unwrap_or_default())
            .map(|(x, y)| x * y)
            .sum();
        *o = lane.iter().sum::<f32>() + tail;
    }
    out
}

#[inline(always)]
fn dot1<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let n = a.len() - a.len() % LANES;
    for (x, y) in a[..n]
        .chunks_exact(LANES)
        .zip(b.get(..n).unwrap_or_default().chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] = madd::<FMA>(x[k], y[k], acc[k]);
        }
    }
    let tail: f32 = a[n..]
        .iter()
        .zip(b.get(n..).unwrap_or_default())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn gram_chunk_impl<const FMA: bool>(buf: &[f32], m: usize, len: usize, acc: &mut [f32]) {
    let rows: Vec<&[f32]> = buf.chunks_exact(len.max(1)).take(m).collect();
    let row = |j: usize| rows.get(j).copied().unwrap_or_default();
    let mut add = |i: usize, j: usize, v: f32| {
        if let Some(slot) = acc.get_mut(i * m + j) {
            *slot = v;
        }
    };
    for i in 0..rows.len() {
        let a = row(i);
        let mut j = 0;
        while j + 4 <= i + 1 {
            let d = dot4::<FMA>(a, [row(j), row(j + 1), row(j + 2), row(j + 3)]);
            for (k, v) in d.into_iter().enumerate() {
                add(i, j + k, v);
            }
            j += 4;
        }
        while j <= i {
            add(i, j, dot1::<FMA>(a, row(j)));
            j += 1;
        }
    }
}

/// Applies a sorting network to the columns of `buf` (rows of `len`):
/// afterwards row r holds each column's r-th smallest value.
///
/// NaN-safe by contract: returns `false`, without sorting, when any value is
/// NaN or ±∞. Packed min/max return the other operand when one is NaN, so a
/// network run over a NaN would silently drop it (the median of
/// [NaN, 1, 5] would come out as 1.0 and the NaN client would count as a
/// contributor); the caller must treat a `false` chunk as poisoned.
pub(crate) fn sort_network(buf: &mut [f32], len: usize, network: &[(usize, usize)]) -> bool {
    if !buf.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { sort_network_avx2(buf, len, network) };
        return true;
    }
    sort_network_impl(buf, len, network);
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sort_network_avx2(buf: &mut [f32], len: usize, network: &[(usize, usize)]) {
    sort_network_impl(buf, len, network);
}

#[inline(always)]
fn sort_network_impl(buf: &mut [f32], len: usize, network: &[(usize, usize)]) {
    // Whole rows per comparator: blocking the columns to stay in L1 was
    // measured slower (per-comparator overhead outweighs the L2 traffic).
    for &(a, b) in network {
        let (low, high) = buf.split_at_mut(b * len);
        if let (Some(ra), Some(rb)) = (low.get_mut(a * len..(a + 1) * len), high.get_mut(..len)) {
            compare_exchange(ra, rb);
        }
    }
}

/// Element-wise `(a, b) ← (min(a, b), max(a, b))`.
///
/// Computed into temporaries with `f32::min`/`max` and stored
/// unconditionally, in blocks, so the compiler emits packed min/max. A
/// conditional swap compiles to branches (10× slower), and `if q < p { q }
/// else { p }` to a masked store, which is microcoded on AMD CPUs (5× slower).
/// Inputs are finite ([`sort_network`] refuses any other), so NaN ordering
/// does not matter here.
#[inline(always)]
fn compare_exchange(a: &mut [f32], b: &mut [f32]) {
    const W: usize = 16;
    let mut blocks_a = a.chunks_exact_mut(W);
    let mut blocks_b = b.chunks_exact_mut(W);
    for (xa, xb) in (&mut blocks_a).zip(&mut blocks_b) {
        let mut lo = [0.0f32; W];
        let mut hi = [0.0f32; W];
        for k in 0..W {
            let (p, q) = (xa[k], xb[k]);
            lo[k] = p.min(q);
            hi[k] = p.max(q);
        }
        xa.copy_from_slice(&lo);
        xb.copy_from_slice(&hi);
    }
    for (x, y) in blocks_a
        .into_remainder()
        .iter_mut()
        .zip(blocks_b.into_remainder())
    {
        let (p, q) = (*x, *y);
        *x = if q < p { q } else { p };
        *y = if q < p { p } else { q };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_network_refuses_nan_and_infinity_in_long_rows() {
        // 3 rows of 40 (> 16: the packed path), NaN in the middle row.
        let net = [(0, 1), (1, 2), (0, 1)];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut buf: Vec<f32> = (0..120).map(|i| (i % 7) as f32).collect();
            buf[40 + 20] = bad;
            assert!(!sort_network(&mut buf, 40, &net), "{bad}");
        }
        let mut buf: Vec<f32> = (0..120).map(|i| (i % 7) as f32).collect();
        assert!(sort_network(&mut buf, 40, &net));
        for c in 0..40 {
            assert!(buf[c] <= buf[40 + c] && buf[40 + c] <= buf[80 + c]);
        }
    }

    #[test]
    fn gram_chunk_matches_naive() {
        let (m, len) = (7, 53);
        let buf: Vec<f32> = (0..m * len)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let mut acc = vec![0.0f32; m * m];
        gram_chunk(&buf, m, len, &mut acc);
        for i in 0..m {
            for j in 0..=i {
                let naive: f64 = (0..len)
                    .map(|k| f64::from(buf[i * len + k]) * f64::from(buf[j * len + k]))
                    .sum();
                assert!(
                    (f64::from(acc[i * m + j]) - naive).abs() < 1e-4,
                    "({i},{j})"
                );
            }
        }
    }
}
