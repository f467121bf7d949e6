//! `Adapter`: an owned LoRA adapter (safetensors files, copies of arrays),
//! and `delta`.

use std::collections::BTreeMap;

use numpy::{PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::lora::{LoraAdapter, LoraDelta, LoraKey, StorageDtype, TensorSource};

use crate::errors::{IntoPy, raise};
use crate::source::Held;

/// An owned LoRA adapter in PEFT orientation, keyed by canonical PEFT names.
///
/// Build one from a safetensors file (`Adapter.load`) or by copying a dict of
/// float32 arrays (`Adapter.from_arrays`). Every function that takes an update
/// accepts either an `Adapter` or the dict itself (read without copying).
#[pyclass(frozen, module = "safe_fedllm._native")]
pub struct Adapter {
    pub(crate) inner: LoraAdapter,
}

/// The arrays of an adapter as a dict `{canonical key: float32 ndarray}` (copies).
pub fn to_arrays<'py>(py: Python<'py>, adapter: &LoraAdapter) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for entry in adapter.iter() {
        let [rows, cols] = entry.tensor.shape();
        let flat = numpy::PyArray1::from_slice(py, entry.tensor.as_slice());
        let array: Bound<'py, PyArray2<f32>> = flat.reshape([rows, cols])?;
        out.set_item(entry.key.canonical(), array)?;
    }
    Ok(out)
}

#[pymethods]
impl Adapter {
    /// Copies a dict of 2-D float32 arrays (PEFT key names) into an adapter.
    ///
    /// >>> a = Adapter.from_arrays({"model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((4, 2), np.float32)})
    /// >>> a.num_params
    /// 8
    #[staticmethod]
    fn from_arrays(py: Python<'_>, arrays: &Bound<'_, PyAny>) -> PyResult<Self> {
        let held = Held::extract(arrays)?;
        let source = held.source()?;
        let inner = py.detach(|| source.to_adapter()).py()?;
        Ok(Adapter { inner })
    }

    /// Loads a PEFT `adapter_model.safetensors` (f32, f16 or bf16).
    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| LoraAdapter::load(&path)).py()?;
        Ok(Adapter { inner })
    }

    /// Saves as safetensors; `dtype` is "f32" (default), "f16" or "bf16".
    #[pyo3(signature = (path, dtype = "f32"))]
    fn save(&self, py: Python<'_>, path: std::path::PathBuf, dtype: &str) -> PyResult<()> {
        let dtype = match dtype {
            "f32" | "float32" => StorageDtype::F32,
            "f16" | "float16" => StorageDtype::F16,
            "bf16" | "bfloat16" => StorageDtype::Bf16,
            other => {
                return Err(raise(
                    "InvalidParameterError",
                    format!("dtype `{other}` is not one of f32, f16, bf16"),
                    |d| {
                        d.set_item("name", "dtype")?;
                        d.set_item("value", other)
                    },
                ));
            }
        };
        py.detach(|| self.inner.save(&path, dtype)).py()
    }

    /// A dict `{canonical key: float32 ndarray}` (copies).
    fn to_arrays<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        to_arrays(py, &self.inner)
    }

    /// Canonical keys in sorted order.
    fn keys(&self) -> Vec<String> {
        self.inner.keys().map(str::to_owned).collect()
    }

    /// `{canonical key: (rows, cols)}`.
    fn shapes(&self) -> BTreeMap<String, (usize, usize)> {
        self.inner
            .iter()
            .map(|e| {
                (
                    e.key.canonical().to_owned(),
                    (e.tensor.shape()[0], e.tensor.shape()[1]),
                )
            })
            .collect()
    }

    /// Total number of LoRA values.
    #[getter]
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }

    /// The LoRA rank, or None for an empty adapter.
    #[getter]
    fn rank(&self) -> PyResult<Option<usize>> {
        self.inner.rank().py()
    }

    /// Raises `NonFiniteError` (key, index, value) if any value is NaN or ±inf.
    fn check_finite(&self) -> PyResult<()> {
        self.inner.check_finite().py()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, key: &str) -> bool {
        let canonical = LoraKey::parse(key).map(|k| k.canonical().to_owned());
        canonical.is_some_and(|c| self.inner.shape_of(&c).is_some())
    }

    fn __repr__(&self) -> String {
        format!(
            "Adapter({} tensors, {} values)",
            self.inner.len(),
            self.inner.num_params()
        )
    }
}

/// `update − base` as a new `Adapter` (keys and shapes must match exactly).
///
/// Either argument may be a dict of float32 arrays or an `Adapter`.
///
/// >>> d = delta(update_arrays, global_arrays)
#[pyfunction]
pub fn delta(
    py: Python<'_>,
    update: &Bound<'_, PyAny>,
    base: &Bound<'_, PyAny>,
) -> PyResult<Adapter> {
    let update = Held::extract(update)?;
    let base = Held::extract(base)?;
    let (u, b) = (update.source()?, base.source()?);
    let inner = py
        .detach(|| -> safe_fedllm::Result<LoraAdapter> {
            let lazy = safe_fedllm::lora::LazyDelta::new(&u, &b)?;
            let mut out = LoraAdapter::new();
            for key in lazy.lora_keys() {
                let name = key.canonical();
                let shape = lazy.shape_of(name).unwrap_or_default();
                let mut values = vec![0.0f32; shape[0].saturating_mul(shape[1])];
                lazy.copy_into(name, &mut values)?;
                out.insert(
                    name,
                    safe_fedllm::lora::LoraTensor::new(name, shape, values)?,
                )?;
            }
            Ok(LoraDelta::from_adapter(out).into_adapter())
        })
        .py()?;
    Ok(Adapter { inner })
}

/// The canonical PEFT name of a LoRA key (adapter name dropped), or None
/// when the name is not a LoRA A/B matrix.
///
/// >>> canonical_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
/// 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
#[pyfunction]
pub fn canonical_key(name: &str) -> Option<String> {
    LoraKey::parse(name).map(|k| k.canonical().to_owned())
}
