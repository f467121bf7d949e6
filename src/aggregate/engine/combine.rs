//! Weighted sums of the clients' values (every averaging rule's last pass).

use crate::aggregate::updates::ValidUpdates;
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
    round: &ValidUpdates<'_>,
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

/// [`combine`]'s f32 pass over one chunk: see [`simd::weighted_sum`](crate::aggregate::simd::weighted_sum).
fn combine_f32(chunk: &ChunkRef<'_>, coefs: &[f32], g_coef: f32, out: &mut [f32]) {
    let global = (g_coef != 0.0).then_some(chunk.global);
    crate::aggregate::simd::weighted_sum(&chunk.rows, coefs, global.map(|g| (g, g_coef)), out);
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
