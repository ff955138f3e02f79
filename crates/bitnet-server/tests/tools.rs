//! Tool calls (`tools`, `tool_choice`): whatever the untrained fixture model says, a finished
//! reply is a call in OpenAI's shape whose arguments match the tool's parameters, or (with
//! "auto") an answer; streamed the same; the history may hold calls and tool results; refusals.

mod common;

use bitnet_server::ServerConfig;
use common::*;
use serde_json::{json, Value};

/// The fixture model with a 1024-token context (its config says 256; RoPE runs past it, and
/// the tools' description alone is ~300 tokens of its 640-token vocabulary).
fn server() -> TestServer {
    let dst =
        std::env::temp_dir().join(format!("bitnet-tools-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let cfg = dst.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = json!(1024);
    std::fs::write(&cfg, c.to_string()).unwrap();
    TestServer::with(dst.to_str().unwrap(), ServerConfig::default())
}

/// Two small tools (the fixture model's context is 256 tokens of a 640-token vocabulary).
fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "w", "description": "Weather.", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "u": {"enum": ["c", "f"]}}, "required": ["city", "u"]}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"]}}}
    ])
}

/// Checks a finished chat choice: a call to one of `allowed` with valid arguments, or an
/// answer when `answer_ok`. Returns the called tool's name.
fn check_choice(c: &Value, allowed: &[&str], answer_ok: bool, what: &str) -> Option<String> {
    let m = &c["message"];
    match c["finish_reason"].as_str().unwrap() {
        "tool_calls" => {
            let calls = m["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{what}");
            assert!(m["content"].is_null(), "{what}");
            let f = &calls[0]["function"];
            assert_eq!(calls[0]["type"], "function");
            assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
            let name = f["name"].as_str().unwrap();
            assert!(allowed.contains(&name), "{what}: {name}");
            let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
            match name {
                "w" => {
                    assert!(args["city"].as_str().unwrap().chars().count() <= 8, "{what}: {args}");
                    assert!(args["u"] == "c" || args["u"] == "f", "{what}: {args}");
                }
                _ => assert!(
                    (0..=99).contains(&args["a"].as_i64().unwrap()) && (0..=99).contains(&args["b"].as_i64().unwrap())
                ),
            }
            Some(name.to_string())
        }
        "stop" => {
            assert!(answer_ok, "{what}: an answer where a call was required: {m}");
            assert!(m["content"].is_string() && m.get("tool_calls").is_none(), "{what}: {m}");
            None
        }
        // cut by max_tokens: the partial reply as text
        "length" => None,
        f => panic!("{what}: finish {f}"),
    }
}

#[test]
fn calls_follow_the_tools() {
    let srv = server();
    let msgs = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let mut finished = 0;
    for seed in 0..4u64 {
        // named: that tool
        let named = json!({"type": "function", "function": {"name": "add"}});
        let j = srv
            .post(
                "/v1/chat/completions",
                &json!({"messages": msgs, "tools": tools(), "tool_choice": named,
                "max_tokens": 120, "temperature": 1.0, "seed": seed}),
            )
            .json();
        let got = check_choice(&j["choices"][0], &["add"], false, &format!("named, seed {seed}"));
        finished += usize::from(got.is_some());
        // required: either tool
        let j = srv
            .post(
                "/v1/chat/completions",
                &json!({"messages": msgs, "tools": tools(), "tool_choice": "required",
                "max_tokens": 120, "temperature": 1.0, "seed": seed}),
            )
            .json();
        check_choice(&j["choices"][0], &["w", "add"], false, &format!("required, seed {seed}"));
        // auto (the default): a call or an answer
        let body = json!({"messages": msgs, "tools": tools(), "max_tokens": 120, "temperature": 1.0, "seed": seed});
        let j = srv.post("/v1/chat/completions", &body).json();
        let c = &j["choices"][0];
        check_choice(c, &["w", "add"], true, &format!("auto, seed {seed}"));
        // streamed: the same reply, as it comes
        let mut b = body.clone();
        b["stream"] = json!(true);
        let (mut name, mut args, mut ids, mut content, mut finish) =
            (None, String::new(), 0, String::new(), String::new());
        for e in srv.post("/v1/chat/completions", &b).sse().iter().filter(|e| *e != "[DONE]") {
            let v: Value = serde_json::from_str(e).unwrap();
            let ch = &v["choices"][0];
            for t in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
                assert_eq!(t["index"], 0);
                if let Some(n) = t["function"]["name"].as_str() {
                    name = Some(n.to_string());
                    ids += usize::from(t["id"].is_string());
                }
                args.push_str(t["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(t) = ch["delta"]["content"].as_str() {
                content.push_str(t);
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        assert_eq!(finish, c["finish_reason"], "seed {seed}");
        match finish.as_str() {
            "tool_calls" => {
                // the name and id once, then the arguments in pieces
                let want = &c["message"]["tool_calls"][0]["function"];
                assert_eq!(ids, 1);
                assert_eq!(name.as_deref(), want["name"].as_str());
                assert_eq!(args, want["arguments"].as_str().unwrap());
            }
            _ => assert_eq!(content, c["message"]["content"].as_str().unwrap(), "seed {seed}"),
        }
    }
    assert!(finished > 0, "no named call finished within 120 tokens");
    // a history with a call and its result
    let history = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}
    ]);
    let r = srv.post("/v1/chat/completions", &json!({"messages": history, "tools": tools(), "max_tokens": 40}));
    assert_eq!(r.status, 200);
    // the tools and the call are in the prompt the model sees
    let t = srv.post("/tokenize", &json!({"messages": history, "tools": tools()})).json();
    let d = srv.post("/detokenize", &json!({"tokens": t["tokens"]})).json();
    let text = d["prompt"].as_str().unwrap();
    assert!(text.contains("- w: Weather.") && text.contains(r#"{"tool":"add","arguments":{"a":2,"b":3}}"#), "{text}");
    assert!(text.contains("Tool: 5"), "{text}");
    srv.wait_metric("bitnet_kv_blocks_used", 0.0, std::time::Duration::from_secs(5));
}

#[test]
fn tool_refusals() {
    let srv = server();
    let msgs = json!([{"role": "user", "content": "x"}]);
    let cases = [
        (
            json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
            "nope",
        ),
        (json!({"tools": tools(), "tool_choice": "sometimes"}), "tool_choice", "sometimes"),
        (json!({"tool_choice": "required"}), "tool_choice", "only allowed"),
        (json!({"tools": {"x": 1}}), "tools", "array"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
            "letters",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"x": {"type": "string", "pattern": "(?=a)"}}}}}]}),
            "tools",
            "of tool 'f'",
        ),
        (json!({"tools": [{"type": "function", "function": {"name": "none"}}]}), "tools", "'none'"),
        (json!({"tools": tools(), "response_format": {"type": "json_object"}}), "response_format", "tools"),
        (
            json!({"tools": tools(), "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "add"}}]}]}),
            "messages[0].tool_calls[0]",
            "arguments",
        ),
    ];
    for (extra, param, says) in cases {
        let mut body = json!({"messages": msgs, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = srv.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}");
        let e = r.error();
        assert_eq!(e["param"], param, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {e}");
    }
    // "none" ignores the tools
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "tools": tools(), "tool_choice": "none", "max_tokens": 3}),
    );
    assert_eq!(r.status, 200);
    assert!(r.json()["choices"][0]["message"].get("tool_calls").is_none());
}
