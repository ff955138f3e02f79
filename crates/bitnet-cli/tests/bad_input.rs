//! Bad input to the `bitnet` binary: each case exits non-zero with a message naming what is
//! wrong, and never panics.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-gqa4-master")
}

/// A fresh copy of the fixture folder in a temp dir.
fn copy_fixture(tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("bitnet-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Runs `bitnet args...`, expects failure, returns stderr.
fn fails(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = bin().args(args).envs(envs.iter().copied()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}; stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert!(err.contains("error"), "no error message for {args:?}: {err}");
    err
}

fn gen_args(model: &Path) -> Vec<String> {
    vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--token-ids".into(),
        "1,2,3".into(),
        "-n".into(),
        "2".into(),
    ]
}

fn fails_gen(model: &Path) -> String {
    let a = gen_args(model);
    fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[])
}

/// Rewrites the JSON header of a safetensors file with `edit`.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_model_folder() {
    let err =
        fails(&["generate", "--model", "/nonexistent/bitnet-model", "--token-ids", "1"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(err.contains("not a local path") || err.contains("/nonexistent"), "{err}");
}

#[test]
fn missing_weights_file() {
    let d = copy_fixture("noweights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let err = fails_gen(&d);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn truncated_weights_file() {
    let d = copy_fixture("trunc");
    let p = d.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let err = fails_gen(&d);
    assert!(err.contains("model.safetensors"), "{err}");
    // and a header cut short
    f.set_len(5).unwrap();
    let err = fails_gen(&d);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_dtype() {
    let d = copy_fixture("dtype");
    edit_header(&d.join("model.safetensors"), |h| {
        h["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I16".into();
    });
    let err = fails_gen(&d);
    assert!(err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("I16"), "{err}");
}

#[test]
fn wrong_shape() {
    let d = copy_fixture("shape");
    edit_header(&d.join("model.safetensors"), |h| {
        let t = &mut h["model.layers.1.mlp.down_proj.weight"];
        let s = t["shape"].as_array().unwrap().clone();
        let (a, b) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
        t["shape"] = serde_json::json!([a * 2, b / 2]);
    });
    let err = fails_gen(&d);
    assert!(err.contains("model.layers.1.mlp.down_proj.weight") && err.contains("shape"), "{err}");
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("missing");
    edit_header(&d.join("model.safetensors"), |h| {
        let v = h.remove("model.norm.weight").unwrap();
        h.insert("model.norx.weight".into(), v);
    });
    let err = fails_gen(&d);
    assert!(err.contains("missing tensor model.norm.weight"), "{err}");
}

#[test]
fn unknown_architecture_and_activation() {
    for (field, value, needle) in [
        ("architectures", serde_json::json!(["LlamaForCausalLM"]), "LlamaForCausalLM"),
        ("hidden_act", serde_json::json!("silu"), "hidden_act"),
        ("num_key_value_heads", serde_json::json!(3), "num_key_value_heads"),
    ] {
        let d = copy_fixture("arch");
        let p = d.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
        let err = fails_gen(&d);
        assert!(err.contains(needle), "{field}: {err}");
    }
    let d = copy_fixture("badjson");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let err = fails_gen(&d);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn prompt_longer_than_context() {
    let m = fixture().display().to_string();
    let ids: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let err = fails(&["generate", "--model", &m, "--ctx", "8", "--token-ids", &ids.join(","), "-n", "2"], &[]);
    assert!(err.contains("context"), "{err}");
    let err =
        fails(&["logits", "--model", &m, "--ctx", "8", "--token-ids", &ids.join(","), "--output", "/tmp/x.npy"], &[]);
    assert!(err.contains("context"), "{err}");
    let err = fails(&["generate", "--model", &m, "--ctx", "100000", "--token-ids", "1"], &[]);
    assert!(err.contains("max_position_embeddings"), "{err}");
}

#[test]
fn token_id_out_of_range() {
    let m = fixture().display().to_string();
    let err = fails(&["generate", "--model", &m, "--token-ids", "1,640", "-n", "2"], &[]);
    assert!(err.contains("640") && err.contains("out of range"), "{err}");
    let err = fails(&["logits", "--model", &m, "--token-ids", "99999", "--output", "/tmp/x.npy"], &[]);
    assert!(err.contains("99999"), "{err}");
    let err = fails(&["generate", "--model", &m, "--token-ids", "1,abc"], &[]);
    assert!(err.contains("abc"), "{err}");
}

#[test]
fn bad_sampling_values() {
    let m = fixture().display().to_string();
    let err = fails(&["generate", "--model", &m, "--prompt", "hi", "--top-p", "1.5"], &[]);
    assert!(err.contains("top_p"), "{err}");
    let err = fails(&["generate", "--model", &m, "--prompt", "hi", "--temperature=-1"], &[]);
    assert!(err.contains("temperature"), "{err}");
    let err = fails(&["generate", "--model", &m, "--prompt", "hi", "--plan", "turbo"], &[]);
    assert!(err.contains("turbo"), "{err}");
    let err = fails(&["generate", "--model", &m, "--prompt", "hi", "--kv-cache", "q4_0"], &[]);
    assert!(err.contains("KV cache type \"q4_0\""), "{err}");
    let err = fails(&["generate", "--model", &m, "--prompt", "hi", "--prompt-lookup", "17"], &[]);
    assert!(err.contains("at most 16"), "{err}");
}

#[test]
fn no_tokenizer_for_text_prompt() {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-untied-odd-master");
    let err = fails(&["generate", "--model", &m.display().to_string(), "--prompt", "hello"], &[]);
    assert!(err.contains("tokenizer"), "{err}");
}

#[test]
fn unreachable_hub() {
    let home = std::env::temp_dir().join(format!("bitnet-hfhome-{}", std::process::id()));
    let home_s = home.display().to_string();
    let t = std::time::Instant::now();
    let err = fails(
        &["generate", "--model", "someone/some-bitnet-model", "--token-ids", "1"],
        &[("HF_HOME", home_s.as_str()), ("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HUB_OFFLINE", "0")],
    );
    assert!(err.contains("someone/some-bitnet-model"), "{err}");
    assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());
    let err = fails(
        &["generate", "--model", "someone/some-bitnet-model", "--token-ids", "1"],
        &[("HF_HOME", home_s.as_str()), ("HF_HUB_OFFLINE", "1")],
    );
    assert!(err.contains("offline"), "{err}");
}

#[test]
fn device_cuda_without_a_gpu_or_backend() {
    // This machine has no GPU; with or without the `cuda` feature the answer is a clear error.
    let err = fails(&["bench", "--device", "cuda", "--model", "random:tiny"], &[]);
    assert!(err.contains("--device cuda"), "{err}");
    let err = fails(&["generate", "--device", "tpu", "--model", "random:tiny", "--token-ids", "1"], &[]);
    assert!(err.contains("tpu"), "{err}");
}

#[test]
fn serve_rejects_a_kv_block_size_off_the_tile() {
    // K is stored in transposed tiles of 16 positions: other block sizes are refused before a
    // port is bound.
    let m = fixture().display().to_string();
    for bs in ["0", "24"] {
        let err = fails(&["serve", "--model", &m, "--port", "0", "--block-size", bs], &[]);
        assert!(err.contains("block size") && err.contains("multiple of 16"), "{err}");
    }
}

/// `--json-schema`: invalid JSON, an unsupported keyword (named by its path), a root that is not
/// an object, a missing file.
#[test]
fn bad_json_schemas() {
    let m = fixture();
    let m = m.to_str().unwrap();
    let base = ["generate", "--model", m, "--prompt", "x", "-n", "2"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let e = fails(&with(&base, &["--json-schema", "{not json"]), &[]);
    assert!(e.contains("--json-schema: not valid JSON"), "{e}");
    let e = fails(
        &with(&base, &["--json-schema", r#"{"type":"object","properties":{"a":{"type":"array","uniqueItems":true}}}"#]),
        &[],
    );
    assert!(e.contains("/properties/a/uniqueItems") && e.contains("not supported"), "{e}");
    let e = fails(&with(&base, &["--json-schema", r#"{"type":"string"}"#]), &[]);
    assert!(e.contains("root must be an object"), "{e}");
    let e = fails(&with(&base, &["--json-schema-file", "/nonexistent/schema.json"]), &[]);
    assert!(e.contains("/nonexistent/schema.json"), "{e}");
}
