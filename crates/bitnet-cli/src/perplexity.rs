//! `bitnet perplexity`: perplexity of a text file (or a token-id file) in windows of `--ctx`
//! tokens, like llama-perplexity. The windowing and scoring convention is documented in
//! `bitnet_core::perplexity` (BOS at the start of every window, each target scored once).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitnet_core::engine::Engine;
use bitnet_core::perplexity::{check_options, evaluate, evaluate_with, windows, NllSum, PerplexityOptions};
use clap::{ArgGroup, Args};

use crate::common::{Device, ModelArgs};

/// Window size when `--ctx` is not given (llama-perplexity's default), capped by the model.
const DEFAULT_CTX: usize = 512;
/// Largest forward step when `--batch-tokens` is not given.
const DEFAULT_BATCH: usize = 512;

#[derive(Args)]
#[command(
    group(ArgGroup::new("input").required(true).args(["file", "token_ids_file"])),
    after_help = "--ctx is the window size here: default 512 (or the model's context when smaller), BOS included.\n\
                  Convention: stream = [BOS] + tokens of the text; windows of --ctx tokens every --stride tokens, the\n\
                  first token of each replaced by BOS (as llama-perplexity does); each window scores only the targets\n\
                  no earlier window scored; NLL from log-softmax of the logits, PPL = exp(mean NLL)."
)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to evaluate (UTF-8). Tokenized without special tokens, BOS put in front.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Token ids to evaluate instead of text, separated by whitespace and/or commas (for models
    /// without a tokenizer). The stream is used as given (put BOS first yourself); the first token
    /// of every window is still replaced by BOS unless --no-bos
    #[arg(long, value_name = "FILE")]
    token_ids_file: Option<PathBuf>,
    /// How far each window starts after the previous one (default: --ctx, non-overlapping).
    /// With a smaller stride each window scores only its last tokens, the rest is context.
    #[arg(long)]
    stride: Option<usize>,
    /// Largest number of tokens per forward step (bounds the logits buffer to N x vocab floats)
    #[arg(long, value_name = "N")]
    batch_tokens: Option<usize>,
    /// Do not put BOS at the start of the stream and of every window
    #[arg(long)]
    no_bos: bool,
    /// Print one JSON object on stdout (the human-readable summary goes to stderr)
    #[arg(long)]
    json: bool,
}

fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--file {}: cannot read it", path.display()))?;
    if text.trim().is_empty() {
        bail!("--file {}: the file is empty (nothing to evaluate)", path.display());
    }
    Ok(text)
}

fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-ids-file {}: cannot read it", path.display()))?;
    let ids = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().with_context(|| format!("--token-ids-file {}: {t:?} is not a token id", path.display()))
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("--token-ids-file {}: no token ids in the file", path.display());
    }
    Ok(ids)
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    // Everything that does not need the model is checked before loading it.
    if a.stride == Some(0) {
        bail!("--stride must be at least 1");
    }
    if let (Some(c), Some(s)) = (a.model.ctx, a.stride) {
        if s > c {
            bail!("--stride {s} is larger than --ctx {c} (tokens would be skipped)");
        }
    }
    if a.model.ctx.is_some_and(|c| c < 2) {
        bail!("--ctx must be at least 2 for perplexity");
    }
    if a.batch_tokens == Some(0) {
        bail!("--batch-tokens must be at least 1");
    }
    let text = a.file.as_deref().map(read_text).transpose()?;
    let ids = a.token_ids_file.as_deref().map(read_ids).transpose()?;
    let window_ctx = |max: usize| -> Result<usize> {
        match a.model.ctx {
            Some(c) if c > max => {
                bail!("--ctx {c} exceeds the model's context of {max} tokens (max_position_embeddings)")
            }
            Some(c) => Ok(c),
            None => Ok(DEFAULT_CTX.min(max)),
        }
    };
    match a.model.device()? {
        Device::Cpu => {
            let engine = a.model.load(!a.json)?;
            let m = &engine.model;
            let ctx = window_ctx(m.cfg.max_position_embeddings)?;
            let desc = (m.format().to_string(), m.plan.name.to_string(), m.kernel().name().to_string(), m.threads());
            let max = m.cfg.max_position_embeddings;
            score(&a, &engine, text, ids, ctx, max, desc, &mut |tokens, opts, on_window| {
                Ok(evaluate(m, tokens, opts, on_window)?)
            })
        }
        Device::Cuda => {
            let mut ctx = 0;
            let engine = a.model.load_cuda(!a.json, |cfg| {
                ctx = window_ctx(cfg.max_position_embeddings)?;
                // a window's tokens in one step, with the logits of every position
                Ok(bitnet_cuda::CudaOptions {
                    max_seqs: 1,
                    max_ctx: ctx,
                    prefill_chunk: ctx,
                    max_logit_rows: ctx,
                    ..Default::default()
                })
            })?;
            let (mut model, meta) = engine.map(|m| (m, ()));
            let m = &mut model;
            let max = m.cfg.max_position_embeddings;
            let desc = (m.format().to_string(), m.options().plan.name.to_string(), m.device_name(), 1);
            let cfg = m.cfg.clone();
            let v = cfg.vocab_size;
            let mut seq = m.new_seq().map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut window =
                |fed: &[u32], first: usize, row: &mut dyn FnMut(usize, &[f32])| -> bitnet_core::Result<()> {
                    m.reset_seq(&mut seq);
                    let l = m.prefill_all_logits(&mut seq, fed).map_err(bitnet_cuda::batch::core_error)?;
                    for j in first..fed.len() {
                        row(j, &l[j * v..(j + 1) * v]);
                    }
                    Ok(())
                };
            score(&a, &meta, text, ids, ctx, max, desc, &mut |tokens, opts, on_window| {
                Ok(evaluate_with(&cfg, tokens, opts, &mut window, on_window)?)
            })
        }
    }
}

type Evaluate<'a> = dyn FnMut(&[u32], &PerplexityOptions, &mut dyn FnMut(&NllSum)) -> Result<NllSum> + 'a;

/// Tokenizes, cuts windows, runs `eval` with a progress bar and prints the result.
/// `desc`: (format, plan, kernel or device, threads).
#[allow(clippy::too_many_arguments)]
fn score<M>(
    a: &PerplexityArgs,
    engine: &Engine<M>,
    text: Option<String>,
    ids: Option<Vec<u32>>,
    ctx: usize,
    max: usize,
    desc: (String, String, String, usize),
    eval: &mut Evaluate<'_>,
) -> Result<()> {
    let stride = a.stride.unwrap_or(ctx);
    if stride > ctx {
        bail!("--stride {stride} is larger than --ctx {ctx} (tokens would be skipped)");
    }
    check_options(ctx, stride, max)?;
    let batch = a.batch_tokens.unwrap_or(DEFAULT_BATCH).min(ctx);

    let bos = if a.no_bos {
        None
    } else {
        engine.bos_id.or_else(|| engine.tokenizer.as_ref().and_then(|t| t.bos_token_id()))
    };
    let (stream, source) = match (text, ids) {
        (Some(text), _) => {
            let tok = engine.tokenizer().context("use --token-ids-file for a model without a tokenizer")?;
            let mut s: Vec<u32> = bos.into_iter().collect();
            s.extend(tok.encode(&text, false)?);
            (s, a.file.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
        }
        (None, Some(ids)) => (ids, a.token_ids_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
        (None, None) => unreachable!("clap requires --file or --token-ids-file"),
    };
    let wins = windows(stream.len(), ctx, stride)
        .with_context(|| format!("{source}: {} token(s) after tokenization", stream.len()))?;
    let total: usize = wins.iter().map(|w| w.scored()).sum();

    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("perplexity [{bar:40}] {pos}/{len} tokens {elapsed} (eta {eta}) {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let opts = PerplexityOptions { ctx, stride, bos, batch_tokens: batch };
    let t0 = Instant::now();
    let mut window_nll = Vec::with_capacity(wins.len());
    let mut prev = 0.0;
    let r = eval(&stream, &opts, &mut |acc| {
        window_nll.push(acc.nll - prev);
        prev = acc.nll;
        bar.set_position(acc.count as u64);
        bar.set_message(format!("PPL {:.4}", acc.ppl()));
    })?;
    let secs = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let tok_s = r.tokens_evaluated as f64 / secs.max(1e-9);
    let summary = format!(
        "model {} | format {} | plan {} | kernel {} | threads {}\n\
         {source}: {} tokens (BOS {}), ctx {ctx}, stride {stride}, {} windows, batch {batch}\n\
         PPL = {:.4} +/- {:.4} (mean NLL {:.6} nats) over {} scored tokens\n\
         {} tokens evaluated in {secs:.2} s: {tok_s:.1} tok/s",
        engine.name,
        desc.0,
        desc.1,
        desc.2,
        desc.3,
        stream.len(),
        bos.map_or("none".to_string(), |b| b.to_string()),
        r.windows,
        r.ppl(),
        r.ppl_std_err(),
        r.mean_nll(),
        r.count,
        r.tokens_evaluated,
    );
    if a.json {
        eprintln!("{summary}");
        let j = serde_json::json!({
            "model": engine.name,
            "format": desc.0,
            "plan": desc.1,
            "kernel": desc.2,
            "threads": desc.3,
            "input": source,
            "n_tokens": stream.len(),
            "bos": bos,
            "ctx": ctx,
            "stride": stride,
            "batch_tokens": batch,
            "windows": r.windows,
            "tokens_scored": r.count,
            "tokens_evaluated": r.tokens_evaluated,
            "nll_sum": r.nll,
            "mean_nll": r.mean_nll(),
            "ppl": r.ppl(),
            "ppl_std_err": r.ppl_std_err(),
            "seconds": secs,
            "tokens_per_s": tok_s,
            "window_nll": window_nll,
        });
        println!("{j}");
    } else {
        println!("{summary}");
    }
    Ok(())
}
