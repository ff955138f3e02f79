//! Test helpers: an in-process server on an ephemeral loopback port, and a tiny blocking HTTP/1.1
//! client over a raw TcpStream (no HTTP client dependency).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bitnet_core::batch::BatchModel;
use bitnet_core::engine::{Engine, EngineOptions, ModelMeta};
use bitnet_core::generate::{GenOptions, Session};
use bitnet_core::sampler::SamplingParams;
use bitnet_server::{KvPlan, Server, ServerConfig};
use serde_json::Value;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-gqa4-master")
}

/// `random:tiny` (no tokenizer) or the fixture folder (tokenizer + chat template).
pub fn load(spec: &str) -> Engine {
    let opts = EngineOptions { threads: 1, progress: false, ..EngineOptions::default() };
    let spec = if spec == "fixture" { fixture_dir().to_string_lossy().into_owned() } else { spec.to_string() };
    Engine::load(&spec, &opts).expect("load test model")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub model_id: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub fn start(engine: Engine, cfg: ServerConfig) -> TestServer {
        Self::spawn(cfg, move |c| Server::bind(engine, c))
    }

    /// A server of any `BatchModel` (its KV pool sized as `plan`).
    pub fn start_model(
        meta: Engine<ModelMeta>,
        model: Box<dyn BatchModel>,
        plan: KvPlan,
        cfg: ServerConfig,
    ) -> TestServer {
        Self::spawn(cfg, move |c| Server::bind_model(meta, model, plan, c))
    }

    /// Binds with `bind` on an ephemeral loopback port, in a runtime on its own thread.
    fn spawn<F, Fut>(cfg: ServerConfig, bind: F) -> TestServer
    where
        F: FnOnce(ServerConfig) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<Server>>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let server = bind(ServerConfig { addr: "127.0.0.1:0".parse().unwrap(), ..cfg }).await?;
                atx.send((server.local_addr(), server.model_id().to_string())).unwrap();
                server
                    .run(async move {
                        let _ = rx.await;
                    })
                    .await
            })
        });
        let (addr, model_id) = arx.recv_timeout(Duration::from_secs(60)).expect("server did not start");
        TestServer { addr, model_id, stop: Some(tx), thread: Some(thread) }
    }

    pub fn with(spec: &str, cfg: ServerConfig) -> TestServer {
        Self::start(load(spec), cfg)
    }

    /// Asks for shutdown and waits for `run` to return.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("server thread panicked"),
            None => Ok(()),
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        http(self.addr, "GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        http(self.addr, "POST", path, &[], Some(body.to_string().as_bytes()))
    }

    pub fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        http(self.addr, "POST", path, headers, Some(body))
    }

    /// A value of /metrics (first sample whose name and labels start with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.rsplit_once(' ') {
                if k == name {
                    return v.parse().unwrap();
                }
            }
        }
        panic!("metric {name} not found in:\n{text}");
    }

    /// Waits until a metric has the value (the scheduler publishes after each step).
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if v == want {
                return;
            }
            if t0.elapsed() > timeout {
                panic!("metric {name} is {v}, expected {want}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        self.text().lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim_start().to_string()).collect()
    }
    /// Checks the OpenAI error shape and returns the error object.
    pub fn error(&self) -> Value {
        let j = self.json();
        let e = j.get("error").unwrap_or_else(|| panic!("no error object: {j}")).clone();
        assert!(e["message"].is_string(), "{e}");
        assert!(e["type"].is_string(), "{e}");
        assert!(e.get("param").is_some(), "{e}");
        assert!(e.get("code").is_some(), "{e}");
        e
    }
}

fn write_request(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before the whole body is read.
        let _ = s.write_all(b);
    }
}

/// Reads the status line and headers.
fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 =
        line.split_whitespace().nth(1).unwrap_or_else(|| panic!("bad status line {line:?}")).parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// One request on a fresh connection (`Connection: close`); reads the whole answer, chunked or not.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write_request(&mut s, addr, method, path, headers, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut buf = vec![0; n];
            r.read_exact(&mut buf).unwrap();
            body.extend_from_slice(&buf);
            line.clear();
            r.read_line(&mut line).unwrap();
        }
    } else {
        let _ = r.read_to_end(&mut body);
    }
    Resp { status, headers, body }
}

/// Starts a streamed request and returns the reader positioned after the headers: the caller
/// reads some of it and drops it (a client going away).
pub fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> (u16, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write_request(&mut s, addr, "POST", path, &[], Some(body.to_string().as_bytes()));
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    (status, r)
}

/// Greedy token ids of a completion on a tokenizer-less model.
pub fn completion_ids(srv: &TestServer, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let r = srv.post(
        "/v1/completions",
        &serde_json::json!({"model": srv.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    j["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// A deterministic prompt of `n` token ids below `vocab`.
pub fn prompt(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// The tokens of the single-sequence reference loop (bitnet-core's Session on `random:tiny`)
/// for each `(prompt, max_new_tokens)`, eos ignored.
pub fn reference_tokens(prompts: &[(Vec<u32>, usize)], sampling: SamplingParams) -> Vec<Vec<u32>> {
    let engine = load("random:tiny");
    let mut s = Session::new(&engine.model, 512, 64).unwrap();
    prompts
        .iter()
        .map(|(p, n)| {
            s.reset();
            let mut out = Vec::new();
            let opts = GenOptions {
                max_new_tokens: *n,
                sampling,
                eos_ids: vec![],
                ignore_eos: true,
                json: None,
                prompt_lookup: 0,
            };
            s.generate(p, &opts, |t| {
                out.push(t);
                true
            })
            .unwrap();
            out
        })
        .collect()
}
