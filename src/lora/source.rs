//! [`TensorSource`]: anything that can hand out named LoRA matrices as `f32`.
//!
//! Everything downstream of the parser — deltas, probe features, the trail
//! check, admission and every aggregation rule — reads updates through this
//! one small, object-safe trait rather than a concrete type. So an upload can go
//! bytes (or an mmap) → validated [`AdapterView`](crate::lora::AdapterView) →
//! probe → detector → aggregator without first becoming an owned `f32`
//! adapter, and any tensor holder (an owned [`LoraAdapter`], a lazy
//! update − base difference, a burn module, a candle `VarMap`, numpy arrays
//! behind Python) plugs in by implementing four methods.
//!
//! A source that stores `f32` in native order returns its slices from
//! [`TensorSource::as_f32`], and readers use them without copying; any other
//! source (bf16/f16 bytes, a device tensor) is read a range at a time with
//! [`TensorSource::read_range`], so a reader converts one cache-sized chunk
//! at a time and never holds a whole converted update.
//!
//! ```
//! use safe_fedllm::lora::{LoraKey, TensorSource};
//! use safe_fedllm::Result;
//!
//! /// One q_proj lora_B matrix held as f64 by some other library.
//! struct Outside { key: LoraKey, values: Vec<f64> }
//!
//! impl TensorSource for Outside {
//!     fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
//!         Box::new(std::iter::once(&self.key))
//!     }
//!     fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
//!         (canonical == self.key.canonical()).then_some([2, 1])
//!     }
//!     fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
//!         let values = safe_fedllm::lora::checked_range(self, canonical, offset, out.len())
//!             .map(|range| &self.values[range])?;
//!         out.iter_mut().zip(values).for_each(|(o, v)| *o = *v as f32);
//!         Ok(())
//!     }
//! }
//!
//! let key = LoraKey::parse("model.layers.0.self_attn.q_proj.lora_B.weight").expect("a LoRA key");
//! let outside = Outside { key, values: vec![0.5, -1.5] };
//! let source: &dyn TensorSource = &outside;          // object-safe
//! let mut out = [0.0f32; 2];
//! source.copy_into(outside.key.canonical(), &mut out)?;
//! assert_eq!(out, [0.5, -1.5]);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use std::ops::Range;

use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::key::LoraKey;

/// Named LoRA matrices (PEFT orientation) that can be read as `f32`.
///
/// Object-safe (`&dyn TensorSource` works everywhere a source is taken) and
/// `Sync`, because feature extraction and aggregation read large sources from
/// several threads.
pub trait TensorSource: Sync {
    /// The parsed keys, in sorted canonical order.
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_>;

    /// The `[rows, cols]` of a tensor, `None` when absent.
    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]>;

    /// Writes the row-major values `offset .. offset + out.len()` of a tensor
    /// into `out`. Fails with a typed error when the tensor is absent or the
    /// range does not lie inside it (see [`checked_range`]).
    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()>;

    /// The tensor's values when the source holds them as native `f32`
    /// (zero-copy readers use this); `None` otherwise, or when absent.
    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        let _ = canonical;
        None
    }

    /// Writes a whole tensor into `out`, whose length must be the tensor's
    /// element count.
    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        let expected = element_count(self, canonical)?;
        if out.len() != expected {
            return Err(length_error(self, canonical, expected, out.len()));
        }
        self.read_range(canonical, 0, out)
    }

    /// Subtracts a tensor's values from `out` (`out -= self[canonical]`).
    ///
    /// In place for sources that expose `f32` slices; otherwise through a
    /// bounded scratch buffer, one chunk at a time.
    fn subtract_from(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        let expected = element_count(self, canonical)?;
        if out.len() != expected {
            return Err(length_error(self, canonical, expected, out.len()));
        }
        if let Some(values) = self.as_f32(canonical) {
            out.iter_mut().zip(values).for_each(|(o, v)| *o -= v);
            return Ok(());
        }
        let mut scratch = vec![0.0f32; SCRATCH.min(out.len())];
        for (index, piece) in out.chunks_mut(SCRATCH).enumerate() {
            // Every piece but the last is SCRATCH long and the last is
            // shorter: truncating keeps the scratch exactly one piece long.
            scratch.truncate(piece.len());
            self.read_range(canonical, index * SCRATCH, &mut scratch)?;
            piece
                .iter_mut()
                .zip(scratch.iter())
                .for_each(|(o, s)| *o -= s);
        }
        Ok(())
    }
}

/// Values converted per step by the default [`TensorSource::subtract_from`].
const SCRATCH: usize = 16_384;

/// The tensor's element count, or a typed error when it is absent or its
/// shape overflows `usize`.
pub fn element_count<S: TensorSource + ?Sized>(source: &S, canonical: &str) -> Result<usize> {
    let [rows, cols] = source
        .shape_of(canonical)
        .ok_or_else(|| absent(canonical))?;
    rows.checked_mul(cols).ok_or_else(|| Error::DataLength {
        tensor: canonical.to_owned(),
        shape: vec![rows, cols],
        expected: usize::MAX,
        found: 0,
    })
}

/// Validates a [`TensorSource::read_range`] request against the tensor's
/// shape and returns the element range, so implementations index with a range
/// already known to be inside the tensor.
pub fn checked_range<S: TensorSource + ?Sized>(
    source: &S,
    canonical: &str,
    offset: usize,
    len: usize,
) -> Result<Range<usize>> {
    let total = element_count(source, canonical)?;
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(offset..end),
        _ => Err(Error::DataLength {
            tensor: canonical.to_owned(),
            // An absent shape is reported as the empty shape.
            shape: source
                .shape_of(canonical)
                .map(|s| s.to_vec())
                .unwrap_or_default(),
            expected: total,
            found: offset.saturating_add(len),
        }),
    }
}

fn absent(canonical: &str) -> Error {
    Error::MissingKey {
        tensor: canonical.to_owned(),
        present_in: "the requested keys",
        missing_from: "the source",
    }
}

fn length_error<S: TensorSource + ?Sized>(
    source: &S,
    canonical: &str,
    expected: usize,
    found: usize,
) -> Error {
    Error::DataLength {
        tensor: canonical.to_owned(),
        // An absent shape is reported as the empty shape.
        shape: source
            .shape_of(canonical)
            .map(|s| s.to_vec())
            .unwrap_or_default(),
        expected,
        found,
    }
}

impl TensorSource for LoraAdapter {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.iter().map(|e| &e.key))
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.get(canonical).map(|t| t.shape())
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        let range = checked_range(self, canonical, offset, out.len())?;
        let values = self.as_f32(canonical).ok_or_else(|| absent(canonical))?;
        let part = values.get(range).ok_or_else(|| {
            length_error(
                self,
                canonical,
                values.len(),
                offset.saturating_add(out.len()),
            )
        })?;
        out.copy_from_slice(part);
        Ok(())
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        self.get(canonical).map(|t| t.as_slice())
    }
}

impl<T: TensorSource + ?Sized> TensorSource for &T {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        (**self).lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        (**self).shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        (**self).read_range(canonical, offset, out)
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        (**self).as_f32(canonical)
    }

    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        (**self).copy_into(canonical, out)
    }

    fn subtract_from(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        (**self).subtract_from(canonical, out)
    }
}

impl<T: TensorSource + ?Sized + Send> TensorSource for Box<T> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        (**self).lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        (**self).shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        (**self).read_range(canonical, offset, out)
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        (**self).as_f32(canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraTensor;

    fn adapter() -> LoraAdapter {
        let mut a = LoraAdapter::new();
        let key = "m.layers.0.q.lora_B.weight";
        let tensor = LoraTensor::new(key, [2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        a.insert(key, tensor.expect("valid tensor"))
            .expect("valid key");
        a
    }

    #[test]
    fn read_range_reads_the_requested_values() {
        let a = adapter();
        let mut out = [0.0f32; 2];
        a.read_range("m.layers.0.q.lora_B.weight", 3, &mut out)
            .expect("in range");
        assert_eq!(out, [4.0, 5.0]);
    }

    #[test]
    fn read_range_past_the_end_is_a_typed_error() {
        let a = adapter();
        let mut out = [0.0f32; 2];
        let err = a.read_range("m.layers.0.q.lora_B.weight", 5, &mut out);
        assert!(matches!(
            err,
            Err(Error::DataLength {
                expected: 6,
                found: 7,
                ..
            })
        ));
        let err = a.read_range("m.layers.0.q.lora_B.weight", usize::MAX, &mut out);
        assert!(matches!(err, Err(Error::DataLength { .. })));
    }

    #[test]
    fn dyn_sources_work_through_references_and_boxes() {
        let a = adapter();
        let boxed: Box<dyn TensorSource + Send> = Box::new(a.clone());
        let by_ref: &dyn TensorSource = &a;
        let mut x = [0.0f32; 6];
        let mut y = [0.0f32; 6];
        boxed
            .copy_into("m.layers.0.q.lora_B.weight", &mut x)
            .expect("copy");
        by_ref
            .subtract_from("m.layers.0.q.lora_B.weight", &mut y)
            .expect("subtract");
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(y, [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
    }
}
