//! Checkpoint loading. Every on-disk format (packed safetensors, master-weight safetensors, GGUF I2_S)
//! is read through the [`WeightSource`] trait into one canonical form: ternary codes + an output
//! scale per BitLinear, f32 norms, and a dense embedding / LM head. The model is built once from
//! that form (see `model::Model::load`), so there is exactly one model for every format.
//!
//! Tensor names of each format are mapped to [`TensorRole`]s in one place per format.

pub mod random;
pub mod safetensors;
pub mod ternary;

use crate::error::Result;

/// Which BitLinear projection of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
}

/// Which RMSNorm weight of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerNorm {
    /// before attention (`input_layernorm`)
    Input,
    /// between attention and o_proj (`self_attn.attn_sub_norm`)
    AttnSub,
    /// before the MLP (`post_attention_layernorm`)
    PostAttention,
    /// between relu^2*up and down_proj (`mlp.ffn_sub_norm`)
    FfnSub,
}

impl LayerNorm {
    pub const ALL: [LayerNorm; 4] = [LayerNorm::Input, LayerNorm::AttnSub, LayerNorm::PostAttention, LayerNorm::FfnSub];
}

/// A ternary matrix in canonical form.
/// `codes`: row-major `[rows][cols]`, every value in {-1, 0, +1}.
/// The real weight is `codes * scale` (the scale multiplies the matmul output).
#[derive(Debug, Clone)]
pub struct TernaryCodes {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    pub scale: f32,
}

/// Element type of a dense (float) matrix as stored in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDType {
    F32,
    F16,
    BF16,
}

/// A dense float matrix `[rows][cols]`, row-major, kept in its stored dtype
/// (the embedding of 2B-4T is 656 MB in bf16; widening it to f32 would double that).
#[derive(Debug, Clone)]
pub enum DenseMatrix {
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    /// raw IEEE half bits
    F16 {
        rows: usize,
        cols: usize,
        data: Vec<u16>,
    },
    /// raw bfloat16 bits
    BF16 {
        rows: usize,
        cols: usize,
        data: Vec<u16>,
    },
    /// bfloat16 values in the lossless 12-bit layout (`bitnet_cpu::packed_bf16`): what a CPU
    /// model keeps of a bf16 LM head it streams per token (and of the embedding tied to it).
    BF16Packed(bitnet_cpu::dense::PackedBf16),
}

impl DenseMatrix {
    pub fn rows(&self) -> usize {
        match self {
            DenseMatrix::F32 { rows, .. } | DenseMatrix::F16 { rows, .. } | DenseMatrix::BF16 { rows, .. } => *rows,
            DenseMatrix::BF16Packed(p) => p.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            DenseMatrix::F32 { cols, .. } | DenseMatrix::F16 { cols, .. } | DenseMatrix::BF16 { cols, .. } => *cols,
            DenseMatrix::BF16Packed(p) => p.cols(),
        }
    }
    pub fn dtype(&self) -> DenseDType {
        match self {
            DenseMatrix::F32 { .. } => DenseDType::F32,
            DenseMatrix::F16 { .. } => DenseDType::F16,
            DenseMatrix::BF16 { .. } | DenseMatrix::BF16Packed(_) => DenseDType::BF16,
        }
    }
    /// Row `r` widened to f32 into `out` (len == cols). Used for embedding lookups.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols();
        match self {
            DenseMatrix::F32 { data, .. } => out.copy_from_slice(&data[r * c..(r + 1) * c]),
            DenseMatrix::F16 { data, .. } => {
                for (o, &h) in out.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                    *o = half::f16::from_bits(h).to_f32();
                }
            }
            DenseMatrix::BF16 { data, .. } => {
                for (o, &h) in out.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                    *o = f32::from_bits((h as u32) << 16);
                }
            }
            DenseMatrix::BF16Packed(p) => p.row_to_f32(r, out),
        }
    }
    /// Moves the data onto huge pages where the OS allows (`bitnet_cpu::mem`): the LM head is
    /// streamed once per decoded token. Contents are unchanged.
    pub fn collapse_huge_pages(&self) {
        let p = match self {
            DenseMatrix::F32 { data, .. } => data.as_ptr() as *const u8,
            DenseMatrix::F16 { data, .. } | DenseMatrix::BF16 { data, .. } => data.as_ptr() as *const u8,
            DenseMatrix::BF16Packed(p) => return p.collapse_huge_pages(),
        };
        bitnet_cpu::mem::collapse_huge_pages(p, self.nbytes());
    }
    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            DenseMatrix::F32 { data, .. } => data.len() * 4,
            DenseMatrix::F16 { data, .. } | DenseMatrix::BF16 { data, .. } => data.len() * 2,
            DenseMatrix::BF16Packed(p) => p.nbytes(),
        }
    }
    /// A bf16 matrix in the lossless 12-bit layout where this CPU runs its kernels and it saves
    /// a fifth of the bytes or more (see `bitnet_cpu::packed_bf16`); anything else unchanged.
    /// The values are the same; the LM head's GEMV reads 25% fewer bytes for the same logits.
    pub fn packed_if_faster(self) -> DenseMatrix {
        match self {
            DenseMatrix::BF16 { rows, cols, data } if bitnet_cpu::dense::PackedBf16::kernels_available() => {
                // the bf16 pages are given back as they are packed (the load's peak stays near
                // one copy)
                match bitnet_cpu::dense::PackedBf16::pack_owned(data, rows, cols) {
                    Ok(p) => DenseMatrix::BF16Packed(p),
                    Err(data) => DenseMatrix::BF16 { rows, cols, data },
                }
            }
            m => m,
        }
    }
    /// How the values are held, for reports: "bf16", or "bf16 (12-bit lossless packing)".
    pub fn storage(&self) -> &'static str {
        match self {
            DenseMatrix::F32 { .. } => "f32",
            DenseMatrix::F16 { .. } => "f16",
            DenseMatrix::BF16 { .. } => "bf16",
            DenseMatrix::BF16Packed(_) => "bf16 (12-bit lossless packing)",
        }
    }
}

/// Little-endian 16-bit values (f16 / bf16 bits) of a checkpoint tensor, in a buffer that asked
/// for huge pages before it was written (`bitnet_cpu::mem`: a dense LM head is streamed once per
/// token; moving it onto huge pages after the fact costs a second copy).
pub(crate) fn u16s_le(bytes: &[u8]) -> Vec<u16> {
    let mut v = bitnet_cpu::mem::advised(vec![0u16; bytes.len() / 2]);
    for (o, c) in v.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = u16::from_le_bytes([c[0], c[1]]);
    }
    v
}

/// One checkpoint, whatever its format. Implementations validate shapes and dtypes and name
/// the file and tensor at fault in their errors.
pub trait WeightSource: Sync {
    /// Short description of the format, e.g. "safetensors (packed I2)" or "gguf I2_S".
    fn format_name(&self) -> String;
    /// Ternary codes + output scale of one projection of one layer, `[out][in]`.
    fn ternary(&self, layer: usize, proj: Proj) -> Result<TernaryCodes>;
    /// One RMSNorm weight vector of a layer, widened to f32.
    fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Vec<f32>>;
    /// The final norm (`model.norm.weight`), widened to f32.
    fn final_norm(&self) -> Result<Vec<f32>>;
    /// The token embedding `[vocab][hidden]`.
    fn embedding(&self) -> Result<DenseMatrix>;
    /// The untied LM head `[vocab][hidden]`, or None when tied to the embedding.
    fn lm_head(&self) -> Result<Option<DenseMatrix>>;
}
