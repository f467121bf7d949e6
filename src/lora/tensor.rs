//! In-memory tensors: LoRA matrices as `f32`, everything else as raw bytes.

use safetensors::Dtype;

use crate::error::{Error, Result};

/// One LoRA factor in PEFT orientation (`lora_A` `[r, in]`, `lora_B` `[out, r]`),
/// row-major `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensor {
    shape: [usize; 2],
    data: Vec<f32>,
}

impl LoraTensor {
    /// Builds a tensor, checking that `data` holds `rows × cols` values.
    ///
    /// `name` only labels the error.
    ///
    /// ```
    /// use safe_fedllm::lora::LoraTensor;
    /// let t = LoraTensor::new("demo", [2, 3], vec![0.0; 6])?;
    /// assert_eq!(t.shape(), [2, 3]);
    /// assert!(LoraTensor::new("demo", [2, 3], vec![0.0; 5]).is_err());
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn new(name: &str, shape: [usize; 2], data: Vec<f32>) -> Result<Self> {
        let expected = element_count(name, &shape)?;
        if expected != data.len() {
            return Err(Error::DataLength {
                tensor: name.to_owned(),
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(LoraTensor { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(name: &str, shape: [usize; 2]) -> Result<Self> {
        let n = element_count(name, &shape)?;
        Ok(LoraTensor {
            shape,
            data: vec![0.0; n],
        })
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True for a tensor with no values (a zero dimension).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row-major values.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Row-major values, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor, returning its row-major values.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// The PEFT ↔ burn orientation flip: burn stores `lora_A` as `[in, r]` and
    /// `lora_B` as `[r, out]`, the transposes of PEFT's. Applying it twice is the
    /// identity.
    pub fn transposed(&self) -> LoraTensor {
        let [rows, cols] = self.shape;
        let mut data = vec![0.0; self.data.len()];
        for (r, row) in self.data.chunks_exact(cols.max(1)).enumerate().take(rows) {
            for (c, &v) in row.iter().enumerate() {
                if let Some(slot) = data.get_mut(c * rows + r) {
                    *slot = v;
                }
            }
        }
        LoraTensor {
            shape: [cols, rows],
            data,
        }
    }

    /// The first non-finite value as `(flat index, value)`, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        first_non_finite(&self.data)
    }
}

/// A tensor that is not a LoRA `A`/`B` matrix (bias, DoRA magnitude,
/// `modules_to_save` weights…), kept byte-for-byte so it survives a round trip.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtraTensor {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) bytes: Vec<u8>,
}

impl ExtraTensor {
    /// The stored dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Element count of a shape, as a typed error on overflow.
pub(crate) fn element_count(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::DataLength {
            tensor: name.to_owned(),
            shape: shape.to_vec(),
            expected: usize::MAX,
            found: 0,
        })
}

/// True when every value is finite. `v · 0` is ±0 for a finite value and NaN
/// for ±∞ or NaN; summed in 16 independent lanes it compiles to packed
/// subtracts and adds even on the baseline x86-64 target (SSE2), where
/// `fold(ok & v.is_finite())` stayed scalar at about two instructions a value
/// and made every NaN scan of a round cost more than reading it.
pub(crate) fn all_finite(values: &[f32]) -> bool {
    let mut lanes = [0.0f32; 16];
    let (blocks, tail) = values.as_chunks::<16>();
    for block in blocks {
        for (lane, v) in lanes.iter_mut().zip(block) {
            *lane += v * 0.0;
        }
    }
    let tail_sum: f32 = tail.iter().map(|v| v * 0.0).sum();
    lanes.iter().sum::<f32>() + tail_sum == 0.0
}

/// First non-finite value in a slice, as `(index, value)`.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    // Checking a whole block with a branch-free fold first keeps the common
    // all-finite case vectorised; only a dirty block is scanned element-wise.
    const BLOCK: usize = 1024;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        if !all_finite(block) {
            let (i, v) = block.iter().enumerate().find(|(_, v)| !v.is_finite())?;
            return Some((b * BLOCK + i, *v));
        }
    }
    None
}

#[cfg(test)]
mod finite_tests {
    use super::{all_finite, first_non_finite};

    #[test]
    fn all_finite_agrees_with_is_finite_at_every_position_and_value() {
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN];
        let fine = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE / 2.0, -0.0, 0.0, 1.0];
        for len in [0usize, 1, 15, 16, 17, 33, 1030] {
            let base: Vec<f32> = (0..len).map(|i| fine[i % fine.len()]).collect();
            assert!(all_finite(&base), "len {len}");
            assert_eq!(first_non_finite(&base), None);
            for pos in [0, len / 2, len.saturating_sub(1)] {
                for bad in specials {
                    if len == 0 {
                        continue;
                    }
                    let mut v = base.clone();
                    v[pos] = bad;
                    assert!(!all_finite(&v), "len {len}, pos {pos}, {bad}");
                    assert_eq!(first_non_finite(&v).map(|(i, _)| i), Some(pos));
                }
            }
        }
    }
}
