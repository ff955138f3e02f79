//! JSON mode (OpenAI's `response_format: {"type": "json_object"}`, ollama's `format: "json"`):
//! generation constrained so that the output is one JSON object (RFC 8259).
//!
//! [`JsonState`] recognizes JSON byte by byte and rejects a byte as soon as no valid document
//! can start with the bytes fed so far. [`JsonVocab`] holds every ordinary token's bytes in a trie;
//! [`JsonVocab::allowed`] walks it with the state, so a step visits each byte prefix once and
//! prunes whole subtrees at the first bad byte, and lists the tokens that keep the output a valid
//! prefix. The sampler draws among those ([`crate::sampler::Sampler::set_allowed`]); the output
//! ends when the top-level object closes. Special and added tokens (eos included) are never
//! allowed: the end of the object ends the output. Whitespace outside strings is limited to
//! [`MAX_WS`] bytes in a row (a model can otherwise emit newlines forever), nesting to
//! [`MAX_DEPTH`] levels.
//!
//! [`JsonRun`] drives one sequence's constraint in the generation loops for every [`Shape`]: any
//! object, an object matching a schema (`crate::json_schema`), or raw text matching a regular
//! expression in full (vLLM's `regex` and `choice`, on the same trie walk).

use std::collections::HashSet;
use std::sync::Arc;

use crate::json_schema::matcher::{Frames, SchemaState};
use crate::json_schema::pattern::{Pattern, DEAD};
use crate::json_schema::JsonSchema;
use crate::tokenizer::Tokenizer;

/// Most whitespace bytes in a row outside strings.
pub const MAX_WS: u8 = 16;
/// Most nested objects and arrays.
pub const MAX_DEPTH: u8 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// after a backslash; `low`: it must start the low half of a surrogate pair (`\uDC00`-`\uDFFF`)
    Backslash {
        low: bool,
    },
    /// in `\uXXXX`: hex digits still to come and the value so far
    Hex {
        left: u8,
        val: u16,
        low: bool,
    },
    /// after a high surrogate (`\uD800`-`\uDBFF`): its low half must follow
    NeedLow,
}

/// Where the inside of a string stands: an escape or a UTF-8 sequence open, or neither.
/// Shared by [`JsonState`] and the schema matcher (`crate::json_schema`). Strict: the text
/// inside is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF),
/// and `\u` escapes of surrogates come in pairs, so strict parsers (`serde_json`) accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StrLex {
    esc: Esc,
    /// UTF-8: 0 none open; 1-3 continuation bytes (0x80-0xbf) still due; 4-7 the second
    /// byte of a sequence whose range is narrower: after 0xe0 (0xa0-0xbf, then 1), 0xed
    /// (0x80-0x9f, then 1), 0xf0 (0x90-0xbf, then 2), 0xf4 (0x80-0x8f, then 2)
    utf8: u8,
}

/// What a byte does inside a string.
pub(crate) enum StrStep {
    /// the closing quote
    Close,
    /// a byte of the string; `starts_char`: it begins a character (a plain byte, a UTF-8 lead
    /// byte, or the `\` of an escape other than a surrogate pair's second half)
    Next {
        lex: StrLex,
        starts_char: bool,
    },
    Reject,
}

impl StrLex {
    /// Just after the opening quote.
    pub(crate) const OPEN: StrLex = StrLex { esc: Esc::None, utf8: 0 };

    /// No escape or UTF-8 sequence open: string text (see `text_chars`) continues the string and
    /// leaves it so.
    pub(crate) fn is_plain(&self) -> bool {
        *self == StrLex::OPEN
    }

    /// Just after a backslash (the next byte is the escape's letter).
    pub(crate) fn after_backslash(&self) -> bool {
        matches!(self.esc, Esc::Backslash { .. })
    }

    pub(crate) fn step(self, b: u8) -> StrStep {
        let next = |esc, utf8, starts_char| StrStep::Next { lex: StrLex { esc, utf8 }, starts_char };
        if self.utf8 > 0 {
            let (range, left) = match self.utf8 {
                4 => (0xa0..=0xbf, 1),
                5 => (0x80..=0x9f, 1),
                6 => (0x90..=0xbf, 2),
                7 => (0x80..=0x8f, 2),
                n => (0x80..=0xbf, n - 1),
            };
            return if range.contains(&b) { next(Esc::None, left, false) } else { StrStep::Reject };
        }
        match self.esc {
            Esc::Backslash { low } => match b {
                b'u' => next(Esc::Hex { left: 4, val: 0, low }, 0, false),
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' if !low => next(Esc::None, 0, false),
                _ => StrStep::Reject,
            },
            Esc::Hex { left, val, low } => {
                let Some(d) = (b as char).to_digit(16) else { return StrStep::Reject };
                let val = val * 16 + d as u16;
                // refuse at the first digit that rules the pairing out: a low half must be
                // DC00-DFFF; an escape starting DC-DF is a low half without its high one
                let ok = match (left, low) {
                    (4, true) => val == 0xd,
                    (3, true) => (0xdc..=0xdf).contains(&val),
                    (3, false) => !(0xdc..=0xdf).contains(&val),
                    _ => true,
                };
                if !ok {
                    StrStep::Reject
                } else if left > 1 {
                    next(Esc::Hex { left: left - 1, val, low }, 0, false)
                } else if !low && (0xd800..=0xdbff).contains(&val) {
                    next(Esc::NeedLow, 0, false)
                } else {
                    next(Esc::None, 0, false)
                }
            }
            Esc::NeedLow if b == b'\\' => next(Esc::Backslash { low: true }, 0, false),
            Esc::NeedLow => StrStep::Reject,
            Esc::None => match b {
                b'"' => StrStep::Close,
                b'\\' => next(Esc::Backslash { low: false }, 0, true),
                0..=0x1f => StrStep::Reject,
                0x20..=0x7f => next(Esc::None, 0, true),
                0xc2..=0xdf => next(Esc::None, 1, true),
                0xe0 => next(Esc::None, 4, true),
                0xed => next(Esc::None, 5, true),
                0xe1..=0xef => next(Esc::None, 2, true),
                0xf0 => next(Esc::None, 6, true),
                0xf4 => next(Esc::None, 7, true),
                0xf1..=0xf3 => next(Esc::None, 3, true),
                _ => StrStep::Reject,
            },
        }
    }
}

/// Where a number stands (RFC 8259's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`),
/// with the integer part at most [`MAX_INT_DIGITS`] digits and the exponent at most
/// [`MAX_EXP_DIGITS`]: every number written then fits a double (strict parsers such as
/// `serde_json` refuse one that overflows, like `1e999`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Num {
    Minus,
    Zero,
    /// digits of the integer part so far
    Int(u8),
    Dot,
    Frac,
    Exp,
    ExpSign,
    /// digits of the exponent so far
    ExpDigits(u8),
}

/// Most digits of a number's integer part (with [`MAX_EXP_DIGITS`]: below 10^200).
pub const MAX_INT_DIGITS: u8 = 100;
/// Most digits of a number's exponent.
pub const MAX_EXP_DIGITS: u8 = 2;

/// What a byte does to a number.
pub(crate) enum NumStep {
    Next(Num),
    /// the number is complete and `b` is not part of it (it follows the value)
    End,
    Reject,
}

impl Num {
    /// The state after a number's first byte, if it can start one.
    pub(crate) fn start(b: u8) -> Option<Num> {
        match b {
            b'-' => Some(Num::Minus),
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int(1)),
            _ => None,
        }
    }

    pub(crate) fn step(self, b: u8) -> NumStep {
        NumStep::Next(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int(1),
            (Num::Minus, _) => return NumStep::Reject,
            (Num::Int(n), b'0'..=b'9') if n < MAX_INT_DIGITS => Num::Int(n + 1),
            (Num::Int(_), b'0'..=b'9') => return NumStep::Reject,
            (Num::Zero | Num::Int(_), b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Dot, _) => return NumStep::Reject,
            (Num::Zero | Num::Int(_) | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign, b'0'..=b'9') => Num::ExpDigits(1),
            (Num::ExpDigits(n), b'0'..=b'9') if n < MAX_EXP_DIGITS => Num::ExpDigits(n + 1),
            (Num::ExpDigits(_), b'0'..=b'9') => return NumStep::Reject,
            (Num::Exp | Num::ExpSign, _) => return NumStep::Reject,
            // a complete number ends at any other byte, which then follows the value
            _ => return NumStep::End,
        })
    }
}

/// What a byte does to a value being recognized (see [`JsonState::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Ok,
    Reject,
    /// the value was already complete (a top-level number) and `b` is not part of it
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// before the top-level object
    Start,
    /// before a top-level value of any kind
    StartAny,
    /// a value must start (after ':', or after ',' in an array)
    Value,
    /// after '[': a value or ']'
    ArrFirst,
    /// after '{': a key or '}'
    ObjFirst,
    /// after ',' in an object: a key
    Key,
    /// after a key: ':'
    Colon,
    /// after a value: ',' or the closing bracket
    After,
    /// in a string (a key or a value)
    Str {
        key: bool,
        lex: StrLex,
    },
    Num(Num),
    /// in `true` (0), `false` (1) or `null` (2), `pos` bytes matched
    Lit {
        which: u8,
        pos: u8,
    },
    /// the top-level value is complete: nothing more
    Done,
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where a prefix of a JSON object stands (small and `Copy`: the trie walk copies it per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonState {
    mode: Mode,
    /// bit i: level i is an object (else an array)
    stack: u64,
    depth: u8,
    /// whitespace bytes in a row
    ws: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState::new()
    }
}

impl JsonState {
    /// Nothing fed yet: whitespace, then `{`.
    pub fn new() -> JsonState {
        JsonState { mode: Mode::Start, stack: 0, depth: 0, ws: 0 }
    }

    /// Nothing fed yet, and any JSON value may follow (a schema's "any value"; its first byte
    /// is never whitespace there, the schema matcher takes that).
    pub(crate) fn any_value() -> JsonState {
        JsonState { mode: Mode::StartAny, stack: 0, depth: 0, ws: 0 }
    }

    /// Inside a string with no escape or UTF-8 sequence open.
    pub(crate) fn is_plain_string(&self) -> bool {
        matches!(self.mode, Mode::Str { lex, .. } if lex.is_plain())
    }

    /// The top-level value is complete.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Feeds all of `bytes`; false (the state then undefined) at the first byte that cannot
    /// continue a JSON object.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && (self.stack >> (self.depth - 1)) & 1 == 1
    }

    fn push(&mut self, object: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        if object {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.mode = if object { Mode::ObjFirst } else { Mode::ArrFirst };
        true
    }

    /// A value just ended: the top-level one, or one inside a container.
    fn value_done(&mut self) {
        self.mode = if self.depth == 0 { Mode::Done } else { Mode::After };
    }

    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.in_object() != object {
            return false;
        }
        self.depth -= 1;
        self.value_done();
        true
    }

    /// The first byte of a value.
    fn value(&mut self, b: u8) -> bool {
        self.mode = match b {
            b'{' => return self.push(true),
            b'[' => return self.push(false),
            b'"' => Mode::Str { key: false, lex: StrLex::OPEN },
            b't' => Mode::Lit { which: 0, pos: 1 },
            b'f' => Mode::Lit { which: 1, pos: 1 },
            b'n' => Mode::Lit { which: 2, pos: 1 },
            _ => match Num::start(b) {
                Some(n) => Mode::Num(n),
                None => return false,
            },
        };
        true
    }

    /// Feeds one byte; false when no JSON object can continue with it (the state is then
    /// undefined: work on a copy).
    pub fn feed(&mut self, b: u8) -> bool {
        self.step(b) == Step::Ok
    }

    /// [`JsonState::feed`], telling a refused byte from one that follows a complete top-level
    /// number (which only a value inside a schema can be).
    pub(crate) fn step(&mut self, b: u8) -> Step {
        let ok = |ok: bool| if ok { Step::Ok } else { Step::Reject };
        match self.mode {
            Mode::Str { key, lex } => {
                return match lex.step(b) {
                    StrStep::Close => {
                        if key {
                            self.mode = Mode::Colon;
                        } else {
                            self.value_done();
                        }
                        Step::Ok
                    }
                    StrStep::Next { lex, .. } => {
                        self.mode = Mode::Str { key, lex };
                        Step::Ok
                    }
                    StrStep::Reject => Step::Reject,
                };
            }
            Mode::Num(n) => {
                return match n.step(b) {
                    NumStep::Next(n) => {
                        self.mode = Mode::Num(n);
                        Step::Ok
                    }
                    NumStep::Reject => Step::Reject,
                    NumStep::End if self.depth == 0 => {
                        self.mode = Mode::Done;
                        Step::Ended
                    }
                    NumStep::End => {
                        self.mode = Mode::After;
                        self.step(b)
                    }
                };
            }
            Mode::Lit { which, pos } => {
                let lit = LITERALS[which as usize];
                if lit[pos as usize] != b {
                    return Step::Reject;
                }
                if pos as usize + 1 == lit.len() {
                    self.value_done();
                } else {
                    self.mode = Mode::Lit { which, pos: pos + 1 };
                }
                return Step::Ok;
            }
            Mode::Done => return Step::Reject,
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            self.ws += 1;
            return ok(self.ws <= MAX_WS);
        }
        self.ws = 0;
        ok(match self.mode {
            Mode::Start => b == b'{' && self.push(true),
            Mode::StartAny | Mode::Value => self.value(b),
            Mode::ArrFirst => {
                if b == b']' {
                    self.close(false)
                } else {
                    self.value(b)
                }
            }
            Mode::ObjFirst | Mode::Key => match b {
                b'"' => {
                    self.mode = Mode::Str { key: true, lex: StrLex::OPEN };
                    true
                }
                b'}' if self.mode == Mode::ObjFirst => self.close(true),
                _ => false,
            },
            Mode::Colon if b == b':' => {
                self.mode = Mode::Value;
                true
            }
            Mode::After => match b {
                b',' => {
                    self.mode = if self.in_object() { Mode::Key } else { Mode::Value };
                    true
                }
                b'}' => self.close(true),
                b']' => self.close(false),
                _ => false,
            },
            _ => false,
        })
    }
}

const NONE: u32 = u32::MAX;

/// The characters token `bytes` adds to a string when read from a plain string state (no
/// escape or UTF-8 sequence open), if it is string text that leaves the state plain again:
/// printable ASCII but `"` and `\`, and whole well-formed UTF-8 characters. Most of a
/// vocabulary is such text, so string steps list it without walking it.
fn text_chars(bytes: &[u8]) -> Option<u32> {
    let mut lex = StrLex::OPEN;
    let mut chars = 0;
    for &b in bytes {
        match lex.step(b) {
            StrStep::Next { lex: l, starts_char } => {
                lex = l;
                chars += starts_char as u32;
            }
            _ => return None,
        }
    }
    (lex.is_plain() && !bytes.contains(&b'\\')).then_some(chars)
}

/// A trie of byte strings, node 0 the root: first child, next sibling, the byte leading to a
/// node, the first token ending there (further ones chained through `JsonVocab::tok_next`).
#[derive(Debug)]
struct Trie {
    first_child: Vec<u32>,
    next_sibling: Vec<u32>,
    byte: Vec<u8>,
    tok_first: Vec<u32>,
}

impl Trie {
    /// From `(id, bytes)` sorted by bytes (non-empty); chains equal strings into `tok_next`.
    fn build(toks: &[(u32, &[u8])], tok_next: &mut [u32]) -> Trie {
        let mut t = Trie { first_child: vec![NONE], next_sibling: vec![NONE], byte: vec![0], tok_first: vec![NONE] };
        // sorted insertion: `path[i]` is the node of the previous string's first i bytes, and a
        // node's children are appended in byte order (`last_child` finds the end of the list)
        let mut last_child: Vec<u32> = vec![NONE];
        let mut path: Vec<u32> = vec![0];
        let mut prev: &[u8] = &[];
        for &(id, b) in toks {
            let common = prev.iter().zip(b.iter()).take_while(|(x, y)| x == y).count();
            path.truncate(common + 1);
            for &c in &b[common..] {
                let parent = *path.last().expect("root") as usize;
                let node = t.byte.len() as u32;
                t.first_child.push(NONE);
                t.next_sibling.push(NONE);
                t.byte.push(c);
                t.tok_first.push(NONE);
                last_child.push(NONE);
                match last_child[parent] {
                    NONE => t.first_child[parent] = node,
                    l => t.next_sibling[l as usize] = node,
                }
                last_child[parent] = node;
                path.push(node);
            }
            let end = *path.last().expect("root") as usize;
            tok_next[id as usize] = t.tok_first[end];
            t.tok_first[end] = id;
            prev = b;
        }
        t
    }

    /// Appends to `out` every token whose bytes `feed` accepts from `state` (depth first,
    /// pruning a subtree at its first refused byte).
    fn walk<S: Copy>(
        &self,
        tok_next: &[u32],
        state: &S,
        feed: &mut impl FnMut(&mut S, u8) -> bool,
        out: &mut Vec<u32>,
        stack: &mut Vec<(u32, S)>,
    ) {
        stack.clear();
        stack.push((0, *state));
        while let Some((node, st)) = stack.pop() {
            let mut c = self.first_child[node as usize];
            while c != NONE {
                let mut s = st;
                if feed(&mut s, self.byte[c as usize]) {
                    let mut t = self.tok_first[c as usize];
                    while t != NONE {
                        out.push(t);
                        t = tok_next[t as usize];
                    }
                    if self.first_child[c as usize] != NONE {
                        stack.push((c, s));
                    }
                }
                c = self.next_sibling[c as usize];
            }
        }
    }
}

/// Every ordinary token's bytes, in tries for [`JsonVocab::allowed`] and by id for
/// [`JsonVocab::advance`]. Built once per model (~0.1 s for a 128K vocabulary).
#[derive(Debug)]
pub struct JsonVocab {
    /// every token
    all: Trie,
    /// the tokens that are not string text (see `text`)
    rest: Trie,
    /// the tokens that are string text (`text_chars`), by the characters they add: allowed in
    /// any plain string state (within a length budget: a prefix of this list), which they
    /// leave plain, so string steps skip walking them
    text: Vec<u32>,
    /// `text_upto[c]`: how many of `text` add at most `c` characters
    text_upto: Vec<u32>,
    /// per token id: the next token with the same bytes
    tok_next: Vec<u32>,
    /// token id -> its bytes (`bytes[off[id]..off[id + 1]]`); empty for tokens never allowed
    off: Vec<u32>,
    bytes: Vec<u8>,
}

impl JsonVocab {
    /// The tokenizer's ordinary tokens (special and added ones excluded).
    pub fn new(tok: &Tokenizer) -> JsonVocab {
        let special: HashSet<u32> = tok.added_token_ids().into_iter().collect();
        let n = tok.vocab_size();
        JsonVocab::from_tokens(
            n,
            (0..n as u32).filter(|id| !special.contains(id)).filter_map(|id| tok.token_bytes(id).map(|b| (id, b))),
        )
    }

    /// From `(id, bytes)` pairs (ids below `vocab`; empty byte strings are skipped).
    pub fn from_tokens(vocab: usize, tokens: impl IntoIterator<Item = (u32, Vec<u8>)>) -> JsonVocab {
        let mut toks: Vec<(u32, Vec<u8>)> =
            tokens.into_iter().filter(|(id, b)| (*id as usize) < vocab && !b.is_empty()).collect();
        toks.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        let mut off = vec![0u32; vocab + 1];
        let mut bytes = Vec::new();
        {
            let mut by_id: Vec<Option<&[u8]>> = vec![None; vocab];
            for (id, b) in &toks {
                by_id[*id as usize] = Some(b);
            }
            for (id, b) in by_id.iter().enumerate() {
                bytes.extend_from_slice(b.unwrap_or(&[]));
                off[id + 1] = bytes.len() as u32;
            }
        }
        let all_refs: Vec<(u32, &[u8])> = toks.iter().map(|(id, b)| (*id, b.as_slice())).collect();
        let rest_refs: Vec<(u32, &[u8])> = all_refs.iter().copied().filter(|(_, b)| text_chars(b).is_none()).collect();
        let mut text: Vec<(u32, u32)> = all_refs.iter().filter_map(|(id, b)| text_chars(b).map(|c| (c, *id))).collect();
        text.sort_unstable();
        let most = text.last().map_or(0, |t| t.0 as usize);
        let text_upto: Vec<u32> = (0..=most).map(|c| text.partition_point(|t| t.0 as usize <= c) as u32).collect();
        let text: Vec<u32> = text.into_iter().map(|(_, id)| id).collect();
        // each token sits in `all` and at most one of `rest` / `text`; equal strings chain the
        // same way in both tries (same sorted order), so one `tok_next` serves both
        let mut tok_next = vec![NONE; vocab];
        let all = Trie::build(&all_refs, &mut tok_next);
        let rest = Trie::build(&rest_refs, &mut tok_next);
        JsonVocab { all, rest, text, text_upto, tok_next, off, bytes }
    }

    /// The bytes of token `id` (empty for a token never allowed).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        match self.off.get(id as usize..id as usize + 2) {
            Some(w) => &self.bytes[w[0] as usize..w[1] as usize],
            None => &[],
        }
    }

    /// Lists in `out` (cleared; ids in no particular order) every token whose bytes keep `state`
    /// a valid prefix. `stack` is scratch for the walk (reused to avoid allocating).
    pub fn allowed(&self, state: &JsonState, out: &mut Vec<u32>, stack: &mut Vec<(u32, JsonState)>) {
        let budget = state.is_plain_string().then_some(u32::MAX);
        self.allowed_by(state, budget, &mut |s, b| s.feed(b), out, stack);
    }

    /// [`JsonVocab::allowed`] for any recognizer: `feed` takes one byte (false: refused), and
    /// `text_budget`: `state` is inside a string where string text (`text_chars`) of up to that
    /// many characters is accepted and leaves it plain.
    pub(crate) fn allowed_by<S: Copy>(
        &self,
        state: &S,
        text_budget: Option<u32>,
        feed: &mut impl FnMut(&mut S, u8) -> bool,
        out: &mut Vec<u32>,
        stack: &mut Vec<(u32, S)>,
    ) {
        out.clear();
        if let Some(budget) = text_budget {
            let n = match self.text_upto.get(budget as usize) {
                Some(&n) => n as usize,
                None => self.text.len(),
            };
            out.extend_from_slice(&self.text[..n]);
            self.rest.walk(&self.tok_next, state, feed, out, stack);
        } else {
            self.all.walk(&self.tok_next, state, feed, out, stack);
        }
    }

    /// Feeds token `id` to `state`; false when it is not allowed there.
    pub fn advance(&self, state: &mut JsonState, id: u32) -> bool {
        let b = self.token_bytes(id);
        !b.is_empty() && state.feed_all(b)
    }
}

/// What a constrained output must be.
#[derive(Debug, Clone)]
pub enum Shape {
    /// any JSON object (JSON mode)
    Object,
    /// a JSON object matching the schema
    Schema(Arc<JsonSchema>),
    /// text matching a regular expression in full (vLLM's `regex` and `choice`): the output may
    /// end (one of `JsonSpec::eos` is allowed) where the text could end, and ends where nothing
    /// can follow
    Regex(Arc<Pattern>),
}

/// A constrained request's vocabulary, shape and end tokens. Cheap to clone (the vocabulary and
/// the schema or pattern are shared).
#[derive(Debug, Clone)]
pub struct JsonSpec {
    pub vocab: Arc<JsonVocab>,
    pub shape: Shape,
    /// tokens that end the output, allowed where a `Regex` shape may end (JSON ends with its
    /// closing brace and never allows them)
    pub eos: Vec<u32>,
}

impl JsonSpec {
    /// JSON mode, or a schema.
    pub fn json(vocab: Arc<JsonVocab>, schema: Option<Arc<JsonSchema>>) -> JsonSpec {
        let shape = schema.map_or(Shape::Object, Shape::Schema);
        JsonSpec { vocab, shape, eos: Vec::new() }
    }
}

/// One sequence's constraint: its recognizer, and the buffers each step reuses (allocated once
/// per request; a step allocates nothing once they have grown).
#[derive(Debug)]
pub struct JsonRun {
    vocab: Arc<JsonVocab>,
    kind: RunKind,
    allowed: Vec<u32>,
    eos: Vec<u32>,
}

#[derive(Debug)]
enum RunKind {
    Object { state: JsonState, walk: Vec<(u32, JsonState)> },
    Schema { schema: Arc<JsonSchema>, state: SchemaState, frames: Frames, walk: Vec<(u32, SchemaState)> },
    Regex { pattern: Arc<Pattern>, state: u32, walk: Vec<(u32, u32)> },
}

impl JsonRun {
    pub fn new(spec: &JsonSpec) -> JsonRun {
        let kind = match &spec.shape {
            Shape::Object => RunKind::Object { state: JsonState::new(), walk: Vec::new() },
            Shape::Schema(s) => RunKind::Schema {
                schema: s.clone(),
                state: SchemaState::new(),
                frames: Frames::default(),
                walk: Vec::new(),
            },
            Shape::Regex(p) => RunKind::Regex { pattern: p.clone(), state: Pattern::START, walk: Vec::new() },
        };
        JsonRun { vocab: spec.vocab.clone(), kind, allowed: Vec::new(), eos: spec.eos.clone() }
    }

    /// The tokens allowed next, in no particular order (empty: the output is complete).
    pub fn allowed(&mut self) -> &[u32] {
        match &mut self.kind {
            RunKind::Object { state, walk } => self.vocab.allowed(state, &mut self.allowed, walk),
            RunKind::Schema { schema, state, frames, walk } => {
                let budget = state.text_budget(schema);
                let s: &JsonSchema = schema;
                self.vocab.allowed_by(state, budget, &mut |st, b| st.feed(s, frames, b), &mut self.allowed, walk);
                frames.rewind();
            }
            RunKind::Regex { pattern, state, walk } => {
                let feed = &mut |st: &mut u32, b: u8| {
                    *st = pattern.next(*st, b);
                    *st != DEAD
                };
                self.vocab.allowed_by(state, None, feed, &mut self.allowed, walk);
                if pattern.accepts(*state) && !pattern.is_last(*state) {
                    self.allowed.extend_from_slice(&self.eos);
                }
            }
        }
        &self.allowed
    }

    /// Feeds token `id`; false when it is not allowed (the state is then undefined).
    pub fn advance(&mut self, id: u32) -> bool {
        let b = self.vocab.token_bytes(id);
        if b.is_empty() {
            return false;
        }
        match &mut self.kind {
            RunKind::Object { state, .. } => state.feed_all(b),
            RunKind::Schema { schema, state, frames, .. } => {
                let ok = state.feed_all(schema, frames, b);
                frames.commit(state);
                ok
            }
            RunKind::Regex { pattern, state, .. } => b.iter().all(|&c| {
                *state = pattern.next(*state, c);
                *state != DEAD
            }),
        }
    }

    /// The output is complete (nothing may follow).
    pub fn is_complete(&self) -> bool {
        match &self.kind {
            RunKind::Object { state, .. } => state.is_complete(),
            RunKind::Schema { state, .. } => state.is_complete(),
            RunKind::Regex { pattern, state, .. } => pattern.is_last(*state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(s: &str) -> (bool, bool) {
        let mut st = JsonState::new();
        let ok = st.feed_all(s.as_bytes());
        (ok, ok && st.is_complete())
    }

    #[test]
    fn valid_objects_are_accepted_and_complete() {
        for doc in [
            "{}",
            " \n{ }",
            r#"{"a": 1}"#,
            r#"{"a": -0.5e+10, "b": [1, 2.25, -3E2, 0], "c": {"d": null, "e": true, "f": false}}"#,
            r#"{"s": "tab\t esc \" \\ \/ \b\f\n\r\t \u00e9 \uD83D\uDE00 é 日本 😀"}"#,
            r#"{"nested": [[[], {}], [{"x": [{}]}]]}"#,
            r#"{"": ""}"#,
        ] {
            assert_eq!(accepts(doc), (true, true), "{doc}");
        }
    }

    #[test]
    fn prefixes_are_valid_until_the_bad_byte() {
        // (document, the byte index where it must be refused)
        for (doc, bad) in [
            ("[1]", 0),
            ("x", 0),
            (r#"{"a" 1}"#, 5),
            (r#"{"a": 01}"#, 7),
            (r#"{"a": 1.}"#, 8),
            (r#"{"a": tru}"#, 9),
            (r#"{"a": 1,}"#, 8),
            (r#"{"a": [1,]}"#, 9),
            (r#"{"a": "\x"}"#, 8),
            (r#"{"a": "\u12g4"}"#, 11),
            (r#"{"a": 1]"#, 7),
            (r#"{a: 1}"#, 1),
            ("{\"a\": \"line\nbreak\"}", 11),
            ("{} ", 2),
            ("{}{}", 2),
            // numbers that would overflow a double: a third exponent digit
            (r#"{"a": 1e+999}"#, 11),
        ] {
            let mut st = JsonState::new();
            let b = doc.as_bytes();
            for (i, &c) in b.iter().enumerate() {
                let ok = st.feed(c);
                assert_eq!(ok, i != bad, "{doc:?} at byte {i}");
                if !ok {
                    break;
                }
            }
        }
        // invalid UTF-8 inside a string
        let mut st = JsonState::new();
        assert!(st.feed_all(b"{\"a\": \"\xc3"));
        assert!(!st.clone().feed(b'x'));
        assert!(st.feed(0xa9));
        let mut st = JsonState::new();
        assert!(st.feed_all(b"{\"a\": \""));
        assert!(!st.feed(0xff));
        // strict: no overlong forms, UTF-16 surrogates or code points past U+10FFFF in UTF-8,
        // and `\u` surrogates only in pairs (as strict parsers want)
        for (doc, bad) in [
            (&b"{\"a\": \"\xe0\x80"[..], 8),
            (b"{\"a\": \"\xed\xa0", 8),
            (b"{\"a\": \"\xf0\x8f", 8),
            (b"{\"a\": \"\xf4\x90", 8),
            (b"{\"a\": \"\xc0", 7),
            (b"{\"a\": \"\xf5", 7),
            (b"{\"a\": \"\\uDC00", 10),
            (b"{\"a\": \"\\udfff", 10),
            (b"{\"a\": \"\\uD800x", 13),
            (b"{\"a\": \"\\uD800\"", 13),
            (b"{\"a\": \"\\uD800\\n", 14),
            (b"{\"a\": \"\\uD800\\u0041", 15),
            (b"{\"a\": \"\\uDBFF\\uDBFF", 16),
        ] {
            let mut st = JsonState::new();
            for (i, &c) in doc.iter().enumerate() {
                assert_eq!(st.feed(c), i != bad, "{:?} at byte {i}", String::from_utf8_lossy(doc));
                if i == bad {
                    break;
                }
            }
        }
        for ok in [
            &b"{\"a\": \"\xe0\xa0\x80\xed\x9f\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf\"}"[..],
            b"{\"a\": \"\\uDBFF\\uDFFF\\u00e9\\uFFFF\"}",
        ] {
            let mut st = JsonState::new();
            assert!(st.feed_all(ok) && st.is_complete(), "{:?}", String::from_utf8_lossy(ok));
            assert!(serde_json::from_slice::<serde_json::Value>(ok).is_ok());
        }
    }

    #[test]
    fn numbers_fit_a_double() {
        let long = format!("{{\"a\": -{}", "9".repeat(MAX_INT_DIGITS as usize));
        let mut st = JsonState::new();
        assert!(st.feed_all(long.as_bytes()));
        assert!(!st.clone().feed(b'0'), "an integer part of more than {MAX_INT_DIGITS} digits");
        assert!(st.feed_all(b".5e-99}") && st.is_complete());
        let doc = format!("{long}.5e-99}}");
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert!(v["a"].as_f64().unwrap().is_finite());
    }

    #[test]
    fn whitespace_and_depth_are_bounded() {
        let mut st = JsonState::new();
        assert!(st.feed_all(b"{"));
        assert!(st.feed_all(&[b' '; MAX_WS as usize]));
        assert!(!st.clone().feed(b'\n'));
        assert!(st.feed(b'}'));
        let mut st = JsonState::new();
        assert!(st.feed_all(b"{\"a\":"));
        assert!(st.feed_all(&vec![b'['; MAX_DEPTH as usize - 1]));
        assert!(!st.clone().feed(b'['));
        assert!(!st.clone().feed(b'{'));
        assert!(st.feed_all(&vec![b']'; MAX_DEPTH as usize - 1]));
        assert!(st.feed(b'}') && st.is_complete());
    }

    /// The trie walk lists exactly the tokens a direct check of each token allows, in many
    /// states along a document.
    #[test]
    fn allowed_equals_checking_every_token() {
        let pieces: Vec<&[u8]> = vec![
            b"{",
            b"}",
            b"{\"",
            b"\"",
            b"\":",
            b":",
            b" ",
            b"  ",
            b"\n",
            b",",
            b", \"",
            b"[",
            b"]",
            b"[]",
            b"{}",
            b"1",
            b"12",
            b"-",
            b"0",
            b".",
            b".5",
            b"e",
            b"E+",
            b"true",
            b"tr",
            b"ue",
            b"null",
            b"false",
            b"a",
            b"abc",
            b"\\",
            b"\\n",
            b"\\u",
            b"00e9",
            b"\xc3",
            b"\xa9",
            b"\xc3\xa9",
            b"\"}",
            b"\"},",
            b"}]",
            b"\xff",
            b"\t\"",
            b"x\"",
            b":{",
            b"1}",
            b"1,",
            b"0]",
            b"\"a\"",
            b"\"a\":",
            b"",
        ];
        let tokens: Vec<(u32, Vec<u8>)> = pieces.iter().enumerate().map(|(i, p)| (i as u32, p.to_vec())).collect();
        // a duplicate byte string under another id
        let mut all = tokens.clone();
        all.push((pieces.len() as u32, b"1".to_vec()));
        let vocab = JsonVocab::from_tokens(all.len(), all.clone());
        let doc = r#" {"a": [1, -0.5e+3, true, null, {"b": "x\n\u00e9é"}], "c": {}}"#.as_bytes();
        let (mut out, mut stack) = (Vec::new(), Vec::new());
        let mut st = JsonState::new();
        for i in 0..=doc.len() {
            vocab.allowed(&st, &mut out, &mut stack);
            out.sort_unstable();
            let want: Vec<u32> =
                all.iter().filter(|(_, b)| !b.is_empty() && st.clone().feed_all(b)).map(|(id, _)| *id).collect();
            assert_eq!(out, want, "after {:?}", String::from_utf8_lossy(&doc[..i]));
            if i < doc.len() {
                assert!(st.feed(doc[i]));
            }
        }
        assert!(st.is_complete());
        vocab.allowed(&st, &mut out, &mut stack);
        assert!(out.is_empty(), "nothing after the object");
        assert_eq!(vocab.token_bytes(1), b"}");
        let mut s = JsonState::new();
        assert!(vocab.advance(&mut s, 0) && !vocab.advance(&mut s.clone(), 0));
    }
}
