//! The key-name table: every PEFT spelling real files use.

use safe_fedllm::lora::{Factor, LoraKey, LoraKind};

struct Row {
    raw: &'static str,
    layer: Option<usize>,
    module: &'static str,
    factor: Factor,
    kind: LoraKind,
    adapter: Option<&'static str>,
    canonical: &'static str,
}

#[rustfmt::skip]
const TABLE: &[Row] = &[
    // PEFT saved file (adapter name stripped), LLaMA.
    Row { raw: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", layer: Some(0), module: "self_attn.q_proj", factor: Factor::A, kind: LoraKind::Linear, adapter: None,
          canonical: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" },
    // In-memory state dict with the adapter name.
    Row { raw: "base_model.model.model.layers.31.self_attn.v_proj.lora_B.default.weight", layer: Some(31), module: "self_attn.v_proj", factor: Factor::B, kind: LoraKind::Linear, adapter: Some("default"),
          canonical: "base_model.model.model.layers.31.self_attn.v_proj.lora_B.weight" },
    // A custom adapter name.
    Row { raw: "base_model.model.model.layers.2.mlp.down_proj.lora_A.safety.weight", layer: Some(2), module: "mlp.down_proj", factor: Factor::A, kind: LoraKind::Linear, adapter: Some("safety"),
          canonical: "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" },
    // Embedding adapters: saved without `.weight`, in memory with the adapter name.
    Row { raw: "base_model.model.model.embed_tokens.lora_embedding_A", layer: None, module: "base_model.model.model.embed_tokens", factor: Factor::A, kind: LoraKind::Embedding, adapter: None,
          canonical: "base_model.model.model.embed_tokens.lora_embedding_A" },
    Row { raw: "base_model.model.model.embed_tokens.lora_embedding_B.default", layer: None, module: "base_model.model.model.embed_tokens", factor: Factor::B, kind: LoraKind::Embedding, adapter: Some("default"),
          canonical: "base_model.model.model.embed_tokens.lora_embedding_B" },
    // GPT-2 style.
    Row { raw: "base_model.model.transformer.h.11.attn.c_attn.lora_B.weight", layer: Some(11), module: "attn.c_attn", factor: Factor::B, kind: LoraKind::Linear, adapter: None,
          canonical: "base_model.model.transformer.h.11.attn.c_attn.lora_B.weight" },
    // Falcon / BLOOM style.
    Row { raw: "base_model.model.transformer.h.3.self_attention.query_key_value.lora_A.weight", layer: Some(3), module: "self_attention.query_key_value", factor: Factor::A, kind: LoraKind::Linear, adapter: None,
          canonical: "base_model.model.transformer.h.3.self_attention.query_key_value.lora_A.weight" },
    // T5: the first number is the block; the rest is the module.
    Row { raw: "base_model.model.encoder.block.5.layer.0.SelfAttention.q.lora_A.weight", layer: Some(5), module: "layer.0.SelfAttention.q", factor: Factor::A, kind: LoraKind::Linear, adapter: None,
          canonical: "base_model.model.encoder.block.5.layer.0.SelfAttention.q.lora_A.weight" },
    // Without the PEFT wrapper prefix (e.g. a merged-key export).
    Row { raw: "model.layers.7.self_attn.k_proj.lora_B.weight", layer: Some(7), module: "self_attn.k_proj", factor: Factor::B, kind: LoraKind::Linear, adapter: None,
          canonical: "model.layers.7.self_attn.k_proj.lora_B.weight" },
    // Outside the layer stack.
    Row { raw: "base_model.model.lm_head.lora_A.weight", layer: None, module: "base_model.model.lm_head", factor: Factor::A, kind: LoraKind::Linear, adapter: None,
          canonical: "base_model.model.lm_head.lora_A.weight" },
];

#[test]
fn every_spelling_in_the_table_parses() {
    for row in TABLE {
        let key = LoraKey::parse(row.raw).unwrap_or_else(|| panic!("{} should parse", row.raw));
        assert_eq!(key.layer(), row.layer, "{}", row.raw);
        assert_eq!(key.module(), row.module, "{}", row.raw);
        assert_eq!(key.factor(), row.factor, "{}", row.raw);
        assert_eq!(key.kind(), row.kind, "{}", row.raw);
        assert_eq!(key.adapter_name(), row.adapter, "{}", row.raw);
        assert_eq!(key.canonical(), row.canonical, "{}", row.raw);
        // Canonical names are fixed points.
        assert_eq!(
            LoraKey::parse(key.canonical()).unwrap().canonical(),
            row.canonical
        );
    }
}

#[test]
fn names_that_are_not_lora_matrices_are_not_parsed() {
    for raw in [
        "base_model.model.model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.bias",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
        "lora_A.weight",
        "x.lora_A",
        "x.lora_A.weight.extra",
        "x.lora_embedding_A.weight",
    ] {
        assert!(
            LoraKey::parse(raw).is_none(),
            "{raw} must not parse as a LoRA matrix"
        );
    }
}

mod props {
    use proptest::prelude::*;
    use safe_fedllm::lora::LoraKey;

    proptest! {
        /// Any string: no panic; a parsed key's canonical name is a fixed point
        /// with the same layer, module, factor and kind.
        #[test]
        fn parsing_is_total_and_canonical_is_a_fixed_point(
            raw in "[a-z0-9_.]{0,12}(\\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B))?(\\.[a-z0-9]{1,7})?(\\.weight)?",
        ) {
            if let Some(key) = LoraKey::parse(&raw) {
                let again = LoraKey::parse(key.canonical()).expect("canonical names parse");
                prop_assert_eq!(again.canonical(), key.canonical());
                prop_assert_eq!(again.layer(), key.layer());
                prop_assert_eq!(again.module(), key.module());
                prop_assert_eq!(again.module_path(), key.module_path());
                prop_assert_eq!(again.factor(), key.factor());
                prop_assert_eq!(again.kind(), key.kind());
                prop_assert!(key.module_path().len() < key.canonical().len());
            }
        }
    }
}
