//! Hot loops, compiled for the baseline target and, on x86-64 CPUs that have
//! them, with AVX2 + FMA (and AVX-512 for the Gram tiles), selected at run time.
//!
//! The loops are plain Rust written so that they vectorise (fixed-width
//! accumulator arrays, unconditional stores); the AVX2 copies only widen the
//! vectors. The one `unsafe` per kernel is the call into the
//! `#[target_feature]` copy, made only after `is_x86_feature_detected!`
//! confirmed the CPU supports the features.

/// `out = g_coef · g + Σᵢ coefs[i] · rowsᵢ` (the global term only when
/// given), coordinate by coordinate; rows, global and `out` have one length.
///
/// One pass, register-blocked: a block of [`SUM_BLOCK`] coordinates is
/// accumulated over every row in registers and stored once. Adding one row at
/// a time into `out` instead reads and writes `out` once per row (or per
/// four rows), which measured twice the input's read time for FedAvg even on
/// one thread. The sum runs over the rows in order, so each coordinate's
/// result depends on its inputs only.
pub(crate) fn weighted_sum(
    rows: &[&[f32]],
    coefs: &[f32],
    global: Option<(&[f32], f32)>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { weighted_sum_avx512(rows, coefs, global, out) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { weighted_sum_avx2(rows, coefs, global, out) };
            return;
        }
    }
    weighted_sum_impl::<false>(rows, coefs, global, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weighted_sum_avx512(
    rows: &[&[f32]],
    coefs: &[f32],
    global: Option<(&[f32], f32)>,
    out: &mut [f32],
) {
    weighted_sum_impl::<true>(rows, coefs, global, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weighted_sum_avx2(
    rows: &[&[f32]],
    coefs: &[f32],
    global: Option<(&[f32], f32)>,
    out: &mut [f32],
) {
    weighted_sum_impl::<true>(rows, coefs, global, out);
}

#[inline(always)]
fn weighted_sum_impl<const FMA: bool>(
    rows: &[&[f32]],
    coefs: &[f32],
    global: Option<(&[f32], f32)>,
    out: &mut [f32],
) {
    let madd = |c: f32, x: f32, a: f32| if FMA { c.mul_add(x, a) } else { a + c * x };
    // The first pass assigns (the global term, or the first rows), so `out`
    // is never zeroed first.
    let mut rest_rows = rows;
    let mut rest_coefs = coefs;
    match global {
        Some((g, c)) => out.iter_mut().zip(g).for_each(|(o, x)| *o = c * x),
        None => {
            if let ([a, b, x, y, ..], [ca, cb, cx, cy, ..]) = (rows, coefs) {
                let inputs = a.iter().zip(b.iter()).zip(x.iter().zip(y.iter()));
                for (o, ((va, vb), (vx, vy))) in out.iter_mut().zip(inputs) {
                    *o = madd(*cy, *vy, madd(*cx, *vx, madd(*cb, *vb, ca * va)));
                }
                rest_rows = rows.get(4..).unwrap_or(&[]);
                rest_coefs = coefs.get(4..).unwrap_or(&[]);
            } else {
                out.fill(0.0);
            }
        }
    }
    // Four rows per pass quarters the read-modify-write traffic on `out`.
    let mut quads = rest_rows.chunks_exact(4);
    let mut cs = rest_coefs.chunks_exact(4);
    for (rows, c) in (&mut quads).zip(&mut cs) {
        if let ([a, b, x, y], [ca, cb, cx, cy]) = (rows, c) {
            let inputs = a.iter().zip(b.iter()).zip(x.iter().zip(y.iter()));
            for (o, ((va, vb), (vx, vy))) in out.iter_mut().zip(inputs) {
                *o = madd(*cy, *vy, madd(*cx, *vx, madd(*cb, *vb, madd(*ca, *va, *o))));
            }
        }
    }
    for (row, c) in quads.remainder().iter().zip(cs.remainder()) {
        for (o, x) in out.iter_mut().zip(row.iter()) {
            *o = madd(*c, *x, *o);
        }
    }
}

/// `out = x − g` (all three of one length); true when every result is
/// finite. One vectorised pass: the finiteness test is folded in as
/// `acc += v · 0`, which stays 0 for finite values and turns NaN for any
/// infinity or NaN.
pub(crate) fn sub_finite(out: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { sub_finite_avx512(out, x, g) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { sub_finite_avx2(out, x, g) };
        }
    }
    sub_finite_impl(out, x, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn sub_finite_avx512(out: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    sub_finite_impl(out, x, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sub_finite_avx2(out: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    sub_finite_impl(out, x, g)
}

#[inline(always)]
fn sub_finite_impl(out: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    const W: usize = 16;
    let mut acc = [0.0f32; W];
    let (ob, ot) = out.as_chunks_mut::<W>();
    let (xb, xt) = x.as_chunks::<W>();
    let (gb, gt) = g.as_chunks::<W>();
    for ((o, x), g) in ob.iter_mut().zip(xb).zip(gb) {
        for (((o, x), g), a) in o.iter_mut().zip(x).zip(g).zip(acc.iter_mut()) {
            let v = x - g;
            *o = v;
            *a += v * 0.0;
        }
    }
    let mut tail = 0.0f32;
    for ((o, x), g) in ot.iter_mut().zip(xt).zip(gt) {
        let v = x - g;
        *o = v;
        tail += v * 0.0;
    }
    acc.iter().fold(tail, |s, a| s + a) == 0.0
}

/// `h ← clamp(h + (x − g), ±f32::MAX)` over one chunk, returning whether
/// every new `h` is finite. Saturating: a client sending `f32::MAX` every
/// round keeps a finite (maximal) history instead of poisoning it; a NaN
/// (only a restored history can hold one) stays NaN and is reported.
///
/// FoolsGold's history update. Written over 16-value arrays so it compiles
/// to vector compares and blends (the same loop over three zipped iterators
/// stayed scalar and cost more than the Gram itself), with an AVX2 copy.
pub(crate) fn add_saturating(history: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { add_saturating_avx2(history, x, g) };
        }
    }
    add_saturating_impl(history, x, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_saturating_avx2(history: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    add_saturating_impl(history, x, g)
}

#[inline(always)]
fn add_saturating_impl(history: &mut [f32], x: &[f32], g: &[f32]) -> bool {
    // `h · 0` is ±0 for a finite h and NaN otherwise: summed per lane, the
    // finiteness test vectorises with the update (see `lora::tensor::all_finite`).
    let mut lanes = [0.0f32; 16];
    let (h_blocks, h_tail) = history.as_chunks_mut::<16>();
    let (x_blocks, x_tail) = x.as_chunks::<16>();
    let (g_blocks, g_tail) = g.as_chunks::<16>();
    for ((h, x), g) in h_blocks.iter_mut().zip(x_blocks).zip(g_blocks) {
        for (((h, x), g), lane) in h.iter_mut().zip(x).zip(g).zip(&mut lanes) {
            *h = (*h + (x - g)).clamp(-f32::MAX, f32::MAX);
            *lane += *h * 0.0;
        }
    }
    let mut tail = 0.0f32;
    for ((h, x), g) in h_tail.iter_mut().zip(x_tail).zip(g_tail) {
        *h = (*h + (x - g)).clamp(-f32::MAX, f32::MAX);
        tail += *h * 0.0;
    }
    lanes.iter().sum::<f32>() + tail == 0.0
}

/// Rows of a panel (see [`gram_tiles`]) are padded with zeros to a multiple
/// of this many values, so the tile kernels have no tail.
pub(crate) const PANEL_ALIGN: usize = 16;

/// The shape of the register tile [`gram_tiles`] uses on this CPU: rows ×
/// columns of the Gram block computed at once. Row ranges handed to
/// [`gram_tiles`] by parallel callers are multiples of [`TILE_ROWS`].
pub(crate) const TILE_ROWS: usize = 4;

/// One Gram tile's f32 results, handed to the caller's sink: `(i0, j0,
/// values)` with `values[r][c] = ⟨row i0 + r, row j0 + c⟩` (rows beyond the
/// panel read as zero; the sink drops them and the upper triangle).
pub(crate) type Tile<'a> = (usize, usize, &'a [[f32; 4]; 4]);

/// The lower triangle (j ≤ i) of the Gram matrix of a panel's rows, tile by
/// tile: `rows` holds `m` rows of `stride` values (only the first `len` used,
/// `len` a multiple of [`PANEL_ALIGN`], zero beyond), and `sink` receives
/// every tile whose rows start in `row_range` (a range of multiples of
/// [`TILE_ROWS`], or ending at m).
///
/// Register-tiled: each tile keeps its 16 dot products in registers while it
/// streams its 8 rows once, so loads are half the multiply–adds (a
/// one-pair-at-a-time dot product loads two values per multiply–add and is
/// load-bound). Column blocks of [`COL_BLOCK`] rows keep the rows a stripe of
/// tiles revisits in L2 whatever m is. The products are f32; the caller
/// checks and fixes non-finite or suspicious entries.
pub(crate) fn gram_tiles(
    rows: &[f32],
    stride: usize,
    m: usize,
    len: usize,
    row_range: std::ops::Range<usize>,
    sink: &mut dyn FnMut(Tile<'_>),
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { gram_tiles_avx512(rows, stride, m, len, row_range, sink) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { gram_tiles_avx2(rows, stride, m, len, row_range, sink) };
            return;
        }
    }
    gram_tiles_impl(rows, stride, m, len, row_range, sink, tile::<8>);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn gram_tiles_avx512(
    rows: &[f32],
    stride: usize,
    m: usize,
    len: usize,
    row_range: std::ops::Range<usize>,
    sink: &mut dyn FnMut(Tile<'_>),
) {
    gram_tiles_impl(rows, stride, m, len, row_range, sink, |a, b| {
        // SAFETY: this function only runs where AVX-512F was detected.
        unsafe { x86::tile_avx512(a, b) }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gram_tiles_avx2(
    rows: &[f32],
    stride: usize,
    m: usize,
    len: usize,
    row_range: std::ops::Range<usize>,
    sink: &mut dyn FnMut(Tile<'_>),
) {
    gram_tiles_impl(rows, stride, m, len, row_range, sink, |a, b| {
        // SAFETY: this function only runs where AVX2 and FMA were detected.
        unsafe { x86::tile_avx2(a, b) }
    });
}

/// Rows per column block of [`gram_tiles`]: 128 rows of a 512-value panel
/// are 256 KB, within L2.
pub(crate) const COL_BLOCK: usize = 128;

/// A zero row for tile positions beyond the last row.
static ZEROS: [f32; 1024] = [0.0; 1024];

#[inline(always)]
fn gram_tiles_impl(
    rows: &[f32],
    stride: usize,
    m: usize,
    len: usize,
    row_range: std::ops::Range<usize>,
    sink: &mut dyn FnMut(Tile<'_>),
    tile: impl Fn([&[f32]; 4], [&[f32]; 4]) -> [[f32; 4]; 4],
) {
    let len = len.min(stride);
    let zero = ZEROS.get(..len).unwrap_or(&[]);
    let row = |i: usize| -> &[f32] {
        if i < m {
            rows.get(i * stride..i * stride + len).unwrap_or(zero)
        } else {
            zero
        }
    };
    let end = row_range.end.min(m);
    let mut jb = 0;
    while jb < end {
        let jb_end = (jb + COL_BLOCK).min(m);
        // Tiles of rows i0..i0 + 4 against columns j0..j0 + 4 of this block,
        // for j0 ≤ the tile's last row (lower triangle).
        let mut i0 = row_range.start.max(jb - jb % TILE_ROWS);
        while i0 < end {
            let a = [row(i0), row(i0 + 1), row(i0 + 2), row(i0 + 3)];
            let mut j0 = jb;
            while j0 < jb_end && j0 < i0 + TILE_ROWS {
                let b = [row(j0), row(j0 + 1), row(j0 + 2), row(j0 + 3)];
                let values = tile(a, b);
                sink((i0, j0, &values));
                j0 += 4;
            }
            i0 += TILE_ROWS;
        }
        jb = jb_end;
    }
}

/// The 4 × 4 dot products of rows `a` against rows `b` (all of one length,
/// a multiple of `L`; any tail is ignored), each accumulated in `L` lanes:
/// the portable kernel (the x86 ones are in [`x86`]).
// SAFETY-OF-INDEX: `acc` is `[[[f32; L]; 4]; 4]`, `x`/`y` are `[&[f32; L]; 4]`
// and every index is a constant below those sizes after unrolling: in bounds by
// type (the checks compile away; the body is the loop that vectorises).
#[allow(clippy::indexing_slicing)]
fn tile<const L: usize>(a: [&[f32]; 4], b: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let mut acc = [[[0.0f32; L]; 4]; 4];
    let n = a
        .iter()
        .chain(b.iter())
        .map(|r| r.len() / L)
        .min()
        .unwrap_or(0);
    // Cut to n blocks each, so the indices below are visibly in bounds.
    let a = a.map(|r| r.as_chunks::<L>().0.get(..n).unwrap_or(&[]));
    let b = b.map(|r| r.as_chunks::<L>().0.get(..n).unwrap_or(&[]));
    for t in 0..n {
        let x = [&a[0][t], &a[1][t], &a[2][t], &a[3][t]];
        let y = [&b[0][t], &b[1][t], &b[2][t], &b[3][t]];
        for r in 0..4 {
            for c in 0..4 {
                for k in 0..L {
                    acc[r][c][k] += x[r][k] * y[c][k];
                }
            }
        }
    }
    acc.map(|row| row.map(|lanes| lane_sum(&lanes)))
}

/// The Gram tile kernels written with x86 intrinsics: the portable kernel's
/// 4 × 4 × lanes accumulators do not stay in registers when left to the
/// auto-vectoriser (it emitted scalar FMAs through the stack).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 4 × 4 dot products, 16 lanes each: 16 accumulators, 8 loads per 16
    /// multiply–adds.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(a: [&[f32]; 4], b: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = a
            .iter()
            .chain(b.iter())
            .map(|r| r.len() / 16)
            .min()
            .unwrap_or(0);
        let [a0, a1, a2, a3] = a.map(|r| r.as_ptr());
        let [b0, b1, b2, b3] = b.map(|r| r.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        for t in 0..n {
            let off = t * 16;
            // SAFETY: every row has at least n·16 values, so off + 16 ≤ len.
            let (x, y) = unsafe {
                (
                    [a0, a1, a2, a3].map(|p| _mm512_loadu_ps(p.add(off))),
                    [b0, b1, b2, b3].map(|p| _mm512_loadu_ps(p.add(off))),
                )
            };
            for (acc_row, xr) in acc.iter_mut().zip(x) {
                for (slot, yc) in acc_row.iter_mut().zip(y) {
                    *slot = _mm512_fmadd_ps(xr, yc, *slot);
                }
            }
        }
        acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
    }

    /// 4 × 4 dot products, 8 lanes each, as two 4 × 2 halves (8
    /// accumulators each: AVX2 has 16 vector registers).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(a: [&[f32]; 4], b: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = a
            .iter()
            .chain(b.iter())
            .map(|r| r.len() / 8)
            .min()
            .unwrap_or(0);
        let [a0, a1, a2, a3] = a.map(|r| r.as_ptr());
        let [b0, b1, b2, b3] = b.map(|r| r.as_ptr());
        let mut out = [[0.0f32; 4]; 4];
        for (half, (c0, c1)) in [(b0, b1), (b2, b3)].into_iter().enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for t in 0..n {
                let off = t * 8;
                // SAFETY: every row has at least n·8 values, so off + 8 ≤ len.
                let (x, y) = unsafe {
                    (
                        [a0, a1, a2, a3].map(|p| _mm256_loadu_ps(p.add(off))),
                        [c0, c1].map(|p| _mm256_loadu_ps(p.add(off))),
                    )
                };
                for (acc_row, xr) in acc.iter_mut().zip(x) {
                    for (slot, yc) in acc_row.iter_mut().zip(y) {
                        *slot = _mm256_fmadd_ps(xr, yc, *slot);
                    }
                }
            }
            for (out_row, acc_row) in out.iter_mut().zip(acc) {
                for (o, v) in out_row.iter_mut().skip(2 * half).zip(acc_row) {
                    *o = hsum256(v);
                }
            }
        }
        out
    }

    /// Sum of the 8 lanes (fixed order).
    #[target_feature(enable = "avx2")]
    fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

/// Sum of an array's lanes as a pairwise tree (fixed order).
#[inline(always)]
fn lane_sum<const L: usize>(lanes: &[f32; L]) -> f32 {
    let mut v = *lanes;
    let mut w = L;
    while w > 1 {
        w /= 2;
        let (lo, hi) = v.split_at_mut(w);
        for (l, h) in lo.iter_mut().zip(hi.iter()) {
            *l += *h;
        }
    }
    v.first().copied().unwrap_or(0.0)
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
    fn weighted_sum_matches_naive_for_any_row_count() {
        let len = 133;
        for n in 0..11 {
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    (0..len)
                        .map(|k| ((i * 7 + k * 3) % 13) as f32 - 6.0)
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let coefs: Vec<f32> = (0..n).map(|i| 0.25 * (i + 1) as f32).collect();
            let g: Vec<f32> = (0..len).map(|k| k as f32).collect();
            for global in [None, Some((g.as_slice(), -0.5f32))] {
                let mut out = vec![f32::NAN; len];
                weighted_sum(&refs, &coefs, global, &mut out);
                for k in 0..len {
                    let mut want = global.map_or(0.0, |(g, c)| f64::from(c * g[k]));
                    for (r, c) in rows.iter().zip(&coefs) {
                        want += f64::from(*c) * f64::from(r[k]);
                    }
                    assert!((f64::from(out[k]) - want).abs() < 1e-3, "n = {n}, k = {k}");
                }
            }
        }
    }

    #[test]
    fn gram_tiles_match_naive_lower_triangle() {
        for (m, len) in [(1, 16), (7, 48), (13, 32), (37, 64), (300, 16)] {
            let stride = 64;
            let buf: Vec<f32> = (0..m * stride)
                .map(|i| {
                    if i % stride < len {
                        ((i * 37 % 101) as f32 - 50.0) / 50.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut got = vec![f32::NAN; m * m];
            let mut seen = vec![0u32; m * m];
            let mut sink = |(i0, j0, v): Tile<'_>| {
                for (r, row) in v.iter().enumerate() {
                    for (c, value) in row.iter().enumerate() {
                        let (i, j) = (i0 + r, j0 + c);
                        if i < m && j <= i {
                            got[i * m + j] = *value;
                            seen[i * m + j] += 1;
                        }
                    }
                }
            };
            gram_tiles(&buf, stride, m, len, 0..m, &mut sink);
            for i in 0..m {
                for j in 0..=i {
                    let naive: f64 = (0..len)
                        .map(|k| f64::from(buf[i * stride + k]) * f64::from(buf[j * stride + k]))
                        .sum();
                    assert_eq!(seen[i * m + j], 1, "({i},{j}) of m = {m}");
                    assert!(
                        (f64::from(got[i * m + j]) - naive).abs() < 1e-4,
                        "({i},{j})"
                    );
                }
            }
        }
    }
}
