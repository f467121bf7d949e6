//! Python bindings of `safe-fedllm` (the `safe_fedllm._native` extension).
//!
//! A thin layer: one Rust function per Python entry point, little logic.
//! numpy float32 arrays reach the core without copying ([`source`]), heavy
//! work runs with the GIL released, and crate errors become typed Python
//! exceptions that keep their fields ([`errors`]).
#![deny(missing_docs)]

use pyo3::prelude::*;

mod adapter;
mod aggregate;
mod detect;
mod errors;
mod json;
mod probe;
mod round;
mod source;

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<adapter::Adapter>()?;
    m.add_function(wrap_pyfunction!(adapter::delta, m)?)?;
    m.add_function(wrap_pyfunction!(adapter::canonical_key, m)?)?;
    m.add_class::<probe::FeatureSpec>()?;
    m.add_class::<probe::Probe>()?;
    m.add_class::<detect::Detector>()?;
    m.add_class::<aggregate::Aggregator>()?;
    m.add_class::<round::DefendedRound>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
