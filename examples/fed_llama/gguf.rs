//! `--gguf PATH`: a LLaMA-architecture GGUF (e.g. SmolLM2-135M-Instruct)
//! read with candle-core, dequantised to f32 and copied into the burn model;
//! the tokenizer comes from the GGUF metadata.
//!
//! GGUF stores linear weights as `[out, in]` (PyTorch order) and burn's
//! `Linear` as `[in, out]`, so every projection is transposed on the way in.
//! llama.cpp's converter already permuted q/k rows for the interleaved-pair
//! rotary convention, which is the one burn's `RotaryEncoding` uses.

use std::fs::File;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

use crate::data::TextCodec;
use crate::model::{Llama, LlamaConfig, param_1d};

/// A loaded GGUF model.
pub struct Loaded {
    /// The burn model (no LoRA yet).
    pub model: Llama,
    /// Its shape, read from the metadata.
    pub config: LlamaConfig,
    /// Tokenizer and chat format.
    pub codec: GgufCodec,
}

/// The GGUF's tokenizer with a ChatML chat format (SmolLM2's template).
pub struct GgufCodec {
    tokenizer: Tokenizer,
    end_id: u32,
}

impl GgufCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode(natural(text), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

/// The corpus separates punctuation with spaces for the word tokenizer; a
/// real model reads ordinary text.
fn natural(text: &str) -> String {
    [" ,", " .", " ?", " !", " :"]
        .iter()
        .fold(text.to_owned(), |t, p| t.replace(p, &p[1..]))
}

impl TextCodec for GgufCodec {
    fn encode_prompt(&self, prompt: &str) -> Vec<u32> {
        self.encode(&format!(
            "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ))
    }

    fn encode_answer(&self, answer: &str) -> Vec<u32> {
        let mut ids = self.encode(answer);
        ids.push(self.end_id);
        ids
    }

    fn pad_id(&self) -> u32 {
        self.end_id
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value, String> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata has no `{key}`"))
}

fn meta_usize(content: &Content, key: &str) -> Result<usize, String> {
    let v = meta(content, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .map_err(|e| format!("`{key}`: {e}"))
}

fn meta_f32(content: &Content, key: &str, default: f32) -> Result<f32, String> {
    match content.metadata.get(key) {
        None => Ok(default),
        Some(v) => v.to_f32().map_err(|e| format!("`{key}`: {e}")),
    }
}

/// Reads the model and tokenizer from `path`.
pub fn load(path: &Path, device: &Device) -> Result<Loaded, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| format!("{}: {e}", path.display()))?;
    let arch = meta(&content, "general.architecture")?
        .to_string()
        .map_err(|e| e.to_string())?
        .clone();
    if arch != "llama" {
        return Err(format!(
            "{}: architecture `{arch}`, expected `llama`",
            path.display()
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let mut tensor = |name: &str| -> Result<(Vec<f32>, Vec<usize>), String> {
        let q = content
            .tensor(&mut file, name, &candle_core::Device::Cpu)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let t = q
            .dequantize(&candle_core::Device::Cpu)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let dims = t.dims().to_vec();
        let values = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        Ok((values, dims))
    };
    let (embed, embed_dims) = tensor("token_embd.weight")?;
    let [vocab_size, d_model] = embed_dims[..] else {
        return Err(format!("token_embd.weight has shape {embed_dims:?}"));
    };
    let context = meta_usize(&content, &key("context_length")).unwrap_or(2048);
    let config = LlamaConfig {
        vocab_size,
        d_model,
        n_layers: meta_usize(&content, &key("block_count"))?,
        n_heads: meta_usize(&content, &key("attention.head_count"))?,
        n_kv_heads: meta_usize(&content, &key("attention.head_count_kv"))?,
        d_ff: meta_usize(&content, &key("feed_forward_length"))?,
        max_seq_len: context.min(512),
        rope_theta: meta_f32(&content, &key("rope.freq_base"), 10_000.0)?,
        rms_eps: f64::from(meta_f32(
            &content,
            &key("attention.layer_norm_rms_epsilon"),
            1e-5,
        )?),
        tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
    };
    config.check()?;
    let mut model = config.init(device);
    model.embed.weight = matrix(embed, [vocab_size, d_model], false, device);
    // `[out, in]` in the file → `[in, out]` for burn's Linear.
    let mut linear = |name: &str| -> Result<Param<Tensor<2>>, String> {
        let (values, dims) = tensor(name)?;
        let [out, inp] = dims[..] else {
            return Err(format!("{name} has shape {dims:?}"));
        };
        Ok(matrix(values, [out, inp], true, device))
    };
    for i in 0..config.n_layers {
        let layer = &mut model.layers[i];
        layer.attn.q_proj.weight = linear(&format!("blk.{i}.attn_q.weight"))?;
        layer.attn.k_proj.weight = linear(&format!("blk.{i}.attn_k.weight"))?;
        layer.attn.v_proj.weight = linear(&format!("blk.{i}.attn_v.weight"))?;
        layer.attn.o_proj.weight = linear(&format!("blk.{i}.attn_output.weight"))?;
        layer.mlp.gate_proj.weight = linear(&format!("blk.{i}.ffn_gate.weight"))?;
        layer.mlp.up_proj.weight = linear(&format!("blk.{i}.ffn_up.weight"))?;
        layer.mlp.down_proj.weight = linear(&format!("blk.{i}.ffn_down.weight"))?;
    }
    if let Some(head) = model.lm_head.as_mut() {
        head.weight = linear("output.weight")?;
    }
    for i in 0..config.n_layers {
        let (attn_norm, _) = tensor(&format!("blk.{i}.attn_norm.weight"))?;
        let (ffn_norm, _) = tensor(&format!("blk.{i}.ffn_norm.weight"))?;
        model.layers[i].attn_norm.gamma = param_1d(attn_norm, device);
        model.layers[i].mlp_norm.gamma = param_1d(ffn_norm, device);
    }
    model.norm.gamma = param_1d(tensor("output_norm.weight")?.0, device);

    let tokenizer = Tokenizer::from_gguf(&content).map_err(|e| format!("GGUF tokenizer: {e}"))?;
    let end_id = tokenizer
        .token_to_id("<|im_end|>")
        .or_else(|| {
            content
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.to_u32().ok())
        })
        .ok_or("GGUF tokenizer has neither <|im_end|> nor an eos token id")?;
    Ok(Loaded {
        model,
        config,
        codec: GgufCodec { tokenizer, end_id },
    })
}

fn matrix(
    values: Vec<f32>,
    shape: [usize; 2],
    transpose: bool,
    device: &Device,
) -> Param<Tensor<2>> {
    let t = Tensor::<2>::from_data(TensorData::new(values, shape), device);
    let t = if transpose { t.transpose() } else { t };
    // Materialise the transpose so later matmuls read a contiguous weight.
    let data = t.into_data();
    Param::from_tensor(Tensor::from_data(data, device))
}
