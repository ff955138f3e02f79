//! `bitnet logits`: one prefill pass, every position's logits to a float32 .npy.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::common::{parse_token_ids, Device, ModelArgs};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids, e.g. 500,17,42
    #[arg(long)]
    token_ids: String,
    /// Output .npy path
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let ids = parse_token_ids(&a.token_ids)?;
    if a.model.device()? == Device::Cuda {
        return run_cuda(&a, &ids);
    }
    let engine = a.model.load(false)?;
    let m = &engine.model;
    let ctx = a.model.ctx(&engine)?;
    if ids.len() > ctx {
        anyhow::bail!("{} token ids exceed the context of {ctx} tokens", ids.len());
    }
    let mut cache = m.new_cache(ids.len(), 1, 16);
    let mut s = m.new_scratch(ids.len(), ids.len(), ids.len());
    let mut seq = cache.new_seq();
    let rows = m.prefill(&mut cache, &mut s, &mut seq, &ids, true)?;
    let v = m.cfg.vocab_size;
    let mut out = Vec::with_capacity(rows * v);
    for r in 0..rows {
        out.extend_from_slice(s.logits(r));
    }
    crate::npy::write_f32(&a.output, &[rows, v], &out)?;
    eprintln!("wrote {} ({rows} x {v} float32, plan {})", a.output.display(), m.plan);
    Ok(())
}

/// The same on the GPU: one prefill step that keeps every position's logits.
fn run_cuda(a: &LogitsArgs, ids: &[u32]) -> Result<()> {
    let n = ids.len();
    let mut engine = a.model.load_cuda(false, |cfg| {
        let ctx = a.model.ctx_of(cfg)?;
        if n > ctx {
            anyhow::bail!("{n} token ids exceed the context of {ctx} tokens");
        }
        Ok(bitnet_cuda::CudaOptions {
            max_seqs: 1,
            max_ctx: n,
            prefill_chunk: n,
            max_logit_rows: n,
            ..Default::default()
        })
    })?;
    let m = &mut engine.model;
    let mut seq = m.new_seq().map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = m.prefill_all_logits(&mut seq, ids).map_err(|e| anyhow::anyhow!("{e}"))?;
    let v = m.cfg.vocab_size;
    crate::npy::write_f32(&a.output, &[n, v], &out)?;
    eprintln!("wrote {} ({n} x {v} float32, plan {}, {})", a.output.display(), m.options().plan, m.device_name());
    Ok(())
}
