//! Shared bench inputs: a Llama-3.1-8B-shaped LoRA adapter (32 layers, q_proj
//! 4096→4096 and v_proj 4096→1024, r = 8: 3,407,872 parameters) filled with
//! deterministic pseudo-random values from the crate's own generator.

#![allow(dead_code)] // each bench uses a different subset

use safe_fedllm::lora::{LoraAdapter, LoraTensor};
use safe_fedllm::rng::Rng;

/// Transformer layers.
pub const LAYERS: usize = 32;
/// Hidden size (q_proj in and out, v_proj in).
pub const HIDDEN: usize = 4096;
/// v_proj output size (8 KV heads × 128).
pub const KV: usize = 1024;
/// LoRA rank.
pub const RANK: usize = 8;

/// `n` values uniform in `[-scale/2, scale/2)` from the crate's generator seeded with `seed`.
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
        .collect()
}

/// A Llama-3.1-8B-shaped adapter in PEFT names and orientation.
pub fn llama8b_adapter(seed: u64) -> LoraAdapter {
    let mut adapter = LoraAdapter::new();
    for layer in 0..LAYERS {
        for (module, out) in [("q_proj", HIDDEN), ("v_proj", KV)] {
            let path = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            let s = seed + (layer as u64) * 4;
            let a = LoraTensor::new("a", [RANK, HIDDEN], values(s, RANK * HIDDEN, 0.02)).unwrap();
            let b = LoraTensor::new("b", [out, RANK], values(s + 1, out * RANK, 0.02)).unwrap();
            adapter.insert(&format!("{path}.lora_A.weight"), a).unwrap();
            adapter.insert(&format!("{path}.lora_B.weight"), b).unwrap();
        }
    }
    adapter
}
