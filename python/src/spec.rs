//! Defense specs from Python: dicts, spec files and single sections, all
//! read by the core's one parser ([`DefenseSpec`]), so a misspelt key is a
//! `SpecError` naming it wherever it was written.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::round::DefenseSpec;
use serde_json::Value;

use crate::errors::{IntoPy, raise};

/// A Python object (dict, list, number, string, None) as JSON, through
/// `json.dumps` (tuples become arrays; anything else raises `InputTypeError`).
pub fn to_json(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (obj,))
        .map_err(|e| {
            raise(
                "InputTypeError",
                format!("a spec holds only dicts, lists, numbers, strings, booleans and None: {e}"),
                |_| Ok(()),
            )
        })?
        .extract()?;
    serde_json::from_str(&text)
        .map_err(|e| raise("FormatError", format!("spec JSON: {e}"), |_| Ok(())))
}

/// Python keyword arguments as a JSON object (none: an empty object).
pub fn kwargs(
    py: Python<'_>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<serde_json::Map<String, Value>> {
    match kwargs {
        None => Ok(serde_json::Map::new()),
        Some(k) => match to_json(py, k.as_any())? {
            Value::Object(map) => Ok(map),
            _ => Ok(serde_json::Map::new()),
        },
    }
}

/// A spec holding only `section` (every other section at its default):
/// one section is read by the same parser as a whole spec, so its errors
/// name `section.key`.
pub fn with_section(section: &str, value: Value) -> PyResult<DefenseSpec> {
    let mut object = serde_json::Map::new();
    object.insert(section.to_owned(), value);
    DefenseSpec::from_json(&Value::Object(object).to_string()).py()
}

/// A spec from a dict (its JSON form) or the path of a `.toml` / `.json`
/// file. `base_dir` is the folder a dict's relative probe path is read
/// against (a file's own folder otherwise).
pub fn read(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    base_dir: Option<PathBuf>,
) -> PyResult<DefenseSpec> {
    let mut parsed = if spec.is_instance_of::<PyDict>() {
        DefenseSpec::from_json(&to_json(py, spec)?.to_string()).py()?
    } else {
        let path: PathBuf = spec.extract().map_err(|_| {
            raise(
                "InputTypeError",
                "a defense spec is a dict or the path of a .toml / .json file".into(),
                |_| Ok(()),
            )
        })?;
        DefenseSpec::from_file(path).py()?
    };
    if let Some(dir) = base_dir {
        parsed.probe.base_dir = Some(dir);
    }
    Ok(parsed)
}

/// Checks a defense spec (a dict or the path of a `.toml` / `.json` file)
/// without building a round: returns the run header `{"spec": …,
/// "spec_sha256": …}`, the spec in its canonical form and the hash every
/// audit line of a round built from it records. Raises `SpecError` naming a
/// misspelt key or an out-of-range value. A named probe is not loaded.
#[pyfunction]
#[pyo3(signature = (spec, *, base_dir = None))]
pub fn check_spec<'py>(
    py: Python<'py>,
    spec: &Bound<'py, PyAny>,
    base_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let header = read(py, spec, base_dir)?.check().py()?.header_json().py()?;
    let value: Value = serde_json::from_str(&header)
        .map_err(|e| raise("FormatError", e.to_string(), |_| Ok(())))?;
    crate::json::to_py_json(py, &value)
}
