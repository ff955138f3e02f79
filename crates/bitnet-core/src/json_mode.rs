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

use std::collections::HashSet;

use crate::tokenizer::Tokenizer;

/// Most whitespace bytes in a row outside strings.
pub const MAX_WS: u8 = 16;
/// Most nested objects and arrays.
pub const MAX_DEPTH: u8 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    /// after a backslash
    Backslash,
    /// hex digits of `\uXXXX` still to come
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// before the top-level object
    Start,
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
    /// in a string (a key or a value), `utf8` continuation bytes still due
    Str {
        key: bool,
        esc: Esc,
        utf8: u8,
    },
    Num(Num),
    /// in `true` (0), `false` (1) or `null` (2), `pos` bytes matched
    Lit {
        which: u8,
        pos: u8,
    },
    /// the top-level object is closed: nothing more
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

    /// Inside a string with no escape or UTF-8 sequence open.
    fn is_plain_string(&self) -> bool {
        matches!(self.mode, Mode::Str { esc: Esc::None, utf8: 0, .. })
    }

    /// The top-level object is complete.
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

    fn close(&mut self, object: bool) -> bool {
        if self.depth == 0 || self.in_object() != object {
            return false;
        }
        self.depth -= 1;
        self.mode = if self.depth == 0 { Mode::Done } else { Mode::After };
        true
    }

    /// The first byte of a value.
    fn value(&mut self, b: u8) -> bool {
        self.mode = match b {
            b'{' => return self.push(true),
            b'[' => return self.push(false),
            b'"' => Mode::Str { key: false, esc: Esc::None, utf8: 0 },
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int),
            b't' => Mode::Lit { which: 0, pos: 1 },
            b'f' => Mode::Lit { which: 1, pos: 1 },
            b'n' => Mode::Lit { which: 2, pos: 1 },
            _ => return false,
        };
        true
    }

    /// Feeds one byte; false when no JSON object can continue with it (the state is then
    /// undefined: work on a copy).
    pub fn feed(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key, esc, utf8 } => return self.string(b, key, esc, utf8),
            Mode::Num(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Num::Zero,
                    (Num::Minus, b'1'..=b'9') => Num::Int,
                    (Num::Minus, _) => return false,
                    (Num::Int, b'0'..=b'9') => Num::Int,
                    (Num::Zero | Num::Int, b'.') => Num::Dot,
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                    (Num::Dot, _) => return false,
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
                    (Num::Exp, b'+' | b'-') => Num::ExpSign,
                    (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
                    (Num::Exp | Num::ExpSign, _) => return false,
                    // a complete number ends at any other byte, which then follows the value
                    _ => {
                        self.mode = Mode::After;
                        return self.feed(b);
                    }
                };
                self.mode = Mode::Num(next);
                return true;
            }
            Mode::Lit { which, pos } => {
                let lit = LITERALS[which as usize];
                if lit[pos as usize] != b {
                    return false;
                }
                self.mode = if pos as usize + 1 == lit.len() { Mode::After } else { Mode::Lit { which, pos: pos + 1 } };
                return true;
            }
            Mode::Done => return false,
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            self.ws += 1;
            return self.ws <= MAX_WS;
        }
        self.ws = 0;
        match self.mode {
            Mode::Start => b == b'{' && self.push(true),
            Mode::Value => self.value(b),
            Mode::ArrFirst => {
                if b == b']' {
                    self.close(false)
                } else {
                    self.value(b)
                }
            }
            Mode::ObjFirst | Mode::Key => match b {
                b'"' => {
                    self.mode = Mode::Str { key: true, esc: Esc::None, utf8: 0 };
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
        }
    }

    fn string(&mut self, b: u8, key: bool, esc: Esc, utf8: u8) -> bool {
        let (esc, utf8) = match esc {
            Esc::Backslash => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => (Esc::None, 0),
                b'u' => (Esc::Hex(4), 0),
                _ => return false,
            },
            Esc::Hex(n) => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                (if n > 1 { Esc::Hex(n - 1) } else { Esc::None }, 0)
            }
            Esc::None if utf8 > 0 => {
                if !(0x80..=0xbf).contains(&b) {
                    return false;
                }
                (Esc::None, utf8 - 1)
            }
            Esc::None => match b {
                b'"' => {
                    self.mode = if key { Mode::Colon } else { Mode::After };
                    return true;
                }
                b'\\' => (Esc::Backslash, 0),
                0..=0x1f => return false,
                0x20..=0x7f => (Esc::None, 0),
                0xc2..=0xdf => (Esc::None, 1),
                0xe0..=0xef => (Esc::None, 2),
                0xf0..=0xf4 => (Esc::None, 3),
                _ => return false,
            },
        };
        self.mode = Mode::Str { key, esc, utf8 };
        true
    }
}

const NONE: u32 = u32::MAX;

/// Whether `b` continues a string in any plain string state (no escape or UTF-8 sequence open)
/// and leaves it plain: printable ASCII but the quote and the backslash.
fn plain_string_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
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

    /// Appends to `out` every token whose bytes `state` accepts (depth first, pruning a subtree
    /// at its first refused byte).
    fn walk(&self, tok_next: &[u32], state: &JsonState, out: &mut Vec<u32>, stack: &mut Vec<(u32, JsonState)>) {
        stack.clear();
        stack.push((0, *state));
        while let Some((node, st)) = stack.pop() {
            let mut c = self.first_child[node as usize];
            while c != NONE {
                let mut s = st;
                if s.feed(self.byte[c as usize]) {
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
    /// the tokens that are not plain string text (see `plain`)
    rest: Trie,
    /// tokens made only of [`plain_string_byte`]s: allowed in any plain string state, which
    /// they leave plain (most of a vocabulary, so string steps skip walking them)
    plain: Vec<u32>,
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
        let is_plain = |b: &[u8]| b.iter().all(|&c| plain_string_byte(c));
        let all_refs: Vec<(u32, &[u8])> = toks.iter().map(|(id, b)| (*id, b.as_slice())).collect();
        let rest_refs: Vec<(u32, &[u8])> = all_refs.iter().copied().filter(|(_, b)| !is_plain(b)).collect();
        let plain: Vec<u32> = all_refs.iter().filter(|(_, b)| is_plain(b)).map(|(id, _)| *id).collect();
        // each token sits in `all` and at most one of `rest` / `plain`; equal strings chain the
        // same way in both tries (same sorted order), so one `tok_next` serves both
        let mut tok_next = vec![NONE; vocab];
        let all = Trie::build(&all_refs, &mut tok_next);
        let rest = Trie::build(&rest_refs, &mut tok_next);
        JsonVocab { all, rest, plain, tok_next, off, bytes }
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
        out.clear();
        if state.is_plain_string() {
            out.extend_from_slice(&self.plain);
            self.rest.walk(&self.tok_next, state, out, stack);
        } else {
            self.all.walk(&self.tok_next, state, out, stack);
        }
    }

    /// Feeds token `id` to `state`; false when it is not allowed there.
    pub fn advance(&self, state: &mut JsonState, id: u32) -> bool {
        let b = self.token_bytes(id);
        !b.is_empty() && state.feed_all(b)
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
