//! Parsing PEFT tensor names into (layer, module, factor).
//!
//! PEFT writes LoRA tensors under names such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Real files
//! vary: an adapter name may sit before `weight` (`lora_A.default.weight`, the
//! in-memory state dict), embedding adapters use `lora_embedding_A` with no
//! `.weight` suffix, and non-LLaMA models use other container and module names
//! (`transformer.h.3.attn.c_attn`, `encoder.block.0.layer.0.SelfAttention.q`).
//! Parsing is purely structural so that all of these work: the segment
//! `lora_A`/`lora_B`/`lora_embedding_A`/`lora_embedding_B` marks a LoRA tensor,
//! the first all-digit segment before it is the layer index, and what lies
//! between the layer index and the LoRA segment is the module.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which of the two LoRA factors a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Factor {
    /// `lora_A`, shape `[r, in]` (PEFT orientation).
    A,
    /// `lora_B`, shape `[out, r]` (PEFT orientation).
    B,
}

/// Whether the adapted module is a linear layer or an embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoraKind {
    /// `lora_A` / `lora_B` on a linear (or conv) layer; stored as `….lora_A.weight`.
    Linear,
    /// `lora_embedding_A` / `lora_embedding_B`; stored without a `.weight` suffix.
    Embedding,
}

/// A parsed LoRA tensor name.
///
/// ```
/// use safe_fedllm::lora::{Factor, LoraKey};
///
/// let key = LoraKey::parse("base_model.model.model.layers.7.self_attn.v_proj.lora_B.default.weight")
///     .expect("a LoRA key");
/// assert_eq!(key.layer(), Some(7));
/// assert_eq!(key.module(), "self_attn.v_proj");
/// assert_eq!(key.factor(), Factor::B);
/// assert_eq!(key.adapter_name(), Some("default"));
/// // The canonical name drops the adapter name, as PEFT does when saving.
/// assert_eq!(key.canonical(), "base_model.model.model.layers.7.self_attn.v_proj.lora_B.weight");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoraKey {
    canonical: String,
    module_path: String,
    layer: Option<usize>,
    module: String,
    factor: Factor,
    kind: LoraKind,
    adapter_name: Option<String>,
}

impl LoraKey {
    /// Parses a tensor name; `None` when the name is not a LoRA `A`/`B` matrix
    /// (a bias, a DoRA magnitude vector, a fully trained `modules_to_save` copy…).
    pub fn parse(raw: &str) -> Option<LoraKey> {
        let segments: Vec<&str> = raw.split('.').collect();
        let (lora_at, factor, kind) = segments
            .iter()
            .enumerate()
            .find_map(|(i, s)| lora_segment(s).map(|(f, k)| (i, f, k)))?;
        let before = segments.get(..lora_at)?;
        let after = segments.get(lora_at + 1..)?;
        let adapter_name = adapter_name_from_suffix(after, kind)?;
        if before.is_empty() {
            return None;
        }
        let module_path = before.join(".");
        let (layer, module) = split_layer(before);
        let canonical = canonical_name(&module_path, factor, kind);
        Some(LoraKey {
            canonical,
            module_path,
            layer,
            module,
            factor,
            kind,
            adapter_name: adapter_name.map(str::to_owned),
        })
    }

    /// The name PEFT uses when saving (no adapter name), e.g.
    /// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    /// Adapters are keyed and sorted by this name.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// Everything before the LoRA segment, e.g.
    /// `base_model.model.model.layers.0.self_attn.q_proj`. The `A` and `B`
    /// tensors of one adapted module share it.
    pub fn module_path(&self) -> &str {
        &self.module_path
    }

    /// The transformer layer index: the first all-digit segment of the path,
    /// `None` for modules outside the layer stack (`embed_tokens`, `lm_head`).
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    /// The module within its layer (`self_attn.q_proj`, `mlp.down_proj`,
    /// `attn.c_attn`); the whole path when there is no layer index.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// `A` or `B`.
    pub fn factor(&self) -> Factor {
        self.factor
    }

    /// Linear or embedding adapter.
    pub fn kind(&self) -> LoraKind {
        self.kind
    }

    /// The adapter name found in the raw key (`default` in
    /// `lora_A.default.weight`), if any.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter_name.as_deref()
    }
}

impl fmt::Display for LoraKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

fn lora_segment(segment: &str) -> Option<(Factor, LoraKind)> {
    match segment {
        "lora_A" => Some((Factor::A, LoraKind::Linear)),
        "lora_B" => Some((Factor::B, LoraKind::Linear)),
        "lora_embedding_A" => Some((Factor::A, LoraKind::Embedding)),
        "lora_embedding_B" => Some((Factor::B, LoraKind::Embedding)),
        _ => None,
    }
}

/// Reads what follows the LoRA segment. Accepted, with `N` an adapter name:
/// linear `weight` or `N.weight`; embedding nothing or `N` (PEFT stores
/// embedding factors as bare parameters). Returns `None` (not a LoRA matrix)
/// for anything else, such as `lora_B.bias`.
fn adapter_name_from_suffix<'a>(after: &[&'a str], kind: LoraKind) -> Option<Option<&'a str>> {
    match (kind, after) {
        (LoraKind::Linear, ["weight"]) => Some(None),
        (LoraKind::Linear, [name, "weight"]) if is_adapter_name(name) => Some(Some(*name)),
        (LoraKind::Embedding, []) => Some(None),
        (LoraKind::Embedding, [name]) if is_adapter_name(name) => Some(Some(*name)),
        _ => None,
    }
}

fn is_adapter_name(segment: &str) -> bool {
    !segment.is_empty() && segment != "weight" && segment != "bias"
}

fn split_layer(before: &[&str]) -> (Option<usize>, String) {
    let numbered = before
        .iter()
        .enumerate()
        .find_map(|(i, s)| parse_layer_index(s).map(|n| (i, n)));
    match numbered {
        Some((i, n)) => {
            let module = before.get(i + 1..).unwrap_or_default().join(".");
            (Some(n), module)
        }
        None => (None, before.join(".")),
    }
}

fn parse_layer_index(segment: &str) -> Option<usize> {
    if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
        segment.parse().ok()
    } else {
        None
    }
}

fn canonical_name(module_path: &str, factor: Factor, kind: LoraKind) -> String {
    let factor = match factor {
        Factor::A => "A",
        Factor::B => "B",
    };
    match kind {
        LoraKind::Linear => format!("{module_path}.lora_{factor}.weight"),
        LoraKind::Embedding => format!("{module_path}.lora_embedding_{factor}"),
    }
}
