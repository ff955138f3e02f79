//! Bad requests get an OpenAI-style JSON error with the right 4xx, and the server keeps serving.

mod common;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::{json, Value};

fn expect(r: &Resp, status: u16, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(r.header("content-type").unwrap_or("").starts_with("application/json"), "{:?}", r.headers);
    let e = r.error();
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{e}");
    }
    e
}

fn still_serving(srv: &TestServer) {
    assert_eq!(srv.get("/health").status, 200);
    let ok = srv.post("/v1/completions", &json!({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn malformed_json() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    for body in [&b"{not json"[..], b"", b"[1, 2]", b"\"text\""] {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let r = srv.post_raw(path, &[], body);
            let e = expect(&r, 400, None);
            assert_eq!(e["type"], "invalid_request_error");
        }
    }
    // Wrong field types name the field.
    let r = srv.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": "ten"}));
    expect(&r, 400, Some("max_tokens"));
    let r = srv
        .post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}));
    expect(&r, 400, Some("temperature"));
    still_serving(&srv);
}

#[test]
fn unknown_model() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let r =
        srv.post("/v1/chat/completions", &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}));
    let e = expect(&r, 404, Some("model"));
    assert_eq!(e["code"], "model_not_found");
    let r = srv.post("/v1/completions", &json!({"model": "gpt-4o", "prompt": "hi"}));
    expect(&r, 404, Some("model"));
    still_serving(&srv);
}

#[test]
fn missing_or_empty_messages() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let r = srv.post("/v1/chat/completions", &json!({"model": srv.model_id}));
    expect(&r, 400, Some("messages"));
    let r = srv.post("/v1/chat/completions", &json!({"messages": []}));
    expect(&r, 400, Some("messages"));
    let r = srv.post("/v1/chat/completions", &json!({"messages": "hello"}));
    expect(&r, 400, Some("messages"));
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"content": "no role"}]}));
    expect(&r, 400, Some("messages[0].role"));
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "wizard", "content": "x"}]}));
    expect(&r, 400, Some("messages[0].role"));
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    );
    expect(&r, 400, Some("messages[0].content[0]"));
    let r = srv.post("/v1/completions", &json!({"max_tokens": 3}));
    expect(&r, 400, Some("prompt"));
    let r = srv.post("/v1/completions", &json!({"prompt": []}));
    expect(&r, 400, Some("prompt"));
    let r = srv.post("/v1/completions", &json!({"prompt": ["a", 2]}));
    expect(&r, 400, Some("prompt[1]"));
    // Text parts are accepted.
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    still_serving(&srv);
}

#[test]
fn lengths_beyond_the_context() {
    // The fixture's context is 256 tokens.
    let srv = TestServer::with("fixture", ServerConfig::default());
    let r = srv.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 253}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = srv.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 254}));
    let e = expect(&r, 400, Some("max_tokens"));
    assert_eq!(e["code"], "context_length_exceeded");
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}),
    );
    expect(&r, 400, Some("max_completion_tokens"));
    let r = srv.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 0}));
    expect(&r, 400, Some("max_tokens"));
    let long: Vec<u32> = (0..256).map(|i| (i % 500) as u32).collect();
    let r = srv.post("/v1/completions", &json!({"prompt": long, "max_tokens": 1}));
    let e = expect(&r, 400, Some("prompt"));
    assert_eq!(e["code"], "context_length_exceeded");
    let text = "word ".repeat(400);
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": text}]}));
    expect(&r, 400, Some("messages"));
    // several prompts: the one at fault is named
    let r = srv.post("/v1/completions", &json!({"prompt": [[1, 2], long], "max_tokens": 1}));
    let e = expect(&r, 400, Some("prompt"));
    assert!(e["message"].as_str().unwrap().contains("prompt 1"), "{e}");
    let r = srv.post("/v1/completions", &json!({"prompt": [vec![1, 2], vec![3; 200]], "max_tokens": 100}));
    let e = expect(&r, 400, Some("max_tokens"));
    assert!(e["message"].as_str().unwrap().contains("prompt 1"), "{e}");
    still_serving(&srv);
}

#[test]
fn bad_prompt_arrays() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let many: Vec<Vec<u32>> = (0..129).map(|_| vec![1]).collect();
    let cases = [
        (json!([[1, 2], 3]), "prompt[1]"),
        (json!([[1, 2], []]), "prompt[1]"),
        (json!([[1], [99_999]]), "prompt[1]"),
        (json!([[1], {"a": 1}]), "prompt[1]"),
        (json!(many), "prompt"),
    ];
    for (p, param) in cases {
        let r = srv.post("/v1/completions", &json!({"prompt": p, "max_tokens": 2}));
        expect(&r, 400, Some(param));
    }
    // more prompts than the server's queue holds: never runnable, so a 400 (not a 429)
    let small = TestServer::with("random:tiny", ServerConfig { max_queue: 4, ..ServerConfig::default() });
    let five: Vec<Vec<u32>> = (0..5).map(|_| vec![1]).collect();
    let e = expect(&small.post("/v1/completions", &json!({"prompt": five, "max_tokens": 2})), 400, Some("prompt"));
    assert!(e["message"].as_str().unwrap().contains("--max-queue"), "{e}");
    let four: Vec<Vec<u32>> = (0..4).map(|_| vec![1]).collect();
    assert_eq!(small.post("/v1/completions", &json!({"prompt": four, "max_tokens": 2})).status, 200);
    // prompts x n beyond the per-request bound
    let twenty: Vec<Vec<u32>> = (0..20).map(|_| vec![1]).collect();
    let r = srv.post("/v1/completions", &json!({"prompt": twenty, "max_tokens": 2, "n": 16}));
    expect(&r, 400, Some("n"));
    still_serving(&srv);
}

#[test]
fn out_of_range_sampling_values() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let cases = [
        ("temperature", json!(-0.5)),
        ("temperature", json!(2.5)),
        ("top_p", json!(1.5)),
        ("top_p", json!(-0.1)),
        ("top_k", json!(-2)),
        ("min_p", json!(1.5)),
        ("repetition_penalty", json!(0)),
        ("frequency_penalty", json!(3)),
        ("frequency_penalty", json!("0.5")),
        ("presence_penalty", json!(-3)),
        ("presence_penalty", json!(2.01)),
        ("n", json!(17)),
        ("n", json!(0)),
        ("logprobs", json!(21)),
        ("seed", json!("abc")),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("stream_options", json!({"include_usage": true})),
        ("echo", json!("yes")),
        ("logit_bias", json!({"99999": 1})),
        ("logit_bias", json!({"5": 101})),
        ("logit_bias", json!({"x": 1})),
        ("logit_bias", json!({"5": "1"})),
        ("logit_bias", json!([1, 2])),
        ("stop_token_ids", json!([99_999])),
        ("stop_token_ids", json!("2")),
        ("min_tokens", json!(3)),
        ("min_tokens", json!(-1)),
    ];
    for (k, v) in cases {
        let mut b = json!({"prompt": [1, 2, 3], "max_tokens": 2});
        b[k] = v.clone();
        let r = srv.post("/v1/completions", &b);
        expect(&r, 400, Some(k));
    }
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}));
    assert_eq!(r.status, 400);
    // Within range is fine.
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 2, "top_p": 0, "top_k": -1, "min_p": 0.1, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": -2, "n": 1, "seed": -7}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    still_serving(&srv);
}

#[test]
fn tokenizer_less_model_needs_token_ids() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let r = srv.post("/v1/completions", &json!({"prompt": "hello"}));
    expect(&r, 400, Some("prompt"));
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hello"}]}));
    expect(&r, 400, Some("messages"));
    let r = srv.post("/v1/completions", &json!({"prompt": [1, 2, 640]}));
    expect(&r, 400, Some("prompt"));
    let r = srv.post("/v1/completions", &json!({"prompt": [1, -2]}));
    expect(&r, 400, Some("prompt"));
    let r = srv.post("/v1/completions", &json!({"prompt": [1, 2], "stop": "x"}));
    expect(&r, 400, Some("stop"));
    still_serving(&srv);
}

#[test]
fn body_over_the_limit() {
    let cfg = ServerConfig { body_limit: 1024, ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    let big: Vec<u32> = vec![7; 600];
    let r = srv.post("/v1/completions", &json!({"prompt": big, "max_tokens": 1}));
    let e = expect(&r, 413, None);
    assert_eq!(e["code"], "request_too_large");
    still_serving(&srv);
}

#[test]
fn wrong_api_key() {
    let cfg = ServerConfig { api_key: Some("k1".into()), ..ServerConfig::default() };
    let srv = TestServer::with("random:tiny", cfg);
    let body = json!({"prompt": [1, 2], "max_tokens": 1}).to_string();
    let r = srv.post_raw("/v1/completions", &[("Authorization", "Bearer k2")], body.as_bytes());
    let e = expect(&r, 401, None);
    assert_eq!(e["code"], "invalid_api_key");
    let r = srv.post_raw("/v1/completions", &[("Authorization", "Bearer k1")], body.as_bytes());
    assert_eq!(r.status, 200);
}

#[test]
fn unknown_route_and_method() {
    let srv = TestServer::with("random:tiny", ServerConfig::default());
    let r = srv.get("/v1/nothing");
    expect(&r, 404, None);
    let r = srv.get("/v1/completions");
    expect(&r, 405, None);
    still_serving(&srv);
}
