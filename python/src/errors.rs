//! Rust errors → typed Python exceptions that keep their fields.
//!
//! The exception classes are defined in Python (`safe_fedllm/errors.py`) so
//! they can inherit from both `SafeFedLLMError` and the builtin a Python user
//! expects (`TypeError` for a wrong dtype, `ValueError` for a bad value,
//! `OSError` for I/O). This module only picks the class and fills the fields.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::Error;

/// Raises `safe_fedllm.errors.<class>(message, kind=..., **fields)`.
pub fn raise(
    class: &str,
    message: String,
    fill: impl FnOnce(&Bound<'_, PyDict>) -> PyResult<()>,
) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let module = py.import("safe_fedllm.errors")?;
            let cls = module.getattr(class)?;
            let kwargs = PyDict::new(py);
            fill(&kwargs)?;
            let value = cls.call((message.clone(),), Some(&kwargs))?;
            Ok(PyErr::from_value(value))
        };
        build().unwrap_or_else(|e| {
            PyRuntimeError::new_err(format!("{message} (and raising it failed: {e})"))
        })
    })
}

/// Converts a crate error (looking through file wrappers, whose path is kept
/// as the `path` attribute).
pub fn to_py(err: Error) -> PyErr {
    let path = match &err {
        Error::InFile { path, .. } => Some(path.display().to_string()),
        Error::Io { path, .. } => Some(path.display().to_string()),
        _ => None,
    };
    let message = err.to_string();
    // A client's unreadable source: the inner error decides the class, the
    // client is kept as a field.
    let (client, root) = match err.root() {
        Error::ClientSource { client, source } => (Some(client.clone()), source.root()),
        other => (None, other),
    };
    let (class, kind) = classify(root);
    raise(class, message, |d| {
        d.set_item("kind", kind)?;
        if let Some(p) = &path {
            d.set_item("path", p)?;
        }
        fields(root, d)?;
        if let Some(c) = &client {
            d.set_item("client", c)?;
        }
        Ok(())
    })
}

/// Extension trait: `result.py()?` turns a crate error into its exception.
pub trait IntoPy<T> {
    /// Maps the error.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for safe_fedllm::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

fn classify(e: &Error) -> (&'static str, &'static str) {
    match e {
        Error::Io { .. } => ("SafeFedLLMIOError", "io"),
        Error::InFile { .. } => ("SafeFedLLMError", "in_file"),
        Error::InputTooLarge { .. } => ("FormatError", "input_too_large"),
        Error::HeaderTooLarge { .. } => ("FormatError", "header_too_large"),
        Error::Malformed(_) => ("FormatError", "malformed"),
        Error::UnsupportedDtype { .. } => ("DTypeError", "unsupported_dtype"),
        Error::NotAMatrix { .. } => ("ShapeMismatchError", "not_a_matrix"),
        Error::DataLength { .. } => ("ShapeMismatchError", "data_length"),
        Error::NotALoraKey { .. } => ("KeyFormatError", "not_a_lora_key"),
        Error::DuplicateKey { .. } => ("KeyFormatError", "duplicate_key"),
        Error::MixedAdapters { .. } => ("KeyFormatError", "mixed_adapters"),
        Error::RankMismatch { .. } => ("ShapeMismatchError", "rank_mismatch"),
        Error::ShapeMismatch { .. } => ("ShapeMismatchError", "shape_mismatch"),
        Error::MissingKey { .. } => ("MissingKeyError", "missing_key"),
        Error::NonFinite { .. } => ("NonFiniteError", "non_finite"),
        Error::EmptySelection { .. } => ("InvalidParameterError", "empty_selection"),
        Error::Empty { .. } => ("EmptyInputError", "empty"),
        Error::InvalidMetadata { .. } => ("FormatError", "invalid_metadata"),
        Error::DimensionMismatch { .. } => ("ShapeMismatchError", "dimension_mismatch"),
        Error::InvalidDetectorParam { .. } => ("InvalidParameterError", "invalid_detector_param"),
        Error::InvalidEvidence { .. } => ("InvalidEvidenceError", "invalid_evidence"),
        Error::InvalidCheckpoint { .. } => ("CheckpointError", "invalid_checkpoint"),
        Error::InvalidParameter { .. } => ("InvalidParameterError", "invalid_parameter"),
        Error::MissingClass { .. } => ("TrainingError", "missing_class"),
        Error::LengthMismatch { .. } => ("ShapeMismatchError", "length_mismatch"),
        Error::NonFiniteFeature { .. } => ("NonFiniteError", "non_finite_feature"),
        Error::NumericalFailure { .. } => ("TrainingError", "numerical_failure"),
        Error::TrainerFailed { .. } => ("TrainingError", "trainer_failed"),
        Error::Manifest { .. } => ("FormatError", "manifest"),
        Error::InvalidAggregatorParam { .. } => {
            ("InvalidParameterError", "invalid_aggregator_param")
        }
        Error::TooFewClients { .. } => ("TooFewClientsError", "too_few_clients"),
        Error::DuplicateClient { .. } => ("DuplicateClientError", "duplicate_client"),
        Error::InvalidSecurityFactor { .. } => ("InvalidEvidenceError", "invalid_security_factor"),
        Error::ClientKeyMismatch { .. } => ("MissingKeyError", "client_key_mismatch"),
        Error::ClientShapeMismatch { .. } => ("ShapeMismatchError", "client_shape_mismatch"),
        Error::UnmappedTensor { .. } => ("KeyFormatError", "unmapped_tensor"),
        Error::InteropFailed { .. } => ("FormatError", "interop_failed"),
        Error::CalibrationFailed { .. } => ("TrainingError", "calibration_failed"),
        Error::ManifestSample { .. } => ("FormatError", "manifest_sample"),
        Error::AttackInput { .. } => ("ShapeMismatchError", "attack_input"),
        _ => ("SafeFedLLMError", "other"),
    }
}

fn fields(e: &Error, d: &Bound<'_, PyDict>) -> PyResult<()> {
    match e {
        Error::InputTooLarge { found, limit } => {
            d.set_item("found", found)?;
            d.set_item("limit", limit)?;
        }
        Error::HeaderTooLarge { declared, limit } => {
            d.set_item("found", declared)?;
            d.set_item("limit", limit)?;
        }
        Error::UnsupportedDtype { tensor, dtype } => {
            d.set_item("key", tensor)?;
            d.set_item("dtype", dtype)?;
        }
        Error::NotAMatrix { tensor, shape } => {
            d.set_item("key", tensor)?;
            d.set_item("found", shape.clone())?;
        }
        Error::DataLength {
            tensor,
            shape,
            expected,
            found,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("shape", shape.clone())?;
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::NotALoraKey { key } => d.set_item("key", key)?,
        Error::DuplicateKey {
            canonical,
            first,
            second,
        } => {
            d.set_item("key", canonical)?;
            d.set_item("first", first)?;
            d.set_item("second", second)?;
        }
        Error::MixedAdapters { first, second } => {
            d.set_item("first", first)?;
            d.set_item("second", second)?;
        }
        Error::RankMismatch {
            module,
            a_shape,
            b_shape,
            ..
        } => {
            d.set_item("key", module)?;
            d.set_item("expected", a_shape.to_vec())?;
            d.set_item("found", b_shape.to_vec())?;
        }
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("expected", expected.clone())?;
            d.set_item("found", found.clone())?;
        }
        Error::MissingKey {
            tensor,
            present_in,
            missing_from,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("present_in", present_in)?;
            d.set_item("missing_from", missing_from)?;
        }
        Error::NonFinite {
            tensor,
            index,
            value,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("index", index)?;
            d.set_item("value", value)?;
        }
        Error::EmptySelection { selection } => d.set_item("param", selection)?,
        Error::Empty { what } => d.set_item("what", what)?,
        Error::InvalidMetadata {
            field,
            value,
            reason,
        } => {
            d.set_item("param", field)?;
            d.set_item("value", value)?;
            d.set_item("reason", reason)?;
        }
        Error::DimensionMismatch {
            what,
            expected,
            found,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::InvalidDetectorParam {
            param,
            value,
            expected,
        }
        | Error::InvalidParameter {
            name: param,
            value,
            expected,
        } => {
            d.set_item("param", param)?;
            d.set_item("value", value)?;
            d.set_item("expected", expected)?;
        }
        Error::InvalidEvidence {
            client,
            round,
            reason,
        } => {
            d.set_item("client", client)?;
            d.set_item("round", round)?;
            d.set_item("reason", reason)?;
        }
        Error::InvalidCheckpoint { what, value } => {
            d.set_item("what", what)?;
            d.set_item("value", value)?;
        }
        Error::MissingClass { missing, samples } => {
            d.set_item("what", missing)?;
            d.set_item("found", samples)?;
        }
        Error::LengthMismatch {
            what,
            expected,
            found,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::NonFiniteFeature {
            what,
            row,
            column,
            value,
        } => {
            d.set_item("what", what)?;
            d.set_item("index", (row, column))?;
            d.set_item("value", value)?;
        }
        Error::NumericalFailure {
            solver,
            iteration,
            detail,
        } => {
            d.set_item("what", solver)?;
            d.set_item("index", iteration)?;
            d.set_item("reason", detail)?;
        }
        Error::TrainerFailed { trainer, reason } => {
            d.set_item("what", trainer)?;
            d.set_item("reason", reason)?;
        }
        Error::Manifest { line, reason } => {
            d.set_item("index", line)?;
            d.set_item("reason", reason)?;
        }
        Error::InvalidAggregatorParam {
            rule,
            param,
            value,
            expected,
        } => {
            d.set_item("rule", rule)?;
            d.set_item("param", param)?;
            d.set_item("value", value)?;
            d.set_item("expected", expected)?;
        }
        Error::TooFewClients {
            rule,
            constraint,
            required,
            found,
        } => {
            d.set_item("rule", rule)?;
            d.set_item("reason", constraint)?;
            d.set_item("expected", required)?;
            d.set_item("found", found)?;
        }
        Error::DuplicateClient { client } => d.set_item("client", client)?,
        Error::InvalidSecurityFactor { client, value } => {
            d.set_item("client", client)?;
            d.set_item("value", value)?;
        }
        Error::ClientKeyMismatch {
            client,
            tensor,
            present_in,
        } => {
            d.set_item("client", client)?;
            d.set_item("key", tensor)?;
            d.set_item("present_in", present_in)?;
        }
        Error::ClientShapeMismatch {
            client,
            tensor,
            expected,
            found,
        } => {
            d.set_item("client", client)?;
            d.set_item("key", tensor)?;
            d.set_item("expected", expected.to_vec())?;
            d.set_item("found", found.to_vec())?;
        }
        Error::UnmappedTensor {
            library,
            tensor,
            map,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("what", library)?;
            d.set_item("reason", map)?;
        }
        Error::InteropFailed {
            library,
            tensor,
            reason,
        } => {
            d.set_item("key", tensor)?;
            d.set_item("what", library)?;
            d.set_item("reason", reason)?;
        }
        Error::CalibrationFailed { detail } => d.set_item("reason", detail)?,
        Error::ManifestSample {
            line, path, source, ..
        } => {
            d.set_item("index", line)?;
            d.set_item("path", path.display().to_string())?;
            d.set_item("reason", source.to_string())?;
        }
        Error::AttackInput {
            index,
            tensor,
            reason,
        } => {
            d.set_item("index", index)?;
            d.set_item("key", tensor)?;
            d.set_item("reason", reason)?;
        }
        _ => {}
    }
    Ok(())
}
