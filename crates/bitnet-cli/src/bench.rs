//! `bitnet bench`: prefill and decode speed with warm-up and repetitions, achieved GB/s (bytes
//! read per step, weights and K/V, x steps/s), peak RSS, plan, kernel level and threads.

use std::time::Instant;

use anyhow::{bail, Result};
use bitnet_core::model::{Logits, SeqChunk};
use clap::Args;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens to prefill
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens to decode per sequence
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Sequences decoded together (each at its own position)
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measured repetitions (after one warm-up)
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print a JSON object as the last line
    #[arg(long)]
    json: bool,
}

/// Peak RSS (the load included), MB.
fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// A `/proc/self/status` size field in MB (0 where unavailable).
fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Peak read bandwidth of this machine with `threads` threads, measured now (the roofline for
/// decode): each thread sums its own contiguous half of a 1 GiB buffer; best of 3 passes. The
/// buffer is on huge pages where the OS allows, as the weights are (`bitnet_cpu::mem`): on the
/// development VM that read 4-20% faster than small pages (back-to-back pairs, 1 and 2 threads).
fn read_bandwidth_gb_s(threads: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let mut buf = bitnet_cpu::mem::advised(vec![0u64; BYTES / 8]);
    buf.fill(1);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = buf
                .chunks(buf.len().div_ceil(threads.max(1)))
                .map(|c| {
                    sc.spawn(move || {
                        // 8 independent sums so the loop is load-bound, not add-latency-bound.
                        let mut acc = [0u64; 8];
                        for w in c.chunks_exact(8) {
                            for k in 0..8 {
                                acc[k] = acc[k].wrapping_add(w[k]);
                            }
                        }
                        acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, |a, b| a.wrapping_add(b))
        });
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

pub fn run(mut a: BenchArgs) -> Result<()> {
    if a.batch > 1 {
        a.model.workload = bitnet_cpu::Workload::Batches;
    }
    if a.prompt == 0 || a.gen == 0 || a.batch == 0 || a.reps == 0 {
        bail!("--prompt, --gen, --batch and --reps must be at least 1");
    }
    if a.model.device()? == crate::common::Device::Cuda {
        return run_cuda(&a);
    }
    let engine = a.model.load(!a.json)?;
    let m = &engine.model;
    let ctx = a.prompt + a.gen + 1;
    if ctx > m.cfg.max_position_embeddings {
        bail!("--prompt + --gen ({ctx}) exceeds the model's context of {}", m.cfg.max_position_embeddings);
    }
    let chunk = a.prompt.min(512);
    let mut cache = m.new_cache(ctx, a.batch, 16);
    let mut s = m.new_scratch(chunk.max(a.batch), a.batch, ctx);
    let mut seqs: Vec<_> = (0..a.batch).map(|_| cache.new_seq()).collect();
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut rand_tok = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m.cfg.vocab_size as u64) as u32
    };
    let prompts: Vec<Vec<u32>> = (0..a.batch).map(|_| (0..a.prompt).map(|_| rand_tok()).collect()).collect();
    // Bytes a decode step reads: the weights once, and each sequence's K/V up to its position
    // (attention reads every cached position; at 2048 positions of 2B-4T that is 157 MB at f16
    // beside 0.52-1.07 GB of weights), at the mean position of the timed steps.
    let weights = m.bytes_per_token() as f64;
    let kv_per_pos = cache.nbytes() as f64 / (cache.n_blocks() * cache.block_size()) as f64;
    let mean_ctx = a.prompt as f64 + (a.gen as f64 + 1.0) / 2.0;
    let kv = kv_per_pos * mean_ctx * a.batch as f64;
    let bytes = weights + kv;

    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for rep in 0..=a.reps {
        for seq in seqs.iter_mut() {
            cache.release(seq);
        }
        // Prefill: sequence 0 timed (one prompt, chunks of up to 512); the others filled untimed.
        let t0 = Instant::now();
        m.prefill(&mut cache, &mut s, &mut seqs[0], &prompts[0], false)?;
        let t_pre = t0.elapsed().as_secs_f64();
        let mut next = vec![argmax(s.logits(0)); a.batch];
        for b in 1..a.batch {
            m.prefill(&mut cache, &mut s, &mut seqs[b], &prompts[b], false)?;
            next[b] = argmax(s.logits(0));
        }
        // Decode: every step feeds one token per sequence, all sequences in one forward.
        let t1 = Instant::now();
        for _ in 0..a.gen {
            let mut chunks: Vec<SeqChunk> = seqs
                .iter_mut()
                .zip(&next)
                .map(|(seq, t)| SeqChunk { seq, tokens: std::slice::from_ref(t), logits: Logits::Last })
                .collect();
            m.forward(&mut cache, &mut s, &mut chunks)?;
            drop(chunks);
            for (b, t) in next.iter_mut().enumerate() {
                *t = argmax(s.logits(b));
            }
        }
        let t_dec = t1.elapsed().as_secs_f64();
        if rep > 0 {
            pre.push(a.prompt as f64 / t_pre);
            dec.push(a.gen as f64 / t_dec);
        }
    }
    // Peak RSS of the model run, read before the bandwidth probe allocates its 1 GiB buffer.
    let (rss, rss_now) = (peak_rss_mb(), status_mb("VmRSS:"));
    let bw = read_bandwidth_gb_s(m.threads());
    let (pre_m, pre_sd) = stats(&pre);
    let (dec_m, dec_sd) = stats(&dec);
    let gbs = bytes * dec_m / 1e9;
    println!("model {} | {}", engine.name, m.describe());
    println!(
        "read per decode step: {:.3} GB of weights (LM head {}) + {:.3} GB of K/V ({} x {mean_ctx:.0} positions on average)",
        weights / 1e9,
        m.lm_head_storage(),
        kv / 1e9,
        a.batch
    );
    println!("prefill {} tokens: {pre_m:.1} ± {pre_sd:.1} tok/s", a.prompt);
    println!(
        "decode {} tokens x batch {}: {dec_m:.2} ± {dec_sd:.2} tok/s per sequence, {:.1} tok/s total, {gbs:.1} GB/s",
        a.gen,
        a.batch,
        dec_m * a.batch as f64
    );
    println!(
        "read bandwidth measured now with {} threads: {bw:.1} GB/s; decode reaches {:.0}% of it ({:.1} tok/s at the roofline)",
        m.threads(),
        100.0 * gbs / bw,
        bw * 1e9 / bytes * a.batch as f64
    );
    println!("peak RSS {rss:.0} MB, {rss_now:.0} MB after the runs ({} reps after 1 warm-up)", a.reps);
    if a.json {
        let j = serde_json::json!({
            "model": engine.name,
            "prefill_tok_s": pre_m,
            "prefill_tok_s_sd": pre_sd,
            "decode_tok_s_per_seq": dec_m,
            "decode_tok_s_per_seq_sd": dec_sd,
            "decode_tok_s_total": dec_m * a.batch as f64,
            "decode_gb_s": gbs,
            "read_bandwidth_gb_s": bw,
            "bytes_per_token": weights,
            "kv_bytes_per_step": kv,
            "peak_rss_mb": rss,
            "rss_mb": rss_now,
            "plan": m.plan.name,
            "kernel": m.kernel().name(),
            "threads": m.threads(),
            "prompt": a.prompt,
            "gen": a.gen,
            "batch": a.batch,
            "reps": a.reps,
        });
        println!("{j}");
    }
    Ok(())
}

/// `bitnet bench --device cuda --model random:<preset>`: the CUDA backend's benchmark (decode at the
/// given batch, prefill of `--prompt` tokens, GB/s against a copy-bandwidth probe of the same run).
fn run_cuda(a: &BenchArgs) -> Result<()> {
    let Some(preset) = a.model.model.strip_prefix("random:") else {
        bail!("--device cuda: bench runs on random:<preset> models for now (got {})", a.model.model)
    };
    let o = bitnet_cuda::bench::BenchOptions {
        preset: preset.to_string(),
        seed: a.model.weights_seed,
        batches: vec![a.batch],
        prompt: a.prompt.min(512),
        gen: a.gen,
        prefill: a.prompt,
        reps: a.reps,
        plan: a.model.plan()?,
        ..Default::default()
    };
    let report = bitnet_cuda::bench::run(&o, &mut |s| eprintln!("{s}")).map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{report}");
    Ok(())
}
