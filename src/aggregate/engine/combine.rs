//! Weighted sums of the clients' values (every averaging rule's last pass).

use crate::aggregate::round::Round;
use crate::error::Result;

use super::chunk::ChunkRef;
use super::drive::{Mapped, map_in_chunks};
use super::{STREAM_CHUNK, all_finite, saturate};

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
