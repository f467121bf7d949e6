//! The parallel kernels every rule is built from.
//!
//! The flat parameter vector is cut into chunks of [`CHUNK`] coordinates
//! (never straddling two tensors); runs of consecutive chunks (groups whose
//! boundaries depend on the round's size only) are rayon tasks on the
//! caller's current pool ([`crate::parallel`]), and per-group results are
//! combined in group order, so no result depends on the thread count. Rounds
//! below [`MIN_PART_WORK`](crate::parallel::MIN_PART_WORK) values run on the
//! calling thread. A kernel sees, for its chunk,
//! one slice per selected client plus the global adapter's slice, so rules are
//! written once over `&[&[f32]]`. Chunks are small enough that a chunk of 20
//! clients stays in the L2 cache, so kernels that touch the inputs several
//! times (Gram matrix, sorting network) read them from memory once.
//!
//! A client's slice of a chunk is borrowed from its source when the source
//! holds native `f32` ([`TensorSource::as_f32`](crate::lora::TensorSource::as_f32),
//! resolved once per round), and otherwise converted into the worker's own
//! scratch buffer with `read_range`: extra memory is O(threads × clients ×
//! chunk), whatever the adapter size.
//!
//! Accumulations that one large client could overflow in `f32` (dot products,
//! norms, means) run in `f32` first, for speed, and are recomputed in `f64`
//! for the block or chunk whose `f32` result is not finite. So honest rounds
//! cost what they did, and a client sending 1e20 or `f32::MAX` is just a very
//! distant point to every rule.

use crate::aggregate::ClientId;
use crate::aggregate::linalg::Square;
use crate::aggregate::round::{Round, Seg};
use crate::error::{Error, Result};
use crate::lora::tensor::first_non_finite;
use crate::parallel;

/// Coordinates per work item.
pub(crate) const CHUNK: usize = 4096;

/// Coordinates per work item for single-pass kernels ([`combine`]): each
/// client's slice of a chunk is one sequential read, and longer reads let the
/// hardware prefetcher run ahead on each of the n input streams (FedAvg,
/// n = 20, d = 3.4 M: 23.1 → 20.6 ms against 4096). Kernels that revisit a
/// chunk (Gram matrix, sorting networks) keep [`CHUNK`] so it stays in L2.
pub(crate) const STREAM_CHUNK: usize = 16384;

/// Coordinates per work item of the non-finite scan.
const SCAN_CHUNK: usize = CHUNK * 16;

/// One chunk of the flat vector: `len` coordinates of segment `seg` from `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub seg: usize,
    pub start: usize,
    pub len: usize,
}

/// What a kernel sees for one chunk.
///
/// Invariant: every row has `global.len()` values ([`chunk_at`] checks it
/// when it builds the chunk, so kernels may zip rows with `global`).
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

    /// The sub-chunk of coordinates `range`; `None` when `range` is not
    /// inside the chunk (or, against the invariant, inside a shorter row).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Option<ChunkRef<'a>> {
        let rows = self
            .rows
            .iter()
            .map(|r| r.get(range.clone()))
            .collect::<Option<_>>()?;
        Some(ChunkRef {
            rows,
            global: self.global.get(range)?,
        })
    }
}

/// Runs `work` over `items` (engine chunks of at most [`CHUNK`] coordinates)
/// on the current rayon pool; each group of consecutive items folds into its
/// own state made by `init`. Returns the states in group order: group
/// boundaries depend on the number of items only, so reducing the states in
/// order gives the same result on any number of threads.
pub(crate) fn drive<I, S, Init, Work>(items: Vec<I>, init: Init, work: Work) -> Vec<S>
where
    I: Send,
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Work: Fn(&mut S, I) + Sync + Send,
{
    let group = parallel::group_len(items.len(), items.len().saturating_mul(CHUNK));
    parallel::fold_groups(
        items,
        group,
        || (),
        init,
        |_, state, item| work(state, item),
    )
}

/// A group's state for kernels that read chunks: the kernel's own state and
/// the first read error.
struct Worker<S> {
    state: S,
    failed: Option<Error>,
}

impl<S> Worker<S> {
    fn new(state: S) -> Self {
        Worker {
            state,
            failed: None,
        }
    }
}

/// Runs `work` over chunk items of a round whose kernels read `members`
/// clients: groups sized by the work (`coordinates × clients`), one
/// [`Worker`] per group. Scratch space — the buffer for converted rows and
/// the kernel's own (`scratch`) — is made once per rayon task and reused
/// across the groups it runs: a fresh buffer per group would be a
/// page-faulting allocation each time (measured 10–30 % on the median and
/// the Gram rules).
fn drive_chunks<I, W, S, Scratch, Init, Work>(
    round: &Round<'_>,
    members: &[usize],
    items: Vec<I>,
    scratch: Scratch,
    init: Init,
    work: Work,
) -> Vec<Worker<S>>
where
    I: Send,
    S: Send,
    Scratch: Fn() -> W + Sync + Send,
    Init: Fn() -> S + Sync + Send,
    Work: Fn(&mut Vec<f32>, &mut W, &mut S, I) -> Result<()> + Sync + Send,
{
    let values = round.dim.saturating_mul(members.len().max(1));
    let group = parallel::group_len(items.len(), values);
    parallel::fold_groups(
        items,
        group,
        || (Vec::new(), scratch()),
        || Worker::new(init()),
        |(rows, own): &mut (Vec<f32>, W), w: &mut Worker<S>, item| {
            if w.failed.is_some() {
                return;
            }
            if let Err(e) = work(rows, own, &mut w.state, item) {
                w.failed = Some(e);
            }
        },
    )
}

/// The kernel states, or the first read error (in group order, so the same
/// error on any number of threads).
fn finish<S>(workers: Vec<Worker<S>>) -> Result<Vec<S>> {
    let mut out = Vec::with_capacity(workers.len());
    for worker in workers {
        if let Some(error) = worker.failed {
            return Err(error);
        }
        out.push(worker.state);
    }
    Ok(out)
}

/// A failed read from a client's source, naming the client.
pub(crate) fn client_read_error(client: &ClientId, source: Error) -> Error {
    Error::for_client(client.clone(), source)
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

/// The selected clients' values (and the global's) for one chunk: borrowed
/// from `f32` sources, converted into `scratch` for the others.
pub(crate) fn chunk_at<'s>(
    round: &'s Round<'_>,
    members: &[usize],
    span: Span,
    scratch: &'s mut Vec<f32>,
) -> Result<ChunkRef<'s>> {
    let range = span.start..span.start.saturating_add(span.len);
    let reads = members
        .iter()
        .filter_map(|&i| round.clients.get(i))
        .filter(|c| matches!(c.segments.get(span.seg), Some(Seg::Read(_))))
        .count();
    let need = reads.checked_mul(span.len).ok_or_else(|| {
        Error::invariant(
            "aggregate::engine::chunk_at",
            "the scratch rows of one chunk fit in memory (clients × chunk length)",
            format!("{reads} rows of {}", span.len),
        )
    })?;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let global = round
        .global
        .get(span.seg)
        .and_then(|s| s.get(range.clone()))
        .ok_or_else(|| span_outside(round, span))?;
    let key = segment_key(round, span.seg)?;
    let mut free: &'s mut [f32] = scratch.as_mut_slice();
    let mut rows: Vec<&'s [f32]> = Vec::with_capacity(members.len());
    for &i in members {
        let client = round.clients.get(i).ok_or_else(|| {
            Error::invariant(
                "aggregate::engine::chunk_at",
                "members are positions of usable clients of the round",
                format!("member {i} of {} clients", round.clients.len()),
            )
        })?;
        match client.segments.get(span.seg) {
            Some(Seg::Slice(values)) => rows.push(
                values
                    .get(range.clone())
                    .ok_or_else(|| span_outside(round, span))?,
            ),
            Some(Seg::Read(source)) => {
                let available = free.len();
                let Some((head, tail)) = std::mem::take(&mut free).split_at_mut_checked(span.len)
                else {
                    return Err(Error::invariant(
                        "aggregate::engine::chunk_at",
                        "the scratch holds one row of the chunk per converted client",
                        format!("{available} values left for a row of {}", span.len),
                    ));
                };
                source
                    .read_range(key, span.start, head)
                    .map_err(|e| client_read_error(&client.id, e))?;
                let head: &'s [f32] = head;
                rows.push(head);
                free = tail;
            }
            None => {
                return Err(Error::invariant(
                    "aggregate::engine::chunk_at",
                    "every usable client has one tensor per segment of the round",
                    format!(
                        "client `{}` has {} segments, segment {} asked",
                        client.id,
                        client.segments.len(),
                        span.seg
                    ),
                ));
            }
        }
    }
    Ok(ChunkRef { rows, global })
}

/// The canonical key of segment `seg` ([`Error::Invariant`] when the round
/// has no such segment: keys and segments are built together).
pub(crate) fn segment_key<'r>(round: &Round<'r>, seg: usize) -> Result<&'r str> {
    round.keys.get(seg).copied().ok_or_else(|| {
        Error::invariant(
            "aggregate::engine",
            "the round has one key per segment",
            format!("segment {seg} of {} keys", round.keys.len()),
        )
    })
}

/// A chunk that does not lie inside its segment: spans are cut from the
/// global tensors and every client slice was checked to have their length.
fn span_outside(round: &Round<'_>, span: Span) -> Error {
    Error::invariant(
        "aggregate::engine::chunk_at",
        "a span lies inside its segment, in the global and in every client slice",
        format!(
            "span {}..+{} of segment {} ({} values in the global)",
            span.start,
            span.len,
            span.seg,
            round.global.get(span.seg).map_or(0, |g| g.len())
        ),
    )
}

/// Folds a kernel over every chunk of the selected clients: one state per
/// group of chunks (from `init`, returned in group order), and scratch space
/// per rayon task (from `scratch`; it must not carry results). Fails only
/// when a client's source fails to read.
pub(crate) fn fold<W, S, Scratch, Init, Kernel>(
    round: &Round<'_>,
    members: &[usize],
    scratch: Scratch,
    init: Init,
    kernel: Kernel,
) -> Result<Vec<S>>
where
    S: Send,
    Scratch: Fn() -> W + Sync + Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut W, &mut S, &ChunkRef<'_>) + Sync + Send,
{
    let workers = drive_chunks(
        round,
        members,
        spans(round),
        scratch,
        init,
        |rows, own, state, span| {
            let chunk = chunk_at(round, members, span, rows)?;
            kernel(own, state, &chunk);
            Ok(())
        },
    );
    finish(workers)
}

/// The output of [`map`]: one vector per segment (tensor), and whether every
/// value is finite (checked per chunk while it is still in cache).
pub(crate) struct Mapped {
    pub segments: Vec<Vec<f32>>,
    pub finite: bool,
}

/// Maps a kernel over every chunk, writing one output value per coordinate.
/// `init` makes scratch space, once per rayon task (it must not carry results).
pub(crate) fn map<S, Init, Kernel>(
    round: &Round<'_>,
    members: &[usize],
    init: Init,
    kernel: Kernel,
) -> Result<Mapped>
where
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync + Send,
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
) -> Result<Mapped>
where
    S: Send,
    Init: Fn() -> S + Sync + Send,
    Kernel: Fn(&mut S, &ChunkRef<'_>, &mut [f32]) + Sync + Send,
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
    let values = round.dim.saturating_mul(members.len().max(1));
    let group = parallel::group_len(items.len(), values);
    // The kernel's state is scratch (sort buffers, f64 rows): made once per
    // rayon task and reused across the groups it runs, never once per group,
    // since a fresh m × CHUNK buffer per group is a page-faulting allocation
    // each time (measured: the median ran 30 % slower that way).
    let groups = parallel::fold_groups(
        items,
        group,
        || (Vec::new(), init()),
        || Worker::new(true),
        |(scratch, state): &mut (Vec<f32>, S),
         w: &mut Worker<bool>,
         (span, out): (Span, &mut [f32])| {
            if w.failed.is_some() {
                return;
            }
            match chunk_at(round, members, span, scratch) {
                Ok(chunk) => {
                    kernel(state, &chunk, out);
                    w.state &= all_finite(out);
                }
                Err(e) => w.failed = Some(e),
            }
        },
    );
    let finite = finish(groups)?.into_iter().all(|finite| finite);
    Ok(Mapped {
        segments: outputs,
        finite,
    })
}

/// For each of `members`, the first non-finite value as `(tensor, index, value)`.
pub(crate) fn first_non_finite_per_client(
    round: &Round<'_>,
    members: &[usize],
) -> Result<Vec<Option<(String, usize, f32)>>> {
    type Found = Vec<Option<(usize, usize, f32)>>;
    let mut items = Vec::new();
    for (k, &i) in members.iter().enumerate() {
        let Some(client) = round.clients.get(i) else {
            continue;
        };
        for (seg, global) in round.global.iter().enumerate() {
            let mut start = 0;
            while start < global.len() {
                let len = SCAN_CHUNK.min(global.len() - start);
                items.push((k, client, seg, start, len));
                start += len;
            }
        }
    }
    let workers = drive_chunks(
        round,
        members,
        items,
        || (),
        || vec![None; members.len()],
        |scratch, _, found: &mut Found, (k, client, seg, start, len)| {
            let span = Span { seg, start, len };
            let values: &[f32] = match client.segments.get(seg) {
                Some(Seg::Slice(values)) => values
                    .get(start..start + len)
                    .ok_or_else(|| span_outside(round, span))?,
                Some(Seg::Read(source)) => {
                    scratch.resize(len, 0.0);
                    source
                        .read_range(segment_key(round, seg)?, start, scratch)
                        .map_err(|e| client_read_error(&client.id, e))?;
                    scratch
                }
                None => return Err(span_outside(round, span)),
            };
            if let Some((i, v)) = first_non_finite(values)
                && let Some(slot) = found.get_mut(k)
                && slot.is_none_or(|(s, idx, _)| (seg, start + i) < (s, idx))
            {
                *slot = Some((seg, start + i, v));
            }
            Ok(())
        },
    );
    let states = finish(workers)?;
    (0..members.len())
        .map(|k| {
            states
                .iter()
                .filter_map(|s| s.get(k).copied().flatten())
                .min_by_key(|&(seg, idx, _)| (seg, idx))
                .map(|(seg, idx, v)| Ok((segment_key(round, seg)?.to_owned(), idx, v)))
                .transpose()
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

/// Per-group state of the Gram kernel (one partial sum per group of chunks).
struct GramState {
    /// m × m f64 accumulator (lower triangle).
    acc: Vec<f64>,
    /// A broken invariant met in this group.
    failed: Option<Error>,
}

/// Scratch space of the Gram kernel (per rayon task, reused across groups).
struct GramScratch {
    /// The block's Δ rows.
    buf: Vec<f32>,
    /// The block's f32 dot products (lower triangle).
    block: Vec<f32>,
}

/// The m × m Gram matrix of the selected clients' updates, G[i][j] = ⟨Δᵢ, Δⱼ⟩,
/// row-major, accumulated block by block (f32 within a 512-column block, f64
/// across blocks; a block whose f32 products are not finite is recomputed
/// entirely in f64, Δ included, so finite inputs always give a finite G).
pub(crate) fn gram(round: &Round<'_>, members: &[usize]) -> Result<Square> {
    let m = members.len();
    let mut states = fold(
        round,
        members,
        || GramScratch {
            buf: Vec::new(),
            block: vec![0.0f32; m * m],
        },
        || GramState {
            acc: vec![0.0f64; m * m],
            failed: None,
        },
        |sc, st, chunk| {
            // Sub-blocks small enough that the m rows of Δ stay in L1 while
            // the m(m+1)/2 dot products run over them.
            let mut start = 0;
            while start < chunk.len() {
                let end = (start + GRAM_BLOCK).min(chunk.len());
                let Some(block) = chunk.slice(start..end) else {
                    st.failed.get_or_insert_with(|| {
                        Error::invariant(
                            "aggregate::engine::gram",
                            "every row of a chunk has the chunk's length",
                            format!("block {start}..{end} of a chunk of {}", chunk.len()),
                        )
                    });
                    return;
                };
                deltas_into(&block, &mut sc.buf);
                gram_chunk(&sc.buf, m, end - start, &mut sc.block);
                if all_finite(&sc.block) {
                    add_lower(&sc.block, &mut st.acc);
                } else {
                    gram_rows_f64(&block.rows, Some(block.global), &mut st.acc);
                }
                start = end;
            }
        },
    )?;
    if let Some(error) = states.iter_mut().find_map(|s| s.failed.take()) {
        return Err(error);
    }
    symmetric_total(states.into_iter().map(|s| s.acc), m)
}

/// `acc += block` over the lower triangle a Gram block wrote (the upper
/// triangle of `block` stays zero).
pub(crate) fn add_lower(block: &[f32], acc: &mut [f64]) {
    acc.iter_mut()
        .zip(block)
        .for_each(|(a, b)| *a += f64::from(*b));
}

/// Lower triangle of `Σ (rowᵢ − g)(rowⱼ − g)` in f64, added to `acc` (the
/// slow, overflow-free path; `global = None` means g = 0).
pub(crate) fn gram_rows_f64(rows: &[&[f32]], global: Option<&[f32]>, acc: &mut [f64]) {
    let m = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let mut deltas = vec![0.0f64; m * len];
    for (row, out) in rows.iter().zip(deltas.chunks_exact_mut(len.max(1))) {
        match global {
            // Rows and global have the chunk's length (the `ChunkRef` invariant).
            Some(global) => {
                for ((o, x), g) in out.iter_mut().zip(row.iter()).zip(global) {
                    *o = f64::from(*x) - f64::from(*g);
                }
            }
            None => {
                for (o, x) in out.iter_mut().zip(row.iter()) {
                    *o = f64::from(*x);
                }
            }
        }
    }
    // `acc` is m × m: row i of it takes the dot products with rows 0..=i.
    let deltas: Vec<&[f64]> = deltas.chunks_exact(len.max(1)).collect();
    for (i, (a, acc_row)) in deltas
        .iter()
        .zip(acc.chunks_exact_mut(m.max(1)))
        .enumerate()
    {
        for (b, slot) in deltas.iter().take(i + 1).zip(acc_row.iter_mut()) {
            *slot += a.iter().zip(b.iter()).map(|(x, y)| x * y).sum::<f64>();
        }
    }
}

/// Sums per-thread lower-triangle accumulators and mirrors them into a full
/// symmetric m × m matrix ([`Error::Invariant`] for an accumulator that is
/// not m × m: each was created with m·m values).
pub(crate) fn symmetric_total(
    parts: impl IntoIterator<Item = Vec<f64>>,
    m: usize,
) -> Result<Square> {
    let mut total = Square::zeros(m);
    for acc in parts {
        let acc = Square::new(m, acc)?;
        total
            .as_mut_slice()
            .iter_mut()
            .zip(acc.as_slice())
            .for_each(|(t, a)| *t += a);
    }
    total.mirror_lower();
    Ok(total)
}

pub(crate) use super::simd::gram_chunk;

/// Squared norms ‖Δᵢ‖² of the selected clients' updates (one pass; a chunk
/// row whose f32 sum is not finite is redone in f64).
pub(crate) fn sq_norms(round: &Round<'_>, members: &[usize]) -> Result<Vec<f64>> {
    let m = members.len();
    let states = fold(
        round,
        members,
        || (),
        || vec![0.0f64; m],
        |_, acc, chunk| {
            for (slot, row) in acc.iter_mut().zip(&chunk.rows) {
                let mut part = [0.0f32; 16];
                // Row and global have the chunk's length (the `ChunkRef`
                // invariant): 16-wide arrays, then the same tail of both.
                let (row_blocks, row_tail) = row.as_chunks::<16>();
                let (g_blocks, g_tail) = chunk.global.as_chunks::<16>();
                for (x, g) in row_blocks.iter().zip(g_blocks) {
                    for ((p, x), g) in part.iter_mut().zip(x).zip(g) {
                        let d = x - g;
                        *p += d * d;
                    }
                }
                let tail: f32 = row_tail
                    .iter()
                    .zip(g_tail)
                    .map(|(x, g)| (x - g) * (x - g))
                    .sum();
                let sum = part.iter().sum::<f32>() + tail;
                *slot += if sum.is_finite() {
                    f64::from(sum)
                } else {
                    row.iter()
                        .zip(chunk.global)
                        .map(|(x, g)| (f64::from(*x) - f64::from(*g)).powi(2))
                        .sum()
                };
            }
        },
    )?;
    let mut total = vec![0.0f64; m];
    for acc in &states {
        total.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
    }
    Ok(total)
}

/// True when every entry of a matrix is finite.
pub(crate) fn finite(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// Squared Euclidean distances from a Gram matrix: ‖Δᵢ − Δⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ
/// (clamped at 0 against rounding).
pub(crate) fn sq_distances(gram: &Square) -> Square {
    Square::from_fn(gram.m(), |i, j| {
        if i == j {
            0.0
        } else {
            (gram.get(i, i) + gram.get(j, j) - 2.0 * gram.get(i, j)).max(0.0)
        }
    })
}

/// An f64 result stored as f32: finite values saturate at ±`f32::MAX` (a mean
/// of finite f32 values is within their range up to rounding), non-finite
/// ones stay non-finite so the caller still sees them.
pub(crate) fn saturate(v: f64) -> f32 {
    if v.is_finite() {
        v.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32
    } else {
        v as f32
    }
}

/// `out = g_coef · g + Σᵢ coefs[i] · xᵢ` over the selected clients, per coordinate.
///
/// With `g_coef = 1 − Σ coefs` this is `g + Σ coefs[i]·(xᵢ − g)`: averaging
/// (clipped) updates costs one pass over the inputs, no Δ is materialised.
/// Computed in f32; a chunk whose result is not finite is recomputed in f64
/// and saturated, so a mean of finite inputs never overflows.
pub(crate) fn combine(
    round: &Round<'_>,
    members: &[usize],
    coefs: &[f64],
    g_coef: f64,
) -> Result<Mapped> {
    let coefs32: Vec<f32> = coefs.iter().map(|&c| c as f32).collect();
    let g32 = g_coef as f32;
    map_in_chunks(
        round,
        members,
        STREAM_CHUNK,
        Vec::new,
        |wide: &mut Vec<f64>, chunk, out| {
            combine_f32(chunk, &coefs32, g32, out);
            if !all_finite(out) {
                combine_f64(chunk, coefs, g_coef, wide, out);
            }
        },
    )
}

fn combine_f32(chunk: &ChunkRef<'_>, coefs: &[f32], g_coef: f32, out: &mut [f32]) {
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
}

/// [`combine`]'s overflow-free path for one chunk.
fn combine_f64(
    chunk: &ChunkRef<'_>,
    coefs: &[f64],
    g_coef: f64,
    wide: &mut Vec<f64>,
    out: &mut [f32],
) {
    wide.clear();
    if g_coef == 0.0 {
        wide.resize(out.len(), 0.0);
    } else {
        wide.extend(chunk.global.iter().map(|g| g_coef * f64::from(*g)));
        wide.resize(out.len(), 0.0);
    }
    for (row, c) in chunk.rows.iter().zip(coefs) {
        for (w, x) in wide.iter_mut().zip(row.iter()) {
            *w += c * f64::from(*x);
        }
    }
    for (o, w) in out.iter_mut().zip(wide.iter()) {
        *o = saturate(*w);
    }
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
    let finite = super::simd::sort_network(buf, len, network);
    (len, finite)
}

/// True when every value is finite (a branch-free fold, so it vectorises).
pub(crate) fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
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

    /// What each group of `drive` saw, on 1 and 3 threads: the same groups,
    /// so any in-order reduction of the states is thread-count independent.
    #[test]
    fn drive_groups_depend_on_the_item_count_only() {
        for items in [3usize, 100, 1000, 5000] {
            let groups = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| drive((0..items).collect(), Vec::new, |seen, i| seen.push(i)))
            };
            let one = groups(1);
            assert_eq!(one, groups(3), "{items} items");
            assert_eq!(one.concat(), (0..items).collect::<Vec<_>>());
            assert!(one.len() <= crate::parallel::MAX_PARTS);
        }
    }

    #[test]
    fn symmetric_total_refuses_an_accumulator_that_is_not_m_by_m() {
        let err = symmetric_total([vec![0.0; 4], vec![0.0; 3]], 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invariant {
                    location: "aggregate::linalg::Square::new",
                    ..
                }
            ),
            "{err:?}"
        );
        let total =
            symmetric_total([vec![1.0, 0.0, 2.0, 3.0], vec![1.0, 0.0, 0.0, 1.0]], 2).unwrap();
        assert_eq!(total.as_slice(), [2.0, 2.0, 2.0, 4.0]);
    }

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
