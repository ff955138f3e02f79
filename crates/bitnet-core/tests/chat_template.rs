//! Chat template tests. The fixture tests need ../shared/fixtures (the workspace's sibling folder
//! /work/shared) and print "skipped: ../shared/fixtures not found" when it is absent; the inline
//! template tests need nothing.

use std::path::{Path, PathBuf};

use bitnet_core::chat::{is_usable_jinja, ChatMessage, ChatTemplate, BITNET_CHAT_TEMPLATE, BITNET_CPP_GGUF_TEMPLATE};
use bitnet_core::tokenizer::{StreamDecoder, Tokenizer};
use bitnet_core::Error;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn fixture(sub: &str) -> Option<PathBuf> {
    let p = Path::new(FIXTURES).join(sub);
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: ../shared/fixtures not found");
        None
    }
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

#[test]
fn fixture_chats_render_and_tokenize_like_transformers() {
    let Some(dir) = fixture("llama3-tokenizer") else {
        return;
    };
    let text = std::fs::read_to_string(dir.join("vectors.json")).expect("vectors.json");
    let vectors: Value = serde_json::from_str(&text).expect("json");
    let tmpl = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))
        .expect("parses")
        .expect("has a chat template");
    assert_eq!(tmpl.bos_token(), "<|begin_of_text|>");
    assert_eq!(tmpl.eos_token(), "<|eot_id|>");
    let tok = Tokenizer::from_model_dir(&dir).expect("loads").expect("present");
    let default = ChatTemplate::bitnet_default();
    for c in vectors["chats"].as_array().expect("chats") {
        let name = c["name"].as_str().expect("name");
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).expect("messages deserialize");
        let want = c["prompt"].as_str().expect("prompt");
        assert_eq!(c["add_generation_prompt"].as_bool(), Some(true));
        assert_eq!(tmpl.render(&messages, true).expect("render"), want, "{name}");
        assert_eq!(default.render(&messages, true).expect("render"), want, "{name} (default)");
        let ids = |k: &str| -> Vec<u32> {
            c[k].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
        };
        assert_eq!(tok.encode(want, true).expect("encode"), ids("ids_with_bos"), "{name}");
        assert_eq!(tok.encode(want, false).expect("encode"), ids("ids"), "{name}");
    }
}

#[test]
fn bitnet_default_is_the_2b4t_template_verbatim() {
    let Some(dir) = fixture("llama3-tokenizer") else {
        return;
    };
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("read");
    let cfg: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(cfg["chat_template"].as_str(), Some(BITNET_CHAT_TEMPLATE));
    assert_eq!(ChatTemplate::bitnet_default().source(), BITNET_CHAT_TEMPLATE);
    let from_dir = ChatTemplate::from_model_dir_or_default(&dir).expect("loads");
    assert_eq!(from_dir.source(), BITNET_CHAT_TEMPLATE);
}

#[test]
fn gguf_tiny_model_dir_template() {
    let Some(dir) = fixture("gguf-tiny") else {
        return;
    };
    let tmpl =
        ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")).expect("parses").expect("present");
    assert_eq!(
        tmpl.render(&msgs(&[("user", "What is the capital of France?")]), true).expect("render"),
        "User: What is the capital of France?<|eot_id|>Assistant: "
    );
}

#[test]
fn gguf_template_choice() {
    let bos = "<|begin_of_text|>";
    let eos = "<|eot_id|>";
    // bitnet.cpp's converter template and non-templates fall back to the family template.
    for src in [None, Some(BITNET_CPP_GGUF_TEMPLATE), Some("chatml"), Some("{% for m in messages %}")] {
        let t = ChatTemplate::from_gguf_template(src, bos, eos);
        assert_eq!(t.source(), BITNET_CHAT_TEMPLATE, "{src:?}");
        assert_eq!(t.eos_token(), eos);
    }
    // A real Jinja template is kept.
    let own = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}";
    let t = ChatTemplate::from_gguf_template(Some(own), bos, eos);
    assert_eq!(t.source(), own);
    assert_eq!(t.render(&msgs(&[("user", "hi")]), true).expect("render"), "<|begin_of_text|>[user]hi");

    assert!(is_usable_jinja(BITNET_CHAT_TEMPLATE));
    assert!(is_usable_jinja(own));
    assert!(!is_usable_jinja(BITNET_CPP_GGUF_TEMPLATE));
    assert!(!is_usable_jinja("chatml"));
    assert!(!is_usable_jinja("llama3"));
    assert!(!is_usable_jinja("{% for m in messages %}"));
    assert!(!is_usable_jinja("{{ 'hello' }}"));

    // What the converter's template would have produced: a different prompt ending in EOS.
    let conv = ChatTemplate::new(BITNET_CPP_GGUF_TEMPLATE.into(), bos.into(), eos.into()).expect("parses");
    assert_eq!(
        conv.render(&msgs(&[("user", "hi")]), true).expect("render"),
        "<|begin_of_text|>Human: hi\n\nBITNETAssistant: <|eot_id|>"
    );
}

#[test]
fn hf_whitespace_and_pycompat_methods() {
    // Expected strings come from Python jinja2 3.1 with transformers' settings
    // (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)).
    let src = "{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'user' %}
<u>{{ m.content.strip() }}</u>
    {% else %}
<{{ m.role.capitalize() }}>{{ m['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<a>
{% endif %}";
    let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).expect("parses");
    let m = msgs(&[("system", " you are helpful "), ("user", "  hi  ")]);
    assert_eq!(t.render(&m, true).expect("render"), "<s>\n<System>you are helpful</s>\n<u>hi</u>\n<a>\n");

    let src = "{% for m in messages %}{{ m.content.title() }}|{{ m.content.upper() }}|{{ m.content.lower() }}|{{ m.content.startswith('He') }}|{{ m.content.split(' ') | join(',') }}|{{ m.content.replace('o', '0') }}|{{ m.role.capitalize() }};{% endfor %}{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).expect("parses");
    assert_eq!(
        t.render(&msgs(&[("user", "hello wORLD foo")]), false).expect("render"),
        "Hello World Foo|HELLO WORLD FOO|hello world foo|False|hello,wORLD,foo|hell0 wORLD f00|User;a=1"
    );
}

#[test]
fn raise_exception_and_parse_errors_are_template_errors() {
    let src =
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).expect("parses");
    assert_eq!(t.render(&msgs(&[("user", "x")]), true).expect("render"), "ok");
    match t.render(&msgs(&[("assistant", "x")]), true) {
        Err(Error::Template(msg)) => {
            assert!(msg.contains("Conversation must start with user"), "{msg}")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    match ChatTemplate::new("{% for m in messages %}{{ m.content }}".into(), String::new(), String::new()) {
        Err(Error::Template(msg)) => assert!(msg.contains("syntax error"), "{msg}"),
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn strftime_now_is_available() {
    let src = "{% set d = strftime_now('%d %b %Y') %}{{ d | length }}";
    let t = ChatTemplate::new(src.into(), String::new(), String::new()).expect("parses");
    assert_eq!(t.render(&[], false).expect("render"), "11");
}

#[test]
fn tokenizer_config_forms() {
    // A list of named templates: "default" is chosen; bos as an AddedToken object.
    let d = tmp_dir("chat_cfg_list");
    let cfg = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
        ]
    });
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).expect("write");
    let t = ChatTemplate::from_tokenizer_config(&d.join("tokenizer_config.json")).expect("parses").expect("present");
    assert_eq!(t.render(&msgs(&[("user", "hi")]), true).expect("render"), "<s>hi</s>");

    // No template at all: None, and the model-dir helper falls back to the family template.
    let d = tmp_dir("chat_cfg_none");
    std::fs::write(d.join("tokenizer_config.json"), r#"{"bos_token": null}"#).expect("write");
    assert!(ChatTemplate::from_tokenizer_config(&d.join("tokenizer_config.json")).expect("ok").is_none());
    let t = ChatTemplate::from_model_dir_or_default(&d).expect("ok");
    assert_eq!(t.source(), BITNET_CHAT_TEMPLATE);

    // Newer transformers: chat_template.jinja beside the config.
    std::fs::write(d.join("chat_template.jinja"), "{% for m in messages %}<{{ m.role }}>{% endfor %}").expect("write");
    let t = ChatTemplate::from_tokenizer_config(&d.join("tokenizer_config.json")).expect("ok").expect("present");
    assert_eq!(t.render(&msgs(&[("user", "hi")]), false).expect("render"), "<user>");

    // A broken template names the file.
    let d = tmp_dir("chat_cfg_broken");
    std::fs::write(d.join("tokenizer_config.json"), r#"{"chat_template": "{% if %}"}"#).expect("write");
    let err = ChatTemplate::from_tokenizer_config(&d.join("tokenizer_config.json")).expect_err("broken");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    // Not JSON.
    std::fs::write(d.join("tokenizer_config.json"), "{").expect("write");
    assert!(ChatTemplate::from_tokenizer_config(&d.join("tokenizer_config.json")).is_err());
    // Missing file: an I/O error naming it.
    assert!(ChatTemplate::from_tokenizer_config(&d.join("nope.json")).is_err());
}

#[test]
fn shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ChatTemplate>();
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<StreamDecoder>();
}
