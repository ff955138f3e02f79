//! Model configuration. [`HfConfig`] mirrors config.json field names verbatim (so serde reads the
//! file directly, and a GGUF file's metadata is mapped onto the same names); [`ModelConfig`] is
//! the validated, resolved form with derived sizes that the rest of the engine uses.
//! Nothing here assumes 2B-4T's numbers, power-of-two sizes or a particular head count.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `quantization_config` of config.json.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuantizationConfig {
    #[serde(default)]
    pub quant_method: Option<String>,
    #[serde(default)]
    pub linear_class: Option<String>,
    /// "offline": packed U8 weights + weight_scale; "online": master weights quantized at load.
    #[serde(default)]
    pub quantization_mode: Option<String>,
}

/// config.json, HF field names verbatim. Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Read like generation_config.json's (negative or null: none).
    #[serde(default, deserialize_with = "crate::generation_config::de_token_id")]
    pub bos_token_id: Option<u32>,
    /// One id or a list of ids.
    #[serde(default, deserialize_with = "crate::generation_config::de_token_ids")]
    pub eos_token_id: Option<Vec<u32>>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
}

fn default_act() -> String {
    "relu2".into()
}
fn default_rope_theta() -> f64 {
    500000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    4096
}

/// How BitLinear weights are stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// Packed 2-bit U8 `[out/4, in]` + `weight_scale` (microsoft/bitnet-b1.58-2B-4T).
    Offline,
    /// Full-precision master weights, ternarized at load (microsoft/bitnet-b1.58-2B-4T-bf16).
    Online,
}

/// The validated configuration with derived sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// q heads per kv head
    pub gqa_group: usize,
    /// num_heads * head_dim
    pub q_dim: usize,
    /// num_kv_heads * head_dim
    pub kv_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// None when the format decides it (GGUF) or config.json does not say.
    pub quant_mode: Option<QuantMode>,
    /// Packed checkpoints: whether `weight_scale` divides the output (transformers' `bitlinear`
    /// class, 2B-4T) or multiplies it (`autobitlinear` in offline mode).
    pub packed_scale_divides: bool,
}

impl HfConfig {
    /// Reads and parses config.json; errors name the file.
    pub fn from_file(path: &Path) -> Result<HfConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid config.json: {e}")))
    }

    /// Validates and derives sizes.
    pub fn resolve(&self) -> Result<ModelConfig> {
        if let Some(mt) = &self.model_type {
            if mt != "bitnet" {
                return Err(Error::config(format!(
                    "unsupported model_type {mt:?}: only BitNet b1.58 (model_type \"bitnet\") is supported"
                )));
            }
        }
        for a in &self.architectures {
            if a != "BitNetForCausalLM" {
                return Err(Error::config(format!(
                    "unsupported architecture {a:?}: only BitNetForCausalLM is supported"
                )));
            }
        }
        if self.hidden_act != "relu2" {
            return Err(Error::config(format!(
                "unsupported hidden_act {:?}: BitNet b1.58 uses \"relu2\"",
                self.hidden_act
            )));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::config("rope_scaling is not supported"));
        }
        if self.attention_bias == Some(true) {
            return Err(Error::config("attention_bias = true is not supported"));
        }
        let nz = |name: &str, v: usize| -> Result<usize> {
            if v == 0 {
                Err(Error::config(format!("{name} must be > 0")))
            } else {
                Ok(v)
            }
        };
        let vocab_size = nz("vocab_size", self.vocab_size)?;
        let hidden_size = nz("hidden_size", self.hidden_size)?;
        let intermediate_size = nz("intermediate_size", self.intermediate_size)?;
        let num_layers = nz("num_hidden_layers", self.num_hidden_layers)?;
        let num_heads = nz("num_attention_heads", self.num_attention_heads)?;
        let num_kv_heads = nz("num_key_value_heads", self.num_key_value_heads.unwrap_or(num_heads))?;
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match self.head_dim {
            Some(d) => nz("head_dim", d)?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::config(format!(
                        "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads}) and head_dim is not given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::config(format!("head_dim ({head_dim}) must be even for RoPE")));
        }
        let max_pos = nz("max_position_embeddings", self.max_position_embeddings)?;
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(format!("rope_theta ({}) must be > 0", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config(format!("rms_norm_eps ({}) must be > 0", self.rms_norm_eps)));
        }
        let quant_mode = match self.quantization_config.as_ref().and_then(|q| q.quantization_mode.as_deref()) {
            None => None,
            Some("offline") => Some(QuantMode::Offline),
            Some("online") => Some(QuantMode::Online),
            Some(other) => {
                return Err(Error::config(format!(
                    "unknown quantization_config.quantization_mode {other:?} (expected \"offline\" or \"online\")"
                )))
            }
        };
        Ok(ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            gqa_group: num_heads / num_kv_heads,
            q_dim: num_heads * head_dim,
            kv_dim: num_kv_heads * head_dim,
            rope_theta: self.rope_theta as f32,
            rms_norm_eps: self.rms_norm_eps as f32,
            max_position_embeddings: max_pos,
            // HF's PretrainedConfig default is true.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
            quant_mode,
            packed_scale_divides: self
                .quantization_config
                .as_ref()
                .and_then(|q| q.linear_class.as_deref())
                .is_none_or(|c| c != "autobitlinear"),
        })
    }
}

impl ModelConfig {
    /// Ternary weights per layer (q, k, v, o, gate, up, down).
    pub fn ternary_params_per_layer(&self) -> usize {
        let h = self.hidden_size;
        h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.intermediate_size
    }
    /// Output rows of each projection.
    pub fn proj_shape(&self, p: crate::weights::Proj) -> (usize, usize) {
        use crate::weights::Proj::*;
        let h = self.hidden_size;
        match p {
            Q => (self.q_dim, h),
            K | V => (self.kv_dim, h),
            O => (h, self.q_dim),
            Gate | Up => (self.intermediate_size, h),
            Down => (h, self.intermediate_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HfConfig {
        serde_json::from_str(
            r#"{"architectures":["BitNetForCausalLM"],"model_type":"bitnet","vocab_size":128256,
            "hidden_size":2560,"intermediate_size":6912,"num_hidden_layers":30,"num_attention_heads":20,
            "num_key_value_heads":5,"hidden_act":"relu2","rope_theta":500000.0,"rms_norm_eps":1e-5,
            "max_position_embeddings":4096,"tie_word_embeddings":true,
            "quantization_config":{"quant_method":"bitnet","linear_class":"bitlinear","quantization_mode":"offline"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn resolves_2b4t() {
        let c = base().resolve().unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.gqa_group, 4);
        assert_eq!(c.kv_dim, 640);
        assert_eq!(c.quant_mode, Some(QuantMode::Offline));
        assert_eq!(c.ternary_params_per_layer() * 30, 2_084_044_800);
    }

    #[test]
    fn rejects_bad_values() {
        let mut c = base();
        c.hidden_act = "silu".into();
        assert!(c.resolve().unwrap_err().to_string().contains("hidden_act"));
        let mut c = base();
        c.num_key_value_heads = Some(3);
        assert!(c.resolve().unwrap_err().to_string().contains("num_key_value_heads"));
        let mut c = base();
        c.architectures = vec!["LlamaForCausalLM".into()];
        assert!(c.resolve().unwrap_err().to_string().contains("LlamaForCausalLM"));
    }
}
