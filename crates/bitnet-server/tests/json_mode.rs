//! JSON mode (`response_format: {"type": "json_object"}`) and JSON schemas (`"json_schema"`):
//! whatever the model would say, the output is a JSON object (matching the schema) when it ends
//! by itself, or a valid prefix of one (cut by max_tokens); streamed the same; refusals for
//! unsupported schemas, unknown types and models without a tokenizer.

mod common;

use bitnet_core::json_mode::JsonState;
use bitnet_core::json_schema::matcher::{Frames, SchemaState};
use bitnet_core::json_schema::JsonSchema;
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

/// A chat request's text and finish reason, after checking that the streamed request gives the
/// same text.
fn chat_twice(srv: &TestServer, body: &Value, seed: u64) -> (String, String) {
    let j = srv.post("/v1/chat/completions", body).json();
    let c = &j["choices"][0];
    let (text, finish) = (c["message"]["content"].as_str().unwrap(), c["finish_reason"].as_str().unwrap());
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
    (text.to_string(), finish.to_string())
}

#[test]
fn outputs_are_json_objects() {
    // the fixture's tiny untrained model says anything: only the constraint makes it JSON
    let srv = TestServer::with("fixture", ServerConfig::default());
    let mut stopped = 0;
    for seed in 0..6u64 {
        let body = json!({"messages": [{"role": "user", "content": "Reply in JSON."}], "max_tokens": 120,
            "temperature": 1.0, "seed": seed, "response_format": {"type": "json_object"}});
        let (text, finish) = chat_twice(&srv, &body, seed);
        check_json(&text, &finish, &format!("chat seed {seed}"));
        stopped += usize::from(finish == "stop");
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

/// The schema requests use: keys in this order, `name` and `age` required.
fn person_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "long tag"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "code": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}
    }, "required": ["name", "age"], "additionalProperties": false})
}

/// A finished output is an object that matches [`person_schema`] (checked by value, not by the
/// matcher); a cut one is a prefix the matcher accepts.
fn check_person(text: &str, finish: &str, what: &str) {
    match finish {
        "stop" => {
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: {e}: {text:?}"));
            let o = v.as_object().unwrap_or_else(|| panic!("{what}: {text:?}"));
            let keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
            let order = ["name", "age", "tags", "ok", "code"];
            let pos: Vec<usize> =
                keys.iter().map(|k| order.iter().position(|o| o == k).expect("a declared key")).collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{what}: key order {keys:?}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{what}: {text:?}");
            assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{what}: {text:?}");
            if let Some(t) = o.get("tags") {
                let t = t.as_array().unwrap();
                assert!(
                    t.len() <= 3 && t.iter().all(|x| ["a", "b", "long tag"].contains(&x.as_str().unwrap())),
                    "{what}"
                );
            }
            if let Some(b) = o.get("ok") {
                assert!(b.is_boolean(), "{what}");
            }
            if let Some(c) = o.get("code") {
                let c: Vec<char> = c.as_str().unwrap().chars().collect();
                assert!(
                    c.len() == 3 && c[0].is_ascii_uppercase() && c[1..].iter().all(|d| d.is_ascii_digit()),
                    "{what}"
                );
            }
        }
        "length" => {
            let s = JsonSchema::compile(&person_schema()).unwrap();
            let (mut st, mut frames) = (SchemaState::new(), Frames::default());
            assert!(st.feed_all(&s, &mut frames, text.as_bytes()), "{what}: not a prefix: {text:?}");
        }
        f => panic!("{what}: finish {f}"),
    }
}

#[test]
fn outputs_match_the_schema() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let rf =
        json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": person_schema()}});
    let mut stopped = 0;
    for seed in 0..6u64 {
        let body = json!({"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 150,
            "temperature": 1.0, "seed": seed, "response_format": rf});
        let (text, finish) = chat_twice(&srv, &body, seed);
        check_person(&text, &finish, &format!("chat seed {seed}"));
        stopped += usize::from(finish == "stop");
    }
    // several choices and prompts at once, batched with a JSON-mode and a plain request
    let j = srv
        .post(
            "/v1/completions",
            &json!({"prompt": ["A:", "B:"], "n": 2, "max_tokens": 150, "temperature": 0.8,
            "seed": 3, "response_format": rf}),
        )
        .json();
    for (i, c) in j["choices"].as_array().unwrap().iter().enumerate() {
        check_person(c["text"].as_str().unwrap(), c["finish_reason"].as_str().unwrap(), &format!("completion {i}"));
        stopped += usize::from(c["finish_reason"] == "stop");
    }
    println!("{stopped} of 10 sampled outputs closed their object within 150 tokens");
    assert!(stopped > 0, "the schema's bounds make objects close");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

#[test]
fn refusals() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let msgs = json!([{"role": "user", "content": "x"}]);
    for (rf, says) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
            "properties": {"id": {"type": "string", "pattern": "^(?=x)"}}}}}),
            "/properties/id/pattern",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
            "properties": {"t": {"type": "array", "uniqueItems": true}}}}}),
            "/properties/t/uniqueItems",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}),
            "root must be an object",
        ),
        (json!({"type": "json_schema", "json_schema": {"name": "x"}}), "Missing 'schema'"),
        (json!({"type": "json_schema", "json_schema": "x"}), "json_schema"),
        (json!({"type": "yaml"}), "yaml"),
        (json!("json"), "expected an object"),
    ] {
        let r = srv.post("/v1/chat/completions", &json!({"messages": msgs, "response_format": rf}));
        assert_eq!(r.status, 400, "{rf}");
        let e = r.error();
        assert_eq!(e["param"], "response_format");
        assert!(e["message"].as_str().unwrap().contains(says), "{rf}: {e}");
    }
    for rf in [json!({"type": "text"}), json!({"type": "json_schema", "json_schema": {"name": "any", "schema": {}}})] {
        let r = srv.post("/v1/chat/completions", &json!({"messages": msgs, "max_tokens": 2, "response_format": rf}));
        assert_eq!(r.status, 200, "{rf}");
    }
    let tiny = TestServer::with("random:tiny", ServerConfig::default());
    let r = tiny.post("/v1/completions", &json!({"prompt": [1, 2], "response_format": {"type": "json_object"}}));
    assert_eq!(r.status, 400);
    assert!(r.error()["message"].as_str().unwrap().contains("no tokenizer"));
}

/// vLLM's structured outputs (`structured_outputs` or `guided_*`): choices, a regular expression
/// in full, a schema; refusals.
#[test]
fn vllm_structured_outputs() {
    let srv = TestServer::with("fixture", ServerConfig::default());
    let msgs = json!([{"role": "user", "content": "Yes or no?"}]);
    for (seed, key) in [(0u64, "structured_outputs"), (1, "guided_choice"), (2, "structured_outputs")] {
        let choices = json!(["yes", "no", "maybe so"]);
        let v = if key == "structured_outputs" { json!({"choice": choices}) } else { choices };
        let mut body = json!({"messages": msgs, "max_tokens": 20, "temperature": 1.0, "seed": seed});
        body[key] = v;
        let j = srv.post("/v1/chat/completions", &body).json();
        let c = &j["choices"][0];
        let text = c["message"]["content"].as_str().unwrap();
        assert!(["yes", "no", "maybe so"].contains(&text), "{key}: {text:?}");
        assert_eq!(c["finish_reason"], "stop");
    }
    // a regular expression, in full: 2-3 digits, a dash, 1-4 lowercase letters; it may end by an
    // end token after one letter, and must after four
    for seed in 0..6u64 {
        let j = srv
            .post(
                "/v1/completions",
                &json!({"prompt": "Code:", "max_tokens": 20, "temperature": 1.0, "seed": seed,
                    "guided_regex": "[0-9]{2,3}-[a-z]{1,4}"}),
            )
            .json();
        let c = &j["choices"][0];
        let text = c["text"].as_str().unwrap();
        let (digits, letters) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
        assert!((2..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
        assert!((1..=4).contains(&letters.len()) && letters.bytes().all(|b| b.is_ascii_lowercase()), "{text:?}");
        assert_eq!(c["finish_reason"], "stop", "{text:?}");
    }
    // a schema (vLLM's `json`, here as its text)
    let j = srv
        .post(
            "/v1/chat/completions",
            &json!({"messages": msgs, "max_tokens": 150, "seed": 3, "temperature": 1.0,
                "structured_outputs": {"json": person_schema().to_string()}}),
        )
        .json();
    let c = &j["choices"][0];
    check_person(c["message"]["content"].as_str().unwrap(), c["finish_reason"].as_str().unwrap(), "vllm json");
    for (extra, param) in [
        (json!({"structured_outputs": {"grammar": "root ::= \"a\""}}), "structured_outputs.grammar"),
        (json!({"structured_outputs": {"choice": []}}), "structured_outputs.choice"),
        (json!({"guided_regex": "(?=a)"}), "guided_regex"),
        (json!({"guided_json": {"type": "string"}}), "guided_json"),
        (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
        (json!({"guided_choice": ["a"], "response_format": {"type": "json_object"}}), "response_format"),
    ] {
        let mut body = json!({"messages": msgs, "max_tokens": 3});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = srv.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error()["param"], param, "{body}");
    }
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}
