//! burn 0.22 LoRA modules as a [`TensorSource`], and aggregated adapters
//! written back into them (feature `burn`).
//!
//! burn's built-in LoRA (`module.apply_lora(Lora::new(rank, alpha))`) keeps
//! two factors per adapted weight, at record paths `<param>.lora.a` and
//! `<param>.lora.b`. Because burn's `Linear` stores its weight as
//! `[d_in, d_out]` (the transpose of PyTorch's `[out, in]`), its factors are
//! the transposes of PEFT's:
//!
//! | burn | shape | PEFT | shape |
//! |---|---|---|---|
//! | `a` | `[d_in, r]` | `lora_A` | `[r, d_in]` = `a`ᵀ |
//! | `b` | `[r, d_out]` | `lora_B` | `[d_out, r]` = `b`ᵀ |
//!
//! The flip happens here, at the boundary, in one function
//! ([`burn_peft_transpose`]); everything past it (deltas, probe, detectors,
//! aggregators) only ever sees PEFT orientation.
//!
//! Names are translated by an explicit [`BurnNames`] map from the burn
//! *parameter* path (`layers.3.attn.q_proj.weight`) to the PEFT *module* path
//! (`base_model.model.model.layers.3.self_attn.q_proj`); the factor suffix is
//! added by this module. [`BurnNames::llama`] (the default) covers the LLaMA
//! layout of `examples/fed_llama`; [`BurnNames::table`] and
//! [`BurnNames::from_fn`] cover any other.
//!
//! Reading goes through burn-store's `collect` (filtered with
//! [`lora_filter`]) and writing through its `apply`; both directions check
//! every name, shape and dtype first and fail with a typed [`Error`] naming
//! the tensor, leaving the module unchanged.
//!
//! ```
//! use burn::module::{Lora, Module, ParamGroup};
//! use burn::nn::{Linear, LinearConfig};
//! use burn::tensor::Device;
//! use safe_fedllm::interop::burn::{BurnLora, BurnNames, write_lora};
//! use safe_fedllm::lora::TensorSource;
//!
//! #[derive(Module, Debug)]
//! struct Attn { q_proj: Linear, v_proj: Linear }
//! #[derive(Module, Debug)]
//! struct Layer { attn: Attn }
//! #[derive(Module, Debug)]
//! struct Tiny { layers: Vec<Layer> }
//!
//! let device = Device::flex();
//! let linear = || LinearConfig::new(8, 4).with_bias(false).init(&device);
//! let model = Tiny { layers: vec![Layer { attn: Attn { q_proj: linear(), v_proj: linear() } }] };
//! let group = ParamGroup::from_regex(r"\.q_proj\.weight$").expect("valid regex");
//! let mut model = model.apply_lora(Lora::new(2, 4.0).set_param_group(group));
//!
//! // burn → PEFT: `a` [8, 2] becomes lora_A [2, 8], `b` [2, 4] becomes lora_B [4, 2].
//! let names = BurnNames::llama();
//! let update = BurnLora::from_module(&model, &names)?;
//! let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
//! assert_eq!(update.shape_of(key), Some([2, 8]));
//! assert_eq!(update.burn_path(key), Some("layers.0.attn.q_proj.weight.lora.a"));
//!
//! // PEFT → burn: an aggregated adapter goes back in, bit for bit.
//! let mut global = update.into_adapter();
//! global.iter_mut().for_each(|(_, t)| t.as_mut_slice().iter_mut().for_each(|x| *x += 0.25));
//! write_lora(&mut model, &global, &names)?;
//! assert_eq!(BurnLora::from_module(&model, &names)?.adapter(), &global);
//! # Ok::<(), safe_fedllm::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ::burn::module::Module;
use ::burn::store::burn_pack::Tensor as PackTensor;
use ::burn::store::{ModuleSnapshot, PathFilter, bridge};
use ::burn::tensor::{DType, TensorData};

use crate::error::{Error, Result};
use crate::lora::{Factor, LoraAdapter, LoraKey, LoraTensor, TensorSource};

const LIBRARY: &str = "burn";

/// The regular expression that selects burn's LoRA factors by record path,
/// for callers who build their own burn-store `PathFilter` (as in
/// `model.collect(Some(PathFilter::new().with_regex(LORA_PATH_REGEX)), None, false)`).
/// [`lora_filter`] selects the same paths without a regex.
pub const LORA_PATH_REGEX: &str = r"\.lora\.(a|b)$";

/// A burn-store filter selecting exactly the LoRA factors (`….lora.a`,
/// `….lora.b`), equivalent to [`LORA_PATH_REGEX`] (a predicate, so building
/// it cannot fail).
pub fn lora_filter() -> PathFilter {
    PathFilter::from_predicate(|path, _| split_lora_path(path).is_some())
}

/// Splits a burn record path into the adapted parameter's path and the
/// factor: `layers.0.attn.q_proj.weight.lora.a` → (`layers.0.attn.q_proj.weight`,
/// [`Factor::A`]). `None` for a path that is not a LoRA factor.
pub fn split_lora_path(path: &str) -> Option<(&str, Factor)> {
    if let Some(param) = path.strip_suffix(".lora.a") {
        Some((param, Factor::A))
    } else {
        path.strip_suffix(".lora.b").map(|param| (param, Factor::B))
    }
    .filter(|(param, _)| !param.is_empty())
}

/// The burn ↔ PEFT orientation flip of one LoRA factor.
///
/// burn `a` `[d_in, r]` ↔ PEFT `lora_A` `[r, d_in]`; burn `b` `[r, d_out]` ↔
/// PEFT `lora_B` `[d_out, r]`. Both directions are the same transpose, so
/// applying it twice is the identity, and it moves values without arithmetic,
/// so it is exact.
///
/// ```
/// use safe_fedllm::interop::burn::burn_peft_transpose;
/// use safe_fedllm::lora::LoraTensor;
///
/// // burn `a` for d_in = 3, r = 2: row i holds the two rank components of input i.
/// let burn_a = LoraTensor::new("a", [3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
/// let peft_a = burn_peft_transpose(&burn_a);
/// assert_eq!(peft_a.shape(), [2, 3]);
/// assert_eq!(peft_a.as_slice(), [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
/// assert_eq!(burn_peft_transpose(&peft_a), burn_a);
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
pub fn burn_peft_transpose(tensor: &LoraTensor) -> LoraTensor {
    tensor.transposed()
}

type NameFn = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The explicit map from burn parameter paths to PEFT module paths.
///
/// The map sees the path of the adapted *parameter* (the record path minus
/// `.lora.a` / `.lora.b`, e.g. `layers.3.attn.q_proj.weight`) and returns the
/// PEFT *module* path (e.g. `base_model.model.model.layers.3.self_attn.q_proj`),
/// or `None` when it has no name for it; the PEFT key is then
/// `<module>.lora_A.weight` / `<module>.lora_B.weight`. A path without a name
/// is an [`Error::UnmappedTensor`], never skipped: a renamed or extra tensor
/// must not silently drop out of an update.
///
/// ```
/// use safe_fedllm::interop::burn::BurnNames;
///
/// let llama = BurnNames::llama();
/// assert_eq!(
///     llama.peft_key("layers.3.attn.q_proj.weight.lora.b")?.canonical(),
///     "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight",
/// );
///
/// let table = BurnNames::table([("encoder.proj.weight", "base_model.model.encoder.proj")]);
/// assert_eq!(
///     table.peft_key("encoder.proj.weight.lora.a")?.canonical(),
///     "base_model.model.encoder.proj.lora_A.weight",
/// );
/// assert!(table.peft_key("decoder.proj.weight.lora.a").is_err());
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Clone)]
pub struct BurnNames {
    label: String,
    map: Arc<NameFn>,
}

impl BurnNames {
    /// The LLaMA layout of `examples/fed_llama` (the default):
    /// `layers.{i}.attn.{proj}.weight` → `base_model.model.model.layers.{i}.self_attn.{proj}`
    /// and `layers.{i}.mlp.{proj}.weight` → `base_model.model.model.layers.{i}.mlp.{proj}`,
    /// the names PEFT gives a Hugging Face `LlamaForCausalLM`. Any other path
    /// is unmapped.
    pub fn llama() -> Self {
        Self::from_fn("llama", llama_module)
    }

    /// A fixed table from burn parameter path to PEFT module path; paths not
    /// in the table are unmapped.
    pub fn table<I, P, M>(entries: I) -> Self
    where
        I: IntoIterator<Item = (P, M)>,
        P: Into<String>,
        M: Into<String>,
    {
        let table: BTreeMap<String, String> = entries
            .into_iter()
            .map(|(p, m)| (p.into(), m.into()))
            .collect();
        Self::from_fn("table", move |param| table.get(param).cloned())
    }

    /// Any function from burn parameter path to PEFT module path; `label`
    /// names the map in errors.
    pub fn from_fn(
        label: impl Into<String>,
        map: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        BurnNames {
            label: label.into(),
            map: Arc::new(map),
        }
    }

    /// The label used in errors (`"llama"`, `"table"` or the custom one).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The PEFT module path of a burn parameter path, if the map has one.
    pub fn peft_module(&self, param_path: &str) -> Option<String> {
        (self.map)(param_path)
    }

    /// The PEFT key of a burn LoRA record path (`<param>.lora.a` / `.lora.b`).
    ///
    /// Fails with [`Error::UnmappedTensor`] naming the record path when it is
    /// not a LoRA factor, the map has no name for its parameter, or the name
    /// it gives does not parse as a PEFT LoRA key.
    pub fn peft_key(&self, record_path: &str) -> Result<LoraKey> {
        let unmapped = || Error::UnmappedTensor {
            library: LIBRARY,
            tensor: record_path.to_owned(),
            map: self.label.clone(),
        };
        let (param, factor) = split_lora_path(record_path).ok_or_else(unmapped)?;
        let module = self.peft_module(param).ok_or_else(unmapped)?;
        let suffix = match factor {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
        };
        LoraKey::parse(&format!("{module}.{suffix}.weight"))
            .filter(|key| key.factor() == factor && key.module_path() == module)
            .ok_or_else(unmapped)
    }
}

impl Default for BurnNames {
    fn default() -> Self {
        Self::llama()
    }
}

impl fmt::Debug for BurnNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BurnNames")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// `layers.{i}.{attn|mlp}.{proj}.weight` → PEFT's LLaMA module path.
fn llama_module(param: &str) -> Option<String> {
    let rest = param.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (block, rest) = rest.split_once('.')?;
    let block = match block {
        "attn" => "self_attn",
        "mlp" => "mlp",
        _ => return None,
    };
    let proj = rest.strip_suffix(".weight")?;
    if proj.is_empty() || !proj.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    Some(format!(
        "base_model.model.model.layers.{layer}.{block}.{proj}"
    ))
}

/// The LoRA tensors of a burn module, converted to PEFT names and
/// orientation: a [`TensorSource`] (zero-copy `f32`) that remembers which
/// burn record path each key came from.
///
/// The values are copied out of the module once (burn tensors may live on a
/// device, and the orientation flip moves every value anyway); LoRA factors
/// are small next to the model. f16 and bf16 parameters widen to `f32`
/// exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct BurnLora {
    adapter: LoraAdapter,
    paths: BTreeMap<String, String>,
}

impl BurnLora {
    /// Collects the LoRA factors of `module` (burn-store `collect` with
    /// [`lora_filter`]) and converts them.
    ///
    /// Fails with [`Error::Empty`] when the module carries no LoRA factor,
    /// and otherwise as [`BurnLora::from_collected`].
    pub fn from_module<M: Module>(module: &M, names: &BurnNames) -> Result<Self> {
        Self::from_collected(module.collect(Some(lora_filter()), None, false), names)
    }

    /// Converts burn-store tensors collected from a module (for example with
    /// `model.collect(Some(PathFilter::new().with_regex(LORA_PATH_REGEX)), None, false)`).
    ///
    /// Every tensor must be a LoRA factor the name map translates
    /// ([`Error::UnmappedTensor`]), a matrix ([`Error::NotAMatrix`]) of f32,
    /// f16 or bf16 ([`Error::UnsupportedDtype`]); two paths may not map to one
    /// key ([`Error::DuplicateKey`]), and each module's `A` and `B` must agree
    /// on the rank ([`Error::RankMismatch`]).
    pub fn from_collected(
        tensors: impl IntoIterator<Item = PackTensor>,
        names: &BurnNames,
    ) -> Result<Self> {
        let mut adapter = LoraAdapter::new();
        let mut paths: BTreeMap<String, String> = BTreeMap::new();
        for tensor in tensors {
            let key = names.peft_key(&tensor.name)?;
            let canonical = key.canonical().to_owned();
            if let Some(first) = paths.get(&canonical) {
                return Err(Error::DuplicateKey {
                    canonical,
                    first: first.clone(),
                    second: tensor.name,
                });
            }
            let burn_side = read_factor(&tensor)?;
            adapter.insert_parsed(key, burn_peft_transpose(&burn_side));
            paths.insert(canonical, tensor.name);
        }
        if adapter.is_empty() {
            return Err(Error::Empty {
                what: "the LoRA tensors collected from the burn module",
            });
        }
        adapter.check_ranks()?;
        Ok(BurnLora { adapter, paths })
    }

    /// The converted tensors (PEFT names and orientation).
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// The converted tensors, by value.
    pub fn into_adapter(self) -> LoraAdapter {
        self.adapter
    }

    /// The burn record path a PEFT key was read from.
    pub fn burn_path(&self, canonical: &str) -> Option<&str> {
        self.paths.get(canonical).map(String::as_str)
    }
}

impl TensorSource for BurnLora {
    fn lora_keys(&self) -> Box<dyn Iterator<Item = &LoraKey> + '_> {
        self.adapter.lora_keys()
    }

    fn shape_of(&self, canonical: &str) -> Option<[usize; 2]> {
        self.adapter.shape_of(canonical)
    }

    fn read_range(&self, canonical: &str, offset: usize, out: &mut [f32]) -> Result<()> {
        self.adapter.read_range(canonical, offset, out)
    }

    fn as_f32(&self, canonical: &str) -> Option<&[f32]> {
        self.adapter.as_f32(canonical)
    }
}

/// Writes a PEFT-orientation source (typically the aggregated global
/// [`LoraAdapter`]) into the LoRA factors of `module`, through burn-store's
/// `apply`. Returns the number of tensors written.
///
/// Each factor keeps its parameter's dtype (f32, f16 or bf16; values that
/// came from such a parameter narrow back to the same bits) and device.
/// Before anything is written, the key sets must match exactly and every
/// shape must be the transpose of the module's:
/// - a module factor without a source tensor is [`Error::MissingKey`]
///   (`present_in: "the burn module"`), a source tensor without a module factor is
///   [`Error::MissingKey`] (`present_in: "the source"`);
/// - a wrong shape is [`Error::ShapeMismatch`] with both shapes in PEFT
///   orientation;
/// - unmapped paths, non-matrices and other dtypes fail as in
///   [`BurnLora::from_collected`].
///
/// On any of these errors the module is unchanged. Values are written as
/// given: screening them (finite, bounded) is admission's job, upstream.
pub fn write_lora<M: Module, S: TensorSource + ?Sized>(
    module: &mut M,
    source: &S,
    names: &BurnNames,
) -> Result<usize> {
    let targets = module.collect(Some(lora_filter()), None, false);
    if targets.is_empty() {
        return Err(Error::Empty {
            what: "the LoRA tensors of the burn module written to",
        });
    }
    // Pass 1: names, shapes and dtypes, nothing read or written yet.
    let mut plan: Vec<(LoraKey, [usize; 2])> = Vec::with_capacity(targets.len());
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for target in &targets {
        let key = names.peft_key(&target.name)?;
        let canonical = key.canonical().to_owned();
        if let Some(first) = seen.get(&canonical) {
            return Err(Error::DuplicateKey {
                canonical,
                first: first.clone(),
                second: target.name.clone(),
            });
        }
        let [rows, cols] = matrix_shape(&target.name, target.shape.as_slice())?;
        check_dtype(&target.name, target.dtype)?;
        seen.insert(canonical, target.name.clone());
        plan.push((key, [cols, rows]));
    }
    for (key, peft_shape) in &plan {
        let canonical = key.canonical();
        let found = source
            .shape_of(canonical)
            .ok_or_else(|| Error::MissingKey {
                tensor: canonical.to_owned(),
                present_in: "the burn module",
                missing_from: "the source",
            })?;
        if found != *peft_shape {
            return Err(Error::ShapeMismatch {
                tensor: canonical.to_owned(),
                expected: peft_shape.to_vec(),
                found: found.to_vec(),
            });
        }
    }
    if let Some(extra) = source
        .lora_keys()
        .find(|key| !seen.contains_key(key.canonical()))
    {
        return Err(Error::MissingKey {
            tensor: extra.canonical().to_owned(),
            present_in: "the source",
            missing_from: "the burn module",
        });
    }
    // Pass 2: convert everything, still without touching the module.
    let mut tensors = Vec::with_capacity(targets.len());
    for (target, (key, peft_shape)) in targets.iter().zip(&plan) {
        let canonical = key.canonical();
        let mut peft = LoraTensor::zeros(canonical, *peft_shape)?;
        source.copy_into(canonical, peft.as_mut_slice())?;
        let burn_side = burn_peft_transpose(&peft);
        let data = TensorData::new(burn_side.into_vec(), [peft_shape[1], peft_shape[0]])
            .try_cast(target.dtype)
            .map_err(|e| failed(canonical, e))?;
        tensors.push(bridge::from_data(data, target.name.clone(), None));
    }
    // Pass 3: apply, and make sure every factor was taken.
    let wanted = tensors.len();
    let result = module.apply(tensors, None, None, false);
    if let Some(error) = result.errors.first() {
        return Err(Error::InteropFailed {
            library: LIBRARY,
            tensor: error_path(error).to_owned(),
            reason: error.to_string(),
        });
    }
    if result.applied.len() != wanted {
        let tensor = result
            .unused
            .first()
            .cloned()
            .unwrap_or_else(|| "(LoRA factors)".to_owned());
        return Err(Error::InteropFailed {
            library: LIBRARY,
            tensor,
            reason: format!(
                "burn-store applied {} of {wanted} LoRA factors (unused: {:?})",
                result.applied.len(),
                result.unused
            ),
        });
    }
    Ok(wanted)
}

fn error_path(error: &::burn::store::ApplyError) -> &str {
    use ::burn::store::ApplyError;
    match error {
        ApplyError::ShapeMismatch { path, .. }
        | ApplyError::DTypeMismatch { path, .. }
        | ApplyError::AdapterError { path, .. }
        | ApplyError::LoadError { path, .. } => path,
    }
}

/// One collected factor as a [`LoraTensor`] in burn's own orientation.
fn read_factor(tensor: &PackTensor) -> Result<LoraTensor> {
    let shape = matrix_shape(&tensor.name, tensor.shape.as_slice())?;
    check_dtype(&tensor.name, tensor.dtype)?;
    let values = bridge::to_data(tensor)
        .map_err(|e| failed(&tensor.name, format!("{e:?}")))?
        .try_into_vec_as::<f32>()
        .map_err(|e| failed(&tensor.name, e))?;
    LoraTensor::new(&tensor.name, shape, values)
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

/// f32 (and burn's `Flex32`), f16 and bf16 convert to and from `f32`
/// exactly; f64 would not round-trip, quantized and integer data are not
/// LoRA factors.
fn check_dtype(name: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::Flex32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::UnsupportedDtype {
            tensor: name.to_owned(),
            dtype: format!("{other:?}"),
            supported: "F32, Flex32, F16 or BF16",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_paths_split_into_parameter_and_factor() {
        assert_eq!(
            split_lora_path("layers.0.attn.q_proj.weight.lora.a"),
            Some(("layers.0.attn.q_proj.weight", Factor::A))
        );
        assert_eq!(split_lora_path("x.lora.b"), Some(("x", Factor::B)));
        assert_eq!(split_lora_path(".lora.a"), None);
        assert_eq!(split_lora_path("layers.0.attn.q_proj.weight"), None);
        assert_eq!(split_lora_path("x.lora.c"), None);
    }

    #[test]
    fn the_llama_map_names_attention_and_mlp_only() {
        assert_eq!(
            llama_module("layers.12.mlp.down_proj.weight").as_deref(),
            Some("base_model.model.model.layers.12.mlp.down_proj")
        );
        for unmapped in [
            "layers.x.attn.q_proj.weight",
            "layers..attn.q_proj.weight",
            "layers.0.norm.weight",
            "layers.0.attn.q_proj.bias",
            "layers.0.attn..weight",
            "layers.0.attn.q.proj.weight",
            "embed.weight",
        ] {
            assert_eq!(llama_module(unmapped), None, "{unmapped}");
        }
    }

    #[test]
    fn a_map_giving_a_non_lora_name_is_an_unmapped_tensor() {
        let names = BurnNames::from_fn("broken", |_| Some(String::new()));
        let err = names.peft_key("p.weight.lora.a");
        assert!(matches!(
            err,
            Err(Error::UnmappedTensor { ref tensor, ref map, library: "burn" })
                if tensor == "p.weight.lora.a" && map == "broken"
        ));
    }

    #[test]
    fn only_exact_dtypes_are_accepted() {
        for ok in [DType::F32, DType::Flex32, DType::F16, DType::BF16] {
            assert!(check_dtype("t", ok).is_ok());
        }
        for bad in [DType::F64, DType::I64, DType::U8] {
            assert!(matches!(
                check_dtype("t", bad),
                Err(Error::UnsupportedDtype { .. })
            ));
        }
    }
}
