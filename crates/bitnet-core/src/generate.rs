//! Single-sequence generation: prefill the prompt, then decode token by token, sampling each
//! from the logits, until an eos id, the token budget or the context ends. One preallocated KV
//! cache and scratch; once warmed up a decode step allocates nothing (tests/no_alloc.rs).
//!
//! Prompt lookup ([`GenOptions::prompt_lookup`]): when the last tokens occurred earlier in the
//! context, the tokens that followed them then are fed as a draft together with the sampled
//! token in one step that keeps every position's logits (a decode step reads every weight
//! once, whatever the tokens). Each next token is still sampled from its own position's logits,
//! exactly as without the draft; while it equals the draft's token, the following logits are
//! already computed and no step is needed; at the first difference the rest of the draft is
//! dropped from the cache. So the output is the same token for token, sampling and its random
//! stream included, provided a position's logits do not depend on what else the step holds
//! (true on the CPU: `tests/speculative.rs`; [`BatchModel::logits_batch_invariant`]).

use std::time::{Duration, Instant};

use crate::batch::{BatchModel, SeqId, StepChunk};
use crate::error::{Error, Result};
use crate::json_mode::{JsonRun, JsonSpec};
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
    /// JSON mode or a JSON schema (`json_mode.rs`, `json_schema.rs`): only tokens that keep the
    /// output a valid prefix of one JSON object (matching the schema); generation stops
    /// (`Stop`) with the token that closes it
    pub json: Option<JsonSpec>,
    /// Prompt lookup: draft up to this many tokens per step from an earlier occurrence of the
    /// last tokens (module docs); 0 turns it off, at most [`MAX_DRAFT`]. The output does not
    /// change; the speed does, by how often the text repeats itself.
    pub prompt_lookup: usize,
}

/// The longest draft [`GenOptions::prompt_lookup`] takes.
pub const MAX_DRAFT: usize = 16;

/// Longest and shortest n-grams looked up (the last `n` tokens, longest first): one token
/// alone matches too often to be worth a step's extra positions.
const LOOKUP_NGRAM: std::ops::RangeInclusive<usize> = 2..=4;

/// Prompt-lookup draft: for `n` from 4 down to 2, the most recent earlier occurrence of the last
/// `n` tokens of `ctx ++ [last]`, and up to `k` of the tokens that followed it, into `out`
/// (cleared; left empty when nothing matches).
pub fn lookup_draft(ctx: &[u32], last: u32, k: usize, out: &mut Vec<u32>) {
    out.clear();
    let len = ctx.len() + 1;
    let at = |i: usize| if i < ctx.len() { ctx[i] } else { last };
    if k == 0 {
        return;
    }
    for n in LOOKUP_NGRAM.rev() {
        if n >= len {
            continue;
        }
        // candidates start at p <= len - n - 1, so that at least one token follows the match
        for p in (0..len - n).rev() {
            if (0..n).all(|i| at(p + i) == at(len - n + i)) {
                let from = p + n;
                out.extend((from..(from + k).min(len)).map(at));
                return;
            }
        }
    }
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
    /// prompt lookup: draft tokens fed, and how many of them were the tokens sampled
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
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
        // a prompt-lookup step keeps the logits of the sampled token and its draft
        let chunk = prefill_chunk.clamp(1, ctx);
        Ok(Session {
            model,
            scratch: model.new_scratch(chunk, (MAX_DRAFT + 1).min(chunk), ctx),
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
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenStats> {
        let mut feed =
            CpuFeed { model: self.model, cache: &mut self.cache, scratch: &mut self.scratch, seq: &mut self.seq };
        generate_loop(&mut feed, &mut self.history, &mut self.sampler, self.ctx, prompt, opts, on_token)
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

    /// As [`Session::generate`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenStats> {
        let mut feed = BatchFeed { model: &mut *self.model, seq: self.seq, prefill_chunk: self.prefill_chunk };
        generate_loop(&mut feed, &mut self.history, &mut self.sampler, self.ctx, prompt, opts, on_token)
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

/// What the generation loop needs of a model holding one sequence.
trait Feed {
    fn vocab(&self) -> usize;
    /// Keeps the first `len` positions (or fewer: returns how many it kept).
    fn truncate(&mut self, len: usize) -> usize;
    /// Feeds `tokens` after the kept positions (a prompt); then `logits()` are the last one's.
    fn prefill(&mut self, tokens: &[u32]) -> Result<()>;
    /// Feeds one generated token.
    fn decode(&mut self, token: u32) -> Result<()>;
    /// Row `i` of the last step's logits (row 0 after `prefill` or `decode`: the last fed
    /// position's).
    fn logits_at(&self, i: usize) -> &[f32];
    /// Draft tokens [`Feed::verify`] takes after the sampled one (0: no prompt lookup).
    fn max_draft(&self) -> usize;
    /// Feeds `tokens` (a sampled token and its draft) in one step keeping every position's
    /// logits: row `i` is what `decode(tokens[i])` would have left, bit for bit.
    fn verify(&mut self, tokens: &[u32]) -> Result<()>;
}

/// The CPU model with a session's cache and scratch.
struct CpuFeed<'a> {
    model: &'a Model,
    cache: &'a mut KvCache,
    scratch: &'a mut Scratch,
    seq: &'a mut SeqCache,
}

impl Feed for CpuFeed<'_> {
    fn vocab(&self) -> usize {
        self.model.cfg.vocab_size
    }
    fn truncate(&mut self, len: usize) -> usize {
        self.seq.truncate(len);
        self.seq.len()
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.model.prefill(self.cache, self.scratch, self.seq, tokens, false).map(|_| ())
    }
    fn decode(&mut self, token: u32) -> Result<()> {
        self.model.decode(self.cache, self.scratch, self.seq, token)
    }
    fn logits_at(&self, i: usize) -> &[f32] {
        self.scratch.logits(i)
    }
    fn max_draft(&self) -> usize {
        self.scratch.max_tokens.min(self.scratch.max_logit_rows).saturating_sub(1)
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<()> {
        self.model.prefill(self.cache, self.scratch, self.seq, tokens, true).map(|_| ())
    }
}

/// One sequence of a [`BatchModel`], prompts fed `prefill_chunk` tokens per step.
struct BatchFeed<'a> {
    model: &'a mut dyn BatchModel,
    seq: SeqId,
    prefill_chunk: usize,
}

impl Feed for BatchFeed<'_> {
    fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }
    fn truncate(&mut self, len: usize) -> usize {
        self.model.truncate(self.seq, len);
        self.model.seq_len(self.seq)
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let end = self.model.seq_len(self.seq) + tokens.len();
        self.model.reserve(self.seq, end)?;
        let mut i = 0;
        while i < tokens.len() {
            let j = (i + self.prefill_chunk).min(tokens.len());
            self.model.forward(&[StepChunk {
                seq: self.seq,
                tokens: &tokens[i..j],
                logits: j == tokens.len(),
                all_logits: false,
            }])?;
            i = j;
        }
        Ok(())
    }
    fn decode(&mut self, token: u32) -> Result<()> {
        self.prefill(&[token])
    }
    fn logits_at(&self, i: usize) -> &[f32] {
        self.model.logits(i)
    }
    fn max_draft(&self) -> usize {
        if self.model.supports_all_logits() && self.model.logits_batch_invariant() {
            self.prefill_chunk.saturating_sub(1)
        } else {
            0
        }
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<()> {
        let end = self.model.seq_len(self.seq) + tokens.len();
        self.model.reserve(self.seq, end)?;
        self.model.forward(&[StepChunk { seq: self.seq, tokens, logits: true, all_logits: true }])
    }
}

/// Forgets the cache's positions from `len` on (an unused draft's). They lie past the prompt,
/// in blocks the sequence alone holds, so every position before `len` stays.
fn drop_draft(feed: &mut impl Feed, len: usize) -> Result<()> {
    let kept = feed.truncate(len);
    if kept != len {
        return Err(Error::input(format!("prompt lookup: the cache kept {kept} positions of {len}")));
    }
    Ok(())
}

/// Prefill `prompt` (reusing the cached prefix it shares with `history`), then sample and feed
/// tokens until an eos id, the token budget, the context or the callback ends it.
fn generate_loop(
    feed: &mut impl Feed,
    history: &mut Vec<u32>,
    sampler: &mut Sampler,
    ctx: usize,
    prompt: &[u32],
    opts: &GenOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<GenStats> {
    opts.sampling.validate()?;
    if opts.prompt_lookup > MAX_DRAFT {
        return Err(Error::input(format!(
            "prompt lookup of {} tokens: at most {MAX_DRAFT} draft tokens per step",
            opts.prompt_lookup
        )));
    }
    let vocab = feed.vocab();
    if prompt.is_empty() {
        return Err(Error::input("empty prompt: at least one token is needed"));
    }
    if prompt.len() >= ctx {
        return Err(Error::input(format!(
            "prompt of {} tokens does not fit the context of {ctx} tokens (one position is needed to generate)",
            prompt.len()
        )));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::input(format!("token id {bad} out of range (vocab size {vocab})")));
    }
    sampler.set_params(opts.sampling)?;

    // Reuse the cached prefix; at least the last prompt token is recomputed to get logits.
    let common = history.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
    let common = feed.truncate(common);
    history.truncate(common);
    let t0 = Instant::now();
    feed.prefill(&prompt[common..])?;
    history.extend_from_slice(&prompt[common..]);
    let prefill_time = t0.elapsed();
    // what this call generates: what the frequency and presence penalties count
    let prompt_len = history.len();

    let t1 = Instant::now();
    let mut new_tokens = 0;
    // JSON mode: the recognizer, and the allowed list and walk stack it reuses
    let mut json = opts.json.as_ref().map(JsonRun::new);
    // Prompt lookup: the draft fed after the last sampled token, the step's tokens, and the
    // logits row of the next position (rows past 0 exist only after a `verify`). Reserved here:
    // a step allocates nothing.
    let k_max = opts.prompt_lookup.min(feed.max_draft());
    let (mut draft, mut fed) = (Vec::with_capacity(k_max), Vec::with_capacity(k_max + 1));
    let (mut row, mut drafted, mut accepted) = (0usize, 0usize, 0usize);
    let finish = loop {
        if new_tokens >= opts.max_new_tokens {
            break FinishReason::Length;
        }
        if let Some(run) = json.as_mut() {
            let allowed = run.allowed();
            if allowed.is_empty() {
                break FinishReason::Stop;
            }
            sampler.set_allowed(Some(allowed));
        }
        let tok = sampler.sample(feed.logits_at(row), history, prompt_len);
        if !opts.ignore_eos && opts.eos_ids.contains(&tok) {
            break FinishReason::Stop;
        }
        new_tokens += 1;
        if !on_token(tok) {
            break FinishReason::Cancelled;
        }
        if let Some(run) = json.as_mut() {
            if !run.advance(tok) || run.is_complete() {
                break FinishReason::Stop;
            }
        }
        // The last token's logits are never read: skip its decode step. A follow-up turn
        // recomputes it as part of its prompt.
        if new_tokens >= opts.max_new_tokens {
            break FinishReason::Length;
        }
        if history.len() >= ctx {
            break FinishReason::Context;
        }
        if row < draft.len() && draft[row] == tok {
            // the draft guessed it: already in the cache, its logits are the next row
            history.push(tok);
            row += 1;
            accepted += 1;
            continue;
        }
        if row < draft.len() {
            // the rest of the draft was wrong: forget its positions
            drop_draft(feed, history.len())?;
        }
        // draft only what can be used: within the context and before the token budget ends
        let k = k_max.min(ctx - history.len() - 1).min(opts.max_new_tokens - new_tokens - 1);
        lookup_draft(history, tok, k, &mut draft);
        row = 0;
        if draft.is_empty() {
            feed.decode(tok)?;
        } else {
            fed.clear();
            fed.push(tok);
            fed.extend_from_slice(&draft);
            feed.verify(&fed)?;
            drafted += draft.len();
        }
        history.push(tok);
    };
    if row < draft.len() {
        // positions of a draft nobody read: the cache keeps what `history` says
        drop_draft(feed, history.len())?;
    }
    Ok(GenStats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prompt.len() - common,
        new_tokens,
        prefill_time,
        decode_time: t1.elapsed(),
        finish,
        drafted_tokens: drafted,
        accepted_tokens: accepted,
    })
}
