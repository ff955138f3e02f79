//! [`CudaModel`]: the BitNet b1.58 model on one CUDA device, built from the canonical weight form
//! like `bitnet_core::model::Model::load`, with the same step semantics:
//!
//! embedding -> per layer [RMSNorm+quant -> q|k|v -> RoPE + KV write -> attention -> sub-norm+quant
//! -> o_proj (+= x) -> RMSNorm+quant -> gate|up -> relu^2*up + sub-norm+quant -> down (+= x)]
//! -> final norm -> LM head -> (device sampling).
//!
//! Everything is allocated at load. A decode step uploads its inputs (token ids, positions,
//! block-table rows, sampling settings) on the copy stream, the compute stream waits for them
//! (event) and replays the CUDA graph of its batch-size bucket, and the copy stream brings the
//! token ids back once the compute stream's event fires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bitnet_core::block_pool::BlockPool;
use bitnet_core::config::ModelConfig;
use bitnet_core::precision::{KvPrecision, LmHeadPrecision};
use bitnet_core::sampler::SamplingParams;
use bitnet_core::weights::{LayerNorm, Proj, TernaryCodes, WeightSource};

use crate::api::{bucket_of, check_device_sampling, CudaOptions, CudaSeq, KernelTime, BUCKETS, MAX_BATCH};
use crate::driver::{DevBuf, Event, GraphExec, HostBuf};
use crate::error::{Error, Result};
use crate::gpu::{
    decode_split, ActsPtrs, AttnDims, DenseDev, DeviceSampleParam, Gpu, KvDev, SeqPtrs, TernaryDev, ATT_SPLIT,
};
use crate::pack::TILE_COLS;

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

struct Layer {
    input_norm: DevBuf,
    qkv: TernaryDev,
    attn_sub_norm: DevBuf,
    o: TernaryDev,
    post_norm: DevBuf,
    gate_up: TernaryDev,
    ffn_sub_norm: DevBuf,
    down: TernaryDev,
}

/// Device activation buffers, sized for the largest step.
struct Bufs {
    tokens: DevBuf,
    pos: DevBuf,
    slot: DevBuf,
    block_table: DevBuf,
    sparams: DevBuf,
    out_tokens: DevBuf,
    x: DevBuf,
    q: DevBuf,
    qscale: DevBuf,
    qsum: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    gate_up: DevBuf,
    part_ml: DevBuf,
    part_o: DevBuf,
    /// split blocks finished per (token, kv head) of a decode step (self-resetting zeros)
    arrivals: DevBuf,
    xn: DevBuf,
    logits: DevBuf,
}

/// Page-locked host copies of the step inputs and outputs.
struct Staging {
    tokens: HostBuf<u32>,
    pos: HostBuf<i32>,
    slot: HostBuf<i32>,
    sparams: HostBuf<DeviceSampleParam>,
    out_tokens: HostBuf<u32>,
    block_table: HostBuf<i32>,
}

/// The model on the device (see the module docs).
///
/// Fields drop in order: the graphs before the module their kernels live in (`gpu`, last).
pub struct CudaModel {
    graphs: HashMap<usize, GraphExec>,
    pub cfg: ModelConfig,
    opts: CudaOptions,
    id: u64,
    layers: Vec<Layer>,
    embed: DenseDev,
    /// None: tied to the embedding.
    lm_head: Option<DenseDev>,
    final_norm: DevBuf,
    rope_cos: DevBuf,
    rope_sin: DevBuf,
    kv: KvDev,
    dims: AttnDims,
    bufs: Bufs,
    staging: Staging,
    /// host mirror of the device block table `[(max_seqs + 1) * max_blocks]`
    bt: Vec<i32>,
    bt_dirty: bool,
    max_blocks: usize,
    dummy_slot: u32,
    /// who holds which KV block (bitnet-core's bookkeeping, shared with the CPU cache; the
    /// prefix cache too when enabled); each sequence's table is mirrored into `bt`
    pool: BlockPool,
    free_slots: Vec<u32>,
    max_tok: usize,
    max_rows: usize,
    max_bucket: usize,
    kstride: usize,
    use_graphs: bool,
    /// kernel timing on (graphs bypassed)
    profiling: bool,
    ev_in: Event,
    ev_done: Event,
    ev_out: Event,
    format: String,
    bytes_per_token: usize,
    gpu: Gpu,
}

impl Drop for CudaModel {
    fn drop(&mut self) {
        // Nothing may still run on buffers about to be freed.
        let _ = self.gpu.bind();
        let _ = self.gpu.copy.sync();
        let _ = self.gpu.stream.sync();
    }
}

fn proj_codes(src: &dyn WeightSource, cfg: &ModelConfig, l: usize, p: Proj) -> Result<TernaryCodes> {
    let t = src.ternary(l, p)?;
    let (rows, cols) = cfg.proj_shape(p);
    if t.rows != rows || t.cols != cols || t.codes.len() != rows * cols {
        return Err(Error::Core(bitnet_core::Error::config(format!(
            "layer {l} {p:?} projection is {}x{}, config expects {rows}x{cols}",
            t.rows, t.cols
        ))));
    }
    if let Some(bad) = bitnet_cpu::kernels::invalid_code(&t.codes) {
        return Err(Error::Core(bitnet_core::Error::config(format!(
            "layer {l} {p:?}: ternary code {bad} out of range"
        ))));
    }
    Ok(t)
}

/// Concatenates projections row-wise (q|k|v, gate|up), each part keeping its own scale, and
/// uploads the packed result.
fn fuse_upload(gpu: &Gpu, parts: Vec<TernaryCodes>) -> Result<TernaryDev> {
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    let mut scales = Vec::with_capacity(rows);
    let dev = if parts.len() == 1 {
        scales.extend(std::iter::repeat_n(parts[0].scale, rows));
        TernaryDev::upload(&gpu.ctx, &parts[0].codes, rows, cols, &scales)?
    } else {
        let mut codes = Vec::with_capacity(rows * cols);
        for p in &parts {
            codes.extend_from_slice(&p.codes);
            scales.extend(std::iter::repeat_n(p.scale, p.rows));
        }
        TernaryDev::upload(&gpu.ctx, &codes, rows, cols, &scales)?
    };
    Ok(dev)
}

fn f32_buf(gpu: &Gpu, n: usize) -> Result<DevBuf> {
    DevBuf::zeros(&gpu.ctx, n * 4)
}

impl CudaModel {
    /// Builds the model on the device from any weight source: fuses q|k|v and gate|up, packs
    /// the ternary weights into the tile layout, uploads the embedding (and an untied LM head)
    /// in their stored dtype, precomputes the RoPE tables exactly as the CPU, and allocates
    /// the KV cache and every activation buffer.
    pub fn load(src: &dyn WeightSource, cfg: ModelConfig, opts: &CudaOptions) -> Result<CudaModel> {
        crate::cuda_available().map_err(Error::Unavailable)?;
        if opts.plan.lm_head != LmHeadPrecision::Stored {
            return Err(Error::Unsupported(format!(
                "precision plan {}: its {:?} LM head is CPU-only (use the exact plan, or a plan \
                 with the stored-dtype LM head)",
                opts.plan.name, opts.plan.lm_head
            )));
        }
        if opts.plan.kv_cache == KvPrecision::Int8 {
            return Err(Error::Unsupported(format!(
                "precision plan {}: the int8 KV cache is CPU-only (f32 or f16 on the GPU)",
                opts.plan.name
            )));
        }
        if opts.max_seqs == 0 || opts.max_seqs > MAX_BATCH {
            return Err(Error::input(format!("max_seqs must be in 1..={MAX_BATCH}, got {}", opts.max_seqs)));
        }
        if opts.block_size == 0 || opts.prefill_chunk == 0 || opts.max_ctx == 0 {
            return Err(Error::input("block_size, prefill_chunk and max_ctx must be at least 1"));
        }
        let dims = AttnDims {
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            group: cfg.gqa_group,
            head_dim: cfg.head_dim,
            scale: 1.0f32 / (cfg.head_dim as f32).sqrt(),
        };
        dims.check()?;
        let kv_f16 = opts.plan.kv_cache == KvPrecision::F16;
        let mut gpu = Gpu::new(opts.device, kv_f16)?;
        gpu.set_pdl(opts.pdl);
        gpu.prepare_attention(&dims)?;

        // Weights.
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let norm = |l: usize, which: LayerNorm, n: usize| -> Result<DevBuf> {
            let w = src.layer_norm(l, which)?;
            if w.len() != n {
                return Err(Error::Core(bitnet_core::Error::config(format!(
                    "layer {l} {which:?} norm has {} values, expected {n}",
                    w.len()
                ))));
            }
            DevBuf::from_slice(&gpu.ctx, &w)
        };
        let mut ternary_bytes = 0;
        for l in 0..cfg.num_layers {
            let qkv = fuse_upload(
                &gpu,
                vec![
                    proj_codes(src, &cfg, l, Proj::Q)?,
                    proj_codes(src, &cfg, l, Proj::K)?,
                    proj_codes(src, &cfg, l, Proj::V)?,
                ],
            )?;
            let o = fuse_upload(&gpu, vec![proj_codes(src, &cfg, l, Proj::O)?])?;
            let gate_up =
                fuse_upload(&gpu, vec![proj_codes(src, &cfg, l, Proj::Gate)?, proj_codes(src, &cfg, l, Proj::Up)?])?;
            let down = fuse_upload(&gpu, vec![proj_codes(src, &cfg, l, Proj::Down)?])?;
            ternary_bytes += qkv.nbytes() + o.nbytes() + gate_up.nbytes() + down.nbytes();
            layers.push(Layer {
                input_norm: norm(l, LayerNorm::Input, cfg.hidden_size)?,
                qkv,
                attn_sub_norm: norm(l, LayerNorm::AttnSub, cfg.q_dim)?,
                o,
                post_norm: norm(l, LayerNorm::PostAttention, cfg.hidden_size)?,
                gate_up,
                ffn_sub_norm: norm(l, LayerNorm::FfnSub, cfg.intermediate_size)?,
                down,
            });
        }
        let embed_h = src.embedding()?;
        if embed_h.rows() != cfg.vocab_size || embed_h.cols() != cfg.hidden_size {
            return Err(Error::Core(bitnet_core::Error::config(format!(
                "embedding is {}x{}, config expects {}x{}",
                embed_h.rows(),
                embed_h.cols(),
                cfg.vocab_size,
                cfg.hidden_size
            ))));
        }
        let embed = DenseDev::upload(&gpu.ctx, &embed_h)?;
        drop(embed_h);
        let lm_head = match src.lm_head()? {
            Some(h) => {
                if h.rows() != cfg.vocab_size || h.cols() != cfg.hidden_size {
                    return Err(Error::Core(bitnet_core::Error::config(format!(
                        "lm_head is {}x{}, config expects {}x{}",
                        h.rows(),
                        h.cols(),
                        cfg.vocab_size,
                        cfg.hidden_size
                    ))));
                }
                Some(DenseDev::upload(&gpu.ctx, &h)?)
            }
            None => None,
        };
        let final_norm_h = src.final_norm()?;
        if final_norm_h.len() != cfg.hidden_size {
            return Err(Error::Core(bitnet_core::Error::config("final norm length differs from hidden_size")));
        }
        let final_norm = DevBuf::from_slice(&gpu.ctx, &final_norm_h)?;

        // RoPE tables, taken from the CPU's own implementation (rotating a vector whose first
        // half is 1 and second half 0 yields cos in the first half and sin in the second, exactly).
        let max_pos = cfg.max_position_embeddings;
        let half = cfg.head_dim / 2;
        let rope = bitnet_core::model::rope::Rope::new(cfg.head_dim, cfg.rope_theta, max_pos);
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        let mut v = vec![0f32; cfg.head_dim];
        for p in 0..max_pos {
            v[..half].fill(1.0);
            v[half..].fill(0.0);
            rope.apply(&mut v, p);
            cos[p * half..(p + 1) * half].copy_from_slice(&v[..half]);
            sin[p * half..(p + 1) * half].copy_from_slice(&v[half..]);
        }
        let rope_cos = DevBuf::from_slice(&gpu.ctx, &cos)?;
        let rope_sin = DevBuf::from_slice(&gpu.ctx, &sin)?;

        // KV cache: one extra block for the padding rows of a bucket.
        let max_ctx = opts.max_ctx.min(max_pos);
        let bs = opts.block_size;
        let max_blocks = max_ctx.div_ceil(bs);
        let usable = opts.kv_blocks.unwrap_or(opts.max_seqs * max_blocks).max(1);
        let n_blocks = usable + 1;
        let kv_elems = cfg.num_layers * n_blocks * bs * cfg.kv_dim;
        let kv_bytes = kv_elems * if kv_f16 { 2 } else { 4 };
        let kv = KvDev {
            k: DevBuf::zeros(&gpu.ctx, kv_bytes)?,
            v: DevBuf::zeros(&gpu.ctx, kv_bytes)?,
            n_blocks,
            block_size: bs,
            kv_dim: cfg.kv_dim,
        };
        let dummy_block = (n_blocks - 1) as i32;
        let dummy_slot = opts.max_seqs as u32;
        let mut bt = vec![0i32; (opts.max_seqs + 1) * max_blocks];
        bt[dummy_slot as usize * max_blocks..].fill(dummy_block);

        // Activation buffers.
        let max_bucket = bucket_of(opts.max_seqs).unwrap_or(MAX_BATCH);
        let max_tok = opts.prefill_chunk.max(max_bucket);
        let max_rows = opts.max_logit_rows.max(max_bucket);
        let nsplit = max_ctx.div_ceil(ATT_SPLIT);
        let kstride = [cfg.hidden_size, cfg.q_dim, cfg.intermediate_size]
            .iter()
            .map(|&k| k.div_ceil(TILE_COLS) * TILE_COLS)
            .max()
            .unwrap();
        let qkv_w = cfg.q_dim + 2 * cfg.kv_dim;
        let bufs = Bufs {
            tokens: DevBuf::zeros(&gpu.ctx, max_tok * 4)?,
            pos: DevBuf::zeros(&gpu.ctx, max_tok * 4)?,
            slot: DevBuf::zeros(&gpu.ctx, max_tok * 4)?,
            block_table: DevBuf::from_slice(&gpu.ctx, &bt)?,
            sparams: DevBuf::zeros(&gpu.ctx, max_rows * std::mem::size_of::<DeviceSampleParam>())?,
            out_tokens: DevBuf::zeros(&gpu.ctx, max_rows * 4)?,
            x: f32_buf(&gpu, max_tok * cfg.hidden_size)?,
            q: DevBuf::zeros(&gpu.ctx, max_tok * kstride)?,
            qscale: f32_buf(&gpu, max_tok)?,
            qsum: DevBuf::zeros(&gpu.ctx, max_tok * 4)?,
            qkv: f32_buf(&gpu, max_tok * qkv_w)?,
            attn: f32_buf(&gpu, max_tok * cfg.q_dim)?,
            gate_up: f32_buf(&gpu, max_tok * 2 * cfg.intermediate_size)?,
            part_ml: f32_buf(&gpu, max_bucket * cfg.num_heads * nsplit * 2)?,
            part_o: f32_buf(&gpu, max_bucket * cfg.num_heads * nsplit * cfg.head_dim)?,
            arrivals: DevBuf::zeros(&gpu.ctx, max_bucket * cfg.num_kv_heads * 4)?,
            xn: f32_buf(&gpu, max_rows * cfg.hidden_size)?,
            logits: f32_buf(&gpu, max_rows * cfg.vocab_size)?,
        };
        let staging = Staging {
            tokens: HostBuf::new(&gpu.ctx, max_tok)?,
            pos: HostBuf::new(&gpu.ctx, max_tok)?,
            slot: HostBuf::new(&gpu.ctx, max_tok)?,
            sparams: HostBuf::new(&gpu.ctx, max_rows)?,
            out_tokens: HostBuf::new(&gpu.ctx, max_rows)?,
            block_table: HostBuf::new(&gpu.ctx, bt.len())?,
        };
        let head_bytes = lm_head.as_ref().unwrap_or(&embed).nbytes();
        let ev_in = Event::new(&gpu.ctx, false)?;
        let ev_done = Event::new(&gpu.ctx, false)?;
        let ev_out = Event::new(&gpu.ctx, false)?;
        Ok(CudaModel {
            opts: CudaOptions { max_ctx, ..opts.clone() },
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            layers,
            embed,
            lm_head,
            final_norm,
            rope_cos,
            rope_sin,
            kv,
            dims,
            bufs,
            staging,
            bt,
            bt_dirty: false,
            max_blocks,
            dummy_slot,
            pool: BlockPool::new(usable, bs, max_ctx),
            free_slots: (0..opts.max_seqs as u32).rev().collect(),
            max_tok,
            max_rows,
            max_bucket,
            kstride,
            graphs: HashMap::new(),
            use_graphs: opts.graphs,
            profiling: false,
            ev_in,
            ev_done,
            ev_out,
            format: src.format_name(),
            bytes_per_token: ternary_bytes + head_bytes,
            cfg,
            gpu,
        })
    }

    // -- information ---------------------------------------------------------------------------

    /// "NVIDIA H100 ... (sm_90, 132 SMs)".
    pub fn device_name(&self) -> String {
        self.gpu.device_name()
    }
    /// How the kernels were compiled or loaded.
    pub fn kernel_note(&self) -> String {
        self.gpu.compile_note.clone()
    }
    /// The checkpoint format the weights came from.
    pub fn format(&self) -> &str {
        &self.format
    }
    pub fn options(&self) -> &CudaOptions {
        &self.opts
    }
    /// Bytes of weights read per decode step (packed ternary matrices + LM head).
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.gpu.ctx.mem_info()
    }
    /// Whether decode steps replay CUDA graphs (else the same kernels are launched one by one).
    pub fn set_use_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }
    pub fn uses_graphs(&self) -> bool {
        self.use_graphs
    }
    /// Whether kernels are launched with programmatic dependent launch.
    pub fn uses_pdl(&self) -> bool {
        self.gpu.pdl()
    }
    /// Starts timing every kernel launch (diagnostics): each gets two timing events, and
    /// decode steps launch their kernels one by one instead of replaying a graph until
    /// [`CudaModel::profile_take`].
    pub fn profile_start(&mut self) {
        self.profiling = true;
        self.gpu.stream.profile_start();
    }
    /// Waits for the device and returns the launches timed since [`CudaModel::profile_start`].
    pub fn profile_take(&mut self) -> Result<Vec<KernelTime>> {
        self.profiling = false;
        self.gpu.bind()?;
        let timed = self.gpu.stream.profile_take()?;
        timed.iter().map(|t| Ok(KernelTime { name: t.name.clone(), grid: t.grid, ms: t.ms()? as f64 })).collect()
    }
    /// Decode batch sizes captured so far.
    pub fn captured_buckets(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.graphs.keys().copied().collect();
        v.sort_unstable();
        v
    }
    /// The largest decode batch.
    pub fn max_batch(&self) -> usize {
        self.opts.max_seqs
    }
    /// The most tokens [`CudaModel::prefill_all_logits`] takes in one call.
    pub fn max_all_logits_tokens(&self) -> usize {
        self.opts.prefill_chunk.min(self.max_rows)
    }

    // -- sequences -----------------------------------------------------------------------------

    /// A new, empty sequence (takes one of `max_seqs` slots).
    pub fn new_seq(&mut self) -> Result<CudaSeq> {
        let slot = self.free_slots.pop().ok_or_else(|| {
            Error::input(format!("all {} sequence slots are in use (CudaOptions::max_seqs)", self.opts.max_seqs))
        })?;
        Ok(CudaSeq { slot, cache: self.pool.new_seq(), rng: 0, owner: self.id })
    }

    /// Gives a sequence's blocks and slot back.
    pub fn release(&mut self, mut seq: CudaSeq) {
        if seq.owner != self.id {
            return;
        }
        self.pool.release(&mut seq.cache);
        self.free_slots.push(seq.slot);
        seq.owner = 0;
    }

    /// Empties a sequence (its blocks go back to the pool; it keeps its slot).
    pub fn reset_seq(&mut self, seq: &mut CudaSeq) {
        if seq.owner == self.id {
            self.pool.release(&mut seq.cache);
        }
    }

    /// KV blocks sequences can hold (the pool less the padding rows' block).
    pub fn total_blocks(&self) -> usize {
        self.pool.n_blocks()
    }
    /// Blocks a sequence can get (free ones, and cached ones nobody holds).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    /// Turns the prefix cache on (bitnet-core's `prefix_cache.rs`): full blocks published with
    /// [`CudaModel::publish_prefix`] are reused by [`CudaModel::attach_prefix`].
    pub fn enable_prefix_cache(&mut self) {
        self.pool.enable_prefix_cache();
    }
    /// Blocks kept only for the prefix cache (no sequence holds them; counted as free).
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }

    fn check_seq(&self, seq: &CudaSeq) -> Result<()> {
        if seq.owner != self.id {
            return Err(Error::input("this sequence belongs to another CudaModel"));
        }
        Ok(())
    }

    /// Writes `seq`'s block table into its slot's row of the host mirror (uploaded before the
    /// next step when anything changed).
    fn sync_table(&mut self, seq: &CudaSeq) {
        let row = &mut self.bt[seq.slot as usize * self.max_blocks..][..self.max_blocks];
        for (dst, &b) in row.iter_mut().zip(seq.cache.blocks()) {
            if *dst != b as i32 {
                *dst = b as i32;
                self.bt_dirty = true;
            }
        }
    }

    /// Makes `seq` hold blocks for `new_len` positions (prefill and decode do this themselves);
    /// takes nothing when the pool cannot supply them.
    pub fn reserve(&mut self, seq: &mut CudaSeq, new_len: usize) -> Result<()> {
        self.check_seq(seq)?;
        if new_len > self.opts.max_ctx {
            return Err(Error::input(format!(
                "sequence of {new_len} positions exceeds the context of {} positions",
                self.opts.max_ctx
            )));
        }
        if seq.cache.capacity(self.opts.block_size) < new_len {
            self.pool.reserve(&mut seq.cache, new_len)?;
            self.sync_table(seq);
        }
        Ok(())
    }

    /// Gives the fresh sequence `seq` cached K/V for a prefix of `tokens` (all but the last
    /// token at most); returns the positions it now holds (0 with the prefix cache off).
    pub fn attach_prefix(&mut self, seq: &mut CudaSeq, tokens: &[u32]) -> usize {
        if seq.owner != self.id {
            return 0;
        }
        let n = self.pool.attach_prefix(&mut seq.cache, tokens);
        self.sync_table(seq);
        n
    }

    /// Makes `seq`'s full blocks findable by later sequences; `tokens` are the tokens at its
    /// positions (at least `seq.len()` of them).
    pub fn publish_prefix(&mut self, seq: &mut CudaSeq, tokens: &[u32]) {
        if seq.owner == self.id {
            self.pool.publish(&mut seq.cache, tokens);
        }
    }

    /// Keeps the first `len` positions of `seq`; a block it shares through the prefix cache is
    /// first copied on the device (copy on write). Returns the positions kept (fewer when the
    /// pool had no block for a copy).
    pub fn truncate(&mut self, seq: &mut CudaSeq, len: usize) -> Result<usize> {
        self.check_seq(seq)?;
        let mut copies: Vec<(u32, u32)> = Vec::new();
        let kept = self.pool.truncate(&mut seq.cache, len, |from, to| copies.push((from, to)));
        if !copies.is_empty() {
            self.gpu.bind()?;
            let kv = &self.kv;
            // bytes of one block of one layer, in either store (f32 or f16 elements)
            let block_bytes = kv.k.bytes() / (self.cfg.num_layers * kv.n_blocks);
            // on the compute stream: after the kernels that wrote `from`, before any that
            // writes `to`
            for &(from, to) in &copies {
                for l in 0..self.cfg.num_layers {
                    let base = l * kv.n_blocks;
                    let (src, dst) = ((base + from as usize) * block_bytes, (base + to as usize) * block_bytes);
                    self.gpu.stream.dtod(kv.k.ptr() + dst as u64, kv.k.ptr() + src as u64, block_bytes)?;
                    self.gpu.stream.dtod(kv.v.ptr() + dst as u64, kv.v.ptr() + src as u64, block_bytes)?;
                }
            }
        }
        self.sync_table(seq);
        Ok(kept)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::input(format!("token id {bad} out of range (vocab size {})", self.cfg.vocab_size)));
        }
        Ok(())
    }

    // -- the step ------------------------------------------------------------------------------

    fn acts(&self) -> ActsPtrs {
        ActsPtrs {
            q: self.bufs.q.ptr(),
            stride: self.kstride,
            scale: self.bufs.qscale.ptr(),
            sum: self.bufs.qsum.ptr(),
        }
    }

    fn seq_ptrs(&self) -> SeqPtrs {
        SeqPtrs {
            pos: self.bufs.pos.ptr(),
            slot: self.bufs.slot.ptr(),
            block_table: self.bufs.block_table.ptr(),
            max_blocks: self.max_blocks,
        }
    }

    /// Enqueues the network for the `n` tokens in the input buffers: `prefill` (all tokens of
    /// one sequence, causal) or decode (any sequences, split attention, `n <= max_bucket`);
    /// then, if `head_rows > 0`, the final norm and LM head on token rows
    /// `head_first..head_first + head_rows`, and device sampling when `sample`.
    /// Launches only: usable inside a graph capture.
    fn enqueue_forward(
        &self,
        n: usize,
        prefill: bool,
        head_first: usize,
        head_rows: usize,
        sample: bool,
    ) -> Result<()> {
        let c = &self.cfg;
        let g = &self.gpu;
        let b = &self.bufs;
        let acts = self.acts();
        let seq = self.seq_ptrs();
        let eps = c.rms_norm_eps;
        let qkv_w = c.q_dim + 2 * c.kv_dim;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        // decode: bigger batches take bigger attention splits (fewer partials to merge);
        // the partial buffers hold the smallest split's `nsplit`
        let split = decode_split(n, c.num_kv_heads, self.opts.max_ctx, g.ctx.sm_count as usize);
        g.embed(&self.embed, b.tokens.ptr(), n, b.x.ptr())?;
        for (l, ly) in self.layers.iter().enumerate() {
            g.rmsnorm_quant(b.x.ptr(), h, ly.input_norm.ptr(), h, eps, false, &acts, n)?;
            g.ternary_mm(&ly.qkv, &acts, n, b.qkv.ptr(), qkv_w, false)?;
            g.rope_kv(b.qkv.ptr(), qkv_w, &seq, self.rope_cos.ptr(), self.rope_sin.ptr(), &self.dims, &self.kv, l, n)?;
            if prefill {
                g.attn_prefill(b.qkv.ptr(), qkv_w, &seq, &self.dims, &self.kv, l, b.attn.ptr(), c.q_dim, n)?;
            } else {
                g.attn_decode(
                    b.qkv.ptr(),
                    qkv_w,
                    &seq,
                    &self.dims,
                    &self.kv,
                    l,
                    split,
                    self.opts.max_ctx.div_ceil(split),
                    (b.part_ml.ptr(), b.part_o.ptr()),
                    b.arrivals.ptr(),
                    b.attn.ptr(),
                    c.q_dim,
                    n,
                )?;
            }
            g.rmsnorm_quant(b.attn.ptr(), c.q_dim, ly.attn_sub_norm.ptr(), c.q_dim, eps, false, &acts, n)?;
            g.ternary_mm(&ly.o, &acts, n, b.x.ptr(), h, true)?;
            g.rmsnorm_quant(b.x.ptr(), h, ly.post_norm.ptr(), h, eps, false, &acts, n)?;
            g.ternary_mm(&ly.gate_up, &acts, n, b.gate_up.ptr(), 2 * i, false)?;
            g.rmsnorm_quant(b.gate_up.ptr(), 2 * i, ly.ffn_sub_norm.ptr(), i, eps, true, &acts, n)?;
            g.ternary_mm(&ly.down, &acts, n, b.x.ptr(), h, true)?;
        }
        if head_rows > 0 {
            g.rmsnorm_f32(b.x.ptr(), h, head_first, self.final_norm.ptr(), h, eps, b.xn.ptr(), head_rows)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            g.lm_head(head, b.xn.ptr(), head_rows, b.logits.ptr())?;
            if sample {
                g.sample(b.logits.ptr(), c.vocab_size, b.sparams.ptr(), b.out_tokens.ptr(), head_rows)?;
            }
        }
        Ok(())
    }

    /// Waits until the staging buffers may be rewritten (their last copy has run).
    fn staging_ready(&self) -> Result<()> {
        self.ev_in.sync()
    }

    /// Copies the first `n` staged tokens/positions/slots and `rows` sampling settings (and the
    /// block table when it changed) on the copy stream, after the previous step is done with
    /// them; the compute stream then waits for the copies.
    fn upload_inputs(&mut self, n: usize, rows: usize) -> Result<()> {
        let g = &self.gpu;
        let (b, s) = (&self.bufs, &mut self.staging);
        g.copy.wait(&self.ev_done)?;
        g.copy.htod(b.tokens.ptr(), &s.tokens.as_slice()[..n])?;
        g.copy.htod(b.pos.ptr(), &s.pos.as_slice()[..n])?;
        g.copy.htod(b.slot.ptr(), &s.slot.as_slice()[..n])?;
        if rows > 0 {
            g.copy.htod(b.sparams.ptr(), &s.sparams.as_slice()[..rows])?;
        }
        if self.bt_dirty {
            s.block_table.as_mut_slice().copy_from_slice(&self.bt);
            g.copy.htod(b.block_table.ptr(), s.block_table.as_slice())?;
            self.bt_dirty = false;
        }
        self.ev_in.record(&g.copy)?;
        g.stream.wait(&self.ev_in)
    }

    /// Marks the end of the enqueued step on the compute stream.
    fn finish_step(&self) -> Result<()> {
        self.ev_done.record(&self.gpu.stream)
    }

    /// Brings `rows` sampled token ids back (copy stream, after the step) and waits for them.
    fn download_tokens(&mut self, rows: usize) -> Result<Vec<u32>> {
        let g = &self.gpu;
        g.copy.wait(&self.ev_done)?;
        g.copy.dtoh(&mut self.staging.out_tokens.as_mut_slice()[..rows], self.bufs.out_tokens.ptr())?;
        self.ev_out.record(&g.copy)?;
        self.ev_out.sync()?;
        Ok(self.staging.out_tokens.as_slice()[..rows].to_vec())
    }

    /// Logit rows `0..rows` of the last step (waits for it).
    fn download_logits(&self, rows: usize) -> Result<Vec<f32>> {
        self.ev_done.sync()?;
        let mut out = vec![0f32; rows * self.cfg.vocab_size];
        self.bufs.logits.download_at(0, &mut out)?;
        Ok(out)
    }

    fn device_params(&self, p: &SamplingParams, seq: &mut CudaSeq) -> Result<DeviceSampleParam> {
        check_device_sampling(p)?;
        if p.is_greedy() {
            return Ok(DeviceSampleParam::default());
        }
        Ok(DeviceSampleParam {
            temperature: p.temperature,
            top_k: p.top_k.min(i32::MAX as usize) as i32,
            top_p: p.top_p,
            u: seq.next_uniform(),
        })
    }

    /// Runs `tokens` through `seq` in chunks of `prefill_chunk`; the last chunk computes logits
    /// of its last row (`all`: of every row; the prompt must then fit one chunk and
    /// `max_logit_rows`) and, with `sample`, draws one token with it.
    fn prefill_impl(
        &mut self,
        seq: &mut CudaSeq,
        tokens: &[u32],
        all: bool,
        sample: Option<&SamplingParams>,
    ) -> Result<usize> {
        self.gpu.bind()?;
        self.check_seq(seq)?;
        if tokens.is_empty() {
            return Err(Error::input("empty prompt"));
        }
        self.check_tokens(tokens)?;
        if all && (tokens.len() > self.opts.prefill_chunk || tokens.len() > self.max_rows) {
            return Err(Error::input(format!(
                "all-position logits for {} tokens need one step of at most {} tokens and {} rows",
                tokens.len(),
                self.opts.prefill_chunk,
                self.max_rows
            )));
        }
        if let Some(p) = sample {
            check_device_sampling(p)?;
        }
        let end = seq.len() + tokens.len();
        self.reserve(seq, end)?;
        let sp = match sample {
            Some(p) => Some(self.device_params(p, seq)?),
            None => None,
        };
        let chunk = self.opts.prefill_chunk.min(self.max_tok);
        let mut i = 0;
        let mut rows = 0;
        while i < tokens.len() {
            let j = (i + chunk).min(tokens.len());
            let n = j - i;
            let last = j == tokens.len();
            self.staging_ready()?;
            for (k, &t) in tokens[i..j].iter().enumerate() {
                self.staging.tokens.as_mut_slice()[k] = t;
                self.staging.pos.as_mut_slice()[k] = (seq.len() + k) as i32;
                self.staging.slot.as_mut_slice()[k] = seq.slot as i32;
            }
            let mut prow = 0;
            if last {
                if let Some(p) = sp {
                    self.staging.sparams.as_mut_slice()[0] = p;
                    prow = 1;
                }
            }
            self.upload_inputs(n, prow)?;
            let (first, nrows) = match (last, all) {
                (false, _) => (0, 0),
                (true, false) => (n - 1, 1),
                (true, true) => (0, n),
            };
            self.enqueue_forward(n, true, first, nrows, sp.is_some() && last)?;
            self.finish_step()?;
            seq.cache.advance(n);
            rows = nrows;
            i = j;
        }
        Ok(rows)
    }

    /// Prefills `tokens` into `seq` (continuing at `seq.len()`); returns the logits of the last
    /// position (`vocab_size` values).
    pub fn prefill(&mut self, seq: &mut CudaSeq, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill_impl(seq, tokens, false, None)?;
        self.download_logits(1)
    }

    /// Prefills and returns the logits of every position (`[tokens.len()][vocab]`): the prompt
    /// must fit one step (`prefill_chunk`) and `max_logit_rows`.
    pub fn prefill_all_logits(&mut self, seq: &mut CudaSeq, tokens: &[u32]) -> Result<Vec<f32>> {
        let rows = self.prefill_impl(seq, tokens, true, None)?;
        self.download_logits(rows)
    }

    /// Prefills `tokens` into `seq` without computing any logits (a prompt's earlier chunks).
    pub fn prefill_only(&mut self, seq: &mut CudaSeq, tokens: &[u32]) -> Result<()> {
        self.prefill_impl(seq, tokens, false, None)?;
        Ok(())
    }

    /// Prefills and samples the next token on the device (only its id comes back).
    pub fn prefill_sample(&mut self, seq: &mut CudaSeq, tokens: &[u32], params: &SamplingParams) -> Result<u32> {
        self.prefill_impl(seq, tokens, false, Some(params))?;
        Ok(self.download_tokens(1)?[0])
    }

    /// One decode step of a batch: feeds `tokens[i]` to `seqs[i]` (each at its own position),
    /// in the CUDA graph of the batch's bucket. `params`: one per sequence, sampled on the
    /// device (the ids come back). Without `params`, greedy ids are computed and the logits are
    /// kept for [`CudaModel::decode_batch_logits`].
    fn decode_impl(
        &mut self,
        seqs: &mut [&mut CudaSeq],
        tokens: &[u32],
        params: Option<&[SamplingParams]>,
    ) -> Result<usize> {
        self.gpu.bind()?;
        let bsz = seqs.len();
        if bsz == 0 || bsz != tokens.len() {
            return Err(Error::input(format!("decode batch of {bsz} sequences and {} tokens", tokens.len())));
        }
        if bsz > self.opts.max_seqs {
            return Err(Error::input(format!(
                "decode batch of {bsz} sequences exceeds max_seqs {}",
                self.opts.max_seqs
            )));
        }
        if let Some(p) = params {
            if p.len() != bsz {
                return Err(Error::input("one SamplingParams per sequence"));
            }
            for q in p {
                check_device_sampling(q)?;
            }
        }
        self.check_tokens(tokens)?;
        for (k, s) in seqs.iter().enumerate() {
            self.check_seq(s)?;
            if seqs[..k].iter().any(|o| o.slot == s.slot) {
                return Err(Error::input("the same sequence twice in one decode batch"));
            }
        }
        let bucket =
            bucket_of(bsz).filter(|&b| b <= self.max_bucket).ok_or_else(|| Error::Internal("no bucket".into()))?;
        for s in seqs.iter_mut() {
            let end = s.len() + 1;
            self.reserve(s, end)?;
        }
        let mut sp = [DeviceSampleParam::default(); MAX_BATCH];
        if let Some(p) = params {
            for (k, s) in seqs.iter_mut().enumerate() {
                sp[k] = self.device_params(&p[k], s)?;
            }
        }
        self.staging_ready()?;
        {
            let st = &mut self.staging;
            for k in 0..bucket {
                let (t, p, sl) = if k < bsz {
                    (tokens[k], seqs[k].len() as i32, seqs[k].slot as i32)
                } else {
                    (0, 0, self.dummy_slot as i32)
                };
                st.tokens.as_mut_slice()[k] = t;
                st.pos.as_mut_slice()[k] = p;
                st.slot.as_mut_slice()[k] = sl;
                st.sparams.as_mut_slice()[k] = sp[k];
            }
        }
        self.upload_inputs(bucket, bucket)?;
        if self.use_graphs && !self.profiling {
            if !self.graphs.contains_key(&bucket) {
                let g = GraphExec::capture(&self.gpu.ctx, &self.gpu.stream, || {
                    self.enqueue_forward(bucket, false, 0, bucket, true)
                })?;
                self.graphs.insert(bucket, g);
            }
            self.graphs[&bucket].launch(&self.gpu.stream)?;
        } else {
            self.enqueue_forward(bucket, false, 0, bucket, true)?;
        }
        self.finish_step()?;
        for s in seqs.iter_mut() {
            s.cache.advance(1);
        }
        Ok(bsz)
    }

    /// One decode step of a batch with device sampling; returns one token id per sequence.
    pub fn decode_batch(
        &mut self,
        seqs: &mut [&mut CudaSeq],
        tokens: &[u32],
        params: &[SamplingParams],
    ) -> Result<Vec<u32>> {
        let n = self.decode_impl(seqs, tokens, Some(params))?;
        self.download_tokens(n)
    }

    /// One decode step of a batch; returns the logits `[seqs.len()][vocab]`.
    pub fn decode_batch_logits(&mut self, seqs: &mut [&mut CudaSeq], tokens: &[u32]) -> Result<Vec<f32>> {
        let n = self.decode_impl(seqs, tokens, None)?;
        self.download_logits(n)
    }

    /// One decode step of one sequence with greedy (or `params`) sampling: the next token id.
    pub fn decode(&mut self, seq: &mut CudaSeq, token: u32, params: &SamplingParams) -> Result<u32> {
        Ok(self.decode_batch(&mut [seq], &[token], std::slice::from_ref(params))?[0])
    }

    /// Captures the graphs of every bucket up to the batch capacity now (else each is captured
    /// at its first use). Runs one throw-away step per bucket on scratch sequences.
    pub fn capture_all(&mut self) -> Result<()> {
        if !self.use_graphs {
            return Ok(());
        }
        let max_bucket = self.max_bucket;
        for &b in BUCKETS.iter().filter(|&&b| b <= max_bucket) {
            if self.graphs.contains_key(&b) {
                continue;
            }
            let n = b.min(self.free_slots.len()).min(self.opts.max_seqs);
            if n == 0 || bucket_of(n) != Some(b) {
                continue;
            }
            let mut seqs: Vec<CudaSeq> = (0..n).map(|_| self.new_seq()).collect::<Result<_>>()?;
            let toks = vec![0u32; n];
            let r = {
                let mut refs: Vec<&mut CudaSeq> = seqs.iter_mut().collect();
                self.decode_batch_logits(&mut refs, &toks).map(|_| ())
            };
            for s in seqs {
                self.release(s);
            }
            r?;
        }
        Ok(())
    }

    /// Device copy bandwidth in GB/s (read + write bytes per second) of `bytes` copied `reps`
    /// times between two device buffers: the reference for achieved-bandwidth figures.
    pub fn copy_bandwidth_probe(&self, bytes: usize, reps: usize) -> Result<f64> {
        self.gpu.bind()?;
        let a = DevBuf::zeros(&self.gpu.ctx, bytes)?;
        let b = DevBuf::zeros(&self.gpu.ctx, bytes)?;
        let t0 = Event::new(&self.gpu.ctx, true)?;
        let t1 = Event::new(&self.gpu.ctx, true)?;
        let s = &self.gpu.stream;
        s.dtod(b.ptr(), a.ptr(), bytes)?; // warm-up
        t0.record(s)?;
        for k in 0..reps.max(1) {
            if k % 2 == 0 {
                s.dtod(b.ptr(), a.ptr(), bytes)?;
            } else {
                s.dtod(a.ptr(), b.ptr(), bytes)?;
            }
        }
        t1.record(s)?;
        t1.sync()?;
        let ms = t0.elapsed_ms(&t1)? as f64;
        Ok(2.0 * bytes as f64 * reps.max(1) as f64 / (ms * 1e-3) / 1e9)
    }
}
