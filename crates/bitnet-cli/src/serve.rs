//! `bitnet serve`: the OpenAI-compatible server (bitnet-server) with continuous batching.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitnet_server::{human_bytes, parse_size, ServerConfig};
use clap::Args;

use crate::common::{Device, Loaded, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback unless told otherwise)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Most sequences decoded together in one step
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// KV cache size, e.g. 2GiB or 512MiB (default: --max-batch full contexts, at most 4 GiB,
    /// at least one context)
    #[arg(long)]
    kv_memory: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 routes (the BITNET_API_KEY variable does the same)
    #[arg(long)]
    api_key: Option<String>,
    /// The model id clients send (default: the --model spec)
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait for a slot; past it, 429 with Retry-After
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Most prompt tokens prefilled per step (running decodes share the step)
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// Do not reuse the K/V of prompt prefixes seen before (CPU)
    #[arg(long)]
    no_prefix_cache: bool,
    /// Prompt lookup: feed up to N draft tokens per step (over the running requests, oldest
    /// first) from an earlier occurrence of a request's last tokens; each is checked against the
    /// token sampled there, so the output is the same token for token, and a request gets
    /// several tokens from one step where its text repeats its context. At most 16; CPU only
    #[arg(long, value_name = "N", default_value_t = 0)]
    prompt_lookup: usize,
    /// Positions per KV cache block (a multiple of 16)
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Largest request body accepted, e.g. 4MiB
    #[arg(long, default_value = "4MiB")]
    body_limit: String,
    /// Seconds running generations get to finish after SIGINT/SIGTERM before they are cancelled
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
    /// No per-request log lines
    #[arg(long)]
    quiet: bool,
}

pub fn run(mut a: ServeArgs) -> Result<()> {
    if a.max_batch > 1 {
        a.model.workload = bitnet_cpu::Workload::Batches;
    }
    let host: IpAddr = match a.host.as_str() {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        h => h.parse().with_context(|| format!("--host {h:?} is not an IP address"))?,
    };
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        bail!("--shutdown-grace must be a number of seconds >= 0");
    }
    let kv_memory = a.kv_memory.as_deref().map(parse_size).transpose().context("--kv-memory")?;
    let body_limit = parse_size(&a.body_limit).context("--body-limit")? as usize;
    let api_key = a.api_key.clone().or_else(|| std::env::var("BITNET_API_KEY").ok()).filter(|k| !k.is_empty());
    let server_cfg = |ctx: usize| ServerConfig {
        addr: SocketAddr::new(host, a.port),
        model_id: a.served_model_name.clone(),
        max_batch: a.max_batch,
        ctx: Some(ctx),
        kv_memory,
        block_size: a.block_size,
        prefill_chunk: a.prefill_chunk,
        prompt_lookup: a.prompt_lookup,
        prefix_cache: !a.no_prefix_cache,
        max_queue: a.max_queue,
        api_key: api_key.clone(),
        body_limit,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        log_requests: !a.quiet,
        ..ServerConfig::default()
    };
    let keyed = api_key.is_some();
    let on_bound = |s: &bitnet_server::Server| {
        let p = s.kv_plan();
        eprintln!(
            "kv cache: {} blocks of {} positions ({} tokens, {}), context {} | max batch {} | api key {}",
            p.n_blocks,
            p.block_size,
            p.positions(),
            human_bytes(p.bytes()),
            p.ctx,
            a.max_batch,
            if keyed { "required" } else { "off" }
        );
        // The address line is what scripts wait for.
        println!("listening on http://{} (model id {:?})", s.local_addr(), s.model_id());
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    match a.model.device()? {
        Device::Cpu => {
            let engine = a.model.load(true)?;
            let ctx = a.model.ctx(&engine)?;
            eprintln!("model {} | {}", engine.name, engine.model.describe());
            bitnet_server::run_until_signal(engine, server_cfg(ctx), on_bound)?;
        }
        Device::Cuda => {
            if a.prompt_lookup > 0 {
                // (its steps of several tokens are not yet shown to match its decode steps bit for bit)
                eprintln!("note: --prompt-lookup is CPU only; the GPU server decodes without drafts");
            }
            if a.max_batch > bitnet_cuda::MAX_BATCH {
                bail!(
                    "--max-batch {} exceeds the CUDA backend's largest batch ({})",
                    a.max_batch,
                    bitnet_cuda::MAX_BATCH
                );
            }
            let kv = a.model.plan()?.kv_cache;
            let mut sized = None;
            let engine = a.model.load_cuda(true, |cfg| {
                // the KV pool is sized before the model is built: it is allocated with it
                let scfg = server_cfg(a.model.ctx_of(cfg)?);
                let plan = bitnet_server::kv_plan(cfg, kv, &scfg)?;
                sized = Some((scfg, plan));
                Ok(bitnet_cuda::CudaOptions {
                    max_seqs: a.max_batch,
                    max_ctx: plan.ctx,
                    block_size: plan.block_size,
                    kv_blocks: Some(plan.n_blocks),
                    prefill_chunk: a.prefill_chunk,
                    max_logit_rows: a.max_batch,
                    ..Default::default()
                })
            })?;
            let Some((scfg, plan)) = sized else { bail!("internal: the KV plan was not made") };
            let loaded = Loaded::cuda(engine, plan.ctx);
            eprintln!("model {} | {}", loaded.engine.name, loaded.note);
            bitnet_server::run_model_until_signal(loaded.engine, loaded.model, plan, scfg, on_bound)?;
        }
    }
    eprintln!("server stopped");
    Ok(())
}
