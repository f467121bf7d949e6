//! Named candle-core 0.11 tensors as a [`TensorSource`], and aggregated
//! adapters written back into them (feature `candle`).
//!
//! candle's `Linear` keeps PyTorch's `[out, in]` weight layout, and LoRA
//! tensors loaded into candle from a PEFT checkpoint keep PEFT's names and
//! orientation (`lora_A` `[r, in]`, `lora_B` `[out, r]`), so no transpose is
//! needed here: the names are PEFT keys (any variant [`LoraKey::parse`]
//! accepts) and the shapes are PEFT shapes.
//!
//! [`CandleLora`] holds either plain `Tensor`s (from a `HashMap<String,
//! Tensor>`, e.g. `candle_core::safetensors::load`) or `Var`s (the trainable
//! variables of a candle model; they share storage with the caller's, so
//! writing back updates the model in place). `VarMap` lives in candle-nn,
//! which this crate does not depend on: pass its variables with
//! `CandleLora::from_vars(var_map.data().lock()?.iter())`, filtered to the
//! LoRA names.
//!
//! f32, f16 and bf16 are read a range at a time, converting only the values
//! asked for (CPU tensors straight from their storage, others through a
//! narrowed copy), so reading an update never holds a second converted copy
//! of it. Writing back converts to each tensor's own dtype and device; values
//! that came from f16/bf16 narrow back to the same bits, so a round trip is
//! bit-exact in every supported dtype.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use safe_fedllm::interop::candle::CandleLora;
//! use safe_fedllm::lora::TensorSource;
//! use std::collections::HashMap;
//!
//! let dev = Device::Cpu;
//! let a = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.25, 0.0, -0.5]], &dev)?.to_dtype(DType::BF16)?;
//! let b = Tensor::zeros((4, 2), DType::BF16, &dev)?;
//! let tensors = HashMap::from([
//!     ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(), a),
//!     ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(), b),
//! ]);
//! let mut lora = CandleLora::from_tensors(tensors)?;
//!
//! // Read as f32, a range at a time.
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
//! let mut out = [0.0f32; 2];
//! lora.read_range(key, 1, &mut out)?;
//! assert_eq!(out, [-1.0, 2.0]);
//!
//! // Write an aggregated adapter back; the tensors stay bf16.
//! let mut global = lora.to_adapter()?;
//! global.get_mut(key).expect("present").as_mut_slice()[0] = 1.5;
//! lora.write_from(&global)?;
//! assert_eq!(lora.tensor(key).map(|t| t.dtype()), Some(DType::BF16));
//! assert_eq!(lora.to_adapter()?, global);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};

use crate::error::{Error, Result};
use crate::lora::{Factor, LoraAdapter, LoraKey, LoraTensor, TensorSource, checked_range};

const LIBRARY: &str = "candle";

/// Where a tensor lives: a plain tensor (replaced on write) or a variable
/// (set in place on write, so its owner sees the new values).
#[derive(Debug, Clone)]
enum Holder {
    Tensor(Tensor),
    Var(Var),
}

impl Holder {
    fn tensor(&self) -> &Tensor {
        match self {
            Holder::Tensor(t) => t,
            Holder::Var(v) => v.as_tensor(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: LoraKey,
    name: String,
    shape: [usize; 2],
    holder: Holder,
}

/// Named candle LoRA tensors (PEFT names and orientation) as a
/// [`TensorSource`], writable from an aggregated adapter.
#[derive(Debug, Clone)]
pub struct CandleLora {
    entries: BTreeMap<String, Entry>,
}

impl CandleLora {
    /// From `(name, tensor)` pairs, e.g. a `HashMap<String, Tensor>`.
    ///
    /// Every name must be a PEFT LoRA key ([`Error::NotALoraKey`]; filter a
    /// full checkpoint with [`LoraKey::parse`] first), two names may not name
    /// one tensor ([`Error::DuplicateKey`]), and each tensor must be a matrix
    /// ([`Error::NotAMatrix`]) of f32, f16 or bf16
    /// ([`Error::UnsupportedDtype`]), with each module's `A` and `B` agreeing
    /// on the rank ([`Error::RankMismatch`]). An empty input is
    /// [`Error::Empty`].
    pub fn from_tensors<I, S>(tensors: I) -> Result<Self>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        Self::build(
            tensors
                .into_iter()
                .map(|(name, t)| (name.as_ref().to_owned(), Holder::Tensor(t))),
        )
    }

    /// From `(name, variable)` pairs (a candle-nn `VarMap`'s
    /// `data().lock()?.iter()`, or a `Vec<(String, Var)>`). The variables are
    /// shared, not copied: [`CandleLora::write_from`] sets them in place.
    /// Checks as [`CandleLora::from_tensors`].
    pub fn from_vars<'a, I, S>(vars: I) -> Result<Self>
    where
        I: IntoIterator<Item = (S, &'a Var)>,
        S: AsRef<str>,
    {
        Self::build(
            vars.into_iter()
                .map(|(name, v)| (name.as_ref().to_owned(), Holder::Var(v.clone()))),
        )
    }

    fn build(items: impl Iterator<Item = (String, Holder)>) -> Result<Self> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (name, holder) in items {
            let key =
                LoraKey::parse(&name).ok_or_else(|| Error::NotALoraKey { key: name.clone() })?;
            let tensor = holder.tensor();
            let shape = matrix_shape(&name, tensor.dims())?;
            check_dtype(&name, tensor.dtype())?;
            let canonical = key.canonical().to_owned();
            if let Some(first) = entries.get(&canonical) {
                return Err(Error::DuplicateKey {
                    canonical,
                    first: first.name.clone(),
                    second: name,
                });
            }
            entries.insert(
                canonical,
                Entry {
                    key,
                    name,
                    shape,
                    holder,
                },
            );
        }
        if entries.is_empty() {
            return Err(Error::Empty {
                what: "the candle LoRA tensors",
            });
        }
        check_ranks(&entries)?;
        Ok(CandleLora { entries })
    }

    /// The tensor under a canonical PEFT key (for a variable, its current
    /// value).
    pub fn tensor(&self, canonical: &str) -> Option<&Tensor> {
        self.entries.get(canonical).map(|e| e.holder.tensor())
    }

    /// The name a canonical key was given under (for example with PEFT's
    /// `.default` adapter segment).
    pub fn name(&self, canonical: &str) -> Option<&str> {
        self.entries.get(canonical).map(|e| e.name.as_str())
    }

    /// An owned `f32` copy in PEFT orientation (what aggregation produces and
    /// [`CandleLora::write_from`] takes back).
    pub fn to_adapter(&self) -> Result<LoraAdapter> {
        let mut adapter = LoraAdapter::new();
        for (canonical, entry) in &self.entries {
            let mut tensor = LoraTensor::zeros(canonical, entry.shape)?;
            self.read_range(canonical, 0, tensor.as_mut_slice())?;
            adapter.insert_parsed(entry.key.clone(), tensor);
        }
        Ok(adapter)
    }

    /// The tensors under the names they were given, after any write-back.
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.entries
            .into_values()
            .map(|e| {
                let tensor = match e.holder {
                    Holder::Tensor(t) => t,
                    Holder::Var(v) => v.into_inner(),
                };
                (e.name, tensor)
            })
            .collect()
    }

    /// Writes a PEFT-orientation source (typically the aggregated global
    /// [`LoraAdapter`]) into the held tensors, each in its own dtype and on
    /// its own device: variables are set in place, plain tensors replaced.
    ///
    /// The key sets must match exactly (a held tensor without a source tensor
    /// is [`Error::MissingKey`] with `present_in: "the candle tensors"`, a source
    /// tensor without a held one `present_in: "the source"`) and every shape must
    /// match ([`Error::ShapeMismatch`]). All values are converted before any
    /// tensor changes, so on an error nothing is written. Values are written
    /// as given: screening them is admission's job, upstream.
    pub fn write_from<S: TensorSource + ?Sized>(&mut self, source: &S) -> Result<()> {
        for (canonical, entry) in &self.entries {
            let found = source
                .shape_of(canonical)
                .ok_or_else(|| Error::MissingKey {
                    tensor: canonical.clone(),
                    present_in: "the candle tensors",
                    missing_from: "the source",
                })?;
            if found != entry.shape {
                return Err(Error::ShapeMismatch {
                    tensor: canonical.clone(),
                    expected: entry.shape.to_vec(),
                    found: found.to_vec(),
                });
            }
        }
        if let Some(extra) = source
            .lora_keys()
            .find(|key| !self.entries.contains_key(key.canonical()))
        {
            return Err(Error::MissingKey {
                tensor: extra.canonical().to_owned(),
                present_in: "the source",
                missing_from: "the candle tensors",
            });
        }
        let mut converted = Vec::with_capacity(self.entries.len());
        for (canonical, entry) in &self.entries {
            let current = entry.holder.tensor();
            let mut values = LoraTensor::zeros(canonical, entry.shape)?;
            source.copy_into(canonical, values.as_mut_slice())?;
            let tensor = to_candle(&values, current.dtype(), current.device())
                .map_err(|e| failed(canonical, e))?;
            converted.push(tensor);
        }
        for (entry, tensor) in self.entries.values_mut().zip(converted) {
            match &mut entry.holder {
                Holder::Tensor(t) => *t = tensor,
                Holder::Var(v) => v
                    .set(&tensor)
                    .map_err(|e| failed(entry.key.canonical(), e))?,
            }
        }
        Ok(())
    }
}

/// A PEFT-orientation [`LoraTensor`] as a candle tensor of `dtype` on
/// `device` (`f32` values narrow to f16/bf16 by round-to-nearest-even, exact
/// for values that came from that dtype).
fn to_candle(tensor: &LoraTensor, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(tensor.as_slice(), tensor.shape().to_vec(), device)?.to_dtype(dtype)
}

/// Every tensor of a source as candle tensors of `dtype` on `device`, under
/// canonical PEFT names (for writing a fresh checkpoint with
/// `candle_core::safetensors::save`).
pub fn adapter_to_tensors<S: TensorSource + ?Sized>(
    source: &S,
    dtype: DType,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    check_dtype("(requested dtype)", dtype)?;
    let mut out = BTreeMap::new();
    for key in source.lora_keys() {
        let canonical = key.canonical();
        let shape = source
            .shape_of(canonical)
            .ok_or_else(|| Error::MissingKey {
                tensor: canonical.to_owned(),
                present_in: "the source's key list",
                missing_from: "the source's shapes",
            })?;
        let mut values = LoraTensor::zeros(canonical, shape)?;
        source.copy_into(canonical, values.as_mut_slice())?;
        let tensor = to_candle(&values, dtype, device).map_err(|e| failed(canonical, e))?;
        out.insert(canonical.to_owned(), tensor);
    }
    Ok(out)
}

impl TensorSource for CandleLora {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        Box::new(self.entries.values().map(|e| &e.key))
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.entries.get(canonical).map(|e| e.shape)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        let range = checked_range(self, canonical, offset, out.len())?;
        let tensor = self.tensor(canonical).ok_or_else(|| Error::MissingKey {
            tensor: canonical.to_owned(),
            present_in: "the requested keys",
            missing_from: "the candle tensors",
        })?;
        // Fast path: a contiguous CPU tensor, converted straight from its storage.
        {
            let (storage, layout) = tensor.storage_and_layout();
            if let (Storage::Cpu(cpu), Some((start, _))) = (&*storage, layout.contiguous_offsets())
            {
                let lo = start.checked_add(range.start);
                let hi = start.checked_add(range.end);
                let span = lo.zip(hi).map(|(lo, hi)| lo..hi);
                let copied = match (cpu, span) {
                    (CpuStorage::F32(v), Some(span)) => v.get(span).map(|s| {
                        out.copy_from_slice(s);
                    }),
                    (CpuStorage::F16(v), Some(span)) => v.get(span).map(|s| {
                        out.iter_mut().zip(s).for_each(|(o, x)| *o = x.to_f32());
                    }),
                    (CpuStorage::BF16(v), Some(span)) => v.get(span).map(|s| {
                        out.iter_mut().zip(s).for_each(|(o, x)| *o = x.to_f32());
                    }),
                    _ => None,
                };
                if copied.is_some() {
                    return Ok(());
                }
            }
        }
        // Any other device or layout: a narrowed, converted copy of the range.
        let values = tensor
            .flatten_all()
            .and_then(|t| t.narrow(0, range.start, range.len()))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| failed(canonical, e))?;
        if values.len() != out.len() {
            return Err(Error::DataLength {
                tensor: canonical.to_owned(),
                shape: tensor.dims().to_vec(),
                expected: out.len(),
                found: values.len(),
            });
        }
        out.copy_from_slice(&values);
        Ok(())
    }
}

/// `lora_A` `[r, in]` and `lora_B` `[out, r]` of each module agree on `r`.
fn check_ranks(entries: &BTreeMap<String, Entry>) -> Result<()> {
    let mut a_shapes: BTreeMap<&str, [usize; 2]> = BTreeMap::new();
    for entry in entries.values() {
        if entry.key.factor() == Factor::A {
            a_shapes.insert(entry.key.module_path(), entry.shape);
        }
    }
    for entry in entries.values() {
        let module = entry.key.module_path();
        if entry.key.factor() != Factor::B {
            continue;
        }
        if let Some(&a_shape) = a_shapes.get(module)
            && a_shape[0] != entry.shape[1]
        {
            return Err(Error::RankMismatch {
                module: module.to_owned(),
                a_shape,
                b_shape: entry.shape,
                a_rank: a_shape[0],
                b_rank: entry.shape[1],
            });
        }
    }
    Ok(())
}

fn matrix_shape(name: &str, dims: &[usize]) -> Result<[usize; 2]> {
    match dims {
        [rows, cols] => Ok([*rows, *cols]),
        _ => Err(Error::NotAMatrix {
            tensor: name.to_owned(),
            shape: dims.to_vec(),
        }),
    }
}

/// f32, f16 and bf16 convert to and from `f32` exactly; f64 would not
/// round-trip, the 8-bit and integer types are not LoRA factors.
fn check_dtype(name: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::UnsupportedDtype {
            tensor: name.to_owned(),
            dtype: format!("{other:?}"),
            supported: "F32, F16 or BF16",
        }),
    }
}

fn failed(tensor: &str, reason: impl fmt::Display) -> Error {
    Error::InteropFailed {
        library: LIBRARY,
        tensor: tensor.to_owned(),
        reason: reason.to_string(),
    }
}
