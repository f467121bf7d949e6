//! Gram matrices, norms and distances of the clients' updates.
//!
//! The Gram matrix is built panel by panel: a panel gathers [`PANEL`]
//! consecutive coordinates (across tensors when they are small) of every
//! client into one m × [`PANEL`] buffer, and a register-tiled f32 kernel
//! ([`gram_tiles`]) adds its lower triangle to an f64 accumulator. Entries
//! the f32 kernel cannot be trusted with are recomputed in f64 over the
//! panel: non-finite products (one client at 1e20 or `f32::MAX`), rows whose
//! f32 values overflowed (`x − g` of two huge finite values, computed exactly
//! in f64 instead), and — when asked, for cosines — rows so small that their
//! f32 squares underflow. So finite inputs always give a finite Gram matrix,
//! and honest rounds pay for f32 arithmetic only.
//!
//! # Memory and threads
//!
//! Consecutive panels form parts whose boundaries depend on the round's size
//! only, and each part accumulates into its own m × m f64 matrix, summed in
//! part order, so the result is the same on any number of threads. The number
//! of parts is capped so that the accumulators together stay within
//! [`ACC_BUDGET`] (or one m × m matrix when a single one is larger): at
//! m = 20 that is 64 parts of 3.2 KB, at m = 10,000 one part of 800 MB. When
//! there is a single part and m is large, the tiles of each panel are split
//! across threads by rows instead (each row of the accumulator is written by
//! one task). Beyond the accumulator, each task holds one panel buffer
//! (m × [`PANEL`] f32) and its chunk buffers.

use crate::aggregate::linalg::Square;
use crate::aggregate::simd::{PANEL_ALIGN, TILE_ROWS, Tile, gram_tiles};
use crate::aggregate::updates::ValidUpdates;
use crate::error::{Error, Result};
use crate::parallel;

use super::chunk::{Span, chunk_at, spans};
use super::drive::fold;

/// Coordinates per Gram panel: the tile kernel reduces its lanes once per
/// panel, so longer panels amortise that; 128 rows of 512 f32 (the kernel's
/// column block) stay in L2.
pub(crate) const PANEL: usize = 512;

/// Bytes of Gram accumulators held at once beyond a single one.
pub(crate) const ACC_BUDGET: usize = 8 << 20;

/// Below this squared norm (per panel, in f32) a row's products may have
/// underflowed: the cosine of two 1e-20 copies must still be 1.
const TINY: f32 = 1e-30;

/// How a Gram computation is split: `group_len` panels per part, and whether
/// the tiles of a panel are split across threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Consecutive panels per part (one m × m accumulator per part).
    pub group_len: usize,
    /// Number of parts.
    pub parts: usize,
    /// Split each panel's tiles across threads (single part, large m).
    pub split_tiles: bool,
}

/// The split of a Gram matrix of `m` rows over `panels` panels holding
/// `values` coordinates in all. Depends on the sizes only.
pub(crate) fn plan(m: usize, panels: usize, values: usize) -> Plan {
    let acc_bytes = m.saturating_mul(m).saturating_mul(8).max(1);
    let work = values.saturating_mul(m.saturating_mul(m + 1) / 2);
    let by_work = parallel::part_count(work, parallel::MIN_PART_WORK);
    let by_memory = (ACC_BUDGET / acc_bytes).max(1);
    let wanted = by_work.min(by_memory).min(panels.max(1)).max(1);
    let group_len = panels.div_ceil(wanted).max(1);
    let parts = panels.div_ceil(group_len).max(1);
    let panel_work = PANEL.saturating_mul(m.saturating_mul(m + 1) / 2);
    Plan {
        group_len,
        parts,
        split_tiles: parts == 1 && m >= 8 * TILE_ROWS && panel_work >= parallel::MIN_PART_WORK,
    }
}

/// Cuts `(len, item)` pieces (each at most [`PANEL`] long) into panels of at
/// most [`PANEL`] coordinates, in order.
pub(crate) fn panels<I>(pieces: impl IntoIterator<Item = (usize, I)>) -> Vec<Vec<(usize, I)>> {
    let mut out: Vec<Vec<(usize, I)>> = Vec::new();
    let mut current = Vec::new();
    let mut filled = 0;
    for (len, item) in pieces {
        if filled + len > PANEL && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            filled = 0;
        }
        filled += len;
        current.push((len, item));
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The round's chunks cut into pieces of at most [`PANEL`] coordinates.
pub(crate) fn pieces(round: &ValidUpdates<'_>) -> Vec<Span> {
    let mut out = Vec::new();
    for span in spans(round) {
        let mut start = 0;
        while start < span.len {
            let len = PANEL.min(span.len - start);
            out.push(Span {
                seg: span.seg,
                start: span.start + start,
                len,
            });
            start += len;
        }
    }
    out
}

/// Where a piece of a panel is written: row i's values for the piece go to
/// [`row`](Self::row), then [`settle`](Self::settle) decides whether the row
/// needs exact f64 values.
pub(crate) struct PanelWriter<'a> {
    buf: &'a mut [f32],
    wide: &'a mut [Option<Vec<f64>>],
    offset: usize,
    len: usize,
}

impl PanelWriter<'_> {
    /// Row `i`'s f32 values for this piece (`None` for a row beyond m).
    pub(crate) fn row(&mut self, i: usize) -> Option<&mut [f32]> {
        let start = i.checked_mul(PANEL)?.checked_add(self.offset)?;
        self.buf.get_mut(start..start.checked_add(self.len)?)
    }

    /// After row `i` of the piece is written (`finite`: whether its f32
    /// values all are): when they are not (or the row already has exact
    /// values from an earlier piece), `exact` writes the piece's values in
    /// f64, which the fix-ups then use for every product of the row.
    pub(crate) fn settle(&mut self, i: usize, finite: bool, exact: impl FnOnce(&mut [f64])) {
        let (offset, len) = (self.offset, self.len);
        let Some(row) = i
            .checked_mul(PANEL)
            .and_then(|s| self.buf.get(s..s + offset + len))
        else {
            return;
        };
        let Some(slot) = self.wide.get_mut(i) else {
            return;
        };
        if slot.is_none() && finite {
            return;
        }
        let wide = slot.get_or_insert_with(|| {
            let mut w = vec![0.0f64; PANEL];
            for (w, v) in w.iter_mut().zip(row.iter().take(offset)) {
                *w = f64::from(*v);
            }
            w
        });
        if let Some(out) = wide.get_mut(offset..offset + len) {
            exact(out);
        }
    }
}

/// Per-task scratch of the Gram driver.
struct PanelScratch<W> {
    /// m rows of [`PANEL`] f32 values.
    buf: Vec<f32>,
    /// Exact f64 rows of the panel, for the rows that need them.
    wide: Vec<Option<Vec<f64>>>,
    /// Rows whose products are recomputed in f64.
    bad: Vec<bool>,
    /// The caller's own scratch.
    own: W,
}

/// Per-part state: the accumulator and the first error.
struct GramState {
    acc: Vec<f64>,
    failed: Option<Error>,
}

/// The m × m Gram matrix of rows that `fill` writes piece by piece:
/// G[i][j] = Σ over all pieces of rowᵢ·rowⱼ. `tiny` asks for the underflow
/// fix-up (cosines). `scratch` makes the caller's scratch once per task.
pub(crate) fn gram_of<I, W, Scratch, Fill>(
    m: usize,
    panels: Vec<Vec<(usize, I)>>,
    tiny: bool,
    scratch: Scratch,
    fill: Fill,
) -> Result<Square>
where
    I: Send,
    W: Send,
    Scratch: Fn() -> W + Sync + Send,
    Fill: Fn(&mut W, I, &mut PanelWriter<'_>) -> Result<()> + Sync + Send,
{
    let values: usize = panels.iter().flatten().map(|(len, _)| len).sum();
    let plan = plan(m, panels.len(), values);
    let states = parallel::fold_groups(
        panels,
        plan.group_len,
        || PanelScratch {
            buf: vec![0.0f32; m * PANEL],
            wide: vec![None; m],
            bad: vec![false; m],
            own: scratch(),
        },
        || GramState {
            acc: vec![0.0f64; m * m],
            failed: None,
        },
        |sc, st, panel| {
            if st.failed.is_some() {
                return;
            }
            if let Err(e) = add_panel(m, tiny, plan.split_tiles, sc, &mut st.acc, panel, &fill) {
                st.failed = Some(e);
            }
        },
    );
    let mut parts = Vec::with_capacity(states.len());
    for state in states {
        if let Some(error) = state.failed {
            return Err(error);
        }
        parts.push(state.acc);
    }
    symmetric_total(parts, m)
}

/// Writes one panel's rows and adds its Gram lower triangle to `acc`.
fn add_panel<I, W, Fill>(
    m: usize,
    tiny: bool,
    split_tiles: bool,
    sc: &mut PanelScratch<W>,
    acc: &mut [f64],
    panel: Vec<(usize, I)>,
    fill: &Fill,
) -> Result<()>
where
    Fill: Fn(&mut W, I, &mut PanelWriter<'_>) -> Result<()>,
{
    sc.wide.iter_mut().for_each(|w| *w = None);
    let mut offset = 0;
    for (len, item) in panel {
        if offset + len > PANEL {
            return Err(Error::invariant(
                "aggregate::engine::gram",
                "a panel holds at most PANEL coordinates",
                format!("{} coordinates", offset + len),
            ));
        }
        let mut writer = PanelWriter {
            buf: &mut sc.buf,
            wide: &mut sc.wide,
            offset,
            len,
        };
        fill(&mut sc.own, item, &mut writer)?;
        offset += len;
    }
    // Zero padding up to the kernel's lane multiple (earlier panels may have
    // left values there).
    let padded = offset.next_multiple_of(PANEL_ALIGN).min(PANEL);
    for row in sc.buf.chunks_exact_mut(PANEL) {
        if let Some(pad) = row.get_mut(offset..padded) {
            pad.fill(0.0);
        }
    }
    for ((bad, wide), row) in sc
        .bad
        .iter_mut()
        .zip(&sc.wide)
        .zip(sc.buf.chunks_exact(PANEL))
    {
        let sq = sum_sq(row.get(..padded).unwrap_or(&[]));
        // NaN counts as tiny: it must not be trusted either.
        *bad = wide.is_some() || (tiny && (sq.is_nan() || sq < TINY));
    }
    let rows = Rows {
        buf: &sc.buf,
        wide: &sc.wide,
        bad: &sc.bad,
        m,
        len: padded,
    };
    if split_tiles {
        let ranges = triangle_ranges(m, parallel::MAX_PARTS);
        let mut parts = Vec::with_capacity(ranges.len());
        let mut rest: &mut [f64] = acc;
        for range in ranges {
            let (head, tail) =
                std::mem::take(&mut rest).split_at_mut((range.end - range.start) * m);
            parts.push((range, head));
            rest = tail;
        }
        parallel::map_parts(parts, |(range, out)| rows.add_tiles(range, out));
    } else {
        rows.add_tiles(0..m, acc);
    }
    Ok(())
}

/// Σ v² in f32, in 16 lanes (so it vectorises; a sequential fold does not).
fn sum_sq(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (blocks, tail) = values.as_chunks::<16>();
    for b in blocks {
        for (a, v) in acc.iter_mut().zip(b) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>()
}

/// Splits rows 0..m into at most `parts` ranges (multiples of the tile
/// height) holding about equal shares of the lower triangle.
fn triangle_ranges(m: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for k in 1..=parts {
        let edge = ((m as f64) * (k as f64 / parts as f64).sqrt()) as usize;
        let end = if k == parts {
            m
        } else {
            edge.next_multiple_of(TILE_ROWS).min(m)
        };
        if end > start {
            out.push(start..end);
            start = end;
        }
    }
    out
}

/// A written panel, read by the tile kernel and the fix-ups.
struct Rows<'a> {
    buf: &'a [f32],
    wide: &'a [Option<Vec<f64>>],
    bad: &'a [bool],
    m: usize,
    len: usize,
}

impl Rows<'_> {
    /// Adds the panel's Gram entries for rows `range` to `out` (those rows
    /// of the accumulator, m values each).
    fn add_tiles(&self, range: std::ops::Range<usize>, out: &mut [f64]) {
        let m = self.m;
        let start = range.start;
        let end = range.end;
        let mut sink = |(i0, j0, values): Tile<'_>| {
            for (r, row) in values.iter().enumerate() {
                let i = i0 + r;
                if i >= end {
                    break;
                }
                for (c, v) in row.iter().enumerate() {
                    let j = j0 + c;
                    if j > i {
                        break;
                    }
                    let trusted = v.is_finite()
                        && self.bad.get(i) == Some(&false)
                        && self.bad.get(j) == Some(&false);
                    let value = if trusted {
                        f64::from(*v)
                    } else {
                        self.dot_f64(i, j)
                    };
                    if let Some(slot) = out.get_mut((i - start) * m + j) {
                        *slot += value;
                    }
                }
            }
        };
        gram_tiles(self.buf, PANEL, m, self.len, range, &mut sink);
    }

    /// ⟨rowᵢ, rowⱼ⟩ over the panel in f64, from the exact rows where there
    /// are some.
    fn dot_f64(&self, i: usize, j: usize) -> f64 {
        let f32_row = |i: usize| self.buf.get(i * PANEL..i * PANEL + self.len).unwrap_or(&[]);
        let wide = |i: usize| self.wide.get(i).and_then(|w| w.as_deref());
        match (wide(i), wide(j)) {
            (Some(a), Some(b)) => dot(a, b),
            (Some(a), None) => dot(a, f32_row(j)),
            (None, Some(b)) => dot(f32_row(i), b),
            (None, None) => dot(f32_row(i), f32_row(j)),
        }
    }
}

/// Σ aₖbₖ in f64.
fn dot<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x).into() * (*y).into())
        .sum()
}

/// The m × m Gram matrix of the selected clients' updates, G[i][j] = ⟨Δᵢ, Δⱼ⟩
/// with Δ = x − g (see the module docs for the f32 kernel and its f64
/// fix-ups).
pub(crate) fn gram(round: &ValidUpdates<'_>, members: &[usize]) -> Result<Square> {
    let panels = panels(pieces(round).into_iter().map(|s| (s.len, s)));
    gram_of(
        members.len(),
        panels,
        false,
        Vec::new,
        |scratch, span, w| {
            let chunk = chunk_at(round, members, span, scratch)?;
            for (i, x) in chunk.rows.iter().enumerate() {
                let finite = w
                    .row(i)
                    .is_some_and(|out| crate::aggregate::simd::sub_finite(out, x, chunk.global));
                w.settle(i, finite, |exact| {
                    for ((e, x), g) in exact.iter_mut().zip(x.iter()).zip(chunk.global) {
                        *e = f64::from(*x) - f64::from(*g);
                    }
                });
            }
            Ok(())
        },
    )
}

/// Sums per-part lower-triangle accumulators in part order and mirrors them
/// into a full symmetric m × m matrix ([`Error::Invariant`] for an
/// accumulator that is not m × m: each was created with m·m values). The
/// first accumulator becomes the total, so no extra m × m is allocated.
pub(crate) fn symmetric_total(
    parts: impl IntoIterator<Item = Vec<f64>>,
    m: usize,
) -> Result<Square> {
    let mut parts = parts.into_iter();
    let mut total = match parts.next() {
        Some(first) => Square::new(m, first)?,
        None => Square::zeros(m),
    };
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

/// Squared norms ‖Δᵢ‖² of the selected clients' updates (one pass; a chunk
/// row whose f32 sum is not finite is redone in f64).
pub(crate) fn sq_norms(round: &ValidUpdates<'_>, members: &[usize]) -> Result<Vec<f64>> {
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

/// [`sq_distances`] in place, for callers that no longer need the Gram
/// matrix (Krum at m = 10,000 then holds one m × m matrix, not two).
pub(crate) fn into_sq_distances(mut gram: Square) -> Square {
    let diag: Vec<f64> = gram.diagonal().collect();
    for (i, (row, di)) in gram.rows_mut().zip(&diag).enumerate() {
        for (j, (g, dj)) in row.iter_mut().zip(&diag).enumerate() {
            *g = if i == j {
                0.0
            } else {
                (di + dj - 2.0 * *g).max(0.0)
            };
        }
    }
    gram
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Accumulators held at once: at most one m × m per part, and the parts'
    /// accumulators together within the budget unless a single one is
    /// larger (then there is exactly one, whatever the thread count).
    #[test]
    fn gram_parts_bound_the_accumulators() {
        for (m, d, tensors) in [
            (20usize, 3_407_872usize, 256usize),
            (100, 851_968, 64),
            (300, 1024, 64),
            (1000, 1_000_000, 64),
            (10_000, 1024, 64),
            (10_000, 1024, 2),
        ] {
            let pieces = (0..tensors).flat_map(|_| {
                let per = d / tensors;
                (0..per.div_ceil(PANEL)).map(move |k| (PANEL.min(per - k * PANEL), ()))
            });
            let panels = panels(pieces);
            let values: usize = panels.iter().flatten().map(|(l, _)| l).sum();
            assert_eq!(values, d);
            let plan = plan(m, panels.len(), values);
            let acc = m * m * 8;
            assert!(plan.parts * plan.group_len >= panels.len());
            assert!(
                plan.parts * acc <= acc.max(ACC_BUDGET),
                "m = {m}: {} parts of {acc} bytes",
                plan.parts
            );
            if acc > ACC_BUDGET {
                assert_eq!(plan.parts, 1, "m = {m}");
                assert!(
                    plan.split_tiles,
                    "m = {m}: one part, so the tiles are split"
                );
            }
        }
        // The bench round keeps its coordinate parallelism.
        let plan = plan(20, 6656, 3_407_872);
        assert_eq!(plan.parts, 64);
        assert!(!plan.split_tiles);
    }

    /// Rows written straight into panels (no round): the driver's Gram
    /// against f64 on 1 and 3 threads, with rows split across threads (one
    /// part, m = 70) and not (m = 9), with a huge row (f32 products
    /// overflow), a row whose f32 values are infinite (exact values given in
    /// f64) and a tiny row (f32 squares underflow).
    #[test]
    fn gram_of_matches_f64_and_is_thread_independent() {
        // m = 9 over two panels: two parts. m = 70 over one panel: one part,
        // its rows split across threads.
        for (m, len) in [(9usize, 700usize), (70, 400)] {
            let split = plan(m, len.div_ceil(PANEL), len).split_tiles;
            assert_eq!(split, m == 70);
            let mut rows: Vec<Vec<f64>> = (0..m)
                .map(|i| {
                    (0..len)
                        .map(|k| (((i * 31 + k * 17) % 97) as f64 - 48.0) / 48.0)
                        .collect()
                })
                .collect();
            rows[1].iter_mut().for_each(|v| *v *= 1e20);
            rows[2].iter_mut().for_each(|v| *v *= 1e39); // not an f32
            rows[3] = rows[4].iter().map(|v| v * 1e-20).collect();
            let pieces: Vec<(usize, usize)> = (0..len)
                .step_by(PANEL)
                .map(|start| ((len - start).min(PANEL), start))
                .collect();
            let run = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        gram_of(
                            m,
                            panels(pieces.clone()),
                            true,
                            || (),
                            |_, start, w| {
                                let n = (len - start).min(PANEL);
                                for (i, row) in rows.iter().enumerate() {
                                    let piece = &row[start..start + n];
                                    let out = w.row(i).unwrap();
                                    for (o, v) in out.iter_mut().zip(piece) {
                                        *o = *v as f32;
                                    }
                                    let finite = out.iter().all(|v| v.is_finite());
                                    w.settle(i, finite, |e| e.copy_from_slice(piece));
                                }
                                Ok(())
                            },
                        )
                        .unwrap()
                    })
            };
            let one = run(1);
            assert_eq!(one.as_slice(), run(3).as_slice(), "m = {m}");
            for i in 0..m {
                for j in 0..m {
                    let exact: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
                    let got = one.get(i, j);
                    let scale = (one.get(i, i) * one.get(j, j))
                        .sqrt()
                        .max(f64::MIN_POSITIVE);
                    assert!(
                        got.is_finite() && ((got - exact) / scale).abs() < 1e-5,
                        "m = {m} ({i},{j}): {got} vs {exact}"
                    );
                }
            }
            // The tiny copy of row 4 keeps its cosine.
            let cos = one.get(3, 4) / (one.get(3, 3) * one.get(4, 4)).sqrt();
            assert!((cos - 1.0).abs() < 1e-6, "m = {m}: cosine {cos}");
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
}
