//! From generated token ids to the text a client sees: streaming detokenization that never
//! splits a UTF-8 character, and stop strings matched on the detokenized text.

use std::sync::Arc;

use bitnet_core::engine::{Engine, ModelMeta};
use bitnet_core::tokenizer::StreamDecoder;

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
        }
    }

    pub fn has_text(&self) -> bool {
        self.decoder.is_some()
    }

    pub fn keeps_ids(&self) -> bool {
        self.keep_ids
    }

    /// One generated token: the text it completes (maybe empty) and whether a stop string ended
    /// the output.
    pub fn push(&mut self, id: u32) -> Result<(String, bool), String> {
        if self.stop.stopped() {
            return Ok((String::new(), true));
        }
        self.n_tokens += 1;
        if self.keep_ids {
            self.ids.push(id);
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
