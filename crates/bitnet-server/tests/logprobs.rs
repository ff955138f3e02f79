//! `logprobs`: each generated token's log-probability and the most likely alternatives, in the
//! chat form and the legacy completions form, streamed and not; `echo` with the prompt's
//! log-probabilities; the refusals.

mod common;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::{json, Value};

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// Checks one chat-form entry of a greedy request: the chosen token is the first alternative,
/// alternatives descend, every value is a log-probability, the mass is at most 1.
fn check_greedy_entry(e: &Value, k: usize) {
    let top = e["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), k, "{e}");
    assert_eq!(top[0]["token"], e["token"], "{e}");
    assert_eq!(top[0]["bytes"], e["bytes"], "{e}");
    assert_eq!(f(&top[0]["logprob"]), f(&e["logprob"]), "{e}");
    assert!(top.windows(2).all(|w| f(&w[0]["logprob"]) >= f(&w[1]["logprob"])), "{e}");
    assert!(top.iter().all(|t| f(&t["logprob"]) <= 0.0));
    let mass: f64 = top.iter().map(|t| f(&t["logprob"]).exp()).sum();
    assert!(mass <= 1.0 + 1e-5, "{mass}");
}

#[test]
fn chat_logprobs_streamed_and_not() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let body = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "Count: one two"}], "max_tokens": 12, "temperature": 0,
            "ignore_eos": true, "logprobs": true, "top_logprobs": 3, "return_token_ids": true, "stream": stream})
    };
    let r = srv.post("/v1/chat/completions", &body(false));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let content = j["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len(), 12);
    assert_eq!(j["usage"]["completion_tokens"], 12);
    // Entries follow the generated ids: each entry's bytes are its token's bytes.
    let engine = load("fixture");
    let tok = engine.tokenizer.as_ref().unwrap();
    let ids = j["choices"][0]["token_ids"].as_array().unwrap();
    for (e, id) in content.iter().zip(ids) {
        let want = tok.token_bytes(id.as_u64().unwrap() as u32).unwrap();
        let got: Vec<u8> = e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(got, want);
        check_greedy_entry(e, 3);
    }
    // Streamed: the same entries, spread over the chunks.
    let r = srv.post("/v1/chat/completions", &body(true));
    let mut streamed = Vec::new();
    for ev in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(ev).unwrap();
        if let Some(a) = c["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(a.iter().cloned());
        }
    }
    assert_eq!(streamed, content);
    // Without the flag: null.
    let r =
        srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}));
    assert!(r.json()["choices"][0]["logprobs"].is_null());
}

#[test]
fn completions_logprobs_legacy_form() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let p = prompt(3, 12, 640);
    let body = |stream: bool, k: usize| {
        json!({"prompt": p, "max_tokens": 10, "temperature": 0.8, "seed": 11, "ignore_eos": true, "logprobs": k,
            "return_token_ids": true, "stream": stream})
    };
    let j = srv.post("/v1/completions", &body(false, 2)).json();
    let lp = &j["choices"][0]["logprobs"];
    let ids = j["choices"][0]["token_ids"].as_array().unwrap();
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 10);
    let mut offset = 0;
    for i in 0..10 {
        // No tokenizer: vLLM's `token_id:N` strings.
        assert_eq!(tokens[i], format!("token_id:{}", ids[i]));
        let chosen = f(&lp["token_logprobs"][i]);
        assert!(chosen <= 0.0);
        // The map holds the top 2 and the chosen token (sampled: maybe a third).
        let m = lp["top_logprobs"][i].as_object().unwrap();
        assert!((2..=3).contains(&m.len()), "{m:?}");
        assert_eq!(f(&m[tokens[i].as_str().unwrap()]), chosen);
        assert_eq!(lp["text_offset"][i], offset);
        offset += tokens[i].as_str().unwrap().chars().count();
    }
    // Streamed: the same lists, concatenated over the chunks (same seed, same tokens).
    let r = srv.post("/v1/completions", &body(true, 2));
    let mut got: Vec<Value> = Vec::new();
    for ev in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(ev).unwrap();
        if let Some(a) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            got.extend(a.iter().cloned());
        }
    }
    assert_eq!(&got, lp["token_logprobs"].as_array().unwrap());
    // logprobs = 0: only the chosen token.
    let j = srv.post("/v1/completions", &body(false, 0)).json();
    assert!(j["choices"][0]["logprobs"]["top_logprobs"].as_array().unwrap().iter().all(|m| m
        .as_object()
        .unwrap()
        .len()
        == 1));
}

#[test]
fn logprobs_refusals() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        srv.post("/v1/chat/completions", &b)
    };
    for (extra, param) in [
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"logprobs": true, "top_logprobs": -1}), "top_logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"logprobs": 2}), "logprobs"),
    ] {
        let r = chat(extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        assert_eq!(r.error()["param"], param, "{extra}");
    }
    for k in [json!(21), json!(-1), json!(true)] {
        let r = srv.post("/v1/completions", &json!({"prompt": [1, 2], "max_tokens": 2, "logprobs": k}));
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.error()["param"], "logprobs");
    }
}

#[test]
fn echo_with_prompt_logprobs() {
    // Chunks of 16 prompt tokens: the prompt's rows come from three steps, each shared with the
    // other requests' tokens.
    let srv = TestServer::with("random:tiny", ServerConfig { prefill_chunk: 16, ..ServerConfig::default() });
    let p = prompt(21, 40, 640);
    let body = |stream: bool| {
        json!({"prompt": p, "max_tokens": 4, "temperature": 0, "ignore_eos": true, "logprobs": 1, "echo": true,
            "return_token_ids": true, "stream": stream})
    };
    // The reference: the prompt through bitnet-core with every position's logits.
    let engine = load("random:tiny");
    let m = &engine.model;
    let mut cache = m.new_cache(p.len(), 1, 16);
    let mut s = m.new_scratch(p.len(), p.len(), p.len());
    let mut seq = cache.new_seq();
    m.prefill(&mut cache, &mut s, &mut seq, &p, true).unwrap();
    let want: Vec<f32> =
        (1..p.len()).map(|i| bitnet_core::logprobs::TokenLogprobs::new(s.logits(i - 1), p[i], 1).logprob).collect();
    let gen = completion_ids(&srv, &p, 4);

    // Twice: the second run must not take the prompt from the prefix cache (it needs its logits);
    // beside a long request decoding in the same steps.
    let other = std::thread::spawn({
        let addr = srv.addr;
        move || {
            let b = json!({"prompt": prompt(5, 30, 640), "max_tokens": 60, "temperature": 0, "ignore_eos": true});
            http(addr, "POST", "/v1/completions", &[], Some(b.to_string().as_bytes())).status
        }
    });
    for _ in 0..2 {
        let j = srv.post("/v1/completions", &body(false)).json();
        let lp = &j["choices"][0]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), p.len() + 4);
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        for i in 1..p.len() {
            assert_eq!(tokens[i], format!("token_id:{}", p[i]));
            assert_eq!(f(&lp["token_logprobs"][i]) as f32, want[i - 1], "prompt position {i}");
            let m = lp["top_logprobs"][i].as_object().unwrap();
            assert!((1..=2).contains(&m.len()));
        }
        let ids: Vec<u32> =
            j["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, gen, "echo changes nothing about the completion");
        for (k, &id) in gen.iter().enumerate() {
            assert_eq!(tokens[p.len() + k], format!("token_id:{id}"));
        }
    }
    assert_eq!(other.join().unwrap(), 200);
    // Streamed: the same lists over the chunks.
    let r = srv.post("/v1/completions", &body(true));
    let mut got: Vec<Value> = Vec::new();
    for ev in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(ev).unwrap();
        if let Some(a) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            got.extend(a.iter().cloned());
        }
    }
    assert_eq!(got.len(), p.len() + 4);
    assert!(got[0].is_null());
    assert_eq!(f(&got[5]) as f32, want[4]);
}

#[test]
fn echo_returns_the_prompt_text() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let body = |stream: bool| {
        json!({"prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "echo": true,
            "stream": stream})
    };
    let plain = srv
        .post(
            "/v1/completions",
            &json!({"prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        )
        .json();
    let j = srv.post("/v1/completions", &body(false)).json();
    let text = j["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, format!("The quick brown{}", plain["choices"][0]["text"].as_str().unwrap()));
    let r = srv.post("/v1/completions", &body(true));
    let mut streamed = String::new();
    for ev in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(ev).unwrap();
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, text);
    assert!(j["choices"][0]["logprobs"].is_null());
}

/// lm-evaluation-harness's batched loglikelihood request: several token-id prompts, `echo`,
/// `logprobs: 1`, `max_tokens: 1`; each choice carries its own prompt's log-probabilities, equal
/// to a request of its own.
#[test]
fn batched_loglikelihood_request() {
    let srv = TestServer::with("random:tiny", ServerConfig { prefill_chunk: 16, ..ServerConfig::default() });
    let prompts = [prompt(31, 9, 640), prompt(32, 23, 640), prompt(33, 5, 640)];
    let body =
        |p: Value| json!({"prompt": p, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true, "seed": 1});
    let j = srv.post("/v1/completions", &body(json!(prompts))).json();
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        let lp = &choices[i]["logprobs"];
        assert_eq!(choices[i]["index"], i);
        assert_eq!(lp["tokens"].as_array().unwrap().len(), p.len() + 1, "prompt {i}");
        assert!(lp["token_logprobs"][0].is_null());
        let one = srv.post("/v1/completions", &body(json!(p))).json();
        assert_eq!(lp, &one["choices"][0]["logprobs"], "prompt {i}");
    }
    assert_eq!(j["usage"]["prompt_tokens"], 9 + 23 + 5);
}
