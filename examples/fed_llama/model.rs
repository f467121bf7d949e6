//! A LLaMA-architecture decoder in burn 0.22 (RMSNorm, rotary embeddings,
//! grouped-query causal attention, SwiGLU MLP, tied or separate LM head),
//! LoRA on `q_proj` / `v_proj` through burn's `apply_lora`; its LoRA tensors
//! cross to and from the library's PEFT-orientation [`LoraAdapter`] through
//! the library's `burn` feature (`safe_fedllm::interop::burn`).

use burn::module::{Initializer, Lora, Module, Param, ParamGroup};
use burn::nn::{
    Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, RotaryEncoding,
    RotaryEncodingConfig,
};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use safe_fedllm::interop::burn::{BurnLora, BurnNames, write_lora};
use safe_fedllm::lora::{LoraAdapter, LoraConfig};
use serde::{Deserialize, Serialize};

/// The modules LoRA adapts (the paper's `target_modules`).
pub const LORA_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// Shape of a LLaMA decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention: `n_heads` is a multiple).
    pub n_kv_heads: usize,
    /// SwiGLU hidden size.
    pub d_ff: usize,
    /// Longest sequence the rotary table covers.
    pub max_seq_len: usize,
    /// Rotary base θ.
    pub rope_theta: f32,
    /// RMSNorm ε.
    pub rms_eps: f64,
    /// True when the LM head reuses the token embedding.
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Rejects shapes the blocks cannot be built with.
    pub fn check(&self) -> Result<(), String> {
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "d_model {} must be a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_heads {} must be a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even (RoPE)", self.head_dim()));
        }
        Ok(())
    }

    /// A randomly initialised model on `device`.
    pub fn init(&self, device: &Device) -> Llama {
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out).with_bias(false).init(device);
        let kv_dim = self.n_kv_heads * self.head_dim();
        let layers = (0..self.n_layers)
            .map(|_| DecoderLayer {
                attn_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.rms_eps)
                    .init(device),
                attn: Attention {
                    q_proj: linear(self.d_model, self.d_model),
                    k_proj: linear(self.d_model, kv_dim),
                    v_proj: linear(self.d_model, kv_dim),
                    o_proj: linear(self.d_model, self.d_model),
                    n_heads: self.n_heads,
                    n_kv_heads: self.n_kv_heads,
                },
                mlp_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.rms_eps)
                    .init(device),
                mlp: Mlp {
                    gate_proj: linear(self.d_model, self.d_ff),
                    up_proj: linear(self.d_model, self.d_ff),
                    down_proj: linear(self.d_ff, self.d_model),
                },
            })
            .collect();
        // burn's default N(0, 1) embedding makes the tied head's first logits
        // huge; N(0, 0.5/√d) keeps pre-training calm.
        let embed = EmbeddingConfig::new(self.vocab_size, self.d_model)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.5 / (self.d_model as f64).sqrt(),
            })
            .init(device);
        Llama {
            embed,
            layers,
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.rms_eps)
                .init(device),
            lm_head: (!self.tie_embeddings).then(|| linear(self.d_model, self.vocab_size)),
            rope: RotaryEncodingConfig::new(self.max_seq_len, self.head_dim())
                .with_theta(self.rope_theta)
                .init(device),
        }
    }
}

/// Grouped-query causal self-attention.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection (LoRA target).
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection (LoRA target).
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
}

impl Attention {
    fn forward(&self, x: Tensor<3>, rope: &RotaryEncoding) -> Tensor<3> {
        let [batch, seq, d_model] = x.dims();
        let head_dim = d_model / self.n_heads;
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let q = rope.forward(heads(self.q_proj.forward(x.clone()), self.n_heads));
        let k = rope.forward(heads(self.k_proj.forward(x.clone()), self.n_kv_heads));
        let v = heads(self.v_proj.forward(x), self.n_kv_heads);
        let group = self.n_heads / self.n_kv_heads;
        let k = repeat_kv(k, group);
        let v = repeat_kv(v, group);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = attention(q, k, v, None, None, options);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([batch, seq, d_model]))
    }
}

/// `[B, Hkv, S, hd]` → `[B, Hkv·group, S, hd]`, query head `h` reading
/// key/value head `h / group` (LLaMA's grouping).
fn repeat_kv(t: Tensor<4>, group: usize) -> Tensor<4> {
    if group == 1 {
        return t;
    }
    let [b, h, s, d] = t.dims();
    t.unsqueeze_dim::<5>(2)
        .repeat_dim(2, group)
        .reshape([b, h * group, s, d])
}

/// SwiGLU feed-forward block: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Self-attention.
    pub attn: Attention,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm,
    /// SwiGLU MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(&self, x: Tensor<3>, rope: &RotaryEncoding) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.attn_norm.forward(x), rope);
        x.clone() + self.mlp.forward(self.mlp_norm.forward(x))
    }
}

/// The decoder.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embedding.
    pub embed: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Separate LM head; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Rotary table.
    pub rope: RotaryEncoding,
}

/// A batch of token sequences with next-token targets and a loss mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input ids, `[batch, seq]` row-major.
    pub inputs: Vec<i64>,
    /// Target ids (inputs shifted by one), `[batch, seq]`.
    pub targets: Vec<i64>,
    /// 1.0 where the target counts, `[batch, seq]`.
    pub mask: Vec<f32>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq: usize,
}

impl Llama {
    /// Logits `[B, S, V]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let x = self.hidden(tokens);
        let [b, s, d] = x.dims();
        let logits = self.head(x.reshape([b * s, d]));
        let vocab = logits.dims()[1];
        logits.reshape([b, s, vocab])
    }

    /// The final-norm hidden states `[B, S, d]`.
    fn hidden(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let mut x = self.embed.forward(tokens);
        for layer in &self.layers {
            x = layer.forward(x, &self.rope);
        }
        self.norm.forward(x)
    }

    /// Logits `[N, V]` of hidden states `[N, d]`.
    fn head(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embed.weight.val().transpose()),
        }
    }

    /// Log-probability of every target token, `[B, S]` (unmasked).
    pub fn target_logprobs(&self, batch: &Batch, device: &Device) -> Tensor<2> {
        let shape = [batch.batch, batch.seq];
        let inputs =
            Tensor::<2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), device);
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(batch.targets.clone(), shape), device);
        let logprobs = log_softmax(self.forward(inputs), 2);
        logprobs
            .gather(2, targets.unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2)
    }

    /// Mean next-token cross-entropy over the masked positions (a scalar).
    pub fn loss(&self, batch: &Batch, device: &Device) -> Tensor<1> {
        let shape = [batch.batch, batch.seq];
        let mask = Tensor::<2>::from_data(TensorData::new(batch.mask.clone(), shape), device);
        let count = batch.mask.iter().sum::<f32>().max(1.0);
        (self.target_logprobs(batch, device) * mask)
            .sum()
            .neg()
            .div_scalar(count)
    }

    /// Sum of masked target log-probabilities per row. Only the masked
    /// (answer) positions go through the head and the softmax over the
    /// vocabulary, which is most of an evaluation's work.
    pub fn row_logprobs(&self, batch: &Batch, device: &Device) -> Vec<f32> {
        let mut sums = vec![0.0f32; batch.batch];
        let positions: Vec<usize> = (0..batch.mask.len())
            .filter(|&i| batch.mask.get(i).is_some_and(|&m| m != 0.0))
            .collect();
        if positions.is_empty() || batch.seq == 0 {
            return sums;
        }
        let n = positions.len();
        let shape = [batch.batch, batch.seq];
        let inputs =
            Tensor::<2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), device);
        let x = self.hidden(inputs);
        let [b, s, d] = x.dims();
        let index: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n]), device);
        let targets: Vec<i64> = positions
            .iter()
            .map(|&p| batch.targets.get(p).copied().unwrap_or(0))
            .collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
        let logprobs = log_softmax(self.head(x.reshape([b * s, d]).select(0, index)), 1)
            .gather(1, targets)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        for (&p, lp) in positions.iter().zip(logprobs) {
            if let Some(sum) = sums.get_mut(p / batch.seq) {
                *sum += lp;
            }
        }
        sums
    }

    /// Freezes every base parameter and attaches LoRA (rank, α) to every
    /// layer's `q_proj` and `v_proj` (burn's `apply_lora`: A ~ N(0, 1/r), B = 0).
    pub fn with_lora(self, rank: usize, alpha: f64) -> Self {
        // burn paths look like `layers.3.attn.q_proj.weight`.
        let group = ParamGroup::from_regex(r"^layers\.\d+\.attn\.(q_proj|v_proj)\.weight$")
            .expect("static regex compiles");
        self.apply_lora(Lora::new(rank, alpha).set_param_group(group))
    }

    /// The LoRA tensors in PEFT orientation and naming
    /// (`base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight`),
    /// through the library's `burn` interop: burn keeps `a: [d_in, r]` and
    /// `b: [r, d_out]`, the transposes of PEFT's `lora_A: [r, in]` and
    /// `lora_B: [out, r]`, and [`BurnLora`] flips them at the boundary.
    pub fn lora_adapter(&self, rank: usize, alpha: f64) -> Result<LoraAdapter, String> {
        let mut adapter = BurnLora::from_module(self, &BurnNames::llama())
            .map_err(|e| e.to_string())?
            .into_adapter();
        // Exactly the q_proj / v_proj factors of every layer, nothing else.
        let wanted = self.layers.len() * LORA_TARGETS.len() * 2;
        for layer in 0..self.layers.len() {
            for module in LORA_TARGETS {
                for factor in ["A", "B"] {
                    let key = peft_key(layer, module, factor);
                    if adapter.get(&key).is_none() {
                        return Err(format!("the model carries no LoRA tensor {key}"));
                    }
                }
            }
        }
        if adapter.len() != wanted {
            return Err(format!(
                "the model carries {} LoRA tensors, expected {wanted} ({LORA_TARGETS:?} of every layer)",
                adapter.len()
            ));
        }
        adapter.set_config(LoraConfig {
            rank: Some(rank),
            alpha: Some(alpha),
            target_modules: LORA_TARGETS.iter().map(|s| (*s).to_owned()).collect(),
        });
        Ok(adapter)
    }

    /// Loads a PEFT-orientation adapter into the model's LoRA factors with
    /// the library's [`write_lora`] (burn-store `apply` by path). The key sets
    /// must match exactly and every tensor must have the PEFT shape of the
    /// model's factor; on error the model is unchanged. Each factor stays on
    /// its parameter's device, so `_device` is not needed (kept so callers
    /// read the same as before).
    pub fn load_lora(&mut self, adapter: &LoraAdapter, _device: &Device) -> Result<(), String> {
        write_lora(self, adapter, &BurnNames::llama())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// PEFT key of a LoRA factor (the name `BurnNames::llama` gives burn's
/// `layers.{layer}.attn.{module}.weight.lora.{a,b}`).
pub fn peft_key(layer: usize, module: &str, factor: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight")
}

/// A parameter built from a vector.
pub fn param_1d(values: Vec<f32>, device: &Device) -> Param<Tensor<1>> {
    let len = values.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, [len]), device))
}
