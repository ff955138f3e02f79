//! Prompt lookup in the server (`ServerConfig::prompt_lookup`): drafts fed with a sequence's
//! sampled token leave every response as it is without them (tokens, log-probabilities, finish
//! reasons; greedy, seeded sampling, penalties, stop tokens, JSON mode), alone, batched and
//! after preemption, and every KV block comes back. The fixture model (tiny-gqa4-master) repeats
//! itself often enough that drafts are both taken and refused.

mod common;

use std::time::Duration;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::{json, Value};

/// Requests whose prompts repeat (drafts from the first steps) or not, with every host-side
/// sampling feature.
fn requests() -> Vec<Value> {
    let mut v = Vec::new();
    let prompts: [Vec<u32>; 4] = [
        vec![5, 5, 5, 5, 5],
        vec![1, 17, 42, 99, 300, 7, 250, 12, 77, 401, 33],
        (0..36).map(|i| [17u32, 250, 31, 480, 9, 77][i % 6]).collect(),
        prompt(3, 40, 600),
    ];
    for p in &prompts {
        v.push(json!({"prompt": p, "max_tokens": 90, "temperature": 0}));
        v.push(json!({"prompt": p, "max_tokens": 60, "temperature": 0.9, "top_p": 0.95, "seed": 7}));
        v.push(
            json!({"prompt": p, "max_tokens": 60, "temperature": 0, "frequency_penalty": 0.4, "presence_penalty": 0.2}),
        );
        v.push(json!({"prompt": p, "max_tokens": 40, "temperature": 0, "logprobs": 3}));
    }
    // a stop token that comes after some drafted steps, kept back by min_tokens at first
    v.push(json!({"prompt": prompts[0], "max_tokens": 90, "temperature": 0, "stop_token_ids": [474], "min_tokens": 2}));
    v.push(
        json!({"prompt": prompts[1], "max_tokens": 90, "temperature": 0, "stop_token_ids": [421], "min_tokens": 30}),
    );
    for (i, b) in v.iter_mut().enumerate() {
        b["ignore_eos"] = json!(true);
        b["return_token_ids"] = json!(true);
        b["stream"] = json!(i % 3 == 1);
    }
    v
}

/// What must not change: the choices and the usage (not ids and times).
fn outcome(r: Resp) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    if r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
        // streamed: the chunks' tokens, log-probabilities and finish reason, in order
        let mut ids = Vec::new();
        let mut lps = Vec::new();
        let mut finish = Value::Null;
        for e in r.sse().iter().filter(|e| *e != "[DONE]") {
            let c: Value = serde_json::from_str(e).unwrap();
            let ch = &c["choices"][0];
            if let Some(a) = ch["token_ids"].as_array() {
                ids.extend(a.iter().cloned());
            }
            if !ch["logprobs"].is_null() {
                lps.push(ch["logprobs"].clone());
            }
            if !ch["finish_reason"].is_null() {
                finish = ch["finish_reason"].clone();
            }
        }
        json!({"ids": ids, "logprobs": lps, "finish": finish})
    } else {
        let j = r.json();
        json!({"choice": j["choices"][0], "usage": j["usage"]})
    }
}

/// Every request at once (request `i` starts `i` staggers late), or one after another (None).
fn run_all(srv: &TestServer, reqs: &[Value], stagger: Option<Duration>) -> Vec<Value> {
    let Some(stagger) = stagger else {
        return reqs.iter().map(|b| outcome(srv.post("/v1/completions", b))).collect();
    };
    let handles: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (addr, body) = (srv.addr, b.to_string());
            std::thread::spawn(move || {
                std::thread::sleep(stagger * i as u32);
                outcome(http(addr, "POST", "/v1/completions", &[], Some(body.as_bytes())))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn server(prompt_lookup: usize, cfg: ServerConfig) -> TestServer {
    TestServer::with("fixture", ServerConfig { prompt_lookup, ..cfg })
}

#[test]
fn drafts_leave_every_response_unchanged() {
    let reqs = requests();
    let cfg = ServerConfig { max_batch: 8, prefill_chunk: 24, ..ServerConfig::default() };
    let plain = server(0, cfg.clone());
    let want = run_all(&plain, &reqs, None);
    assert_eq!(plain.metric("bitnet_draft_tokens_total"), 0.0);
    for k in [4, 16] {
        let srv = server(k, cfg.clone());
        let alone = run_all(&srv, &reqs, None);
        for (i, (a, b)) in alone.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "prompt lookup {k}, request {i} alone: {}", reqs[i]);
        }
        let (drafted, accepted) =
            (srv.metric("bitnet_draft_tokens_total"), srv.metric("bitnet_draft_accepted_tokens_total"));
        assert!(accepted > 0.0 && accepted < drafted, "k {k}: {accepted} of {drafted} draft tokens accepted");
        // a sequence alone took fewer steps than tokens
        assert!(srv.metric("bitnet_steps_total") < plain.metric("bitnet_steps_total"));
        let together = run_all(&srv, &reqs, Some(Duration::from_millis(2)));
        for (i, (a, b)) in together.iter().zip(&want).enumerate() {
            assert_eq!(a, b, "prompt lookup {k}, request {i} among {} others: {}", reqs.len() - 1, reqs[i]);
        }
        srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
    }
}

#[test]
fn json_mode_with_drafts() {
    let body = |seed: u64| {
        json!({"messages": [{"role": "user", "content": "a JSON object please, a JSON object please"}],
               "max_tokens": 120, "temperature": 0.7, "seed": seed, "response_format": {"type": "json_object"}})
    };
    let cfg = ServerConfig::default();
    let (plain, srv) = (server(0, cfg.clone()), server(8, cfg));
    for seed in 0..6 {
        let a = plain.post("/v1/chat/completions", &body(seed)).json();
        let b = srv.post("/v1/chat/completions", &body(seed)).json();
        assert_eq!(a["choices"], b["choices"], "seed {seed}");
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn preemption_with_drafts_keeps_outputs() {
    // tiny-gqa4: 2 layers x kv_dim 64 x f32 x (K and V) = 1 KiB per position; 16-position
    // blocks. 24 blocks hold 384 positions: the 8 requests need ~1,300.
    let reqs: Vec<Value> = (0..8)
        .map(|i| {
            let p: Vec<u32> = if i % 2 == 0 { vec![5 + i; 6] } else { prompt(40 + i as u64, 20 + 3 * i as usize, 600) };
            json!({"prompt": p, "max_tokens": 140, "temperature": 0, "ignore_eos": true, "return_token_ids": true})
        })
        .collect();
    let cfg =
        ServerConfig { max_batch: 8, kv_memory: Some(24 * 16 * 1024), prefill_chunk: 32, ..ServerConfig::default() };
    let plain = server(0, cfg.clone());
    let want = run_all(&plain, &reqs, None);
    let srv = server(16, cfg);
    assert_eq!(srv.metric("bitnet_kv_blocks_total"), 24.0);
    // all at once: they outgrow the pool together
    let got = run_all(&srv, &reqs, Some(Duration::ZERO));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a, b, "request {i} differs after preemption with drafts");
    }
    assert!(srv.metric("bitnet_preemptions_total") > 0.0, "the test did not exercise preemption");
    assert!(srv.metric("bitnet_draft_accepted_tokens_total") > 0.0, "no draft was accepted");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn prompt_lookup_over_16_is_refused() {
    let engine = load("fixture");
    let cfg = ServerConfig { prompt_lookup: 17, addr: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(bitnet_server::Server::bind(engine, cfg)).err().expect("bind refused");
    assert!(format!("{err:#}").contains("--prompt-lookup 17"), "{err:#}");
}
