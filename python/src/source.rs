//! Borrowed numpy arrays as a [`TensorSource`]: the zero-copy path.
//!
//! A dict `{peft_key: float32 ndarray}` is borrowed read-only (numpy's borrow
//! flags refuse a concurrent writable borrow from Rust), each array's buffer
//! becomes a `&[f32]`, and the core reads them through
//! [`TensorSource::as_f32`] without copying. The slices are `Send`, so the
//! heavy work runs with the GIL released (`py.detach`).
//!
//! The borrow flags only see Rust borrows: Python code in *another thread*
//! must not write to these arrays while a call that reads them is running
//! (the same contract as any GIL-releasing numpy extension). Flower's reply
//! arrays are read-only views over the message bytes, so the strategy never
//! hands out writable buffers.

use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use safe_fedllm::lora::{LoraAdapter, LoraKey, LoraTensor, TensorSource, checked_range};
use safe_fedllm::{Error, Result};

use crate::adapter::Adapter;
use crate::errors::{IntoPy, raise, to_py};

/// Read-only borrows of a dict's arrays, kept alive on the caller's stack
/// while Rust reads their buffers.
pub struct Borrowed<'py> {
    arrays: Vec<(String, PyReadonlyArrayDyn<'py, f32>)>,
}

/// An update argument: a dict of numpy arrays or an [`Adapter`].
pub enum Held<'py> {
    /// Borrowed arrays.
    Arrays(Borrowed<'py>),
    /// An owned adapter (frozen pyclass, so a shared borrow is safe).
    Adapter(Bound<'py, Adapter>),
}

impl<'py> Held<'py> {
    /// Borrows `obj`, which must be a dict of float32 arrays or an `Adapter`.
    pub fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(adapter) = obj.cast::<Adapter>() {
            return Ok(Held::Adapter(adapter.clone()));
        }
        let dict = obj.cast::<PyDict>().map_err(|_| {
            raise(
                "InputTypeError",
                format!(
                    "expected a dict of float32 numpy arrays or an Adapter, got {}",
                    type_name(obj)
                ),
                |_| Ok(()),
            )
        })?;
        Ok(Held::Arrays(Borrowed::extract(dict)?))
    }

    /// The view the core reads (no copy for either form).
    pub fn source(&self) -> PyResult<Source<'_>> {
        match self {
            Held::Arrays(b) => Ok(Source::Arrays(b.view()?)),
            Held::Adapter(a) => Ok(Source::Adapter(&a.get().inner)),
        }
    }
}

impl<'py> Borrowed<'py> {
    /// Borrows every array of the dict, checking its dtype.
    pub fn extract(dict: &Bound<'py, PyDict>) -> PyResult<Self> {
        let mut arrays = Vec::with_capacity(dict.len());
        for (k, v) in dict.iter() {
            let key: String = k.extract().map_err(|_| {
                raise(
                    "InputTypeError",
                    format!("array names must be str, got {}", type_name(&k)),
                    |_| Ok(()),
                )
            })?;
            let array = match v.cast::<PyArrayDyn<f32>>() {
                Ok(a) => a.try_readonly().map_err(|e| {
                    raise(
                        "InputTypeError",
                        format!("array `{key}` cannot be borrowed: {e}"),
                        |d| d.set_item("tensor", &key),
                    )
                })?,
                Err(_) => {
                    let dtype = match v.cast::<PyUntypedArray>() {
                        Ok(a) => a.dtype().to_string(),
                        Err(_) => type_name(&v),
                    };
                    return Err(raise(
                        "DTypeError",
                        format!(
                            "array `{key}` has dtype {dtype}; safe_fedllm reads float32 only (convert with .astype(np.float32))"
                        ),
                        |d| {
                            d.set_item("tensor", &key)?;
                            d.set_item("dtype", &dtype)?;
                            d.set_item("kind", "wrong_dtype")
                        },
                    ));
                }
            };
            arrays.push((key, array));
        }
        Ok(Borrowed { arrays })
    }

    /// Checks shapes, layout and names and returns the zero-copy view.
    pub fn view(&self) -> PyResult<ArraySource<'_>> {
        let mut entries = Vec::with_capacity(self.arrays.len());
        for (name, array) in &self.arrays {
            let shape = array.shape();
            let [rows, cols] = match *shape {
                [r, c] => [r, c],
                _ => {
                    return Err(to_py(Error::NotAMatrix {
                        tensor: name.clone(),
                        shape: shape.to_vec(),
                    }));
                }
            };
            // `as_slice` also accepts Fortran order, whose buffer would be read
            // transposed: require C order explicitly.
            let data = array.as_slice().ok().filter(|_| array.is_c_contiguous()).ok_or_else(|| {
                raise(
                    "NotContiguousError",
                    format!("array `{name}` is not C-contiguous; pass np.ascontiguousarray(a) (safe_fedllm reads buffers without copying)"),
                    |d| {
                        d.set_item("tensor", name)?;
                        d.set_item("kind", "not_contiguous")
                    },
                )
            })?;
            let key = LoraKey::parse(name).ok_or_else(|| Error::NotALoraKey { key: name.clone() });
            let key = key.py()?;
            entries.push(Entry {
                key,
                shape: [rows, cols],
                data,
            });
        }
        entries.sort_by(|a, b| a.key.canonical().cmp(b.key.canonical()));
        for pair in entries.windows(2) {
            if let [a, b] = pair
                && a.key.canonical() == b.key.canonical()
            {
                return Err(to_py(Error::DuplicateKey {
                    canonical: a.key.canonical().to_owned(),
                    first: a.key.to_string(),
                    second: b.key.to_string(),
                }));
            }
        }
        Ok(ArraySource { entries })
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

struct Entry<'a> {
    key: LoraKey,
    shape: [usize; 2],
    data: &'a [f32],
}

/// LoRA matrices borrowed from numpy, sorted by canonical key.
pub struct ArraySource<'a> {
    entries: Vec<Entry<'a>>,
}

impl ArraySource<'_> {
    fn find(&self, canonical: &str) -> Option<&Entry<'_>> {
        self.entries
            .binary_search_by(|e| e.key.canonical().cmp(canonical))
            .ok()
            .and_then(|i| self.entries.get(i))
    }

    /// An owned copy (for APIs that still take an owned adapter).
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut adapter = LoraAdapter::new();
        for e in &self.entries {
            adapter.insert(
                e.key.canonical(),
                LoraTensor::new(e.key.canonical(), e.shape, e.data.to_vec())?,
            )?;
        }
        Ok(adapter)
    }
}

impl TensorSource for ArraySource<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.entries.iter().map(|e| &e.key))
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.find(canonical).map(|e| e.shape)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        let range = checked_range(self, canonical, offset, out.len())?;
        let part = self
            .find(canonical)
            .and_then(|e| e.data.get(range))
            .ok_or_else(|| Error::MissingKey {
                tensor: canonical.to_owned(),
                present_in: "the requested keys",
                missing_from: "the arrays",
            })?;
        out.copy_from_slice(part);
        Ok(())
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        self.find(canonical).map(|e| e.data)
    }
}

/// Either view, as one `TensorSource`.
pub enum Source<'a> {
    /// Borrowed numpy buffers.
    Arrays(ArraySource<'a>),
    /// An adapter owned by Rust.
    Adapter(&'a LoraAdapter),
}

impl Source<'_> {
    /// An owned copy (only for APIs that take owned adapters).
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        match self {
            Source::Arrays(a) => a.to_adapter(),
            Source::Adapter(a) => Ok((*a).clone()),
        }
    }
}

impl TensorSource for Source<'_> {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        match self {
            Source::Arrays(a) => a.lora_keys(),
            Source::Adapter(a) => a.lora_keys(),
        }
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        match self {
            Source::Arrays(a) => a.shape_of(canonical),
            Source::Adapter(a) => a.shape_of(canonical),
        }
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Source::Arrays(a) => a.read_range(canonical, offset, out),
            Source::Adapter(a) => a.read_range(canonical, offset, out),
        }
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        match self {
            Source::Arrays(a) => a.as_f32(canonical),
            Source::Adapter(a) => a.as_f32(canonical),
        }
    }
}
