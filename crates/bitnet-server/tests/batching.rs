//! Continuous batching: batch invariance (a greedy request gives the same tokens alone and among
//! 31 others at different positions, with chunked prefills in the same steps), preemption when
//! the KV cache runs out, 429 past the queue, and a clean shutdown.

mod common;

use std::time::Duration;

use bitnet_core::sampler::SamplingParams;
use bitnet_server::ServerConfig;
use common::*;
use serde_json::json;

/// Greedy tokens of the single-sequence reference loop (bitnet-core's Session).
fn reference(prompts: &[(Vec<u32>, usize)]) -> Vec<Vec<u32>> {
    reference_tokens(prompts, SamplingParams::greedy())
}

/// Runs all requests at once (staggered starts), greedy, returns their token ids.
fn concurrent(srv: &TestServer, reqs: &[(Vec<u32>, usize)], stagger: Duration) -> Vec<Vec<u32>> {
    concurrent_with(srv, reqs, stagger, &json!({}))
}

/// [`concurrent`] with more request fields (`extra`, an object).
fn concurrent_with(
    srv: &TestServer,
    reqs: &[(Vec<u32>, usize)],
    stagger: Duration,
    extra: &serde_json::Value,
) -> Vec<Vec<u32>> {
    let handles: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, n))| {
            let addr = srv.addr;
            let mut body = json!({"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true, "stream": i % 2 == 1});
            for (k, v) in extra.as_object().into_iter().flatten() {
                body[k] = v.clone();
            }
            std::thread::spawn(move || {
                std::thread::sleep(stagger * i as u32);
                let r = http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes()));
                assert_eq!(r.status, 200, "{}", r.text());
                if i % 2 == 1 {
                    let mut ids = Vec::new();
                    for e in r.sse().iter().filter(|e| *e != "[DONE]") {
                        let c: serde_json::Value = serde_json::from_str(e).unwrap();
                        if let Some(a) = c["choices"][0]["token_ids"].as_array() {
                            ids.extend(a.iter().map(|v| v.as_u64().unwrap() as u32));
                        }
                    }
                    ids
                } else {
                    r.json()["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn workload(n: usize) -> Vec<(Vec<u32>, usize)> {
    (0..n).map(|i| (prompt(100 + i as u64, 5 + (i * 37) % 300, 640), 20 + (i * 13) % 60)).collect()
}

#[test]
fn greedy_output_is_batch_invariant() {
    let reqs = workload(32);
    let want = reference(&reqs);
    // Small prefill chunks: long prompts take several steps, sharing them with decodes.
    let cfg = ServerConfig {
        max_batch: 32,
        prefill_chunk: 32,
        debug_step_delay: Duration::from_millis(1),
        ..ServerConfig::default()
    };
    let srv = TestServer::with("random:tiny", cfg);
    // Alone.
    for (i, (p, n)) in reqs.iter().enumerate().take(4) {
        assert_eq!(completion_ids(&srv, p, *n), want[i], "request {i} alone differs from the reference loop");
    }
    // Among 31 others, each at its own position.
    let steps0 = srv.metric("bitnet_steps_total");
    let tokens0 = srv.metric("bitnet_step_tokens_total");
    let got = concurrent(&srv, &reqs, Duration::from_millis(3));
    for i in 0..reqs.len() {
        assert_eq!(got[i], want[i], "request {i} in a batch differs from the same request alone");
    }
    let steps = srv.metric("bitnet_steps_total") - steps0;
    let tokens = srv.metric("bitnet_step_tokens_total") - tokens0;
    assert!(tokens / steps > 4.0, "requests did not overlap: {tokens} tokens in {steps} steps");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn frequency_and_presence_penalties_reach_the_sampler() {
    // Greedy with penalties: the server (8 requests batched) gives what the reference loop gives
    // with the same settings, and the penalties change the output of at least one request.
    let reqs = workload(8);
    let sampling = SamplingParams { frequency_penalty: 1.2, presence_penalty: 0.8, ..SamplingParams::greedy() };
    let want = reference_tokens(&reqs, sampling);
    assert_ne!(want, reference(&reqs), "the penalties changed nothing: pick stronger ones");
    let srv = TestServer::with("random:tiny", ServerConfig { max_batch: 8, ..ServerConfig::default() });
    let got = concurrent_with(
        &srv,
        &reqs,
        Duration::from_millis(2),
        &json!({"frequency_penalty": 1.2, "presence_penalty": 0.8}),
    );
    assert_eq!(got, want, "penalized greedy output differs from the reference loop");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn logit_bias_reaches_the_sampler() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let p = prompt(17, 20, 640);
    let plain = completion_ids(&srv, &p, 8);
    let ids = |bias: serde_json::Value| -> Vec<u32> {
        let b = json!({"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "logit_bias": bias});
        let r = srv.post("/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    };
    // +100 on one token: greedy picks it every time (the tiny model's logits span about +-14).
    assert_eq!(ids(json!({"7": 100})), vec![7; 8]);
    // -100 on the first greedy token: the first token changes.
    let banned = ids(json!({ plain[0].to_string(): -100 }));
    assert_ne!(banned[0], plain[0]);
    assert!(!banned.contains(&plain[0]));
    // An empty map changes nothing.
    assert_eq!(ids(json!({})), plain);
}

#[test]
fn stop_token_ids_and_min_tokens() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let p = prompt(23, 20, 640);
    let plain = completion_ids(&srv, &p, 8);
    let run = |extra: serde_json::Value| -> (Vec<u32>, String) {
        let mut b = json!({"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = srv.post("/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        let ids = j["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        (ids, j["choices"][0]["finish_reason"].as_str().unwrap().to_string())
    };
    // A stop token ends the output before it (also with ignore_eos), finish reason "stop".
    let k = (1..plain.len()).find(|&k| !plain[..k].contains(&plain[k])).unwrap();
    assert_eq!(run(json!({"stop_token_ids": [plain[k]]})), (plain[..k].to_vec(), "stop".into()));
    assert_eq!(run(json!({"stop_token_ids": [plain[0]]})), (vec![], "stop".into()));
    // min_tokens: the stop token cannot come first; at least 3 tokens.
    let (ids, _) = run(json!({"stop_token_ids": [plain[0]], "min_tokens": 3}));
    assert!(ids.len() >= 3 && !ids[..3].contains(&plain[0]), "{ids:?}");
    // Without stop tokens (ignore_eos), min_tokens changes nothing.
    assert_eq!(run(json!({"min_tokens": 5})).0, plain);
}

#[test]
fn preemption_when_blocks_run_out_keeps_outputs() {
    let reqs: Vec<(Vec<u32>, usize)> = (0..8).map(|i| (prompt(500 + i, 90 + 7 * i as usize, 640), 150)).collect();
    let want = reference(&reqs);
    // random:tiny: 2 layers x kv_dim 64 x f32 x (K and V) = 1 KiB per position; 16-position
    // blocks. 40 blocks hold 640 positions: the 8 requests need ~2000.
    let cfg =
        ServerConfig { max_batch: 8, kv_memory: Some(40 * 16 * 1024), prefill_chunk: 64, ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    assert_eq!(srv.metric("bitnet_kv_blocks_total"), 40.0);
    let got = concurrent(&srv, &reqs, Duration::ZERO);
    for i in 0..reqs.len() {
        assert_eq!(got[i], want[i], "request {i} differs after preemption");
    }
    assert!(srv.metric("bitnet_preemptions_total") > 0.0, "the test did not exercise preemption");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
}

#[test]
fn overload_gets_429_and_nothing_crashes() {
    let cfg = ServerConfig {
        max_batch: 2,
        max_queue: 2,
        debug_step_delay: Duration::from_millis(3),
        ..ServerConfig::default()
    };
    let srv = TestServer::with("random:tiny", cfg);
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let addr = srv.addr;
            std::thread::spawn(move || {
                let body =
                    json!({"prompt": prompt(i, 10, 640), "max_tokens": 40, "ignore_eos": true, "stream": i % 2 == 0});
                http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes()))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let r = h.join().unwrap();
        match r.status {
            200 => {
                ok += 1;
                if r.header("content-type").unwrap().starts_with("text/event-stream") {
                    assert_eq!(r.sse().last().unwrap(), "[DONE]");
                } else {
                    assert_eq!(r.json()["usage"]["completion_tokens"], 40);
                }
            }
            429 => {
                busy += 1;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.error()["code"], "rate_limit_exceeded");
            }
            s => panic!("status {s}: {}", r.text()),
        }
    }
    assert!(ok >= 2, "{ok} ok");
    assert_eq!(ok + busy, 12);
    assert!(busy >= 1, "nothing was refused ({ok} ok)");
    assert_eq!(srv.metric("bitnet_requests_rejected_total"), busy as f64);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, Duration::from_secs(10));
    assert_eq!(srv.get("/health").status, 200);
}

#[test]
fn shutdown_finishes_running_requests() {
    let cfg = ServerConfig {
        debug_step_delay: Duration::from_millis(5),
        shutdown_grace: Duration::from_secs(20),
        ..ServerConfig::default()
    };
    let srv = TestServer::with("random:tiny", cfg);
    let addr = srv.addr;
    let h = std::thread::spawn(move || {
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 100, "ignore_eos": true, "stream": true});
        http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes()))
    });
    srv.wait_metric("bitnet_running_sequences", 1.0, Duration::from_secs(10));
    srv.stop().unwrap();
    let r = h.join().unwrap();
    let ev = r.sse();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert!(ev[ev.len() - 2].contains("\"finish_reason\":\"length\""), "{ev:?}");
    assert!(std::net::TcpStream::connect(addr).is_err(), "still listening after shutdown");
}

#[test]
fn shutdown_cancels_what_outlives_the_grace_period() {
    let cfg = ServerConfig {
        debug_step_delay: Duration::from_millis(5),
        shutdown_grace: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let srv = TestServer::with("random:tiny", cfg);
    let addr = srv.addr;
    let h = std::thread::spawn(move || {
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": true, "stream": true});
        http(addr, "POST", "/v1/completions", &[], Some(body.to_string().as_bytes()))
    });
    srv.wait_metric("bitnet_running_sequences", 1.0, Duration::from_secs(10));
    let t0 = std::time::Instant::now();
    srv.stop().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let r = h.join().unwrap();
    let ev = r.sse();
    assert!(ev.last().unwrap().contains("shutting down"), "{ev:?}");
}

#[test]
fn long_prompt_prefill_does_not_stall_running_decodes() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let cfg = ServerConfig { prefill_chunk: 16, debug_step_delay: Duration::from_millis(5), ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    // A decodes...
    let body = json!({"prompt": [1, 2, 3, 4, 5], "max_tokens": 300, "ignore_eos": true, "stream": true});
    let (status, mut reader) = open_stream(srv.addr, "/v1/completions", &body);
    assert_eq!(status, 200);
    let times = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let t2 = times.clone();
    let th = std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.contains("[DONE]") {
                break;
            }
            if line.starts_with("data:") {
                t2.lock().unwrap().push(Instant::now());
            }
        }
    });
    while times.lock().unwrap().len() < 3 {
        std::thread::sleep(Duration::from_millis(2));
    }
    // ... while B's 320-token prompt is prefilled 16 tokens per step (20 steps).
    let t0 = Instant::now();
    let r = srv.post("/v1/completions", &json!({"prompt": prompt(9, 320, 640), "max_tokens": 1}));
    let t1 = Instant::now();
    assert_eq!(r.status, 200);
    let during = times.lock().unwrap().iter().filter(|t| **t > t0 && **t < t1).count();
    assert!(during >= 12, "only {during} tokens of the running sequence during a 20-step prefill");
    th.join().unwrap();
}
