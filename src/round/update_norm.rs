//! ‖update − global‖₂ of one client's update, in f64, with the finiteness
//! check riding on the same pass: admission reads every value once.

use crate::error::Result;
use crate::lora::{LoraAdapter, TensorSource};
use crate::round::admission::Rejection;

/// Values read per step when a source has no `f32` slices.
const READ_CHUNK: usize = 16_384;

/// ‖update − global‖₂ in f64, scanning every value for NaN/∞ in the same
/// pass. The inner `Err` is a non-finite value; the outer one a read failure.
pub(super) fn delta_norm(
    global: &LoraAdapter,
    update: &dyn TensorSource,
) -> Result<std::result::Result<f64, Rejection>> {
    let mut sum = 0.0f64;
    let mut scratch = Vec::new();
    for entry in global.iter() {
        let name = entry.key.canonical();
        let base = entry.tensor.as_slice();
        if let Some(values) = update.as_f32(name).filter(|v| v.len() == base.len()) {
            match squared_distance(values, base, 0) {
                Ok(s) => sum += s,
                Err((index, value)) => return Ok(Err(non_finite(name, index, value))),
            }
            continue;
        }
        for (piece, start) in base.chunks(READ_CHUNK).zip((0..).step_by(READ_CHUNK)) {
            scratch.resize(piece.len(), 0.0);
            update.read_range(name, start, &mut scratch)?;
            match squared_distance(&scratch, piece, start) {
                Ok(s) => sum += s,
                Err((index, value)) => return Ok(Err(non_finite(name, index, value))),
            }
        }
    }
    Ok(Ok(sum.sqrt()))
}

/// Σ (x − y)² in f64 over a slice, or the first non-finite `x` (index offset
/// by `start`). Lanes of eight keep the loop vectorised; the finiteness test
/// rides along on the same values.
fn squared_distance(
    values: &[f32],
    base: &[f32],
    start: usize,
) -> std::result::Result<f64, (usize, f32)> {
    let mut lanes = [0.0f64; 8];
    let mut finite = true;
    let mut xs = values.chunks_exact(8);
    let mut ys = base.chunks_exact(8);
    for (x, y) in (&mut xs).zip(&mut ys) {
        for ((lane, a), b) in lanes.iter_mut().zip(x).zip(y) {
            finite &= a.is_finite();
            let d = f64::from(*a) - f64::from(*b);
            *lane += d * d;
        }
    }
    for (a, b) in xs.remainder().iter().zip(ys.remainder()) {
        finite &= a.is_finite();
        let d = f64::from(*a) - f64::from(*b);
        lanes[0] += d * d;
    }
    if finite {
        return Ok(lanes.iter().sum());
    }
    let (index, value) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .map_or((0, f32::NAN), |(i, v)| (i, *v));
    Err((start + index, value))
}

fn non_finite(tensor: &str, index: usize, value: f32) -> Rejection {
    Rejection::NonFinite {
        tensor: tensor.to_owned(),
        index,
        value: value.to_string(),
    }
}
