//! The parallel kernels every rule is built from.
//!
//! The flat parameter vector is cut into chunks of [`CHUNK`] coordinates
//! (never straddling two tensors); worker threads (`std::thread::scope`, one
//! per core) pull chunks from a shared queue. A kernel sees, for its chunk,
//! one slice per selected client plus the global adapter's slice, so rules are
//! written once over `&[&[f32]]`. Chunks are small enough that a chunk of 20
//! clients stays in the L2 cache, so kernels that touch the inputs several
//! times (Gram matrix, sorting network) read them from memory once.

use std::sync::Mutex;

use crate::aggregate::ClientUpdate;
use crate::aggregate::round::Round;
use crate::lora::LoraAdapter;
use crate::lora::tensor::first_non_finite;

/// Coordinates per work item.
pub(crate) const CHUNK: usize = 4096;

/// Coordinates per work item for single-pass kernels ([`combine`]): each
/// client's slice of a chunk is one sequential read, and longer reads let the
/// hardware prefetcher run ahead on each of the n input streams (FedAvg,
/// n = 20, d = 3.4 M: 23.1 → 20.6 ms against 4096). Kernels that revisit a
/// chunk (Gram matrix, sorting networks) keep [`CHUNK`] so it stays in L2.
pub(crate) const STREAM_CHUNK: usize = 16384;

/// One chunk of the flat vector: `len` coordinates of segment `seg` from `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub seg: usize,
    pub start: usize,
    pub len: usize,
}

/// What a kernel sees for one chunk.
pub(crate) struct ChunkRef<'a> {
    /// One slice per selected client, each `len` long.
    pub rows: Vec<&'a [f32]>,
    /// The global adapter's values for the chunk.
    pub global: &'a [f32],
}

impl<'a> ChunkRef<'a> {
    /// Number of coordinates.
    pub fn len(&self) -> usize {
        self.global.len()
    }

    /// The sub-chunk of coordinates `range` (clamped to the chunk).
    pub fn slice(&self, range: std::ops::Range<usize>) -> ChunkRef<'a> {
        let cut = |s: &'a [f32]| -> &'a [f32] { s.get(range.clone()).unwrap_or_default() };
        ChunkRef {
            rows: self.rows.iter().map(|r| cut(r)).collect(),
            global: cut(self.global),
        }
    }
}

/// Worker threads to use for `items` work items.
fn thread_count(items: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Spawning costs ~20 µs a thread: not worth it for a handful of chunks.
    if items < 8 {
        1
    } else {
        cores.min(items).min(64)
    }
}

/// Runs `work` over `items` on all cores; each thread folds into its own
/// state made by `init`. Returns the states (one per thread).
pub(crate) fn drive<I, S, Init, Work>(items: Vec<I>, init: Init, work: Work) -> Vec<S>
where
    I: Send,
    S: Send,
    Init: Fn() -> S + Sync,
    Work: Fn(&mut S, I) + Sync,
{
    let threads = thread_count(items.len());
    if threads <= 1 {
        let mut state = init();
        items.into_iter().for_each(|item| work(&mut state, item));
        return vec![state];
    }
    let queue = Mutex::new(items.into_iter());
    let next = || match queue.lock() {
        Ok(mut q) => q.next(),
        Err(poisoned) => poisoned.into_inner().next(),
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut state = init();
                    while let Some(item) = next() {
                        work(&mut state, item);
                    }
                    state
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The chunks of a round's flat vector.
pub(crate) fn spans(round: &Round<'_>) -> Vec<Span> {
    let mut out = Vec::with_capacity(round.dim / CHUNK + round.global.len());
    for (seg, values) in round.global.iter().enumerate() {
        let mut start = 0;
        while start < values.len() {
            let len = CHUNK.min(values.len() - start);
            out.push(Span { seg, start, len });
            start += len;
        }
    }
    out
}

pub(crate) fn chunk_at<'a>(round: &Round<'a>, members: &[usize], span: Span) -> ChunkRef<'a> {
    let range = span.start..span.start + span.len;
    let slice = |segments: &[&'a [f32]]| -> &'a [f32] {
        segments
            .get(span.seg)
            .and_then(|s| s.get(range.clone()))
            .unwrap_or_default()
    };
    ChunkRef {
        rows: members
            .iter()
            .filter_map(|&i| round.clients.get(i))
            .map(|c| slice(&c.segments))
            .collect(),
        global: slice(&round.global),
    }
}

/// Folds a kernel over every chunk of the selected clients; one state per thread.
pub(crate) fn fold<S, Init, Kernel>(
    round: &Round<'_>,
    members: &[usize],
    init: Init,
    kernel: Kernel,
) -> Vec<S>
where
    S: Send,
    Init: Fn() -> S + Sync,
    Kernel: Fn(&mut S, &ChunkRef<'_>) + Sync,
{
    drive(spans(round), init, |state, span| {
        kernel(state, &chunk_at(round, members, span));
    })
}

/// The output of [`map`]: one vector per segment (tensor), and whether every
/// value is finite (checked per chunk while it is still in cache).
pub(crate) struct Mapped {
    pub segments: Vec<Vec<f32>>,
    pub finite: bool,
}

/// Maps a kernel over every chunk, writing one output value per coordinate.
/// `init` makes per-thread scratch space.
pub(crate) fn map<S, Init, Kernel>(
    round: &Round<'_>,
    members: &[usize],
    init: Init,
    kernel: Kernel,
) -> Mapped
where
    S: Send,
    Init: Fn() -> S + Sync,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync,
{
    map_in_chunks(round, members, CHUNK, init, kernel)
}

/// [`map`] with an explicit chunk length.
fn map_in_chunks<S, Init, Kernel>(
    round: &Round<'_>,
    members: &[usize],
    chunk_len: usize,
    init: Init,
    kernel: Kernel,
) -> Mapped
where
    S: Send,
    Init: Fn() -> S + Sync,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync,
{
    let mut outputs: Vec<Vec<f32>> = round.global.iter().map(|g| vec![0.0; g.len()]).collect();
    let mut items = Vec::with_capacity(round.dim / CHUNK + outputs.len());
    for (seg, out) in outputs.iter_mut().enumerate() {
        let mut start = 0;
        for piece in out.chunks_mut(chunk_len.max(1)) {
            let len = piece.len();
            items.push((Span { seg, start, len }, piece));
            start += len;
        }
    }
    let states = drive(
        items,
        || (init(), true),
        |(scratch, finite), (span, out)| {
            kernel(scratch, &chunk_at(round, members, span), out);
            *finite &= all_finite(out);
        },
    );
    Mapped {
        segments: outputs,
        finite: states.iter().all(|(_, finite)| *finite),
    }
}

/// For each update, the first non-finite value as `(tensor, index, value)`.
pub(crate) fn first_non_finite_per_client(
    global: &LoraAdapter,
    updates: &[ClientUpdate<'_>],
) -> Vec<Option<(String, usize, f32)>> {
    type Found = Vec<Option<(usize, usize, f32)>>;
    let keys: Vec<&str> = global.keys().collect();
    let mut items = Vec::new();
    for (client, update) in updates.iter().enumerate() {
        for (seg, key) in keys.iter().enumerate() {
            let values = update.adapter.get(key).map_or(&[][..], |t| t.as_slice());
            for (c, chunk) in values.chunks(CHUNK * 16).enumerate() {
                items.push((client, seg, c * CHUNK * 16, chunk));
            }
        }
    }
    let states: Vec<Found> = drive(
        items,
        || vec![None; updates.len()],
        |found: &mut Found, (client, seg, start, chunk)| {
            if let Some((i, v)) = first_non_finite(chunk) {
                let candidate = (seg, start + i, v);
                if let Some(slot) = found.get_mut(client) {
                    let better = slot.is_none_or(|(s, idx, _)| (seg, start + i) < (s, idx));
                    if better {
                        *slot = Some(candidate);
                    }
                }
            }
        },
    );
    (0..updates.len())
        .map(|client| {
            states
                .iter()
                .filter_map(|s| s.get(client).copied().flatten())
                .min_by_key(|&(seg, idx, _)| (seg, idx))
                .map(|(seg, idx, v)| (keys.get(seg).copied().unwrap_or("").to_owned(), idx, v))
        })
        .collect()
}

/// Copies the chunk's updates Δᵢ = xᵢ − g into `buf` (m rows of `len`).
pub(crate) fn deltas_into(chunk: &ChunkRef<'_>, buf: &mut Vec<f32>) {
    let len = chunk.len();
    buf.clear();
    buf.resize(chunk.rows.len() * len, 0.0);
    for (row, out) in chunk.rows.iter().zip(buf.chunks_exact_mut(len.max(1))) {
        for ((o, x), g) in out.iter_mut().zip(row.iter()).zip(chunk.global) {
            *o = x - g;
        }
    }
}

/// Columns per Gram sub-block (m rows × 512 × 4 B = 40 KB for m = 20).
const GRAM_BLOCK: usize = 512;

/// The m × m Gram matrix of the selected clients' updates, G[i][j] = ⟨Δᵢ, Δⱼ⟩,
/// row-major, accumulated chunk by chunk (f32 within a chunk, f64 across).
pub(crate) fn gram(round: &Round<'_>, members: &[usize]) -> Vec<f64> {
    let m = members.len();
    let states = fold(
        round,
        members,
        || (vec![0.0f64; m * m], Vec::new()),
        |(acc, buf), chunk| {
            // Sub-blocks small enough that the m rows of Δ stay in L1 while
            // the m(m+1)/2 dot products run over them.
            let mut start = 0;
            while start < chunk.len() {
                let end = (start + GRAM_BLOCK).min(chunk.len());
                let block = chunk.slice(start..end);
                deltas_into(&block, buf);
                gram_chunk(buf, m, end - start, acc);
                start = end;
            }
        },
    );
    symmetric_total(states.iter().map(|(acc, _)| acc.as_slice()), m)
}

/// Sums per-thread lower-triangle accumulators and mirrors them into a full
/// symmetric m × m matrix.
pub(crate) fn symmetric_total<'a>(parts: impl Iterator<Item = &'a [f64]>, m: usize) -> Vec<f64> {
    let mut total = vec![0.0f64; m * m];
    for acc in parts {
        total.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
    }
    for i in 0..m {
        for j in 0..i {
            let lower = total.get(i * m + j).copied().unwrap_or(0.0);
            if let Some(upper) = total.get_mut(j * m + i) {
                *upper = lower;
            }
        }
    }
    total
}

pub(crate) use super::simd::gram_chunk;

/// Squared norms ‖Δᵢ‖² of the selected clients' updates (one pass).
pub(crate) fn sq_norms(round: &Round<'_>, members: &[usize]) -> Vec<f64> {
    let m = members.len();
    let states = fold(
        round,
        members,
        || vec![0.0f64; m],
        |acc, chunk| {
            for (slot, row) in acc.iter_mut().zip(&chunk.rows) {
                let mut part = [0.0f32; 16];
                let mut pieces = row.chunks_exact(16).zip(chunk.global.chunks_exact(16));
                for (x, g) in &mut pieces {
                    for k in 0..16 {
                        let d = x[k] - g[k];
                        part[k] += d * d;
                    }
                }
                let done = row.len() - row.len() % 16;
                let tail: f32 = row
                    .iter()
                    .zip(chunk.global)
                    .skip(done)
                    .map(|(x, g)| (x - g) * (x - g))
                    .sum();
                *slot += f64::from(part.iter().sum::<f32>() + tail);
            }
        },
    );
    let mut total = vec![0.0f64; m];
    for acc in &states {
        total.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
    }
    total
}

/// True when every entry of a matrix is finite.
pub(crate) fn finite(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// Squared Euclidean distances from a Gram matrix: ‖Δᵢ − Δⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ
/// (clamped at 0 against rounding).
pub(crate) fn sq_distances(gram: &[f64], m: usize) -> Vec<f64> {
    let diag = |i: usize| gram.get(i * m + i).copied().unwrap_or(0.0);
    let mut out = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            if i != j {
                let g = gram.get(i * m + j).copied().unwrap_or(0.0);
                if let Some(slot) = out.get_mut(i * m + j) {
                    *slot = (diag(i) + diag(j) - 2.0 * g).max(0.0);
                }
            }
        }
    }
    out
}

/// `out = g_coef · g + Σᵢ coefs[i] · xᵢ` over the selected clients, per coordinate.
///
/// With `g_coef = 1 − Σ coefs` this is `g + Σ coefs[i]·(xᵢ − g)`: averaging
/// (clipped) updates costs one pass over the inputs, no Δ is materialised.
pub(crate) fn combine(round: &Round<'_>, members: &[usize], coefs: &[f32], g_coef: f32) -> Mapped {
    map_in_chunks(
        round,
        members,
        STREAM_CHUNK,
        || (),
        |_, chunk, out| {
            if g_coef == 0.0 {
                out.iter_mut().for_each(|o| *o = 0.0);
            } else {
                out.iter_mut()
                    .zip(chunk.global)
                    .for_each(|(o, g)| *o = g_coef * g);
            }
            // Four clients per pass quarters the read-modify-write traffic on `out`.
            let mut quads = chunk.rows.chunks_exact(4);
            let mut cs = coefs.chunks_exact(4);
            for (rows, c) in (&mut quads).zip(&mut cs) {
                if let ([a, b, x, y], [ca, cb, cx, cy]) = (rows, c) {
                    let inputs = a.iter().zip(b.iter()).zip(x.iter().zip(y.iter()));
                    for (o, ((va, vb), (vx, vy))) in out.iter_mut().zip(inputs) {
                        *o += (ca * va + cb * vb) + (cx * vx + cy * vy);
                    }
                }
            }
            for (row, c) in quads.remainder().iter().zip(cs.remainder()) {
                for (o, x) in out.iter_mut().zip(row.iter()) {
                    *o += c * x;
                }
            }
        },
    )
}

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
    let size = network.iter().map(|&(_, b)| b + 1).max().unwrap_or(0);
    let mut needed: Vec<bool> = (0..size).map(needed_rows).collect();
    let mut kept = Vec::with_capacity(network.len());
    for &(a, b) in network.iter().rev() {
        let hit =
            needed.get(a).copied().unwrap_or(false) || needed.get(b).copied().unwrap_or(false);
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
pub(crate) fn sort_columns(
    chunk: &ChunkRef<'_>,
    network: &[(usize, usize)],
    buf: &mut Vec<f32>,
) -> usize {
    let len = chunk.len();
    buf.clear();
    for row in &chunk.rows {
        buf.extend_from_slice(row);
    }
    super::simd::sort_network(buf, len, network);
    len
}

/// True when every value is finite (a branch-free fold, so it vectorises).
pub(crate) fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// Row `r` (of `len`) of a column-sorted buffer.
pub(crate) fn row(buf: &[f32], len: usize, r: usize) -> &[f32] {
    buf.get(r * len..(r + 1) * len).unwrap_or_default()
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
