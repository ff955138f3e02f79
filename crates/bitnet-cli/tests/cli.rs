//! The `bitnet` command end to end on the repo fixtures: the parity commands (`generate --json`,
//! `logits`) agree with the transformers goldens, seeds reproduce, text streams.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet")).args(args).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    let se = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "bitnet {args:?} failed: {se}");
    (so, se)
}

fn golden_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap()
}

#[test]
fn generate_json_matches_transformers_greedy() {
    for name in ["tiny-gqa4-packed", "tiny-untied-odd-master"] {
        let g = golden_json(name);
        let prompts = g["prompts"].as_object().unwrap();
        let (pname, p) = prompts.iter().next_back().unwrap();
        let ids: Vec<String> = p.as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let want: Vec<u64> =
            g["fp32"][pname]["greedy_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let m = fixture(name).display().to_string();
        let (out, _) = run(&[
            "generate",
            "--model",
            &m,
            "--token-ids",
            &ids.join(","),
            "--max-new-tokens",
            &want.len().to_string(),
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ]);
        let j: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
        let got: Vec<u64> = j["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got, want, "{name} {pname}");
    }
}

#[test]
fn logits_npy_has_every_position() {
    let m = fixture("tiny-untied-odd-packed").display().to_string();
    let out = std::env::temp_dir().join(format!("bitnet-logits-{}.npy", std::process::id()));
    run(&["logits", "--model", &m, "--token-ids", "500,17,42", "--output", &out.display().to_string()]);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (3, 515)"), "{header}");
    assert_eq!((10 + hlen) % 64, 0);
    assert_eq!(bytes.len(), 10 + hlen + 3 * 515 * 4);
    let vals: Vec<f32> =
        bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(vals.iter().all(|v| v.is_finite()));
}

#[test]
fn seeded_sampling_reproduces_and_text_streams() {
    let m = fixture("tiny-gqa4-master").display().to_string();
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello world",
        "-n",
        "24",
        "--temperature",
        "0.9",
        "--seed",
        "7",
        "--ignore-eos",
    ];
    let (a, err) = run(&args);
    let (b, _) = run(&args);
    assert_eq!(a, b, "same seed, same text");
    assert!(err.contains("prefill") && err.contains("decode") && err.contains("tok/s"), "{err}");
    let (c, _) = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello world",
        "-n",
        "24",
        "--temperature",
        "0.9",
        "--seed",
        "8",
        "--ignore-eos",
    ]);
    assert_ne!(a, c, "another seed, other text");
    // chat wrapping renders the template
    run(&["generate", "--model", &m, "--prompt", "What is the capital of France?", "--chat", "-n", "8", "--seed", "1"]);
}

#[test]
fn chat_reads_turns_from_stdin() {
    use std::io::Write;
    let m = fixture("tiny-gqa4-master").display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["chat", "--model", &m, "--system", "Be brief.", "-n", "6", "--seed", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\nTell me more\n/reset\nHi again\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("decode").count(), 3, "three replies: {err}");
}

/// A conversation longer than the context drops its oldest turns instead of failing: every
/// turn gets a reply, and the user is told.
#[test]
fn chat_drops_old_turns_to_fit_the_context() {
    use std::io::Write;
    let m = fixture("tiny-gqa4-master").display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["chat", "--model", &m, "--system", "Be brief.", "-n", "12", "--seed", "1", "--ctx", "96"])
        .args(["--ignore-eos"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let turns = "Tell me about the weather in Paris today\n".repeat(6);
    child.stdin.take().unwrap().write_all(turns.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("error"), "{err}");
    assert_eq!(err.matches("decode").count(), 6, "six replies: {err}");
    assert!(err.contains("earlier messages dropped to fit the context of 96 tokens"), "{err}");
}

#[test]
fn bench_json_fields() {
    let (out, _) = run(&[
        "bench",
        "--model",
        "random:tiny",
        "--prompt",
        "32",
        "--gen",
        "8",
        "--batch",
        "3",
        "--reps",
        "1",
        "--json",
        "--threads",
        "2",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    for k in [
        "prefill_tok_s",
        "decode_tok_s_per_seq",
        "decode_tok_s_total",
        "decode_gb_s",
        "peak_rss_mb",
        "plan",
        "kernel",
        "threads",
    ] {
        assert!(!j[k].is_null(), "missing {k}: {j}");
    }
    assert_eq!(j["threads"], 2);
    assert_eq!(j["plan"], "exact");
}

/// `bitnet generate --json` on the fixture model, sampled with `seed`, at most `n` tokens, with
/// `extra` flags: the summary line.
fn generate_json_reply(n: &str, seed: &str, extra: &[&str]) -> serde_json::Value {
    let m = fixture("tiny-gqa4-master");
    let mut args = vec!["generate", "--model", m.to_str().unwrap(), "--prompt", "Reply in JSON:", "-n", n];
    args.extend(["--temperature", "1", "--seed", seed, "--json"]);
    args.extend_from_slice(extra);
    let (out, _) = run(&args);
    serde_json::from_str(out.trim().lines().last().unwrap()).unwrap()
}

/// `--format json` (JSON mode): whatever the untrained fixture model says, the text is one JSON
/// object when generation stopped by itself, a valid prefix of one when `-n` cut it.
#[test]
fn generate_format_json_gives_json() {
    for seed in ["1", "2", "3", "4"] {
        let j = generate_json_reply("100", seed, &["--format", "json"]);
        let text = j["text"].as_str().unwrap();
        match j["finish_reason"].as_str().unwrap() {
            "stop" => assert!(serde_json::from_str::<serde_json::Value>(text).unwrap().is_object(), "{text:?}"),
            _ => assert!(bitnet_core::json_mode::JsonState::new().feed_all(text.as_bytes()), "{text:?}"),
        }
    }
}

/// `--json-schema`: the untrained fixture model's output is an object with the schema's keys in
/// its order and values in its bounds (or, cut by `-n`, a prefix the matcher accepts).
#[test]
fn generate_json_schema_matches() {
    let schema = r#"{"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
        "label": {"enum": ["x", "y"]}, "note": {"type": "string", "maxLength": 5}}, "required": ["id", "label"]}"#;
    let dir = std::env::temp_dir().join(format!("bitnet-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("schema.json");
    std::fs::write(&file, schema).unwrap();
    let compiled = bitnet_core::json_schema::JsonSchema::compile(&serde_json::from_str(schema).unwrap()).unwrap();
    for (seed, how) in [("1", "--json-schema"), ("2", "--json-schema-file"), ("3", "--json-schema")] {
        let arg = if how == "--json-schema" { schema.to_string() } else { file.display().to_string() };
        let j = generate_json_reply("60", seed, &[how, &arg]);
        let text = j["text"].as_str().unwrap();
        match j["finish_reason"].as_str().unwrap() {
            "stop" => {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
                assert!(keys.len() >= 2 && keys[0] == "id" && keys[1] == "label", "{text:?}");
                assert!((1..=9).contains(&v["id"].as_i64().unwrap()), "{text:?}");
                assert!(v["label"] == "x" || v["label"] == "y", "{text:?}");
                assert!(v.get("note").is_none_or(|n| n.as_str().unwrap().chars().count() <= 5), "{text:?}");
            }
            _ => {
                use bitnet_core::json_schema::matcher::{Frames, SchemaState};
                let (mut st, mut f) = (SchemaState::new(), Frames::default());
                assert!(st.feed_all(&compiled, &mut f, text.as_bytes()), "{text:?}");
            }
        }
    }
}

/// `--prompt-lookup` leaves the output unchanged (greedy and seeded sampling) and reports its
/// drafts in the JSON line; the prompt repeats itself, so drafts are found.
#[test]
fn prompt_lookup_keeps_the_output() {
    let m = fixture("tiny-gqa4-packed").display().to_string();
    let ids: Vec<String> = (0..48).map(|i| [17, 250, 31, 480, 9, 77][i % 6].to_string()).collect();
    let ids = ids.join(",");
    for sampling in [&["--temperature", "0"][..], &["--temperature", "0.8", "--seed", "5"][..]] {
        let gen = |lookup: &str| {
            let mut args = vec!["generate", "--model", &m, "--token-ids", &ids, "-n", "32", "--ignore-eos", "--json"];
            args.extend_from_slice(sampling);
            args.extend_from_slice(&["--prompt-lookup", lookup]);
            let (out, _) = run(&args);
            serde_json::from_str::<serde_json::Value>(out.trim().lines().last().unwrap()).unwrap()
        };
        let (plain, drafted) = (gen("0"), gen("8"));
        assert_eq!(plain["token_ids"], drafted["token_ids"], "{sampling:?}");
        assert_eq!(plain["drafted_tokens"], 0);
        assert!(drafted["drafted_tokens"].as_u64().unwrap() > 0, "{drafted}");
    }
}
