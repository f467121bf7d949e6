//! Gram matrices, norms and distances of the clients' updates.

use crate::aggregate::linalg::Square;
use crate::aggregate::round::Round;
use crate::error::{Error, Result};

use super::all_finite;
use super::chunk::ChunkRef;
use super::drive::fold;

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

pub(crate) use crate::aggregate::simd::gram_chunk;

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

#[cfg(test)]
mod tests {
    use super::*;
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
