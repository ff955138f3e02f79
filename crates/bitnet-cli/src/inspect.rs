//! `bitnet inspect`: what a model is, without building it. Reads config.json and the safetensors
//! headers, or the GGUF header (metadata and tensor infos), or a `random:` preset's config, and
//! computes sizes from them: architecture, tensors by dtype, tokenizer and chat template, the
//! memory the engine will use (weights as repacked for this CPU's kernel, KV cache) and the bytes
//! of weights read per decoded token. Tensor data is never read, except by `--load`, which builds
//! the model to measure the same figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitnet_core::chat::{is_usable_jinja, ChatTemplate, BITNET_CHAT_TEMPLATE};
use bitnet_core::config::{HfConfig, ModelConfig, QuantMode};
use bitnet_core::generation_config::GenerationConfig;
use bitnet_core::gguf::{GgufDType, GgufSource, OUTPUT, TOKEN_EMBD};
use bitnet_core::hub::{resolve_model, ModelLocation};
use bitnet_core::precision::{KvPrecision, LmHeadPrecision, PrecisionPlan};
use bitnet_core::tokenizer::Tokenizer;
use bitnet_core::weights::random::preset_config;
use bitnet_core::weights::safetensors::SafetensorsSource;
use bitnet_core::weights::WeightSource;
use bitnet_cpu::{KernelLevel, TernaryMatrix};
use clap::Args;
use serde_json::{json, Value};

use crate::common::ModelArgs;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object instead of the text report
    #[arg(long)]
    json: bool,
    /// Also build the model (reads and repacks every weight) and report the measured figures
    #[arg(long)]
    load: bool,
}

/// Tensors of a checkpoint file, by dtype.
#[derive(Default)]
struct Tensors {
    count: usize,
    bytes: u64,
    by_dtype: BTreeMap<String, (usize, u64)>,
}

impl Tensors {
    fn add(&mut self, dtype: &str, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
        let e = self.by_dtype.entry(dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    fn to_json(&self) -> Value {
        let by: serde_json::Map<String, Value> =
            self.by_dtype.iter().map(|(k, (n, b))| (k.clone(), json!({ "count": n, "bytes": b }))).collect();
        json!({ "count": self.count, "bytes": self.bytes, "by_dtype": by })
    }
}

/// What `inspect` found, before the memory figures.
struct Found {
    path: Option<PathBuf>,
    /// `safetensors-master`, `safetensors-packed`, `gguf-i2_s`, `gguf` (dense ternary) or `random`
    kind: &'static str,
    /// The loader's own description of the format.
    format: String,
    architecture: String,
    cfg: ModelConfig,
    tensors: Option<Tensors>,
    /// Bytes per element of the embedding / untied LM head as the engine keeps them.
    embed_elem: usize,
    lm_head_elem: Option<usize>,
    tokenizer: Option<Value>,
    chat_template: Option<Value>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    extra: serde_json::Map<String, Value>,
}

fn tokenizer_json(t: &Tokenizer, source: &str) -> Value {
    json!({
        "source": source,
        "vocab_size": t.vocab_size(),
        "bos_id": t.bos_token_id(),
        "bos_token": t.bos_token(),
        "eos_id": t.eos_token_id(),
        "eos_token": t.eos_token(),
        "add_bos": t.add_bos(),
    })
}

fn template_json(t: &ChatTemplate, origin: &str, note: Option<&str>) -> Value {
    json!({
        "origin": origin,
        "is_bitnet_template": t.source() == BITNET_CHAT_TEMPLATE,
        "chars": t.source().len(),
        "note": note,
    })
}

/// Bytes per element of a float tensor as the engine keeps it (F32 stays F32, halves stay halves).
fn elem_bytes(dtype: &str) -> usize {
    match dtype {
        "F16" | "BF16" => 2,
        _ => 4,
    }
}

/// The safetensors files of a model folder (one file, or the shards of the index).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        files.sort_unstable();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if !single.is_file() {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    }
    Ok(vec![single])
}

/// Name -> (dtype, bytes) of one safetensors file, from its header alone.
fn safetensors_header(path: &Path) -> Result<Vec<(String, String, u64)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if n > 100 << 20 || 8 + n > file_len {
        bail!("{}: invalid safetensors header length {n}", path.display());
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).with_context(|| format!("{}: truncated header", path.display()))?;
    let v: Value =
        serde_json::from_slice(&buf).with_context(|| format!("{}: the header is not valid JSON", path.display()))?;
    let obj = v.as_object().with_context(|| format!("{}: the header is not a JSON object", path.display()))?;
    let mut out = Vec::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t.get("dtype").and_then(Value::as_str).unwrap_or("?").to_string();
        let off = t.get("data_offsets").and_then(Value::as_array);
        let bytes = match off.map(|o| o.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).as_deref() {
            Some([a, b]) if b >= a => b - a,
            _ => bail!("{}: tensor {name}: bad data_offsets", path.display()),
        };
        out.push((name.clone(), dtype, bytes));
    }
    Ok(out)
}

fn inspect_dir(dir: &Path) -> Result<Found> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!("{}: no config.json in this model folder", dir.display());
    }
    let hf = HfConfig::from_file(&cfg_path)?;
    let cfg = hf.resolve()?;
    // Opening maps the files and parses their headers; no tensor is read.
    let src = SafetensorsSource::open(dir, &cfg)?;
    let mut tensors = Tensors::default();
    let mut dtypes = BTreeMap::new();
    let files = safetensors_files(dir)?;
    for f in &files {
        for (name, dtype, bytes) in safetensors_header(f)? {
            tensors.add(&dtype, bytes);
            dtypes.insert(name, dtype);
        }
    }
    let embed_elem = dtypes.get("model.embed_tokens.weight").map_or(2, |d| elem_bytes(d));
    let lm_head_elem = (!cfg.tie_word_embeddings).then(|| dtypes.get("lm_head.weight").map_or(2, |d| elem_bytes(d)));
    let kind = match src.quant_mode() {
        QuantMode::Offline => "safetensors-packed",
        QuantMode::Online => "safetensors-master",
    };

    let tok = Tokenizer::from_model_dir(dir)?;
    let chat_template = match &tok {
        None => None,
        Some(_) => {
            let t = ChatTemplate::from_model_dir_or_default(dir)?;
            let tc = dir.join("tokenizer_config.json");
            let in_file = if tc.is_file() {
                ChatTemplate::from_tokenizer_config(&tc)?.is_some()
            } else {
                dir.join("chat_template.jinja").is_file() || dir.join("chat_template.json").is_file()
            };
            Some(if in_file {
                template_json(&t, "file", None)
            } else {
                template_json(&t, "bitnet-default", Some("the folder has no chat template; BitNet's is used"))
            })
        }
    };
    let generation = GenerationConfig::from_model_dir(dir)?.unwrap_or_default();
    let mut eos_ids = generation.eos_token_ids().to_vec();
    if eos_ids.is_empty() {
        eos_ids = hf.eos_token_id.clone().unwrap_or_default();
    }
    let bos_id = generation.bos_token_id.or(hf.bos_token_id);
    let mut extra = serde_json::Map::new();
    extra.insert("files".into(), json!(files.len()));
    if let Some(q) = &hf.quantization_config {
        extra.insert("quantization_config".into(), serde_json::to_value(q)?);
    }
    let architecture = if hf.architectures.is_empty() {
        hf.model_type.clone().unwrap_or_else(|| "?".into())
    } else {
        hf.architectures.join(",")
    };
    Ok(Found {
        path: Some(dir.to_path_buf()),
        kind,
        format: src.format_name(),
        architecture,
        cfg,
        tensors: Some(tensors),
        embed_elem,
        lm_head_elem,
        tokenizer: tok.as_ref().map(|t| tokenizer_json(t, "tokenizer.json")),
        chat_template,
        bos_id,
        eos_ids,
        extra,
    })
}

fn gguf_elem_bytes(d: GgufDType) -> usize {
    match d {
        GgufDType::F16 | GgufDType::BF16 => 2,
        _ => 4, // F32 stays F32, Q8_0 is dequantized to F32
    }
}

fn inspect_gguf(path: &Path) -> Result<Found> {
    // Parses the header (metadata and tensor infos) of the memory-mapped file; no tensor is read.
    let src = GgufSource::open(path)?;
    let cfg = src.model_config().clone();
    let file = src.file();
    let mut tensors = Tensors::default();
    for t in file.tensors() {
        tensors.add(t.dtype.name(), t.n_bytes);
    }
    let embed_elem = file.tensor_info(TOKEN_EMBD).map_or(2, |t| gguf_elem_bytes(t.dtype));
    let lm_head_elem = file.tensor_info(OUTPUT).map(|t| gguf_elem_bytes(t.dtype));
    let kind = if file.tensors().iter().any(|t| t.dtype == GgufDType::I2S) { "gguf-i2_s" } else { "gguf" };

    let tok = match (src.tokenizer_tokens(), src.tokenizer_merges()) {
        (Some(tokens), Some(merges)) => Some(Tokenizer::from_parts(
            tokens.to_vec(),
            merges.to_vec(),
            &src.tokenizer_token_types().unwrap_or_default(),
            src.bos_token_id(),
            src.eos_token_id(),
            src.add_bos_token().unwrap_or(true),
        )?),
        _ => None,
    };
    let chat_template = tok.as_ref().map(|t| {
        let file_t = src.chat_template();
        let tmpl = ChatTemplate::from_gguf_template(
            file_t,
            t.bos_token().unwrap_or("<|begin_of_text|>"),
            t.eos_token().unwrap_or("<|eot_id|>"),
        );
        match file_t {
            Some(s) if is_usable_jinja(s) && tmpl.source() == s => template_json(&tmpl, "file", None),
            Some(s) if s.contains("BITNETAssistant") => template_json(
                &tmpl,
                "bitnet-default",
                Some("the file's template is bitnet.cpp's converter template (Human: ... BITNETAssistant:), not the model's; BitNet's is used"),
            ),
            Some(_) => template_json(&tmpl, "bitnet-default", Some("the file's template is not a usable Jinja chat template; BitNet's is used")),
            None => template_json(&tmpl, "bitnet-default", Some("the file has no chat template; BitNet's is used")),
        }
    });
    // As Engine::load: eos and eot of the metadata, plus the Llama 3 end tokens.
    let mut eos_ids: Vec<u32> = [src.eos_token_id(), src.eot_token_id()].into_iter().flatten().collect();
    if let Some(t) = &tok {
        for name in ["<|end_of_text|>", "<|eot_id|>"] {
            if let Some(id) = t.token_to_id(name) {
                eos_ids.push(id);
            }
        }
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();

    let mut extra = serde_json::Map::new();
    extra.insert("gguf_version".into(), json!(file.version()));
    extra.insert("metadata_keys".into(), json!(file.metadata().len()));
    if let Ok(Some(name)) = file.meta_str("general.name") {
        extra.insert("general_name".into(), json!(name));
    }
    if let Ok(Some(ft)) = file.meta_u64("general.file_type") {
        extra.insert("file_type".into(), json!(ft));
    }
    if let Some(m) = src.tokenizer_model() {
        extra.insert("tokenizer_model".into(), json!(m));
    }
    Ok(Found {
        path: Some(path.to_path_buf()),
        kind,
        format: src.format_name(),
        architecture: src.architecture().to_string(),
        cfg,
        tensors: Some(tensors),
        embed_elem,
        lm_head_elem,
        tokenizer: tok.as_ref().map(|t| tokenizer_json(t, "gguf metadata (tokenizer.ggml.*)")),
        chat_template,
        bos_id: src.bos_token_id(),
        eos_ids,
        extra,
    })
}

fn inspect_random(preset: &str, seed: u64) -> Result<Found> {
    let hf = preset_config(preset)?;
    let cfg = hf.resolve()?;
    let mut extra = serde_json::Map::new();
    extra.insert("preset".into(), json!(preset));
    Ok(Found {
        path: None,
        kind: "random",
        format: format!("random ternary (seed {seed})"),
        architecture: hf.architectures.join(","),
        cfg,
        tensors: None,
        embed_elem: 2,
        lm_head_elem: None,
        tokenizer: None,
        chat_template: None,
        bos_id: hf.bos_token_id,
        eos_ids: hf.eos_token_id.clone().unwrap_or_default(),
        extra,
    })
}

/// Packed bytes of a `rows x cols` ternary matrix for `level`, measured on the real packer (the
/// layout pads rows and columns differently per kernel level).
fn packed_bytes(rows: usize, cols: usize, level: KernelLevel, memo: &mut BTreeMap<(usize, usize), usize>) -> usize {
    *memo.entry((rows, cols)).or_insert_with(|| {
        TernaryMatrix::from_codes(&vec![0i8; rows * cols], rows, cols, vec![1.0; rows], level).nbytes()
    })
}

/// Memory the engine will hold and bytes read per decoded token, as `Model::load` and
/// `Model::bytes_per_token` count them.
fn memory(cfg: &ModelConfig, f: &Found, plan: PrecisionPlan, level: KernelLevel, ctx: usize) -> Value {
    let mut memo = BTreeMap::new();
    let h = cfg.hidden_size;
    let shapes = [
        (cfg.q_dim + 2 * cfg.kv_dim, h), // fused q|k|v
        (h, cfg.q_dim),                  // o
        (2 * cfg.intermediate_size, h),  // fused gate|up
        (h, cfg.intermediate_size),      // down
    ];
    let per_layer: usize = shapes.iter().map(|&(r, c)| packed_bytes(r, c, level, &mut memo)).sum();
    let ternary = per_layer * cfg.num_layers;
    let scales = 4 * cfg.num_layers * shapes.iter().map(|s| s.0).sum::<usize>();
    let norms = 4 * (cfg.num_layers * (2 * h + cfg.q_dim + cfg.intermediate_size) + h);
    let dense = cfg.vocab_size * h;
    let embedding = dense * f.embed_elem;
    let int8_head = dense + 4 * cfg.vocab_size;
    // Model::load keeps the embedding, plus the untied head in its dtype (stored plan, or beside
    // a quantized copy of the head that rescores from it) or the quantized copy alone. A
    // quantized head reads its copy and the stored rows it rescores.
    let quantized = match plan.lm_head {
        LmHeadPrecision::Stored => None,
        LmHeadPrecision::Int8 | LmHeadPrecision::Int8Int8 => Some(int8_head),
        LmHeadPrecision::Int4Int8 => Some(bitnet_cpu::kernels::Int4Matrix::packed_bytes(cfg.vocab_size, h, level)),
        LmHeadPrecision::Int2Int8 => Some(bitnet_cpu::kernels::Int2Matrix::packed_bytes(cfg.vocab_size, h, level)),
    };
    let (lm_head_mem, lm_head_read) = match (quantized, f.lm_head_elem) {
        (None, None) => (0, embedding),
        (None, Some(e)) => (dense * e, dense * e),
        (Some(b), untied) => {
            let rescore = plan.lm_head_rescore.min(cfg.vocab_size);
            let kept = untied.filter(|_| rescore > 0).map_or(0, |e| dense * e);
            (b + kept, b + rescore * h * untied.unwrap_or(f.embed_elem))
        }
    };
    let weights = ternary + scales + norms + embedding + lm_head_mem;
    // K and V rows of every kv head of every layer
    let kv_tok_of = |p: KvPrecision| 2 * cfg.num_layers * cfg.num_kv_heads * p.row_bytes(cfg.head_dim);
    let (kv_tok_f32, kv_tok_f16, kv_tok_int8) =
        (kv_tok_of(KvPrecision::F32), kv_tok_of(KvPrecision::F16), kv_tok_of(KvPrecision::Int8));
    let kv_tok = kv_tok_of(plan.kv_cache);
    json!({
        "plan": plan.name,
        "kernel": level.name(),
        "ternary_packed_bytes": ternary,
        "ternary_scale_bytes": scales,
        "norm_bytes": norms,
        "embedding_bytes": embedding,
        "lm_head_bytes": lm_head_mem,
        "weights_bytes": weights,
        "ctx": ctx,
        "kv_bytes_per_token_f32": kv_tok_f32,
        "kv_bytes_per_token_f16": kv_tok_f16,
        "kv_bytes_per_token_int8": kv_tok_int8,
        "kv_cache_bytes_f32": kv_tok_f32 * ctx,
        "kv_cache_bytes_f16": kv_tok_f16 * ctx,
        "kv_cache_bytes_int8": kv_tok_int8 * ctx,
        "kv_cache_bytes": kv_tok * ctx,
        "total_bytes": weights + kv_tok * ctx,
        "bytes_per_token": ternary + lm_head_read,
    })
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < U.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {} ({b} B)", U[i])
    }
}

/// An f32 config value as the shortest decimal that rounds to it (1e-5, not 9.99999974e-6).
fn short(x: f32) -> f64 {
    x.to_string().parse::<f64>().unwrap_or(x as f64)
}

fn count(x: usize) -> String {
    match x {
        x if x >= 1_000_000_000 => format!("{:.3} B", x as f64 / 1e9),
        x if x >= 1_000_000 => format!("{:.3} M", x as f64 / 1e6),
        x => x.to_string(),
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

pub fn run(a: InspectArgs) -> Result<()> {
    let opts = a.model.engine_options(!a.json)?;
    let spec = a.model.model.as_str();
    let f = if let Some(preset) = spec.strip_prefix("random:") {
        inspect_random(preset, a.model.weights_seed)?
    } else {
        let hub = opts.hub.clone().with_progress(!a.json);
        match resolve_model(spec, &hub)? {
            ModelLocation::Dir(d) => inspect_dir(&d)?,
            ModelLocation::GgufFile(p) => inspect_gguf(&p)?,
        }
    };
    let cfg = f.cfg.clone();
    let ctx = match a.model.ctx {
        Some(0) => bail!("--ctx must be at least 1"),
        Some(c) if c > cfg.max_position_embeddings => {
            bail!("--ctx {c} exceeds the model's max_position_embeddings ({})", cfg.max_position_embeddings)
        }
        Some(c) => c,
        None => cfg.max_position_embeddings,
    };
    let mem = memory(&cfg, &f, opts.plan, opts.kernel, ctx);
    let ternary_params = cfg.ternary_params_per_layer() * cfg.num_layers;
    let dense_params = cfg.vocab_size * cfg.hidden_size * if cfg.tie_word_embeddings { 1 } else { 2 };

    let loaded = if a.load {
        let t0 = Instant::now();
        let e = a.model.load(!a.json)?;
        let secs = t0.elapsed().as_secs_f64();
        Some(json!({
            "format": e.model.format(),
            "bytes_per_token": e.model.bytes_per_token(),
            "lm_head_storage": e.model.lm_head_storage(),
            "kernel": e.model.kernel().name(),
            "threads": e.model.threads(),
            "load_seconds": secs,
        }))
    } else {
        None
    };

    let j = json!({
        "model": spec,
        "path": f.path.as_ref().map(|p| p.display().to_string()),
        "kind": f.kind,
        "format": f.format,
        "architecture": f.architecture,
        "config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rope_theta": short(cfg.rope_theta),
            "rms_norm_eps": short(cfg.rms_norm_eps),
            "tie_word_embeddings": cfg.tie_word_embeddings,
        },
        "parameters": { "ternary": ternary_params, "dense": dense_params },
        "tensors": f.tensors.as_ref().map(Tensors::to_json),
        "tokenizer": f.tokenizer,
        "chat_template": f.chat_template,
        "bos_id": f.bos_id,
        "eos_ids": f.eos_ids,
        "memory": mem,
        "bytes_per_token": mem["bytes_per_token"],
        "loaded": loaded,
        "extra": f.extra,
    });
    if a.json {
        println!("{j}");
        return Ok(());
    }

    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22} {v}\n"));
    line("model", spec.to_string());
    if let Some(p) = &f.path {
        line("path", p.display().to_string());
    }
    line("format", format!("{} [{}]", f.format, f.kind));
    line("architecture", f.architecture.clone());
    line("vocab", cfg.vocab_size.to_string());
    line("hidden / intermediate", format!("{} / {}", cfg.hidden_size, cfg.intermediate_size));
    line("layers", cfg.num_layers.to_string());
    line(
        "heads / kv heads",
        format!("{} / {} (GQA {}), head_dim {}", cfg.num_heads, cfg.num_kv_heads, cfg.gqa_group, cfg.head_dim),
    );
    line("context", cfg.max_position_embeddings.to_string());
    line("rope theta / rms eps", format!("{} / {:e}", cfg.rope_theta, cfg.rms_norm_eps));
    line(
        "embeddings",
        if cfg.tie_word_embeddings { "tied (LM head = embedding)".into() } else { "untied LM head".into() },
    );
    line("parameters", format!("{} ternary + {} dense", count(ternary_params), count(dense_params)));
    match &f.tensors {
        Some(t) => {
            line("tensors", format!("{} in the file(s), {}", t.count, human(t.bytes)));
            for (d, (c, b)) in &t.by_dtype {
                line(&format!("  {d}"), format!("{c} tensors, {}", human(*b)));
            }
        }
        None => line("tensors", "none (weights generated in memory)".into()),
    }
    match &f.tokenizer {
        Some(t) => line(
            "tokenizer",
            format!(
                "{} tokens from {}; bos {} {}, eos {} {}",
                t["vocab_size"],
                t["source"].as_str().unwrap_or("?"),
                t["bos_id"],
                t["bos_token"],
                t["eos_id"],
                t["eos_token"]
            ),
        ),
        None => line("tokenizer", "none (commands take token ids)".into()),
    }
    match &f.chat_template {
        Some(c) => line(
            "chat template",
            match c["origin"].as_str() {
                Some("file") => format!(
                    "from the file{}",
                    if c["is_bitnet_template"] == true { " (BitNet's template)" } else { "" }
                ),
                _ => format!("BitNet fallback: {}", c["note"].as_str().unwrap_or("")),
            },
        ),
        None => line("chat template", "none (no tokenizer)".into()),
    }
    line("bos / eos ids", format!("{:?} / {:?}", f.bos_id, f.eos_ids));
    line("plan / kernel", format!("{} / {}", opts.plan.name, opts.kernel.name()));
    line("weights in memory", human(n(&mem["weights_bytes"])));
    line("  ternary (repacked)", human(n(&mem["ternary_packed_bytes"])));
    line("  embedding", human(n(&mem["embedding_bytes"])));
    if n(&mem["lm_head_bytes"]) > 0 {
        line("  LM head", human(n(&mem["lm_head_bytes"])));
    }
    line(
        "KV cache per token",
        format!(
            "{} at f32, {} at f16",
            human(n(&mem["kv_bytes_per_token_f32"])),
            human(n(&mem["kv_bytes_per_token_f16"]))
        ),
    );
    line(
        &format!("KV cache, ctx {ctx}"),
        format!("{} at f32, {} at f16", human(n(&mem["kv_cache_bytes_f32"])), human(n(&mem["kv_cache_bytes_f16"]))),
    );
    line("total (plan)", human(n(&mem["total_bytes"])));
    line("read per token", human(n(&mem["bytes_per_token"])));
    if let Some(l) = &loaded {
        let measured = n(&l["bytes_per_token"]);
        // The estimate counts a stored head (or the rows a quantized one rescores) in its
        // checkpoint dtype; packed losslessly (its size depends on the values:
        // `bitnet_cpu::packed_bf16`) it reads fewer.
        let packed = l["lm_head_storage"].as_str().unwrap_or("").contains("12-bit");
        let agree = if measured == n(&mem["bytes_per_token"]) {
            "equal to the estimate"
        } else if packed && measured < n(&mem["bytes_per_token"]) {
            "below the estimate: the bf16 LM head packed losslessly to 12 bits"
        } else {
            "DIFFERS from the estimate"
        };
        line(
            "loaded",
            format!(
                "{} in {:.2} s; read per token {} ({agree})",
                l["format"].as_str().unwrap_or(""),
                l["load_seconds"].as_f64().unwrap_or(0.0),
                human(measured)
            ),
        );
    }
    print!("{out}");
    Ok(())
}
