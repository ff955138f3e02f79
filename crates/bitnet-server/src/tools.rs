//! Tool calls (OpenAI's `tools` and `tool_choice`) for any model, whatever its chat template
//! knows: as llama.cpp's "generic" tool format does, the tools are described in a system
//! message and the reply is constrained (a JSON schema, `bitnet_core::json_schema`) to one
//! object, either a call or a plain answer:
//!
//! - `{"tool": "<name>", "arguments": {...}}`: a call, its arguments matching that tool's
//!   `parameters` schema (a tagged union over the tools, so the arguments follow the name);
//! - `{"tool": "none", "content": "..."}`: an answer in words (only with `tool_choice: "auto"`).
//!
//! `tool_choice`: `"auto"` (the default with tools) allows both, `"required"` a call to any tool,
//! `{"type": "function", "function": {"name": ...}}` a call to that one, `"none"` ignores the
//! tools. One call per reply (`parallel_tool_calls` is accepted; a model calls again after the
//! tool's result). The reply comes back in OpenAI's shape: `message.tool_calls` with the
//! arguments as a JSON string and `finish_reason: "tool_calls"`, or `message.content`; streamed
//! as it comes ([`ReplyStream`]). Earlier
//! calls in the history (assistant messages with `tool_calls`) are shown to the model in the same
//! JSON form, tool results as messages of role `tool`.

use std::sync::Arc;

use bitnet_core::json_schema::JsonSchema;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Most tools per request.
const MAX_TOOLS: usize = 128;
/// The tag of a plain answer (so no tool may be named so under `"auto"`).
const ANSWER: &str = "none";

/// The tools a request offers, as the constraint and the system text that explains it.
#[derive(Debug, Clone)]
pub struct Tools {
    pub schema: Arc<JsonSchema>,
    /// appended to the system message (or the first message, a system one, when there is none)
    pub system: String,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::param(param, msg).with_code("invalid_value")
}

/// `tools` and `tool_choice` of a chat request: `None` when there are no tools or the choice is
/// `"none"`.
pub fn parse(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => {
            return match obj.get("tool_choice") {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                Some(_) => Err(bad("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")),
            };
        }
        Some(Value::Array(t)) if !t.is_empty() && t.len() <= MAX_TOOLS => t,
        Some(_) => return Err(bad("tools", format!("'tools' must be an array of 1 to {MAX_TOOLS} tools."))),
    };
    // (name, description, parameters) per tool
    let mut defs: Vec<(String, String, Value)> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let p = format!("tools[{i}]");
        let f = match (t.get("type").and_then(Value::as_str), t.get("function").and_then(Value::as_object)) {
            (Some("function"), Some(f)) => f,
            _ => return Err(bad(&p, "Each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}.")),
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n)
                if !n.is_empty()
                    && n.len() <= 64
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                n
            }
            _ => {
                return Err(bad(
                    &format!("{p}.function.name"),
                    "A function name must be 1 to 64 letters, digits, underscores or dashes.",
                ))
            }
        };
        if defs.iter().any(|(n, _, _)| n == name) {
            return Err(bad(&format!("{p}.function.name"), format!("Two tools are named '{name}'.")));
        }
        let description = f.get("description").and_then(Value::as_str).unwrap_or("").to_string();
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v) => v.clone(),
        };
        defs.push((name.to_string(), description, params));
    }
    // which replies are allowed
    let (names, answer): (Vec<&str>, bool) = match obj.get("tool_choice") {
        None | Some(Value::Null) => (defs.iter().map(|d| d.0.as_str()).collect(), true),
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => (defs.iter().map(|d| d.0.as_str()).collect(), true),
            "required" => (defs.iter().map(|d| d.0.as_str()).collect(), false),
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("Invalid 'tool_choice': '{other}'; expected 'none', 'auto', 'required' or a function."),
                ))
            }
        },
        Some(Value::Object(c)) => {
            let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (c.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) if defs.iter().any(|d| d.0 == n) => (vec![n], false),
                (Some("function"), Some(n)) => {
                    return Err(bad("tool_choice", format!("'tool_choice' names '{n}', which is not in 'tools'.")))
                }
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "Invalid 'tool_choice': expected {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                    ))
                }
            }
        }
        Some(_) => return Err(bad("tool_choice", "Invalid type for 'tool_choice'.")),
    };
    if answer && names.contains(&ANSWER) {
        return Err(bad(
            "tools",
            format!(
                "A tool named '{ANSWER}' cannot be offered with tool_choice 'auto' (that name marks a plain answer)."
            ),
        ));
    }
    // the reply's schema: a tagged union on "tool"
    let mut alts: Vec<Value> = Vec::new();
    let mut alt_names: Vec<&str> = Vec::new();
    let mut listing = String::new();
    for (name, description, params) in &defs {
        if !names.contains(&name.as_str()) {
            continue;
        }
        alt_names.push(name);
        alts.push(json!({"type": "object", "properties": {"tool": {"const": name}, "arguments": params},
            "required": ["tool", "arguments"], "additionalProperties": false}));
        let params_text = serde_json::to_string(params).unwrap_or_default();
        listing.push_str(&format!("- {name}: {description} {params_text}\n"));
    }
    if answer {
        alts.push(json!({"type": "object", "properties": {"tool": {"const": ANSWER}, "content": {"type": "string"}},
            "required": ["tool", "content"], "additionalProperties": false}));
    }
    let schema = json!({"anyOf": alts});
    let compiled = JsonSchema::compile(&schema).map_err(|e| {
        // name the tool whose parameters are at fault
        let tool =
            e.path.strip_prefix("/anyOf/").and_then(|r| r.split('/').next()).and_then(|i| i.parse::<usize>().ok());
        let which = tool.and_then(|i| alt_names.get(i)).map_or(String::new(), |n| format!(" of tool '{n}'"));
        bad("tools", format!("Unsupported 'parameters'{which}: {e}"))
    })?;
    let mut system = format!("Tools (name: description, JSON schema of the arguments):\n{listing}");
    system.push_str("Reply with one JSON object: {\"tool\": NAME, \"arguments\": {...}} to call a tool");
    if answer {
        system.push_str(&format!(", or {{\"tool\": \"{ANSWER}\", \"content\": TEXT}} to answer."));
    } else {
        system.push('.');
    }
    Ok(Some(Tools { schema: Arc::new(compiled), system }))
}

/// An assistant message's `tool_calls` as the model writes them (one JSON object per call, one
/// per line).
pub fn calls_text(calls: &Value, i: usize) -> Result<String, ApiError> {
    let p = format!("messages[{i}].tool_calls");
    let Some(calls) = calls.as_array() else { return Err(bad(&p, "'tool_calls' must be an array.")) };
    let mut out = Vec::new();
    for (j, c) in calls.iter().enumerate() {
        let f = c.get("function");
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let args = f.and_then(|f| f.get("arguments")).and_then(Value::as_str);
        let (Some(name), Some(args)) = (name, args) else {
            return Err(bad(
                &format!("{p}[{j}]"),
                "A tool call needs 'function' with 'name' and 'arguments' (a JSON string).",
            ));
        };
        // the arguments as JSON when they parse (they should), else as the string they are
        let args: Value = serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_string()));
        out.push(json!({"tool": name, "arguments": args}).to_string());
    }
    Ok(out.join("\n"))
}

/// A finished reply in the tool format, as OpenAI's message fields and finish reason: a call
/// (`tool_calls` with the arguments as the model wrote them, "tool_calls") or an answer
/// (`content`, "stop"). `None` when the text is not a complete reply (cut by `max_tokens`).
pub fn reply(text: &str) -> Option<(Value, &'static str)> {
    let v: Value = serde_json::from_str(text).ok()?;
    let (name, answer, v0) = head(text)?;
    if answer {
        let c = v.get("content")?.as_str()?;
        return Some((json!({"content": c}), "stop"));
    }
    let args = &text[v0..v0 + args_end(&text[v0..])];
    let call = json!({"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}});
    Some((json!({"content": null, "tool_calls": [call]}), "tool_calls"))
}

/// The start of a reply, `{"tool": NAME, "arguments": ` or `{"tool": "none", "content": `, once
/// it has come in full: the name, whether it is an answer, and where the value starts.
fn head(text: &str) -> Option<(String, bool, usize)> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    let lit = |i: &mut usize, s: &[u8]| {
        let ok = b[*i..].starts_with(s);
        if ok {
            *i += s.len();
        }
        ok
    };
    ws(&mut i);
    let ok = lit(&mut i, b"{");
    ws(&mut i);
    let ok = ok && lit(&mut i, b"\"tool\"");
    ws(&mut i);
    let ok = ok && lit(&mut i, b":");
    ws(&mut i);
    if !(ok && lit(&mut i, b"\"")) {
        return None;
    }
    // tool names (and the answer's tag) need no escapes
    let end = i + b[i..].iter().position(|&c| c == b'"')?;
    let name = text[i..end].to_string();
    i = end + 1;
    ws(&mut i);
    let answer = name == ANSWER;
    let ok = lit(&mut i, b",");
    ws(&mut i);
    let ok = ok && lit(&mut i, if answer { b"\"content\"" } else { b"\"arguments\"" });
    ws(&mut i);
    let ok = ok && lit(&mut i, b":");
    ws(&mut i);
    ok.then_some((name, answer, i))
}

/// Whether the reply's head (its kind and name) has come: then streaming has started.
pub fn reply_started(text: &str) -> bool {
    head(text).is_some()
}

/// Where a complete reply's arguments end (its value and the closing `}` with the whitespace
/// around it follow).
fn args_end(v: &str) -> usize {
    let t = v.trim_end_matches([' ', '\t', '\n', '\r']);
    let t = t.strip_suffix('}').unwrap_or(t);
    t.trim_end_matches([' ', '\t', '\n', '\r']).len()
}

/// A streamed reply's next piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// a call starts: its id and the tool's name
    Call { id: String, name: String },
    /// more of the call's arguments, as the model writes them
    Args(String),
    /// more of the answer's text (decoded)
    Content(String),
}

/// A reply in the tool format turned into deltas as it comes in: the call's name once read,
/// then its arguments (holding back only a last `}` and whitespace, which may be the reply's
/// own end), or the answer's text decoded (holding back an incomplete escape).
#[derive(Debug, Default)]
pub struct ReplyStream {
    /// bytes of the value already sent (arguments: from the value's start; an answer: from
    /// just after its opening quote)
    sent: usize,
    call: bool,
}

impl ReplyStream {
    /// Whether a call has started (else: an answer, or nothing yet).
    pub fn is_call(&self) -> bool {
        self.call
    }

    /// The deltas `text` (the reply so far) adds to what was sent.
    pub fn update(&mut self, text: &str) -> Vec<Delta> {
        let Some((name, answer, v0)) = head(text) else { return Vec::new() };
        let mut out = Vec::new();
        if answer {
            let s = text.get(v0 + 1..).unwrap_or("");
            let (piece, upto) = decode_prefix(s, self.sent);
            self.sent = upto;
            if !piece.is_empty() {
                out.push(Delta::Content(piece));
            }
            return out;
        }
        if !self.call {
            self.call = true;
            out.push(Delta::Call { id: call_id(), name });
        }
        // a last `}` (with whitespace around) may be the reply's own end: held back, and dropped
        // when the reply is complete (`args_end` either way)
        let v = &text[v0..];
        let end = args_end(v);
        if end > self.sent {
            out.push(Delta::Args(v[self.sent..end].to_string()));
            self.sent = end;
        }
        out
    }
}

/// Decodes the JSON string text `s` (no opening quote) from byte `from` up to its closing quote
/// or its last complete character or escape: the text and where decoding stopped.
fn decode_prefix(s: &str, from: usize) -> (String, usize) {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = from;
    let hex = |i: usize| s.get(i..i + 4).and_then(|h| u32::from_str_radix(h, 16).ok());
    while i < b.len() {
        match b[i] {
            b'"' => break,
            b'\\' => {
                let Some(&e) = b.get(i + 1) else { break };
                let (c, n) = match e {
                    b'u' => {
                        let Some(u) = hex(i + 2) else { break };
                        if (0xd800..0xdc00).contains(&u) {
                            // a high surrogate: its low half must have come too
                            let Some(lo) = hex(i + 8).filter(|_| s.get(i + 6..i + 8) == Some("\\u")) else { break };
                            (char::from_u32(0x10000 + ((u - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)), 12)
                        } else {
                            (char::from_u32(u), 6)
                        }
                    }
                    b'n' => (Some('\n'), 2),
                    b't' => (Some('\t'), 2),
                    b'r' => (Some('\r'), 2),
                    b'b' => (Some('\u{8}'), 2),
                    b'f' => (Some('\u{c}'), 2),
                    other => (Some(other as char), 2),
                };
                out.extend(c);
                i += n;
            }
            _ => {
                let c = s[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    (out, i)
}

/// A new tool call's id.
fn call_id() -> String {
    format!("call_{:016x}", rand_id())
}

/// A call id's random part (unique enough: the clock and a counter).
fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming a reply one byte-sized piece at a time gives what the whole reply gives.
    #[test]
    fn streamed_pieces_add_up_to_the_reply() {
        for text in [
            "{\"tool\": \"add\", \"arguments\": {\"a\": 1, \"b\": {\"c\": [2]}}}",
            " {\n\"tool\":\"w\",\n \"arguments\" :{}\n}",
            "{\"tool\": \"none\", \"content\": \"caf\u{e9} \\n \\\"q\\\" \\u00e9 \\ud83d\\ude00 end\"  }",
        ] {
            let (want, finish) = reply(text).expect("a complete reply");
            let mut rs = ReplyStream::default();
            let (mut name, mut args, mut content) = (String::new(), String::new(), String::new());
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            for (i, c) in &chars {
                let upto = &text[..i + c.len_utf8()];
                for d in rs.update(upto) {
                    match d {
                        Delta::Call { name: n, .. } => name = n,
                        Delta::Args(a) => args.push_str(&a),
                        Delta::Content(c) => content.push_str(&c),
                    }
                }
            }
            match finish {
                "tool_calls" => {
                    let f = &want["tool_calls"][0]["function"];
                    assert_eq!(name, f["name"].as_str().unwrap());
                    assert_eq!(args, f["arguments"].as_str().unwrap());
                    assert!(serde_json::from_str::<Value>(&args).is_ok(), "{args}");
                }
                _ => assert_eq!(content, want["content"].as_str().unwrap()),
            }
        }
        assert_eq!(decode_prefix("ab\\u00", 0), ("ab".to_string(), 2));
        assert_eq!(decode_prefix("\\ud83d\\ude0", 0), (String::new(), 0));
    }
}
