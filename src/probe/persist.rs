//! Saving and loading a [`LinearProbe`]: one safetensors file holding the
//! weights (`weight`, F32 `[dim]`; `bias`, F32 `[1]`) and, in its
//! `__metadata__` under the key `safe_fedllm.probe`, a JSON document:
//!
//! ```json
//! { "format": "safe-fedllm-linear-probe", "format_version": 1,
//!   "crate_version": "0.1.0", "threshold": 0.8,
//!   "feature_spec": { "selection": "FirstLayerB", "layout": [...], ... },
//!   "info": { "trainer": {...}, "fit": {...}, "training": {...}, "sketch": null } }
//! ```
//!
//! Any safetensors reader (Python's `safe_open(...).metadata()`) sees the
//! metadata as plain JSON. Loading checks everything before a probe exists:
//! the format name and version, tensor names, dtypes and shapes, the feature
//! layout's internal consistency, finiteness, and the threshold range; each
//! failure is a typed [`Error`] (wrapped in [`Error::InFile`] with the path
//! when loading a file). Weights are stored as raw `f32`, so a reloaded probe
//! scores bit-identically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::FeatureSpec;
use crate::lora::{ReadLimits, read_file};
use crate::probe::Probe;
use crate::probe::linear::{LinearProbe, ProbeInfo};

/// The `format` field of a saved probe's metadata.
pub const PROBE_FORMAT: &str = "safe-fedllm-linear-probe";
/// The metadata layout version this crate writes and reads.
pub const PROBE_FORMAT_VERSION: u32 = 1;
const METADATA_KEY: &str = "safe_fedllm.probe";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    format: String,
    format_version: u32,
    crate_version: String,
    threshold: f32,
    feature_spec: FeatureSpec,
    info: ProbeInfo,
}

impl LinearProbe {
    /// Saves and loads round-trip bit for bit (file or bytes):
    ///
    /// ```
    /// use safe_fedllm::features::{FeatureConfig, Selection};
    /// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
    /// use safe_fedllm::probe::{LinearProbe, Probe};
    ///
    /// let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    /// let mut delta = LoraAdapter::new();
    /// delta.insert(key, LoraTensor::new("b", [2, 1], vec![0.8, 0.6])?)?;
    /// let spec = FeatureConfig::new(Selection::FirstLayerB).fit(&[&delta])?;
    /// let probe = LinearProbe::new(spec, vec![4.0, -1.5], 0.25)?;
    ///
    /// let path = std::env::temp_dir().join(format!("probe-doc-{}.safetensors", std::process::id()));
    /// probe.save(&path)?;
    /// let loaded = LinearProbe::load(&path)?;
    /// assert_eq!(loaded.score(&delta)?.to_bits(), probe.score(&delta)?.to_bits());
    /// assert_eq!(LinearProbe::from_bytes(&probe.to_bytes()?)?.feature_spec(), probe.feature_spec());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    ///
    /// Serialises to safetensors bytes with the JSON metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let metadata = Metadata {
            format: PROBE_FORMAT.to_owned(),
            format_version: PROBE_FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").to_owned(),
            threshold: self.threshold(),
            feature_spec: self.feature_spec().clone(),
            info: self.info().clone(),
        };
        let json = serde_json::to_string(&metadata).map_err(|e| Error::Serialize {
            what: "probe file metadata",
            reason: e.to_string(),
        })?;
        let weight_bytes: Vec<u8> = self
            .weights()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let bias_bytes = self.bias().to_le_bytes();
        let weight = TensorView::new(Dtype::F32, vec![self.weights().len()], &weight_bytes)
            .map_err(Error::malformed)?;
        let bias = TensorView::new(Dtype::F32, vec![1], &bias_bytes).map_err(Error::malformed)?;
        let meta = HashMap::from([(METADATA_KEY.to_owned(), json)]);
        safetensors::serialize([("weight", weight), ("bias", bias)], Some(meta))
            .map_err(Error::malformed)
    }

    /// Parses and validates bytes written by [`LinearProbe::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let tensors = SafeTensors::deserialize(bytes).map_err(Error::malformed)?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(Error::malformed)?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| Error::MissingKey {
                tensor: format!("__metadata__.{METADATA_KEY}"),
                present_in: "the probe file format",
                missing_from: "this file",
            })?;
        let metadata: Metadata = serde_json::from_str(json)
            .map_err(|e| invalid(METADATA_KEY, "<json>", &e.to_string()))?;
        check_format(&metadata)?;
        check_spec(&metadata.feature_spec)?;
        let dim = metadata.feature_spec.dim();
        let weights = read_f32(&tensors, "weight", dim)?;
        // read_f32 checked the shape [1]: exactly one value.
        let [bias] = <[f32; 1]>::try_from(read_f32(&tensors, "bias", 1)?).map_err(|v| {
            Error::invariant(
                "probe::persist",
                "a tensor read with shape [1] holds one value",
                format!("{} values", v.len()),
            )
        })?;
        if tensors.len() != 2 {
            return Err(invalid(
                "tensors",
                &tensors.names().join(", "),
                "a probe holds exactly `weight` and `bias`",
            ));
        }
        LinearProbe::with_info(
            metadata.feature_spec,
            weights,
            bias,
            metadata.threshold,
            metadata.info,
        )
    }

    /// Writes the probe to a `.safetensors` file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Loads and validates a probe file (content errors come wrapped in
    /// [`Error::InFile`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path, &ReadLimits::default())?;
        Self::from_bytes(&bytes).map_err(|e| Error::in_file(path, e))
    }
}

fn invalid(field: &str, value: &str, reason: &str) -> Error {
    Error::InvalidMetadata {
        field: field.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn check_format(metadata: &Metadata) -> Result<()> {
    if metadata.format != PROBE_FORMAT {
        return Err(invalid(
            "format",
            &metadata.format,
            "not a safe-fedllm linear probe",
        ));
    }
    if metadata.format_version != PROBE_FORMAT_VERSION {
        return Err(invalid(
            "format_version",
            &metadata.format_version.to_string(),
            "this crate reads format version 1",
        ));
    }
    Ok(())
}

/// The layout must tile `0..dim` in key order with no gap or overlap.
fn check_spec(spec: &FeatureSpec) -> Result<()> {
    let mut offset = 0usize;
    let mut previous: Option<&str> = None;
    for block in spec.layout() {
        if block.offset != offset {
            return Err(invalid(
                "feature_spec.layout",
                &block.key,
                &format!(
                    "block starts at {} but the previous block ends at {offset}",
                    block.offset
                ),
            ));
        }
        if previous.is_some_and(|p| p >= block.key.as_str()) {
            return Err(invalid(
                "feature_spec.layout",
                &block.key,
                "keys must be sorted and unique",
            ));
        }
        previous = Some(&block.key);
        offset = block.shape[0]
            .checked_mul(block.shape[1])
            .and_then(|len| offset.checked_add(len))
            .ok_or_else(|| invalid("feature_spec.layout", &block.key, "block size overflows"))?;
    }
    if offset != spec.dim() || spec.layout().is_empty() {
        return Err(Error::DimensionMismatch {
            what: "feature_spec.dim vs its layout".into(),
            expected: offset,
            found: spec.dim(),
        });
    }
    Ok(())
}

fn read_f32(tensors: &SafeTensors<'_>, name: &str, len: usize) -> Result<Vec<f32>> {
    let view = tensors.tensor(name).map_err(|_| Error::MissingKey {
        tensor: name.to_owned(),
        present_in: "the probe file format",
        missing_from: "this file",
    })?;
    if view.dtype() != Dtype::F32 {
        return Err(Error::UnsupportedDtype {
            tensor: name.to_owned(),
            dtype: view.dtype().to_string(),
            supported: "F32 (probe files store f32 weights)",
        });
    }
    if view.shape() != [len] {
        return Err(Error::ShapeMismatch {
            tensor: name.to_owned(),
            expected: vec![len],
            found: view.shape().to_vec(),
        });
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| <[u8; 4]>::try_from(b).map_or(f32::NAN, f32::from_le_bytes))
        .collect())
}
