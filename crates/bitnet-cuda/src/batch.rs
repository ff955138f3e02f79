//! [`CudaBatch`]: the GPU model behind bitnet-core's [`BatchModel`], so the serving scheduler
//! (and the CLI's generation loop) drive it as they drive the CPU model. A step's decode
//! chunks (one token each) run together as one decode batch (the bucket's CUDA graph); prompt
//! chunks run one sequence at a time through the prefill path (a chunk that asks for every
//! token's logits in pieces of at most `max_all_logits_tokens`). Logits come back to the host,
//! where the caller's sampler (every sampling option) picks the tokens, unless the model draws
//! them itself ([`BatchModel::forward_sampled`]). The KV blocks' bookkeeping, prefix cache
//! included, is bitnet-core's `BlockPool`, as on the CPU.

use bitnet_core::batch::{BatchModel, SeqId, StepChunk};
use bitnet_core::config::ModelConfig;
use bitnet_core::precision::PrecisionPlan;
use bitnet_core::sampler::SamplingParams;

use crate::api::{check_device_sampling, CudaSeq};
use crate::CudaModel;

/// A [`CudaModel`] as a [`BatchModel`].
pub struct CudaBatch {
    model: CudaModel,
    /// sequences by id (None: a free id)
    seqs: Vec<Option<CudaSeq>>,
    free_ids: Vec<SeqId>,
    /// the last step's logit rows `[rows][vocab]`
    logits: Vec<f32>,
    /// the last step's ids sampled on the device, one per logits chunk
    ids: Vec<u32>,
    /// per sequence: its device draws were seeded
    seeded: Vec<bool>,
    dec_params: Vec<SamplingParams>,
    // per step, reused
    dec_ids: Vec<SeqId>,
    dec_tokens: Vec<u32>,
    dec_seqs: Vec<CudaSeq>,
}

/// The first logits row of each chunk that asks for any (rows numbered in chunk order; a
/// chunk takes [`StepChunk::rows`] of them).
fn rows_of(chunks: &[StepChunk<'_>]) -> Vec<Option<usize>> {
    let mut r = 0;
    chunks
        .iter()
        .map(|c| {
            let row = (c.rows() > 0).then_some(r);
            r += c.rows();
            row
        })
        .collect()
}

/// A bitnet-cuda error as a bitnet-core one (bad input stays bad input).
pub fn core_error(e: crate::Error) -> bitnet_core::Error {
    match e {
        crate::Error::InvalidInput(m) => bitnet_core::Error::InvalidInput(m),
        crate::Error::Core(e) => e,
        other => bitnet_core::Error::Backend(format!("cuda: {other}")),
    }
}

impl CudaBatch {
    pub fn new(model: CudaModel) -> CudaBatch {
        let n = model.max_batch();
        CudaBatch {
            model,
            seqs: Vec::with_capacity(n),
            free_ids: Vec::new(),
            logits: Vec::new(),
            ids: Vec::with_capacity(n),
            seeded: Vec::with_capacity(n),
            dec_params: Vec::with_capacity(n),
            dec_ids: Vec::with_capacity(n),
            dec_tokens: Vec::with_capacity(n),
            dec_seqs: Vec::with_capacity(n),
        }
    }

    pub fn model(&self) -> &CudaModel {
        &self.model
    }

    fn seq(&self, s: SeqId) -> Option<&CudaSeq> {
        self.seqs.get(s).and_then(|x| x.as_ref())
    }

    /// Runs one decode batch over the sequences `dec_ids` (fed `dec_tokens`, sampled with
    /// `dec_params`), taken out of the table for the call and put back whatever happens.
    fn decode_taken<T>(
        &mut self,
        run: impl FnOnce(&mut CudaModel, &mut [&mut CudaSeq], &[u32], &[SamplingParams]) -> crate::Result<T>,
    ) -> bitnet_core::Result<T> {
        self.dec_seqs.clear();
        let mut res = Ok(());
        for k in 0..self.dec_ids.len() {
            match self.take(self.dec_ids[k]) {
                Ok(q) => self.dec_seqs.push(q),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let out = res.map(|()| {
            let mut refs: Vec<&mut CudaSeq> = self.dec_seqs.iter_mut().collect();
            run(&mut self.model, &mut refs, &self.dec_tokens, &self.dec_params)
        });
        for (id, q) in self.dec_ids.iter().zip(self.dec_seqs.drain(..)) {
            self.seqs[*id] = Some(q);
        }
        out?.map_err(core_error)
    }

    /// Feeds chunk `c` to `seq` through the prefill path; its logits go to rows `row..`: the last
    /// token's, or with `all_logits` every token's (in pieces the device computes in one step).
    fn prefill_rows(&mut self, seq: &mut CudaSeq, c: &StepChunk<'_>, row: Option<usize>) -> bitnet_core::Result<()> {
        let vocab = self.model.cfg.vocab_size;
        match row {
            None => self.model.prefill_only(seq, c.tokens).map_err(core_error),
            Some(r) if c.all_logits => {
                let piece = self.model.max_all_logits_tokens().max(1);
                for (i, part) in c.tokens.chunks(piece).enumerate() {
                    let out = self.model.prefill_all_logits(seq, part).map_err(core_error)?;
                    let at = (r + i * piece) * vocab;
                    self.logits[at..at + out.len()].copy_from_slice(&out);
                }
                Ok(())
            }
            Some(r) => {
                let last = self.model.prefill(seq, c.tokens).map_err(core_error)?;
                self.logits[r * vocab..(r + 1) * vocab].copy_from_slice(&last);
                Ok(())
            }
        }
    }

    fn take(&mut self, s: SeqId) -> bitnet_core::Result<CudaSeq> {
        self.seqs
            .get_mut(s)
            .and_then(|x| x.take())
            .ok_or_else(|| bitnet_core::Error::input(format!("sequence {s} is not live or is fed twice in one step")))
    }
}

impl BatchModel for CudaBatch {
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn plan(&self) -> PrecisionPlan {
        self.model.options().plan
    }
    fn block_size(&self) -> usize {
        self.model.options().block_size
    }
    fn free_blocks(&self) -> usize {
        self.model.free_blocks()
    }
    fn used_blocks(&self) -> usize {
        self.model.total_blocks() - self.model.free_blocks()
    }
    fn new_seq(&mut self) -> bitnet_core::Result<SeqId> {
        let seq = self.model.new_seq().map_err(core_error)?;
        match self.free_ids.pop() {
            Some(id) => {
                self.seqs[id] = Some(seq);
                self.seeded[id] = false;
                Ok(id)
            }
            None => {
                self.seqs.push(Some(seq));
                self.seeded.push(false);
                Ok(self.seqs.len() - 1)
            }
        }
    }
    fn seq_len(&self, s: SeqId) -> usize {
        self.seq(s).map_or(0, |q| q.len())
    }
    fn seq_blocks(&self, s: SeqId) -> usize {
        self.seq(s).map_or(0, |q| q.n_blocks())
    }
    fn reserve(&mut self, s: SeqId, len: usize) -> bitnet_core::Result<()> {
        let mut seq = self.take(s)?;
        let r = self.model.reserve(&mut seq, len).map_err(core_error);
        self.seqs[s] = Some(seq);
        r
    }
    fn truncate(&mut self, s: SeqId, len: usize) {
        if let Some(Some(q)) = self.seqs.get_mut(s) {
            // an error here is the device failing (a copy did not start); the next step reports it
            let _ = self.model.truncate(q, len);
        }
    }
    fn enable_prefix_cache(&mut self) -> bool {
        self.model.enable_prefix_cache();
        true
    }
    fn attach_prefix(&mut self, s: SeqId, tokens: &[u32]) -> usize {
        match self.seqs.get_mut(s) {
            Some(Some(q)) => self.model.attach_prefix(q, tokens),
            _ => 0,
        }
    }
    fn publish_prefix(&mut self, s: SeqId, tokens: &[u32]) {
        if let Some(Some(q)) = self.seqs.get_mut(s) {
            self.model.publish_prefix(q, tokens);
        }
    }
    fn release(&mut self, s: SeqId) {
        if let Some(seq) = self.seqs.get_mut(s).and_then(|x| x.take()) {
            self.model.release(seq);
            self.free_ids.push(s);
        }
    }
    fn forward(&mut self, chunks: &[StepChunk<'_>]) -> bitnet_core::Result<()> {
        let vocab = self.model.cfg.vocab_size;
        let row_of = rows_of(chunks);
        let rows: usize = chunks.iter().map(|c| c.rows()).sum();
        self.logits.clear();
        self.logits.resize(rows * vocab, 0.0);
        // one decode batch for the single-token chunks
        self.dec_ids.clear();
        self.dec_tokens.clear();
        self.dec_params.clear();
        for c in chunks.iter().filter(|c| c.tokens.len() == 1 && !c.all_logits) {
            self.dec_ids.push(c.seq);
            self.dec_tokens.push(c.tokens[0]);
        }
        if !self.dec_ids.is_empty() {
            let out = self.decode_taken(|m, seqs, tokens, _| m.decode_batch_logits(seqs, tokens))?;
            let mut k = 0;
            for (c, row) in chunks.iter().zip(&row_of) {
                if c.tokens.len() == 1 && !c.all_logits {
                    if let Some(r) = row {
                        self.logits[r * vocab..(r + 1) * vocab].copy_from_slice(&out[k * vocab..(k + 1) * vocab]);
                    }
                    k += 1;
                }
            }
        }
        // prompt chunks (and every-token-logits chunks), one sequence at a time
        for (c, row) in chunks.iter().zip(&row_of) {
            if c.tokens.len() == 1 && !c.all_logits {
                continue;
            }
            let mut seq = self.take(c.seq)?;
            let res = self.prefill_rows(&mut seq, c, *row);
            self.seqs[c.seq] = Some(seq);
            res?;
        }
        Ok(())
    }
    fn logits(&self, row: usize) -> &[f32] {
        let v = self.model.cfg.vocab_size;
        &self.logits[row * v..(row + 1) * v]
    }
    fn supports_all_logits(&self) -> bool {
        true
    }

    /// Samples on the device (ids come back, not logits) when every row's settings allow it
    /// (greedy, temperature, top-k, top-p; min-p and the penalties need the host).
    fn forward_sampled(
        &mut self,
        chunks: &[StepChunk<'_>],
        params: &[(SamplingParams, usize)],
    ) -> bitnet_core::Result<bool> {
        let rows = chunks.iter().filter(|c| c.logits).count();
        if params.len() != rows
            || chunks.iter().any(|c| c.all_logits)
            || params.iter().any(|(p, _)| check_device_sampling(p).is_err())
        {
            return self.forward(chunks).map(|_| false);
        }
        self.ids.clear();
        self.ids.resize(rows, 0);
        let row_of = rows_of(chunks);
        for (c, row) in chunks.iter().zip(&row_of) {
            if let Some(r) = row {
                if !self.seeded.get(c.seq).copied().unwrap_or(true) {
                    if let Some(Some(q)) = self.seqs.get_mut(c.seq) {
                        let (p, drawn) = params[*r];
                        q.set_seed(p.seed);
                        if !p.is_greedy() {
                            q.skip_draws(drawn as u64);
                        }
                    }
                    self.seeded[c.seq] = true;
                }
            }
        }
        // one decode batch for the single-token chunks that ask for a token
        self.dec_ids.clear();
        self.dec_tokens.clear();
        self.dec_params.clear();
        for (c, row) in chunks.iter().zip(&row_of) {
            if let (1, Some(r)) = (c.tokens.len(), row) {
                self.dec_ids.push(c.seq);
                self.dec_tokens.push(c.tokens[0]);
                self.dec_params.push(params[*r].0);
            }
        }
        if !self.dec_ids.is_empty() {
            let out = self.decode_taken(|m, seqs, tokens, params| m.decode_batch(seqs, tokens, params))?;
            let mut k = 0;
            for (c, row) in chunks.iter().zip(&row_of) {
                if let (1, Some(r)) = (c.tokens.len(), row) {
                    self.ids[*r] = out[k];
                    k += 1;
                }
            }
        }
        // the rest one sequence at a time: prompts, and single tokens that ask for nothing
        for (c, row) in chunks.iter().zip(&row_of) {
            if c.tokens.len() == 1 && row.is_some() {
                continue;
            }
            let mut seq = self.take(c.seq)?;
            let res = match row {
                Some(r) => self.model.prefill_sample(&mut seq, c.tokens, &params[*r].0).map(|t| self.ids[*r] = t),
                None => self.model.prefill_only(&mut seq, c.tokens),
            };
            self.seqs[c.seq] = Some(seq);
            res.map_err(core_error)?;
        }
        Ok(true)
    }

    fn sampled(&self) -> &[u32] {
        &self.ids
    }
}
