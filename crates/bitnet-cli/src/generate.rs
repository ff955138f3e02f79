//! `bitnet generate` and `bitnet chat`.

use std::io::{BufRead, Write};

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bitnet_core::chat::ChatMessage;
use bitnet_core::engine::Engine;
use bitnet_core::generate::{BatchSession, GenOptions, GenStats};
use bitnet_core::json_mode::{JsonSpec, JsonVocab};
use bitnet_core::json_schema::JsonSchema;
use bitnet_core::sampler::SamplingParams;
use bitnet_core::tokenizer::StreamDecoder;
use clap::Args;

use crate::common::{parse_token_ids, Loaded, ModelArgs};

/// Sampling flags; unset ones come from the model's generation_config.json.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum tokens to generate
    #[arg(short = 'n', long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature (0 = greedy)
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep the k most likely tokens (0 = off)
    #[arg(long)]
    top_k: Option<usize>,
    /// Drop tokens below min_p x the top probability
    #[arg(long)]
    min_p: Option<f32>,
    /// Repetition penalty (1 = off)
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Subtracted from a token's logit per time it was generated (OpenAI's; -2..2, 0 = off)
    #[arg(long, allow_hyphen_values = true)]
    frequency_penalty: Option<f32>,
    /// Subtracted once from the logit of each token generated so far (OpenAI's; -2..2, 0 = off)
    #[arg(long, allow_hyphen_values = true)]
    presence_penalty: Option<f32>,
    /// Random seed (default: from the clock; printed with the timings)
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past eos tokens
    #[arg(long)]
    ignore_eos: bool,
    /// Output format: text, or json (JSON mode: the output is one JSON object; generation ends
    /// when it closes)
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
    /// A JSON schema the output must match (inline JSON, as llama.cpp's `--json-schema`; the
    /// root must be an object; the supported keywords are listed in bitnet-core's
    /// `json_schema.rs`); implies `--format json`
    #[arg(long, value_name = "SCHEMA", conflicts_with = "json_schema_file")]
    json_schema: Option<String>,
    /// `--json-schema` read from a file
    #[arg(long, value_name = "FILE")]
    json_schema_file: Option<std::path::PathBuf>,
    /// Prompt lookup: draft up to N tokens per step from an earlier occurrence of the last
    /// 2-4 tokens in the context, checked in the same step (0 = off, at most 16). The output
    /// is the same token for token; faster where the text repeats itself (code edits, quoting,
    /// summaries). CPU only (elsewhere it is ignored).
    #[arg(long, value_name = "N", default_value_t = 0)]
    prompt_lookup: usize,
}

impl SamplingArgs {
    /// The compiled `--json-schema` / `--json-schema-file`, if given.
    fn schema(&self) -> Result<Option<Arc<JsonSchema>>> {
        let (text, what) = match (&self.json_schema, &self.json_schema_file) {
            (Some(t), _) => (t.clone(), "--json-schema".to_string()),
            (None, Some(f)) => {
                let t = std::fs::read_to_string(f)
                    .with_context(|| format!("reading --json-schema-file {}", f.display()))?;
                (t, format!("--json-schema-file {}", f.display()))
            }
            (None, None) => return Ok(None),
        };
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{what}: not valid JSON"))?;
        let s = JsonSchema::compile(&v).map_err(|e| anyhow!("{what}: {e}"))?;
        Ok(Some(Arc::new(s)))
    }

    fn params<M>(&self, engine: &Engine<M>) -> Result<SamplingParams> {
        let mut p = SamplingParams::from_generation_config(&engine.generation);
        if let Some(t) = self.temperature {
            p.temperature = t;
            if t > 0.0 && engine.generation.do_sample != Some(true) {
                // An explicit temperature asks for sampling even if the model's default is greedy;
                // drop the transformers top_k=50 default only when the file did not set it.
                p.top_k = engine.generation.top_k.unwrap_or(0);
            }
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        p.seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        p.validate()?;
        Ok(p)
    }

    fn options<M>(&self, engine: &Engine<M>) -> Result<GenOptions> {
        let schema = self.schema()?;
        let json = match (self.format.as_str(), engine.tokenizer.as_ref()) {
            ("text", _) if schema.is_none() => None,
            (_, Some(tok)) => Some(JsonSpec::json(Arc::new(JsonVocab::new(tok)), schema)),
            (_, None) => {
                bail!("JSON output (--format json, --json-schema) needs the model's tokenizer (this model has none)")
            }
        };
        Ok(GenOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: self.params(engine)?,
            eos_ids: engine.eos_ids.clone(),
            ignore_eos: self.ignore_eos,
            json,
            prompt_lookup: self.prompt_lookup,
        })
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text
    #[arg(short, long, conflicts_with = "token_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (no tokenizer needed)
    #[arg(long)]
    token_ids: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template
    #[arg(long)]
    chat: bool,
    /// Print one JSON object (token_ids, text, timings) instead of streaming text
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn timing_line(st: &GenStats, seed: u64) -> String {
    let lookup = if st.drafted_tokens > 0 {
        format!(" | prompt lookup: {} of {} drafted tokens accepted", st.accepted_tokens, st.drafted_tokens)
    } else {
        String::new()
    };
    format!(
        "[prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.1} tok/s{lookup} | finish {} | seed {seed}]",
        st.prompt_tokens,
        st.prefill_tok_s(),
        st.new_tokens,
        st.decode_tok_s(),
        st.finish.as_str()
    )
}

/// Tokenizes a chat for generation: template with the generation prompt, then the tokenizer's
/// own special tokens (BOS), as transformers' `tokenizer(prompt)` does.
fn chat_ids<M>(engine: &Engine<M>, messages: &[ChatMessage]) -> Result<Vec<u32>> {
    let tok = engine.tokenizer()?;
    let Some(tpl) = &engine.chat_template else { bail!("model {} has no chat template", engine.name) };
    let text = tpl.render(messages, true)?;
    Ok(tok.encode(&text, true)?)
}

/// The conversation's prompt ids, after dropping its oldest turns (a user message with the reply
/// after it; system messages and the newest message stay) while it leaves fewer than `room`
/// positions of the `ctx` for the reply, as ollama does: a long chat goes on instead of failing
/// on every turn. Returns the ids and how many messages were dropped from `messages`.
fn fit_chat<M>(
    engine: &Engine<M>,
    messages: &mut Vec<ChatMessage>,
    ctx: usize,
    room: usize,
) -> Result<(Vec<u32>, usize)> {
    let mut dropped = 0;
    loop {
        let ids = chat_ids(engine, messages)?;
        let oldest = messages.iter().position(|m| m.role != "system");
        match oldest {
            Some(i) if ids.len() + room > ctx && i + 1 < messages.len() => {
                // the turn: this message and the replies up to the next user message (the newest
                // message is one, so it stays)
                let end = (i + 1..messages.len()).find(|&j| messages[j].role == "user").unwrap_or(messages.len() - 1);
                dropped += end - i;
                messages.drain(i..end);
            }
            _ => return Ok((ids, dropped)),
        }
    }
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let mut loaded = a.model.load_batch(!a.json, 1, 512)?;
    let engine = &loaded.engine;
    let ids = match (&a.prompt, &a.token_ids) {
        (_, Some(t)) => parse_token_ids(t)?,
        (Some(p), None) if a.chat => chat_ids(engine, &[ChatMessage::new("user", p.clone())])?,
        (Some(p), None) => engine.tokenizer()?.encode(p, true)?,
        (None, None) => bail!("give --prompt or --token-ids"),
    };
    let opts = a.sampling.options(engine)?;
    let Loaded { engine, model, ctx, note } = &mut loaded;
    let mut session = BatchSession::new(model.as_mut(), *ctx, 512)?;
    let mut out_ids = Vec::new();
    let tok = engine.tokenizer.as_ref();
    let mut dec = StreamDecoder::new(true);
    let stdout = std::io::stdout();
    let mut err: Option<anyhow::Error> = None;
    let stats = session.generate(&ids, &opts, |id| {
        out_ids.push(id);
        if !a.json {
            if let Some(t) = tok {
                match dec.push(t, id) {
                    Ok(Some(s)) => {
                        let mut o = stdout.lock();
                        let _ = o.write_all(s.as_bytes());
                        let _ = o.flush();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        err = Some(e.into());
                        return false;
                    }
                }
            } else {
                println!("{id}");
            }
        }
        true
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    if a.json {
        let text = match tok {
            Some(t) => Some(t.decode(&out_ids, true)?),
            None => None,
        };
        let j = serde_json::json!({
            "token_ids": out_ids,
            "text": text,
            "prompt_tokens": stats.prompt_tokens,
            "finish_reason": stats.finish.as_str(),
            "prefill_tok_s": stats.prefill_tok_s(),
            "decode_tok_s": stats.decode_tok_s(),
            "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens,
            "seed": opts.sampling.seed,
            "plan": engine.model.plan.name,
            "device": note,
        });
        println!("{j}");
    } else {
        if let Some(t) = tok {
            if let Some(s) = dec.flush(t)? {
                print!("{s}");
            }
            println!();
        }
        eprintln!("{}", timing_line(&stats, opts.sampling.seed));
        eprintln!("{note}");
    }
    Ok(())
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let mut loaded = a.model.load_batch(true, 1, 512)?;
    let Loaded { engine, model, ctx, note } = &mut loaded;
    let tok = engine.tokenizer()?;
    let opts = a.sampling.options(engine)?;
    let mut session = BatchSession::new(model.as_mut(), *ctx, 512)?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    eprintln!("chat with {} on {note} (/reset clears the conversation, /exit or Ctrl-D quits)", engine.name);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m: &ChatMessage| m.role == "system");
                session.reset();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", text.to_string()));
        // room for the reply: its token budget, at most half the context
        let (ids, dropped) = fit_chat(engine, &mut messages, *ctx, opts.max_new_tokens.min(*ctx / 2))?;
        if dropped > 0 {
            eprintln!("({dropped} earlier messages dropped to fit the context of {ctx} tokens)");
        }
        let mut dec = StreamDecoder::new(true);
        let mut reply = Vec::new();
        let r = session.generate(&ids, &opts, |id| {
            reply.push(id);
            if let Ok(Some(s)) = dec.push(tok, id) {
                print!("{s}");
                let _ = std::io::stdout().flush();
            }
            true
        });
        match r {
            Ok(st) => {
                if let Some(s) = dec.flush(tok)? {
                    print!("{s}");
                }
                println!();
                eprintln!("{}", timing_line(&st, opts.sampling.seed));
                messages.push(ChatMessage::new("assistant", tok.decode(&reply, true)?));
            }
            Err(e) => {
                // e.g. the conversation outgrew the context: say so and let the user /reset.
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}
