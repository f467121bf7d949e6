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
///
/// The rows all have `a`'s length (rows of one buffer, cut by `chunks_exact`).
#[inline(always)]
// SAFETY-OF-INDEX: `x`, `y0`…`y3` are `[f32; LANES]` arrays (from `as_chunks`),
// `acc` is `[[f32; LANES]; 4]`, and k < LANES: every index is in bounds by type
// (the checks compile away; the body is the exact loop that vectorises).
#[allow(clippy::indexing_slicing)]
fn dot4<const FMA: bool>(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    let (blocks, a_tail) = a.as_chunks::<LANES>();
    let [b0, b1, b2, b3] = b.map(|r| r.as_chunks::<LANES>().0);
    for ((((x, y0), y1), y2), y3) in blocks.iter().zip(b0).zip(b1).zip(b2).zip(b3) {
        for k in 0..LANES {
            acc[0][k] = madd::<FMA>(x[k], y0[k], acc[0][k]);
            acc[1][k] = madd::<FMA>(x[k], y1[k], acc[1][k]);
            acc[2][k] = madd::<FMA>(x[k], y2[k], acc[2][k]);
            acc[3][k] = madd::<FMA>(x[k], y3[k], acc[3][k]);
        }
    }
    let mut out = [0.0f32; 4];
    for (o, (lane, row)) in out.iter_mut().zip(acc.iter().zip(b)) {
        let tail: f32 = a_tail
            .iter()
            .zip(row.as_chunks::<LANES>().1)
            .map(|(x, y)| x * y)
            .sum();
        *o = lane.iter().sum::<f32>() + tail;
    }
    out
}

/// One dot product (`b` has `a`'s length, as in [`dot4`]).
#[inline(always)]
fn dot1<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a_blocks, a_tail) = a.as_chunks::<LANES>();
    let (b_blocks, b_tail) = b.as_chunks::<LANES>();
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s = madd::<FMA>(*x, *y, *s);
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn gram_chunk_impl<const FMA: bool>(buf: &[f32], m: usize, len: usize, acc: &mut [f32]) {
    let rows: Vec<&[f32]> = buf.chunks_exact(len.max(1)).take(m).collect();
    // Row i of the m × m output takes ⟨rowᵢ, rowⱼ⟩ for j ≤ i: rows 0..=i in
    // groups of four, then one at a time.
    for ((i, a), out) in rows.iter().enumerate().zip(acc.chunks_exact_mut(m.max(1))) {
        // Cannot fail: i < rows.len() ≤ m = out.len().
        let (Some((lower, _)), Some((out, _))) = (
            rows.split_at_checked(i + 1),
            out.split_at_mut_checked(i + 1),
        ) else {
            continue;
        };
        let (quads, singles) = lower.as_chunks::<4>();
        let (out_quads, out_singles) = out.as_chunks_mut::<4>();
        for (q, o) in quads.iter().zip(out_quads) {
            *o = dot4::<FMA>(a, *q);
        }
        for (b, o) in singles.iter().zip(out_singles) {
            *o = dot1::<FMA>(a, b);
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
    // Callers check every comparator joins rows a < b < m of an m-row buffer
    // (`coordinate::reduce_with_network`), so both rows always exist here.
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
    let (blocks_a, rest_a) = a.as_chunks_mut::<W>();
    let (blocks_b, rest_b) = b.as_chunks_mut::<W>();
    for (xa, xb) in blocks_a.iter_mut().zip(blocks_b.iter_mut()) {
        let mut lo = [0.0f32; W];
        let mut hi = [0.0f32; W];
        // Fixed-size arrays zipped: W lanes, no bounds checks.
        for (((l, h), p), q) in lo
            .iter_mut()
            .zip(hi.iter_mut())
            .zip(xa.iter())
            .zip(xb.iter())
        {
            *l = p.min(*q);
            *h = p.max(*q);
        }
        *xa = lo;
        *xb = hi;
    }
    for (x, y) in rest_a.iter_mut().zip(rest_b.iter_mut()) {
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
