//! `bitnet logits`: one prefill pass, every position's logits to a float32 .npy.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::common::{parse_token_ids, ModelArgs};

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
