//! [`TensorSource`]: anything that can hand out named LoRA matrices as `f32`.
//!
//! Deltas and features are written against this small trait rather than a
//! concrete type, so they work the same on an owned [`LoraAdapter`], a
//! zero-copy [`AdapterView`](crate::lora::AdapterView) over safetensors bytes,
//! a lazy update − base difference, or a tensor library's own storage.

use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::key::LoraKey;

/// Named LoRA matrices (PEFT orientation) that can be copied out as `f32`.
///
/// `Sync` because feature extraction reads large sources from several threads.
pub trait TensorSource: Sync {
    /// The parsed keys, in sorted canonical order.
    fn lora_keys(&self) -> impl Iterator<Item = &LoraKey>;

    /// The `[rows, cols]` of a tensor, `None` when absent.
    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]>;

    /// Writes a tensor's row-major values into `out`, whose length must be
    /// the tensor's element count.
    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()>;

    /// Subtracts a tensor's values from `out` (`out -= self[canonical]`).
    ///
    /// The default copies into a scratch buffer first; sources that hold `f32`
    /// in memory override it to subtract in place, which keeps
    /// update − base a single pass with no allocation.
    fn subtract_from(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        let mut scratch = vec![0.0f32; out.len()];
        self.copy_into(canonical, &mut scratch)?;
        out.iter_mut().zip(&scratch).for_each(|(o, s)| *o -= s);
        Ok(())
    }
}

impl TensorSource for LoraAdapter {
    fn lora_keys(&self) -> impl Iterator<Item = &LoraKey> {
        self.iter().map(|e| &e.key)
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.get(canonical).map(|t| t.shape())
    }

    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(matching_slice(self, canonical, out.len())?);
        Ok(())
    }

    fn subtract_from(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        let values = matching_slice(self, canonical, out.len())?;
        out.iter_mut().zip(values).for_each(|(o, v)| *o -= v);
        Ok(())
    }
}

/// The tensor's values, checked to be `len` long.
fn matching_slice<'a>(adapter: &'a LoraAdapter, canonical: &str, len: usize) -> Result<&'a [f32]> {
    let tensor = adapter.get(canonical).ok_or_else(|| Error::MissingKey {
        tensor: canonical.to_owned(),
        present_in: "requested",
        missing_from: "source",
    })?;
    let values = tensor.as_slice();
    if values.len() != len {
        return Err(Error::DataLength {
            tensor: canonical.to_owned(),
            shape: tensor.shape().to_vec(),
            expected: len,
            found: values.len(),
        });
    }
    Ok(values)
}

impl<T: TensorSource> TensorSource for &T {
    fn lora_keys(&self) -> impl Iterator<Item = &LoraKey> {
        (**self).lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        (**self).shape_of(canonical)
    }

    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        (**self).copy_into(canonical, out)
    }

    fn subtract_from(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        (**self).subtract_from(canonical, out)
    }
}
