//! The seam between the serving scheduler (and other multi-step callers) and a model that
//! holds its own paged KV cache: sequences, their blocks, and steps over chunks of many
//! sequences' tokens. The caller owns the policy (admission, preemption, sampling, streaming);
//! an implementation owns memory and compute. [`CpuBatch`] serves the CPU [`Model`]; bitnet-cuda
//! implements the same trait for the GPU.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, SeqCache};
use crate::model::{Logits, Model, Scratch, SeqChunk};
use crate::precision::PrecisionPlan;
use crate::sampler::SamplingParams;

/// A sequence of a [`BatchModel`] (an index it hands out).
pub type SeqId = usize;

/// Tokens of one sequence fed in one step, continuing at its length.
#[derive(Debug, Clone, Copy)]
pub struct StepChunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    /// compute the logits of the chunk's last token
    pub logits: bool,
    /// compute the logits of every token of the chunk (prompt log-probabilities): one row per
    /// token in place of the last-token row; only where [`BatchModel::supports_all_logits`]
    pub all_logits: bool,
}

impl StepChunk<'_> {
    /// Logit rows this chunk adds to the step.
    pub fn rows(&self) -> usize {
        if self.all_logits {
            self.tokens.len()
        } else {
            usize::from(self.logits)
        }
    }
}

/// A model with its own paged KV cache, stepped over many sequences at once.
pub trait BatchModel: Send {
    fn config(&self) -> &ModelConfig;
    fn plan(&self) -> PrecisionPlan;
    /// Positions per KV block.
    fn block_size(&self) -> usize;
    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size().max(1))
    }
    fn free_blocks(&self) -> usize;
    fn used_blocks(&self) -> usize;
    /// A new empty sequence (no blocks yet); fails when every sequence slot is taken.
    fn new_seq(&mut self) -> Result<SeqId>;
    /// Positions in the sequence's cache.
    fn seq_len(&self, s: SeqId) -> usize;
    fn seq_blocks(&self, s: SeqId) -> usize;
    /// Makes `s` hold blocks for `len` positions.
    fn reserve(&mut self, s: SeqId, len: usize) -> Result<()>;
    /// Forgets positions from `len` on (their blocks stay with the sequence). With a prefix
    /// cache the sequence may keep fewer ([`BatchModel::seq_len`] tells).
    fn truncate(&mut self, s: SeqId, len: usize);
    /// Turns the prefix cache on (full KV blocks findable by the tokens that produced them,
    /// `prefix_cache.rs`); returns whether this model has one.
    fn enable_prefix_cache(&mut self) -> bool {
        false
    }
    /// Prefix cache: gives the fresh sequence `s` cached K/V for a prefix of `tokens` (its
    /// prompt), at most all but the last token; returns the positions it now holds (feed from
    /// there). Models without a prefix cache return 0.
    fn attach_prefix(&mut self, s: SeqId, tokens: &[u32]) -> usize {
        let _ = (s, tokens);
        0
    }
    /// Prefix cache: offers `s`'s full blocks to later sequences; `tokens` are the tokens at its
    /// cached positions (at least `seq_len(s)` of them).
    fn publish_prefix(&mut self, s: SeqId, tokens: &[u32]) {
        let _ = (s, tokens);
    }
    /// Gives the sequence's blocks and its id back.
    fn release(&mut self, s: SeqId);
    /// Runs one step over `chunks` (distinct sequences, blocks reserved); afterwards
    /// `logits(r)` is the r-th chunk that asked for logits, in order.
    fn forward(&mut self, chunks: &[StepChunk<'_>]) -> Result<()>;
    fn logits(&self, row: usize) -> &[f32];
    /// Whether chunks may ask for every token's logits ([`StepChunk::all_logits`]).
    fn supports_all_logits(&self) -> bool {
        false
    }
    /// Whether a position's logits are the same bit for bit whatever else its step holds (other
    /// sequences, more tokens of its own): what prompt lookup needs to leave the output
    /// unchanged (`generate.rs`).
    fn logits_batch_invariant(&self) -> bool {
        false
    }
    /// [`BatchModel::forward`], and where the model can, the next token of every chunk that
    /// asks for logits drawn where they are computed: `params[r] = (settings, n)` for the
    /// r-th such chunk, `n` the tokens the sequence has sampled so far (its draws continue
    /// from `settings.seed` after `n`: the same stream after a preemption). Returns whether it
    /// did: then [`BatchModel::sampled`] holds the ids and the logits are not kept; else the
    /// caller samples from [`BatchModel::logits`]. (A GPU brings back ids instead of `vocab`
    /// floats per row.)
    fn forward_sampled(&mut self, chunks: &[StepChunk<'_>], params: &[(SamplingParams, usize)]) -> Result<bool> {
        let _ = params;
        self.forward(chunks).map(|_| false)
    }
    /// The ids of the last [`BatchModel::forward_sampled`] that returned true.
    fn sampled(&self) -> &[u32] {
        &[]
    }
}

/// [`BatchModel`] on the CPU: the model, one KV block pool, one scratch.
pub struct CpuBatch {
    model: Model,
    cache: KvCache,
    scratch: Scratch,
    /// sequences by id (None: a free id)
    seqs: Vec<Option<SeqCache>>,
    free_ids: Vec<SeqId>,
    max_seqs: usize,
    /// per step, reused: the sequences taken out of `seqs` while they are borrowed
    taken: Vec<(SeqId, SeqCache)>,
}

impl CpuBatch {
    /// `n_blocks` blocks of `block_size` positions, contexts up to `ctx`, at most `max_seqs`
    /// sequences and `max_tokens` tokens per step.
    pub fn new(
        model: Model,
        n_blocks: usize,
        block_size: usize,
        ctx: usize,
        max_seqs: usize,
        max_tokens: usize,
    ) -> CpuBatch {
        let cache = KvCache::new(&model.cfg, n_blocks, block_size, ctx, model.plan.kv_cache);
        // every token of a step may want logits (prompt log-probabilities); the rows are touched
        // only when used
        let rows = max_tokens.max(max_seqs);
        let scratch = model.new_scratch(rows, rows, ctx);
        CpuBatch {
            model,
            cache,
            scratch,
            seqs: Vec::with_capacity(max_seqs),
            free_ids: Vec::new(),
            max_seqs,
            taken: Vec::with_capacity(max_seqs),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Blocks kept only for the prefix cache (no sequence holds them; counted as free).
    pub fn cached_blocks(&self) -> usize {
        self.cache.cached_blocks()
    }

    fn seq(&self, s: SeqId) -> Option<&SeqCache> {
        self.seqs.get(s).and_then(|x| x.as_ref())
    }
}

impl BatchModel for CpuBatch {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn plan(&self) -> PrecisionPlan {
        self.model.plan
    }
    fn block_size(&self) -> usize {
        self.cache.block_size()
    }
    fn blocks_for(&self, positions: usize) -> usize {
        self.cache.blocks_for(positions)
    }
    fn free_blocks(&self) -> usize {
        self.cache.free_blocks()
    }
    fn used_blocks(&self) -> usize {
        self.cache.used_blocks()
    }
    fn new_seq(&mut self) -> Result<SeqId> {
        if let Some(id) = self.free_ids.pop() {
            self.seqs[id] = Some(self.cache.new_seq());
            return Ok(id);
        }
        if self.seqs.len() >= self.max_seqs {
            return Err(Error::input(format!("all {} sequence slots are taken", self.max_seqs)));
        }
        self.seqs.push(Some(self.cache.new_seq()));
        Ok(self.seqs.len() - 1)
    }
    fn seq_len(&self, s: SeqId) -> usize {
        self.seq(s).map_or(0, |c| c.len())
    }
    fn seq_blocks(&self, s: SeqId) -> usize {
        self.seq(s).map_or(0, |c| c.n_blocks())
    }
    fn reserve(&mut self, s: SeqId, len: usize) -> Result<()> {
        let Some(Some(seq)) = self.seqs.get_mut(s) else {
            return Err(Error::input(format!("no sequence {s}")));
        };
        self.cache.reserve(seq, len)
    }
    fn truncate(&mut self, s: SeqId, len: usize) {
        if let Some(Some(seq)) = self.seqs.get_mut(s) {
            self.cache.truncate(seq, len);
        }
    }
    fn enable_prefix_cache(&mut self) -> bool {
        self.cache.enable_prefix_cache();
        true
    }
    fn attach_prefix(&mut self, s: SeqId, tokens: &[u32]) -> usize {
        match self.seqs.get_mut(s) {
            Some(Some(seq)) => self.cache.attach_prefix(seq, tokens),
            _ => 0,
        }
    }
    fn publish_prefix(&mut self, s: SeqId, tokens: &[u32]) {
        if let Some(Some(seq)) = self.seqs.get_mut(s) {
            self.cache.publish(seq, tokens);
        }
    }
    fn release(&mut self, s: SeqId) {
        if let Some(slot) = self.seqs.get_mut(s) {
            if let Some(mut seq) = slot.take() {
                self.cache.release(&mut seq);
                self.free_ids.push(s);
            }
        }
    }
    fn forward(&mut self, chunks: &[StepChunk<'_>]) -> Result<()> {
        // take the chunks' caches out of the table so that each can be borrowed mutably
        self.taken.clear();
        for c in chunks {
            match self.seqs.get_mut(c.seq).and_then(|x| x.take()) {
                Some(seq) => self.taken.push((c.seq, seq)),
                None => {
                    for (id, seq) in self.taken.drain(..) {
                        self.seqs[id] = Some(seq);
                    }
                    return Err(Error::input(format!("sequence {} is not live or is fed twice in one step", c.seq)));
                }
            }
        }
        let logits = |c: &StepChunk<'_>| match (c.all_logits, c.logits) {
            (true, _) => Logits::All,
            (false, true) => Logits::Last,
            (false, false) => Logits::None,
        };
        let r = if let ([(_, seq)], [c]) = (self.taken.as_mut_slice(), chunks) {
            // one sequence (generation, a lone request): no allocation per step
            let mut one = [SeqChunk { seq, tokens: c.tokens, logits: logits(c) }];
            self.model.forward(&mut self.cache, &mut self.scratch, &mut one)
        } else {
            let mut step: Vec<SeqChunk<'_>> = self
                .taken
                .iter_mut()
                .zip(chunks)
                .map(|((_, seq), c)| SeqChunk { seq, tokens: c.tokens, logits: logits(c) })
                .collect();
            self.model.forward(&mut self.cache, &mut self.scratch, &mut step)
        };
        for (id, seq) in self.taken.drain(..) {
            self.seqs[id] = Some(seq);
        }
        r.map(|_| ())
    }
    fn logits(&self, row: usize) -> &[f32] {
        self.scratch.logits(row)
    }
    fn supports_all_logits(&self) -> bool {
        true
    }
    /// Exact integer matmuls, per-row norms and head, attention per query row: tests
    /// `batch_session.rs`, `speculative.rs` and the server's batch invariance test.
    fn logits_batch_invariant(&self) -> bool {
        true
    }
}
