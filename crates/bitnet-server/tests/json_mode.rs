//! JSON mode (`response_format: {"type": "json_object"}`): whatever the model would say, the
//! output is a JSON object (when it ends by itself) or a valid prefix of one (cut by max_tokens);
//! streamed the same; refusals for schemas, unknown types and models without a tokenizer.

mod common;

use bitnet_core::json_mode::JsonState;
use bitnet_server::ServerConfig;
use common::*;
use serde_json::{json, Value};

fn check_json(text: &str, finish: &str, what: &str) {
    match finish {
        "stop" => {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}: {text:?}"));
            assert!(v.is_object(), "{what}: {text:?}");
        }
        "length" => {
            let mut st = JsonState::new();
            assert!(st.feed_all(text.as_bytes()), "{what}: not a JSON prefix: {text:?}");
        }
        f => panic!("{what}: finish {f}"),
    }
}

#[test]
fn outputs_are_json_objects() {
    // the fixture's tiny untrained model says anything: only the constraint makes it JSON
    let srv = TestServer::with("fixture", ServerConfig::default());
    let mut stopped = 0;
    for seed in 0..6u64 {
        let body = json!({"messages": [{"role": "user", "content": "Reply in JSON."}], "max_tokens": 120,
            "temperature": 1.0, "seed": seed, "response_format": {"type": "json_object"}});
        let j = srv.post("/v1/chat/completions", &body).json();
        let c = &j["choices"][0];
        let (text, finish) = (c["message"]["content"].as_str().unwrap(), c["finish_reason"].as_str().unwrap());
        check_json(text, finish, &format!("chat seed {seed}"));
        stopped += usize::from(finish == "stop");
        // streamed: the same text
        let mut b = body.clone();
        b["stream"] = json!(true);
        let mut streamed = String::new();
        for e in srv.post("/v1/chat/completions", &b).sse().iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(e).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
        }
        assert_eq!(streamed, text, "seed {seed}: streamed");
    }
    // greedy, completions endpoint, several prompts
    let j = srv
        .post(
            "/v1/completions",
            &json!({"prompt": ["The answer:", "Data"], "max_tokens": 60, "temperature": 0,
                "response_format": {"type": "json_object"}}),
        )
        .json();
    for (i, c) in j["choices"].as_array().unwrap().iter().enumerate() {
        check_json(c["text"].as_str().unwrap(), c["finish_reason"].as_str().unwrap(), &format!("completion {i}"));
    }
    println!("{stopped} of 6 sampled chats closed their object within 120 tokens");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

#[test]
fn refusals() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let msgs = json!([{"role": "user", "content": "x"}]);
    for rf in [
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
        json!({"type": "yaml"}),
        json!("json"),
    ] {
        let r = srv.post("/v1/chat/completions", &json!({"messages": msgs, "response_format": rf}));
        assert_eq!(r.status, 400, "{rf}");
        assert_eq!(r.error()["param"], "response_format");
    }
    let r = srv
        .post("/v1/chat/completions", &json!({"messages": msgs, "max_tokens": 2, "response_format": {"type": "text"}}));
    assert_eq!(r.status, 200);
    let tiny = TestServer::with("random:tiny", ServerConfig::default());
    let r = tiny.post("/v1/completions", &json!({"prompt": [1, 2], "response_format": {"type": "json_object"}}));
    assert_eq!(r.status, 400);
    assert!(r.error()["message"].as_str().unwrap().contains("no tokenizer"));
}
