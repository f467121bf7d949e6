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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoraKey {
    /// `{module_path}.lora_A.weight` or `{module_path}.lora_embedding_A`.
    canonical: String,
    /// `canonical[..module_path_end]` is the module path.
    module_path_end: usize,
    /// `canonical[module_start..module_path_end]` is the module.
    module_start: usize,
    layer: Option<usize>,
    factor: Factor,
    kind: LoraKind,
    adapter_name: Option<String>,
}

impl LoraKey {
    /// Parses a tensor name; `None` when the name is not a LoRA `A`/`B` matrix
    /// (a bias, a DoRA magnitude vector, a fully trained `modules_to_save` copy…).
    ///
    /// Works on byte offsets with one allocation for the canonical name (plus
    /// one for an adapter name): a server parses every key of every upload.
    pub fn parse(raw: &str) -> Option<LoraKey> {
        let (lora_start, lora_len, factor, kind) = find_lora_segment(raw)?;
        // The module path ends at the dot before the LoRA segment.
        let module_path = raw.get(..lora_start.checked_sub(1)?)?;
        if module_path.is_empty() {
            return None;
        }
        let suffix = raw.get(lora_start + lora_len..)?;
        let adapter_name = adapter_name_from_suffix(suffix, kind)?;
        let (layer, module_start) = find_layer(module_path);
        Some(LoraKey {
            canonical: canonical_name(module_path, factor, kind),
            module_path_end: module_path.len(),
            module_start,
            layer,
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
    // `parse` sets both offsets from `module_path`, which `canonical` starts
    // with (module_start is a segment start inside it); the fields are private
    // and never change: the ranges are in bounds and on char boundaries.
    #[allow(clippy::indexing_slicing)] // module_start ≤ module_path_end ≤ canonical.len(), set by parse
    pub fn module_path(&self) -> &str {
        &self.canonical[..self.module_path_end]
    }

    /// The transformer layer index: the first all-digit segment of the path,
    /// `None` for modules outside the layer stack (`embed_tokens`, `lm_head`).
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    /// The module within its layer (`self_attn.q_proj`, `mlp.down_proj`,
    /// `attn.c_attn`); the whole path when there is no layer index.
    #[allow(clippy::indexing_slicing)] // module_start ≤ module_path_end ≤ canonical.len(), set by parse
    pub fn module(&self) -> &str {
        &self.canonical[self.module_start..self.module_path_end]
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

/// Serialised as its canonical name (the adapter name is not kept).
impl Serialize for LoraKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.canonical)
    }
}

impl<'de> Deserialize<'de> for LoraKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        LoraKey::parse(&raw).ok_or_else(|| {
            serde::de::Error::custom(format!("`{raw}` is not a LoRA A/B tensor name"))
        })
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

/// `(byte offset, length, factor, kind)` of the first LoRA segment.
fn find_lora_segment(raw: &str) -> Option<(usize, usize, Factor, LoraKind)> {
    segments(raw).find_map(|(at, seg)| lora_segment(seg).map(|(f, k)| (at, seg.len(), f, k)))
}

/// Dot-separated segments with their byte offsets. Splits bytes rather than
/// chars: `.` is ASCII, so every piece is still valid UTF-8, and the byte
/// loop is several times cheaper than the `char` pattern searcher.
fn segments(s: &str) -> impl Iterator<Item = (usize, &str)> {
    s.split('.').scan(0usize, move |at, piece| {
        let start = *at;
        *at += piece.len() + 1;
        Some((start, piece))
    })
}

/// Reads what follows the LoRA segment (`suffix` starts at the dot, or is
/// empty). Accepted, with `N` an adapter name: linear `.weight` or
/// `.N.weight`; embedding nothing or `.N` (PEFT stores embedding factors as
/// bare parameters). Returns `None` (not a LoRA matrix) for anything else,
/// such as `lora_B.bias`.
fn adapter_name_from_suffix(suffix: &str, kind: LoraKind) -> Option<Option<&str>> {
    if suffix.is_empty() {
        return (kind == LoraKind::Embedding).then_some(None);
    }
    let rest = suffix.strip_prefix('.')?;
    match (kind, rest.split_once('.')) {
        (LoraKind::Linear, None) if rest == "weight" => Some(None),
        (LoraKind::Linear, Some((name, "weight"))) if is_adapter_name(name) => Some(Some(name)),
        (LoraKind::Embedding, None) if is_adapter_name(rest) => Some(Some(rest)),
        _ => None,
    }
}

fn is_adapter_name(segment: &str) -> bool {
    !segment.is_empty() && !segment.contains('.') && segment != "weight" && segment != "bias"
}

/// The first all-digit segment of the module path as the layer, and where
/// the module (what follows it) starts; without one, the whole path is the
/// module.
fn find_layer(module_path: &str) -> (Option<usize>, usize) {
    segments(module_path)
        .find_map(|(at, seg)| parse_layer_index(seg).map(|n| (Some(n), at + seg.len() + 1)))
        .map_or((None, 0), |(layer, start)| {
            (layer, start.min(module_path.len()))
        })
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
    let (infix, suffix) = match kind {
        LoraKind::Linear => (".lora_", ".weight"),
        LoraKind::Embedding => (".lora_embedding_", ""),
    };
    let mut name = String::with_capacity(module_path.len() + infix.len() + 1 + suffix.len());
    name.push_str(module_path);
    name.push_str(infix);
    name.push_str(factor);
    name.push_str(suffix);
    name
}
