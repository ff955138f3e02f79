//! bitnet-server: an OpenAI-compatible HTTP server with continuous batching.
//!
//! One scheduler thread ([`scheduler`]) owns the model's KV cache (a pool of fixed-size blocks,
//! one block table per sequence), the step scratch and every sequence, and runs one
//! `Model::forward` per step over the decode tokens of all running sequences plus at most one
//! prefill chunk. HTTP handlers (axum on tokio) validate requests ([`api`]), submit them over a
//! channel and receive tokens over a per-request channel, detokenize them and match stop strings
//! ([`text`]), and answer as JSON or SSE ([`http`]).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text).
//!
//! ```no_run
//! # async fn demo(engine: bitnet_core::engine::Engine) -> anyhow::Result<()> {
//! use bitnet_server::{Server, ServerConfig};
//! let cfg = ServerConfig { addr: "127.0.0.1:0".parse()?, ..ServerConfig::default() };
//! let server = Server::bind(engine, cfg).await?;
//! println!("listening on {}", server.local_addr());
//! server.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod error;
pub mod http;
pub mod metrics;
pub mod scheduler;
pub mod text;
pub mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bitnet_core::batch::{BatchModel, CpuBatch};
use bitnet_core::config::ModelConfig;
use bitnet_core::engine::{Engine, ModelMeta};
use bitnet_core::precision::KvPrecision;
use bitnet_core::sampler::SamplingParams;

use crate::metrics::Metrics;
use crate::scheduler::{SchedulerConfig, SchedulerHandle};

/// Default KV budget when `kv_memory` is not given: enough for `max_batch` full contexts, but
/// at most this much (and at least one full context). Pages are touched only when used.
pub const DEFAULT_KV_CAP: u64 = 4 << 30;

/// Everything the server can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (loopback by default). Port 0 picks a free port ([`Server::local_addr`]).
    pub addr: SocketAddr,
    /// The id clients name in `model` (default: what the engine was loaded from).
    pub model_id: Option<String>,
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Context of one sequence (default and maximum: the model's max_position_embeddings).
    pub ctx: Option<usize>,
    /// Bytes of KV cache (default: see [`DEFAULT_KV_CAP`]).
    pub kv_memory: Option<u64>,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most prompt tokens prefilled in one step (running decodes share that step).
    pub prefill_chunk: usize,
    /// Reuse the K/V of full blocks whose tokens a new prompt starts with (a shared system
    /// prompt, earlier chat turns); for models that have one (CPU and CUDA).
    pub prefix_cache: bool,
    /// Most requests waiting for admission; past it, 429 with Retry-After.
    pub max_queue: usize,
    /// Prompt lookup: draft tokens per step, over the decoding sequences (0: off, at most
    /// [`bitnet_core::generate::MAX_DRAFT`]); the output does not change (`scheduler.rs`). CPU
    /// only: a model whose logits depend on the batch (the GPU's) ignores it.
    pub prompt_lookup: usize,
    /// Seconds in the Retry-After header of a 429.
    pub retry_after_s: u64,
    /// Required as `Authorization: Bearer KEY` on /v1 routes when set.
    pub api_key: Option<String>,
    /// Largest request body in bytes (413 past it).
    pub body_limit: usize,
    /// On shutdown, running generations get this long to finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// One log line per request on stderr.
    pub log_requests: bool,
    /// Test hooks: a sleep after every step, and the `bitnet_fail_after` request field.
    #[doc(hidden)]
    pub debug_step_delay: Duration,
    #[doc(hidden)]
    pub debug_faults: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model_id: None,
            max_batch: 32,
            ctx: None,
            kv_memory: None,
            block_size: 16,
            prefill_chunk: 256,
            prefix_cache: true,
            max_queue: 256,
            prompt_lookup: 0,
            retry_after_s: 1,
            api_key: None,
            body_limit: 4 << 20,
            shutdown_grace: Duration::from_secs(10),
            log_requests: false,
            debug_step_delay: Duration::ZERO,
            debug_faults: false,
        }
    }
}

/// Parses a byte size: `2GiB`, `512MiB`, `1.5GB`, `4096` (bytes), `800k`. Binary (KiB/MiB/GiB,
/// and K/M/G alone) and decimal (KB/MB/GB) units.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 =
        num.parse().with_context(|| format!("size {s:?}: expected a number with an optional unit (e.g. 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => bail!("size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, KB, MB or GB)"),
    };
    if !v.is_finite() || v < 0.0 {
        bail!("size {s:?} is not a valid size");
    }
    Ok((v * mult) as u64)
}

/// How the KV cache is laid out for a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPlan {
    pub ctx: usize,
    pub block_size: usize,
    pub n_blocks: usize,
    pub bytes_per_block: u64,
}

impl KvPlan {
    /// Positions the pool holds.
    pub fn positions(&self) -> usize {
        self.n_blocks * self.block_size
    }
    pub fn bytes(&self) -> u64 {
        self.n_blocks as u64 * self.bytes_per_block
    }
}

/// Sizes the KV pool of model `m` (caching at `kv`) from `--kv-memory` (or the default) and the
/// context. Fails when the pool would not hold one full context.
pub fn kv_plan(m: &ModelConfig, kv: KvPrecision, cfg: &ServerConfig) -> Result<KvPlan> {
    let max = m.max_position_embeddings;
    let ctx = match cfg.ctx {
        Some(0) => bail!("the context must be at least 1 token"),
        Some(c) if c > max => {
            bail!("context {c} exceeds the model's max_position_embeddings ({max})")
        }
        Some(c) => c,
        None => max,
    };
    if ctx < 2 {
        bail!("the context must be at least 2 tokens (one prompt token and one to generate)");
    }
    // (`is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.85)
    #[allow(clippy::manual_is_multiple_of)]
    if cfg.block_size == 0 || cfg.block_size % bitnet_core::kv_cache::BLOCK_MULTIPLE != 0 {
        bail!(
            "the KV block size must be a positive multiple of {} (got {})",
            bitnet_core::kv_cache::BLOCK_MULTIPLE,
            cfg.block_size
        );
    }
    if cfg.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if cfg.prefill_chunk == 0 {
        bail!("the prefill chunk must be at least 1 token");
    }
    if cfg.prompt_lookup > bitnet_core::generate::MAX_DRAFT {
        bail!(
            "--prompt-lookup {}: at most {} draft tokens per step",
            cfg.prompt_lookup,
            bitnet_core::generate::MAX_DRAFT
        );
    }
    // K and V rows of every kv head of every layer
    let row = kv.row_bytes(m.head_dim) as u64;
    let bytes_per_block = 2 * m.num_layers as u64 * cfg.block_size as u64 * m.num_kv_heads as u64 * row;
    let per_ctx = ctx.div_ceil(cfg.block_size);
    let n_blocks = match cfg.kv_memory {
        Some(b) => (b / bytes_per_block) as usize,
        None => {
            let cap = (DEFAULT_KV_CAP / bytes_per_block) as usize;
            (cfg.max_batch * per_ctx).min(cap.max(per_ctx))
        }
    };
    if n_blocks < per_ctx {
        bail!(
            "a KV cache of {} holds {} tokens, less than one context of {ctx} tokens ({} needed at {} bytes per token): raise --kv-memory or lower --ctx",
            human_bytes(n_blocks as u64 * bytes_per_block),
            n_blocks * cfg.block_size,
            human_bytes(per_ctx as u64 * bytes_per_block),
            bytes_per_block / cfg.block_size as u64
        );
    }
    Ok(KvPlan { ctx, block_size: cfg.block_size, n_blocks, bytes_per_block })
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// What the handlers share.
pub struct AppState {
    /// tokenizer, template, defaults (the model itself lives in the scheduler)
    pub engine: Arc<Engine<ModelMeta>>,
    pub sched: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub model_id: String,
    pub ctx: usize,
    pub api_key: Option<String>,
    pub next_id: AtomicU64,
    pub created: u64,
    pub shutting_down: AtomicBool,
    pub log: bool,
    /// Sampling defaults from the model's generation_config.json.
    pub defaults: SamplingParams,
    pub debug_faults: bool,
    /// the model computes every prompt position's logits on request (`echo` with `logprobs`)
    pub all_logits: bool,
    pub body_limit: usize,
    pub retry_after_s: u64,
    /// JSON mode's token trie, built by the first request that asks for it
    json_vocab: std::sync::OnceLock<Arc<bitnet_core::json_mode::JsonVocab>>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    shutdown_grace: Duration,
}

impl AppState {
    /// JSON mode's vocabulary (None without a tokenizer); built once (~0.1 s for 128K tokens).
    pub fn json_vocab(&self) -> Option<Arc<bitnet_core::json_mode::JsonVocab>> {
        let tok = self.engine.tokenizer.as_ref()?;
        Some(self.json_vocab.get_or_init(|| Arc::new(bitnet_core::json_mode::JsonVocab::new(tok))).clone())
    }

    /// Stops taking requests; running ones get the grace period.
    pub fn begin_shutdown(&self) {
        if !self.shutting_down.swap(true, Ordering::SeqCst) {
            self.sched.shutdown(self.shutdown_grace);
            let _ = self.shutdown_tx.send(true);
        }
    }
}

/// A bound server, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    addr: SocketAddr,
    plan: KvPlan,
}

impl Server {
    /// Sizes the KV cache, starts the scheduler thread with the CPU model and binds `cfg.addr`.
    pub async fn bind(engine: Engine, cfg: ServerConfig) -> Result<Server> {
        let listener =
            tokio::net::TcpListener::bind(cfg.addr).await.with_context(|| format!("cannot listen on {}", cfg.addr))?;
        Self::from_listener(listener, engine, cfg)
    }

    /// Same, on a listener the caller bound.
    pub fn from_listener(listener: tokio::net::TcpListener, engine: Engine, cfg: ServerConfig) -> Result<Server> {
        let (model, meta, plan) = cpu_parts(engine, &cfg)?;
        Self::from_parts(listener, meta, model, plan, cfg)
    }

    /// Binds `cfg.addr` and serves `model` (any [`BatchModel`], e.g. the GPU's, whose KV pool
    /// was sized with [`kv_plan`] as `plan`); `meta` holds its tokenizer and defaults.
    pub async fn bind_model(
        meta: Engine<ModelMeta>,
        model: Box<dyn BatchModel>,
        plan: KvPlan,
        cfg: ServerConfig,
    ) -> Result<Server> {
        let listener =
            tokio::net::TcpListener::bind(cfg.addr).await.with_context(|| format!("cannot listen on {}", cfg.addr))?;
        Self::from_parts(listener, meta, model, plan, cfg)
    }

    fn from_parts(
        listener: tokio::net::TcpListener,
        meta: Engine<ModelMeta>,
        mut model: Box<dyn BatchModel>,
        plan: KvPlan,
        cfg: ServerConfig,
    ) -> Result<Server> {
        let addr = listener.local_addr()?;
        if cfg.prefix_cache {
            model.enable_prefix_cache();
        }
        let engine = Arc::new(meta);
        let all_logits = model.supports_all_logits();
        let metrics = Arc::new(Metrics::new());
        let sched = SchedulerHandle::start(
            model,
            engine.eos_ids.clone(),
            SchedulerConfig {
                max_batch: cfg.max_batch,
                prefill_chunk: cfg.prefill_chunk,
                max_queue: cfg.max_queue,
                ctx: plan.ctx,
                n_blocks: plan.n_blocks,
                block_size: plan.block_size,
                step_delay: cfg.debug_step_delay,
                prompt_lookup: cfg.prompt_lookup,
            },
            metrics.clone(),
        )
        .context("cannot start the scheduler")?;
        let mut defaults = SamplingParams::from_generation_config(&engine.generation);
        if defaults.validate().is_err() {
            defaults = SamplingParams::default();
        }
        let (shutdown_tx, _) = tokio::sync::watch::channel(false);
        let state = Arc::new(AppState {
            model_id: cfg.model_id.clone().unwrap_or_else(|| engine.name.clone()),
            engine,
            sched,
            metrics,
            ctx: plan.ctx,
            api_key: cfg.api_key.clone().filter(|k| !k.is_empty()),
            next_id: AtomicU64::new(1),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            shutting_down: AtomicBool::new(false),
            log: cfg.log_requests,
            defaults,
            debug_faults: cfg.debug_faults,
            all_logits,
            body_limit: cfg.body_limit,
            retry_after_s: cfg.retry_after_s,
            json_vocab: std::sync::OnceLock::new(),
            shutdown_tx,
            shutdown_grace: cfg.shutdown_grace,
        });
        Ok(Server { listener, state, addr, plan })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kv_plan(&self) -> KvPlan {
        self.plan
    }

    /// The model id clients use.
    pub fn model_id(&self) -> &str {
        &self.state.model_id
    }

    /// Serves until `shutdown` completes, then stops taking requests, lets running generations
    /// finish within the grace period (cancelling the rest), and stops the scheduler.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let st = self.state.clone();
        let signal = {
            let st = st.clone();
            async move {
                shutdown.await;
                st.begin_shutdown();
            }
        };
        let app = http::router(st.clone());
        // Token events are small writes: no Nagle delay.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app).with_graceful_shutdown(signal);
        let mut down = st.shutdown_tx.subscribe();
        let hard_limit = st.shutdown_grace + Duration::from_secs(5);
        let res = tokio::select! {
            r = serve => r.map_err(anyhow::Error::from),
            _ = async move {
                let _ = down.wait_for(|v| *v).await;
                tokio::time::sleep(hard_limit).await;
            } => Ok(()),
        };
        st.begin_shutdown();
        let st2 = st.clone();
        let _ = tokio::task::spawn_blocking(move || st2.sched.join()).await;
        res
    }
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    engine: Engine,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    Server::bind(engine, cfg).await?.run(shutdown).await
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits the process at once.
pub async fn shutdown_signal() {
    wait_signal().await;
    eprintln!("shutting down: no new requests; running generations get the grace period (signal again to quit now)");
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The CPU model as a [`BatchModel`] with the KV pool `cfg` asks for, and what stays with the
/// request handlers.
fn cpu_parts(engine: Engine, cfg: &ServerConfig) -> Result<(Box<dyn BatchModel>, Engine<ModelMeta>, KvPlan)> {
    let plan = kv_plan(&engine.model.cfg, engine.model.plan.kv_cache, cfg)?;
    let (model, meta) = engine.split();
    let batch = CpuBatch::new(
        model,
        plan.n_blocks,
        plan.block_size,
        plan.ctx,
        cfg.max_batch,
        // a step: a token per sequence, a prefill chunk, and drafts
        cfg.max_batch + cfg.prefill_chunk + cfg.prompt_lookup,
    );
    Ok((Box::new(batch), meta, plan))
}

/// For the command line: builds a tokio runtime, binds, prints where it listens, and serves until
/// SIGINT/SIGTERM. `on_bound` sees the server once it is bound (to print the address).
pub fn run_until_signal(engine: Engine, cfg: ServerConfig, on_bound: impl FnOnce(&Server)) -> Result<()> {
    let (model, meta, plan) = cpu_parts(engine, &cfg)?;
    run_model_until_signal(meta, model, plan, cfg, on_bound)
}

/// [`run_until_signal`] for any [`BatchModel`] (see [`Server::bind_model`]).
pub fn run_model_until_signal(
    meta: Engine<ModelMeta>,
    model: Box<dyn BatchModel>,
    plan: KvPlan,
    cfg: ServerConfig,
    on_bound: impl FnOnce(&Server),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bitnet-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind_model(meta, model, plan, cfg).await?;
        on_bound(&server);
        server.run(shutdown_signal()).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
