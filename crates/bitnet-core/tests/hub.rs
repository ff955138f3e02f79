//! `--model` resolution: local paths, hand-made Hugging Face cache layouts (offline and with
//! an unreachable hub), and failures. No test touches the real network or the environment:
//! every option is passed explicitly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bitnet_core::hub::{resolve_model, HubOptions, ModelLocation};
use bitnet_core::Error;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// A closed port: connections are refused at once.
const DEAD_ENDPOINT: &str = "http://127.0.0.1:9";

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "bitnet-hub-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(cache: &Path, offline: bool) -> HubOptions {
    HubOptions {
        progress: false,
        revision: None,
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some(DEAD_ENDPOINT.to_string()),
        offline,
        token: None,
    }
}

/// Writes `models--owner--name/refs/<rev>` -> COMMIT and the given snapshot files.
fn make_cache(cache: &Path, repo: &str, rev: &str, files: &[&str]) -> PathBuf {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join(rev), COMMIT).unwrap();
    let snap = repo_dir.join("snapshots").join(COMMIT);
    for f in files {
        let p = snap.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let body = if f.ends_with(".index.json") {
            r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#
        } else {
            "{}"
        };
        std::fs::write(p, body).unwrap();
    }
    snap
}

#[test]
fn local_directory_and_gguf() {
    let t = TempDir::new("local");
    let o = opts(&t.0, true);
    let dir = t.0.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = dir.to_str().unwrap();
    assert_eq!(resolve_model(spec, &o).unwrap(), ModelLocation::Dir(dir.clone()));

    let gguf = t.0.join("m.GGUF");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let got = resolve_model(gguf.to_str().unwrap(), &o).unwrap();
    assert_eq!(got, ModelLocation::GgufFile(gguf.clone()));
    assert_eq!(got.path(), gguf.as_path());

    let other = t.0.join("weights.bin");
    std::fs::write(&other, b"x").unwrap();
    let err = resolve_model(other.to_str().unwrap(), &o).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains(".gguf"), "{err}");
}

#[test]
fn bad_specs() {
    let t = TempDir::new("bad");
    let o = opts(&t.0, true);
    for spec in ["nonexistent-dir-xyz", "/no/such/path", "./missing.gguf", "a/b/c", "owner/name:weights.bin"] {
        let err = resolve_model(spec, &o).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{spec}: {err:?}");
        assert!(err.to_string().contains("not a local path and not a Hugging Face repo id"), "{spec}: {err}");
    }
}

#[test]
fn offline_with_empty_cache_fails_naming_repo_and_offline() {
    let t = TempDir::new("empty");
    let err = resolve_model("owner/name", &opts(&t.0, true)).unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("offline"), "{msg}");
    assert!(msg.contains("owner/name"), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");

    let err = resolve_model("owner/name:m.gguf", &opts(&t.0, true)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("offline") && msg.contains("m.gguf"), "{msg}");
}

#[test]
fn offline_resolves_hand_made_cache() {
    let t = TempDir::new("cache");
    let snap = make_cache(&t.0, "owner/name", "main", &["config.json", "model.safetensors", "tokenizer.json"]);
    let got = resolve_model("owner/name", &opts(&t.0, true)).unwrap();
    assert_eq!(got, ModelLocation::Dir(snap.clone()));

    // Sharded weights: every shard the index lists must be there.
    let snap2 = make_cache(&t.0, "owner/sharded", "main", &["config.json", "model.safetensors.index.json"]);
    let err = resolve_model("owner/sharded", &opts(&t.0, true)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model-00001-of-00002.safetensors") && msg.contains("offline"), "{msg}");
    std::fs::write(snap2.join("model-00001-of-00002.safetensors"), b"").unwrap();
    std::fs::write(snap2.join("model-00002-of-00002.safetensors"), b"").unwrap();
    assert_eq!(resolve_model("owner/sharded", &opts(&t.0, true)).unwrap(), ModelLocation::Dir(snap2));

    // Missing weights.
    make_cache(&t.0, "owner/noweights", "main", &["config.json"]);
    let err = resolve_model("owner/noweights", &opts(&t.0, true)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("offline") && msg.contains("owner/noweights"), "{msg}");

    // A GGUF file in a repo, on another branch, and by commit hash.
    let snap3 = make_cache(&t.0, "owner/gguf", "dev", &["sub/m-i2_s.gguf"]);
    let o = HubOptions { revision: Some("dev".into()), ..opts(&t.0, true) };
    assert_eq!(
        resolve_model("owner/gguf:sub/m-i2_s.gguf", &o).unwrap(),
        ModelLocation::GgufFile(snap3.join("sub/m-i2_s.gguf"))
    );
    let err = resolve_model("owner/gguf:sub/m-i2_s.gguf", &opts(&t.0, true)).unwrap_err();
    assert!(err.to_string().contains("revision main"), "{err}");
    let o = HubOptions { revision: Some(COMMIT.into()), ..opts(&t.0, true) };
    assert_eq!(
        resolve_model("owner/gguf:sub/m-i2_s.gguf", &o).unwrap(),
        ModelLocation::GgufFile(snap3.join("sub/m-i2_s.gguf"))
    );
}

#[test]
fn complete_cache_needs_no_network() {
    // Online mode, unreachable hub: a complete snapshot (optional files present or marked
    // absent upstream with huggingface_hub's `.no_exist` markers) resolves without a request.
    let t = TempDir::new("online-cached");
    let snap = make_cache(
        &t.0,
        "owner/name",
        "main",
        &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
    );
    let marker = t.0.join("models--owner--name/.no_exist").join(COMMIT).join("generation_config.json");
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, b"").unwrap();
    assert_eq!(resolve_model("owner/name", &opts(&t.0, false)).unwrap(), ModelLocation::Dir(snap.clone()));
    // GGUF: only the file matters.
    let snap2 = make_cache(&t.0, "owner/gguf", "main", &["m.gguf"]);
    assert_eq!(
        resolve_model("owner/gguf:m.gguf", &opts(&t.0, false)).unwrap(),
        ModelLocation::GgufFile(snap2.join("m.gguf"))
    );
}

#[test]
fn unchecked_optional_files_ask_the_hub_once_or_fall_back_to_the_cache() {
    let t = TempDir::new("optional");
    // Runnable snapshot, but nobody checked whether generation_config.json etc. exist.
    let snap = make_cache(&t.0, "owner/name", "main", &["config.json", "model.safetensors"]);
    // Hub unreachable: the cache is used as it is (like huggingface_hub).
    assert_eq!(resolve_model("owner/name", &opts(&t.0, false)).unwrap(), ModelLocation::Dir(snap.clone()));
    // Hub reachable: one listing, the missing optional files fetched or marked absent;
    // afterwards no request at all.
    let hub = fake_hub::start(
        "owner/name",
        COMMIT,
        vec![
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", b"{}".to_vec()),
            ("tokenizer.json", b"{\"t\": 1}".to_vec()),
        ],
    );
    let o = HubOptions { endpoint: Some(hub.endpoint.clone()), ..opts(&t.0, false) };
    assert_eq!(resolve_model("owner/name", &o).unwrap(), ModelLocation::Dir(snap.clone()));
    assert_eq!(std::fs::read(snap.join("tokenizer.json")).unwrap(), b"{\"t\": 1}");
    let no_exist = t.0.join("models--owner--name/.no_exist").join(COMMIT);
    assert!(no_exist.join("generation_config.json").exists());
    assert!(no_exist.join("tokenizer_config.json").exists());
    let requests = hub.requests.load(Ordering::SeqCst);
    assert!(requests >= 1);
    assert_eq!(resolve_model("owner/name", &o).unwrap(), ModelLocation::Dir(snap));
    assert_eq!(hub.requests.load(Ordering::SeqCst), requests);
}

#[test]
fn unreachable_hub_fails_fast_with_hub_error() {
    let t = TempDir::new("unreachable");
    let start = Instant::now();
    let err = resolve_model("owner/name", &opts(&t.0, false)).unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("owner/name"), "{msg}");
    assert!(msg.contains("127.0.0.1:9"), "{msg}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let err = resolve_model("owner/name:file.gguf", &opts(&t.0, false)).unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
}

/// A minimal stand-in for the hub's HTTP API (what hf-hub's sync client asks for): the repo
/// listing, and `resolve/<rev>/<file>` with range requests, `ETag` and `X-Repo-Commit`.
mod fake_hub {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    pub struct FakeHub {
        pub endpoint: String,
        pub requests: Arc<AtomicUsize>,
    }

    /// Serves `files` of repo `repo` at revision `main`, commit `commit`.
    pub fn start(repo: &str, commit: &str, files: Vec<(&str, Vec<u8>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let repo = repo.to_string();
        let commit = commit.to_string();
        let files: HashMap<String, (usize, Vec<u8>)> =
            files.into_iter().enumerate().map(|(i, (name, body))| (name.to_string(), (i, body))).collect();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = handle(stream, &repo, &commit, &files);
            }
        });
        FakeHub { endpoint, requests }
    }

    fn handle(
        mut stream: TcpStream,
        repo: &str,
        commit: &str,
        files: &HashMap<String, (usize, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().trim_start_matches("bytes=").to_string());
                }
            }
        }
        let api = format!("/api/models/{repo}/revision/main");
        let resolve = format!("/{repo}/resolve/main/");
        if path == api {
            let siblings: Vec<String> = files.keys().map(|f| format!(r#"{{"rfilename": "{f}"}}"#)).collect();
            let body = format!(r#"{{"id": "{repo}", "sha": "{commit}", "siblings": [{}]}}"#, siblings.join(","));
            return respond(&mut stream, "200 OK", &[], body.as_bytes());
        }
        if let Some((i, body)) = path.strip_prefix(&resolve).and_then(|f| files.get(f)) {
            let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                Some((a, b)) => {
                    let a: usize = a.parse().unwrap_or(0);
                    let b: usize = b.parse().unwrap_or(body.len() - 1);
                    (a, b.min(body.len() - 1))
                }
                None => (0, body.len() - 1),
            };
            let headers = [
                format!("ETag: \"blob{i}\""),
                format!("X-Repo-Commit: {commit}"),
                format!("Content-Range: bytes {start}-{end}/{}", body.len()),
            ];
            return respond(&mut stream, "206 Partial Content", &headers, &body[start..=end]);
        }
        respond(&mut stream, "404 Not Found", &[], b"not found")
    }

    fn respond(stream: &mut TcpStream, status: &str, headers: &[String], body: &[u8]) -> std::io::Result<()> {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        stream.flush()
    }
}

#[test]
fn downloads_from_a_hub_then_reuses_the_cache() {
    let t = TempDir::new("download");
    let index = br#"{"weight_map": {"x": "model-00001-of-00002.safetensors",
        "y": "model-00002-of-00002.safetensors"}}"#;
    let hub = fake_hub::start(
        "owner/name",
        COMMIT,
        vec![
            ("config.json", b"{\"vocab_size\": 8}".to_vec()),
            ("tokenizer.json", b"{\"tok\": 1}".to_vec()),
            ("model.safetensors.index.json", index.to_vec()),
            ("model-00001-of-00002.safetensors", vec![1u8; 3000]),
            ("model-00002-of-00002.safetensors", vec![2u8; 10]),
            ("README.md", b"readme".to_vec()),
            ("other.gguf", b"GGUF".to_vec()),
        ],
    );
    let o = HubOptions { endpoint: Some(hub.endpoint.clone()), ..opts(&t.0, false) };
    let got = resolve_model("owner/name", &o).unwrap();
    let snap = t.0.join("models--owner--name/snapshots").join(COMMIT);
    assert_eq!(got, ModelLocation::Dir(snap.clone()));
    assert_eq!(std::fs::read(snap.join("config.json")).unwrap(), b"{\"vocab_size\": 8}");
    assert_eq!(std::fs::read(snap.join("model-00001-of-00002.safetensors")).unwrap(), vec![1u8; 3000]);
    assert!(snap.join("tokenizer.json").exists());
    assert!(!snap.join("README.md").exists());
    let refs = std::fs::read_to_string(t.0.join("models--owner--name/refs/main")).unwrap();
    assert_eq!(refs.trim(), COMMIT);
    // Files the repo lacks are remembered, so the cache is complete from now on.
    let no_exist = t.0.join("models--owner--name/.no_exist").join(COMMIT);
    assert!(no_exist.join("generation_config.json").exists());
    assert!(no_exist.join("tokenizer_config.json").exists());

    // Second time: no request at all, even with the hub reachable.
    let before = hub.requests.load(Ordering::SeqCst);
    assert_eq!(resolve_model("owner/name", &o).unwrap(), got);
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
    // And offline.
    assert_eq!(resolve_model("owner/name", &opts(&t.0, true)).unwrap(), got);

    // A GGUF file of the repo.
    let g = resolve_model("owner/name:other.gguf", &o).unwrap();
    assert_eq!(g, ModelLocation::GgufFile(snap.join("other.gguf")));
    assert_eq!(std::fs::read(snap.join("other.gguf")).unwrap(), b"GGUF");

    // A GGUF file the repo does not have: the error lists the ones it has.
    let err = resolve_model("owner/name:missing.gguf", &o).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("missing.gguf") && msg.contains("other.gguf"), "{msg}");

    // An unknown repository.
    let err = resolve_model("owner/unknown", &o).unwrap_err();
    assert!(matches!(err, Error::Hub(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("owner/unknown") && msg.contains("not found"), "{msg}");
}

#[test]
fn gguf_only_repo_hints_at_the_file_syntax() {
    let t = TempDir::new("gguf-only");
    let hub = fake_hub::start("owner/g", COMMIT, vec![("ggml-model-i2_s.gguf", b"GGUF....".to_vec())]);
    let o = HubOptions { endpoint: Some(hub.endpoint.clone()), ..opts(&t.0, false) };
    let err = resolve_model("owner/g", &o).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("owner/g:<file>.gguf") && msg.contains("ggml-model-i2_s.gguf"),
        "{msg}"
    );
    let got = resolve_model("owner/g:ggml-model-i2_s.gguf", &o).unwrap();
    assert_eq!(std::fs::read(got.path()).unwrap(), b"GGUF....", "{got:?}");
}
