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
pub trait TensorSource {
    /// The parsed keys, in sorted canonical order.
    fn lora_keys(&self) -> impl Iterator<Item = &LoraKey>;

    /// The `[rows, cols]` of a tensor, `None` when absent.
    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]>;

    /// Writes a tensor's row-major values into `out`, whose length must be
    /// the tensor's element count.
    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()>;
}

impl TensorSource for LoraAdapter {
    fn lora_keys(&self) -> impl Iterator<Item = &LoraKey> {
        self.iter().map(|e| &e.key)
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.get(canonical).map(|t| t.shape())
    }

    fn copy_into(&self, canonical: &str, out: &mut [f32]) -> Result<()> {
        let tensor = self.get(canonical).ok_or_else(|| Error::MissingKey {
            tensor: canonical.to_owned(),
            present_in: "requested",
            missing_from: "source",
        })?;
        let values = tensor.as_slice();
        if values.len() != out.len() {
            return Err(Error::DataLength {
                tensor: canonical.to_owned(),
                shape: tensor.shape().to_vec(),
                expected: out.len(),
                found: values.len(),
            });
        }
        out.copy_from_slice(values);
        Ok(())
    }
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
}
