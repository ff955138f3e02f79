//! Options shared by every command that loads a model.

use anyhow::{bail, Context, Result};
use bitnet_core::engine::{Engine, EngineOptions};
use bitnet_core::hub::HubOptions;
use bitnet_core::model::default_threads;
use bitnet_core::precision::PrecisionPlan;
use bitnet_cpu::KernelLevel;
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
    /// Precision plan: exact (matches transformers float32) or fast
    #[arg(long, default_value = "exact")]
    pub plan: String,
    /// Force a kernel level (generic, avx2, avxvnni, avx512vnni); default: the best this CPU has.
    /// The BITNET_KERNEL environment variable does the same.
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
}

/// The kernel level: `--kernel`, else `BITNET_KERNEL`, else detection. Asking for a level this
/// CPU cannot run is an error.
pub fn kernel_level(flag: Option<&str>) -> Result<KernelLevel> {
    let env = std::env::var("BITNET_KERNEL").ok();
    let Some(name) = flag.or(env.as_deref()) else {
        return Ok(KernelLevel::detect());
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
            // CPU until the other commands run on the GPU too; bench opts in with --device cuda.
            "auto" => Ok(Device::Cpu),
            other => bail!("unknown --device {other:?} (expected cpu, cuda or auto)"),
        }
    }

    pub fn engine_options(&self, progress: bool) -> Result<EngineOptions> {
        match self.device()? {
            Device::Cpu => {}
            Device::Cuda => bail!(
                "--device cuda: this command runs on the CPU only for now; `bitnet bench --device cuda --model random:<preset>` uses the GPU"
            ),
        }
        let threads = self.threads.unwrap_or_else(default_threads);
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        Ok(EngineOptions {
            threads,
            kernel: kernel_level(self.kernel.as_deref())?,
            plan: PrecisionPlan::from_name(&self.plan)?,
            progress,
            hub: HubOptions::from_env().with_revision(self.revision.clone()),
            random_seed: self.weights_seed,
        })
    }

    pub fn load(&self, progress: bool) -> Result<Engine> {
        let opts = self.engine_options(progress)?;
        Ok(Engine::load(&self.model, &opts)?)
    }

    /// The context to allocate: `--ctx` (checked against the model) or the model's own.
    pub fn ctx(&self, engine: &Engine) -> Result<usize> {
        let max = engine.model.cfg.max_position_embeddings;
        match self.ctx {
            Some(0) => bail!("--ctx must be at least 1"),
            Some(c) if c > max => {
                bail!("--ctx {c} exceeds the model's max_position_embeddings ({max})")
            }
            Some(c) => Ok(c),
            None => Ok(max),
        }
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
