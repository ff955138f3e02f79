//! Perplexity of a token stream, in windows, like llama.cpp's `llama-perplexity` and the Hugging
//! Face perplexity guide.
//!
//! # The convention (the transformers reference in `tools/make_ppl_fixture.py` does the same)
//!
//! - The stream is the text tokenized *without* special tokens, with BOS put in front:
//!   `stream = [BOS] + encode(text)` (as llama-perplexity tokenizes with `add_bos`). Token-id input
//!   is used as given.
//! - Windows of `ctx` tokens start at `0, stride, 2*stride, ...`: window `k` is
//!   `stream[k*stride .. min(k*stride + ctx, n)]`; the last one may be shorter, and there is no
//!   window after the one that reaches the end of the stream (so no token is left out at the tail).
//! - The first token of every window is replaced by BOS (a no-op for the first window), exactly as
//!   llama-perplexity does, so each window reads like the start of a document. Without a BOS id
//!   windows are fed as they are.
//! - The logits at window position `j` predict `stream[start + j + 1]`. A window scores only the
//!   targets no earlier window scored: `stream[max(prev_end, start + 1) .. end]` where `prev_end` is
//!   the end of the previous window (HF guide: with `stride < ctx` the first `ctx - stride` tokens
//!   of a window are context only and the last `stride` are scored). Every stream token after the
//!   first is scored at most once.
//! - With `stride == ctx` (the default, non-overlapping windows) the token replaced by BOS at the
//!   start of each window after the first is scored by no window (it is neither a target of the
//!   previous window nor seen by the next): `n - 1 - (windows - 1)` tokens are scored. This is what
//!   llama-perplexity and the HF guide do at `stride == ctx`.
//! - NLL of a target = `logsumexp(logits) - logits[target]`, from the f32 logits of the engine,
//!   summed in f64. `PPL = exp(sum NLL / count)`.
//!
//! llama-perplexity additionally scores only the second half of each window; with `stride = ctx/2`
//! this module scores the same targets it does except that each window here also sees the preceding
//! half as context, which is the HF guide's (more accurate) choice.

use crate::error::{Error, Result};
use crate::model::{Logits, Model, SeqChunk};

/// How to cut the stream and how many tokens one forward step takes.
#[derive(Debug, Clone, Copy)]
pub struct PerplexityOptions {
    /// Tokens per window (BOS included), at most the model's `max_position_embeddings`.
    pub ctx: usize,
    /// How far each window starts after the previous one, `1..=ctx`.
    pub stride: usize,
    /// Written over the first token of every window; None leaves windows as they are.
    pub bos: Option<u32>,
    /// Largest number of tokens fed in one forward step (bounds the logits buffer:
    /// `batch_tokens x vocab` f32). 0 means `ctx`.
    pub batch_tokens: usize,
}

/// One window over the stream: tokens `start..end` are fed (the first replaced by BOS); targets
/// `score_from..end` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub end: usize,
    pub score_from: usize,
}

impl Window {
    /// Targets this window scores.
    pub fn scored(&self) -> usize {
        self.end - self.score_from
    }
}

/// The running (or final) result.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NllSum {
    /// Sum of the negative log-likelihoods (natural log) of the scored targets.
    pub nll: f64,
    /// Sum of their squares (for the standard error).
    pub nll_sq: f64,
    /// Number of scored targets.
    pub count: usize,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens fed through the model (context and scored, BOS included).
    pub tokens_evaluated: usize,
}

impl NllSum {
    /// Mean NLL per scored token (nats).
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.count.max(1) as f64
    }
    /// `exp(mean NLL)`.
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }
    /// Standard error of the PPL estimate, `PPL * stddev(NLL) / sqrt(count - 1)` (first-order, as
    /// llama-perplexity prints it); 0 with fewer than 2 targets.
    pub fn ppl_std_err(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = (self.nll_sq / n - mean * mean).max(0.0);
        self.ppl() * (var / (n - 1.0)).sqrt()
    }
}

/// Checks `ctx` and `stride` against each other and a model context of `max_ctx` positions.
pub fn check_options(ctx: usize, stride: usize, max_ctx: usize) -> Result<()> {
    if ctx < 2 {
        return Err(Error::input(format!(
            "ctx must be at least 2 (got {ctx}): a window needs a token and its successor"
        )));
    }
    if ctx > max_ctx {
        return Err(Error::input(format!(
            "ctx {ctx} exceeds the model's context of {max_ctx} tokens (max_position_embeddings)"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(Error::input(format!("stride must be between 1 and ctx ({ctx}); got {stride}")));
    }
    Ok(())
}

/// The windows over a stream of `n` tokens (see the module docs). Errors on bad sizes and on a
/// stream of fewer than 2 tokens (nothing to score).
pub fn windows(n: usize, ctx: usize, stride: usize) -> Result<Vec<Window>> {
    check_options(ctx, stride, usize::MAX)?;
    if n < 2 {
        return Err(Error::input(format!(
            "{n} token(s): perplexity needs at least 2 tokens (a token and its successor)"
        )));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut start = 0;
    loop {
        let end = (start + ctx).min(n);
        let score_from = prev_end.max(start + 1);
        if score_from < end {
            out.push(Window { start, end, score_from });
        }
        prev_end = end;
        if end == n {
            break;
        }
        start += stride;
    }
    Ok(out)
}

/// `-log softmax(logits)[target]`, in f64.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// Evaluates every window of `tokens` (the whole stream, BOS included: see the module docs).
/// `on_window` is called after each window with the running sum. Validates everything first.
pub fn evaluate(
    model: &Model,
    tokens: &[u32],
    opts: &PerplexityOptions,
    on_window: &mut dyn FnMut(&NllSum),
) -> Result<NllSum> {
    let step = if opts.batch_tokens == 0 { opts.ctx } else { opts.batch_tokens.min(opts.ctx) };
    let mut cache = model.new_cache(opts.ctx, 1, 16);
    let mut s = model.new_scratch(step, step, opts.ctx);
    let mut seq = cache.new_seq();
    // The window's tokens go in steps of `step`; positions before `first` give context only.
    let mut score = |fed: &[u32], first: usize, row: &mut dyn FnMut(usize, &[f32])| -> Result<()> {
        cache.release(&mut seq);
        let mut j = 0;
        while j < fed.len() {
            let (k, logits) = if j < first {
                ((j + step).min(first), Logits::None)
            } else {
                ((j + step).min(fed.len()), Logits::All)
            };
            let rows =
                model.forward(&mut cache, &mut s, &mut [SeqChunk { seq: &mut seq, tokens: &fed[j..k], logits }])?;
            if logits == Logits::All {
                debug_assert_eq!(rows, k - j);
                for r in 0..rows {
                    row(j + r, s.logits(r));
                }
            }
            j = k;
        }
        Ok(())
    };
    evaluate_with(&model.cfg, tokens, opts, &mut score, on_window)
}

/// Runs a window's tokens `fed` from an empty cache and calls `row(j, logits)` for every
/// position `j >= first` (in any order): `score(fed, first, row)`.
pub type WindowScorer<'a> = dyn FnMut(&[u32], usize, &mut dyn FnMut(usize, &[f32])) -> Result<()> + 'a;

/// [`evaluate`] for any model, through its [`WindowScorer`].
pub fn evaluate_with(
    cfg: &crate::config::ModelConfig,
    tokens: &[u32],
    opts: &PerplexityOptions,
    score: &mut WindowScorer<'_>,
    on_window: &mut dyn FnMut(&NllSum),
) -> Result<NllSum> {
    check_options(opts.ctx, opts.stride, cfg.max_position_embeddings)?;
    let wins = windows(tokens.len(), opts.ctx, opts.stride)?;
    if let Some((i, &bad)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab_size) {
        return Err(Error::input(format!(
            "token id {bad} at position {i} is out of range (vocab size {})",
            cfg.vocab_size
        )));
    }
    if let Some(b) = opts.bos.filter(|&b| b as usize >= cfg.vocab_size) {
        return Err(Error::input(format!("BOS id {b} is out of range (vocab size {})", cfg.vocab_size)));
    }
    let mut buf: Vec<u32> = Vec::with_capacity(opts.ctx);
    let mut acc = NllSum::default();
    for w in &wins {
        buf.clear();
        buf.extend_from_slice(&tokens[w.start..w.end]);
        if let Some(b) = opts.bos {
            buf[0] = b;
        }
        // Position j predicts stream[start + j + 1]; positions before `first` only give context,
        // and the last token of the window predicts nothing here, so it is not fed.
        let first = w.score_from - w.start - 1;
        let fed = w.end - w.start - 1;
        score(&buf[..fed], first, &mut |j, logits| {
            let x = nll_of(logits, tokens[w.start + j + 1]);
            acc.nll += x;
            acc.nll_sq += x * x;
            acc.count += 1;
        })?;
        acc.windows += 1;
        acc.tokens_evaluated += fed;
        on_window(&acc);
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;
    use crate::weights::random::{preset_config, RandomSource};

    #[test]
    fn windows_non_overlapping() {
        let w = windows(10, 4, 4).unwrap();
        assert_eq!(
            w,
            vec![
                Window { start: 0, end: 4, score_from: 1 },
                Window { start: 4, end: 8, score_from: 5 },
                Window { start: 8, end: 10, score_from: 9 },
            ]
        );
        assert_eq!(w.iter().map(Window::scored).sum::<usize>(), 10 - 1 - 2);
        // A tail of one token scores nothing: no window for it.
        assert_eq!(windows(9, 4, 4).unwrap().len(), 2);
        assert_eq!(windows(2, 4, 4).unwrap(), vec![Window { start: 0, end: 2, score_from: 1 }]);
    }

    #[test]
    fn windows_strided_score_each_target_once() {
        for (n, ctx, stride) in [(10, 4, 2), (11, 4, 3), (100, 16, 5), (7, 8, 1), (64, 8, 1)] {
            let w = windows(n, ctx, stride).unwrap();
            let mut seen = vec![0; n];
            for x in &w {
                assert!(x.end - x.start <= ctx && x.score_from > x.start);
                for c in &mut seen[x.score_from..x.end] {
                    *c += 1;
                }
            }
            assert_eq!(seen[0], 0);
            assert!(seen[1..].iter().all(|&c| c == 1), "{n} {ctx} {stride}: {seen:?}");
            assert_eq!(w.last().unwrap().end, n);
        }
        let w = windows(10, 4, 2).unwrap();
        assert_eq!(w[1], Window { start: 2, end: 6, score_from: 4 });
    }

    #[test]
    fn bad_options() {
        assert!(windows(10, 4, 0).unwrap_err().to_string().contains("stride"));
        assert!(windows(10, 4, 5).unwrap_err().to_string().contains("stride"));
        assert!(windows(10, 1, 1).unwrap_err().to_string().contains("ctx"));
        assert!(windows(1, 4, 4).unwrap_err().to_string().contains("at least 2 tokens"));
        assert!(check_options(300, 300, 256).unwrap_err().to_string().contains("exceeds"));
    }

    #[test]
    fn nll_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for t in 0..3 {
            let want = -((l[t] as f64).exp() / z).ln();
            assert!((nll_of(&l, t as u32) - want).abs() < 1e-12);
        }
        // Large logits do not overflow.
        assert!((nll_of(&[1000.0, 1000.0], 0) - 2f64.ln()).abs() < 1e-12);
    }

    fn tiny_model() -> Model {
        let hf = preset_config("tiny").unwrap();
        let cfg = hf.resolve().unwrap();
        let src = RandomSource::new(cfg.clone(), 7);
        Model::load(&src, cfg, &LoadOptions { threads: 2, ..Default::default() }).unwrap()
    }

    /// Independent computation: each window in one prefill with all logits.
    fn naive(m: &Model, toks: &[u32], ctx: usize, stride: usize, bos: u32) -> (f64, usize) {
        let (mut nll, mut n) = (0.0, 0);
        for w in windows(toks.len(), ctx, stride).unwrap() {
            let mut ids = toks[w.start..w.end].to_vec();
            ids[0] = bos;
            let mut cache = m.new_cache(ids.len(), 1, 16);
            let mut s = m.new_scratch(ids.len(), ids.len(), ids.len());
            let mut seq = cache.new_seq();
            m.prefill(&mut cache, &mut s, &mut seq, &ids, true).unwrap();
            for (i, &t) in toks.iter().enumerate().take(w.end).skip(w.score_from) {
                nll += nll_of(s.logits(i - w.start - 1), t);
                n += 1;
            }
        }
        (nll, n)
    }

    #[test]
    fn evaluate_matches_naive_windows_and_any_batch() {
        let m = tiny_model();
        let toks: Vec<u32> = (0..100u32).map(|i| (i * 7919 + 13) % 600).collect();
        for (ctx, stride) in [(32, 32), (32, 12), (16, 3)] {
            let (want, n) = naive(&m, &toks, ctx, stride, 0);
            for batch in [0, 1, 7] {
                let mut calls = 0;
                let opts = PerplexityOptions { ctx, stride, bos: Some(0), batch_tokens: batch };
                let got = evaluate(&m, &toks, &opts, &mut |_| calls += 1).unwrap();
                assert_eq!(got.count, n);
                assert_eq!(calls, got.windows);
                let rel = (got.nll - want).abs() / want;
                assert!(rel < 1e-6, "ctx {ctx} stride {stride} batch {batch}: {} vs {want}", got.nll);
            }
        }
    }

    #[test]
    fn evaluate_rejects_bad_input() {
        let m = tiny_model();
        let opts = PerplexityOptions { ctx: 16, stride: 16, bos: Some(0), batch_tokens: 0 };
        let e = evaluate(&m, &[1, 2, 640], &opts, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = evaluate(&m, &[1], &opts, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("at least 2"), "{e}");
        let big = PerplexityOptions { ctx: 513, stride: 1, ..opts };
        let e = evaluate(&m, &[1, 2, 3], &big, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }
}
