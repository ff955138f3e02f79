//! The endpoints answer in OpenAI's formats: chat and completions, streamed and not, models,
//! health, metrics.

mod common;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::json;

fn fixture_server() -> TestServer {
    TestServer::with("fixture", ServerConfig::default())
}

#[test]
fn health_models_metrics() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let h = srv.get("/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let m = srv.get("/v1/models");
    assert_eq!(m.status, 200);
    let j = m.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["id"], "random:tiny");
    assert_eq!(j["data"][0]["object"], "model");
    assert_eq!(srv.get("/v1/models/random:tiny").status, 200);
    assert_eq!(srv.get("/v1/models/nope").status, 404);
    let t = srv.get("/metrics");
    assert_eq!(t.status, 200);
    assert!(t.header("content-type").unwrap().starts_with("text/plain"));
    let text = t.text();
    for name in [
        "bitnet_http_requests_total",
        "bitnet_prompt_tokens_total",
        "bitnet_generation_tokens_total",
        "bitnet_queue_depth",
        "bitnet_running_sequences",
        "bitnet_kv_blocks_used",
        "bitnet_kv_blocks_total",
        "bitnet_time_to_first_token_seconds_bucket",
        "bitnet_time_per_output_token_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // random:tiny has a 512-token context; default KV: 32 sequences of it.
    assert_eq!(srv.metric("bitnet_kv_blocks_total"), (32 * 512 / 16) as f64);
}

#[test]
fn chat_not_streamed() {
    let srv = fixture_server();
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"model": srv.model_id, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    assert!(j["choices"][0]["message"]["content"].is_string());
    let fin = j["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fin == "stop" || fin == "length", "{fin}");
    let u = &j["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 3);
    let c = u["completion_tokens"].as_u64().unwrap();
    assert!(c <= 12);
    if fin == "length" {
        assert_eq!(c, 12);
    }
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + c);
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

#[test]
fn chat_streamed_matches_not_streamed() {
    let srv = fixture_server();
    let req = |stream: bool| {
        let mut b = json!({"model": srv.model_id, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: one two"}],
            "max_tokens": 20, "temperature": 0, "ignore_eos": true});
        if stream {
            b["stream"] = json!(true);
            b["stream_options"] = json!({"include_usage": true});
        }
        srv.post("/v1/chat/completions", &b)
    };
    let plain = req(false).json();
    let r = req(true);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let events = r.sse();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(ch) = c["choices"].as_array().unwrap().first() {
            if let Some(t) = ch["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    // Usage comes in a last chunk with no choices.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], plain["usage"]);
    assert_eq!(text, plain["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(finish.as_deref(), Some("length"));
    assert_eq!(last["usage"]["completion_tokens"], 20);
}

#[test]
fn completions_text_and_token_ids() {
    let srv = fixture_server();
    let r = srv.post("/v1/completions", &json!({"model": srv.model_id, "prompt": "The quick brown", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    assert!(j["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 8);
    assert_eq!(j["choices"][0]["token_ids"].as_array().unwrap().len(), 8);
    let text = j["choices"][0]["text"].as_str().unwrap().to_string();
    // Same prompt as token ids (BOS included by the tokenizer) gives the same text.
    let engine = load("fixture");
    let ids = engine.tokenizer.as_ref().unwrap().encode("The quick brown", true).unwrap();
    for prompt in [json!(ids), json!([ids])] {
        let r2 = srv
            .post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}));
        assert_eq!(r2.status, 200, "{}", r2.text());
        assert_eq!(r2.json()["choices"][0]["text"].as_str().unwrap(), text);
        assert_eq!(r2.json()["usage"]["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
    }
    // Streamed.
    let r3 = srv.post(
        "/v1/completions",
        &json!({"prompt": "The quick brown", "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stream": true}),
    );
    let ev = r3.sse();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    for e in &ev[..ev.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        assert!(c.get("usage").is_none(), "usage only when asked: {c}");
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, text);
}

#[test]
fn tokenizer_less_model_returns_token_ids() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let p = prompt(1, 10, 640);
    let ids = completion_ids(&srv, &p, 16);
    assert_eq!(ids.len(), 16);
    // Streamed: the ids come in the chunks.
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true}),
    );
    let mut got = Vec::new();
    for e in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(a) = c["choices"][0]["token_ids"].as_array() {
            got.extend(a.iter().map(|v| v.as_u64().unwrap() as u32));
        }
    }
    assert_eq!(got, ids);
}

#[test]
fn stop_strings_end_the_text() {
    let srv = fixture_server();
    let base = json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let full = srv.post("/v1/completions", &base).json()["choices"][0]["text"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy text.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "greedy text too short: {full:?}");
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 3].iter().collect();
    let expect_prefix = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut b = base.clone();
        b["stop"] = json!([stop, "\u{1F600}never"]);
        b["stream"] = json!(stream);
        let r = srv.post("/v1/completions", &b);
        assert_eq!(r.status, 200, "{}", r.text());
        let (text, fin) = if stream {
            let mut t = String::new();
            let mut f = String::new();
            for e in r.sse().iter().filter(|e| *e != "[DONE]") {
                let c: serde_json::Value = serde_json::from_str(e).unwrap();
                t.push_str(c["choices"][0]["text"].as_str().unwrap_or(""));
                if let Some(x) = c["choices"][0]["finish_reason"].as_str() {
                    f = x.to_string();
                }
            }
            (t, f)
        } else {
            let j = r.json();
            (
                j["choices"][0]["text"].as_str().unwrap().to_string(),
                j["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(text, expect_prefix, "stream={stream} stop={stop:?} full={full:?}");
        assert_eq!(fin, "stop");
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let srv = fixture_server();
    let b = json!({"prompt": "Hello", "max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 40, "seed": 1234, "ignore_eos": true, "return_token_ids": true});
    let a = srv.post("/v1/completions", &b).json();
    let c = srv.post("/v1/completions", &b).json();
    assert_eq!(a["choices"][0]["token_ids"], c["choices"][0]["token_ids"]);
}

#[test]
fn api_key_is_checked() {
    let cfg = ServerConfig { api_key: Some("sekrit".into()), ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 2}).to_string();
    let ok = srv.post_raw("/v1/completions", &[("Authorization", "Bearer sekrit")], body.as_bytes());
    assert_eq!(ok.status, 200, "{}", ok.text());
    let bad = srv.post_raw("/v1/completions", &[("Authorization", "Bearer wrong")], body.as_bytes());
    assert_eq!(bad.status, 401);
    assert_eq!(bad.error()["code"], "invalid_api_key");
    let none = srv.post_raw("/v1/completions", &[], body.as_bytes());
    assert_eq!(none.status, 401);
    assert_eq!(none.error()["code"], "invalid_api_key");
    assert_eq!(http(srv.addr, "GET", "/v1/models", &[], None).status, 401);
    // Health and metrics stay open.
    assert_eq!(srv.get("/health").status, 200);
    assert_eq!(srv.get("/metrics").status, 200);
}

#[test]
fn tokenize_and_detokenize() {
    let srv = fixture_server();
    let engine = load("fixture");
    let tok = engine.tokenizer.as_ref().unwrap();
    let r = srv.post("/tokenize", &json!({"prompt": "The quick brown fox"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let ids: Vec<u32> = j["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, tok.encode("The quick brown fox", true).unwrap());
    assert_eq!(j["count"], ids.len());
    assert_eq!(j["max_model_len"], srv.get("/v1/models").json()["data"][0]["max_model_len"]);
    let r = srv.post("/tokenize", &json!({"prompt": "The quick brown fox", "add_special_tokens": false}));
    assert_eq!(r.json()["tokens"].as_array().unwrap().len(), tok.encode("The quick brown fox", false).unwrap().len());
    // Messages go through the chat template: the count a chat request is billed for.
    let msgs = json!([{"role": "user", "content": "Hello there"}]);
    let n = srv.post("/tokenize", &json!({"messages": msgs})).json()["count"].clone();
    let chat = srv.post("/v1/chat/completions", &json!({"messages": msgs, "max_tokens": 1})).json();
    assert_eq!(n, chat["usage"]["prompt_tokens"]);
    // Back to text, special tokens kept.
    let r = srv.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["prompt"], tok.decode(&ids, false).unwrap());
    // Refusals name the field.
    for (path, body, param) in [
        ("/tokenize", json!({}), "prompt"),
        ("/tokenize", json!({"prompt": 5}), "prompt"),
        ("/detokenize", json!({"tokens": [1, -2]}), "tokens"),
        ("/detokenize", json!({"tokens": [999_999_999]}), "tokens"),
        ("/detokenize", json!({"tokens": "1 2"}), "tokens"),
    ] {
        let r = srv.post(path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(r.error()["param"], param, "{path} {body}");
    }
    // A model without a tokenizer says so.
    let tiny = TestServer::with("random:tiny", ServerConfig::default());
    let r = tiny.post("/tokenize", &json!({"prompt": "hi"}));
    assert_eq!(r.status, 400);
    assert!(r.error()["message"].as_str().unwrap().contains("no tokenizer"));
}

#[test]
fn several_choices_streamed_and_not() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let p = prompt(8, 40, 640);
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let body = |n: usize, seed: u64, stream: bool| {
        let mut b = json!({"prompt": p, "max_tokens": 10, "temperature": 1.0, "seed": seed, "n": n, "ignore_eos": true,
            "stream": stream});
        if stream {
            b["stream_options"] = json!({"include_usage": true});
        }
        b
    };
    // Choice i is what one request with seed + i gives; choices 1 and 2 start after choice 0's
    // prompt is computed and take its two full blocks from the prefix cache.
    let j = srv.post("/v1/completions", &body(3, 40, false)).json();
    assert_eq!(srv.metric("bitnet_prefix_cache_hit_tokens_total"), 64.0);
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let one = srv.post("/v1/completions", &body(1, 40 + i as u64, false)).json();
        assert_eq!(ids(&c["token_ids"]), ids(&one["choices"][0]["token_ids"]), "choice {i}");
    }
    assert_ne!(choices[0]["token_ids"], choices[1]["token_ids"]);
    assert_eq!(j["usage"]["prompt_tokens"], 40);
    assert_eq!(j["usage"]["completion_tokens"], 30);
    // Streamed: the chunks of both choices interleave, each tagged with its index.
    let r = srv.post("/v1/completions", &body(3, 40, true));
    let events = r.sse();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut got = vec![Vec::new(); 3];
    let mut finished = 0;
    for e in &events[..events.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        if let Some(ch) = c["choices"].as_array().unwrap().first() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if let Some(a) = ch["token_ids"].as_array() {
                got[i].extend(a.iter().map(|v| v.as_u64().unwrap() as u32));
            }
            finished += usize::from(ch["finish_reason"].is_string());
        } else {
            assert_eq!(c["usage"]["completion_tokens"], 30);
        }
    }
    assert_eq!(finished, 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(got[i], ids(&c["token_ids"]), "streamed choice {i}");
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

/// Several prompts in one completions request (as lm-evaluation-harness batches them): choice
/// `p * n + i` is prompt p's choice i, equal to a request of its own with seed + i; usage counts
/// each prompt once; streamed chunks carry those indices; `echo` leads each choice with its
/// prompt.
#[test]
fn several_prompts_in_one_request() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let prompts = [prompt(21, 7, 640), prompt(22, 19, 640), prompt(23, 3, 640)];
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let body = |p: serde_json::Value, n: usize, seed: u64, stream: bool| {
        json!({"prompt": p, "max_tokens": 6, "temperature": 0.9, "seed": seed, "n": n, "ignore_eos": true,
            "stream": stream})
    };
    let j = srv.post("/v1/completions", &body(json!(prompts), 2, 7, false)).json();
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (k, c) in choices.iter().enumerate() {
        let (p, i) = (k / 2, k % 2);
        assert_eq!(c["index"], k);
        let one = srv.post("/v1/completions", &body(json!(prompts[p]), 1, 7 + i as u64, false)).json();
        assert_eq!(ids(&c["token_ids"]), ids(&one["choices"][0]["token_ids"]), "prompt {p} choice {i}");
    }
    assert_eq!(j["usage"]["prompt_tokens"], 7 + 19 + 3);
    assert_eq!(j["usage"]["completion_tokens"], 36);
    // streamed: the same tokens under the same indices
    let events = srv.post("/v1/completions", &body(json!(prompts), 2, 7, true)).sse();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut got = vec![Vec::new(); 6];
    for e in &events[..events.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        if let Some(a) = ch["token_ids"].as_array() {
            got[ch["index"].as_u64().unwrap() as usize].extend(a.iter().map(|v| v.as_u64().unwrap() as u32));
        }
    }
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(got[k], ids(&c["token_ids"]), "streamed choice {k}");
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));

    // texts, with echo, on a model with a tokenizer
    let fx = TestServer::with("fixture", ServerConfig::default());
    let texts = ["The cat", "Once upon a time"];
    let j =
        fx.post("/v1/completions", &json!({"prompt": texts, "max_tokens": 4, "temperature": 0, "echo": true})).json();
    for (p, t) in texts.iter().enumerate() {
        let c = &j["choices"][p];
        let one = fx.post("/v1/completions", &json!({"prompt": t, "max_tokens": 4, "temperature": 0})).json();
        let want = format!("{t}{}", one["choices"][0]["text"].as_str().unwrap());
        assert_eq!(c["text"].as_str().unwrap(), want, "prompt {p}");
    }
}
