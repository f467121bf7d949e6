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
mod refused;
mod round;
mod source;
mod spec;

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
    m.add_function(wrap_pyfunction!(spec::check_spec, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// Sizes the thread pool all of safe_fedllm's parallel work runs on (rayon's
/// global pool) to `n` threads. Call it once, before the first aggregation,
/// admission or probe call; without it the pool has `RAYON_NUM_THREADS`
/// threads, else one per core. Raises `InvalidParameterError` for `n = 0`
/// and `ThreadPoolError` when the pool already runs.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(errors::raise(
            "InvalidParameterError",
            "num_threads must be at least 1".to_owned(),
            |d| {
                d.set_item("kind", "invalid_parameter")?;
                d.set_item("name", "num_threads")?;
                d.set_item("value", n)?;
                d.set_item("expected", ">= 1")
            },
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| {
            errors::raise(
                "ThreadPoolError",
                format!("cannot size the thread pool to {n}: {e}"),
                |d| d.set_item("kind", "thread_pool"),
            )
        })
}
