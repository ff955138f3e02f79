//! [`GgufSource`]: a BitNet GGUF file (bitnet.cpp's `ggml-model-i2_s.gguf`) as a
//! [`WeightSource`], plus its metadata mapped onto [`HfConfig`] and its tokenizer data.
//!
//! # Tensor names
//! All in [`ternary_tensor_name`], [`norm_tensor_name`] and the constants below (checked against
//! the names in `shared/fixtures/gguf-tiny/ggml-model-i2_s.gguf`):
//!
//! | GGUF | Hugging Face |
//! |---|---|
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` (absent when tied) | `lm_head.weight` |
//! | `blk.N.attn_q/attn_k/attn_v/attn_output.weight` | `model.layers.N.self_attn.{q,k,v,o}_proj.weight` |
//! | `blk.N.ffn_gate/ffn_up/ffn_down.weight` | `model.layers.N.mlp.{gate,up,down}_proj.weight` |
//! | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
//! | `blk.N.attn_sub_norm.weight` | `model.layers.N.self_attn.attn_sub_norm.weight` |
//! | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
//! | `blk.N.ffn_sub_norm.weight` | `model.layers.N.mlp.ffn_sub_norm.weight` |
//!
//! # q/k rows: no RoPE permutation
//! llama.cpp's LLaMA converters permute the rows of q/k for the interleaved RoPE convention.
//! BitNet's do not: the fixture (architecture `bitnet-25`, 4 q heads and 1 kv head of 64) decodes
//! to exactly the Hugging Face row order of `q_proj`/`k_proj` (checked in tests/gguf.rs, which
//! also checks that the llama-permuted order does NOT match), and llama.cpp runs these
//! architectures with NEOX (rotate-half) RoPE. By source reading, bitnet.cpp's
//! `convert-hf-to-gguf-bitnet.py` (`bitnet-b1.58`) and mainline llama.cpp's
//! `convert_hf_to_gguf.py` (`bitnet`) do not permute either. So the canonical form is the GGUF
//! rows as they are, and the model applies rotate-half RoPE.
//!
//! # Scales
//! `TernaryCodes::scale` is the f32 stored after the I2_S codes, unchanged. On the fixture it
//! equals transformers' online `1 / inv` bit for bit (with mean|W| summed in torch's order; see
//! [`super::i2s`]). Norms are the stored F32 values; the embedding keeps its stored dtype (F16 in
//! bitnet.cpp files, which rounds bf16 masters to f16: exact except f16-subnormal values).

use std::path::Path;

use crate::config::{HfConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};

use super::reader::{GgufDType, GgufFile, GgufTensorInfo, GgufValue};

/// Architectures (`general.architecture`) that [`GgufSource`] maps to BitNet b1.58.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["bitnet-b1.58", "bitnet-25", "bitnet"];

/// The token embedding, `[vocab][hidden]` (ne `[hidden, vocab]`).
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// The final RMSNorm weight.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// The untied LM head; absent when the head is tied to the embedding.
pub const OUTPUT: &str = "output.weight";

/// GGUF name of a BitLinear projection of a layer, e.g. `blk.3.attn_q.weight`.
pub fn ternary_tensor_name(layer: usize, proj: Proj) -> String {
    let p = match proj {
        Proj::Q => "attn_q",
        Proj::K => "attn_k",
        Proj::V => "attn_v",
        Proj::O => "attn_output",
        Proj::Gate => "ffn_gate",
        Proj::Up => "ffn_up",
        Proj::Down => "ffn_down",
    };
    format!("blk.{layer}.{p}.weight")
}

/// GGUF name of an RMSNorm weight of a layer, e.g. `blk.3.attn_sub_norm.weight`.
pub fn norm_tensor_name(layer: usize, which: LayerNorm) -> String {
    let n = match which {
        LayerNorm::Input => "attn_norm",
        LayerNorm::AttnSub => "attn_sub_norm",
        LayerNorm::PostAttention => "ffn_norm",
        LayerNorm::FfnSub => "ffn_sub_norm",
    };
    format!("blk.{layer}.{n}.weight")
}

/// Tokenizer metadata keys (llama.cpp names).
pub mod keys {
    /// Tokenizer family, e.g. `gpt2` (BPE) or `llama` (SentencePiece).
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// Pre-tokenizer name (absent in bitnet.cpp files).
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Token strings, by id.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// BPE merges, `"a b"` each.
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Token types (llama.cpp `llama_token_type`), by id.
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// Token scores, by id.
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// Beginning-of-sequence id.
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    /// End-of-sequence id.
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    /// End-of-turn id.
    pub const EOT: &str = "tokenizer.ggml.eot_token_id";
    /// Padding id.
    pub const PAD: &str = "tokenizer.ggml.padding_token_id";
    /// Whether to prepend BOS.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether to append EOS.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    /// The Jinja chat template (bitnet.cpp writes its own `Human: ... BITNETAssistant:` one).
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// A BitNet b1.58 GGUF file read as a [`WeightSource`]. Opening validates the container, the
/// architecture, the metadata (mapped to [`HfConfig`] and resolved) and the types of the
/// tokenizer keys; tensors are decoded on request and checked against the configuration.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    arch: String,
    hf: HfConfig,
    cfg: ModelConfig,
}

impl GgufSource {
    /// Opens (memory-maps) and validates a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufSource> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wraps an already parsed file, validating it as BitNet.
    pub fn from_file(file: GgufFile) -> Result<GgufSource> {
        let (arch, hf) = map_config(&file)?;
        let cfg = hf.resolve()?;
        let src = GgufSource { file, arch, hf, cfg };
        src.validate_tokenizer_keys()?;
        Ok(src)
    }

    /// The underlying file (raw metadata, tensor infos).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// `general.architecture`, one of [`SUPPORTED_ARCHITECTURES`].
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    /// The metadata as a Hugging Face config (field names as in config.json): dims from
    /// `{arch}.*`, vocab from the token list (else `{arch}.vocab_size`, else the embedding),
    /// `tie_word_embeddings` = no `output.weight`, `model_type` "bitnet", `architectures`
    /// `["BitNetForCausalLM"]`, `hidden_act` "relu2". Floats stored as f32 are given as the
    /// shortest decimal that rounds to them (1e-5, not 9.99999974e-6).
    pub fn hf_config(&self) -> Result<HfConfig> {
        Ok(self.hf.clone())
    }

    /// The resolved configuration that tensor shapes are checked against.
    pub fn model_config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// `tokenizer.ggml.model` (e.g. `gpt2` for BPE).
    pub fn tokenizer_model(&self) -> Option<&str> {
        self.file.meta_str(keys::MODEL).ok().flatten()
    }

    /// `tokenizer.ggml.pre`, the pre-tokenizer name (bitnet.cpp does not write it).
    pub fn tokenizer_pre(&self) -> Option<&str> {
        self.file.meta_str(keys::PRE).ok().flatten()
    }

    /// Token strings by id (`tokenizer.ggml.tokens`), borrowed from the parsed metadata.
    pub fn tokenizer_tokens(&self) -> Option<&[String]> {
        self.file.meta_str_array(keys::TOKENS).ok().flatten()
    }

    /// BPE merges (`tokenizer.ggml.merges`), `"left right"` each.
    pub fn tokenizer_merges(&self) -> Option<&[String]> {
        self.file.meta_str_array(keys::MERGES).ok().flatten()
    }

    /// Token types by id (`tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte).
    pub fn tokenizer_token_types(&self) -> Option<Vec<i32>> {
        let v = self.file.meta_int_array(keys::TOKEN_TYPE).ok().flatten()?;
        v.into_iter().map(|x| i32::try_from(x).ok()).collect()
    }

    /// Token scores by id (`tokenizer.ggml.scores`).
    pub fn tokenizer_scores(&self) -> Option<&[f32]> {
        self.file.meta_f32_array(keys::SCORES).ok().flatten()
    }

    /// `tokenizer.ggml.bos_token_id`.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.token_id(keys::BOS)
    }

    /// `tokenizer.ggml.eos_token_id` (bitnet.cpp writes tokenizer_config's eos, `<|eot_id|>`).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.token_id(keys::EOS)
    }

    /// `tokenizer.ggml.eot_token_id`.
    pub fn eot_token_id(&self) -> Option<u32> {
        self.token_id(keys::EOT)
    }

    /// `tokenizer.ggml.padding_token_id`.
    pub fn padding_token_id(&self) -> Option<u32> {
        self.token_id(keys::PAD)
    }

    /// `tokenizer.ggml.add_bos_token`.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.file.meta_bool(keys::ADD_BOS).ok().flatten()
    }

    /// `tokenizer.ggml.add_eos_token`.
    pub fn add_eos_token(&self) -> Option<bool> {
        self.file.meta_bool(keys::ADD_EOS).ok().flatten()
    }

    /// `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.file.meta_str(keys::CHAT_TEMPLATE).ok().flatten()
    }

    fn token_id(&self, key: &str) -> Option<u32> {
        self.file.meta_u64(key).ok().flatten().and_then(|v| u32::try_from(v).ok())
    }

    /// Checks the types (and id ranges) of the tokenizer keys, so the accessors above, which
    /// return None for absent keys, never hide a malformed one.
    fn validate_tokenizer_keys(&self) -> Result<()> {
        let f = &self.file;
        f.meta_str(keys::MODEL)?;
        f.meta_str(keys::PRE)?;
        f.meta_str(keys::CHAT_TEMPLATE)?;
        f.meta_bool(keys::ADD_BOS)?;
        f.meta_bool(keys::ADD_EOS)?;
        f.meta_str_array(keys::MERGES)?;
        f.meta_f32_array(keys::SCORES)?;
        let n_tokens = f.meta_str_array(keys::TOKENS)?.map(|t| t.len());
        if let Some(types) = f.meta_int_array(keys::TOKEN_TYPE)? {
            if types.iter().any(|&t| i32::try_from(t).is_err()) {
                return Err(Error::format(
                    f.path(),
                    format!("metadata key {:?}: a value does not fit i32", keys::TOKEN_TYPE),
                ));
            }
            if let Some(n) = n_tokens.filter(|&n| n != types.len()) {
                return Err(Error::format(
                    f.path(),
                    format!("metadata key {:?} has {} entries but there are {n} tokens", keys::TOKEN_TYPE, types.len()),
                ));
            }
        }
        let vocab = self.cfg.vocab_size as u64;
        for key in [keys::BOS, keys::EOS, keys::EOT, keys::PAD] {
            if let Some(id) = f.meta_u64(key)? {
                if id >= vocab {
                    return Err(Error::format(
                        f.path(),
                        format!("metadata key {key:?}: token id {id} >= vocab size {vocab}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn fmt_err(&self, msg: String) -> Error {
        Error::format(self.file.path(), msg)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::input(format!(
                "layer {layer} out of range: {} has {} layers",
                self.file.path().display(),
                self.cfg.num_layers
            )));
        }
        Ok(())
    }

    /// The info of `name`, checked to be `rows x cols` (ne `[cols, rows]`; a 1-D tensor when
    /// `rows` is None).
    fn shaped(&self, name: &str, rows: Option<usize>, cols: usize) -> Result<&GgufTensorInfo> {
        let t = self.file.require_tensor(name)?;
        let want: Vec<u64> = match rows {
            Some(r) => vec![cols as u64, r as u64],
            None => vec![cols as u64],
        };
        if t.dims != want {
            return Err(
                self.fmt_err(format!("tensor {name:?} has ne = {:?}; the metadata implies ne = {want:?}", t.dims))
            );
        }
        Ok(t)
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let t = self.shaped(name, Some(rows), cols)?;
        Ok(match t.dtype {
            GgufDType::F16 => DenseMatrix::F16 { rows, cols, data: self.file.read_u16_bits(name)?.1 },
            GgufDType::BF16 => DenseMatrix::BF16 { rows, cols, data: self.file.read_u16_bits(name)?.1 },
            GgufDType::F32 | GgufDType::Q8_0 => DenseMatrix::F32 { rows, cols, data: self.file.read_f32(name)? },
            GgufDType::I2S => return Err(self.fmt_err(format!("tensor {name:?} is I2_S; a dense matrix was expected"))),
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.shaped(name, None, len)?;
        self.file.read_f32(name)
    }
}

impl WeightSource for GgufSource {
    fn format_name(&self) -> String {
        format!("gguf I2_S ({})", self.arch)
    }

    /// I2_S tensors are decoded as they are (x86 layout, scale = the stored f32). A dense
    /// (F32/F16/BF16/Q8_0) tensor is accepted when it is already ternary times one magnitude,
    /// as in bitnet.cpp's intermediate f32 GGUF: codes = sign, scale = that magnitude.
    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes> {
        self.check_layer(layer)?;
        let name = ternary_tensor_name(layer, proj);
        let (rows, cols) = self.cfg.proj_shape(proj);
        let t = self.shaped(&name, Some(rows), cols)?;
        let (codes, scale) = match t.dtype {
            GgufDType::I2S => self.file.read_i2s(&name)?,
            _ => dense_to_ternary(&self.file.read_f32(&name)?)
                .map_err(|m| self.fmt_err(format!("tensor {name:?}: {m}")))?,
        };
        Ok(TernaryCodes { rows, cols, codes, scale })
    }

    fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let len = match which {
            LayerNorm::FfnSub => self.cfg.intermediate_size,
            LayerNorm::AttnSub => self.cfg.q_dim,
            LayerNorm::Input | LayerNorm::PostAttention => self.cfg.hidden_size,
        };
        self.vector(&norm_tensor_name(layer, which), len)
    }

    fn final_norm(&self) -> Result<Vec<f32>> {
        self.vector(OUTPUT_NORM, self.cfg.hidden_size)
    }

    /// F16 (as bitnet.cpp writes it) stays F16; BF16 stays BF16; F32 and Q8_0 become F32.
    fn embedding(&self) -> Result<DenseMatrix> {
        self.dense(TOKEN_EMBD, self.cfg.vocab_size, self.cfg.hidden_size)
    }

    fn lm_head(&self) -> Result<Option<DenseMatrix>> {
        if self.file.tensor_info(OUTPUT).is_none() {
            return Ok(None);
        }
        self.dense(OUTPUT, self.cfg.vocab_size, self.cfg.hidden_size).map(Some)
    }
}

/// Codes and scale of a dense tensor whose values are all 0 or +-m for one magnitude m.
fn dense_to_ternary(values: &[f32]) -> std::result::Result<(Vec<i8>, f32), String> {
    let mut mag: Option<f32> = None;
    let mut codes = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if v == 0.0 {
            codes.push(0);
            continue;
        }
        let a = v.abs();
        match mag {
            None if a.is_finite() => mag = Some(a),
            Some(m) if m.to_bits() == a.to_bits() => {}
            _ => {
                return Err(format!(
                    "a dense tensor used as a BitLinear weight must be ternary (0 or +-one magnitude); element {i} is {v}, \
                     other elements have magnitude {}",
                    mag.map_or("(none)".to_string(), |m| m.to_string())
                ))
            }
        }
        codes.push(if v > 0.0 { 1 } else { -1 });
    }
    Ok((codes, mag.unwrap_or(0.0)))
}

/// A float key as f64; a value stored as f32 becomes the shortest decimal that rounds to it.
fn meta_float(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    Ok(match file.get(key) {
        Some(GgufValue::F32(x)) => Some(x.to_string().parse::<f64>().unwrap_or(*x as f64)),
        _ => file.meta_f64(key)?,
    })
}

/// Largest value accepted for any size, count or context length in the metadata (2^24).
const MAX_DIM: usize = 1 << 24;

/// `general.architecture` and the metadata mapped to an [`HfConfig`].
fn map_config(file: &GgufFile) -> Result<(String, HfConfig)> {
    let path = file.path();
    let arch = file
        .meta_str("general.architecture")?
        .ok_or_else(|| Error::format(path, "metadata key \"general.architecture\" is missing"))?
        .to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::config(format!(
            "unsupported GGUF architecture {arch:?} in {}: supported are {}",
            path.display(),
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let k = |s: &str| format!("{arch}.{s}");
    // Sizes are bounded so that every product the engine forms from them fits in 64 bits and a
    // corrupt value is reported here rather than as an overflow or a huge allocation later.
    let optional = |s: &str| -> Result<Option<usize>> {
        let key = k(s);
        match file.meta_usize(&key)? {
            Some(v) if v > MAX_DIM => {
                Err(Error::format(path, format!("metadata key {key:?}: {v} is out of range (at most {MAX_DIM})")))
            }
            v => Ok(v),
        }
    };
    let required = |s: &str| -> Result<usize> {
        optional(s)?.ok_or_else(|| Error::format(path, format!("metadata key {:?} is missing", k(s))))
    };
    let hidden = required("embedding_length")?;
    let intermediate = required("feed_forward_length")?;
    let layers = required("block_count")?;
    let heads = required("attention.head_count")?;
    let kv_heads = optional("attention.head_count_kv")?;
    let key_len = optional("attention.key_length")?;
    let value_len = optional("attention.value_length")?;
    let rope_dim = optional("rope.dimension_count")?;
    if let (Some(kl), Some(vl)) = (key_len, value_len) {
        if kl != vl {
            return Err(Error::config(format!(
                "attention.key_length {kl} != attention.value_length {vl} is not supported"
            )));
        }
    }
    let head_dim = match (key_len, rope_dim) {
        (Some(kl), Some(rd)) if kl != rd => {
            return Err(Error::config(format!(
                "partial rotary embeddings ({} = {rd}, head dim {kl}) are not supported",
                k("rope.dimension_count")
            )))
        }
        (kl, rd) => kl.or(rd),
    };
    if let (Some(hd), None) = (head_dim, key_len) {
        // rope.dimension_count alone: llama.cpp takes the head dim from hidden / heads.
        if heads != 0 && hidden % heads == 0 && hidden / heads != hd {
            return Err(Error::config(format!(
                "partial rotary embeddings ({} = {hd}, head dim {}) are not supported",
                k("rope.dimension_count"),
                hidden / heads
            )));
        }
    }
    // llama.cpp's defaults when the keys are absent.
    let rope_theta = meta_float(file, &k("rope.freq_base"))?.unwrap_or(10000.0);
    let eps = meta_float(file, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
    let ctx = optional("context_length")?.unwrap_or(4096);

    let rope_scaling = match file.meta_str(&k("rope.scaling.type"))? {
        None | Some("none") => None,
        Some(t) => {
            let factor = meta_float(file, &k("rope.scaling.factor"))?;
            if t == "linear" && factor.is_none_or(|f| f == 1.0) {
                None // identity (bitnet.cpp's bitnet-b1.58 converter writes linear x1.0)
            } else {
                Some(serde_json::json!({ "type": t, "factor": factor }))
            }
        }
    };

    let embd = file.require_tensor(TOKEN_EMBD)?;
    let embd_rows = match embd.dims.as_slice() {
        [h, v] if *h == hidden as u64 => usize::try_from(*v).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        Error::format(path, format!("tensor {TOKEN_EMBD:?} has ne = {:?}; expected [{hidden}, vocab]", embd.dims))
    })?;
    let vocab = match (file.meta_str_array(keys::TOKENS)?, optional("vocab_size")?) {
        (Some(t), _) => t.len(),
        (None, Some(v)) => v,
        (None, None) => embd_rows,
    };
    if embd_rows != vocab {
        return Err(Error::format(
            path,
            format!("tensor {TOKEN_EMBD:?} has {embd_rows} rows but the vocabulary has {vocab} tokens"),
        ));
    }

    let id = |key: &str| -> Result<Option<u32>> { Ok(file.meta_u64(key)?.and_then(|v| u32::try_from(v).ok())) };
    let hf = HfConfig {
        architectures: vec!["BitNetForCausalLM".into()],
        model_type: Some("bitnet".into()),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        hidden_act: "relu2".into(),
        rope_theta,
        rms_norm_eps: eps,
        max_position_embeddings: ctx,
        tie_word_embeddings: Some(file.tensor_info(OUTPUT).is_none()),
        bos_token_id: id(keys::BOS)?,
        eos_token_id: id(keys::EOS)?.map(|e| vec![e]),
        rope_scaling,
        attention_bias: Some(false),
        quantization_config: None,
    };
    Ok((arch, hf))
}
