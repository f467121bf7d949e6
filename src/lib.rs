#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod aggregate;
pub mod attack;
mod client;
pub mod detect;
pub mod error;
pub mod features;
pub mod interop;
pub mod lora;
mod parallel;
pub mod probe;
#[doc(hidden)]
pub mod rng;
pub mod round;

pub use client::ClientId;
pub use error::{Error, Result};

/// The crate's traits, for `use safe_fedllm::prelude::*`.
pub mod prelude {
    pub use crate::aggregate::Aggregator;
    pub use crate::detect::Detector;
    pub use crate::lora::TensorSource;
    pub use crate::probe::Probe;
}
