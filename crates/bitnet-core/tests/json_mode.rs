//! JSON mode and JSON schemas on the real Llama 3 vocabulary (../shared/fixtures; skipped
//! without it): the trie walk agrees with checking every token, and what a step costs (printed).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bitnet_core::json_mode::{JsonRun, JsonSpec, JsonState, JsonVocab};
use bitnet_core::json_schema::matcher::{Frames, SchemaState};
use bitnet_core::json_schema::JsonSchema;
use bitnet_core::tokenizer::Tokenizer;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

/// The Llama 3 tokenizer of ../shared/fixtures (`None`, printed as skipped, without it).
fn llama3() -> Option<Tokenizer> {
    let dir = Path::new(FIXTURES).join("llama3-tokenizer");
    if !dir.exists() {
        println!("skipped: ../shared/fixtures not found");
        return None;
    }
    Some(Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer"))
}

#[test]
fn llama3_vocabulary_walk_matches_every_token_check() {
    let Some(tok) = llama3() else { return };
    let t0 = Instant::now();
    let vocab = JsonVocab::new(&tok);
    println!("vocabulary of {} tokens in the trie in {:.0} ms", tok.vocab_size(), t0.elapsed().as_secs_f64() * 1e3);
    let special: Vec<u32> = tok.added_token_ids();
    assert!(special.iter().all(|&id| vocab.token_bytes(id).is_empty()), "special tokens are never allowed");
    let (mut out, mut stack) = (Vec::new(), Vec::new());
    let doc = r#"{"name": "caf\u00e9 été 日本", "list": [1, -2.5e3, true, null], "nested": {"k": "v\n"}}"#.as_bytes();
    let mut st = JsonState::new();
    let (mut worst, mut total) = (0f64, 0f64);
    for i in 0..=doc.len() {
        let t = Instant::now();
        vocab.allowed(&st, &mut out, &mut stack);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        worst = worst.max(ms);
        total += ms;
        {
            // the walk against a check of every token
            out.sort_unstable();
            let want: Vec<u32> = (0..tok.vocab_size() as u32)
                .filter(|&id| {
                    let b = vocab.token_bytes(id);
                    !b.is_empty() && st.clone().feed_all(b)
                })
                .collect();
            assert_eq!(out, want, "after {:?}", String::from_utf8_lossy(&doc[..i]));
        }
        assert!(!out.is_empty() || st.is_complete());
        if i < doc.len() {
            assert!(st.feed(doc[i]));
        }
    }
    assert!(st.is_complete());
    println!("allowed(): {:.2} ms per step on average, {:.2} ms at worst", total / (doc.len() + 1) as f64, worst);
}

#[test]
fn llama3_vocabulary_schema_walk_matches_every_token_check() {
    let Some(tok) = llama3() else { return };
    let vocab = Arc::new(JsonVocab::new(&tok));
    let schema: serde_json::Value = serde_json::from_str(
        r#"{"type": "object", "properties": {
            "name": {"type": "string"},
            "city": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "role": {"enum": ["admin", "user", "guest"]},
            "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
            "extra": {},
            "ok": {"type": ["boolean", "null"]},
            "zip": {"type": "string", "pattern": "^\\d{5}(-\\d{4})?$"},
            "price": {"type": "number", "minimum": 0, "exclusiveMaximum": 100}
        }, "required": ["name", "age", "role"]}"#,
    )
    .unwrap();
    let schema = Arc::new(JsonSchema::compile(&schema).expect("schema"));
    let doc = r#"{"name": "caf\u00e9 été 日本", "city": "Paris", "age": 42, "role": "user",
        "scores": [1, -2.5e3], "extra": {"k": [true, null, "v"]}, "ok": null, "zip": "12345-6789",
        "price": 99.95}"#
        .as_bytes();
    let spec = JsonSpec::json(vocab.clone(), Some(schema.clone()));
    let mut run = JsonRun::new(&spec);
    let (mut st, mut frames) = (SchemaState::new(), Frames::default());
    let (mut worst, mut total) = (0f64, 0f64);
    // feed the document token by token as the model would, one byte-token at a time here (every
    // byte is a token in Llama 3), comparing each step's walk with a check of every token
    let byte_tok = |b: u8| (0..tok.vocab_size() as u32).find(|&id| vocab.token_bytes(id) == [b]).expect("a byte token");
    for i in 0..=doc.len() {
        let t = Instant::now();
        let mut out = run.allowed().to_vec();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        worst = worst.max(ms);
        total += ms;
        out.sort_unstable();
        let want: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| {
                let b = vocab.token_bytes(id);
                let mut s = st;
                let ok = !b.is_empty() && s.feed_all(&schema, &mut frames, b);
                frames.rewind();
                ok
            })
            .collect();
        assert_eq!(out, want, "after {:?}", String::from_utf8_lossy(&doc[..i]));
        assert!(!out.is_empty() || st.is_complete());
        if i < doc.len() {
            assert!(st.feed(&schema, &mut frames, doc[i]));
            frames.commit(&mut st);
            assert!(run.advance(byte_tok(doc[i])));
        }
    }
    assert!(st.is_complete() && run.is_complete());
    println!(
        "schema allowed(): {:.2} ms per step on average, {:.2} ms at worst",
        total / (doc.len() + 1) as f64,
        worst
    );
}

/// A regular-expression shape (vLLM's `regex`) on Llama 3's vocabulary: every step's list is
/// what checking every token against the DFA gives, end tokens included exactly where the text
/// may end.
#[test]
fn llama3_vocabulary_regex_walk_matches_every_token_check() {
    use bitnet_core::json_mode::Shape;
    use bitnet_core::json_schema::pattern::{Pattern, DEAD};
    let Some(tok) = llama3() else { return };
    let vocab = Arc::new(JsonVocab::new(&tok));
    let pattern = Arc::new(Pattern::compile_full(r"(Paris|Lyon|Nice) [0-9]{2,3}(°C)?").unwrap());
    let eos = vec![128_001, 128_009];
    let spec = JsonSpec { vocab: vocab.clone(), shape: Shape::Regex(pattern.clone()), eos: eos.clone() };
    let mut run = JsonRun::new(&spec);
    let text = "Lyon 21°C";
    let byte_tok = |b: u8| (0..tok.vocab_size() as u32).find(|&id| vocab.token_bytes(id) == [b]).expect("a byte token");
    let mut st = Pattern::START;
    for i in 0..=text.len() {
        let mut out = run.allowed().to_vec();
        out.sort_unstable();
        let mut want: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| {
                let b = vocab.token_bytes(id);
                let mut s = st;
                !b.is_empty()
                    && b.iter().all(|&c| {
                        s = pattern.next(s, c);
                        s != DEAD
                    })
            })
            .collect();
        if pattern.accepts(st) && !run.is_complete() {
            want.extend(&eos);
        }
        want.sort_unstable();
        assert_eq!(out, want, "after {:?}", &text.as_bytes()[..i]);
        if i < text.len() {
            let b = text.as_bytes()[i];
            st = pattern.next(st, b);
            assert!(run.advance(byte_tok(b)));
        }
    }
    // "Lyon 21°C" can end, or go on to no digit after the unit: the walk allows the end tokens only
    assert!(run.allowed().iter().all(|t| eos.contains(t)) || run.is_complete());
}
