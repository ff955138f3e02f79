//! safetensors checkpoints (one file, or shards listed by model.safetensors.index.json),
//! memory-mapped. Tensor names of the HF BitNet layout are mapped in [`hf_name`] and nowhere else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};

use super::{ternary, DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};
use crate::config::{ModelConfig, QuantMode};
use crate::error::{Error, Result};

/// The HF tensor name (without `.weight` / `.weight_scale`) of a projection.
pub fn hf_proj_name(layer: usize, p: Proj) -> String {
    let (block, name) = match p {
        Proj::Q => ("self_attn", "q_proj"),
        Proj::K => ("self_attn", "k_proj"),
        Proj::V => ("self_attn", "v_proj"),
        Proj::O => ("self_attn", "o_proj"),
        Proj::Gate => ("mlp", "gate_proj"),
        Proj::Up => ("mlp", "up_proj"),
        Proj::Down => ("mlp", "down_proj"),
    };
    format!("model.layers.{layer}.{block}.{name}")
}

/// The HF tensor name of a norm weight.
pub fn hf_norm_name(layer: usize, n: LayerNorm) -> String {
    match n {
        LayerNorm::Input => format!("model.layers.{layer}.input_layernorm.weight"),
        LayerNorm::AttnSub => format!("model.layers.{layer}.self_attn.attn_sub_norm.weight"),
        LayerNorm::PostAttention => format!("model.layers.{layer}.post_attention_layernorm.weight"),
        LayerNorm::FfnSub => format!("model.layers.{layer}.mlp.ffn_sub_norm.weight"),
    }
}

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

/// A safetensors checkpoint opened for reading.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
    cfg: ModelConfig,
    mode: QuantMode,
}

/// A tensor view: dtype, shape and bytes inside a shard's mmap.
struct View<'a> {
    path: &'a Path,
    name: &'a str,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; like every mmap-based loader we assume it is not
    // truncated by another process while we run.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e:?}")))?;
    let data_start = 8 + header_len;
    // read_metadata validates offsets against the header; check the data really is there.
    let data_len = mmap.len().saturating_sub(data_start);
    for (name, info) in meta.tensors() {
        if info.data_offsets.1 > data_len {
            return Err(Error::format(
                path,
                format!(
                    "tensor {name}: data ends at byte {} but the file has only {data_len} data bytes (truncated?)",
                    info.data_offsets.1
                ),
            ));
        }
    }
    Ok(Shard { path: path.to_path_buf(), mmap, data_start, meta })
}

impl SafetensorsSource {
    /// Opens `dir/model.safetensors` or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<SafetensorsSource> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "missing \"weight_map\" object"))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files.iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in this folder"));
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for f in &files {
            let shard = open_shard(f)?;
            for (name, _) in shard.meta.tensors() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        let mut src = SafetensorsSource { shards, index, cfg: cfg.clone(), mode: QuantMode::Online };
        // The mode comes from config.json; when it is silent, the dtype of the first projection decides.
        src.mode = match cfg.quant_mode {
            Some(m) => m,
            None => {
                let name = format!("{}.weight", hf_proj_name(0, Proj::Q));
                if src.view(&name)?.dtype == Dtype::U8 {
                    QuantMode::Offline
                } else {
                    QuantMode::Online
                }
            }
        };
        Ok(src)
    }

    /// Whether the weights are packed (offline) or masters (online).
    pub fn quant_mode(&self) -> QuantMode {
        self.mode
    }

    fn view<'a>(&'a self, name: &'a str) -> Result<View<'a>> {
        let Some(&si) = self.index.get(name) else {
            let path = self.shards.first().map(|s| s.path.as_path()).unwrap_or(Path::new("model.safetensors"));
            return Err(Error::format(path, format!("missing tensor {name}")));
        };
        let s = &self.shards[si];
        let info = s.meta.info(name).ok_or_else(|| Error::format(&s.path, format!("missing tensor {name}")))?;
        let (a, b) = info.data_offsets;
        Ok(View {
            path: &s.path,
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &s.mmap[s.data_start + a..s.data_start + b],
        })
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

impl View<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("tensor {}: {msg}", self.name))
    }
    fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(self.err(format!("shape {:?}, expected {:?}", self.shape, want)));
        }
        Ok(())
    }
    /// Widens a float tensor to f32.
    fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => {
                b.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            Dtype::F16 => {
                b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
            }
            d => return Err(self.err(format!("dtype {d:?}, expected F32, BF16 or F16"))),
        })
    }
    fn to_dense(&self, rows: usize, cols: usize) -> Result<DenseMatrix> {
        self.expect_shape(&[rows, cols])?;
        let u16s = || super::u16s_le(self.bytes);
        Ok(match self.dtype {
            Dtype::BF16 => DenseMatrix::BF16 { rows, cols, data: u16s() },
            Dtype::F16 => DenseMatrix::F16 { rows, cols, data: u16s() },
            Dtype::F32 => DenseMatrix::F32 { rows, cols, data: self.to_f32()? },
            d => return Err(self.err(format!("dtype {d:?}, expected BF16, F16 or F32"))),
        })
    }
}

impl WeightSource for SafetensorsSource {
    fn format_name(&self) -> String {
        match self.mode {
            QuantMode::Offline => "safetensors, packed 2-bit (offline)".into(),
            QuantMode::Online => "safetensors, master weights (online)".into(),
        }
    }

    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes> {
        let (rows, cols) = self.cfg.proj_shape(proj);
        let base = hf_proj_name(layer, proj);
        let wname = format!("{base}.weight");
        let w = self.view(&wname)?;
        match self.mode {
            QuantMode::Offline => {
                if w.dtype != Dtype::U8 {
                    return Err(w.err(format!(
                        "dtype {:?}, expected U8 (config.json says quantization_mode \"offline\": packed weights)",
                        w.dtype
                    )));
                }
                if rows % 4 != 0 {
                    return Err(w.err(format!("{rows} output rows cannot be packed 4 per byte")));
                }
                w.expect_shape(&[rows / 4, cols])?;
                let codes = ternary::unpack_rows_blocked(w.bytes, rows, cols)
                    .map_err(|i| w.err(format!("byte {i} holds the invalid 2-bit code 3")))?;
                let sname = format!("{base}.weight_scale");
                let s = self.view(&sname)?;
                let sv = s.to_f32()?;
                if sv.len() != 1 {
                    return Err(s.err(format!("shape {:?}, expected a single value", s.shape)));
                }
                if !(sv[0].is_finite() && sv[0] > 0.0) {
                    return Err(s.err(format!("weight_scale {} is not a positive finite number", sv[0])));
                }
                // transformers' BitLinear (integrations/bitnet.py, post_quant_process) computes
                // `y = dot / (act_scale * weight_scale)`: the stored value is the *inverse* of the
                // weight magnitude (bf16 of 1/mean|W|), and it divides. llama.cpp's converter agrees
                // ("the scale is inverted"). Our epilogue multiplies, so keep its reciprocal.
                // transformers' AutoBitLinear in offline mode multiplies instead.
                let scale = if self.cfg.packed_scale_divides { 1.0 / sv[0] } else { sv[0] };
                Ok(TernaryCodes { rows, cols, codes, scale })
            }
            QuantMode::Online => {
                if w.dtype == Dtype::U8 {
                    return Err(
                        w.err("dtype U8 (packed), but config.json says quantization_mode \"online\" (master weights)")
                    );
                }
                w.expect_shape(&[rows, cols])?;
                let f = w.to_f32()?;
                Ok(ternary::quantize_master(&f, rows, cols))
            }
        }
    }

    fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Vec<f32>> {
        let name = hf_norm_name(layer, which);
        let v = self.view(&name)?;
        let n = match which {
            LayerNorm::Input | LayerNorm::PostAttention => self.cfg.hidden_size,
            LayerNorm::AttnSub => self.cfg.q_dim,
            LayerNorm::FfnSub => self.cfg.intermediate_size,
        };
        v.expect_shape(&[n])?;
        v.to_f32()
    }

    fn final_norm(&self) -> Result<Vec<f32>> {
        let v = self.view(FINAL_NORM)?;
        v.expect_shape(&[self.cfg.hidden_size])?;
        v.to_f32()
    }

    fn embedding(&self) -> Result<DenseMatrix> {
        self.view(EMBED)?.to_dense(self.cfg.vocab_size, self.cfg.hidden_size)
    }

    fn lm_head(&self) -> Result<Option<DenseMatrix>> {
        if self.cfg.tie_word_embeddings {
            return Ok(None);
        }
        if !self.has(LM_HEAD) {
            return Err(Error::format(
                &self.shards[0].path,
                format!("missing tensor {LM_HEAD} (config.json says tie_word_embeddings = false)"),
            ));
        }
        Ok(Some(self.view(LM_HEAD)?.to_dense(self.cfg.vocab_size, self.cfg.hidden_size)?))
    }
}
