//! From generated token ids to the text a client sees: streaming detokenization that never
//! splits a UTF-8 character, and stop strings matched on the detokenized text.

use std::sync::Arc;

use bitnet_core::engine::{Engine, ModelMeta};
use bitnet_core::logprobs::TokenLogprobs;
use bitnet_core::tokenizer::StreamDecoder;
use serde_json::{json, Map, Value};

/// Finds stop strings in streamed text. Text that could still be the beginning of a stop string
/// is held back until the next piece decides; once a stop string is found, the text before it is
/// released and everything after it is dropped.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds a piece of text; returns the text that is now safe to send, and whether a stop
    /// string was found (nothing more is accepted after that).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(p) = first {
            let out = self.held[..p].to_string();
            self.held.clear();
            self.stopped = true;
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let len = self.held.len();
        let mut keep = 0;
        for k in (1..len.saturating_add(1)).rev() {
            let start = len - k;
            if !self.held.is_char_boundary(start) {
                continue;
            }
            let tail = &self.held[start..];
            if self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail)) {
                keep = k;
                break;
            }
        }
        let out: String = self.held.drain(..len - keep).collect();
        (out, false)
    }

    /// Releases what is held (end of generation without a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Turns the token stream of one request into text pieces (and keeps the ids).
pub struct Assembler {
    engine: Arc<Engine<ModelMeta>>,
    decoder: Option<StreamDecoder>,
    stop: StopMatcher,
    /// completion tokens counted for usage (up to the one that completed a stop string)
    pub n_tokens: usize,
    /// ids not yet taken by [`Assembler::take_ids`]
    ids: Vec<u32>,
    keep_ids: bool,
    /// log-probability entries not yet taken by [`Assembler::take_logprobs`]
    lps: Vec<LpEntry>,
    /// characters of the token strings so far (the legacy `text_offset`)
    lp_chars: usize,
}

/// One generated token as `logprobs` report it: its text (lossy where it ends inside a UTF-8
/// character), its exact bytes, its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct LpEntry {
    pub token: String,
    pub bytes: Vec<u8>,
    /// None for the first prompt token (`echo`: nothing comes before it)
    pub logprob: Option<f32>,
    pub top: Option<Vec<(String, Vec<u8>, f32)>>,
    /// characters of the completion's token strings before this one
    pub offset: usize,
}

/// A log-probability as JSON: non-finite values (a token the model gives no mass) as -9999, as
/// vLLM does, since JSON has no -inf.
fn lp_num(v: f32) -> f32 {
    if v.is_finite() {
        v
    } else {
        -9999.0
    }
}

/// The `logprobs` object of a choice: the chat form (`content`: one object per token with
/// `top_logprobs`) or the legacy completions form (parallel lists; each `top_logprobs` map also
/// holds the chosen token, so up to k + 1 entries, as OpenAI documents).
pub fn logprobs_json(chat: bool, entries: &[LpEntry]) -> Value {
    if chat {
        let content: Vec<Value> = entries
            .iter()
            .map(|e| {
                let top: Vec<Value> = e
                    .top
                    .iter()
                    .flatten()
                    .map(|(t, b, lp)| json!({"token": t, "logprob": lp_num(*lp), "bytes": b}))
                    .collect();
                json!({"token": e.token, "logprob": e.logprob.map(lp_num), "bytes": e.bytes, "top_logprobs": top})
            })
            .collect();
        json!({"content": content, "refusal": null})
    } else {
        let top: Vec<Value> = entries
            .iter()
            .map(|e| {
                let (Some(top), Some(lp)) = (&e.top, e.logprob) else { return Value::Null };
                let mut m = Map::new();
                for (t, _, lp) in top {
                    m.entry(t.clone()).or_insert(json!(lp_num(*lp)));
                }
                m.entry(e.token.clone()).or_insert(json!(lp_num(lp)));
                Value::Object(m)
            })
            .collect();
        json!({
            "tokens": entries.iter().map(|e| &e.token).collect::<Vec<_>>(),
            "token_logprobs": entries.iter().map(|e| e.logprob.map(lp_num)).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        })
    }
}

impl Assembler {
    /// `keep_ids`: collect token ids (the `token_ids` extension); always on without a tokenizer.
    pub fn new(engine: Arc<Engine<ModelMeta>>, stops: Vec<String>, keep_ids: bool) -> Self {
        let decoder = engine.tokenizer.is_some().then(|| StreamDecoder::new(true));
        Assembler {
            keep_ids: keep_ids || decoder.is_none(),
            decoder,
            engine,
            stop: StopMatcher::new(stops),
            n_tokens: 0,
            ids: Vec::new(),
            lps: Vec::new(),
            lp_chars: 0,
        }
    }

    /// A token's text and bytes: from the tokenizer, or `token_id:N` (vLLM's form) without one.
    fn token_str(&self, id: u32) -> (String, Vec<u8>) {
        match self.engine.tokenizer.as_ref() {
            Some(t) => {
                let b = t.token_bytes(id).unwrap_or_default();
                (String::from_utf8_lossy(&b).into_owned(), b)
            }
            None => {
                let s = format!("token_id:{id}");
                let b = s.clone().into_bytes();
                (s, b)
            }
        }
    }

    pub fn has_text(&self) -> bool {
        self.decoder.is_some()
    }

    pub fn keeps_ids(&self) -> bool {
        self.keep_ids
    }

    /// One generated token (with its log-probabilities when the request asked for them): the
    /// text it completes (maybe empty) and whether a stop string ended the output. Tokens after
    /// a stop string are not counted, and get no log-probability entry.
    pub fn push(&mut self, id: u32, lp: Option<&TokenLogprobs>) -> Result<(String, bool), String> {
        if self.stop.stopped() {
            return Ok((String::new(), true));
        }
        self.n_tokens += 1;
        if self.keep_ids {
            self.ids.push(id);
        }
        if let Some(lp) = lp {
            self.push_entry(id, Some(lp));
        }
        let (Some(dec), Some(tok)) = (self.decoder.as_mut(), self.engine.tokenizer.as_ref()) else {
            return Ok((String::new(), false));
        };
        let piece = dec.push(tok, id).map_err(|e| e.to_string())?;
        match piece {
            Some(p) => Ok(self.stop.push(&p)),
            None => Ok((String::new(), false)),
        }
    }

    /// End of generation: whatever text is still pending.
    pub fn finish(&mut self) -> Result<String, String> {
        if self.stop.stopped() {
            return Ok(String::new());
        }
        let mut out = String::new();
        if let (Some(dec), Some(tok)) = (self.decoder.as_mut(), self.engine.tokenizer.as_ref()) {
            if let Some(p) = dec.flush(tok).map_err(|e| e.to_string())? {
                let (t, _) = self.stop.push(&p);
                out.push_str(&t);
            }
        }
        if !self.stop.stopped() {
            out.push_str(&self.stop.flush());
        }
        Ok(out)
    }

    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// The ids collected since the last call.
    pub fn take_ids(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.ids)
    }

    /// The entry of token `id` (`lp` None: the first prompt token).
    fn push_entry(&mut self, id: u32, lp: Option<&TokenLogprobs>) {
        let (token, bytes) = self.token_str(id);
        let top = lp.map(|lp| {
            lp.top()
                .iter()
                .map(|&(t, v)| {
                    let (s, b) = self.token_str(t);
                    (s, b, v)
                })
                .collect()
        });
        let offset = self.lp_chars;
        self.lp_chars += token.chars().count();
        self.lps.push(LpEntry { token, bytes, logprob: lp.map(|l| l.logprob), top, offset });
    }

    /// The prompt's log-probabilities (`echo`): one entry per prompt token, before the
    /// completion's.
    pub fn push_prompt(&mut self, prompt: &[u32], lps: &[Option<Box<TokenLogprobs>>]) {
        for (i, &id) in prompt.iter().enumerate() {
            self.push_entry(id, lps.get(i).and_then(|l| l.as_deref()));
        }
    }

    /// The log-probability entries collected since the last call.
    pub fn take_logprobs(&mut self) -> Vec<LpEntry> {
        std::mem::take(&mut self.lps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, s) = m.push(p);
            out.push_str(&t);
            if s {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_across_pieces() {
        assert_eq!(run(&["abc"], &["xa", "b", "cde"]), ("x".into(), true));
        assert_eq!(run(&["aab"], &["a", "a", "a", "b", "zz"]), ("a".into(), true));
        assert_eq!(run(&["\n\n"], &["hello\n", "world"]), ("hello\nworld".into(), false));
        assert_eq!(run(&["END", "x"], &["12", "3E", "N", "D"]), ("123".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!", "more"]), ("caf".into(), true));
    }

    #[test]
    fn held_text_is_released_early() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello S").0, "hello ");
        assert_eq!(m.push("x").0, "Sx");
    }
}
