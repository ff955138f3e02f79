//! Request bodies of /v1/chat/completions and /v1/completions, checked field by field: every
//! refusal names the field (`param`) and the accepted values.
//!
//! Supported: model, messages / prompt (text, token ids, or an array of up to 128 texts or
//! token-id arrays: one prompt each, their choices in prompt order), max_tokens / max_completion_tokens, temperature [0, 2], top_p [0, 1] (0 = greedy),
//! top_k (extension; 0 or -1 = off), min_p [0, 1], repetition_penalty (> 0, extension), seed, stop
//! (a string or up to 4), n (1 to 16 choices, choice i drawn with seed + i), stream,
//! stream_options.include_usage, frequency_penalty and presence_penalty [-2, 2], logprobs (chat:
//! a boolean with top_logprobs 0..=20; completions: 0..=20 alternatives), logit_bias, echo
//! (completions; with logprobs, the prompt's too), ignore_eos, return_token_ids, stop_token_ids
//! and min_tokens (extensions), response_format (`text`, `json_object`: JSON mode, or
//! `json_schema`: an object matching a schema, see bitnet-core's `json_schema.rs`).
//! best_of only as 1. Other fields are ignored, as OpenAI-compatible servers commonly do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use bitnet_core::chat::ChatMessage;
use bitnet_core::json_schema::pattern::Pattern;
use bitnet_core::json_schema::JsonSchema;
use bitnet_core::logprobs::MAX_TOP_LOGPROBS;
use bitnet_core::sampler::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::{tools, AppState};

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Most choices (`n`) per prompt.
pub const MAX_N: usize = 16;
/// Most prompts per completions request (lm-evaluation-harness batches its requests this way).
pub const MAX_PROMPTS: usize = 128;
/// Most sequences one request starts (prompts x `n`).
pub const MAX_CHOICES: usize = 256;

/// One prompt of a request (a completions request may send several; chat has one).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// most tokens to generate after it
    pub max_new: usize,
    /// completions' `echo`: the prompt's text goes before the completion
    pub echo: Option<String>,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub kind: Kind,
    /// choices to generate per prompt (`n`), choice i with seed + i; choice i of prompt p is
    /// the response's choice `p * n + i` (vLLM's order)
    pub n: usize,
    pub prompts: Vec<Prompt>,
    pub params: SamplingParams,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// report each token's log-probability and this many alternatives
    pub logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: (token id, value in [-100, 100]) added to the logits
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `stop_token_ids`: these end the output too (not included, finish reason "stop")
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `min_tokens`: no eos or stop token before this many tokens
    pub min_tokens: usize,
    /// `echo` with `logprobs`: the prompt tokens' log-probabilities too
    pub prompt_logprobs: bool,
    /// `response_format: {"type": "json_object"}` or `"json_schema"`: the output is one JSON
    /// object
    pub json: bool,
    /// `response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`: the object
    /// matches it
    pub schema: Option<Arc<JsonSchema>>,
    /// vLLM's `structured_outputs` `regex` / `choice` (or `guided_regex` / `guided_choice`): the
    /// text matches it in full
    pub regex: Option<Arc<Pattern>>,
    /// chat `tools` offered (`tools.rs`): the reply is a tool call or an answer in the tool
    /// format, turned into OpenAI's `tool_calls` / `content`
    pub tools: bool,
    pub fail_after: Option<usize>,
}

impl GenRequest {
    /// Prompt tokens of the request (each prompt once, whatever `n`), for `usage`.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).sum()
    }
}

/// Parses the body (bytes) into a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
        .with_code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid("The body of your request must be a JSON object.").with_code("invalid_json")),
    }
}

/// One optional field of type T; null counts as absent.
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<T>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value::<T>(v.clone())
            .map(Some)
            .map_err(|_| ApiError::param(key, format!("Invalid type for '{key}': expected {what}, got {}", short(v)))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 60;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn range_err(key: &str, v: f64, range: &str) -> ApiError {
    ApiError::param(key, format!("Invalid value for '{key}': {v} is not in {range}")).with_code("invalid_value")
}

static SEED_COUNTER: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

fn fresh_seed() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let c = SEED_COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let mut z = t ^ c;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Everything both endpoints share; the prompts come from the endpoint-specific part.
fn common(
    st: &AppState,
    obj: &Map<String, Value>,
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    prompt_param: &str,
) -> Result<GenRequest, ApiError> {
    // n: choices, one sequence each
    let n = match field::<i64>(obj, "n", "an integer")? {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => return Err(range_err("n", n as f64, &format!("[1, {MAX_N}]"))),
    };
    // every prompt's first sequence waits in the queue at once: more than it holds could never run
    if prompts.len() > st.sched.max_queue() {
        return Err(ApiError::param(
            "prompt",
            format!(
                "{} prompts in one request; this server queues at most {} (--max-queue).",
                prompts.len(),
                st.sched.max_queue()
            ),
        )
        .with_code("invalid_value"));
    }
    if prompts.len() * n > MAX_CHOICES {
        return Err(ApiError::param(
            "n",
            format!(
                "{} prompts with n = {n} ask for {} sequences; at most {MAX_CHOICES} per request.",
                prompts.len(),
                prompts.len() * n
            ),
        )
        .with_code("invalid_value"));
    }
    if kind == Kind::Completion {
        if let Some(b) = field::<i64>(obj, "best_of", "an integer")? {
            if b != 1 {
                return Err(ApiError::param("best_of", "Only best_of = 1 is supported.").with_code("invalid_value"));
            }
        }
        if field::<String>(obj, "suffix", "a string")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::param("suffix", "suffix is not supported.").with_code("invalid_value"));
        }
    }
    let max_top = MAX_TOP_LOGPROBS as i64;
    let logprobs = if kind == Kind::Completion {
        match field::<i64>(obj, "logprobs", "an integer")? {
            Some(k) if !(0..=max_top).contains(&k) => {
                return Err(range_err("logprobs", k as f64, &format!("[0, {max_top}]")));
            }
            k => k.map(|k| k as usize),
        }
    } else {
        let on = field::<bool>(obj, "logprobs", "a boolean")?.unwrap_or(false);
        match field::<i64>(obj, "top_logprobs", "an integer")? {
            Some(k) if !(0..=max_top).contains(&k) => {
                return Err(range_err("top_logprobs", k as f64, &format!("[0, {max_top}]")));
            }
            Some(_) if !on => {
                return Err(ApiError::param("top_logprobs", "'top_logprobs' needs 'logprobs' to be true.")
                    .with_code("invalid_value"));
            }
            k => on.then(|| k.unwrap_or(0) as usize),
        }
    };

    // streaming
    let stream = field::<bool>(obj, "stream", "a boolean")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(so) = field::<Map<String, Value>>(obj, "stream_options", "an object")? {
        if !stream {
            return Err(ApiError::param(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            ));
        }
        include_usage = field::<bool>(&so, "include_usage", "a boolean")
            .map_err(|e| e.with_param("stream_options.include_usage"))?
            .unwrap_or(false);
    }

    // sampling
    let mut p = st.defaults;
    if let Some(t) = field::<f64>(obj, "temperature", "a number")? {
        if !(0.0..=2.0).contains(&t) {
            return Err(range_err("temperature", t, "[0, 2]"));
        }
        p.temperature = t as f32;
    }
    if let Some(k) = field::<i64>(obj, "top_k", "an integer")? {
        if k < -1 {
            return Err(range_err("top_k", k as f64, "{-1, 0, 1, 2, ...} (-1 or 0 = off)"));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(tp) = field::<f64>(obj, "top_p", "a number")? {
        if !(0.0..=1.0).contains(&tp) {
            return Err(range_err("top_p", tp, "[0, 1]"));
        }
        if tp == 0.0 {
            p.top_k = 1;
            p.top_p = 1.0;
        } else {
            p.top_p = tp as f32;
        }
    }
    if let Some(m) = field::<f64>(obj, "min_p", "a number")? {
        if !(0.0..=1.0).contains(&m) {
            return Err(range_err("min_p", m, "[0, 1]"));
        }
        p.min_p = m as f32;
    }
    if let Some(r) = field::<f64>(obj, "repetition_penalty", "a number")? {
        if !(r > 0.0 && r <= 100.0) {
            return Err(range_err("repetition_penalty", r, "(0, 100]"));
        }
        p.repetition_penalty = r as f32;
    }
    for key in ["frequency_penalty", "presence_penalty"] {
        if let Some(v) = field::<f64>(obj, key, "a number")? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(range_err(key, v, "[-2, 2]"));
            }
            if key == "frequency_penalty" {
                p.frequency_penalty = v as f32;
            } else {
                p.presence_penalty = v as f32;
            }
        }
    }
    p.seed = match obj.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::param("seed", "Invalid type for 'seed': expected an integer")),
        },
        Some(v) => {
            return Err(ApiError::param(
                "seed",
                format!("Invalid type for 'seed': expected an integer, got {}", short(v)),
            ))
        }
    };
    p.validate().map_err(|e| ApiError::invalid(e.to_string()).with_code("invalid_value"))?;

    // stop strings
    let stop: Vec<String> = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(a.len());
            for x in a {
                match x {
                    Value::String(s) => v.push(s.clone()),
                    _ => {
                        return Err(ApiError::param(
                            "stop",
                            "Invalid type for 'stop': expected a string or an array of strings",
                        ))
                    }
                }
            }
            v
        }
        Some(_) => {
            return Err(ApiError::param("stop", "Invalid type for 'stop': expected a string or an array of strings"))
        }
    };
    if stop.len() > 4 {
        return Err(ApiError::param("stop", "At most 4 stop strings are supported.").with_code("invalid_value"));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::param("stop", "Stop strings must not be empty.").with_code("invalid_value"));
    }
    if !stop.is_empty() && st.engine.tokenizer.is_none() {
        return Err(ApiError::param("stop", "This model has no tokenizer: stop strings cannot be matched."));
    }

    let ignore_eos = field::<bool>(obj, "ignore_eos", "a boolean")?.unwrap_or(false);
    let return_token_ids = field::<bool>(obj, "return_token_ids", "a boolean")?.unwrap_or(false);
    let fail_after = if st.debug_faults { field::<usize>(obj, "bitnet_fail_after", "an integer")? } else { None };

    // lengths, per prompt
    let ctx = st.ctx;
    let (mt_key, mt) = match field::<i64>(obj, "max_completion_tokens", "an integer")? {
        Some(v) => ("max_completion_tokens", Some(v)),
        None => ("max_tokens", field::<i64>(obj, "max_tokens", "an integer")?),
    };
    if let Some(v) = mt.filter(|&v| v < 1) {
        return Err(range_err(mt_key, v as f64, "[1, context length]"));
    }
    let what = if kind == Kind::Chat { "messages" } else { "prompt" };
    let many = prompts.len() > 1;
    let mut checked = Vec::with_capacity(prompts.len());
    for (i, ids) in prompts.into_iter().enumerate() {
        // "prompt 3" when there are several
        let which = if many { format!("{what} {i}") } else { what.to_string() };
        if ids.len() >= ctx {
            return Err(ApiError::param(
                prompt_param,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your {which} resulted in {} tokens, which leaves no room for a completion. Please reduce the length of the {what}.",
                    ids.len(),
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let max_new = match mt {
            None => ctx - ids.len(),
            Some(v) => {
                let v = v as u64;
                if ids.len() as u64 + v > ctx as u64 {
                    return Err(ApiError::param(
                        mt_key,
                        format!(
                            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {which}, {v} in the completion). Please reduce the length of the {what} or completion.",
                            ids.len() as u64 + v,
                            ids.len(),
                        ),
                    )
                    .with_code("context_length_exceeded"));
                }
                v as usize
            }
        };
        checked.push(Prompt { ids, max_new, echo: None });
    }
    // the shortest allowance bounds min_tokens
    let max_new = checked.iter().map(|p| p.max_new).min().unwrap_or(0);
    let vocab = st.engine.model.cfg.vocab_size;
    // vLLM's extensions: more tokens that end the output, and a floor under its length
    let stop_token_ids = match obj.get("stop_token_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.len() <= 64 => token_ids(a, vocab, "stop_token_ids")?,
        Some(v) => {
            return Err(ApiError::param(
                "stop_token_ids",
                format!("Invalid 'stop_token_ids': expected an array of at most 64 token ids, got {}", short(v)),
            ))
        }
    };
    let min_tokens = match field::<i64>(obj, "min_tokens", "an integer")? {
        None => 0,
        Some(v) if v >= 0 && v as u64 <= max_new as u64 => v as usize,
        Some(v) => return Err(range_err("min_tokens", v as f64, &format!("[0, {max_new}] (at most max_tokens)"))),
    };
    let mut logit_bias = Vec::new();
    if let Some(m) = field::<Map<String, Value>>(obj, "logit_bias", "an object")? {
        for (k, v) in &m {
            let id = k.trim().parse::<u32>().ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                ApiError::param(
                    "logit_bias",
                    format!("Invalid key in 'logit_bias': {k:?} is not a token id below {vocab}."),
                )
                .with_code("invalid_value")
            })?;
            let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                ApiError::param(
                    "logit_bias",
                    format!(
                        "Invalid value in 'logit_bias' for token {id}: {} is not a number in [-100, 100].",
                        short(v)
                    ),
                )
                .with_code("invalid_value")
            })?;
            logit_bias.push((id, b as f32));
        }
    }
    let (mut json, mut schema) = response_format(st, obj.get("response_format"))?;
    let mut regex = None;
    if let Some(c) = vllm_structured(st, obj)? {
        if json {
            return Err(ApiError::param(
                "response_format",
                "'response_format' cannot be combined with 'structured_outputs' / 'guided_*'.",
            )
            .with_code("invalid_value"));
        }
        json = true;
        match c {
            Structured::Schema(s) => schema = Some(s),
            Structured::Regex(p) => regex = Some(p),
        }
    }
    let echo = kind == Kind::Completion && field::<bool>(obj, "echo", "a boolean")?.unwrap_or(false);
    let prompt_logprobs = echo && logprobs.is_some();
    if prompt_logprobs && !st.all_logits {
        return Err(ApiError::param(
            "echo",
            "echo with logprobs (the prompt's log-probabilities) is not supported by this model's backend.",
        )
        .with_code("invalid_value"));
    }
    if echo {
        // set by the completions endpoint, which has the prompts' text
        for p in &mut checked {
            p.echo = Some(String::new());
        }
    }
    Ok(GenRequest {
        kind,
        n,
        logit_bias,
        stop_token_ids,
        min_tokens,
        prompt_logprobs,
        json,
        schema,
        regex,
        tools: false,
        prompts: checked,
        params: p,
        ignore_eos,
        stop,
        stream,
        include_usage,
        return_token_ids,
        logprobs,
        fail_after,
    })
}

fn check_model(st: &AppState, obj: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(m) = field::<String>(obj, "model", "a string")? {
        if m != st.model_id {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{m}` does not exist. This server serves `{}`.", st.model_id),
            )
            .with_param("model")
            .with_code("model_not_found"));
        }
    }
    Ok(())
}

fn message_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, part) in parts.iter().enumerate() {
                let ty = part.get("type").and_then(|t| t.as_str());
                match (ty, part.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::param(
                            format!("messages[{i}].content[{j}]"),
                            "Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.",
                        ))
                    }
                }
            }
            Ok(out)
        }
        other => Err(ApiError::param(
            param,
            format!("Invalid type for content: expected a string or an array of text parts, got {}", short(other)),
        )),
    }
}

/// POST /v1/chat/completions.
pub fn parse_chat(st: &AppState, body: &[u8]) -> Result<GenRequest, ApiError> {
    let obj = parse_object(body)?;
    check_model(st, &obj)?;
    let tools = tools::parse(&obj)?;
    let prompt = chat_prompt(st, &obj, tools.as_ref().map(|t| t.system.as_str()))?;
    let mut req = common(st, &obj, Kind::Chat, vec![prompt], "messages")?;
    if let Some(t) = tools {
        if req.json {
            return Err(ApiError::param("response_format", "'response_format' JSON cannot be combined with 'tools'.")
                .with_code("invalid_value"));
        }
        // (the chat template and tokenizer are there: `chat_prompt` needed them)
        let _ = st.json_vocab();
        req.json = true;
        req.schema = Some(t.schema);
        req.tools = true;
    }
    Ok(req)
}

/// The token ids of `messages` through the chat template (generation prompt added); `tools`:
/// the tools' system text, added to the first system message (or as one before the others).
fn chat_prompt(st: &AppState, obj: &Map<String, Value>, tools: Option<&str>) -> Result<Vec<u32>, ApiError> {
    let msgs = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::param("messages", "Missing required parameter: 'messages'.")
                .with_code("missing_required_parameter"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::param(
                "messages",
                format!("Invalid type for 'messages': expected an array, got {}", short(v)),
            ))
        }
    };
    if msgs.is_empty() {
        return Err(ApiError::param(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        )
        .with_code("empty_array"));
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let Some(o) = m.as_object() else {
            return Err(ApiError::param(
                format!("messages[{i}]"),
                "Each message must be an object with 'role' and 'content'.",
            ));
        };
        let role = match o.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None | Some(Value::Null) => {
                return Err(ApiError::param(format!("messages[{i}].role"), "Missing required parameter: 'role'.")
                    .with_code("missing_required_parameter"))
            }
            Some(v) => {
                return Err(ApiError::param(
                    format!("messages[{i}].role"),
                    format!("Invalid type for role: {}", short(v)),
                ))
            }
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::param(
                    format!("messages[{i}].role"),
                    format!("Invalid value for role: '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."),
                )
                .with_code("invalid_value"))
            }
        };
        let mut content = message_text(o.get("content").unwrap_or(&Value::Null), i)?;
        // an assistant's earlier tool calls, as the model writes them (`tools.rs`)
        if let (Some(calls), "assistant") = (o.get("tool_calls").filter(|c| !c.is_null()), role) {
            let calls = tools::calls_text(calls, i)?;
            content = if content.is_empty() { calls } else { format!("{content}\n{calls}") };
        }
        messages.push(ChatMessage::new(role, content));
    }
    if let Some(text) = tools {
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", text)),
        }
    }
    let (Some(tpl), Some(tok)) = (st.engine.chat_template.as_ref(), st.engine.tokenizer.as_ref()) else {
        return Err(ApiError::invalid(format!(
            "Model `{}` has no tokenizer or chat template: use /v1/completions with the prompt as an array of token ids.",
            st.model_id
        ))
        .with_param("messages"));
    };
    let text = tpl.render(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
    let prompt = tok.encode(&text, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::param("messages", "The messages give an empty prompt."));
    }
    Ok(prompt)
}

/// POST /tokenize (vLLM's): `{"prompt": text, "add_special_tokens": true}` or `{"messages":
/// [...]}` (through the chat template) to token ids.
pub fn parse_tokenize(st: &AppState, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let obj = parse_object(body)?;
    check_model(st, &obj)?;
    if obj.get("messages").is_some_and(|m| !m.is_null()) {
        let tools = tools::parse(&obj)?;
        return chat_prompt(st, &obj, tools.as_ref().map(|t| t.system.as_str()));
    }
    let Some(text) = field::<String>(&obj, "prompt", "a string")? else {
        return Err(ApiError::param("prompt", "Missing required parameter: 'prompt' (or 'messages').")
            .with_code("missing_required_parameter"));
    };
    let add = field::<bool>(&obj, "add_special_tokens", "a boolean")?.unwrap_or(true);
    let Some(tok) = st.engine.tokenizer.as_ref() else {
        return Err(ApiError::param("prompt", format!("Model `{}` has no tokenizer.", st.model_id)));
    };
    tok.encode(&text, add).map_err(|e| ApiError::param("prompt", e.to_string()))
}

/// POST /detokenize (vLLM's): `{"tokens": [ids]}` to text (special tokens kept).
pub fn parse_detokenize(st: &AppState, body: &[u8]) -> Result<String, ApiError> {
    let obj = parse_object(body)?;
    check_model(st, &obj)?;
    let ids = match obj.get("tokens") {
        Some(Value::Array(a)) => token_ids(a, st.engine.model.cfg.vocab_size, "tokens")?,
        None | Some(Value::Null) => {
            return Err(ApiError::param("tokens", "Missing required parameter: 'tokens'.")
                .with_code("missing_required_parameter"))
        }
        Some(v) => {
            return Err(ApiError::param(
                "tokens",
                format!("Invalid type for 'tokens': expected an array, got {}", short(v)),
            ))
        }
    };
    let Some(tok) = st.engine.tokenizer.as_ref() else {
        return Err(ApiError::param("tokens", format!("Model `{}` has no tokenizer.", st.model_id)));
    };
    tok.decode(&ids, false).map_err(|e| ApiError::param("tokens", e.to_string()))
}

fn token_ids(a: &[Value], vocab: usize, param: &str) -> Result<Vec<u32>, ApiError> {
    let mut ids = Vec::with_capacity(a.len());
    for v in a {
        let Some(id) = v.as_u64() else {
            return Err(ApiError::param(
                param,
                format!("Invalid token id {}: expected a non-negative integer", short(v)),
            ));
        };
        if id >= vocab as u64 {
            return Err(ApiError::param(
                param,
                format!("Token id {id} is out of range (vocabulary of {vocab} tokens)."),
            )
            .with_code("invalid_value"));
        }
        ids.push(id as u32);
    }
    Ok(ids)
}

/// POST /v1/completions.
pub fn parse_completion(st: &AppState, body: &[u8]) -> Result<GenRequest, ApiError> {
    let obj = parse_object(body)?;
    check_model(st, &obj)?;
    let vocab = st.engine.model.cfg.vocab_size;
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        let Some(tok) = st.engine.tokenizer.as_ref() else {
            return Err(ApiError::param(
                "prompt",
                format!("Model `{}` has no tokenizer: send the prompt as an array of token ids.", st.model_id),
            ));
        };
        tok.encode(text, true).map_err(|e| ApiError::param("prompt", e.to_string()))
    };
    // (token ids, the text as sent) per prompt
    let prompts: Vec<(Vec<u32>, Option<String>)> = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::param("prompt", "Missing required parameter: 'prompt'.")
                .with_code("missing_required_parameter"))
        }
        Some(Value::String(s)) => vec![(encode(s)?, Some(s.clone()))],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::param("prompt", "Invalid 'prompt': empty array.").with_code("empty_array"))
        }
        // one prompt of token ids
        Some(Value::Array(a)) if a.iter().all(|v| !v.is_string() && !v.is_array()) => {
            vec![(token_ids(a, vocab, "prompt")?, None)]
        }
        // several prompts: texts or arrays of token ids
        Some(Value::Array(a)) => {
            if a.len() > MAX_PROMPTS {
                return Err(ApiError::param(
                    "prompt",
                    format!("Invalid 'prompt': {} prompts; at most {MAX_PROMPTS} per request.", a.len()),
                )
                .with_code("invalid_value"));
            }
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                out.push(match v {
                    Value::String(s) => (encode(s)?, Some(s.clone())),
                    Value::Array(inner) => (token_ids(inner, vocab, &format!("prompt[{i}]"))?, None),
                    other => {
                        return Err(ApiError::param(
                            format!("prompt[{i}]"),
                            format!("Invalid type for 'prompt[{i}]': expected a string or an array of token ids (as every prompt of the array), got {}", short(other)),
                        ))
                    }
                });
            }
            out
        }
        Some(v) => {
            return Err(ApiError::param(
                "prompt",
                format!(
                    "Invalid type for 'prompt': expected a string, an array of token ids, or an array of those; got {}",
                    short(v)
                ),
            ))
        }
    };
    if let Some(i) = prompts.iter().position(|(ids, _)| ids.is_empty()) {
        let param = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
        return Err(ApiError::param(param, "The prompt is empty (no tokens).").with_code("invalid_value"));
    }
    let (ids, texts): (Vec<Vec<u32>>, Vec<Option<String>>) = prompts.into_iter().unzip();
    let mut req = common(st, &obj, Kind::Completion, ids, "prompt")?;
    // `echo`: each prompt as sent, or its ids detokenized
    for (p, text) in req.prompts.iter_mut().zip(texts) {
        if let Some(echo) = p.echo.as_mut() {
            *echo = match (text, st.engine.tokenizer.as_ref()) {
                (Some(t), _) => t,
                (None, Some(tok)) => tok.decode(&p.ids, true).map_err(|e| ApiError::param("prompt", e.to_string()))?,
                (None, None) => String::new(),
            };
        }
    }
    Ok(req)
}

/// `response_format`: `text`, `json_object` (JSON mode) or `json_schema` (OpenAI's structured
/// outputs: `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
/// the schema is enforced whether or not `strict` is set, and refused when it uses what the
/// matcher cannot enforce).
fn response_format(st: &AppState, v: Option<&Value>) -> Result<(bool, Option<Arc<JsonSchema>>), ApiError> {
    let f = match v {
        None | Some(Value::Null) => return Ok((false, None)),
        Some(Value::Object(f)) => f,
        Some(v) => {
            return Err(ApiError::param(
                "response_format",
                format!("Invalid type for 'response_format': expected an object, got {}", short(v)),
            ))
        }
    };
    let invalid = |msg: String| ApiError::param("response_format", msg).with_code("invalid_value");
    let schema = match f.get("type").and_then(Value::as_str) {
        Some("text") => return Ok((false, None)),
        Some("json_object") => None,
        Some("json_schema") => {
            let Some(js) = f.get("json_schema").and_then(Value::as_object) else {
                return Err(invalid(
                    "Missing 'response_format.json_schema': expected {\"name\": ..., \"schema\": {...}}.".into(),
                ));
            };
            let name = js.get("name").and_then(Value::as_str).unwrap_or("");
            let Some(schema) = js.get("schema") else {
                return Err(invalid(format!("Missing 'schema' in response_format '{name}'.")));
            };
            let compiled = JsonSchema::compile(schema)
                .map_err(|e| invalid(format!("Invalid schema for response_format '{name}': {e}")))?;
            Some(Arc::new(compiled))
        }
        _ => {
            return Err(invalid(format!(
                "Invalid 'response_format': expected {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or {{\"type\": \"json_schema\", ...}}, got {}",
                short(&Value::Object(f.clone()))
            )))
        }
    };
    if st.engine.tokenizer.is_none() {
        return Err(ApiError::param(
            "response_format",
            format!("Model `{}` has no tokenizer: JSON output needs one.", st.model_id),
        ));
    }
    // the first JSON request builds the vocabulary trie here, on the blocking pool that parses
    // requests, not on an async worker
    let _ = st.json_vocab();
    Ok((true, schema))
}

/// A vLLM structured-output request.
enum Structured {
    Schema(Arc<JsonSchema>),
    Regex(Arc<Pattern>),
}

/// vLLM's `structured_outputs: {"json": schema | "regex": pattern | "choice": [strings]}` and its
/// older spelling `guided_json` / `guided_regex` / `guided_choice` (one of them).
fn vllm_structured(st: &AppState, obj: &Map<String, Value>) -> Result<Option<Structured>, ApiError> {
    let mut asks: Vec<(String, &Value)> = Vec::new();
    match obj.get("structured_outputs") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                match k.as_str() {
                    "json" | "regex" | "choice" => asks.push((format!("structured_outputs.{k}"), v)),
                    // vLLM's options for its grammar back ends
                    "disable_fallback"
                    | "disable_any_whitespace"
                    | "disable_additional_properties"
                    | "whitespace_pattern" => {}
                    other => {
                        return Err(ApiError::param(
                            format!("structured_outputs.{other}"),
                            format!("'{other}' is not supported: use 'json', 'regex' or 'choice'."),
                        )
                        .with_code("invalid_value"))
                    }
                }
            }
        }
        Some(v) => {
            return Err(ApiError::param(
                "structured_outputs",
                format!("Invalid type for 'structured_outputs': expected an object, got {}", short(v)),
            ))
        }
    }
    for k in ["guided_json", "guided_regex", "guided_choice"] {
        if let Some(v) = obj.get(k).filter(|v| !v.is_null()) {
            asks.push((k.to_string(), v));
        }
    }
    let (param, v) = match asks.as_slice() {
        [] => return Ok(None),
        [one] => (one.0.clone(), one.1),
        _ => {
            return Err(ApiError::param(
                asks[1].0.clone(),
                "Only one structured output ('json', 'regex' or 'choice') per request.",
            )
            .with_code("invalid_value"))
        }
    };
    let bad = |msg: String| ApiError::param(param.clone(), msg).with_code("invalid_value");
    if st.engine.tokenizer.is_none() {
        return Err(bad(format!("Model `{}` has no tokenizer: structured output needs one.", st.model_id)));
    }
    let out = if param.ends_with("json") {
        // a schema, or its JSON text
        let parsed;
        let v = match v {
            Value::String(t) => {
                parsed = serde_json::from_str::<Value>(t).map_err(|e| bad(format!("Invalid JSON schema text: {e}")))?;
                &parsed
            }
            v => v,
        };
        Structured::Schema(Arc::new(JsonSchema::compile(v).map_err(|e| bad(format!("Invalid schema: {e}")))?))
    } else if param.ends_with("regex") {
        let Some(p) = v.as_str() else { return Err(bad("Expected a regular expression string.".into())) };
        Structured::Regex(Arc::new(
            Pattern::compile_full(p).map_err(|e| bad(format!("The regular expression {p:?} {e}")))?,
        ))
    } else {
        let choices: Option<Vec<String>> = v
            .as_array()
            .filter(|a| !a.is_empty())
            .and_then(|a| a.iter().map(|c| c.as_str().map(String::from)).collect());
        let Some(choices) = choices else { return Err(bad("Expected a non-empty array of strings.".into())) };
        Structured::Regex(Arc::new(Pattern::compile_choice(&choices).map_err(|e| bad(format!("The choices {e}")))?))
    };
    let _ = st.json_vocab();
    Ok(Some(out))
}
