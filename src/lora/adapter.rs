//! [`LoraAdapter`]: a named set of LoRA matrices in PEFT orientation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::key::{Factor, LoraKey};
use crate::lora::tensor::{ExtraTensor, LoraTensor};

/// LoRA hyper-parameters, as far as a file records them.
///
/// safetensors files written by PEFT usually carry only `{"format": "pt"}`;
/// rank, alpha and target modules live in `adapter_config.json`
/// ([`LoraConfig::from_peft_json`]). Files written by this crate store them in
/// the safetensors `__metadata__` as well.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// LoRA rank `r`.
    pub rank: Option<usize>,
    /// LoRA scaling numerator `α` (ΔW = α/r · B·A).
    pub alpha: Option<f64>,
    /// Adapted module names (`q_proj`, `v_proj`, …).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Reads `r`, `lora_alpha` and `target_modules` from a PEFT
    /// `adapter_config.json` document. Missing fields stay `None`/empty.
    ///
    /// ```
    /// use safe_fedllm::lora::LoraConfig;
    /// let cfg = LoraConfig::from_peft_json(
    ///     r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}"#,
    /// )?;
    /// assert_eq!(cfg.rank, Some(8));
    /// assert_eq!(cfg.alpha, Some(16.0));
    /// assert_eq!(cfg.target_modules, ["q_proj", "v_proj"]);
    /// # Ok::<(), safe_fedllm::Error>(())
    /// ```
    pub fn from_peft_json(json: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| Error::InvalidMetadata {
                field: "adapter_config.json".into(),
                value: truncate(json),
                reason: e.to_string(),
            })?;
        let mut cfg = LoraConfig::default();
        if let Some(r) = value.get("r").filter(|v| !v.is_null()) {
            cfg.rank = Some(parse_rank(&r.to_string())?);
        }
        if let Some(a) = value.get("lora_alpha").filter(|v| !v.is_null()) {
            cfg.alpha = Some(parse_alpha(&a.to_string())?);
        }
        match value.get("target_modules") {
            Some(serde_json::Value::Array(items)) => {
                cfg.target_modules = items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
            }
            // PEFT also accepts a regex string here; keep it verbatim.
            Some(serde_json::Value::String(s)) => cfg.target_modules = vec![s.clone()],
            _ => {}
        }
        Ok(cfg)
    }

    /// Reads the config from safetensors `__metadata__` entries: `r` (or
    /// `rank`/`lora_r`), `lora_alpha` (or `alpha`), and `target_modules` (a
    /// JSON list or a comma-separated string). Unknown entries are ignored.
    pub fn from_metadata<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let mut cfg = LoraConfig::default();
        for (field, value) in entries {
            match field {
                "r" | "rank" | "lora_r" => cfg.rank = Some(parse_rank(value)?),
                "lora_alpha" | "alpha" => cfg.alpha = Some(parse_alpha(value)?),
                "target_modules" => cfg.target_modules = parse_modules(value),
                _ => {}
            }
        }
        Ok(cfg)
    }

    /// The metadata entries [`LoraConfig::from_metadata`] reads back.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(r) = self.rank {
            out.push(("r".to_owned(), r.to_string()));
        }
        if let Some(a) = self.alpha {
            out.push(("lora_alpha".to_owned(), a.to_string()));
        }
        if !self.target_modules.is_empty() {
            // A JSON array of strings, built as a `Value` (whose Display is
            // infallible) rather than through a fallible serializer.
            let list = serde_json::Value::from(self.target_modules.clone()).to_string();
            out.push(("target_modules".to_owned(), list));
        }
        out
    }
}

fn parse_rank(value: &str) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(r) if r > 0 => Ok(r),
        _ => Err(Error::InvalidMetadata {
            field: "r".into(),
            value: truncate(value),
            reason: "expected a positive integer".into(),
        }),
    }
}

fn parse_alpha(value: &str) -> Result<f64> {
    match value.trim().parse::<f64>() {
        Ok(a) if a.is_finite() => Ok(a),
        _ => Err(Error::InvalidMetadata {
            field: "lora_alpha".into(),
            value: truncate(value),
            reason: "expected a finite number".into(),
        }),
    }
}

fn parse_modules(value: &str) -> Vec<String> {
    serde_json::from_str::<Vec<String>>(value).unwrap_or_else(|_| {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// One LoRA matrix with its parsed name.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraEntry {
    /// The parsed name.
    pub key: LoraKey,
    /// The values, PEFT orientation.
    pub tensor: LoraTensor,
}

/// A named set of LoRA matrices in PEFT orientation (`lora_A` `[r, in]`,
/// `lora_B` `[out, r]`), `f32` in memory, iterated in sorted key order.
///
/// Keys are canonical PEFT names (adapter name dropped). Tensors that are not
/// LoRA `A`/`B` matrices are kept aside in [`LoraAdapter::extras`] and never
/// enter deltas, features or aggregation.
///
/// ```
/// use safe_fedllm::lora::{LoraAdapter, LoraTensor};
///
/// let mut adapter = LoraAdapter::new();
/// adapter.insert(
///     "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
///     LoraTensor::new("a", [2, 4], vec![0.1; 8])?,
/// )?;
/// adapter.insert(
///     "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
///     LoraTensor::zeros("b", [4, 2])?,
/// )?;
/// assert_eq!(adapter.len(), 2);
/// assert_eq!(adapter.num_params(), 16);
/// assert_eq!(adapter.rank()?, Some(2));
/// # Ok::<(), safe_fedllm::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraAdapter {
    pub(crate) entries: BTreeMap<String, LoraEntry>,
    pub(crate) extras: BTreeMap<String, ExtraTensor>,
    pub(crate) config: LoraConfig,
    pub(crate) adapter_name: Option<String>,
}

impl LoraAdapter {
    /// An empty adapter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts a LoRA matrix under a raw PEFT name (any accepted variant; it is
    /// stored under its canonical name). Returns the tensor it replaced.
    ///
    /// Fails with [`Error::NotALoraKey`] if the name is not a LoRA `A`/`B` name.
    pub fn insert(&mut self, name: &str, tensor: LoraTensor) -> Result<Option<LoraTensor>> {
        let key = LoraKey::parse(name).ok_or_else(|| Error::NotALoraKey {
            key: name.to_owned(),
        })?;
        Ok(self.insert_parsed(key, tensor))
    }

    pub(crate) fn insert_parsed(&mut self, key: LoraKey, tensor: LoraTensor) -> Option<LoraTensor> {
        let canonical = key.canonical().to_owned();
        self.entries
            .insert(canonical, LoraEntry { key, tensor })
            .map(|old| old.tensor)
    }

    /// The tensor stored under a canonical key.
    pub fn get(&self, canonical: &str) -> Option<&LoraTensor> {
        self.entries.get(canonical).map(|e| &e.tensor)
    }

    /// Mutable access to the tensor stored under a canonical key.
    pub fn get_mut(&mut self, canonical: &str) -> Option<&mut LoraTensor> {
        self.entries.get_mut(canonical).map(|e| &mut e.tensor)
    }

    /// The parsed key stored under a canonical key.
    pub fn key(&self, canonical: &str) -> Option<&LoraKey> {
        self.entries.get(canonical).map(|e| &e.key)
    }

    /// Entries in sorted canonical-key order.
    pub fn iter(&self) -> impl Iterator<Item = &LoraEntry> {
        self.entries.values()
    }

    /// Entries in sorted canonical-key order, tensors mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&LoraKey, &mut LoraTensor)> {
        self.entries.values_mut().map(|e| (&e.key, &mut e.tensor))
    }

    /// Canonical keys in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of LoRA matrices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the adapter holds no LoRA matrix.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of LoRA parameters.
    pub fn num_params(&self) -> usize {
        self.entries.values().map(|e| e.tensor.len()).sum()
    }

    /// Tensors that are not LoRA `A`/`B` matrices, by their raw name.
    pub fn extras(&self) -> &BTreeMap<String, ExtraTensor> {
        &self.extras
    }

    /// The LoRA hyper-parameters recorded in the file, if any.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Replaces the recorded hyper-parameters.
    pub fn set_config(&mut self, config: LoraConfig) {
        self.config = config;
    }

    /// The adapter name found in the keys (`default`), if the file had one.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter_name.as_deref()
    }

    /// The rank shared by all modules, checking that every module's `lora_A`
    /// and `lora_B` agree. `None` for an empty adapter. Modules may differ in
    /// rank (PEFT `rank_pattern`); then the largest is returned.
    pub fn rank(&self) -> Result<Option<usize>> {
        self.check_ranks()?;
        Ok(self
            .entries
            .values()
            .map(|e| rank_of(e.key.factor(), e.tensor.shape()))
            .max())
    }

    /// Checks that `lora_A` `[r, in]` and `lora_B` `[out, r]` of each module
    /// agree on `r`.
    pub fn check_ranks(&self) -> Result<()> {
        check_ranks(self.iter().map(|e| (&e.key, e.tensor.shape())))
    }

    /// Fails with [`Error::NonFinite`] naming the first tensor (in key order)
    /// that holds a NaN or infinity.
    ///
    /// Tensors are scanned in parallel on the current rayon pool (every
    /// round scans the global adapter before reading any update).
    pub fn check_finite(&self) -> Result<()> {
        let entries: Vec<_> = self.entries.values().collect();
        let per_tensor = self.num_params() / entries.len().max(1);
        let found =
            crate::parallel::map_items(&entries, per_tensor, |e| e.tensor.first_non_finite());
        match entries
            .iter()
            .zip(found)
            .find_map(|(e, bad)| bad.map(|b| (e, b)))
        {
            Some((e, (index, value))) => Err(Error::NonFinite {
                tensor: e.key.canonical().to_owned(),
                index,
                value,
            }),
            None => Ok(()),
        }
    }
}

fn rank_of(factor: Factor, [rows, cols]: [usize; 2]) -> usize {
    match factor {
        Factor::A => rows,
        Factor::B => cols,
    }
}

/// Checks that `lora_A` `[r, in]` and `lora_B` `[out, r]` of each module agree
/// on `r`, from keys and shapes alone.
pub(crate) fn check_ranks<'a>(
    entries: impl Iterator<Item = (&'a LoraKey, [usize; 2])>,
) -> Result<()> {
    let mut a_shapes: BTreeMap<&str, [usize; 2]> = BTreeMap::new();
    let mut b_shapes: Vec<(&str, [usize; 2])> = Vec::new();
    for (key, shape) in entries {
        match key.factor() {
            Factor::A => {
                a_shapes.insert(key.module_path(), shape);
            }
            Factor::B => b_shapes.push((key.module_path(), shape)),
        }
    }
    for (module, b_shape) in b_shapes {
        let Some(&a_shape) = a_shapes.get(module) else {
            continue;
        };
        let (a_rank, b_rank) = (a_shape[0], b_shape[1]);
        if a_rank != b_rank {
            return Err(Error::RankMismatch {
                module: module.to_owned(),
                a_shape,
                b_shape,
                a_rank,
                b_rank,
            });
        }
    }
    Ok(())
}
