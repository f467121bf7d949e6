//! LoRA adapters in PEFT orientation: names, tensors, safetensors I/O, deltas.
//!
//! Orientation is PEFT's throughout: `lora_A` is `[r, in]`, `lora_B` is
//! `[out, r]`, ΔW = (α/r)·B·A. Tensor libraries that store the transposes
//! (burn: `a` = `lora_A`ᵀ, `b` = `lora_B`ᵀ) convert at the boundary with
//! [`LoraTensor::transposed`].

mod adapter;
mod codec;
mod delta;
mod io;
mod key;
mod source;
pub(crate) mod tensor;

pub use adapter::{LoraAdapter, LoraConfig, LoraEntry};
pub use delta::{DeltaReport, KeyPolicy, LazyDelta, LoraDelta};
pub use io::{AdapterView, ReadLimits, StorageDtype, read_file};
pub use key::{Factor, LoraKey, LoraKind};
pub use source::{TensorSource, checked_range, element_count};
pub use tensor::{ExtraTensor, LoraTensor};
