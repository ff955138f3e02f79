//! The BitNet b1.58 model: embedding -> layers (`block.rs`: attention + MLP with sub-norms) ->
//! final norm -> LM head. One model for every checkpoint format: it is built from the canonical
//! form of [`crate::weights::WeightSource`].
//!
//! Entry points: [`Model::forward`] runs one step over a batch of sequence chunks (continuous
//! batching and chunked prefill are both this); [`Model::prefill`] and [`Model::decode`] are the
//! single-sequence cases. All of them share one preallocated [`KvCache`] and [`Scratch`].

pub mod attention;
pub mod block;
pub mod lm_head;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod scratch;

use bitnet_cpu::attn::AttnOps;
use bitnet_cpu::{KernelLevel, TernaryMatrix, ThreadPool};

use self::attention::Attention;
use self::block::Block;
use self::lm_head::LmHead;
use self::mlp::Mlp;
use self::rope::Rope;
pub use self::scratch::Scratch;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, SeqCache};
use crate::precision::PrecisionPlan;
use crate::weights::{DenseMatrix, LayerNorm, Proj, TernaryCodes, WeightSource};

/// How a model is built.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads of the compute pool (the caller included).
    pub threads: usize,
    pub kernel: KernelLevel,
    pub plan: PrecisionPlan,
    /// Show a progress bar while repacking weights.
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: default_threads(),
            kernel: KernelLevel::detect(),
            plan: PrecisionPlan::EXACT,
            progress: false,
        }
    }
}

/// The number of physical cores (SMT siblings share the int8 units and the memory bus).
pub fn default_threads() -> usize {
    physical_cores().unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn physical_cores() -> Option<usize> {
    // Linux: count distinct (physical id, core id) pairs.
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut set = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = v.trim().parse::<u32>().ok(),
                "core id" => core = v.trim().parse::<u32>().ok(),
                _ => {}
            }
        }
        if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys, core) {
                set.insert((p, c));
            }
            phys = None;
            core = None;
        }
    }
    let avail = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(usize::MAX);
    (!set.is_empty()).then(|| set.len().min(avail))
}

/// Which logits a chunk wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// the last token of the chunk only (prefill)
    Last,
    /// every token of the chunk
    All,
}

/// Tokens of one sequence fed in one step, continuing at `seq.len()`.
pub struct SeqChunk<'a> {
    pub seq: &'a mut SeqCache,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub plan: PrecisionPlan,
    pub(crate) pool: ThreadPool,
    pub(crate) rope: Rope,
    embed: DenseMatrix,
    layers: Vec<Block>,
    final_norm: Vec<f32>,
    lm_head: LmHead,
    kernel: KernelLevel,
    format: String,
}

/// Concatenates the rows of several projections into one fused matrix (q|k|v, gate|up); each
/// part keeps its own output scale.
fn fuse(parts: Vec<TernaryCodes>, level: KernelLevel) -> TernaryMatrix {
    thread_local! {
        /// The fused codes of this loader thread's last layer, reused: a fresh 35 MB buffer per
        /// layer (2B-4T's gate|up) is fresh pages for the kernel to zero each time.
        static FUSED: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    let scales = parts.iter().flat_map(|p| std::iter::repeat_n(p.scale, p.rows)).collect();
    if let [one] = &parts[..] {
        return TernaryMatrix::from_codes(&one.codes, rows, cols, scales, level);
    }
    FUSED.with_borrow_mut(|codes| {
        codes.clear();
        for p in &parts {
            codes.extend_from_slice(&p.codes);
        }
        TernaryMatrix::from_codes(codes, rows, cols, scales, level)
    })
}

/// At most this many layers are repacked at once: each holds its codes in flight (one byte per
/// weight, plus a fused copy: ~130 MB for a layer of 2B-4T).
const LOAD_THREADS: usize = 4;

/// `layer(l)` for every layer, on up to `threads` threads taking the next layer as each
/// finishes one: repacking is compute bound (unpacking the checkpoint's codes, fusing, packing
/// for the kernel), one layer at a time per thread. On an error the lowest failing layer's is
/// returned, as a serial load would, and no new layer is started.
fn load_layers<T: Send>(n: usize, threads: usize, layer: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
    let mut slots: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut slots);
    std::thread::scope(|sc| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            sc.spawn(|| loop {
                let l = next.fetch_add(1, Ordering::Relaxed);
                if l >= n || failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = layer(l);
                failed.fetch_or(r.is_err(), Ordering::Relaxed);
                results.lock().unwrap_or_else(|e| e.into_inner())[l] = Some(r);
            });
        }
    });
    let mut layers = Vec::with_capacity(n);
    for (l, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(r) => layers.push(r?),
            // not started: a lower layer failed
            None => unreachable!("layer {l} neither loaded nor skipped after an error below it"),
        }
    }
    Ok(layers)
}

impl Model {
    /// Builds the model from any weight source: fuses q|k|v and gate|up, repacks for `opts.kernel`.
    pub fn load(src: &dyn WeightSource, cfg: ModelConfig, opts: &LoadOptions) -> Result<Model> {
        let level = opts.kernel;
        let bar = if opts.progress {
            let b = indicatif::ProgressBar::new(cfg.num_layers as u64 + 1);
            b.set_style(
                indicatif::ProgressStyle::with_template("loading  [{bar:40}] {pos}/{len} layers {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Some(b)
        } else {
            None
        };
        let get = |l: usize, p: Proj| -> Result<TernaryCodes> {
            let t = src.ternary(l, p)?;
            let (rows, cols) = cfg.proj_shape(p);
            if t.rows != rows || t.cols != cols || t.codes.len() != rows * cols {
                return Err(Error::config(format!(
                    "layer {l} {p:?} projection is {}x{}, config expects {rows}x{cols}",
                    t.rows, t.cols
                )));
            }
            if let Some(bad) = bitnet_cpu::kernels::invalid_code(&t.codes) {
                return Err(Error::config(format!("layer {l} {p:?}: ternary code {bad} out of range")));
            }
            Ok(t)
        };
        let layer = |l: usize| -> Result<Block> {
            let qkv = fuse(vec![get(l, Proj::Q)?, get(l, Proj::K)?, get(l, Proj::V)?], level);
            let o = fuse(vec![get(l, Proj::O)?], level);
            let gate_up = fuse(vec![get(l, Proj::Gate)?, get(l, Proj::Up)?], level);
            let down = fuse(vec![get(l, Proj::Down)?], level);
            let block = Block {
                input_norm: src.layer_norm(l, LayerNorm::Input)?,
                attn: Attention { qkv, o, sub_norm: src.layer_norm(l, LayerNorm::AttnSub)? },
                post_attn_norm: src.layer_norm(l, LayerNorm::PostAttention)?,
                mlp: Mlp { gate_up, down, sub_norm: src.layer_norm(l, LayerNorm::FfnSub)? },
            };
            if let Some(b) = &bar {
                b.inc(1);
            }
            Ok(block)
        };
        // The embedding is read beside the layers: copying it into fresh (huge) pages is mostly
        // the kernel's page-fault work, which overlaps the layers' repacking. Errors come in a
        // serial load's order: the layers' first.
        // A bf16 head (and the embedding tied to it) is kept in the lossless 12-bit layout where
        // the CPU runs its kernels: the same values; the exact plan reads 25% fewer bytes per
        // decoded token, the quantized plans (which quantize from it once and then read only
        // the rows they rescore and the embedding's rows) hold 164 MB less for 2B-4T. Packed
        // beside the layers' load (the two copies overlap its start rather than sit on top of
        // all of it).
        let (layers, embed) = std::thread::scope(|sc| {
            let embed = sc.spawn(|| {
                let e = src.embedding()?;
                Ok::<_, Error>(if cfg.tie_word_embeddings { e.packed_if_faster() } else { e })
            });
            let layers = load_layers(cfg.num_layers, opts.threads.min(LOAD_THREADS), layer);
            (layers, embed.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        let (layers, embed) = (layers?, embed?);
        if embed.rows() != cfg.vocab_size || embed.cols() != cfg.hidden_size {
            return Err(Error::config(format!(
                "embedding is {}x{}, config expects {}x{}",
                embed.rows(),
                embed.cols(),
                cfg.vocab_size,
                cfg.hidden_size
            )));
        }
        let untied = src.lm_head()?.map(|u| u.packed_if_faster());
        let lm_head = LmHead::new(&opts.plan, untied, &embed, level);
        let final_norm = src.final_norm()?;
        if let Some(b) = bar {
            b.inc(1);
            b.finish_and_clear();
        }
        Ok(Model {
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings),
            pool: ThreadPool::new(opts.threads),
            plan: opts.plan,
            embed,
            layers,
            final_norm,
            lm_head,
            kernel: level,
            format: src.format_name(),
            cfg,
        })
    }

    pub fn kernel(&self) -> KernelLevel {
        self.kernel
    }
    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }
    /// The checkpoint format the model came from.
    pub fn format(&self) -> &str {
        &self.format
    }
    /// "format F | plan P | kernel K | threads N": what every command prints about its model.
    pub fn describe(&self) -> String {
        format!(
            "format {} | plan {} | kernel {} | threads {}",
            self.format,
            self.plan,
            self.kernel.name(),
            self.threads()
        )
    }

    /// How a decode step reads the LM head (see [`LmHead::storage`]).
    pub fn lm_head_storage(&self) -> String {
        self.lm_head.storage(&self.embed)
    }

    /// Bytes of weights read per decoded token (ternary matrices + LM head), for GB/s figures.
    pub fn bytes_per_token(&self) -> usize {
        let t: usize = self
            .layers
            .iter()
            .map(|b| b.attn.qkv.nbytes() + b.attn.o.nbytes() + b.mlp.gate_up.nbytes() + b.mlp.down.nbytes())
            .sum();
        t + self.lm_head.nbytes(&self.embed)
    }

    /// A KV cache for `n_seqs` sequences of up to `ctx` positions each (ctx is clamped to
    /// max_position_embeddings), with the plan's element type.
    pub fn new_cache(&self, ctx: usize, n_seqs: usize, block_size: usize) -> KvCache {
        let ctx = ctx.min(self.cfg.max_position_embeddings);
        let per_seq = ctx.div_ceil(block_size);
        KvCache::new(&self.cfg, per_seq * n_seqs.max(1), block_size, ctx, self.plan.kv_cache)
    }

    /// Buffers for steps of up to `max_tokens` tokens, `max_logit_rows` logit rows, `max_ctx` positions.
    pub fn new_scratch(&self, max_tokens: usize, max_logit_rows: usize, max_ctx: usize) -> Scratch {
        Scratch::new(
            &self.cfg,
            max_tokens,
            max_logit_rows,
            max_ctx.min(self.cfg.max_position_embeddings),
            self.pool.n_threads(),
            AttnOps::for_kernel(self.kernel),
            self.lm_head.rescore_top(),
        )
    }

    /// One forward step over a batch of chunks. Each chunk continues its sequence at `seq.len()`;
    /// logit rows are written to `s` in chunk order (read them with `Scratch::logits`). Returns the
    /// number of logit rows. Validates every input first: on error nothing has been computed.
    pub fn forward(&self, cache: &mut KvCache, s: &mut Scratch, chunks: &mut [SeqChunk<'_>]) -> Result<usize> {
        let cfg = &self.cfg;
        let n_tok: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if n_tok == 0 {
            return Err(Error::input("empty step: no tokens"));
        }
        if n_tok > s.max_tokens {
            return Err(Error::input(format!("{n_tok} tokens in one step, scratch holds {}", s.max_tokens)));
        }
        let mut n_rows = 0;
        for c in chunks.iter() {
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::input(format!("token id {bad} out of range (vocab size {})", cfg.vocab_size)));
            }
            let end = c.seq.len() + c.tokens.len();
            if end > s.max_ctx || end > self.rope.max_pos() {
                return Err(Error::input(format!(
                    "sequence of {end} tokens exceeds the context of {} tokens",
                    s.max_ctx.min(self.rope.max_pos())
                )));
            }
            n_rows += match c.logits {
                Logits::None => 0,
                Logits::Last => usize::from(!c.tokens.is_empty()),
                Logits::All => c.tokens.len(),
            };
        }
        if n_rows > s.max_logit_rows {
            return Err(Error::input(format!("{n_rows} logit rows asked, scratch holds {}", s.max_logit_rows)));
        }
        for c in chunks.iter_mut() {
            let end = c.seq.len() + c.tokens.len();
            cache.reserve(c.seq, end)?;
        }

        // Token bookkeeping (capacity reserved in Scratch: no allocation).
        s.tok_pos.clear();
        s.tok_chunk.clear();
        s.logit_tokens.clear();
        for (ci, c) in chunks.iter().enumerate() {
            let base = s.tok_pos.len();
            for (j, _) in c.tokens.iter().enumerate() {
                s.tok_pos.push(c.seq.len() + j);
                s.tok_chunk.push(ci);
                let want = match c.logits {
                    Logits::None => false,
                    Logits::Last => j + 1 == c.tokens.len(),
                    Logits::All => true,
                };
                if want {
                    s.logit_tokens.push(base + j);
                }
            }
        }

        // Embedding lookup.
        let h = cfg.hidden_size;
        let mut t = 0;
        for c in chunks.iter() {
            for &tok in c.tokens {
                self.embed.row_to_f32(tok as usize, &mut s.x[t * h..(t + 1) * h]);
                t += 1;
            }
        }
        for (l, block) in self.layers.iter().enumerate() {
            block.forward(l, self, s, cache, chunks);
        }
        // Final norm and LM head on the rows that want logits only.
        for (r, &t) in s.logit_tokens.iter().enumerate() {
            norm::rms_norm(
                &s.x[t * h..(t + 1) * h],
                &self.final_norm,
                cfg.rms_norm_eps,
                &mut s.final_normed[r * h..(r + 1) * h],
            );
        }
        self.lm_head.forward(
            &self.pool,
            &self.embed,
            &s.final_normed,
            n_rows,
            &mut s.head_acts,
            &mut s.head_rescore,
            &mut s.logits,
        );
        for c in chunks.iter_mut() {
            c.seq.advance(c.tokens.len());
        }
        Ok(n_rows)
    }

    /// Runs a whole prompt through one sequence in chunks of the scratch's capacity. With
    /// `all_logits` every position's logits are kept (the scratch must hold that many rows),
    /// otherwise only the last position's (row 0 of `s`).
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        s: &mut Scratch,
        seq: &mut SeqCache,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<usize> {
        if tokens.is_empty() {
            return Err(Error::input("empty prompt"));
        }
        if all_logits {
            if tokens.len() > s.max_tokens {
                return Err(Error::input(format!(
                    "all-position logits for {} tokens need one step, scratch holds {}",
                    tokens.len(),
                    s.max_tokens
                )));
            }
            return self.forward(cache, s, &mut [SeqChunk { seq, tokens, logits: Logits::All }]);
        }
        let end = seq.len() + tokens.len();
        if end > s.max_ctx {
            return Err(Error::input(format!(
                "prompt of {} tokens (plus {} in the cache) exceeds the context of {} tokens",
                tokens.len(),
                seq.len(),
                s.max_ctx
            )));
        }
        let mut rows = 0;
        let chunk = s.max_tokens;
        let mut i = 0;
        while i < tokens.len() {
            let j = (i + chunk).min(tokens.len());
            let logits = if j == tokens.len() { Logits::Last } else { Logits::None };
            rows = self.forward(cache, s, &mut [SeqChunk { seq, tokens: &tokens[i..j], logits }])?;
            i = j;
        }
        Ok(rows)
    }

    /// One decode step of one sequence: feeds `token`, leaves its logits in row 0 of `s`.
    pub fn decode(&self, cache: &mut KvCache, s: &mut Scratch, seq: &mut SeqCache, token: u32) -> Result<()> {
        self.forward(cache, s, &mut [SeqChunk { seq, tokens: std::slice::from_ref(&token), logits: Logits::Last }])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layers come back in order whatever the threads, and the lowest failing layer's error
    /// wins, as in a serial load, even when a higher layer fails first.
    #[test]
    fn load_layers_keeps_the_order_and_the_lowest_error() {
        for threads in [1, 2, 3, 8, 40] {
            let got = load_layers(30, threads, |l| {
                std::thread::sleep(std::time::Duration::from_micros(((l * 7919) % 13) as u64 * 50));
                Ok(l)
            });
            assert_eq!(got.unwrap(), (0..30).collect::<Vec<_>>(), "{threads} threads");
            let err = load_layers(30, threads, |l| {
                // layer 17 fails at once; layer 6 later, while others still run
                let wait = if l == 6 { 3000 } else { 100 };
                std::thread::sleep(std::time::Duration::from_micros(wait));
                if l == 6 || l == 17 || l == 25 {
                    Err(Error::config(format!("layer {l} bad")))
                } else {
                    Ok(l)
                }
            });
            assert_eq!(err.err().map(|e| e.to_string()), Some(Error::config("layer 6 bad").to_string()), "{threads}");
        }
        assert_eq!(load_layers(0, 4, Ok).unwrap(), Vec::<usize>::new());
    }
}
