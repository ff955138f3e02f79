//! The scheduler: one thread that owns the model (a [`BatchModel`]: the CPU model with its KV
//! cache and step scratch, or the GPU's) and every sequence, and runs the model step after step
//! (continuous batching).
//!
//! A step is one [`BatchModel::forward`] call over: one token of every running sequence that is
//! decoding (each at its own position), plus at most one prefill chunk of up to `prefill_chunk`
//! prompt tokens, taken from the sequences still prefilling in admission order (the oldest first;
//! several short prompts can share the chunk, a long one is cut into chunks over several steps). Sequences join the running batch and leave it
//! only between steps. HTTP handlers talk to it through [`SchedulerHandle::submit`] (a channel in)
//! and receive [`Event`]s on a per-request channel out.
//!
//! KV blocks and the policy when they run out:
//! - admission (FIFO) reserves the blocks of the whole prompt at once, and only when the pool keeps
//!   one spare block per running sequence after that (room for each to grow by a block);
//! - before each step every decoding sequence gets the block its next position needs; when the
//!   pool cannot supply them, the youngest running sequence is preempted: its blocks go back to
//!   the pool, and it goes back to the front of the waiting queue keeping its tokens and its
//!   sampler state. On readmission its prompt and generated tokens are prefilled again
//!   (recomputation) and it continues where it stopped: the client sees only a pause, and the
//!   tokens are the same as without preemption (the model's math per token does not depend on the
//!   batch). The oldest sequence is never preempted, and the pool always holds one full context,
//!   so every sequence finishes;
//! - requests that wait (batch full or blocks short) count against a bounded queue; past
//!   `max_queue` the handler answers 429 with Retry-After.
//!
//! Prefix cache: at admission a sequence takes the cached blocks that hold a prefix of its
//! tokens ([`BatchModel::attach_prefix`]) and starts feeding after them; after every step the
//! blocks each fed sequence filled are offered to later ones ([`BatchModel::publish_prefix`]).
//! Both are no-ops for a model without one.
//!
//! Tokens are sampled on the host from each row's logits with the request's sampler, unless the
//! model draws them itself ([`BatchModel::forward_sampled`]: the GPU does for greedy, temperature,
//! top-k and top-p requests, and sends back ids instead of logits).
//!
//! Prompt lookup (`prompt_lookup` > 0, a model whose logits are batch invariant: the CPU): a
//! decoding sequence whose last tokens occurred earlier in its context is fed, with its sampled
//! token, the tokens that followed them then (a draft, [`lookup_draft`]), in one chunk that keeps
//! every position's logits. Its next tokens are sampled from those rows in turn, exactly as
//! without the draft, while each equals the draft's; the positions of the first wrong guess on
//! are dropped from its cache. The output does not change; a sequence gets several tokens from
//! one step when its text repeats its context. Drafts are given to the oldest sequences first, at
//! most `prompt_lookup` tokens per step in all (a batch step is compute bound: each draft token
//! costs about what a sequence's token does), and only from blocks the pool can spare.
//!
//! A sequence's blocks go back to the pool when it finishes (eos, max_tokens, context), fails (a
//! step error or panic, or shutdown), or its client goes away (its event channel is closed; checked
//! before every step).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitnet_core::batch::{BatchModel, SeqId, StepChunk};
use bitnet_core::generate::{lookup_draft, MAX_DRAFT};
use bitnet_core::json_mode::{JsonRun, JsonSpec};
use bitnet_core::logprobs::TokenLogprobs;
use bitnet_core::sampler::{Sampler, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::{Metrics, Outcome};

/// Why a sequence finished normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// an eos id was sampled (not sent)
    Stop,
    /// max_tokens reached, or the context is full
    Length,
}

/// Why a sequence failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// the server is shutting down
    Shutdown,
    /// a model step failed
    Internal,
}

/// What a request's channel receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// a generated token, with its log-probabilities when the request asked for them
    Token(u32, Option<Box<TokenLogprobs>>),
    /// the prompt's log-probabilities (`echo` with `logprobs`), one per prompt token (none for
    /// the first), sent once, before the first token
    Prompt(Vec<Option<Box<TokenLogprobs>>>),
    Done(Finish),
    Error(FailKind, String),
}

/// One generation request, validated.
pub struct Job {
    pub prompt: Vec<u32>,
    /// at least 1; prompt + max_new <= ctx
    pub max_new: usize,
    pub params: SamplingParams,
    pub ignore_eos: bool,
    /// report each token's log-probability and this many alternatives (at most
    /// `MAX_TOP_LOGPROBS`)
    pub logprobs: Option<usize>,
    /// also the prompt tokens' (needs a model that `supports_all_logits`)
    pub prompt_logprobs: bool,
    /// added to these tokens' logits before sampling (on the host)
    pub logit_bias: Vec<(u32, f32)>,
    /// these end the output as eos does (also with `ignore_eos`)
    pub stop_token_ids: Vec<u32>,
    /// eos and the stop tokens cannot be drawn before this many tokens
    pub min_tokens: usize,
    /// JSON mode or a JSON schema: only tokens that keep the output a valid prefix of a JSON
    /// object (matching the schema); the output ends when the object closes
    pub json: Option<JsonSpec>,
    pub t_submit: Instant,
    pub events: UnboundedSender<Event>,
    /// Fault injection (tests): fail the sequence after this many tokens.
    pub fail_after: Option<usize>,
}

enum Msg {
    Submit(Job),
    Shutdown(Duration),
}

/// Why a submission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// the waiting queue is full (429)
    QueueFull,
    /// the scheduler is not running (503)
    Stopped,
}

/// Sizes and limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch: usize,
    pub prefill_chunk: usize,
    pub max_queue: usize,
    /// context of one sequence
    pub ctx: usize,
    pub n_blocks: usize,
    pub block_size: usize,
    /// Sleep after every step (tests use it to slow a tiny model down).
    pub step_delay: Duration,
    /// Prompt lookup: draft tokens per step over all decoding sequences, at most [`MAX_DRAFT`]
    /// for one (0: off; ignored for a model whose logits depend on the batch)
    pub prompt_lookup: usize,
}

/// The handlers' side: submit jobs, ask for shutdown.
pub struct SchedulerHandle {
    tx: Mutex<Option<std_mpsc::Sender<Msg>>>,
    /// submitted and not yet admitted (new requests only)
    pending: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
    alive: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// Starts the scheduler thread, which owns `model` (its KV cache sized for `cfg`) from now
    /// on; `eos_ids` end a sequence.
    pub fn start(
        model: Box<dyn BatchModel>,
        eos_ids: Vec<u32>,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<SchedulerHandle> {
        let (tx, rx) = std_mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        metrics.kv_blocks_total.store((model.free_blocks() + model.used_blocks()) as u64, Ordering::Relaxed);
        metrics.kv_block_size.store(model.block_size() as u64, Ordering::Relaxed);
        let vocab = model.config().vocab_size;
        let spare = (0..cfg.max_batch.min(64))
            .map(|_| Sampler::new(SamplingParams::greedy(), vocab))
            .collect::<bitnet_core::Result<Vec<_>>>()
            .map_err(std::io::Error::other)?;
        let drafting = cfg.prompt_lookup > 0 && model.supports_all_logits() && model.logits_batch_invariant();
        let worker = Worker {
            drafting,
            lookup: Vec::with_capacity(MAX_DRAFT),
            eos_ids,
            model,
            running: Vec::with_capacity(cfg.max_batch),
            waiting: VecDeque::new(),
            spare,
            rx,
            pending: pending.clone(),
            metrics: metrics.clone(),
            deadline: None,
            rows: Vec::with_capacity(cfg.max_batch),
            row_params: Vec::with_capacity(cfg.max_batch),
            lp_chunks: Vec::with_capacity(cfg.max_batch),
            in_step: Vec::with_capacity(cfg.max_batch),
            fed: Vec::with_capacity(cfg.max_batch),
            done: Vec::with_capacity(cfg.max_batch),
            cfg: cfg.clone(),
        };
        let alive2 = alive.clone();
        let thread = std::thread::Builder::new().name("bitnet-scheduler".into()).spawn(move || {
            struct Dead(Arc<AtomicBool>);
            impl Drop for Dead {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _dead = Dead(alive2);
            worker.run();
        })?;
        Ok(SchedulerHandle {
            tx: Mutex::new(Some(tx)),
            pending,
            max_queue: cfg.max_queue,
            metrics,
            thread: Mutex::new(Some(thread)),
            alive,
        })
    }

    /// Queues a job. Refused when `max_queue` requests already wait, or the scheduler is gone.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.alive.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        let prev = self.pending.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_queue {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull);
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match guard.as_ref() {
            Some(tx) => tx.send(Msg::Submit(job)).is_ok(),
            None => false,
        };
        if !sent {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(())
    }

    /// The most sequences that may wait for admission (`--max-queue`).
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// Requests waiting for admission.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Starts shutting down: waiting requests fail at once, running ones get `grace` to finish and
    /// then fail. New submissions fail.
    pub fn shutdown(&self, grace: Duration) {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = guard.as_ref() {
            let _ = tx.send(Msg::Shutdown(grace));
        }
    }

    /// Shuts down (if not yet) and waits for the thread to end.
    pub fn join(&self) {
        self.shutdown(Duration::ZERO);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        self.join();
    }
}

/// One sequence, waiting or running.
struct Seq {
    events: UnboundedSender<Event>,
    /// prompt then generated tokens; `tokens[cache.len()..]` still has to be fed
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    generated: usize,
    /// the model's sequence while admitted (None: waiting, holds no blocks)
    seq: Option<SeqId>,
    /// positions in that sequence's cache (0 when waiting)
    cached: usize,
    /// kept across preemption (the random stream continues)
    sampler: Option<Sampler>,
    params: SamplingParams,
    ignore_eos: bool,
    logprobs: Option<usize>,
    /// the prompt's log-probabilities while they are computed (Some until sent)
    prompt_lps: Option<Vec<Option<Box<TokenLogprobs>>>>,
    logit_bias: Vec<(u32, f32)>,
    stop_token_ids: Vec<u32>,
    min_tokens: usize,
    json: Option<JsonRun>,
    t_submit: Instant,
    t_last: Option<Instant>,
    fail_after: Option<usize>,
    /// still counted in the handle's `pending` (a new request not yet admitted)
    counted: bool,
    /// Prompt lookup: what this step feeds, the last sampled token and its draft (empty: no
    /// draft this step)
    draft: Vec<u32>,
}

impl Seq {
    /// Tokens not yet in the cache.
    fn to_feed(&self) -> usize {
        self.tokens.len() - self.cached
    }

    /// Whether this sequence's next token must be drawn here from the logits (a model that
    /// draws its own knows only `SamplingParams`): log-probabilities, a logit bias, or eos and
    /// stop tokens still masked by `min_tokens`.
    fn samples_on_host(&self) -> bool {
        self.logprobs.is_some()
            || !self.logit_bias.is_empty()
            || self.generated < self.min_tokens
            || self.json.is_some()
    }

    /// The request's logit bias, plus -inf on the tokens that would end the output while fewer
    /// than `min_tokens` are generated.
    fn bias_now(&self, eos_ids: &[u32]) -> Vec<(u32, f32)> {
        let mut b = self.logit_bias.clone();
        if self.generated < self.min_tokens {
            let eos = if self.ignore_eos { &[][..] } else { eos_ids };
            b.extend(eos.iter().chain(&self.stop_token_ids).map(|&t| (t, f32::NEG_INFINITY)));
        }
        b
    }
}

struct Worker {
    cfg: SchedulerConfig,
    eos_ids: Vec<u32>,
    model: Box<dyn BatchModel>,
    /// in admission order: the last one is the youngest
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    spare: Vec<Sampler>,
    rx: std_mpsc::Receiver<Msg>,
    pending: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// set by shutdown: running sequences are failed past it
    deadline: Option<Instant>,
    /// per step: (running index, logits row)
    rows: Vec<(usize, usize)>,
    /// per step: each row's sampling settings and tokens sampled so far
    row_params: Vec<(SamplingParams, usize)>,
    /// per step: chunks whose every logit row is wanted (running index, first row, tokens,
    /// first position)
    lp_chunks: Vec<(usize, usize, usize, usize)>,
    /// per step: running indices fed, and how many tokens each
    in_step: Vec<usize>,
    fed: Vec<usize>,
    /// per step: (running index, how it ends)
    done: Vec<(usize, End)>,
    /// prompt lookup is on (and the model's logits are batch invariant)
    drafting: bool,
    /// the draft [`lookup_draft`] finds
    lookup: Vec<u32>,
}

#[derive(Debug, Clone)]
enum End {
    Finished(Finish),
    Cancelled,
    Failed(FailKind, String),
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                if self.deadline.is_some() {
                    // Shutting down and nothing left: answer what is still in the channel, then stop.
                    while let Ok(m) = self.rx.try_recv() {
                        self.handle(m);
                    }
                    break;
                }
                match self.rx.recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => break,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        if self.deadline.is_none() {
                            self.deadline = Some(Instant::now());
                        }
                        break;
                    }
                }
            }
            self.reap_cancelled();
            if let Some(d) = self.deadline {
                if Instant::now() >= d {
                    self.fail_all_running(FailKind::Shutdown, "the server is shutting down");
                }
            }
            self.admit();
            if self.running.is_empty() {
                // Nothing runs, so the whole pool is free: a head that still does not fit never will.
                if let Some(s) = self.waiting.pop_front() {
                    let msg = format!("a sequence of {} tokens does not fit the KV cache", s.tokens.len());
                    self.retire(s, End::Failed(FailKind::Internal, msg));
                }
                continue;
            }
            self.step();
            self.publish();
            if !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.queue_depth.store(self.waiting.len() as u64, Ordering::Relaxed);
        m.running.store(self.running.len() as u64, Ordering::Relaxed);
        m.kv_blocks_used.store(self.model.used_blocks() as u64, Ordering::Relaxed);
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Submit(job) => {
                if self.deadline.is_some() {
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.send(Event::Error(FailKind::Shutdown, "the server is shutting down".into()));
                    self.metrics.finished(Outcome::Failed);
                    return;
                }
                let mut tokens = Vec::with_capacity(job.prompt.len() + job.max_new);
                tokens.extend_from_slice(&job.prompt);
                self.waiting.push_back(Seq {
                    events: job.events,
                    prompt_len: tokens.len(),
                    tokens,
                    max_new: job.max_new,
                    generated: 0,
                    seq: None,
                    cached: 0,
                    sampler: None,
                    params: job.params,
                    ignore_eos: job.ignore_eos,
                    logprobs: job.logprobs,
                    prompt_lps: job.prompt_logprobs.then(|| {
                        let mut v = Vec::with_capacity(job.prompt.len());
                        v.push(None);
                        v
                    }),
                    logit_bias: job.logit_bias,
                    stop_token_ids: job.stop_token_ids,
                    min_tokens: job.min_tokens,
                    json: job.json.as_ref().map(JsonRun::new),
                    t_submit: job.t_submit,
                    t_last: None,
                    fail_after: job.fail_after,
                    counted: true,
                    draft: Vec::new(),
                });
            }
            Msg::Shutdown(grace) => {
                let d = Instant::now() + grace;
                self.deadline = Some(self.deadline.map_or(d, |old| old.min(d)));
                while let Some(s) = self.waiting.pop_front() {
                    self.retire(s, End::Failed(FailKind::Shutdown, "the server is shutting down".into()));
                }
            }
        }
    }

    /// Releases a sequence that leaves (from anywhere) and tells its client why.
    fn retire(&mut self, mut s: Seq, end: End) {
        if let Some(id) = s.seq.take() {
            self.model.release(id);
        }
        if s.counted {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            s.counted = false;
        }
        let outcome = match &end {
            End::Finished(Finish::Stop) => Outcome::Stop,
            End::Finished(Finish::Length) => Outcome::Length,
            End::Cancelled => Outcome::Cancelled,
            End::Failed(..) => Outcome::Failed,
        };
        match end {
            End::Finished(f) => {
                let _ = s.events.send(Event::Done(f));
            }
            End::Failed(k, msg) => {
                let _ = s.events.send(Event::Error(k, msg));
            }
            End::Cancelled => {}
        }
        self.metrics.finished(outcome);
        if let Some(sm) = s.sampler.take() {
            if self.spare.len() < self.cfg.max_batch {
                self.spare.push(sm);
            }
        }
    }

    fn fail_all_running(&mut self, kind: FailKind, msg: &str) {
        while let Some(s) = self.running.pop() {
            self.retire(s, End::Failed(kind, msg.to_string()));
        }
    }

    /// Drops sequences whose client is gone (before they take another step).
    fn reap_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let s = self.running.remove(i);
                self.retire(s, End::Cancelled);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].events.is_closed() {
                let s = self.waiting.remove(i).expect("index checked");
                self.retire(s, End::Cancelled);
            } else {
                i += 1;
            }
        }
    }

    /// Moves waiting sequences (FIFO) into the running batch while there is room and blocks.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = self.model.blocks_for(front.tokens.len());
            // One spare block per running sequence stays free, so that they can keep growing.
            if need + self.running.len() > self.model.free_blocks() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front checked");
            let id = match self.model.new_seq() {
                Ok(id) => id,
                Err(e) => {
                    // Cannot happen (max_batch sequences at most); fail this one cleanly.
                    self.retire(s, End::Failed(FailKind::Internal, format!("no sequence slot: {e}")));
                    continue;
                }
            };
            s.seq = Some(id);
            // K/V of a prefix computed before (none without a prefix cache; not when the prompt's
            // logits are wanted)
            s.cached = if s.prompt_lps.is_some() { 0 } else { self.model.attach_prefix(id, &s.tokens) };
            self.metrics.prefix_hit_tokens.fetch_add(s.cached as u64, Ordering::Relaxed);
            if let Err(e) = self.model.reserve(id, s.tokens.len()) {
                // Cannot happen (checked above and at validation); fail this one cleanly.
                self.retire(s, End::Failed(FailKind::Internal, format!("cannot reserve the KV cache: {e}")));
                continue;
            }
            if s.sampler.is_none() {
                let sm = match self.spare.pop() {
                    Some(mut sm) => sm.set_params(s.params).map(|_| sm),
                    None => Sampler::new(s.params, self.model.config().vocab_size),
                };
                match sm {
                    Ok(mut sm) => {
                        sm.set_logit_bias(&s.bias_now(&self.eos_ids));
                        s.sampler = Some(sm)
                    }
                    Err(e) => {
                        self.retire(s, End::Failed(FailKind::Internal, format!("sampler: {e}")));
                        continue;
                    }
                }
            }
            if s.counted {
                s.counted = false;
                self.pending.fetch_sub(1, Ordering::SeqCst);
                self.metrics.prompt_tokens.fetch_add(s.prompt_len as u64, Ordering::Relaxed);
            }
            self.running.push(s);
        }
    }

    /// Makes sure every decoding sequence has the block its next position needs, preempting the
    /// youngest sequences while the pool is short.
    fn ensure_growth(&mut self) {
        loop {
            let model = &self.model;
            let need: usize = self
                .running
                .iter()
                .filter(|s| s.to_feed() == 1)
                .filter_map(|s| s.seq.map(|id| model.blocks_for(s.cached + 1).saturating_sub(model.seq_blocks(id))))
                .sum();
            if need <= self.model.free_blocks() || self.running.len() <= 1 {
                break;
            }
            let mut victim = self.running.pop().expect("len checked");
            if let Some(id) = victim.seq.take() {
                self.model.release(id);
            }
            victim.cached = 0;
            self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
            self.waiting.push_front(victim);
        }
        for s in self.running.iter_mut().filter(|s| s.to_feed() == 1) {
            if let Some(id) = s.seq {
                // Only a single remaining sequence can fail here, and it fits: the pool holds one context.
                let _ = self.model.reserve(id, s.cached + 1);
            }
        }
    }

    /// Prompt lookup: drafts for decoding sequences, the oldest first, `cfg.prompt_lookup`
    /// tokens in all (module docs). A draft stays within the context and `max_tokens`, and within
    /// the blocks its sequence holds plus those the pool can spare (one per running sequence
    /// stays free, as at admission).
    fn plan_drafts(&mut self) {
        let mut budget = if self.drafting { self.cfg.prompt_lookup } else { 0 };
        let Worker { model, running, lookup, cfg, .. } = self;
        let (bs, n_running) = (model.block_size(), running.len());
        for s in running.iter_mut() {
            s.draft.clear();
            let Some(id) = s.seq else { continue };
            if budget == 0 || s.to_feed() != 1 || s.prompt_lps.is_some() {
                continue;
            }
            // positions 0..n - 1 are cached; the draft's k tokens follow the sampled one at n - 1
            let n = s.tokens.len();
            let room = (model.seq_blocks(id) + model.free_blocks().saturating_sub(n_running)) * bs;
            let k = budget
                .min(MAX_DRAFT)
                .min(cfg.ctx.saturating_sub(n))
                .min(s.max_new.saturating_sub(s.generated + 1))
                .min(room.saturating_sub(n));
            lookup_draft(&s.tokens[..n - 1], s.tokens[n - 1], k, lookup);
            if lookup.is_empty() || model.reserve(id, n + lookup.len()).is_err() {
                continue;
            }
            s.draft.push(s.tokens[n - 1]);
            s.draft.extend_from_slice(lookup);
            budget -= lookup.len();
        }
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.ensure_growth();
        self.plan_drafts();
        let Worker { model, running, rows, row_params, lp_chunks, in_step, fed, done, cfg, metrics, .. } = self;
        rows.clear();
        lp_chunks.clear();
        row_params.clear();
        in_step.clear();
        fed.clear();
        done.clear();
        let mut chunks: Vec<StepChunk<'_>> = Vec::with_capacity(running.len());
        // The prefill chunk: at most `prefill_chunk` prompt tokens per step, taken from the
        // prefilling sequences in admission order (several short prompts can share it).
        let mut budget = cfg.prefill_chunk;
        let mut n_tokens = 0;
        let mut n_prefill = 0;
        let mut row_base = 0;
        let mut any_draft = false;
        for (i, s) in running.iter().enumerate() {
            let Some(id) = s.seq else { continue };
            let start = s.cached;
            let left = s.tokens.len() - start;
            let (n, logits) = if left == 1 {
                (1, true)
            } else if budget > 0 && left > 1 {
                let n = left.min(budget);
                budget -= n;
                n_prefill += n;
                (n, n == left)
            } else {
                continue;
            };
            // a draft is fed after the sampled token; only that token counts as cached until the
            // draft's are sampled too
            let drafted = !s.draft.is_empty();
            let tokens = if drafted { &s.draft[..] } else { &s.tokens[start..start + n] };
            if model.blocks_for(start + tokens.len()) > model.seq_blocks(id) {
                // Blocks not there (cannot happen: reserved at admission / growth): skip this step.
                continue;
            }
            // every position's logits while the prompt's log-probabilities are wanted, or to
            // check a draft
            let all_logits = s.prompt_lps.is_some() || drafted;
            let chunk = StepChunk { seq: id, tokens, logits, all_logits };
            let chunk_rows = chunk.rows();
            chunks.push(chunk);
            in_step.push(i);
            fed.push(n);
            if s.prompt_lps.is_some() {
                lp_chunks.push((i, row_base, n, start));
            }
            if logits {
                // the last row of the chunk; a draft's first (its rows are read in turn)
                rows.push((i, if drafted { row_base } else { row_base + chunk_rows - 1 }));
                row_params.push((s.params, s.generated));
            }
            if drafted {
                any_draft = true;
                metrics.draft_tokens.fetch_add(tokens.len() as u64 - 1, Ordering::Relaxed);
            }
            row_base += chunk_rows;
            n_tokens += tokens.len();
        }
        if chunks.is_empty() {
            // Cannot happen (blocks are reserved before); do not spin if it does.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let t0 = Instant::now();
        // ids drawn by the model itself where it can (a GPU sends ids, not logits, back)
        // (not where a request wants log-probabilities or has a logit bias: the host does those)
        let wants_logits =
            any_draft || !lp_chunks.is_empty() || rows.iter().any(|&(i, _)| running[i].samples_on_host());
        let res = catch_unwind(AssertUnwindSafe(|| {
            if wants_logits {
                model.forward(&chunks).map(|_| false)
            } else {
                model.forward_sampled(&chunks, row_params)
            }
        }));
        drop(chunks);
        if matches!(res, Ok(Ok(_))) {
            // what each fed sequence now holds, offered to later prompts (the prefix cache)
            for (&n, &i) in fed.iter().zip(in_step.iter()) {
                let s = &mut running[i];
                s.cached += n;
                if let Some(id) = s.seq {
                    model.publish_prefix(id, &s.tokens[..s.cached]);
                }
            }
        }
        let now = Instant::now();
        metrics.step_time.observe(now - t0);
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        metrics.step_tokens.fetch_add(n_tokens as u64, Ordering::Relaxed);
        metrics.prefill_tokens.fetch_add(n_prefill as u64, Ordering::Relaxed);
        let mut on_model = false;
        let err = match res {
            Ok(Ok(sampled)) => {
                on_model = sampled;
                None
            }
            Ok(Err(e)) => Some(format!("model step failed: {e}")),
            Err(p) => {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                Some(format!("model step panicked: {what}"))
            }
        };
        if let Some(msg) = err {
            for &i in in_step.iter() {
                done.push((i, End::Failed(FailKind::Internal, msg.clone())));
            }
        } else {
            // prompt log-probabilities: position p's logits score token p + 1 (each once, also
            // when a preempted prompt is fed again)
            for &(i, base, n, start) in lp_chunks.iter() {
                let s = &mut running[i];
                let top = s.logprobs.unwrap_or(0);
                if let Some(v) = s.prompt_lps.as_mut() {
                    for k in 0..n {
                        let p = start + k;
                        if p + 1 < s.prompt_len && v.len() == p + 1 {
                            v.push(Some(Box::new(TokenLogprobs::new(model.logits(base + k), s.tokens[p + 1], top))));
                        }
                    }
                }
            }
            for &(i, first) in rows.iter() {
                let s = &mut running[i];
                if let Some(v) = s.prompt_lps.take() {
                    if s.events.send(Event::Prompt(v)).is_err() {
                        done.push((i, End::Cancelled));
                        continue;
                    }
                }
                let Some(sampler) = s.sampler.as_mut() else {
                    done.push((i, End::Failed(FailKind::Internal, "no sampler".into())));
                    continue;
                };
                // One token, or with a draft one per row in turn: row `first + j` follows
                // `draft[j]`, so while the sampled token is the draft's next, the next row is
                // already computed (and the token's K/V are in the cache).
                let mut row = first;
                let end = loop {
                    if let Some(j) = s.json.as_mut() {
                        // (JSON mode always samples here: `samples_on_host`)
                        let allowed = j.allowed();
                        if allowed.is_empty() {
                            break Some(End::Finished(Finish::Stop));
                        }
                        sampler.set_allowed(Some(allowed));
                    }
                    let tok = if on_model {
                        model.sampled()[row]
                    } else {
                        sampler.sample(model.logits(row), &s.tokens, s.prompt_len)
                    };
                    if (!s.ignore_eos && self.eos_ids.contains(&tok)) || s.stop_token_ids.contains(&tok) {
                        break Some(End::Finished(Finish::Stop));
                    }
                    s.tokens.push(tok);
                    s.generated += 1;
                    // the object closed: this token is the last
                    let json_done = s.json.as_mut().is_some_and(|j| !j.advance(tok) || j.is_complete());
                    if s.generated == s.min_tokens {
                        // eos and the stop tokens may come from now on
                        sampler.set_logit_bias(&s.logit_bias);
                    }
                    // (never with `on_model`: requests that want log-probabilities keep the logits)
                    let lp = s.logprobs.map(|k| Box::new(TokenLogprobs::new(model.logits(row), tok, k)));
                    if s.events.send(Event::Token(tok, lp)).is_err() {
                        break Some(End::Cancelled);
                    }
                    metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    match s.t_last {
                        None => metrics.ttft.observe(now - s.t_submit),
                        Some(t) => metrics.tpot.observe(now - t),
                    }
                    s.t_last = Some(now);
                    if json_done {
                        break Some(End::Finished(Finish::Stop));
                    } else if s.fail_after.is_some_and(|n| s.generated >= n) {
                        break Some(End::Failed(FailKind::Internal, "injected failure (test)".into()));
                    } else if s.generated >= s.max_new || s.tokens.len() >= cfg.ctx {
                        break Some(End::Finished(Finish::Length));
                    }
                    let j = row - first + 1;
                    if s.draft.get(j) != Some(&tok) {
                        break None;
                    }
                    s.cached += 1;
                    row += 1;
                    metrics.draft_accepted.fetch_add(1, Ordering::Relaxed);
                };
                match (end, s.seq) {
                    (Some(end), _) => done.push((i, end)),
                    (None, Some(id)) if !s.draft.is_empty() => {
                        // forget the draft's positions from its first wrong guess on (they lie
                        // past the prompt, in blocks this sequence alone holds); offer the
                        // blocks the guessed tokens filled
                        model.truncate(id, s.cached);
                        // (were fewer kept, the scheduler feeds the rest again as a prompt)
                        s.cached = model.seq_len(id).min(s.cached);
                        model.publish_prefix(id, &s.tokens[..s.cached]);
                    }
                    _ => {}
                }
            }
        }
        // Remove from the back so that indices stay valid; order of the rest is kept.
        let mut done = std::mem::take(&mut self.done);
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, end) in done.drain(..) {
            let s = self.running.remove(i);
            self.retire(s, end);
        }
        self.done = done;
    }
}
