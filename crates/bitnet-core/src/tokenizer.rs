//! Tokenizer: the Llama 3 byte-level BPE that BitNet b1.58 uses, through the `tokenizers` crate.
//!
//! Three ways in, one behaviour out:
//! - `tokenizer.json` (HF checkpoints), optionally with `tokenizer_config.json` for the bos/eos
//!   strings and `add_bos_token`;
//! - [`Tokenizer::from_parts`], for GGUF files, which store the vocabulary as token strings +
//!   merges + token types instead of a tokenizer.json;
//! - both encode special-token text found in the input (`<|eot_id|>`) as the special token, as
//!   tiktoken's `allowed_special="all"` and HF's `tokenizer(text)` do, because chat templates emit
//!   special tokens as text.
//!
//! [`StreamDecoder`] turns a stream of generated ids into text chunks that never split a UTF-8
//! character (byte-level tokens often carry only part of an emoji or CJK character).

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// Llama 3's pre-tokenizer split regex (Meta's tiktoken pattern), used by [`Tokenizer::from_parts`].
pub const LLAMA3_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` value of a control (special) token.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` value of a user-defined (added, non-special) token.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// A text tokenizer (encode/decode) plus the bos/eos facts the generation loop needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// Whether `inner`'s post-processor itself prepends BOS when asked for special tokens.
    post_adds_bos: bool,
    /// Whether `encode(_, true)` should start with BOS (tokenizer_config's `add_bos_token` wins
    /// over the post-processor, as in transformers).
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The inner tokenizer's Debug prints the whole vocabulary; keep it short.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// A tokenizer_config.json token entry is either a plain string or an AddedToken object
/// (`{"content": "...", ...}`); `null` means "none".
fn config_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Load a HF `tokenizer.json`; bos is inferred from the post-processor, eos is unknown.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
        Self::finish(inner, None, None, None)
    }

    /// Load `dir/tokenizer.json` (None when absent) with bos/eos/add_bos from `dir/tokenizer_config.json` if present.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(&tok_path, format!("not a valid tokenizer.json: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let (mut bos, mut eos, mut add_bos) = (None, None, None);
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
            bos = config_token(cfg.get("bos_token"));
            eos = config_token(cfg.get("eos_token"));
            add_bos = cfg.get("add_bos_token").and_then(Value::as_bool);
        }
        // bos/eos/add_bos come from the config when there is one, so a mismatch is its fault.
        let blame = if cfg_path.is_file() { cfg_path } else { tok_path };
        Self::finish(inner, bos, eos, add_bos).map_err(|e| Error::format(&blame, e.to_string())).map(Some)
    }

    /// Build the Llama 3 byte-level BPE from GGUF-style parts: `tokens` (GPT-2 byte-level strings, id = index),
    /// `merges` ("a b"), `token_types` (3 = control/special, 4 = user-defined; empty = all normal).
    pub fn from_parts(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: &[i32],
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
    ) -> Result<Tokenizer> {
        let n = tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("empty token list".into()));
        }
        if !token_types.is_empty() && token_types.len() != n {
            return Err(Error::Tokenizer(format!("{} token types for {n} tokens", token_types.len())));
        }
        let name_of = |what: &str, id: Option<u32>| -> Result<Option<String>> {
            match id {
                None => Ok(None),
                Some(id) => tokens
                    .get(id as usize)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| Error::Tokenizer(format!("{what} id {id} is outside the {n}-token vocabulary"))),
            }
        };
        let bos_token = name_of("bos", bos_id)?;
        let eos_token = name_of("eos", eos_id)?;
        if add_bos && bos_token.is_none() {
            return Err(Error::Tokenizer("add_bos is set but there is no bos id".into()));
        }

        // Control and user-defined tokens become added tokens so that their text in the input is
        // matched whole, before the split regex can cut `<|eot_id|>` into `<`, `|`, ...
        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (t, &ty) in tokens.iter().zip(token_types) {
            match ty {
                TOKEN_TYPE_CONTROL => specials.push(AddedToken::from(t.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => user_defined.push(AddedToken::from(t.clone(), false).normalized(false)),
                _ => {}
            }
        }

        let mut pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.into_iter().enumerate() {
            match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => pairs.push((a.to_owned(), b.to_owned())),
                _ => return Err(Error::Tokenizer(format!("merge {i} ({m:?}) is not of the form \"a b\""))),
            }
        }
        // Every token (specials included) goes into the BPE vocabulary so that ids equal GGUF indices;
        // added tokens found in the model vocabulary keep the model's id.
        let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        // ignore_merges: a whole pre-token that is itself in the vocabulary is one token, as in
        // tiktoken (and Meta's tokenizer.json); without it BPE merging could split such a word
        // differently from tiktoken.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(true)
            .build()
            .map_err(|e| tok_err("cannot build BPE from GGUF tokens/merges", e))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let split =
            Split::new(SplitPattern::Regex(LLAMA3_SPLIT_PATTERN.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tok_err("split regex", e))?;
        let pre: Vec<PreTokenizerWrapper> = vec![split.into(), ByteLevel::new(false, true, false).into()];
        inner.with_pre_tokenizer(Some(PreSequence::new(pre)));
        inner
            .with_post_processor(Some(Self::bos_post_processor(bos_token.as_deref().zip(bos_id).filter(|_| add_bos))?));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens(specials).map_err(|e| tok_err("special tokens", e))?;
        inner.add_tokens(user_defined).map_err(|e| tok_err("user-defined tokens", e))?;
        Self::finish(inner, bos_token, eos_token, Some(add_bos))
    }

    /// The post-processor of Meta's tokenizer.json: ByteLevel (offsets only), then a template that
    /// prepends BOS. Built through serde because that is the format's stable public shape.
    fn bos_post_processor(bos: Option<(&str, u32)>) -> Result<PostProcessorWrapper> {
        let byte_level = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true
        });
        let mut processors = vec![byte_level];
        if let Some((tok, id)) = bos {
            processors.push(serde_json::json!({
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": tok, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}
                ],
                "pair": [
                    {"SpecialToken": {"id": tok, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": tok, "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}}
                ],
                "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}}
            }));
        }
        serde_json::from_value(serde_json::json!({"type": "Sequence", "processors": processors}))
            .map_err(|e| tok_err("post-processor", e))
    }

    /// Resolve the bos/eos ids and decide how `encode(_, true)` handles BOS.
    fn finish(
        inner: tokenizers::Tokenizer,
        mut bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: Option<bool>,
    ) -> Result<Tokenizer> {
        // What the post-processor adds to an empty input is exactly the special prefix/suffix.
        let empty = inner.encode_fast("", true).map_err(|e| tok_err("encode", e))?;
        let first_added = empty.get_ids().first().copied();
        if bos_token.is_none() {
            // tokenizer.json alone does not name BOS; a special token the post-processor puts in
            // front of every input is the BOS (Llama 3: <|begin_of_text|>).
            if let Some(id) = first_added {
                let is_special = inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special);
                if is_special {
                    bos_token = inner.id_to_token(id);
                }
            }
        }
        let lookup = |what: &str, t: &Option<String>| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(s) => inner
                    .token_to_id(s)
                    .map(Some)
                    .ok_or_else(|| Error::Tokenizer(format!("{what} token {s:?} is not in the vocabulary"))),
            }
        };
        let bos_id = lookup("bos", &bos_token)?;
        let eos_id = lookup("eos", &eos_token)?;
        let post_adds_bos = bos_id.is_some() && first_added == bos_id;
        let add_bos = add_bos.unwrap_or(post_adds_bos);
        if add_bos && bos_id.is_none() {
            return Err(Error::Tokenizer("add_bos_token is true but no bos token is known".into()));
        }
        Ok(Tokenizer { inner, bos_token, eos_token, bos_id, eos_id, post_adds_bos, add_bos })
    }

    /// Encode text; special-token text in it becomes the special token; `add_special_tokens` adds BOS when the model wants it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| tok_err("encode", e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos != self.post_adds_bos {
            // tokenizer_config's add_bos_token disagrees with the post-processor; it wins.
            match self.bos_id {
                Some(bos) if self.add_bos => ids.insert(0, bos),
                Some(bos) if ids.first() == Some(&bos) => {
                    ids.remove(0);
                }
                _ => {}
            }
        }
        Ok(ids)
    }

    /// Decode ids to text (exactly, no clean-up of spaces); an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        // tokenizers silently drops unknown ids; a sampled id the vocabulary lacks is a bug to report.
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is not in the vocabulary ({} tokens)",
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| tok_err("decode", e))
    }

    /// Number of tokens, added/special tokens included (128256 for Llama 3).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (byte-level form for ordinary tokens, e.g. "Ġthe"; plain text for specials).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id (byte-level form, not decoded text).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes token `id` stands for, as `logprobs` report them (`bytes`): for a
    /// byte-level BPE (GPT-2 / Llama 3) its symbols mapped back to bytes, so a token that ends in
    /// the middle of a UTF-8 character still gives its exact bytes; otherwise its decoded text.
    /// None for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let sym = self.inner.id_to_token(id)?;
        let byte_level = matches!(self.inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        if byte_level {
            if let Some(b) = sym.chars().map(byte_of_symbol).collect::<Option<Vec<u8>>>() {
                return Some(b);
            }
        }
        self.decode(&[id], false).ok().map(String::into_bytes)
    }

    /// Ids of the added tokens (special ones such as `<|eot_id|>`, and any other added to the
    /// base vocabulary).
    pub fn added_token_ids(&self) -> Vec<u32> {
        self.inner.get_added_tokens_decoder().keys().copied().collect()
    }

    /// The BOS token string, if known.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string, if known (tokenizer_config.json or GGUF; tokenizer.json alone has none).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The BOS token id, if known.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS token id, if known.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether `encode(_, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The wrapped `tokenizers::Tokenizer`, for anything not exposed here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer for streaming: yields text only once it is complete UTF-8.
///
/// Whether byte `b` stands for itself in GPT-2's byte-level alphabet (the printable bytes); the
/// other 68 bytes are the symbols U+0100.. in byte order.
fn byte_is_printable(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE
}

/// The byte a byte-level symbol stands for (None: not a symbol of that alphabet).
fn byte_of_symbol(c: char) -> Option<u8> {
    let u = c as u32;
    if u < 256 && byte_is_printable(u as u8) {
        return Some(u as u8);
    }
    let rank = u.checked_sub(256)? as usize;
    (0..=255u8).filter(|&b| !byte_is_printable(b)).nth(rank)
}

/// Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix
/// gives U+FFFD. As in text-generation-inference's `decode_token`, we decode a small window
/// `ids[prefix..]` and compare it with the already-emitted `ids[prefix..read]`, emitting the
/// difference only when it does not end in U+FFFD. Ids before `prefix` are dropped, so each push
/// costs O(window), not O(generated length).
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    /// The window: `ids[prefix..read]` was emitted (kept as context), `ids[read..]` is pending.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

/// A valid character completes within 4 byte-level tokens; more pending tokens than this means the
/// model is producing invalid UTF-8, which we then emit (as U+FFFD) rather than buffer forever.
const MAX_PENDING: usize = 16;

impl StreamDecoder {
    /// A decoder with nothing pending; `skip_special_tokens` as in [`Tokenizer::decode`].
    pub fn new(skip_special_tokens: bool) -> Self {
        StreamDecoder { skip_special_tokens, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Add one generated id; returns the newly completed text, or None while a character is incomplete.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let skip = self.skip_special_tokens;
        let prefix_text =
            if self.read > self.prefix { tok.decode(&self.ids[self.prefix..self.read], skip)? } else { String::new() };
        let new_text = tok.decode(&self.ids[self.prefix..], skip)?;
        let forced = self.ids.len() - self.read >= MAX_PENDING;
        if new_text.ends_with('\u{FFFD}') && !forced {
            return Ok(None);
        }
        let chunk = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(c) => c.to_owned(),
            None => {
                return Err(Error::Tokenizer(format!(
                    "stream decode: text {new_text:?} no longer starts with the emitted {prefix_text:?}"
                )))
            }
        };
        if forced {
            // The emitted tail may be a broken sequence; keep it out of later windows so that a
            // later byte cannot re-interpret text that was already sent.
            self.ids.clear();
            self.prefix = 0;
            self.read = 0;
        } else {
            // The just-emitted tokens become the context of the next window.
            self.ids.drain(..self.read);
            self.prefix = 0;
            self.read = self.ids.len();
        }
        Ok(if chunk.is_empty() { None } else { Some(chunk) })
    }

    /// Emit whatever is pending (an incomplete character as U+FFFD) and reset; call at end of generation.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let skip = self.skip_special_tokens;
        let result = if self.ids.len() > self.read {
            let prefix_text = tok.decode(&self.ids[self.prefix..self.read], skip)?;
            let new_text = tok.decode(&self.ids[self.prefix..], skip)?;
            // If the prefix no longer matches, emitting only the pending tokens' own text is the best left.
            let chunk = match new_text.strip_prefix(prefix_text.as_str()) {
                Some(c) => c.to_owned(),
                None => tok.decode(&self.ids[self.read..], skip)?,
            };
            Some(chunk).filter(|c| !c.is_empty())
        } else {
            None
        };
        self.reset();
        Ok(result)
    }

    /// Forget all state (start of a new sequence).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's byte -> printable char map, the alphabet of byte-level token strings.
    fn byte_to_char(b: u8) -> char {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            return b as char;
        }
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).expect("valid char")
    }

    fn bl(s: &str) -> String {
        s.bytes().map(byte_to_char).collect()
    }

    #[test]
    fn token_bytes_invert_the_byte_level_alphabet() {
        for b in 0..=255u8 {
            assert_eq!(byte_of_symbol(byte_to_char(b)), Some(b));
        }
        assert_eq!(byte_of_symbol('\u{2581}'), None);
        // Every token's bytes, concatenated, are the text's bytes, also when a token ends inside
        // a multi-byte character (the byte tokens of "ö" and "日").
        let t = tiny();
        let text = "hello wörld 日本";
        let ids = t.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id).unwrap()).collect();
        assert_eq!(bytes, text.as_bytes());
        assert!(ids.len() > 8, "{ids:?}");
        assert_eq!(t.token_bytes(u32::MAX), None);
    }

    /// 256 byte tokens, a few merges, and two specials: small enough to reason about by hand.
    fn tiny() -> Tokenizer {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
        let merges_plain = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (" ", "w")];
        let mut merges = Vec::new();
        for (a, b) in merges_plain {
            merges.push(format!("{} {}", bl(a), bl(b)));
            tokens.push(bl(&format!("{a}{b}")));
        }
        tokens.push("<|begin_of_text|>".into());
        tokens.push("<|eot_id|>".into());
        let n = tokens.len();
        let mut types = vec![1; n];
        types[n - 2] = TOKEN_TYPE_CONTROL;
        types[n - 1] = TOKEN_TYPE_CONTROL;
        Tokenizer::from_parts(tokens, merges, &types, Some(n as u32 - 2), Some(n as u32 - 1), true)
            .expect("tiny tokenizer builds")
    }

    #[test]
    fn from_parts_encodes_merges_specials_and_bos() {
        let t = tiny();
        let hello = t.token_to_id(&bl("hello")).expect("merged token");
        let bos = t.bos_token_id().expect("bos");
        let eot = t.eos_token_id().expect("eos");
        assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(t.eos_token(), Some("<|eot_id|>"));
        assert_eq!(t.encode("hello", false).expect("enc"), vec![hello]);
        assert_eq!(t.encode("hello", true).expect("enc"), vec![bos, hello]);
        assert_eq!(t.encode("hello<|eot_id|>", false).expect("enc"), vec![hello, eot]);
        assert_eq!(t.decode(&[bos, hello, eot], true).expect("dec"), "hello");
        assert_eq!(t.decode(&[bos, hello, eot], false).expect("dec"), "<|begin_of_text|>hello<|eot_id|>");
        assert_eq!(t.vocab_size(), 263);
        assert!(t.decode(&[100_000], false).is_err());
    }

    #[test]
    fn from_parts_rejects_bad_input() {
        let tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
        assert!(Tokenizer::from_parts(tokens.clone(), vec!["ab".into()], &[], None, None, false).is_err());
        assert!(Tokenizer::from_parts(tokens.clone(), vec![], &[1, 2], None, None, false).is_err());
        assert!(Tokenizer::from_parts(tokens.clone(), vec![], &[], Some(9999), None, false).is_err());
        assert!(Tokenizer::from_parts(tokens.clone(), vec![], &[], None, None, true).is_err());
        // A merge whose result is not a token.
        assert!(Tokenizer::from_parts(tokens, vec!["a b".into()], &[], None, None, false).is_err());
    }

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        let t = tiny();
        // Every non-ASCII byte is its own token here, so each multi-byte char spans several pushes.
        let text = "hello 🙂 世界 é!";
        let ids = t.encode(text, false).expect("enc");
        let mut sd = StreamDecoder::new(false);
        let mut out = String::new();
        let mut held = 0;
        for &id in &ids {
            match sd.push(&t, id).expect("push") {
                Some(c) => {
                    assert!(!c.contains('\u{FFFD}'), "chunk {c:?}");
                    out.push_str(&c);
                }
                None => held += 1,
            }
        }
        if let Some(c) = sd.flush(&t).expect("flush") {
            out.push_str(&c);
        }
        assert_eq!(out, text);
        // 🙂 is held for 3 pushes, 世 and 界 for 2 each, é for 1.
        assert!(held >= 8, "multi-byte chars were not held back");
        // The window stays bounded.
        assert!(sd.ids.len() <= MAX_PENDING + 1);
    }

    #[test]
    fn stream_decoder_emits_invalid_bytes_eventually() {
        let t = tiny();
        let lone = t.token_to_id(&byte_to_char(0xF0).to_string()).expect("byte token");
        let mut sd = StreamDecoder::new(false);
        let mut out = String::new();
        for _ in 0..40 {
            if let Some(c) = sd.push(&t, lone).expect("push") {
                out.push_str(&c);
            }
        }
        if let Some(c) = sd.flush(&t).expect("flush") {
            out.push_str(&c);
        }
        assert_eq!(out.chars().filter(|&c| c == '\u{FFFD}').count(), 40);
    }
}
