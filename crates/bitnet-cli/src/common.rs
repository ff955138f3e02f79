//! Options shared by every command that loads a model.

use anyhow::{bail, Context, Result};
use bitnet_core::batch::{BatchModel, CpuBatch};
use bitnet_core::config::ModelConfig;
use bitnet_core::engine::{Engine, EngineOptions, ModelMeta};
use bitnet_core::hub::HubOptions;
use bitnet_core::model::default_threads;
use bitnet_core::precision::{KvPrecision, PrecisionPlan};
use bitnet_cpu::{KernelLevel, Workload};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local folder (safetensors), a .gguf file, a Hugging Face repo id (owner/name, or
    /// owner/name:file.gguf), or random:<preset> (2b-4t, large, 3b, tiny)
    #[arg(short, long)]
    pub model: String,
    /// Compute threads (default: the number of physical cores)
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Precision plan: exact (matches transformers float32), fast (int8 LM head, f16 KV), int8
    /// (fast with the LM head on int8 activations too: for batches), int4 (a 4-bit LM head on
    /// int8 activations) or int2 (a 2-bit head that only ranks the vocabulary: the fewest bytes per
    /// token, the largest error outside the top logits); the quantized heads' top 64 logits (int2:
    /// 256) are recomputed exactly
    #[arg(long, default_value = "exact")]
    pub plan: String,
    /// KV cache element type, overriding the plan's: f32, f16 or int8 (codes with an f32 scale
    /// per 32 values, as llama.cpp's q8_0 cache: 56% of f16's bytes, for long contexts and many
    /// sequences; CPU only). The plan's name then says so (for example `int2+kv-int8`)
    #[arg(long)]
    pub kv_cache: Option<String>,
    /// Force a kernel level (generic, avx2, avxvnni, avx512vnni, avx512vbmi, amx, amxvbmi);
    /// default: the best this CPU has (amxvbmi on Xeons with AMX; avx512vbmi, 1.6-bit weights,
    /// when 2+ threads decode one sequence at a time, else avx512vnni (2-bit) where it would be
    /// avx512vbmi: one thread, `serve`, `bench --batch` > 1). The BITNET_KERNEL environment
    /// variable does the same.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Context length (default: the model's max_position_embeddings)
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Compute device: cpu, cuda or auto
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed of random:<preset> weights
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Hub revision (branch, tag or commit) for repo ids
    #[arg(long)]
    pub revision: Option<String>,
    /// What the command runs (not a flag: set by the command), for the default kernel level.
    #[arg(skip)]
    pub workload: Workload,
}

/// The kernel level: `--kernel`, else `BITNET_KERNEL`, else the best for `workload` on
/// `threads` threads. Asking for a level this CPU cannot run is an error.
pub fn kernel_level(flag: Option<&str>, workload: Workload, threads: usize) -> Result<KernelLevel> {
    let env = std::env::var("BITNET_KERNEL").ok();
    let Some(name) = flag.or(env.as_deref()) else {
        return Ok(KernelLevel::default_for(workload, threads));
    };
    let level = KernelLevel::from_name(name).with_context(|| {
        format!(
            "unknown kernel level {name:?} (this CPU can run: {})",
            KernelLevel::available().iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
        )
    })?;
    if !KernelLevel::available().contains(&level) {
        bail!("kernel level {name} is not supported by this CPU");
    }
    Ok(level)
}

/// Where a command computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl ModelArgs {
    /// `--device`: `cuda` must find a driver and a GPU (a clear error otherwise); `auto` picks CUDA
    /// only when this build has the backend and a GPU is present.
    pub fn device(&self) -> Result<Device> {
        let built = cfg!(feature = "cuda");
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" if !built => {
                bail!("--device cuda: this build of bitnet has no CUDA backend (build with --features cuda)")
            }
            "cuda" => match bitnet_cuda::cuda_available() {
                Ok(()) => Ok(Device::Cuda),
                Err(e) => bail!("--device cuda: no usable CUDA device: {e}"),
            },
            "auto" if built && bitnet_cuda::cuda_available().is_ok() => Ok(Device::Cuda),
            "auto" => Ok(Device::Cpu),
            other => bail!("unknown --device {other:?} (expected cpu, cuda or auto)"),
        }
    }

    pub fn engine_options(&self, progress: bool) -> Result<EngineOptions> {
        let threads = self.threads.unwrap_or_else(default_threads);
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        Ok(EngineOptions {
            threads,
            kernel: kernel_level(self.kernel.as_deref(), self.workload, threads)?,
            plan: self.plan()?,
            progress,
            hub: HubOptions::from_env().with_revision(self.revision.clone()),
            random_seed: self.weights_seed,
        })
    }

    /// `--plan`, with `--kv-cache`'s element type if given.
    pub fn plan(&self) -> Result<PrecisionPlan> {
        let plan = PrecisionPlan::from_name(&self.plan)?;
        Ok(match self.kv_cache.as_deref() {
            None => plan,
            Some(name) => plan.with_kv_cache(KvPrecision::from_name(name)?),
        })
    }

    /// Loads on the CPU (whatever `--device` says: for commands that compute there).
    pub fn load(&self, progress: bool) -> Result<Engine> {
        let opts = self.engine_options(progress)?;
        Ok(Engine::load(&self.model, &opts)?)
    }

    /// The context to allocate: `--ctx` (checked against the model) or the model's own.
    pub fn ctx(&self, engine: &Engine) -> Result<usize> {
        self.ctx_of(&engine.model.cfg)
    }

    /// `--ctx` checked against the model's config, or the model's own.
    pub fn ctx_of(&self, cfg: &ModelConfig) -> Result<usize> {
        let max = cfg.max_position_embeddings;
        match self.ctx {
            Some(0) => bail!("--ctx must be at least 1"),
            Some(c) if c > max => bail!("--ctx {c} exceeds the model's max_position_embeddings ({max})"),
            Some(c) => Ok(c),
            None => Ok(max),
        }
    }

    /// Loads on the GPU: `opts(config)` gives the CUDA options once the model's config is known
    /// (the plan is `--plan`'s).
    pub fn load_cuda(
        &self,
        progress: bool,
        opts: impl FnOnce(&ModelConfig) -> Result<bitnet_cuda::CudaOptions>,
    ) -> Result<Engine<bitnet_cuda::CudaModel>> {
        let eo = self.engine_options(progress)?;
        let mut err = None;
        let r = Engine::load_with(&self.model, &eo, |src, cfg| {
            let mut o = match opts(&cfg) {
                Ok(o) => o,
                Err(e) => {
                    let msg = e.to_string();
                    err = Some(e);
                    return Err(bitnet_core::Error::InvalidInput(msg));
                }
            };
            o.plan = eo.plan;
            bitnet_cuda::CudaModel::load(src, cfg, &o).map_err(bitnet_cuda::batch::core_error)
        });
        match (r, err) {
            (Ok(e), _) => Ok(e),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }

    /// Loads on `--device` as a model that holds its own KV cache: `max_seqs` sequences of
    /// `--ctx` positions (or the model's), prompts fed `prefill_chunk` tokens per step.
    /// Returns it with its surroundings and the context.
    pub fn load_batch(&self, progress: bool, max_seqs: usize, prefill_chunk: usize) -> Result<Loaded> {
        match self.device()? {
            Device::Cpu => {
                let engine = self.load(progress)?;
                let ctx = self.ctx_of(&engine.model.cfg)?;
                let note = format!("cpu | {}", engine.model.describe());
                let (model, meta) = engine.split();
                let bs = 16;
                let batch = CpuBatch::new(model, max_seqs * ctx.div_ceil(bs), bs, ctx, max_seqs, prefill_chunk);
                Ok(Loaded { engine: meta, model: Box::new(batch), ctx, note })
            }
            Device::Cuda => {
                let mut ctx = 0;
                let engine = self.load_cuda(progress, |cfg| {
                    ctx = self.ctx_of(cfg)?;
                    Ok(bitnet_cuda::CudaOptions {
                        max_seqs,
                        max_ctx: ctx,
                        prefill_chunk,
                        max_logit_rows: max_seqs.max(1),
                        ..Default::default()
                    })
                })?;
                Ok(Loaded::cuda(engine, ctx))
            }
        }
    }
}

/// A model loaded on its device as a [`BatchModel`], with its tokenizer and defaults.
pub struct Loaded {
    pub engine: Engine<ModelMeta>,
    pub model: Box<dyn BatchModel>,
    pub ctx: usize,
    /// where and how it computes, for the timings line
    pub note: String,
}

impl Loaded {
    pub fn cuda(engine: Engine<bitnet_cuda::CudaModel>, ctx: usize) -> Loaded {
        let meta = ModelMeta { cfg: engine.model.cfg.clone(), plan: engine.model.options().plan };
        let (batch, engine) = engine.map(|m| (bitnet_cuda::batch::CudaBatch::new(m), meta));
        let note = format!(
            "cuda {} | format {} | plan {} | graphs {} | pdl {}",
            batch.model().device_name(),
            batch.model().format(),
            batch.model().options().plan,
            if batch.model().uses_graphs() { "on" } else { "off" },
            if batch.model().uses_pdl() { "on" } else { "off" }
        );
        Loaded { engine, model: Box::new(batch), ctx, note }
    }
}

/// Parses `500,17,42`.
pub fn parse_token_ids(s: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>> = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--token-ids: {t:?} is not a token id")))
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        bail!("--token-ids is empty");
    }
    Ok(ids)
}
