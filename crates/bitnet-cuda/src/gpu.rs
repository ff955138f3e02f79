//! One device with its streams and compiled kernels, and a typed launch wrapper per kernel.
//! Every wrapper only enqueues work on the compute stream (no allocation, no synchronization),
//! so the same code runs eagerly and inside a CUDA-graph capture.

use std::sync::Arc;

use crate::driver::{launch, DevBuf, Kernel, Module, Stream};
use crate::error::{Error, Result};
use crate::nvrtc;
use crate::pack::PackedShape;

pub(crate) use crate::driver::Ctx;

/// The kernel source (see `kernels.cu`).
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// The smallest split (keys) of the decode attention kernel: a short context still spreads over
/// several blocks per head. Bigger batches use bigger splits ([`decode_split`]).
pub const ATT_SPLIT: usize = 64;

/// Keys per split of a decode step of `n` tokens with `n_kv` kv heads and contexts up to
/// `max_ctx`: the smallest power-of-two multiple of [`ATT_SPLIT`] (up to 1024) that leaves at
/// most about four blocks per multiprocessor: enough to fill the GPU, with as few partial
/// results to merge as that allows.
pub fn decode_split(n: usize, n_kv: usize, max_ctx: usize, sm_count: usize) -> usize {
    let mut split = ATT_SPLIT;
    while split < 1024 && n * n_kv * max_ctx.div_ceil(split) > 4 * sm_count.max(1) {
        split *= 2;
    }
    split
}
/// Key tile of the attention kernels (`ATT_TILE`).
const ATT_TILE: usize = 32;
/// Query tokens and keys per tile of the prefill-attention block (`APF_BQ`, `APF_BK`), and
/// its threads (`APF_THREADS`).
const ATT_PREFILL_TOKENS: usize = 32;
const ATT_PREFILL_KEYS: usize = 64;
const ATT_PREFILL_THREADS: u32 = 128;
/// Rows of the LM head per launch (`LMH_ROWS`).
const LMH_ROWS: usize = 8;
/// Warps of the tensor-core LM head (`LMT_WARPS`), its column chunk and row padding.
const LMT_WARPS: u32 = 8;
const LMT_KC: usize = 128;
const LMT_PAD: usize = 32;
/// Dynamic shared memory of the tensor-core LM head for `nt` groups of 8 tokens.
fn lmt_smem(nt: usize) -> usize {
    3 * nt * 8 * (LMT_KC + LMT_PAD) * 2
}
/// Threads of the RMSNorm+quant kernel (`NORM_THREADS`).
const NORM_THREADS: u32 = 512;
/// Threads of the sampling kernel (`SAMPLE_THREADS`).
const SAMPLE_THREADS: u32 = 512;
/// Largest GQA group / head size the attention kernels take (ATT_QH * 4 warps, ATT_MAXD * 32).
pub(crate) const MAX_GQA_GROUP: usize = 16;
pub(crate) const MAX_HEAD_DIM: usize = 256;

/// The full kernel source with the defines of one configuration.
pub fn kernel_source(kv_f16: bool) -> String {
    format!("#define KV_F16 {}\n{}", u8::from(kv_f16), KERNEL_SOURCE)
}

/// Every kernel name the module must export.
pub const KERNEL_NAMES: [&str; 22] = [
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "rmsnorm_quant",
    "rmsnorm_f32",
    "ternary_mm_nt1",
    "ternary_mm_nt2",
    "ternary_mm_nt4",
    "ternary_mm_wide",
    "ternary_mm_wide32",
    "rope_kv",
    "attn_decode",
    "attn_prefill_j1",
    "attn_prefill_j2",
    "attn_prefill_j3",
    "attn_prefill_j4",
    "lm_head",
    "lm_head_bf16_nt1",
    "lm_head_bf16_nt2",
    "lm_head_bf16_nt4",
    "lm_head_bf16_nt8",
    "sample_rows",
];

struct Kernels {
    embed: [Kernel; 3],
    rmsnorm_quant: Kernel,
    rmsnorm_f32: Kernel,
    tmm: [Kernel; 3],
    /// more than 32 tokens: activations staged in shared memory, 64 or 32 tokens per block
    tmm_wide: [Kernel; 2],
    rope_kv: Kernel,
    attn_decode: Kernel,
    /// by ceil(head_dim / 64)
    attn_prefill: [Kernel; 4],
    lm_head: Kernel,
    /// bf16 weights on the tensor cores, 8, 16, 32, 64 token rows per launch
    lm_head_bf16: [Kernel; 4],
    sample_rows: Kernel,
}

/// Element type of a dense matrix on the device (the kernels' `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenseKind {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

/// A dense matrix `[rows][cols]` in its stored dtype.
pub(crate) struct DenseDev {
    pub(crate) buf: DevBuf,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) kind: DenseKind,
}

impl DenseDev {
    pub(crate) fn upload(ctx: &Arc<Ctx>, m: &bitnet_core::weights::DenseMatrix) -> Result<DenseDev> {
        use bitnet_core::weights::DenseMatrix as D;
        let (buf, kind) = match m {
            D::F32 { data, .. } => (DevBuf::from_slice(ctx, data)?, DenseKind::F32),
            D::F16 { data, .. } => (DevBuf::from_slice(ctx, data)?, DenseKind::F16),
            D::BF16 { data, .. } => (DevBuf::from_slice(ctx, data)?, DenseKind::BF16),
            D::BF16Packed(p) => (DevBuf::from_slice(ctx, &p.to_bf16())?, DenseKind::BF16),
        };
        Ok(DenseDev { buf, rows: m.rows(), cols: m.cols(), kind })
    }
    pub(crate) fn nbytes(&self) -> usize {
        self.buf.bytes()
    }
}

/// A packed ternary matrix (pack.rs layout) with one output scale per row.
pub(crate) struct TernaryDev {
    pub(crate) buf: DevBuf,
    pub(crate) shape: PackedShape,
    pub(crate) scales: DevBuf,
}

impl TernaryDev {
    pub(crate) fn upload(ctx: &Arc<Ctx>, codes: &[i8], rows: usize, cols: usize, scales: &[f32]) -> Result<TernaryDev> {
        if scales.len() != rows {
            return Err(Error::Internal("one scale per row".into()));
        }
        let (shape, data) = crate::pack::pack(codes, rows, cols);
        Ok(TernaryDev { buf: DevBuf::from_slice(ctx, &data)?, shape, scales: DevBuf::from_slice(ctx, scales)? })
    }
    pub(crate) fn nbytes(&self) -> usize {
        self.buf.bytes()
    }
}

/// Device int8 activations: `q` rows of `stride` bytes, a scale and a sum per token.
#[derive(Clone, Copy)]
pub(crate) struct ActsPtrs {
    pub(crate) q: u64,
    pub(crate) stride: usize,
    pub(crate) scale: u64,
    pub(crate) sum: u64,
}

/// The paged KV cache: per layer `[n_blocks][block_size][kv_dim]`, K and V.
pub(crate) struct KvDev {
    pub(crate) k: DevBuf,
    pub(crate) v: DevBuf,
    pub(crate) n_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) kv_dim: usize,
}

impl KvDev {
    /// Element offset of layer `l`.
    pub(crate) fn layer_off(&self, l: usize) -> u64 {
        (l * self.n_blocks * self.block_size * self.kv_dim) as u64
    }
}

/// Attention shapes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) group: usize,
    pub(crate) head_dim: usize,
    pub(crate) scale: f32,
}

impl AttnDims {
    pub(crate) fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Dynamic shared memory of `attn_decode` in bytes.
    pub(crate) fn decode_smem(&self) -> usize {
        let hd = self.head_dim;
        (self.group * hd + ATT_TILE * (hd + 1) + ATT_TILE * hd) * 4
    }
    /// Which `attn_prefill_j*` kernel serves this head size (`j` = ceil(head_dim / 64)).
    pub(crate) fn prefill_kernel(&self) -> usize {
        self.head_dim.div_ceil(64).clamp(1, 4) - 1
    }
    /// Dynamic shared memory of `attn_prefill` in bytes.
    pub(crate) fn prefill_smem(&self) -> usize {
        let hd = self.head_dim;
        // Qt, Kt (then Pt, rows of 32 + 4), V
        (ATT_PREFILL_TOKENS * hd
            + (ATT_PREFILL_KEYS * hd).max(ATT_PREFILL_KEYS * (ATT_PREFILL_TOKENS + 4))
            + ATT_PREFILL_KEYS * hd)
            * 4
    }
    pub(crate) fn check(&self) -> Result<()> {
        if !self.head_dim.is_multiple_of(32) || self.head_dim > MAX_HEAD_DIM {
            return Err(Error::Unsupported(format!(
                "head_dim {} (the attention kernels take multiples of 32 up to {MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.group > MAX_GQA_GROUP {
            return Err(Error::Unsupported(format!(
                "{} query heads per kv head (at most {MAX_GQA_GROUP})",
                self.group
            )));
        }
        Ok(())
    }
}

/// The block-table view the attention and RoPE kernels read.
#[derive(Clone, Copy)]
pub(crate) struct SeqPtrs {
    pub(crate) pos: u64,
    pub(crate) slot: u64,
    pub(crate) block_table: u64,
    pub(crate) max_blocks: usize,
}

/// Per-row sampling settings as the kernel reads them (16 bytes, `SampleParam`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceSampleParam {
    /// <= 0: greedy
    pub temperature: f32,
    /// 0: off
    pub top_k: i32,
    /// >= 1: off
    pub top_p: f32,
    /// uniform in [0, 1)
    pub u: f32,
}

/// A device, its two streams (compute; copies) and the compiled kernels.
pub struct Gpu {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) stream: Stream,
    pub(crate) copy: Stream,
    k: Kernels,
    // Kernels are handles into this module: keep it last so it is dropped after them.
    _module: Module,
    /// How the kernels were obtained (for reports).
    pub compile_note: String,
    pub kv_f16: bool,
}

impl Gpu {
    /// Opens device `ordinal`, compiles (or loads from the cache) the kernels for it.
    pub fn new(ordinal: usize, kv_f16: bool) -> Result<Gpu> {
        let ctx = Ctx::new(ordinal)?;
        let src = kernel_source(kv_f16);
        let arch = ctx.cc;
        let (module, note) = match nvrtc::compile(&src, arch, false, &[]) {
            Ok(img) => match Module::load(&ctx, &img.bytes) {
                Ok(m) => (m, describe(&img, arch)),
                Err(e) => {
                    let (m, note) = load_ptx_fallback(&ctx, &src, arch)
                        .map_err(|e2| Error::Driver(format!("loading the cubin failed ({e}); PTX fallback: {e2}")))?;
                    (m, note)
                }
            },
            Err(Error::Nvrtc(msg)) if !msg.contains("compiling the kernels failed") => {
                load_ptx_fallback(&ctx, &src, arch)?
            }
            Err(e) => return Err(e),
        };
        let f = |n: &str| module.function(n);
        let k = Kernels {
            embed: [f("embed_f32")?, f("embed_f16")?, f("embed_bf16")?],
            rmsnorm_quant: f("rmsnorm_quant")?,
            rmsnorm_f32: f("rmsnorm_f32")?,
            tmm: [f("ternary_mm_nt1")?, f("ternary_mm_nt2")?, f("ternary_mm_nt4")?],
            tmm_wide: [f("ternary_mm_wide")?, f("ternary_mm_wide32")?],
            rope_kv: f("rope_kv")?,
            attn_decode: f("attn_decode")?,
            attn_prefill: [f("attn_prefill_j1")?, f("attn_prefill_j2")?, f("attn_prefill_j3")?, f("attn_prefill_j4")?],
            lm_head: f("lm_head")?,
            lm_head_bf16: [
                f("lm_head_bf16_nt1")?,
                f("lm_head_bf16_nt2")?,
                f("lm_head_bf16_nt4")?,
                f("lm_head_bf16_nt8")?,
            ],
            sample_rows: f("sample_rows")?,
        };
        // 64 token rows of the tensor-core LM head stage 60 KiB of shared memory
        k.lm_head_bf16[3].set_max_dynamic_smem(lmt_smem(8))?;
        let stream = Stream::new(&ctx)?;
        let copy = Stream::new(&ctx)?;
        Ok(Gpu { ctx, stream, copy, k, _module: module, compile_note: note, kv_f16 })
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
    pub fn device_name(&self) -> String {
        format!("{} (sm_{}{}, {} SMs)", self.ctx.name, self.ctx.cc.0, self.ctx.cc.1, self.ctx.sm_count)
    }

    /// Makes the context current on this thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind()
    }

    /// Programmatic dependent launch between the compute stream's kernels (sm_90+ only).
    pub(crate) fn set_pdl(&mut self, on: bool) {
        self.stream.pdl = on && self.ctx.cc.0 >= 9;
    }
    pub(crate) fn pdl(&self) -> bool {
        self.stream.pdl
    }

    /// Waits for the compute stream.
    pub fn sync(&self) -> Result<()> {
        self.stream.sync()
    }

    /// Allows the attention kernels the dynamic shared memory of `dims`.
    pub(crate) fn prepare_attention(&self, dims: &AttnDims) -> Result<()> {
        dims.check()?;
        if dims.decode_smem() > 48 * 1024 {
            self.k.attn_decode.set_max_dynamic_smem(dims.decode_smem())?;
        }
        if dims.prefill_smem() > 48 * 1024 {
            self.k.attn_prefill[dims.prefill_kernel()].set_max_dynamic_smem(dims.prefill_smem())?;
        }
        Ok(())
    }

    // -- launch wrappers (compute stream) ------------------------------------------------------

    pub(crate) fn embed(&self, table: &DenseDev, tokens: u64, n: usize, x: u64) -> Result<()> {
        let k = &self.k.embed[table.kind as usize];
        launch!(k, (n as u32, 1, 1), 256, 0, &self.stream;
            table.buf.ptr(), tokens, table.rows as i32, table.cols as i32, x)
    }

    /// Rows `0..n` of `x` (stride `xs` floats) normed with `w` (`d` values) and quantized into
    /// `acts`. `relu2`: `x` rows are `[gate | up]` (2d wide) and the value is relu(gate)^2 * up.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_quant(
        &self,
        x: u64,
        xs: usize,
        w: u64,
        d: usize,
        eps: f32,
        relu2: bool,
        acts: &ActsPtrs,
        n: usize,
    ) -> Result<()> {
        launch!(&self.k.rmsnorm_quant, (n as u32, 1, 1), NORM_THREADS, 0, &self.stream;
            x, xs as i32, w, d as i32, eps, i32::from(relu2), acts.q, acts.stride as i32,
            acts.scale, acts.sum)
    }

    /// `out[i] = rmsnorm(x[first + i])` for `i < n`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_f32(
        &self,
        x: u64,
        xs: usize,
        first: usize,
        w: u64,
        d: usize,
        eps: f32,
        out: u64,
        n: usize,
    ) -> Result<()> {
        launch!(&self.k.rmsnorm_f32, (n as u32, 1, 1), 256, 0, &self.stream;
            x, xs as i32, first as i32, w, d as i32, eps, out)
    }

    /// `out[t][r] (+)= W x[t]` for `t < n`.
    pub(crate) fn ternary_mm(
        &self,
        w: &TernaryDev,
        acts: &ActsPtrs,
        n: usize,
        out: u64,
        os: usize,
        accumulate: bool,
    ) -> Result<()> {
        if acts.stride < w.shape.cols_p() || !acts.stride.is_multiple_of(16) {
            return Err(Error::Internal("activation stride below the padded width or not a multiple of 16".into()));
        }
        if n > 32 {
            // 64 tokens per block, or 32 where that leaves under ~1.5 blocks per SM (measured on
            // an H200 at 512 tokens: 2560-row matrices gain from 32, 3840-row ones lose)
            let groups = w.shape.rblocks.div_ceil(8);
            let narrow = 2 * groups * n.div_ceil(64) < 3 * self.ctx.sm_count.max(1) as usize;
            let tok = if narrow { 32 } else { 64 };
            let grid = (groups as u32, n.div_ceil(tok) as u32, 1);
            return launch!(&self.k.tmm_wide[usize::from(narrow)], grid, 256, 0, &self.stream;
                w.buf.ptr(), w.shape.ktiles as i32, w.shape.rows as i32, w.shape.rblocks as i32, acts.q,
                acts.stride as i32, n as i32, acts.scale, acts.sum, w.scales.ptr(), out, os as i32,
                i32::from(accumulate));
        }
        let (ki, nt) = match n {
            0..=8 => (0, 1),
            9..=16 => (1, 2),
            _ => (2, 4),
        };
        let grid = (w.shape.rblocks as u32, n.div_ceil(8 * nt) as u32, 1);
        launch!(&self.k.tmm[ki], grid, 256, 0, &self.stream;
            w.buf.ptr(), w.shape.ktiles as i32, w.shape.rows as i32, acts.q, acts.stride as i32,
            n as i32, acts.scale, acts.sum, w.scales.ptr(), out, os as i32, i32::from(accumulate))
    }

    /// RoPE on q and k of rows `0..n` of `qkv`, then k, v into the cache of layer `layer`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_kv(
        &self,
        qkv: u64,
        stride: usize,
        seq: &SeqPtrs,
        cos: u64,
        sin: u64,
        dims: &AttnDims,
        kv: &KvDev,
        layer: usize,
        n: usize,
    ) -> Result<()> {
        launch!(&self.k.rope_kv, (n as u32, 1, 1), 128, 0, &self.stream;
            qkv, stride as i32, seq.pos, seq.slot, seq.block_table, seq.max_blocks as i32,
            cos, sin, (dims.head_dim / 2) as i32, dims.n_heads as i32, dims.n_kv_heads as i32,
            kv.k.ptr(), kv.v.ptr(), kv.layer_off(layer), kv.block_size as i32, kv.kv_dim as i32)
    }

    /// Attention of `n` decode tokens (any sequences) over splits of `split` keys (a multiple
    /// of 32; `nsplit` of them cover the context): split partials in `part_ml`/`part_o`,
    /// merged by the last split block of each (token, kv head) into `out`. `arrivals` holds
    /// `n * n_kv_heads` zeros and is zero again afterwards.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn_decode(
        &self,
        qkv: u64,
        stride: usize,
        seq: &SeqPtrs,
        dims: &AttnDims,
        kv: &KvDev,
        layer: usize,
        split: usize,
        nsplit: usize,
        part: (u64, u64),
        arrivals: u64,
        out: u64,
        out_stride: usize,
        n: usize,
    ) -> Result<()> {
        let grid = (nsplit as u32, dims.n_kv_heads as u32, n as u32);
        launch!(&self.k.attn_decode, grid, 128, dims.decode_smem() as u32, &self.stream;
            qkv, stride as i32, seq.pos, seq.slot, seq.block_table, seq.max_blocks as i32,
            kv.k.ptr(), kv.v.ptr(), kv.layer_off(layer), kv.block_size as i32, kv.kv_dim as i32,
            dims.n_heads as i32, dims.group as i32, dims.head_dim as i32, dims.scale,
            split as i32, nsplit as i32, part.0, part.1, arrivals, out, out_stride as i32)
    }

    /// Causal attention of `n` tokens of one sequence (prefill).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn_prefill(
        &self,
        qkv: u64,
        stride: usize,
        seq: &SeqPtrs,
        dims: &AttnDims,
        kv: &KvDev,
        layer: usize,
        out: u64,
        out_stride: usize,
        n: usize,
    ) -> Result<()> {
        let grid = (n.div_ceil(ATT_PREFILL_TOKENS) as u32, dims.n_heads as u32, 1);
        launch!(&self.k.attn_prefill[dims.prefill_kernel()], grid, ATT_PREFILL_THREADS, dims.prefill_smem() as u32, &self.stream;
            qkv, stride as i32, n as i32, seq.pos, seq.slot, seq.block_table,
            seq.max_blocks as i32, kv.k.ptr(), kv.v.ptr(), kv.layer_off(layer),
            kv.block_size as i32, kv.kv_dim as i32, dims.n_heads as i32, dims.group as i32,
            dims.head_dim as i32, dims.scale, out, out_stride as i32)
    }

    /// `logits[i] = W xn[i]` for `i < n` (rows of `hidden` floats; logits rows of `vocab`).
    /// bf16 weights with `hidden % 32 == 0` (2B-4T) run on the tensor cores, up to 64 rows per
    /// launch; other dtypes on the f32 path, 8 rows per launch. Either way a row's logits do
    /// not depend on the other rows of the launch (batched == single decode, bit for bit).
    pub(crate) fn lm_head(&self, w: &DenseDev, xn: u64, n: usize, logits: u64) -> Result<()> {
        let (vocab, hidden) = (w.rows, w.cols);
        if w.kind == DenseKind::BF16 && hidden % 32 == 0 {
            let blocks = vocab.div_ceil(16 * LMT_WARPS as usize) as u32;
            let mut r0 = 0;
            while r0 < n {
                let nr = (n - r0).min(64);
                let ki = match nr.div_ceil(8) {
                    1 => 0,
                    2 => 1,
                    3 | 4 => 2,
                    _ => 3,
                };
                let nt = 1usize << ki;
                launch!(&self.k.lm_head_bf16[ki], (blocks, 1, 1), LMT_WARPS * 32, lmt_smem(nt) as u32, &self.stream;
                    w.buf.ptr(), vocab as i32, hidden as i32, xn + (r0 * hidden * 4) as u64, nr as i32,
                    logits + (r0 * vocab * 4) as u64)?;
                r0 += nr;
            }
            return Ok(());
        }
        let vec = i32::from(hidden % 8 == 0);
        let blocks = vocab.div_ceil(8).min(self.ctx.sm_count.max(1) as usize * 64).max(1) as u32;
        let mut r0 = 0;
        while r0 < n {
            let nr = (n - r0).min(LMH_ROWS);
            launch!(&self.k.lm_head, (blocks, 1, 1), 256, 0, &self.stream;
                w.buf.ptr(), w.kind as i32, vocab as i32, hidden as i32, vec,
                xn + (r0 * hidden * 4) as u64, nr as i32, logits + (r0 * vocab * 4) as u64)?;
            r0 += nr;
        }
        Ok(())
    }

    /// One token per logit row: `out[i]` from `logits[i]` with `params[i]`.
    pub(crate) fn sample(&self, logits: u64, vocab: usize, params: u64, out: u64, n: usize) -> Result<()> {
        launch!(&self.k.sample_rows, (n as u32, 1, 1), SAMPLE_THREADS, 0, &self.stream;
            logits, vocab as i32, params, out)
    }
}

fn describe(img: &nvrtc::Image, arch: (i32, i32)) -> String {
    let what = if img.is_cubin { "cubin" } else { "PTX" };
    let ver = nvrtc::version().map(|(a, b)| format!("NVRTC {a}.{b}")).unwrap_or_default();
    match (&img.cache_path, img.cached) {
        (Some(p), true) => format!("{what} sm_{}{} from cache {}", arch.0, arch.1, p.display()),
        (Some(p), false) => format!("{what} sm_{}{} compiled by {ver}, cached at {}", arch.0, arch.1, p.display()),
        (None, _) => format!("{what} sm_{}{} compiled by {ver}", arch.0, arch.1),
    }
}

/// PTX for the device's virtual architecture, `.version` lowered to what the driver accepts.
fn load_ptx_fallback(ctx: &Arc<Ctx>, src: &str, arch: (i32, i32)) -> Result<(Module, String)> {
    let img = nvrtc::compile(src, arch, true, &[])?;
    let mut drv = 0i32;
    let _ = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut drv) };
    let bytes = match nvrtc::driver_ptx_isa(drv) {
        Some(isa) => nvrtc::lower_ptx_version(&img.bytes, isa),
        None => img.bytes.clone(),
    };
    let m = Module::load(ctx, &bytes)?;
    Ok((m, format!("{} (PTX fallback, driver {drv})", describe(&img, arch))))
}

/// Compiles the kernels for `arch` without a device (a check that NVRTC accepts the source).
/// Returns the image size and NVRTC's log.
pub fn compile_only(arch: (i32, i32), kv_f16: bool, ptx: bool) -> Result<nvrtc::Image> {
    nvrtc::compile(&kernel_source(kv_f16), arch, ptx, &[])
}
