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
use safe_fedllm::error::MalformedSafetensors;

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

/// Converts a crate error. The context wrappers are looked through: the
/// innermost error picks the class and fields, the wrappers' file path and
/// client are kept as the `path` and `client` attributes.
pub fn to_py(err: Error) -> PyErr {
    let message = err.to_string();
    let path = outer_path(&err);
    let client = err.client().map(|c| c.to_string());
    let sample = manifest_sample(&err);
    let root = err.root();
    let (class, kind) = classify(root);
    raise(class, message, |d| {
        d.set_item("kind", kind)?;
        fields(root, d)?;
        if let Some(p) = &path {
            d.set_item("path", p)?;
        }
        if let Some(c) = &client {
            d.set_item("client", c)?;
        }
        if let Some((line, root)) = &sample {
            d.set_item("line", line)?;
            d.set_item("root", root)?;
        }
        Ok(())
    })
}

/// The manifest line and folder of a `ManifestSample` wrapper on the way to the root.
fn manifest_sample(err: &Error) -> Option<(usize, String)> {
    match err {
        Error::ManifestSample { line, root, .. } => Some((*line, root.display().to_string())),
        Error::Client { source, .. } | Error::InFile { source, .. } => manifest_sample(source),
        _ => None,
    }
}

/// The file a failure came from: the outermost path on the way to the root.
fn outer_path(err: &Error) -> Option<String> {
    match err {
        Error::InFile { path, .. }
        | Error::ManifestSample { path, .. }
        | Error::Io { path, .. }
        | Error::NotAFile { path, .. } => Some(path.display().to_string()),
        Error::Client { source, .. } => outer_path(source),
        _ => None,
    }
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

/// The exception class and the `kind` (the variant, in snake case) of a
/// root error (never a context wrapper: `to_py` looks through those).
fn classify(e: &Error) -> (&'static str, &'static str) {
    match e {
        Error::Io { .. } => ("SafeFedLLMIOError", "io"),
        Error::Write { .. } => ("SafeFedLLMIOError", "write"),
        Error::NotAFile { .. } => ("SafeFedLLMIOError", "not_a_file"),
        Error::InputTooLarge { .. } => ("FormatError", "input_too_large"),
        Error::HeaderTooLarge { .. } => ("FormatError", "header_too_large"),
        Error::Malformed(_) => ("FormatError", "malformed"),
        Error::InvalidMetadata { .. } => ("FormatError", "invalid_metadata"),
        Error::Serialize { .. } => ("FormatError", "serialize"),
        Error::UnsupportedDtype { .. } => ("DTypeError", "unsupported_dtype"),
        Error::NotALoraKey { .. } => ("KeyFormatError", "not_a_lora_key"),
        Error::DuplicateKey { .. } => ("KeyFormatError", "duplicate_key"),
        Error::MixedAdapters { .. } => ("KeyFormatError", "mixed_adapters"),
        Error::NotAMatrix { .. } => ("ShapeMismatchError", "not_a_matrix"),
        Error::DataLength { .. } => ("ShapeMismatchError", "data_length"),
        Error::RankMismatch { .. } => ("ShapeMismatchError", "rank_mismatch"),
        Error::ShapeMismatch { .. } => ("ShapeMismatchError", "shape_mismatch"),
        Error::MissingKey { .. } => ("MissingKeyError", "missing_key"),
        Error::NonFinite { .. } => ("NonFiniteError", "non_finite"),
        Error::StorageOverflow { .. } => ("NonFiniteError", "storage_overflow"),
        Error::EmptySelection { .. } => ("InvalidParameterError", "empty_selection"),
        Error::DimensionMismatch { .. } => ("ShapeMismatchError", "dimension_mismatch"),
        Error::NonFiniteFeature { .. } => ("NonFiniteError", "non_finite_feature"),
        Error::MissingClass { .. } => ("TrainingError", "missing_class"),
        Error::NumericalFailure { .. } => ("TrainingError", "numerical_failure"),
        Error::TrainerFailed { .. } => ("TrainingError", "trainer_failed"),
        Error::CalibrationFailed { .. } => ("TrainingError", "calibration_failed"),
        Error::Manifest { .. } => ("FormatError", "manifest"),
        Error::InvalidParameter { .. } => ("InvalidParameterError", "invalid_parameter"),
        Error::Empty { .. } => ("EmptyInputError", "empty"),
        Error::LengthMismatch { .. } => ("ShapeMismatchError", "length_mismatch"),
        Error::Overflow { .. } => ("SizeOverflowError", "overflow"),
        Error::InvalidEvidence { .. } => ("InvalidEvidenceError", "invalid_evidence"),
        Error::InvalidSecurityFactor { .. } => ("InvalidEvidenceError", "invalid_security_factor"),
        Error::DuplicateClient { .. } => ("DuplicateClientError", "duplicate_client"),
        Error::TooFewClients { .. } => ("TooFewClientsError", "too_few_clients"),
        Error::InvalidCheckpoint { .. } => ("CheckpointError", "invalid_checkpoint"),
        Error::AttackInput { .. } => ("ShapeMismatchError", "attack_input"),
        Error::UnmappedTensor { .. } => ("KeyFormatError", "unmapped_tensor"),
        Error::InteropFailed { .. } => ("FormatError", "interop_failed"),
        Error::Invariant { .. } => ("InternalError", "invariant"),
        Error::Spec { .. } => ("SpecError", "spec"),
        // Context wrappers never reach here (`to_py` passes the root); the
        // enum is non-exhaustive, so a variant added later maps to the base
        // class until it is listed above.
        _ => ("SafeFedLLMError", "other"),
    }
}

/// The root error's fields, under the core variant's own field names (the
/// one exception: `NotAFile`'s `kind` is `file_kind`, since `kind` names the
/// variant on every exception). Shapes are lists, I/O sources their message.
fn fields(e: &Error, d: &Bound<'_, PyDict>) -> PyResult<()> {
    match e {
        Error::Io { source, .. } => d.set_item("source", source.to_string())?,
        Error::Write { what, source } => {
            d.set_item("what", what)?;
            d.set_item("source", source.to_string())?;
        }
        Error::NotAFile { kind, .. } => d.set_item("file_kind", kind)?,
        Error::InputTooLarge { found, limit } => {
            d.set_item("found", found)?;
            d.set_item("limit", limit)?;
        }
        Error::HeaderTooLarge { declared, limit } => {
            d.set_item("declared", declared)?;
            d.set_item("limit", limit)?;
        }
        Error::Malformed(m) => malformed(m, d)?,
        Error::InvalidMetadata {
            field,
            value,
            reason,
        } => {
            d.set_item("field", field)?;
            d.set_item("value", value)?;
            d.set_item("reason", reason)?;
        }
        Error::Serialize { what, reason } => {
            d.set_item("what", what)?;
            d.set_item("reason", reason)?;
        }
        Error::UnsupportedDtype {
            tensor,
            dtype,
            supported,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("dtype", dtype)?;
            d.set_item("supported", supported)?;
        }
        Error::NotALoraKey { key } => d.set_item("key", key)?,
        Error::DuplicateKey {
            canonical,
            first,
            second,
        } => {
            d.set_item("canonical", canonical)?;
            d.set_item("first", first)?;
            d.set_item("second", second)?;
        }
        Error::MixedAdapters { first, second } => {
            d.set_item("first", first)?;
            d.set_item("second", second)?;
        }
        Error::NotAMatrix { tensor, shape } => {
            d.set_item("tensor", tensor)?;
            d.set_item("shape", shape.clone())?;
        }
        Error::DataLength {
            tensor,
            shape,
            expected,
            found,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("shape", shape.clone())?;
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::RankMismatch {
            module,
            a_shape,
            b_shape,
            a_rank,
            b_rank,
        } => {
            d.set_item("module", module)?;
            d.set_item("a_shape", a_shape.to_vec())?;
            d.set_item("b_shape", b_shape.to_vec())?;
            d.set_item("a_rank", a_rank)?;
            d.set_item("b_rank", b_rank)?;
        }
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("expected", expected.clone())?;
            d.set_item("found", found.clone())?;
        }
        Error::MissingKey {
            tensor,
            present_in,
            missing_from,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("present_in", present_in)?;
            d.set_item("missing_from", missing_from)?;
        }
        Error::NonFinite {
            tensor,
            index,
            value,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("index", index)?;
            d.set_item("value", value)?;
        }
        Error::StorageOverflow {
            tensor,
            index,
            value,
            dtype,
        } => {
            d.set_item("tensor", tensor)?;
            d.set_item("index", index)?;
            d.set_item("value", value)?;
            d.set_item("dtype", dtype)?;
        }
        Error::EmptySelection { selection } => d.set_item("selection", selection)?,
        Error::DimensionMismatch {
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
            d.set_item("row", row)?;
            d.set_item("column", column)?;
            d.set_item("value", value)?;
        }
        Error::MissingClass { missing, samples } => {
            d.set_item("missing", missing)?;
            d.set_item("samples", samples)?;
        }
        Error::NumericalFailure {
            solver,
            iteration,
            detail,
        } => {
            d.set_item("solver", solver)?;
            d.set_item("iteration", iteration)?;
            d.set_item("detail", detail)?;
        }
        Error::TrainerFailed { trainer, reason } => {
            d.set_item("trainer", trainer)?;
            d.set_item("reason", reason)?;
        }
        Error::CalibrationFailed { detail } => d.set_item("detail", detail)?,
        Error::Manifest { line, reason } => {
            d.set_item("line", line)?;
            d.set_item("reason", reason)?;
        }
        Error::InvalidParameter {
            component,
            name,
            value,
            expected,
        } => {
            d.set_item("component", component)?;
            d.set_item("name", name)?;
            d.set_item("value", value)?;
            d.set_item("expected", expected)?;
        }
        Error::Spec {
            key,
            reason,
            suggestion,
        } => {
            d.set_item("key", key)?;
            d.set_item("reason", reason)?;
            d.set_item("suggestion", suggestion)?;
        }
        Error::Empty { what } => d.set_item("what", what)?,
        Error::LengthMismatch {
            what,
            expected,
            found,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::Overflow { what, detail } => {
            d.set_item("what", what)?;
            d.set_item("detail", detail)?;
        }
        Error::InvalidEvidence { round, reason, .. } => {
            d.set_item("round", round)?;
            d.set_item("reason", reason)?;
        }
        Error::InvalidSecurityFactor { value, .. } => d.set_item("value", value)?,
        Error::TooFewClients {
            rule,
            constraint,
            required,
            found,
        } => {
            d.set_item("rule", rule)?;
            d.set_item("constraint", constraint)?;
            d.set_item("required", required)?;
            d.set_item("found", found)?;
        }
        Error::InvalidCheckpoint { what, value } => {
            d.set_item("what", what)?;
            d.set_item("value", value)?;
        }
        Error::AttackInput {
            index,
            tensor,
            reason,
        } => {
            d.set_item("index", index)?;
            d.set_item("tensor", tensor)?;
            d.set_item("reason", reason)?;
        }
        Error::UnmappedTensor {
            library,
            tensor,
            map,
        } => {
            d.set_item("library", library)?;
            d.set_item("tensor", tensor)?;
            d.set_item("map", map)?;
        }
        Error::InteropFailed {
            library,
            tensor,
            reason,
        } => {
            d.set_item("library", library)?;
            d.set_item("tensor", tensor)?;
            d.set_item("reason", reason)?;
        }
        Error::Invariant {
            location,
            invariant,
            detail,
        } => {
            d.set_item("location", location)?;
            d.set_item("invariant", invariant)?;
            d.set_item("detail", detail)?;
        }
        // `DuplicateClient` and `InvalidSecurityFactor`'s client, and the
        // wrappers' path / client / line, are set by `to_py`.
        _ => {}
    }
    Ok(())
}

/// A malformed safetensors file: `malformed` names what is wrong (the
/// variant of `MalformedSafetensors`), with that variant's fields.
fn malformed(m: &MalformedSafetensors, d: &Bound<'_, PyDict>) -> PyResult<()> {
    use MalformedSafetensors as M;
    let name = match m {
        M::HeaderTooSmall => "header_too_small",
        M::InvalidHeaderLength => "invalid_header_length",
        M::HeaderTooLarge => "header_too_large",
        M::InvalidHeader { valid_up_to } => {
            d.set_item("valid_up_to", valid_up_to)?;
            "invalid_header"
        }
        M::InvalidHeaderDeserialization { detail } => {
            d.set_item("detail", detail)?;
            "invalid_header_deserialization"
        }
        M::InvalidOffset { tensor } => {
            d.set_item("tensor", tensor)?;
            "invalid_offset"
        }
        M::TensorInvalidInfo => "tensor_invalid_info",
        M::MetadataIncompleteBuffer => "metadata_incomplete_buffer",
        M::ValidationOverflow => "validation_overflow",
        M::MisalignedSlice => "misaligned_slice",
        M::Other { detail } => {
            d.set_item("detail", detail)?;
            "other"
        }
        _ => "other",
    };
    d.set_item("malformed", name)
}
