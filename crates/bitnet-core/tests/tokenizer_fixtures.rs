//! Tokenizer tests against the shared fixtures. These need ../shared/fixtures (the workspace's
//! sibling folder /work/shared): each test prints "skipped: ../shared/fixtures not found" and
//! returns when it is absent.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bitnet_core::chat::{ChatTemplate, BITNET_CPP_GGUF_TEMPLATE};
use bitnet_core::tokenizer::{StreamDecoder, Tokenizer, LLAMA3_SPLIT_PATTERN, TOKEN_TYPE_CONTROL};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn fixture(sub: &str) -> Option<PathBuf> {
    let p = Path::new(FIXTURES).join(sub);
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: ../shared/fixtures not found");
        None
    }
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// The 128k-token tokenizer takes a moment to load; share one per test binary.
fn llama3() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let dir = fixture("llama3-tokenizer")?;
    Some(TOK.get_or_init(|| Tokenizer::from_model_dir(&dir).expect("loads").expect("tokenizer.json present")))
}

fn vectors() -> Option<Value> {
    Some(read_json(&fixture("llama3-tokenizer/vectors.json")?))
}

/// Token strings, merges and token types as a GGUF converter would store them, taken from a tokenizer.json.
fn parts_of(tokenizer_json: &Path) -> (Vec<String>, Vec<String>, Vec<i32>) {
    let j = read_json(tokenizer_json);
    let vocab = j["model"]["vocab"].as_object().expect("vocab");
    let added = j["added_tokens"].as_array().expect("added_tokens");
    let n = vocab.len().max(added.iter().map(|t| t["id"].as_u64().expect("id") as usize + 1).max().unwrap_or(0));
    let mut tokens = vec![String::new(); n];
    let mut types = vec![1; n];
    for (t, id) in vocab {
        tokens[id.as_u64().expect("id") as usize] = t.clone();
    }
    for t in added {
        let id = t["id"].as_u64().expect("id") as usize;
        tokens[id] = t["content"].as_str().expect("content").to_owned();
        if t["special"].as_bool() == Some(true) {
            types[id] = TOKEN_TYPE_CONTROL;
        }
    }
    // Merges are "a b" strings, or [a, b] pairs in newer tokenizer.json files.
    let merges = j["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().expect("a"), p[1].as_str().expect("b")),
            other => panic!("odd merge {other}"),
        })
        .collect();
    (tokens, merges, types)
}

fn check_vectors(tok: &Tokenizer, vectors: &Value, what: &str) {
    for v in vectors["vectors"].as_array().expect("vectors") {
        let name = v["name"].as_str().expect("name");
        let text = v["text"].as_str().expect("text");
        let want = ids(&v["ids"]);
        let want_bos = ids(&v["ids_with_bos"]);
        assert_eq!(tok.encode(text, false).expect("encode"), want, "{what} {name}: ids");
        assert_eq!(tok.encode(text, true).expect("encode"), want_bos, "{what} {name}: ids_with_bos");
        assert_eq!(tok.decode(&want, false).expect("decode"), text, "{what} {name}: decode");
        let with_bos = tok.decode(&want_bos, false).expect("decode");
        assert_eq!(with_bos, format!("<|begin_of_text|>{text}"), "{what} {name}: decode with bos");
    }
    for c in vectors["chats"].as_array().expect("chats") {
        let name = c["name"].as_str().expect("name");
        let prompt = c["prompt"].as_str().expect("prompt");
        assert_eq!(tok.encode(prompt, false).expect("encode"), ids(&c["ids"]), "{what} chat {name}");
        assert_eq!(tok.encode(prompt, true).expect("encode"), ids(&c["ids_with_bos"]), "{what} chat {name} bos");
    }
}

#[test]
fn llama3_tokenizer_json_matches_tiktoken_vectors() {
    let (Some(tok), Some(vectors)) = (llama3(), vectors()) else {
        return;
    };
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
    assert_eq!(tok.bos_token_id(), Some(128_000));
    assert_eq!(tok.eos_token_id(), Some(128_009));
    assert!(tok.add_bos());
    assert_eq!(tok.token_to_id("<|end_of_text|>"), Some(128_001));
    assert_eq!(tok.id_to_token(128_009).as_deref(), Some("<|eot_id|>"));
    assert_eq!(tok.token_to_id("Ġthe"), Some(279));
    check_vectors(tok, &vectors, "tokenizer.json");
    assert_eq!(
        tok.decode(&[128_000, 9906, 128_009], true).expect("decode"),
        "Hello",
        "skip_special_tokens drops bos and eot"
    );
    assert!(tok.decode(&[128_256], false).is_err(), "id past the vocabulary is an error");
}

#[test]
fn llama3_from_file_infers_bos() {
    let Some(dir) = fixture("llama3-tokenizer") else {
        return;
    };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).expect("loads");
    assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(tok.bos_token_id(), Some(128_000));
    assert_eq!(tok.eos_token(), None);
    assert_eq!(tok.encode("Hello world", true).expect("encode"), vec![128_000, 9906, 1917]);
}

#[test]
fn split_pattern_is_the_fixture_pattern() {
    let Some(vectors) = vectors() else { return };
    assert_eq!(vectors["pattern"].as_str(), Some(LLAMA3_SPLIT_PATTERN));
}

#[test]
fn llama3_from_parts_matches_tokenizer_json() {
    let (Some(dir), Some(vectors)) = (fixture("llama3-tokenizer"), vectors()) else {
        return;
    };
    let (tokens, merges, types) = parts_of(&dir.join("tokenizer.json"));
    assert_eq!((tokens.len(), merges.len()), (128_256, 280_147));
    let tok = Tokenizer::from_parts(tokens, merges, &types, Some(128_000), Some(128_009), true).expect("builds");
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(tok.eos_token(), Some("<|eot_id|>"));
    check_vectors(&tok, &vectors, "from_parts");
}

#[test]
fn missing_tokenizer_json_is_none() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no_tokenizer_here");
    std::fs::create_dir_all(&dir).expect("mkdir");
    assert!(Tokenizer::from_model_dir(&dir).expect("no error").is_none());
}

#[test]
fn broken_tokenizer_json_names_the_file() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken_tokenizer");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 1}").expect("write");
    let err = Tokenizer::from_model_dir(&dir).expect_err("must fail").to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// Minimal GGUF metadata reader (header + key/values only), enough to pull out the tokenizer.
mod gguf {
    use std::collections::HashMap;

    // Float payloads are read (to keep the cursor right) but no test looks at them.
    #[allow(dead_code)]
    #[derive(Debug, Clone)]
    pub enum V {
        Int(i64),
        F(f64),
        Bool(bool),
        Str(String),
        Arr(Vec<V>),
    }

    struct R<'a> {
        b: &'a [u8],
        o: usize,
    }
    impl R<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            let s = &self.b[self.o..self.o + n];
            self.o += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().expect("4"))
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().expect("8"))
        }
        fn str(&mut self) -> String {
            let n = self.u64() as usize;
            String::from_utf8(self.take(n).to_vec()).expect("utf8")
        }
        fn val(&mut self, t: u32) -> V {
            match t {
                0 => V::Int(self.take(1)[0] as i64),
                1 => V::Int(self.take(1)[0] as i8 as i64),
                2 => V::Int(u16::from_le_bytes(self.take(2).try_into().expect("2")) as i64),
                3 => V::Int(i16::from_le_bytes(self.take(2).try_into().expect("2")) as i64),
                4 => V::Int(self.u32() as i64),
                5 => V::Int(self.u32() as i32 as i64),
                6 => V::F(f32::from_le_bytes(self.take(4).try_into().expect("4")) as f64),
                7 => V::Bool(self.take(1)[0] != 0),
                8 => V::Str(self.str()),
                9 => {
                    let et = self.u32();
                    let n = self.u64() as usize;
                    V::Arr((0..n).map(|_| self.val(et)).collect())
                }
                10 | 11 => V::Int(self.u64() as i64),
                12 => V::F(f64::from_le_bytes(self.take(8).try_into().expect("8"))),
                _ => panic!("gguf type {t}"),
            }
        }
    }

    pub fn metadata(bytes: &[u8]) -> HashMap<String, V> {
        let mut r = R { b: bytes, o: 0 };
        assert_eq!(r.take(4), b"GGUF");
        let _version = r.u32();
        let _n_tensors = r.u64();
        let n_kv = r.u64();
        (0..n_kv)
            .map(|_| {
                let k = r.str();
                let t = r.u32();
                (k, r.val(t))
            })
            .collect()
    }
}

#[test]
fn gguf_tiny_from_parts_matches_tokenizer_json_and_goldens() {
    let Some(dir) = fixture("gguf-tiny") else {
        return;
    };
    let bytes = std::fs::read(dir.join("ggml-model-i2_s.gguf")).expect("read gguf");
    let md = gguf::metadata(&bytes);
    let strs = |k: &str| -> Vec<String> {
        match &md[k] {
            gguf::V::Arr(a) => a
                .iter()
                .map(|v| match v {
                    gguf::V::Str(s) => s.clone(),
                    o => panic!("{k}: {o:?}"),
                })
                .collect(),
            o => panic!("{k}: {o:?}"),
        }
    };
    let int = |v: &gguf::V| match v {
        gguf::V::Int(i) => *i,
        o => panic!("{o:?}"),
    };
    let types: Vec<i32> = match &md["tokenizer.ggml.token_type"] {
        gguf::V::Arr(a) => a.iter().map(|v| int(v) as i32).collect(),
        o => panic!("{o:?}"),
    };
    let bos = int(&md["tokenizer.ggml.bos_token_id"]) as u32;
    let eos = int(&md["tokenizer.ggml.eos_token_id"]) as u32;
    let add_bos = matches!(md["tokenizer.ggml.add_bos_token"], gguf::V::Bool(true));
    let from_gguf = Tokenizer::from_parts(
        strs("tokenizer.ggml.tokens"),
        strs("tokenizer.ggml.merges"),
        &types,
        Some(bos),
        Some(eos),
        add_bos,
    )
    .expect("builds from GGUF");
    let from_json = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    assert_eq!(from_gguf.vocab_size(), 640);
    assert_eq!(from_json.vocab_size(), 640);
    assert_eq!(from_gguf.bos_token_id(), Some(608));
    assert_eq!(from_gguf.eos_token(), Some("<|eot_id|>"));

    // The converter's template is the one we replace (and the constant is verbatim).
    let gguf_template = match &md["tokenizer.chat_template"] {
        gguf::V::Str(s) => s.clone(),
        o => panic!("{o:?}"),
    };
    assert_eq!(gguf_template, BITNET_CPP_GGUF_TEMPLATE);
    let chat = ChatTemplate::from_gguf_template(Some(&gguf_template), "<|begin_of_text|>", "<|eot_id|>");

    // Goldens: the transformers prompts (with BOS) for the tiny model.
    let golden = read_json(&dir.join("golden/golden.json"));
    for (name, want) in golden["prompts"].as_object().expect("prompts") {
        let text = golden["prompt_texts"][name.as_str()].as_str().expect("text");
        let want = ids(want);
        assert_eq!(from_json.encode(text, true).expect("encode"), want, "tokenizer.json {name}");
        assert_eq!(from_gguf.encode(text, true).expect("encode"), want, "gguf {name}");
        assert_eq!(from_gguf.decode(&want[1..], false).expect("decode"), text);
    }
    let rendered = chat
        .render(&[bitnet_core::chat::ChatMessage::new("user", "What is the capital of France?")], true)
        .expect("render");
    assert_eq!(rendered, golden["prompt_texts"]["p2_chat"].as_str().expect("p2"));

    // And the two agree on every fixture string (mostly byte tokens at this vocabulary size).
    if let Some(vectors) = vectors() {
        for v in vectors["vectors"].as_array().expect("vectors") {
            let text = v["text"].as_str().expect("text");
            for special in [false, true] {
                let a = from_json.encode(text, special).expect("encode");
                let b = from_gguf.encode(text, special).expect("encode");
                assert_eq!(a, b, "{}", v["name"]);
                assert_eq!(
                    from_gguf.decode(&b, false).expect("decode"),
                    if special { format!("<|begin_of_text|>{text}") } else { text.to_owned() }
                );
            }
        }
    }
}

/// Stream every id of `text` through a StreamDecoder: no chunk may hold U+FFFD, and the chunks must
/// add up to the one-shot decode.
fn stream_roundtrip(tok: &Tokenizer, text: &str, add_special: bool, skip_special: bool) -> usize {
    let all = tok.encode(text, add_special).expect("encode");
    let mut sd = StreamDecoder::new(skip_special);
    let mut out = String::new();
    let mut held = 0;
    for &id in &all {
        match sd.push(tok, id).expect("push") {
            Some(chunk) => {
                assert!(!chunk.contains('\u{FFFD}'), "{text:?}: chunk {chunk:?}");
                out.push_str(&chunk);
            }
            None => held += 1,
        }
    }
    if let Some(chunk) = sd.flush(tok).expect("flush") {
        assert!(!chunk.contains('\u{FFFD}'), "{text:?}: flushed {chunk:?}");
        out.push_str(&chunk);
    }
    assert_eq!(out, tok.decode(&all, skip_special).expect("decode"), "{text:?}");
    held
}

const STREAM_TEXTS: &[&str] = &[
    "🙂👍🏽 emoji 🚀🔥 done",
    "family: 👨‍👩‍👧‍👦 flag: 🇺🇸",
    "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな",
    "한국어 텍스트입니다",
    "Café naïve façade résumé coöperate Ångström über Straße",
    "<|start_header_id|>user<|end_header_id|>\n\n𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q<|eot_id|>",
];

#[test]
fn stream_decoder_llama3_split_characters() {
    let Some(tok) = llama3() else { return };
    let mut held = 0;
    for text in STREAM_TEXTS {
        for (add, skip) in [(false, false), (true, false), (true, true)] {
            held += stream_roundtrip(tok, text, add, skip);
        }
    }
    // The emoji vector's ids ([9468, 19044, 9468, 239, 235, ...]) split characters across tokens,
    // so some pushes must have been held back.
    assert!(held > 0);
}

#[test]
fn stream_decoder_gguf_tiny_byte_tokens() {
    let Some(dir) = fixture("gguf-tiny") else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    let mut held = 0;
    for text in STREAM_TEXTS {
        held += stream_roundtrip(&tok, text, true, false);
        held += stream_roundtrip(&tok, text, false, true);
    }
    assert!(held > 50, "with 608 ids nearly every non-ASCII byte is its own token");
}

#[test]
fn stream_decoder_long_generation_stays_bounded() {
    let Some(dir) = fixture("gguf-tiny") else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    let text = "日本語 🙂 text ".repeat(400);
    let all = tok.encode(&text, false).expect("encode");
    let mut sd = StreamDecoder::new(false);
    let mut out = String::new();
    let start = std::time::Instant::now();
    for &id in &all {
        if let Some(c) = sd.push(&tok, id).expect("push") {
            out.push_str(&c);
        }
    }
    if let Some(c) = sd.flush(&tok).expect("flush") {
        out.push_str(&c);
    }
    assert_eq!(out, text);
    // Each push decodes a few tokens, not the whole history (would be ~n^2 = 10^8 token decodes).
    assert!(start.elapsed().as_secs() < 20, "{:?} for {} tokens", start.elapsed(), all.len());
}

#[test]
fn tokenizer_config_add_bos_and_eos() {
    let Some(src) = fixture("gguf-tiny/tokenizer.json") else {
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tok_cfg_no_bos");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(&src, dir.join("tokenizer.json")).expect("copy");

    // add_bos_token: false overrides the BOS post-processor, as in transformers.
    let cfg = r#"{"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "add_bos_token": false}"#;
    std::fs::write(dir.join("tokenizer_config.json"), cfg).expect("write");
    let tok = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    assert!(!tok.add_bos());
    assert_eq!(tok.eos_token_id(), Some(617));
    let hello = tok.encode("Hello world", false).expect("encode");
    assert_eq!(tok.encode("Hello world", true).expect("encode"), hello);

    // No config: the post-processor's BOS, bos inferred, eos unknown.
    std::fs::remove_file(dir.join("tokenizer_config.json")).expect("rm");
    let tok = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    assert!(tok.add_bos());
    assert_eq!(tok.bos_token_id(), Some(608));
    assert_eq!(tok.eos_token_id(), None);
    assert_eq!(tok.encode("Hello world", true).expect("encode"), [&[608][..], &hello].concat());

    // An eos the vocabulary lacks is an error naming tokenizer_config.json.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).expect("write");
    let err = Tokenizer::from_model_dir(&dir).expect_err("bad eos").to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("</s>"), "{err}");
}
