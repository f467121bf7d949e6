//! Sorting networks over the clients, applied column-wise to a chunk
//! (median, trimmed mean, Bulyan).

use super::chunk::ChunkRef;

/// Batcher's odd-even merge sort network for `m` inputs, as compare-exchange
/// pairs `(a, b)` with `a < b` (after it, row `a` ≤ row `b`).
///
/// Built for the next power of two; comparators touching a padding position
/// are dropped, which is valid because padding would hold +∞ and never move.
pub(crate) fn sorting_network(m: usize) -> Vec<(usize, usize)> {
    let n = m.next_power_of_two();
    let mut out = Vec::new();
    let mut p = 1;
    while p < n {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < n {
                for i in 0..k.min(n - j - k) {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < m {
                        out.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    out
}

/// Compare-exchanges that put the k smallest values of m in rows 0..k and the
/// k largest in rows m−k..m (bubble passes, about 2k·m comparators; the
/// middle rows keep the other values in some order). Cheaper than a full
/// sorting network when k is small, as in the trimmed mean.
pub(crate) fn extremes_network(m: usize, k: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for p in 0..k.min(m) {
        for r in (p + 1..m).rev() {
            out.push((r - 1, r));
        }
    }
    for p in 0..k.min(m.saturating_sub(k)) {
        for r in k..m.saturating_sub(p + 1) {
            out.push((r, r + 1));
        }
    }
    out
}

/// The comparators of `network` that can affect the output rows for which
/// `needed_rows` holds: walking
/// backwards, a comparator is kept when one of its rows is needed, and then
/// both become needed. The median needs two rows of m and drops ~20% of
/// Batcher's comparators. Rows not needed end up in arbitrary order, but
/// since every comparator permutes, together they hold exactly the values
/// not in the needed rows.
pub(crate) fn pruned_network(
    network: &[(usize, usize)],
    needed_rows: impl Fn(usize) -> bool,
) -> Vec<(usize, usize)> {
    // Rows 0..=max b cover every comparator (a < b); an empty network has no row.
    let size = network.iter().map(|&(_, b)| b + 1).max().unwrap_or(0);
    let mut needed: Vec<bool> = (0..size).map(needed_rows).collect();
    let mut kept = Vec::with_capacity(network.len());
    for &(a, b) in network.iter().rev() {
        let hit = needed.get(a) == Some(&true) || needed.get(b) == Some(&true);
        if hit {
            kept.push((a, b));
            for r in [a, b] {
                if let Some(slot) = needed.get_mut(r) {
                    *slot = true;
                }
            }
        }
    }
    kept.reverse();
    kept
}

/// Copies the chunk's rows into `buf` (m rows of `len`) and sorts every column
/// (coordinate) with the network: afterwards row r holds each coordinate's
/// r-th smallest value. Branch-free min/max over whole rows, so it vectorises.
///
/// Returns `(len, finite)`. `finite` is false when any input is NaN or ±∞;
/// the caller must then not use the buffer: packed min/max drop a NaN (it
/// never reaches the output rows), so finiteness can only be judged *before*
/// the network runs — checked on the copy, while it is in cache.
pub(crate) fn sort_columns(
    chunk: &ChunkRef<'_>,
    network: &[(usize, usize)],
    buf: &mut Vec<f32>,
) -> (usize, bool) {
    let len = chunk.len();
    buf.clear();
    for row in &chunk.rows {
        buf.extend_from_slice(row);
    }
    let finite = crate::aggregate::simd::sort_network(buf, len, network);
    (len, finite)
}

/// Row `r` (of `len`) of a column-sorted buffer.
///
/// The buffer is built by [`sort_columns`] (or its f64 twin) from a chunk:
/// m rows of `len` (the `ChunkRef` invariant), and the reducers ask for
/// rows r < m only. A row outside is a bug and panics here, loudly, rather
/// than reading as an empty row (which would silently drop values).
#[allow(clippy::indexing_slicing)] // buf holds m rows of len and r < m: (r + 1)·len ≤ buf.len()
pub(crate) fn row<T>(buf: &[T], len: usize, r: usize) -> &[T] {
    &buf[r * len..(r + 1) * len]
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn pruned_network_still_places_the_needed_rows() {
        let mut state = 99u64;
        for m in 2..=30 {
            let rows = (m - 1) / 2..m / 2 + 1;
            let net = pruned_network(&sorting_network(m), |r| rows.contains(&r));
            assert!(net.len() <= sorting_network(m).len());
            for _ in 0..20 {
                let mut v: Vec<f32> = (0..m)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((state >> 40) % 11) as f32
                    })
                    .collect();
                let mut expected = v.clone();
                expected.sort_by(f32::total_cmp);
                for &(a, b) in &net {
                    if v[b] < v[a] {
                        v.swap(a, b);
                    }
                }
                assert_eq!(v[rows.clone()], expected[rows.clone()], "m = {m}");
            }
        }
    }

    #[test]
    fn extremes_network_places_the_k_smallest_and_largest() {
        let mut state = 5u64;
        for m in 1..=25 {
            for k in 0..=(m - 1) / 2 {
                let net = extremes_network(m, k);
                for _ in 0..10 {
                    let mut v: Vec<f32> = (0..m)
                        .map(|_| {
                            state = state.wrapping_mul(6364136223846793005).wrapping_add(7);
                            ((state >> 40) % 9) as f32
                        })
                        .collect();
                    let mut expected = v.clone();
                    expected.sort_by(f32::total_cmp);
                    for &(a, b) in &net {
                        if v[b] < v[a] {
                            v.swap(a, b);
                        }
                    }
                    assert_eq!(v[..k], expected[..k], "m = {m}, k = {k}");
                    assert_eq!(v[m - k..], expected[m - k..], "m = {m}, k = {k}");
                    let mut middle = v[k..m - k].to_vec();
                    middle.sort_by(f32::total_cmp);
                    assert_eq!(middle, expected[k..m - k]);
                }
            }
        }
    }

    #[test]
    fn network_sorts_every_size() {
        let mut state = 0x1234_5678_u64;
        for m in 1..=40 {
            let net = sorting_network(m);
            for _ in 0..20 {
                let mut v: Vec<f32> = (0..m)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((state >> 40) % 7) as f32
                    })
                    .collect();
                let mut expected = v.clone();
                expected.sort_by(f32::total_cmp);
                for &(a, b) in &net {
                    if v[b] < v[a] {
                        v.swap(a, b);
                    }
                }
                assert_eq!(v, expected, "m = {m}");
            }
        }
    }
}
