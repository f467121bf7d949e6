//! [`TensorSource`](crate::lora::TensorSource) for the tensor holders of other
//! libraries, in both directions: read a library's LoRA tensors as a
//! PEFT-orientation update, and write an aggregated
//! [`LoraAdapter`](crate::lora::LoraAdapter) back into them.
//!
//! Each library sits behind its own cargo feature, off by default, so a server
//! that only reads safetensors uploads compiles neither:
//!
//! | feature | module | holders |
//! |---|---|---|
//! | `burn` | `interop::burn` | any burn 0.22 module carrying LoRA (`apply_lora`), via burn-store `collect` / `apply` |
//! | `candle` | `interop::candle` | named candle-core 0.11 `Tensor`s or `Var`s (f32, f16, bf16) |
//!
//! Conversions are exact: f16/bf16 widen to f32 without rounding, and an f32
//! value that came from f16/bf16 narrows back to the same bits, so a round
//! trip library → `TensorSource` → `LoraAdapter` → library reproduces every
//! bit. Names, shapes and dtypes are checked before anything is written: a
//! missing, extra, renamed or wrongly shaped tensor is a typed
//! [`Error`](crate::Error) naming it, and the library side is left unchanged.

#[cfg(feature = "burn")]
#[cfg_attr(docsrs, doc(cfg(feature = "burn")))]
pub mod burn;

#[cfg(feature = "candle")]
#[cfg_attr(docsrs, doc(cfg(feature = "candle")))]
pub mod candle;
