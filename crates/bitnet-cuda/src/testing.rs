//! Kernel-level entry points for the tests: each uploads host data, runs one kernel (the same
//! launch wrapper the model uses) and brings the result back. Not a stable API.

use bitnet_core::weights::DenseMatrix;
use bitnet_cpu::QuantActs;

use crate::driver::DevBuf;
use crate::error::{Error, Result};
use crate::gpu::{ActsPtrs, AttnDims, DenseDev, DeviceSampleParam, Gpu, KvDev, SeqPtrs, TernaryDev};
use crate::pack::TILE_COLS;

pub use crate::gpu::ATT_SPLIT;

/// A device with compiled kernels.
pub struct Kernels {
    pub gpu: Gpu,
}

/// Int8 activations as the device kernels produced them.
#[derive(Debug, Clone)]
pub struct DevActs {
    pub stride: usize,
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub sum: Vec<i32>,
}

/// A paged single-layer KV cache and a block table, for the attention tests.
#[derive(Debug, Clone)]
pub struct KvCase {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub n_blocks: usize,
    /// `[n_slots][max_blocks]`
    pub block_table: Vec<i32>,
    pub max_blocks: usize,
    /// `[n_blocks][block_size][kv_dim]` (f32 values; stored as f16 when the kernels are)
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

fn to_f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| f32_to_f16_bits(x)).collect()
}

/// Round-to-nearest-even f32 -> f16 bits (the `half` crate).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

impl Kernels {
    pub fn new(kv_f16: bool) -> Result<Kernels> {
        Ok(Kernels { gpu: Gpu::new(0, kv_f16)? })
    }

    fn acts_from(&self, x: &QuantActs, kstride: usize) -> Result<(DevBuf, DevBuf, DevBuf)> {
        let n = x.n_tok;
        let mut q = vec![0i8; n.max(1) * kstride];
        for t in 0..n {
            q[t * kstride..t * kstride + x.cols].copy_from_slice(&x.row(t)[..x.cols]);
        }
        Ok((
            DevBuf::from_slice(&self.gpu.ctx, &q)?,
            DevBuf::from_slice(&self.gpu.ctx, &x.scale[..n.max(1)])?,
            DevBuf::from_slice(&self.gpu.ctx, &x.sum[..n.max(1)])?,
        ))
    }

    /// `out[t][r] = W x[t]` (or `init[t][r] + W x[t]` with `init`), W given as codes.
    pub fn ternary_matmul(
        &self,
        codes: &[i8],
        rows: usize,
        cols: usize,
        scales: &[f32],
        x: &QuantActs,
        init: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        self.gpu.bind()?;
        let w = TernaryDev::upload(&self.gpu.ctx, codes, rows, cols, scales)?;
        let kstride = cols.div_ceil(TILE_COLS) * TILE_COLS;
        let (q, s, su) = self.acts_from(x, kstride)?;
        let n = x.n_tok;
        let out = match init {
            Some(i) => DevBuf::from_slice(&self.gpu.ctx, i)?,
            None => DevBuf::zeros(&self.gpu.ctx, n * rows * 4)?,
        };
        let acts = ActsPtrs { q: q.ptr(), stride: kstride, scale: s.ptr(), sum: su.ptr() };
        self.gpu.ternary_mm(&w, &acts, n, out.ptr(), rows, init.is_some())?;
        self.gpu.sync()?;
        let mut o = vec![0f32; n * rows];
        out.download_at(0, &mut o)?;
        Ok(o)
    }

    /// RMSNorm + quantization of `n` rows of `x` (stride `xs`), norm width `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_quant(
        &self,
        x: &[f32],
        xs: usize,
        n: usize,
        w: &[f32],
        d: usize,
        eps: f32,
        relu2: bool,
    ) -> Result<DevActs> {
        self.gpu.bind()?;
        let stride = d.div_ceil(TILE_COLS) * TILE_COLS;
        let xd = DevBuf::from_slice(&self.gpu.ctx, x)?;
        let wd = DevBuf::from_slice(&self.gpu.ctx, w)?;
        // poison: the kernel must write every byte of each row
        let q = DevBuf::from_slice(&self.gpu.ctx, &vec![0x5au8; n * stride])?;
        let s = DevBuf::zeros(&self.gpu.ctx, n * 4)?;
        let su = DevBuf::zeros(&self.gpu.ctx, n * 4)?;
        let acts = ActsPtrs { q: q.ptr(), stride, scale: s.ptr(), sum: su.ptr() };
        self.gpu.rmsnorm_quant(xd.ptr(), xs, wd.ptr(), d, eps, relu2, &acts, n)?;
        self.gpu.sync()?;
        let mut r = DevActs { stride, q: vec![0; n * stride], scale: vec![0.0; n], sum: vec![0; n] };
        q.download_at(0, &mut r.q)?;
        s.download_at(0, &mut r.scale)?;
        su.download_at(0, &mut r.sum)?;
        Ok(r)
    }

    /// The final RMSNorm of rows `first..first + n` of `x` (width `d`).
    pub fn rmsnorm_f32(&self, x: &[f32], first: usize, n: usize, w: &[f32], d: usize, eps: f32) -> Result<Vec<f32>> {
        self.gpu.bind()?;
        let xd = DevBuf::from_slice(&self.gpu.ctx, x)?;
        let wd = DevBuf::from_slice(&self.gpu.ctx, w)?;
        let o = DevBuf::zeros(&self.gpu.ctx, n * d * 4)?;
        self.gpu.rmsnorm_f32(xd.ptr(), d, first, wd.ptr(), d, eps, o.ptr(), n)?;
        self.gpu.sync()?;
        let mut r = vec![0f32; n * d];
        o.download_at(0, &mut r)?;
        Ok(r)
    }

    /// Embedding rows of `tokens`.
    pub fn embed(&self, table: &DenseMatrix, tokens: &[u32]) -> Result<Vec<f32>> {
        self.gpu.bind()?;
        let t = DenseDev::upload(&self.gpu.ctx, table)?;
        let tk = DevBuf::from_slice(&self.gpu.ctx, tokens)?;
        let x = DevBuf::zeros(&self.gpu.ctx, tokens.len() * table.cols() * 4)?;
        self.gpu.embed(&t, tk.ptr(), tokens.len(), x.ptr())?;
        self.gpu.sync()?;
        let mut r = vec![0f32; tokens.len() * table.cols()];
        x.download_at(0, &mut r)?;
        Ok(r)
    }

    /// LM head logits of `n` rows of `x` (`[n][hidden]`).
    pub fn lm_head(&self, w: &DenseMatrix, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.gpu.bind()?;
        let wd = DenseDev::upload(&self.gpu.ctx, w)?;
        let xd = DevBuf::from_slice(&self.gpu.ctx, x)?;
        let o = DevBuf::zeros(&self.gpu.ctx, n * w.rows() * 4)?;
        self.gpu.lm_head(&wd, xd.ptr(), n, o.ptr())?;
        self.gpu.sync()?;
        let mut r = vec![0f32; n * w.rows()];
        o.download_at(0, &mut r)?;
        Ok(r)
    }

    /// One token per row of `logits` (`[rows][vocab]`).
    pub fn sample(&self, logits: &[f32], vocab: usize, params: &[DeviceSampleParam]) -> Result<Vec<u32>> {
        self.gpu.bind()?;
        let n = params.len();
        if logits.len() != n * vocab {
            return Err(Error::input("logits length"));
        }
        let l = DevBuf::from_slice(&self.gpu.ctx, logits)?;
        let p = DevBuf::from_slice(&self.gpu.ctx, params)?;
        let o = DevBuf::zeros(&self.gpu.ctx, n * 4)?;
        self.gpu.sample(l.ptr(), vocab, p.ptr(), o.ptr(), n)?;
        self.gpu.sync()?;
        let mut r = vec![0u32; n];
        o.download_at(0, &mut r)?;
        Ok(r)
    }

    fn upload_kv(&self, c: &KvCase) -> Result<KvDev> {
        let (k, v) = if self.gpu.kv_f16 {
            (
                DevBuf::from_slice(&self.gpu.ctx, &to_f16_bits(&c.k))?,
                DevBuf::from_slice(&self.gpu.ctx, &to_f16_bits(&c.v))?,
            )
        } else {
            (DevBuf::from_slice(&self.gpu.ctx, &c.k)?, DevBuf::from_slice(&self.gpu.ctx, &c.v)?)
        };
        Ok(KvDev { k, v, n_blocks: c.n_blocks, block_size: c.block_size, kv_dim: c.n_kv_heads * c.head_dim })
    }

    /// A step's rows `qkv` and its positions, slots and `case`'s block table on the device: the
    /// qkv buffer, the others (kept alive by the caller) and the pointers the kernels take.
    fn upload_step(
        &self,
        case: &KvCase,
        qkv: &[f32],
        pos: &[i32],
        slot: &[i32],
    ) -> Result<(DevBuf, [DevBuf; 3], SeqPtrs)> {
        let ctx = &self.gpu.ctx;
        let q = DevBuf::from_slice(ctx, qkv)?;
        let bufs = [
            DevBuf::from_slice(ctx, pos)?,
            DevBuf::from_slice(ctx, slot)?,
            DevBuf::from_slice(ctx, &case.block_table)?,
        ];
        let seq = SeqPtrs {
            pos: bufs[0].ptr(),
            slot: bufs[1].ptr(),
            block_table: bufs[2].ptr(),
            max_blocks: case.max_blocks,
        };
        Ok((q, bufs, seq))
    }

    fn dims(c: &KvCase) -> AttnDims {
        AttnDims {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            group: c.n_heads / c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0f32 / (c.head_dim as f32).sqrt(),
        }
    }

    /// RoPE + KV write of `n` rows of `qkv` (`[n][q_dim + 2 kv_dim]`) at `pos`/`slot` into
    /// layer 0 of `case`'s cache, with the CPU's tables `cos`/`sin` (`[max_pos][head_dim/2]`).
    /// Returns (rotated qkv, K cache, V cache) as f32 (f16 caches widened).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &self,
        case: &KvCase,
        qkv: &[f32],
        pos: &[i32],
        slot: &[i32],
        cos: &[f32],
        sin: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.gpu.bind()?;
        let dims = Self::dims(case);
        let n = pos.len();
        let stride = dims.q_dim() + 2 * dims.kv_dim();
        let kv = self.upload_kv(case)?;
        let (q, _bufs, seq) = self.upload_step(case, qkv, pos, slot)?;
        let c = DevBuf::from_slice(&self.gpu.ctx, cos)?;
        let sn = DevBuf::from_slice(&self.gpu.ctx, sin)?;
        self.gpu.rope_kv(q.ptr(), stride, &seq, c.ptr(), sn.ptr(), &dims, &kv, 0, n)?;
        self.gpu.sync()?;
        let mut out = vec![0f32; n * stride];
        q.download_at(0, &mut out)?;
        let (kc, vc) = self.download_kv(&kv, case.k.len())?;
        Ok((out, kc, vc))
    }

    fn download_kv(&self, kv: &KvDev, elems: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.gpu.kv_f16 {
            let mut a = vec![0u16; elems];
            let mut b = vec![0u16; elems];
            kv.k.download_at(0, &mut a)?;
            kv.v.download_at(0, &mut b)?;
            let w = |v: Vec<u16>| v.into_iter().map(bitnet_cpu::dense::f16_to_f32).collect();
            Ok((w(a), w(b)))
        } else {
            let mut a = vec![0f32; elems];
            let mut b = vec![0f32; elems];
            kv.k.download_at(0, &mut a)?;
            kv.v.download_at(0, &mut b)?;
            Ok((a, b))
        }
    }

    /// Attention of `n` tokens (query rows in `qkv`, `[n][q_dim + 2 kv_dim]`) over `case`'s
    /// cache: with `prefill` the causal prefill kernel (every token must be of `slot[0]`), else
    /// the split decode kernel over splits of `split` keys (a multiple of 32) with its merge.
    /// Returns `[n][q_dim]`.
    pub fn attention(
        &self,
        case: &KvCase,
        qkv: &[f32],
        pos: &[i32],
        slot: &[i32],
        prefill: bool,
        split: usize,
    ) -> Result<Vec<f32>> {
        let nsplit = (case.max_blocks * case.block_size).div_ceil(split);
        self.gpu.bind()?;
        let dims = Self::dims(case);
        self.gpu.prepare_attention(&dims)?;
        let n = pos.len();
        let stride = dims.q_dim() + 2 * dims.kv_dim();
        let kv = self.upload_kv(case)?;
        let (q, _bufs, seq) = self.upload_step(case, qkv, pos, slot)?;
        let out = DevBuf::zeros(&self.gpu.ctx, n * dims.q_dim() * 4)?;
        if prefill {
            self.gpu.attn_prefill(q.ptr(), stride, &seq, &dims, &kv, 0, out.ptr(), dims.q_dim(), n)?;
        } else {
            let ml = DevBuf::zeros(&self.gpu.ctx, n * dims.n_heads * nsplit * 2 * 4)?;
            let po = DevBuf::zeros(&self.gpu.ctx, n * dims.n_heads * nsplit * dims.head_dim * 4)?;
            let arrivals = DevBuf::zeros(&self.gpu.ctx, n * dims.n_kv_heads * 4)?;
            self.gpu.attn_decode(
                q.ptr(),
                stride,
                &seq,
                &dims,
                &kv,
                0,
                split,
                nsplit,
                (ml.ptr(), po.ptr()),
                arrivals.ptr(),
                out.ptr(),
                dims.q_dim(),
                n,
            )?;
        }
        self.gpu.sync()?;
        let mut r = vec![0f32; n * dims.q_dim()];
        out.download_at(0, &mut r)?;
        Ok(r)
    }
}
