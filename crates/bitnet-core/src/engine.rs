//! Everything a command needs from a `--model` spec: the model, its tokenizer and chat template
//! (when the files have them), and generation defaults. Specs: a local folder (safetensors), a
//! local `.gguf` file, a hub repo id (`owner/name`, or `owner/name:file.gguf`), or `random:<preset>`.

use std::path::Path;

use bitnet_cpu::KernelLevel;

use crate::chat::ChatTemplate;
use crate::config::{HfConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::generation_config::GenerationConfig;
use crate::gguf::GgufSource;
use crate::hub::{resolve_model, HubOptions, ModelLocation};
use crate::model::{LoadOptions, Model};
use crate::precision::PrecisionPlan;
use crate::tokenizer::Tokenizer;
use crate::weights::random::{preset_config, RandomSource};
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::WeightSource;

/// How to load.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub threads: usize,
    pub kernel: KernelLevel,
    pub plan: PrecisionPlan,
    /// Progress bars for download and load (on stderr).
    pub progress: bool,
    pub hub: HubOptions,
    /// Seed of `random:` models.
    pub random_seed: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let l = LoadOptions::default();
        EngineOptions {
            threads: l.threads,
            kernel: l.kernel,
            plan: l.plan,
            progress: false,
            hub: HubOptions::from_env(),
            random_seed: 0,
        }
    }
}

/// A loaded model with what surrounds it. `M` is the model: the CPU [`Model`] by default, a GPU
/// model ([`Engine::load_with`]), or just its [`ModelMeta`] once the model itself has moved
/// elsewhere ([`Engine::split`]: a server's worker thread owns the model, request handlers
/// keep the tokenizer).
pub struct Engine<M = Model> {
    pub model: M,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
    /// Every id that ends generation (generation_config.json's list, else config.json's).
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    /// What `--model` named, for messages and the server's model id.
    pub name: String,
}

/// What a request handler needs of a model that lives elsewhere.
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub cfg: ModelConfig,
    pub plan: PrecisionPlan,
}

impl Engine {
    /// Resolves and loads `spec` on the CPU.
    pub fn load(spec: &str, opts: &EngineOptions) -> Result<Engine> {
        let lo = LoadOptions { threads: opts.threads, kernel: opts.kernel, plan: opts.plan, progress: opts.progress };
        Self::load_with(spec, opts, |src, cfg| Model::load(src, cfg, &lo))
    }

    /// The model moves out (to a worker); the rest stays, with the model's config and plan.
    pub fn split(self) -> (Model, Engine<ModelMeta>) {
        let meta = ModelMeta { cfg: self.model.cfg.clone(), plan: self.model.plan };
        self.map(|m| (m, meta))
    }
}

impl<M> Engine<M> {
    /// Resolves `spec` and builds its model with `build` from the weights and the resolved
    /// config (the CPU's `Model::load`, or a GPU backend's), plus the tokenizer, chat template,
    /// generation defaults and special ids of the files.
    pub fn load_with(
        spec: &str,
        opts: &EngineOptions,
        build: impl FnOnce(&dyn WeightSource, ModelConfig) -> Result<M>,
    ) -> Result<Engine<M>> {
        if let Some(preset) = spec.strip_prefix("random:") {
            let hf = preset_config(preset)?;
            let cfg = hf.resolve()?;
            let src = RandomSource::new(cfg.clone(), opts.random_seed);
            let model = build(&src, cfg)?;
            return Ok(Engine {
                model,
                tokenizer: None,
                chat_template: None,
                generation: GenerationConfig::default(),
                eos_ids: hf.eos_token_id.clone().unwrap_or_default(),
                bos_id: hf.bos_token_id,
                name: spec.to_string(),
            });
        }
        let hub = HubOptions { progress: opts.progress, ..opts.hub.clone() };
        match resolve_model(spec, &hub)? {
            ModelLocation::Dir(dir) => Self::load_dir(&dir, spec, build),
            ModelLocation::GgufFile(path) => Self::load_gguf(&path, spec, build),
        }
    }

    /// Replaces the model by `f`'s second value, returning its first.
    pub fn map<T, N>(self, f: impl FnOnce(M) -> (T, N)) -> (T, Engine<N>) {
        let Engine { model, tokenizer, chat_template, generation, eos_ids, bos_id, name } = self;
        let (t, model) = f(model);
        (t, Engine { model, tokenizer, chat_template, generation, eos_ids, bos_id, name })
    }

    fn load_dir(
        dir: &Path,
        spec: &str,
        build: impl FnOnce(&dyn WeightSource, ModelConfig) -> Result<M>,
    ) -> Result<Engine<M>> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::format(dir, "no config.json in this model folder"));
        }
        let hf = HfConfig::from_file(&cfg_path)?;
        let cfg = hf.resolve()?;
        let src = SafetensorsSource::open(dir, &cfg)?;
        let model = build(&src, cfg)?;
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let chat_template =
            if tokenizer.is_some() { Some(ChatTemplate::from_model_dir_or_default(dir)?) } else { None };
        let generation = GenerationConfig::from_model_dir(dir)?.unwrap_or_default();
        let mut eos_ids = generation.eos_token_ids().to_vec();
        if eos_ids.is_empty() {
            eos_ids = hf.eos_token_id.clone().unwrap_or_default();
        }
        let bos_id = generation.bos_token_id.or(hf.bos_token_id);
        Ok(Engine { model, tokenizer, chat_template, generation, eos_ids, bos_id, name: spec.to_string() })
    }

    fn load_gguf(
        path: &Path,
        spec: &str,
        build: impl FnOnce(&dyn WeightSource, ModelConfig) -> Result<M>,
    ) -> Result<Engine<M>> {
        let src = GgufSource::open(path)?;
        let cfg = src.model_config().clone();
        let model = build(&src, cfg)?;
        let tokenizer = match (src.tokenizer_tokens(), src.tokenizer_merges()) {
            (Some(tokens), Some(merges)) => {
                let types = src.tokenizer_token_types().unwrap_or_default();
                Some(Tokenizer::from_parts(
                    tokens.to_vec(),
                    merges.to_vec(),
                    &types,
                    src.bos_token_id(),
                    src.eos_token_id(),
                    src.add_bos_token().unwrap_or(true),
                )?)
            }
            _ => None,
        };
        let chat_template = tokenizer.as_ref().map(|t| {
            ChatTemplate::from_gguf_template(
                src.chat_template(),
                t.bos_token().unwrap_or("<|begin_of_text|>"),
                t.eos_token().unwrap_or("<|eot_id|>"),
            )
        });
        // bitnet.cpp writes `<|eot_id|>` as eos; `<|end_of_text|>` ends a text too.
        let mut eos_ids: Vec<u32> = [src.eos_token_id(), src.eot_token_id()].into_iter().flatten().collect();
        if let Some(t) = &tokenizer {
            for name in ["<|end_of_text|>", "<|eot_id|>"] {
                if let Some(id) = t.token_to_id(name) {
                    eos_ids.push(id);
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Engine {
            model,
            tokenizer,
            chat_template,
            generation: GenerationConfig::default(),
            eos_ids,
            bos_id: src.bos_token_id(),
            name: spec.to_string(),
        })
    }

    /// The tokenizer, or an error saying the model has none (token-id commands still work).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!("model {} has no tokenizer (tokenizer.json); pass token ids instead", self.name))
        })
    }
}
