//! `random:<preset>` models: real shapes, seeded random ternary weights (about a third each of
//! -1, 0, +1) built in memory, so every command and benchmark runs without a download.

use super::{DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};
use crate::config::{HfConfig, ModelConfig};
use crate::error::{Error, Result};

/// Known presets: name, description, config.json fields.
const PRESETS: &[(&str, &str, usize, usize, usize, usize, usize, usize, usize)] = &[
    // name, what, vocab, hidden, intermediate, layers, heads, kv_heads, max_pos
    ("2b-4t", "microsoft/bitnet-b1.58-2B-4T shapes", 128256, 2560, 6912, 30, 20, 5, 4096),
    ("large", "1bitLLM/bitnet_b1_58-large shapes (0.7B)", 32002, 1536, 4096, 24, 16, 16, 2048),
    ("3b", "1bitLLM/bitnet_b1_58-3B shapes", 32002, 3200, 8640, 26, 32, 32, 2048),
    ("tiny", "a tiny model for tests", 640, 256, 768, 2, 8, 2, 512),
];

/// The preset names, for help texts.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// The config.json of a preset (`spec` is what follows `random:`, e.g. `2b-4t`).
pub fn preset_config(spec: &str) -> Result<HfConfig> {
    let p = PRESETS.iter().find(|p| p.0 == spec).ok_or_else(|| {
        Error::input(format!("unknown random model preset {spec:?} (known: {})", preset_names().join(", ")))
    })?;
    let v = serde_json::json!({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
        "vocab_size": p.2, "hidden_size": p.3, "intermediate_size": p.4, "num_hidden_layers": p.5,
        "num_attention_heads": p.6, "num_key_value_heads": p.7, "max_position_embeddings": p.8,
        "hidden_act": "relu2", "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 1,
    });
    serde_json::from_value(v).map_err(|e| Error::config(format!("preset {spec}: {e}")))
}

/// splitmix64: a tiny, good-enough generator for weights (speed matters: 2B codes).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
}

/// A seeded random model.
pub struct RandomSource {
    cfg: ModelConfig,
    seed: u64,
}

impl RandomSource {
    pub fn new(cfg: ModelConfig, seed: u64) -> RandomSource {
        RandomSource { cfg, seed }
    }
    fn rng(&self, a: u64, b: u64) -> Rng {
        Rng(self.seed ^ a.wrapping_mul(0x100000001b3) ^ b.wrapping_mul(0xcbf29ce484222325))
    }
}

impl WeightSource for RandomSource {
    fn format_name(&self) -> String {
        format!("random ternary (seed {})", self.seed)
    }
    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes> {
        let (rows, cols) = self.cfg.proj_shape(proj);
        let mut rng = self.rng(layer as u64 + 1, proj as u64 + 1);
        let mut codes = vec![0i8; rows * cols];
        for chunk in codes.chunks_mut(8) {
            let r = rng.next();
            for (k, c) in chunk.iter_mut().enumerate() {
                *c = ((r >> (8 * k)) as u8 % 3) as i8 - 1;
            }
        }
        // mean|W| of a ternary-quantized layer of 2B-4T is ~1-2; the value only scales activations.
        Ok(TernaryCodes { rows, cols, codes, scale: 1.5 })
    }
    fn layer_norm(&self, _layer: usize, which: LayerNorm) -> Result<Vec<f32>> {
        let n = match which {
            LayerNorm::Input | LayerNorm::PostAttention => self.cfg.hidden_size,
            LayerNorm::AttnSub => self.cfg.q_dim,
            LayerNorm::FfnSub => self.cfg.intermediate_size,
        };
        Ok(vec![1.0; n])
    }
    fn final_norm(&self) -> Result<Vec<f32>> {
        Ok(vec![1.0; self.cfg.hidden_size])
    }
    fn embedding(&self) -> Result<DenseMatrix> {
        let (rows, cols) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let mut rng = self.rng(0, 0);
        let mut data = bitnet_cpu::mem::advised(vec![0u16; rows * cols]); // see `u16s_le`
        for chunk in data.chunks_mut(4) {
            let r = rng.next();
            for (k, d) in chunk.iter_mut().enumerate() {
                // uniform in about [-0.05, 0.05), stored as bf16
                let u = ((r >> (16 * k)) & 0xffff) as f32 / 65536.0;
                *d = (((u - 0.5) * 0.1).to_bits() >> 16) as u16;
            }
        }
        Ok(DenseMatrix::BF16 { rows, cols, data })
    }
    fn lm_head(&self) -> Result<Option<DenseMatrix>> {
        Ok(None)
    }
}
