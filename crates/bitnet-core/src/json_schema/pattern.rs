//! `pattern` on strings: the regular expression compiled (by `regex-automata`) into a DFA over
//! the string's bytes, then copied into a plain table of the states reachable from the start
//! where every transition into a state that can no longer reach a match is cut. So a string the
//! matcher lets start can always be finished into one that matches (the invariant of
//! `matcher.rs`), and a step is one table lookup.
//!
//! Semantics are JSON Schema's: the pattern matches anywhere in the string unless anchored
//! (`^`, `$`), so the DFA is built for `(?s:.)*(?:pattern)(?s:.)*`, whole-string. The syntax is
//! ECMA 262's as far as Rust's regex syntax shares it; `\d`, `\w` (and `\D`, `\W` outside
//! classes) are ASCII as in ECMA 262, `[` inside a class is literal; lookaround and
//! backreferences are refused. A string under a pattern is written with the one-character
//! escapes only (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`; no `\u`), whose decoded byte
//! is what the DFA reads.

use std::collections::HashMap;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

/// A transition to nowhere (no match can follow).
pub const DEAD: u32 = u32::MAX;
/// Most DFA states a pattern may have (the table holds 256 transitions per state).
const MAX_STATES: usize = 4096;

/// A pattern's DFA: `next[s * 256 + b]`, or [`DEAD`].
#[derive(Debug, Clone)]
pub struct Pattern {
    next: Vec<u32>,
    /// `accept[s]`: the string may end in state `s`
    accept: Vec<bool>,
    /// `last[s]`: no byte may follow in state `s`
    last: Vec<bool>,
}

impl Pattern {
    pub const START: u32 = 0;

    /// The state after byte `b` in state `s`, or [`DEAD`].
    pub fn next(&self, s: u32, b: u8) -> u32 {
        self.next[s as usize * 256 + b as usize]
    }

    /// Whether the text may end in state `s`.
    pub fn accepts(&self, s: u32) -> bool {
        self.accept[s as usize]
    }

    pub(crate) fn states(&self) -> usize {
        self.accept.len()
    }

    /// Whether nothing may follow in state `s` (the text is complete).
    pub(crate) fn is_last(&self, s: u32) -> bool {
        self.last[s as usize]
    }

    /// Compiles `p` (a JSON Schema `pattern`): matched anywhere in a JSON string's decoded text.
    pub(crate) fn compile(p: &str) -> Result<Pattern, String> {
        Self::build(&format!("(?s:.)*(?:{})(?s:.)*", translate(p)?), writable)
    }

    /// Compiles `p` for raw text (vLLM's `regex`): the whole text must match, any byte may be
    /// written.
    pub fn compile_full(p: &str) -> Result<Pattern, String> {
        Self::build(&format!("(?:{})", translate(p)?), |_| true)
    }

    /// Compiles `p` as the alternatives `choices`, each literal, the whole text one of them.
    pub fn compile_choice(choices: &[String]) -> Result<Pattern, String> {
        let alts: Vec<String> = choices.iter().map(|c| escape(c)).collect();
        Self::build(&format!("(?:{})", alts.join("|")), |_| true)
    }

    fn build(wrapped: &str, writable: fn(u8) -> bool) -> Result<Pattern, String> {
        let dfa = dense::Builder::new()
            .configure(
                dense::DFA::config()
                    .start_kind(StartKind::Anchored)
                    .match_kind(MatchKind::All)
                    .minimize(true)
                    .dfa_size_limit(Some(8 << 20))
                    .determinize_size_limit(Some(8 << 20)),
            )
            .build(wrapped)
            .map_err(|e| format!("cannot be compiled: {e}"))?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| format!("cannot be compiled: {e}"))?;
        // the states reachable from the start over the bytes a string can carry
        let mut ids = HashMap::from([(start, 0u32)]);
        let mut order = vec![start];
        let mut next: Vec<u32> = Vec::new();
        let mut accept = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let s = order[i];
            accept.push(dfa.is_match_state(dfa.next_eoi_state(s)));
            for b in 0..=255u8 {
                let t = dfa.next_state(s, b);
                if !writable(b) || dfa.is_dead_state(t) || dfa.is_quit_state(t) {
                    next.push(DEAD);
                    continue;
                }
                let n = ids.len() as u32;
                let id = *ids.entry(t).or_insert_with(|| {
                    order.push(t);
                    n
                });
                next.push(id);
            }
            if order.len() > MAX_STATES {
                return Err(format!("is too complex (more than {MAX_STATES} DFA states)"));
            }
            i += 1;
        }
        // the states that can still reach an accepting one: backwards from those
        let n = order.len();
        let mut preds: Vec<Vec<u32>> = vec![Vec::new(); n];
        for s in 0..n {
            for &t in &next[s * 256..(s + 1) * 256] {
                if t != DEAD {
                    preds[t as usize].push(s as u32);
                }
            }
        }
        let mut live = accept.clone();
        let mut stack: Vec<u32> = (0..n as u32).filter(|&s| accept[s as usize]).collect();
        while let Some(t) = stack.pop() {
            for &s in &preds[t as usize] {
                if !live[s as usize] {
                    live[s as usize] = true;
                    stack.push(s);
                }
            }
        }
        if !live[0] {
            return Err("matches no string that can be written".into());
        }
        for t in next.iter_mut() {
            if *t != DEAD && !live[*t as usize] {
                *t = DEAD;
            }
        }
        let last = (0..n).map(|s| next[s * 256..(s + 1) * 256].iter().all(|&t| t == DEAD)).collect();
        Ok(Pattern { next, accept, last })
    }
}

/// Whether a string under a pattern can hold byte `b` (controls only through the escapes
/// allowed there).
fn writable(b: u8) -> bool {
    b >= 0x20 || matches!(b, 0x08 | 0x0c | b'\n' | b'\r' | b'\t')
}

/// `s` as a regular expression that matches it literally.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// ECMA 262 pattern syntax into Rust's where they differ in what common patterns use.
fn translate(p: &str) -> Result<String, String> {
    let mut out = String::with_capacity(p.len() + 16);
    let mut in_class = false;
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(e) = chars.next() else { return Err("ends with a lone backslash".into()) };
                let class = match e {
                    'd' => Some(("[0-9]", "0-9")),
                    'w' => Some(("[0-9A-Za-z_]", "0-9A-Za-z_")),
                    'D' => Some(("[^0-9]", "")),
                    'W' => Some(("[^0-9A-Za-z_]", "")),
                    _ => None,
                };
                match (class, in_class) {
                    (Some((_, "")), true) => return Err(format!("\\{e} inside a character class is not supported")),
                    (Some((_, inner)), true) => out.push_str(inner),
                    (Some((outer, _)), false) => out.push_str(outer),
                    (None, _) => {
                        out.push('\\');
                        out.push(e);
                    }
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                // a leading `]` or `^]` is literal in both; keep it out of the loop's way
                if chars.peek() == Some(&'^') {
                    out.push(chars.next().unwrap_or('^'));
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                    out.push_str("\\]");
                }
            }
            // literal in ECMA 262 classes, nesting or set operators in Rust's
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            ']' if in_class => {
                in_class = false;
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the whole of `s` is accepted, and the byte index where it was cut if not.
    fn run(p: &Pattern, s: &str) -> Result<bool, usize> {
        let mut st = Pattern::START;
        for (i, &b) in s.as_bytes().iter().enumerate() {
            st = p.next(st, b);
            if st == DEAD {
                return Err(i);
            }
        }
        Ok(p.accepts(st))
    }

    #[test]
    fn patterns_match_anywhere_unless_anchored() {
        let zip = Pattern::compile(r"^\d{5}(-\d{4})?$").unwrap();
        assert_eq!(run(&zip, "12345"), Ok(true));
        assert_eq!(run(&zip, "12345-6789"), Ok(true));
        assert_eq!(run(&zip, "1234"), Ok(false));
        assert_eq!(run(&zip, "1234a"), Err(4));
        assert_eq!(run(&zip, "123456"), Err(5));
        // \d is ASCII
        assert_eq!(run(&zip, "١٢٣٤٥"), Err(0));
        let any = Pattern::compile("ab").unwrap();
        assert_eq!(run(&any, "xxabyy"), Ok(true));
        assert_eq!(run(&any, "xxa"), Ok(false));
        let class = Pattern::compile(r"^[\w.-]+@[a-z]+\.[a-z]{2,}$").unwrap();
        assert_eq!(run(&class, "a.b-c@x.io"), Ok(true));
        assert_eq!(run(&class, "a@b"), Ok(false));
        assert_eq!(run(&class, "@"), Err(0));
        let bracket = Pattern::compile(r"^[[\]]+$").unwrap();
        assert_eq!(run(&bracket, "[]]["), Ok(true));
        let uni = Pattern::compile("^é.$").unwrap();
        assert_eq!(run(&uni, "é日"), Ok(true));
    }

    #[test]
    fn full_text_patterns_and_choices() {
        let p = Pattern::compile_full(r"[0-9]{2}-[a-z]{1,3}").unwrap();
        assert_eq!(run(&p, "12-ab"), Ok(true));
        assert_eq!(run(&p, "12-"), Ok(false));
        assert_eq!(run(&p, "12-abcd"), Err(6));
        assert_eq!(run(&p, "x12-a"), Err(0));
        // control bytes may be written in raw text
        let nl = Pattern::compile_full("a\nb").unwrap();
        assert_eq!(run(&nl, "a\nb"), Ok(true));
        let c = Pattern::compile_choice(&["yes".into(), "no".into(), "a.b (c)*".into()]).unwrap();
        for ok in ["yes", "no", "a.b (c)*"] {
            let mut st = Pattern::START;
            for &b in ok.as_bytes() {
                st = c.next(st, b);
            }
            assert!(c.accepts(st) && c.is_last(st), "{ok}");
        }
        assert_eq!(run(&c, "a.b (c)"), Ok(false));
        assert_eq!(run(&c, "axb"), Err(1));
        assert_eq!(run(&c, "ye"), Ok(false));
    }

    #[test]
    fn unsupported_patterns_are_refused() {
        for p in [r"(a)\1", "(?=a)", r"[\D]", "\\", r"^a$b"] {
            assert!(Pattern::compile(p).is_err(), "{p}");
        }
    }
}
