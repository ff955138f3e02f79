//! Chat templates: HF-style Jinja templates rendered with minijinja the way transformers'
//! `apply_chat_template` renders them (trim_blocks + lstrip_blocks, Python string methods via
//! pycompat, `raise_exception`, `strftime_now`, `bos_token`/`eos_token` variables).
//!
//! BitNet b1.58 2B-4T's template is `Role: content<|eot_id|>` per message (role capitalized,
//! content trimmed), then `Assistant: ` for the generation prompt; the tokenizer adds BOS.

use std::path::Path;

use minijinja::{context, Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// BitNet b1.58 2B-4T's chat template, verbatim from its tokenizer_config.json.
pub const BITNET_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// The template bitnet.cpp's converter (convert-ms-to-gguf-bitnet.py) hard-codes into GGUF files.
pub const BITNET_CPP_GGUF_TEMPLATE: &str = "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

/// Llama 3 BOS, the bos of BitNet b1.58 2B-4T.
const LLAMA3_BOS: &str = "<|begin_of_text|>";
/// Llama 3 end-of-turn, the eos of BitNet b1.58 2B-4T's tokenizer_config.json.
const LLAMA3_EOT: &str = "<|eot_id|>";

/// The name the template is stored under; it shows up in error messages.
const TEMPLATE_NAME: &str = "chat_template";

/// One chat turn, as in the OpenAI / HF messages list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A parsed chat template plus the bos/eos strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// HF's `raise_exception(msg)`: templates use it to reject unsupported message orders.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// HF's `strftime_now(fmt)` (Llama 3.1-style templates put today's date in the system prompt).
/// UTC, because we carry no time-zone database.
fn strftime_now(fmt: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(&fmt, secs)
}

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A small strftime: %Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%; other directives are copied as-is.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let wday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let yday = CUMULATIVE[(m - 1) as usize] + d + u32::from(leap && m > 2);
    let month = MONTHS[(m - 1) as usize];
    let day = DAYS[wday];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&day[..3]),
            Some('A') => out.push_str(day),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// An environment configured like transformers' chat-template sandbox.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    // transformers renders with trim_blocks=True, lstrip_blocks=True; whitespace is part of the prompt.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // HF templates call Python string/dict methods: .strip(), .capitalize(), .items(), ...
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Whether a GGUF `tokenizer.chat_template` is a real Jinja chat template we should render.
///
/// False for bitnet.cpp's converter template (see [`ChatTemplate::from_gguf_template`]), for
/// llama.cpp-style template *names* ("chatml", "llama3") that are not Jinja at all, and for text
/// that does not parse.
pub fn is_usable_jinja(source: &str) -> bool {
    if source.contains("BITNETAssistant") {
        return false;
    }
    let has_tags = source.contains("{%") || source.contains("{{");
    if !has_tags || !source.contains("messages") {
        return false;
    }
    hf_environment().template_from_str(source).is_ok()
}

/// The chat template text of a tokenizer_config.json value: a string, or a list of {name, template}
/// from which HF picks "default" (we fall back to the first when there is no "default").
fn template_from_value(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|e| {
                    let name = e.get("name").and_then(|n| n.as_str());
                    let tmpl = e.get("template").and_then(|t| t.as_str())?;
                    (want.is_none() || name == want).then(|| tmpl.to_owned())
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    }
}

/// A tokenizer_config token entry: a string or an AddedToken object with "content".
fn config_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ChatTemplate {
    /// Parse a template; a syntax error becomes `Error::Template` with minijinja's message and line.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = hf_environment();
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::Template(format!("cannot parse: {e}")))?;
        Ok(ChatTemplate { env, source, bos_token, eos_token })
    }

    /// The template of a tokenizer_config.json (string or named list); None when it has none.
    ///
    /// Newer transformers save the template beside it instead, as `chat_template.jinja` or
    /// `chat_template.json`; those are read when the config has no `chat_template`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let bos = config_token(cfg.get("bos_token")).unwrap_or_default();
        let eos = config_token(cfg.get("eos_token")).unwrap_or_default();

        let mut source = cfg.get("chat_template").and_then(template_from_value);
        if source.is_none() {
            if let Some(dir) = path.parent() {
                source = Self::sibling_template(dir)?;
            }
        }
        match source {
            None => Ok(None),
            Some(s) => Self::new(s, bos, eos).map(Some).map_err(|e| Error::format(path, e.to_string())),
        }
    }

    /// `chat_template.jinja` or `chat_template.json` in a model directory, if present.
    fn sibling_template(dir: &Path) -> Result<Option<String>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
        }
        let json = dir.join("chat_template.json");
        if json.is_file() {
            let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&json, format!("not valid JSON: {e}")))?;
            return Ok(v.get("chat_template").and_then(template_from_value));
        }
        Ok(None)
    }

    /// The template of a HF model directory (tokenizer_config.json or chat_template.jinja/json), else [`ChatTemplate::bitnet_default`].
    pub fn from_model_dir_or_default(dir: &Path) -> Result<ChatTemplate> {
        let cfg = dir.join("tokenizer_config.json");
        let found = if cfg.is_file() {
            Self::from_tokenizer_config(&cfg)?
        } else {
            Self::sibling_template(dir)?.map(|s| Self::new(s, LLAMA3_BOS.into(), LLAMA3_EOT.into())).transpose()?
        };
        Ok(found.unwrap_or_else(Self::bitnet_default))
    }

    /// BitNet b1.58 2B-4T's own template, the model family's known template.
    pub fn bitnet_default() -> ChatTemplate {
        Self::bitnet_with_tokens(LLAMA3_BOS, LLAMA3_EOT)
    }

    fn bitnet_with_tokens(bos: &str, eos: &str) -> ChatTemplate {
        // A compile-time constant that the tests render; it cannot fail to parse.
        Self::new(BITNET_CHAT_TEMPLATE.to_owned(), bos.to_owned(), eos.to_owned())
            .expect("built-in BitNet chat template parses")
    }

    /// The template to use for a GGUF file: its `tokenizer.chat_template` when that is a real Jinja
    /// chat template, else [`ChatTemplate::bitnet_default`].
    ///
    /// Why: bitnet.cpp's converter does not copy the model's template into the GGUF. It writes its
    /// own (`Human: ...\n\nBITNETAssistant: <eos>`), which is not the format 2B-4T was trained on
    /// (`User: ...<|eot_id|>Assistant: `), puts an EOS right before the reply, and ignores
    /// add_generation_prompt. Rendering it would give a wrong prompt, so it is replaced by the
    /// family's known template; so is anything that is not Jinja (e.g. a llama.cpp template name).
    pub fn from_gguf_template(source: Option<&str>, bos: &str, eos: &str) -> ChatTemplate {
        if let Some(s) = source.filter(|s| is_usable_jinja(s)) {
            if let Ok(t) = Self::new(s.to_owned(), bos.to_owned(), eos.to_owned()) {
                return t;
            }
        }
        Self::bitnet_with_tokens(bos, eos)
    }

    /// Render the prompt for `messages`; `add_generation_prompt` appends the assistant cue.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Template(format!("cannot render: {e}")))
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` string the template sees.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The `eos_token` string the template sees.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn bitnet_default_renders_family_format() {
        let t = ChatTemplate::bitnet_default();
        let m = msgs(&[("system", "Be brief."), ("user", "  Hi there \n")]);
        assert_eq!(
            t.render(&m, true).expect("render"),
            "System: Be brief.<|eot_id|>User: Hi there<|eot_id|>Assistant: "
        );
        assert_eq!(t.render(&m, false).expect("render"), "System: Be brief.<|eot_id|>User: Hi there<|eot_id|>");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(strftime_utc("%d %b %Y %a %A %B %j %I%p %%", t), "29 Feb 2024 Thu Thursday February 060 01PM %");
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        assert_eq!(strftime_utc("%Y-%m-%d %j", 1_735_603_200), "2024-12-31 366");
    }
}
