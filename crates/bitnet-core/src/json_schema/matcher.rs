//! Recognizes, byte by byte, the prefixes of the documents a [`JsonSchema`] accepts.
//!
//! A pushdown recognizer: a stack of frames, one per open container (`Obj`, `Arr`) plus the value
//! or key being read on top (`Str`, `Num`, `Int`, `Lit`, `Key`, or `Any`, which embeds JSON mode's
//! [`JsonState`] for a schema that accepts anything). The vocabulary walk copies the state at
//! every trie node, so [`SchemaState`] holds only the top frame and the index of its parent in a
//! [`Frames`] arena: pushing appends (entries never change once written, so every copy stays
//! valid), popping follows the parent index. The walk's own pushes are dropped after it
//! ([`Frames::rewind`]); the arena is compacted to the live chain when a token is committed
//! ([`Frames::commit`]), so it holds at most the nesting depth plus one token's pushes.
//!
//! Invariant: every prefix accepted can still be completed into a document the schema accepts
//! (integer bounds are checked on every digit, required keys and `minItems` can always still
//! come), so a constrained generation never reaches a dead end before `max_tokens`.

use super::decimal::DecPrefix;
use super::pattern::{Pattern, DEAD};
use super::{Class, JsonSchema, Node, NodeId};
use crate::json_mode::{JsonState, Num, NumStep, Step, StrLex, StrStep, MAX_DEPTH, MAX_WS};

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjPhase {
    /// after `{`: a key or `}`
    First,
    /// after `,`: a key
    Key,
    /// after a key: `:`
    Colon,
    /// after `:`: the value
    Value,
    /// after a value: `,` or `}`
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagPhase {
    /// after `{`: the tag's key
    First,
    /// in the key, `pos` bytes read
    Key,
    /// after the key: `:`
    Colon,
    /// after `:`: the tag's value
    Value,
    /// in the value, `pos` bytes read, `[lo, hi)` the tags that start so
    Lit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrPhase {
    /// after `[`: an item or `]`
    First,
    /// after `,`: an item
    Value,
    /// after an item: `,` or `]`
    After,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// the document: its value not started / complete
    Root { done: bool },
    /// `cursor`: the first property that may still come; `value`: the schema of the current
    /// key's value
    Obj { node: NodeId, cursor: u16, value: NodeId, phase: ObjPhase },
    /// a key of object `node`: `[lo, hi)` is the range of its sorted declared keys that start
    /// with the `pos` bytes read (any of them, in the window or not, so that a free key equal to
    /// a declared one is caught)
    Key { node: NodeId, cursor: u16, lo: u16, hi: u16, pos: u16, lex: StrLex },
    /// a tagged union of objects `node` until its tag is read, then that variant's `Obj`
    Tag { node: NodeId, phase: TagPhase, pos: u16, lo: u16, hi: u16 },
    /// `count`: items started so far
    Arr { node: NodeId, count: u32, phase: ArrPhase },
    /// a string of `node` (its length bounds), `chars` read
    Str { node: NodeId, chars: u32, lex: StrLex },
    /// a string of `node`, which has a pattern: its DFA state
    Pat { node: NodeId, dfa: u32, lex: StrLex },
    /// a number of any value
    Num(Num),
    /// a number of `node` (its bounds)
    Dec { node: NodeId, p: DecPrefix },
    /// an integer of `node` (its bounds): the sign and the magnitude so far (saturating)
    Int { node: NodeId, lex: Num, neg: bool, mag: u64 },
    /// one of `node`'s literals: `[lo, hi)` start with the `pos` bytes read
    Lit { node: NodeId, lo: u32, hi: u32, pos: u32 },
    /// any value
    Any(JsonState),
}

/// The frames below the tops of the states in use (see the module doc).
#[derive(Debug, Default)]
pub struct Frames {
    /// (frame, index of its parent or `NONE`)
    v: Vec<(Frame, u32)>,
    /// entries [0, committed) belong to the committed state
    committed: usize,
    scratch: Vec<Frame>,
}

impl Frames {
    /// Drops what a walk pushed.
    pub fn rewind(&mut self) {
        self.v.truncate(self.committed);
    }

    /// Keeps only `st`'s chain, in order from the bottom (no allocation once warmed up).
    pub fn commit(&mut self, st: &mut SchemaState) {
        self.scratch.clear();
        let mut p = st.parent;
        while p != NONE {
            let (f, up) = self.v[p as usize];
            self.scratch.push(f);
            p = up;
        }
        self.v.clear();
        for (i, f) in self.scratch.iter().rev().enumerate() {
            self.v.push((*f, if i == 0 { NONE } else { i as u32 - 1 }));
        }
        st.parent = if self.v.is_empty() { NONE } else { self.v.len() as u32 - 1 };
        self.committed = self.v.len();
    }
}

/// Where a prefix of a document stands (small and `Copy`: the vocabulary walk copies it per
/// trie node). Only meaningful with the [`Frames`] it was fed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    top: Frame,
    parent: u32,
    depth: u8,
    /// whitespace bytes in a row
    ws: u8,
}

impl Default for SchemaState {
    fn default() -> Self {
        SchemaState::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `[lo, hi)` of sorted byte strings that share their first `pos` bytes, narrowed to those whose
/// byte `pos` is `b` (contiguous, since the strings are sorted).
fn narrow<'a>(key: impl Fn(usize) -> &'a [u8], lo: usize, hi: usize, pos: usize, b: u8) -> (usize, usize) {
    let hit = |i: usize| key(i).get(pos) == Some(&b);
    let Some(first) = (lo..hi).find(|&i| hit(i)) else { return (hi, hi) };
    let end = (first..hi).find(|&i| !hit(i)).unwrap_or(hi);
    (first, end)
}

/// Whether an integer starting with this sign and magnitude (read so far) can still end within
/// `[lo, hi]`: the magnitudes it can reach are `mag * 10^k ..= (mag + 1) * 10^k - 1`, k >= 0.
fn int_feasible(lex: Num, neg: bool, mag: u64, lo: i128, hi: i128) -> bool {
    match lex {
        // "-0" is refused, so a minus needs a negative value
        Num::Minus => lo <= -1,
        Num::Zero => lo <= 0 && 0 <= hi,
        _ => {
            let (mut a, mut b) = (mag as i128, mag as i128);
            loop {
                let (x, y) = if neg { (-b, -a) } else { (a, b) };
                if x <= hi && y >= lo {
                    return true;
                }
                if a > super::UNBOUNDED {
                    return false;
                }
                a *= 10;
                b = b * 10 + 9;
            }
        }
    }
}

/// What a byte did to the frame on top that reads a value or key.
enum Inner {
    /// consumed; the frame goes on
    Ok,
    /// consumed, and the value is complete
    Done,
    /// the value was complete before this byte, which its container must take
    Ended,
    Reject,
}

impl SchemaState {
    pub fn new() -> SchemaState {
        SchemaState { top: Frame::Root { done: false }, parent: NONE, depth: 0, ws: 0 }
    }

    /// The document is complete.
    pub fn is_complete(&self) -> bool {
        self.top == Frame::Root { done: true }
    }

    /// Inside a string with no escape or UTF-8 sequence open: how many more characters it may
    /// take (`u32::MAX`: no bound). String text of at most that many characters is accepted
    /// there and leaves the state so (the vocabulary walk lists it without walking it).
    pub(crate) fn text_budget(&self, s: &JsonSchema) -> Option<u32> {
        match self.top {
            Frame::Str { node, chars, lex } if lex.is_plain() => match s.nodes[node as usize] {
                Node::String { max: u32::MAX, .. } => Some(u32::MAX),
                Node::String { max, .. } => Some(max - chars),
                _ => None,
            },
            Frame::Any(js) if js.is_plain_string() => Some(u32::MAX),
            _ => None,
        }
    }

    fn push(&mut self, frames: &mut Frames, f: Frame) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        frames.v.push((self.top, self.parent));
        self.parent = frames.v.len() as u32 - 1;
        self.top = f;
        self.depth += 1;
        true
    }

    fn pop(&mut self, frames: &Frames) {
        let (f, p) = frames.v[self.parent as usize];
        self.top = f;
        self.parent = p;
        self.depth -= 1;
    }

    /// Feeds all of `bytes`; false at the first refused one.
    pub fn feed_all(&mut self, s: &JsonSchema, frames: &mut Frames, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(s, frames, b))
    }

    /// Feeds one byte; false when no document of `s` continues with it (the state is then
    /// undefined: work on a copy).
    pub fn feed(&mut self, s: &JsonSchema, frames: &mut Frames, b: u8) -> bool {
        let r = match self.top {
            Frame::Root { .. } | Frame::Obj { .. } | Frame::Arr { .. } => return self.structure(s, frames, b),
            Frame::Tag { node, phase, pos, lo, hi } => return self.tag(s, b, (node, phase, pos, lo, hi)),
            Frame::Key { node, cursor, lo, hi, pos, lex } => {
                return self.key(s, frames, b, (node, cursor, lo, hi, pos, lex))
            }
            Frame::Str { node, chars, lex } => {
                let Node::String { min, max } = s.nodes[node as usize] else { return false };
                match lex.step(b) {
                    StrStep::Close if chars >= min => Inner::Done,
                    StrStep::Next { lex, starts_char } if chars + starts_char as u32 <= max => {
                        self.top = Frame::Str { node, chars: chars + starts_char as u32, lex };
                        Inner::Ok
                    }
                    _ => Inner::Reject,
                }
            }
            Frame::Pat { node, dfa, lex } => {
                let Node::Pattern(p) = &s.nodes[node as usize] else { return false };
                match lex.step(b) {
                    StrStep::Close if p.accepts(dfa) => Inner::Done,
                    StrStep::Next { lex: next, .. } => {
                        // the byte the string holds: an escape's decoded one, none for the
                        // backslash itself
                        let byte = if lex.after_backslash() {
                            match b {
                                b'b' => Some(0x08),
                                b'f' => Some(0x0c),
                                b'n' => Some(b'\n'),
                                b'r' => Some(b'\r'),
                                b't' => Some(b'\t'),
                                b'u' => return false,
                                _ => Some(b),
                            }
                        } else if b == b'\\' {
                            // only if some escape can follow
                            if !b"\"\\/\x08\x0c\n\r\t".iter().any(|&c| p.next(dfa, c) != DEAD) {
                                return false;
                            }
                            None
                        } else {
                            Some(b)
                        };
                        let dfa = match byte {
                            Some(c) => p.next(dfa, c),
                            None => dfa,
                        };
                        if dfa == DEAD {
                            Inner::Reject
                        } else {
                            self.top = Frame::Pat { node, dfa, lex: next };
                            Inner::Ok
                        }
                    }
                    _ => Inner::Reject,
                }
            }
            Frame::Num(n) => match n.step(b) {
                NumStep::Next(n) => {
                    self.top = Frame::Num(n);
                    Inner::Ok
                }
                NumStep::End => Inner::Ended,
                NumStep::Reject => Inner::Reject,
            },
            Frame::Dec { node, p } => {
                let Node::Decimal(r) = &s.nodes[node as usize] else { return false };
                match p.step(b) {
                    (NumStep::Next(_), q) if q.feasible(r) => {
                        self.top = Frame::Dec { node, p: q };
                        Inner::Ok
                    }
                    (NumStep::End, _) if p.ends_within(r) => Inner::Ended,
                    _ => Inner::Reject,
                }
            }
            Frame::Int { node, lex, neg, mag } => {
                let Node::Integer { lo, hi } = s.nodes[node as usize] else { return false };
                match (lex, b) {
                    // (the integer part's digits are capped as any number's)
                    (Num::Int(crate::json_mode::MAX_INT_DIGITS), b'0'..=b'9') => Inner::Reject,
                    (Num::Minus | Num::Int(_), b'0'..=b'9') => {
                        let mag = mag.saturating_mul(10).saturating_add((b - b'0') as u64);
                        if mag == 0 {
                            // "-0"
                            Inner::Reject
                        } else if int_feasible(Num::Int(1), neg, mag, lo, hi) {
                            let digits = if let Num::Int(n) = lex { n + 1 } else { 1 };
                            self.top = Frame::Int { node, lex: Num::Int(digits), neg, mag };
                            Inner::Ok
                        } else {
                            Inner::Reject
                        }
                    }
                    // a leading zero, a fraction or an exponent: not an integer as written here
                    (_, b'0'..=b'9' | b'.' | b'e' | b'E') | (Num::Minus, _) => Inner::Reject,
                    _ => {
                        let v = if neg { -(mag as i128) } else { mag as i128 };
                        if lo <= v && v <= hi {
                            Inner::Ended
                        } else {
                            Inner::Reject
                        }
                    }
                }
            }
            Frame::Lit { node, lo, hi, pos } => {
                let Node::Literals(l) = &s.nodes[node as usize] else { return false };
                let (nlo, nhi) = narrow(|i| &l[i], lo as usize, hi as usize, pos as usize, b);
                if nlo == nhi {
                    // none goes on: the one that is complete (a number) ends here
                    if l[lo as usize].len() == pos as usize {
                        Inner::Ended
                    } else {
                        Inner::Reject
                    }
                } else if l[nlo].len() == pos as usize + 1 && nhi - nlo == 1 {
                    Inner::Done
                } else {
                    self.top = Frame::Lit { node, lo: nlo as u32, hi: nhi as u32, pos: pos + 1 };
                    Inner::Ok
                }
            }
            Frame::Any(mut js) => match js.step(b) {
                Step::Ok if js.is_complete() => Inner::Done,
                Step::Ok => {
                    self.top = Frame::Any(js);
                    Inner::Ok
                }
                Step::Ended => Inner::Ended,
                Step::Reject => Inner::Reject,
            },
        };
        match r {
            Inner::Ok => true,
            Inner::Done => {
                self.pop(frames);
                true
            }
            Inner::Ended => {
                self.pop(frames);
                self.structure(s, frames, b)
            }
            Inner::Reject => false,
        }
    }

    fn key(&mut self, s: &JsonSchema, frames: &mut Frames, b: u8, k: (NodeId, u16, u16, u16, u16, StrLex)) -> bool {
        let (node, cursor, lo, hi, pos, lex) = k;
        let Node::Object(o) = &s.nodes[node as usize] else { return false };
        let in_window = |p: u16| p >= cursor && p <= o.next_required[cursor as usize];
        match lex.step(b) {
            StrStep::Reject => false,
            StrStep::Close => {
                // a declared key read in full (the shortest of the range sorts first)
                let exact = (lo < hi && o.sorted_key(lo as usize).len() == pos as usize).then(|| o.sorted[lo as usize]);
                let (value, cursor) = match (exact, o.additional) {
                    (Some(p), _) if in_window(p) => (o.props[p as usize].node, p + 1),
                    // a declared key out of order, or again
                    (Some(_), _) => return false,
                    (None, Some(a)) => (a, cursor),
                    (None, None) => return false,
                };
                self.pop(frames);
                match &mut self.top {
                    Frame::Obj { cursor: c, value: v, .. } => {
                        *c = cursor;
                        *v = value;
                        true
                    }
                    _ => false,
                }
            }
            StrStep::Next { lex, .. } => {
                let (nlo, nhi) = narrow(|i| o.sorted_key(i), lo as usize, hi as usize, pos as usize, b);
                let viable = (nlo..nhi).any(|i| in_window(o.sorted[i]));
                if (!viable && o.additional.is_none()) || pos == u16::MAX {
                    return false;
                }
                self.top = Frame::Key { node, cursor, lo: nlo as u16, hi: nhi as u16, pos: pos + 1, lex };
                true
            }
        }
    }

    /// A byte of a tagged union's object before its variant is known (`{` already read).
    fn tag(&mut self, s: &JsonSchema, b: u8, t: (NodeId, TagPhase, u16, u16, u16)) -> bool {
        let (node, phase, pos, lo, hi) = t;
        let Node::Tagged { key, tags, variants } = &s.nodes[node as usize] else { return false };
        let set = |phase, pos, lo, hi| Frame::Tag { node, phase, pos, lo, hi };
        if matches!(phase, TagPhase::First | TagPhase::Colon | TagPhase::Value) && is_ws(b) {
            self.ws += 1;
            return self.ws <= MAX_WS;
        }
        self.ws = 0;
        self.top = match phase {
            TagPhase::First if b == b'"' => set(TagPhase::Key, 0, lo, hi),
            TagPhase::Key if pos as usize == key.len() && b == b'"' => set(TagPhase::Colon, 0, lo, hi),
            TagPhase::Key if key.get(pos as usize) == Some(&b) => set(TagPhase::Key, pos + 1, lo, hi),
            TagPhase::Colon if b == b':' => set(TagPhase::Value, 0, lo, hi),
            TagPhase::Value | TagPhase::Lit => {
                let (lo, hi) = if phase == TagPhase::Value { (0, tags.len()) } else { (lo as usize, hi as usize) };
                let (nlo, nhi) = narrow(|i| &tags[i], lo, hi, pos as usize, b);
                if nlo == nhi {
                    return false;
                }
                if nhi - nlo == 1 && tags[nlo].len() == pos as usize + 1 {
                    // the tag is read: on as its variant, after the first property
                    Frame::Obj { node: variants[nlo], cursor: 1, value: variants[nlo], phase: ObjPhase::After }
                } else {
                    set(TagPhase::Lit, pos + 1, nlo as u16, nhi as u16)
                }
            }
            _ => return false,
        };
        true
    }

    /// A byte for the container on top (whitespace, punctuation, or a value's first byte).
    fn structure(&mut self, s: &JsonSchema, frames: &mut Frames, b: u8) -> bool {
        if self.top == (Frame::Root { done: true }) {
            return false;
        }
        if is_ws(b) {
            self.ws += 1;
            return self.ws <= MAX_WS;
        }
        self.ws = 0;
        match self.top {
            Frame::Root { .. } => {
                self.top = Frame::Root { done: true };
                self.start(s, frames, s.root, b)
            }
            Frame::Obj { node, cursor, value, phase } => {
                let Node::Object(o) = &s.nodes[node as usize] else { return false };
                let more = (cursor as usize) < o.props.len() || o.additional.is_some();
                let may_close = o.next_required[cursor as usize] as usize == o.props.len();
                let set = |phase| Frame::Obj { node, cursor, value, phase };
                match (phase, b) {
                    (ObjPhase::First | ObjPhase::Key, b'"') if more => {
                        self.top = set(ObjPhase::Colon);
                        let n = o.sorted.len() as u16;
                        self.push(frames, Frame::Key { node, cursor, lo: 0, hi: n, pos: 0, lex: StrLex::OPEN })
                    }
                    (ObjPhase::First | ObjPhase::After, b'}') if may_close => {
                        self.pop(frames);
                        true
                    }
                    (ObjPhase::Colon, b':') => {
                        self.top = set(ObjPhase::Value);
                        true
                    }
                    (ObjPhase::Value, _) => {
                        self.top = set(ObjPhase::After);
                        self.start(s, frames, value, b)
                    }
                    (ObjPhase::After, b',') if more => {
                        self.top = set(ObjPhase::Key);
                        true
                    }
                    _ => false,
                }
            }
            Frame::Arr { node, count, phase } => {
                let Node::Array(a) = &s.nodes[node as usize] else { return false };
                match (phase, b) {
                    (ArrPhase::First | ArrPhase::After, b']') if count >= a.min => {
                        self.pop(frames);
                        true
                    }
                    (ArrPhase::After, b',') if a.item(count).is_some() => {
                        self.top = Frame::Arr { node, count, phase: ArrPhase::Value };
                        true
                    }
                    (ArrPhase::First | ArrPhase::Value, _) => match a.item(count) {
                        Some(item) => {
                            self.top = Frame::Arr { node, count: count + 1, phase: ArrPhase::After };
                            self.start(s, frames, item, b)
                        }
                        None => false,
                    },
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// The first byte (not whitespace) of a value of `node`; the container on top is already
    /// set to what follows the value.
    fn start(&mut self, s: &JsonSchema, frames: &mut Frames, node: NodeId, b: u8) -> bool {
        let node = match &s.nodes[node as usize] {
            Node::Union(slots) => match Class::of_byte(b).and_then(|c| slots[c as usize]) {
                Some(n) => n,
                None => return false,
            },
            _ => node,
        };
        match &s.nodes[node as usize] {
            Node::Any => {
                let mut js = JsonState::any_value();
                js.step(b) == Step::Ok && self.push(frames, Frame::Any(js))
            }
            Node::Object(_) => {
                b == b'{' && self.push(frames, Frame::Obj { node, cursor: 0, value: node, phase: ObjPhase::First })
            }
            Node::Array(_) => b == b'[' && self.push(frames, Frame::Arr { node, count: 0, phase: ArrPhase::First }),
            Node::Tagged { .. } => {
                b == b'{' && self.push(frames, Frame::Tag { node, phase: TagPhase::First, pos: 0, lo: 0, hi: 0 })
            }
            Node::String { .. } => b == b'"' && self.push(frames, Frame::Str { node, chars: 0, lex: StrLex::OPEN }),
            Node::Pattern(_) => {
                b == b'"' && self.push(frames, Frame::Pat { node, dfa: Pattern::START, lex: StrLex::OPEN })
            }
            Node::Number => match Num::start(b) {
                Some(n) => self.push(frames, Frame::Num(n)),
                None => false,
            },
            Node::Decimal(r) => match DecPrefix::start(b) {
                Some(p) => p.feasible(r) && self.push(frames, Frame::Dec { node, p }),
                None => false,
            },
            &Node::Integer { lo, hi } => {
                let (lex, neg, mag) = match b {
                    b'-' => (Num::Minus, true, 0),
                    b'0' => (Num::Zero, false, 0),
                    b'1'..=b'9' => (Num::Int(1), false, (b - b'0') as u64),
                    _ => return false,
                };
                int_feasible(lex, neg, mag, lo, hi) && self.push(frames, Frame::Int { node, lex, neg, mag })
            }
            Node::Literals(l) => {
                let (lo, hi) = narrow(|i| &l[i], 0, l.len(), 0, b);
                if lo == hi {
                    false
                } else if l[lo].len() == 1 && hi - lo == 1 {
                    // a one-byte literal (a digit) alone: complete already
                    true
                } else {
                    self.push(frames, Frame::Lit { node, lo: lo as u32, hi: hi as u32, pos: 1 })
                }
            }
            Node::Union(_) | Node::Pending(_) => false,
        }
    }
}
