//! Element encodings: little-endian `F32`/`F16`/`BF16` bytes to and from
//! `f32`, one pass each way.
//!
//! Decoding widens, so it cannot fail once the byte count matches. Encoding
//! narrows, so it refuses a finite value the target dtype would turn into ±∞.

use half::{bf16, f16};
use safetensors::Dtype;

use crate::error::{Error, Result};

/// Floating-point format used when saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageDtype {
    /// 32-bit IEEE float (lossless).
    #[default]
    F32,
    /// 16-bit IEEE half (round to nearest even).
    F16,
    /// bfloat16 (round to nearest even).
    Bf16,
}

impl StorageDtype {
    pub(crate) fn dtype(self) -> Dtype {
        match self {
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::F16 => Dtype::F16,
            StorageDtype::Bf16 => Dtype::BF16,
        }
    }
}

/// Bytes per element of the supported storage dtypes.
pub(crate) fn dtype_width(name: &str, dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        other => Err(Error::UnsupportedDtype {
            tensor: name.to_owned(),
            dtype: other.to_string(),
            supported: "F32, F16 or BF16",
        }),
    }
}

/// Converts little-endian `F32`/`F16`/`BF16` bytes into `out`, one pass.
pub(crate) fn decode_into(name: &str, dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let width = dtype_width(name, dtype)?;
    if bytes.len() != out.len() * width {
        return Err(Error::DataLength {
            tensor: name.to_owned(),
            shape: vec![out.len()],
            expected: out.len(),
            found: bytes.len() / width,
        });
    }
    match dtype {
        Dtype::F32 => decode_f32(bytes, out),
        Dtype::F16 => decode_f16(bytes, out),
        _ => decode_bf16(bytes, out),
    }
    Ok(())
}

fn decode_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        if let &[a, b, c, d] = c {
            *o = f32::from_le_bytes([a, b, c, d]);
        }
    }
}

fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    // bf16 is the top half of an f32: widening is a 16-bit shift.
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        if let &[a, b] = c {
            *o = f32::from_bits(u32::from(u16::from_le_bytes([a, b])) << 16);
        }
    }
}

fn decode_f16(bytes: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        if let &[a, b] = c {
            *o = f16::from_bits(u16::from_le_bytes([a, b])).to_f32();
        }
    }
}

/// Encodes `values` little-endian in `dtype`, refusing a finite value that
/// the narrower dtypes would round to ±∞: the written file would otherwise
/// hold an infinity that every later read (as a global) rejects.
///
/// Non-finite inputs are passed through as they are: whether a tensor may hold
/// them is the caller's check, not the encoder's.
pub(crate) fn encode(name: &str, values: &[f32], dtype: StorageDtype) -> Result<Vec<u8>> {
    match dtype {
        StorageDtype::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        StorageDtype::F16 => encode_narrow(name, values, "F16", |v| {
            let h = f16::from_f32(v);
            (h.to_le_bytes(), h.is_infinite())
        }),
        StorageDtype::Bf16 => encode_narrow(name, values, "BF16", |v| {
            let h = bf16::from_f32(v);
            (h.to_le_bytes(), h.is_infinite())
        }),
    }
}

/// One pass over `values` with a 16-bit `convert` returning the bytes and
/// whether the result is infinite.
fn encode_narrow(
    name: &str,
    values: &[f32],
    dtype: &'static str,
    convert: impl Fn(f32) -> ([u8; 2], bool),
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len().saturating_mul(2));
    for (index, &value) in values.iter().enumerate() {
        let (bytes, infinite) = convert(value);
        if infinite && value.is_finite() {
            return Err(Error::StorageOverflow {
                tensor: name.to_owned(),
                index,
                value,
                dtype,
            });
        }
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}
