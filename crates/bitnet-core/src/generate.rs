//! Single-sequence generation: prefill the prompt, then decode token by token, sampling each
//! from the logits, until an eos id, the token budget or the context ends. One preallocated KV
//! cache and scratch; once warmed up a decode step allocates nothing (tests/no_alloc.rs).

use std::time::{Duration, Instant};

use crate::batch::{BatchModel, SeqId, StepChunk};
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, SeqCache};
use crate::model::{Model, Scratch};
use crate::sampler::{Sampler, SamplingParams};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// an eos id was sampled
    Stop,
    /// max_new_tokens reached
    Length,
    /// the context is full
    Context,
    /// the caller's callback asked to stop
    Cancelled,
}

impl FinishReason {
    /// OpenAI's `finish_reason` word.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length | FinishReason::Context => "length",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// ids that end generation (not emitted)
    pub eos_ids: Vec<u32>,
    pub ignore_eos: bool,
}

/// Timings and counts of one generation.
#[derive(Debug, Clone)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// prompt tokens actually computed (the rest came from the cache)
    pub prefilled_tokens: usize,
    pub new_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub finish: FinishReason,
}

impl GenStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode rate: tokens after the first (the first comes from the prefill's logits).
    pub fn decode_tok_s(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// A model with its own cache and buffers, holding one conversation. Successive `generate` calls
/// reuse the cached prefix they share with the previous one (multi-turn chat).
pub struct Session<'m> {
    model: &'m Model,
    cache: KvCache,
    scratch: Scratch,
    seq: SeqCache,
    /// tokens whose K/V are in the cache, in order
    history: Vec<u32>,
    sampler: Sampler,
    ctx: usize,
}

impl<'m> Session<'m> {
    /// A session for contexts up to `ctx` tokens (clamped to max_position_embeddings), prefilling
    /// up to `prefill_chunk` tokens per step.
    pub fn new(model: &'m Model, ctx: usize, prefill_chunk: usize) -> Result<Session<'m>> {
        let ctx = ctx.min(model.cfg.max_position_embeddings).max(1);
        let cache = model.new_cache(ctx, 1, 16);
        let seq = cache.new_seq();
        Ok(Session {
            model,
            scratch: model.new_scratch(prefill_chunk.clamp(1, ctx), 1, ctx),
            cache,
            seq,
            history: Vec::with_capacity(ctx),
            sampler: Sampler::new(SamplingParams::greedy(), model.cfg.vocab_size)?,
            ctx,
        })
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Tokens in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Generates from `prompt`, calling `on_token(id)` for every new token (eos excluded); the
    /// callback returns `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenStats> {
        opts.sampling.validate()?;
        if prompt.is_empty() {
            return Err(Error::input("empty prompt: at least one token is needed"));
        }
        if prompt.len() >= self.ctx {
            return Err(Error::input(format!(
                "prompt of {} tokens does not fit the context of {} tokens (one position is needed to generate)",
                prompt.len(),
                self.ctx
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.model.cfg.vocab_size) {
            return Err(Error::input(format!(
                "token id {bad} out of range (vocab size {})",
                self.model.cfg.vocab_size
            )));
        }
        self.sampler.set_params(opts.sampling)?;

        // Reuse the cached prefix; at least the last prompt token is recomputed to get logits.
        let common = self.history.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        self.seq.truncate(common);
        self.history.truncate(common);
        let t0 = Instant::now();
        self.model.prefill(&mut self.cache, &mut self.scratch, &mut self.seq, &prompt[common..], false)?;
        self.history.extend_from_slice(&prompt[common..]);
        let prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let mut new_tokens = 0;
        let finish = loop {
            if new_tokens >= opts.max_new_tokens {
                break FinishReason::Length;
            }
            let tok = self.sampler.sample(self.scratch.logits(0), &self.history);
            if !opts.ignore_eos && opts.eos_ids.contains(&tok) {
                break FinishReason::Stop;
            }
            new_tokens += 1;
            if !on_token(tok) {
                break FinishReason::Cancelled;
            }
            // The last token's logits are never read: skip its decode step. A follow-up turn
            // recomputes it as part of its prompt.
            if new_tokens >= opts.max_new_tokens {
                break FinishReason::Length;
            }
            if self.history.len() >= self.ctx {
                break FinishReason::Context;
            }
            self.model.decode(&mut self.cache, &mut self.scratch, &mut self.seq, tok)?;
            self.history.push(tok);
        };
        Ok(GenStats {
            prompt_tokens: prompt.len(),
            prefilled_tokens: prompt.len() - common,
            new_tokens,
            prefill_time,
            decode_time: t1.elapsed(),
            finish,
        })
    }

    /// Forgets the conversation (the cache is kept allocated).
    pub fn reset(&mut self) {
        self.seq.truncate(0);
        self.history.clear();
    }
}

/// [`Session`] over any [`BatchModel`] (the GPU's): one sequence of the model, the same prefix
/// reuse across calls, sampling on the host from each step's logits (every sampling option).
pub struct BatchSession<'m> {
    model: &'m mut dyn BatchModel,
    seq: SeqId,
    history: Vec<u32>,
    sampler: Sampler,
    ctx: usize,
    prefill_chunk: usize,
}

impl<'m> BatchSession<'m> {
    /// A session on a new sequence of `model`, for contexts up to `ctx` tokens, feeding prompts
    /// `prefill_chunk` tokens per step (at most what the model takes per step).
    pub fn new(model: &'m mut dyn BatchModel, ctx: usize, prefill_chunk: usize) -> Result<BatchSession<'m>> {
        let ctx = ctx.min(model.config().max_position_embeddings).max(1);
        let vocab = model.config().vocab_size;
        let seq = model.new_seq()?;
        Ok(BatchSession {
            model,
            seq,
            history: Vec::with_capacity(ctx),
            sampler: Sampler::new(SamplingParams::greedy(), vocab)?,
            ctx,
            prefill_chunk: prefill_chunk.max(1),
        })
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Tokens in the cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Feeds `tokens` in steps of at most `prefill_chunk`; logits of the last one.
    fn step(&mut self, tokens: &[u32]) -> Result<()> {
        let end = self.model.seq_len(self.seq) + tokens.len();
        self.model.reserve(self.seq, end)?;
        let mut i = 0;
        while i < tokens.len() {
            let j = (i + self.prefill_chunk).min(tokens.len());
            let chunk = StepChunk { seq: self.seq, tokens: &tokens[i..j], logits: j == tokens.len() };
            self.model.forward(&[chunk])?;
            i = j;
        }
        Ok(())
    }

    /// As [`Session::generate`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenStats> {
        opts.sampling.validate()?;
        let vocab = self.model.config().vocab_size;
        if prompt.is_empty() {
            return Err(Error::input("empty prompt: at least one token is needed"));
        }
        if prompt.len() >= self.ctx {
            return Err(Error::input(format!(
                "prompt of {} tokens does not fit the context of {} tokens (one position is needed to generate)",
                prompt.len(),
                self.ctx
            )));
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::input(format!("token id {bad} out of range (vocab size {vocab})")));
        }
        self.sampler.set_params(opts.sampling)?;

        let common = self.history.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        self.model.truncate(self.seq, common);
        self.history.truncate(common);
        let t0 = Instant::now();
        self.step(&prompt[common..])?;
        self.history.extend_from_slice(&prompt[common..]);
        let prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let mut new_tokens = 0;
        let finish = loop {
            if new_tokens >= opts.max_new_tokens {
                break FinishReason::Length;
            }
            let tok = self.sampler.sample(self.model.logits(0), &self.history);
            if !opts.ignore_eos && opts.eos_ids.contains(&tok) {
                break FinishReason::Stop;
            }
            new_tokens += 1;
            if !on_token(tok) {
                break FinishReason::Cancelled;
            }
            if new_tokens >= opts.max_new_tokens {
                break FinishReason::Length;
            }
            if self.history.len() >= self.ctx {
                break FinishReason::Context;
            }
            self.step(&[tok])?;
            self.history.push(tok);
        };
        Ok(GenStats {
            prompt_tokens: prompt.len(),
            prefilled_tokens: prompt.len() - common,
            new_tokens,
            prefill_time,
            decode_time: t1.elapsed(),
            finish,
        })
    }

    /// Forgets the conversation (the sequence keeps its blocks).
    pub fn reset(&mut self) {
        self.model.truncate(self.seq, 0);
        self.history.clear();
    }
}

impl Drop for BatchSession<'_> {
    fn drop(&mut self) {
        self.model.release(self.seq);
    }
}
