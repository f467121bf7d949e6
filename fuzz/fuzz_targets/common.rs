//! Decoding fuzz bytes into a small round (shared by the invariant targets).

#![allow(dead_code)]

use safe_fedllm::lora::{LoraAdapter, LoraTensor};

pub const KEY_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
pub const KEY_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// Reads fuzz bytes front to back; exhausted input reads as zeros.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| acc << 8 | u64::from(self.u8()))
    }

    /// A value: one tag byte picks an interesting class (NaN, ±∞, 1e20,
    /// f32::MAX, 0, ...), otherwise raw bits or a small value.
    pub fn f32(&mut self) -> f32 {
        match self.u8() % 12 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 1e20,
            4 => f32::MAX,
            5 => -f32::MAX,
            6 => 0.0,
            7 => f32::from_bits(self.u64() as u32),
            _ => (self.u8() as i8) as f32 / 16.0,
        }
    }

    pub fn count(&mut self) -> u64 {
        match self.u8() % 6 {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << 40,
            _ => u64::from(self.u8()) + 1,
        }
    }
}

/// An adapter with one rank-1 q_proj pair: A is [1, 2], B is [2, 1].
pub fn adapter(values: [f32; 4]) -> LoraAdapter {
    let [a0, a1, b0, b1] = values;
    let mut adapter = LoraAdapter::new();
    let a = LoraTensor::new("a", [1, 2], vec![a0, a1]).expect("shape");
    let b = LoraTensor::new("b", [2, 1], vec![b0, b1]).expect("shape");
    adapter.insert(KEY_A, a).expect("key");
    adapter.insert(KEY_B, b).expect("key");
    adapter
}

pub fn flat(adapter: &LoraAdapter) -> Vec<f32> {
    let mut out = Vec::new();
    for key in [KEY_A, KEY_B] {
        out.extend_from_slice(adapter.get(key).expect("key").as_slice());
    }
    out
}
