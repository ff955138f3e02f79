use super::matcher::{Frames, SchemaState};
use super::*;
use serde_json::json;

/// The error `v` is refused with (without printing a compiled schema, which can be huge).
fn refused(v: Value) -> SchemaError {
    match JsonSchema::compile(&v) {
        Ok(_) => panic!("should be refused: {}", v.to_string().chars().take(200).collect::<String>()),
        Err(e) => e,
    }
}

fn compile(v: Value) -> JsonSchema {
    JsonSchema::compile(&v).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// The byte index where `doc` is refused, or `None` when every byte is accepted; and whether
/// the document is then complete.
fn run(s: &JsonSchema, doc: &str) -> (Option<usize>, bool) {
    let mut st = SchemaState::new();
    let mut frames = Frames::default();
    for (i, &b) in doc.as_bytes().iter().enumerate() {
        if !st.feed(s, &mut frames, b) {
            return (Some(i), false);
        }
        frames.commit(&mut st);
    }
    (None, st.is_complete())
}

fn assert_valid(s: &JsonSchema, doc: &str) {
    assert_eq!(run(s, doc), (None, true), "{doc}");
}

/// `doc` is refused at the byte where `at` starts (its last occurrence).
fn assert_refused(s: &JsonSchema, doc: &str, at: &str) {
    let i = doc.rfind(at).expect("the marker is in the document");
    assert_eq!(run(s, doc).0, Some(i), "{doc} should be refused at {i} ({at:?})");
}

fn person() -> JsonSchema {
    compile(json!({
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "ignored"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "email": {"type": ["string", "null"], "format": "email"}
        },
        "required": ["name", "age"]
    }))
}

#[test]
fn objects_follow_the_schema_order_and_required_keys() {
    let s = person();
    assert_valid(&s, r#"{"name": "Bob", "age": 42}"#);
    assert_valid(&s, "{\n  \"name\" : \"B\\u00f6b \\\"q\\\"\",\n  \"age\":0, \"email\": null}");
    assert_valid(&s, r#"{"name":"","age":150,"tags":[],"email":"a@b.io"}"#);
    assert_valid(&s, r#"{"name":"x","age":7,"tags":["a","b","c"]}"#);
    assert_refused(&s, r#"{"age": 42, "name": "x"}"#, "age");
    assert_refused(&s, r#"{"name": "Bob"}"#, "}");
    assert_refused(&s, r#"{"name": "Bob", "age": -1}"#, "-");
    assert_refused(&s, r#"{"name": "Bob", "age": 151}"#, "1}");
    assert_refused(&s, r#"{"name": "Bob", "age": 1.5}"#, ".");
    assert_refused(&s, r#"{"name": "Bob", "age": 01}"#, "1}");
    assert_refused(&s, r#"{"name":"x","age":1,"tags":["a","b","c","d"]}"#, r#","d""#);
    assert_refused(&s, r#"{"name":"x","age":1,"x":1}"#, "x\":");
    assert_refused(&s, r#"{"name":"x","age":1,"email":"a@b.io","tags":[]}"#, ",\"tags");
    assert_refused(&s, r#"{"name":"x","name":"y","age":1}"#, "name\":\"y");
    assert_refused(&s, r#"{"name":"x","age":1,"email":5}"#, "5");
    assert_refused(&s, r#"{"name":"x","age":1} "#, " ");
}

#[test]
fn literals_integers_and_strings() {
    let s = compile(json!({"type": "object", "properties": {
        "c": {"enum": ["red", "green", 1, 12, null, {"k": [true]}]},
        "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        "m": {"type": "integer", "maximum": -20},
        "s": {"type": "string", "minLength": 2, "maxLength": 3},
        "k": {"const": "fixed"},
        "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 9.99},
        "z": {"type": "string", "pattern": "^\\d{3}-[a-z]+$"},
        "q": {"type": "string", "pattern": "\"\\\\"},
        "t": {"type": "string", "format": "date-time"},
        "u": {"type": "string", "format": "uuid"},
        "e": {"type": "string", "format": "email"},
        "f": {"type": "string", "format": "hostname"}
    }}));
    assert_valid(&s, r#"{"z": "123-abc"}"#);
    for (doc, ok) in [
        (r#"{"t": "2026-11-26T19:05:27Z"}"#, None),
        (r#"{"t": "2026-11-26T19:05:27.123+01:00"}"#, None),
        (r#"{"t": "2026-13-26T19:05:27Z"}"#, Some("3-26T")),
        (r#"{"t": "2026-02-30T19:05:27Z"}"#, Some("30T19")),
        (r#"{"t": "0000-01-01T00:00:00Z"}"#, Some("0-01-01T")),
        (r#"{"t": "2026-11-26 19:05:27Z"}"#, Some(" 19:")),
        (r#"{"t": "2026-11-26T19:05:27"}"#, Some("\"}")),
        (r#"{"u": "123e4567-e89b-12d3-a456-426614174000"}"#, None),
        (r#"{"u": "123e4567-e89b-12d3-a456-42661417400"}"#, Some("\"}")),
        (r#"{"e": "a.b+c@mail.example.org"}"#, None),
        (r#"{"e": "a@b"}"#, Some("\"}")),
        (r#"{"f": "not checked"}"#, None),
    ] {
        match ok {
            None => assert_valid(&s, doc),
            Some(at) => assert_refused(&s, doc, at),
        }
    }
    assert_refused(&s, r#"{"z": "12-abc"}"#, "-abc");
    assert_refused(&s, r#"{"z": "123-"}"#, "\"}");
    assert_refused(&s, r#"{"z": "123-ab\u0063"}"#, "\\u0063"); // no escape fits [a-z]
    assert_valid(&s, r#"{"q": "x\"\\y"}"#);
    assert_refused(&s, r#"{"q": "x\"y"}"#, "\"}");
    assert_valid(&s, r#"{"p": 9.99}"#);
    assert_valid(&s, r#"{"p": 0.001}"#);
    assert_refused(&s, r#"{"p": 0}"#, "}");
    assert_refused(&s, r#"{"p": 9.991}"#, "1}");
    assert_refused(&s, r#"{"p": 1e2}"#, "e");
    assert_refused(&s, r#"{"p": -1}"#, "-");
    for c in [r#""red""#, "12", "1", "null", r#"{"k":[true]}"#] {
        assert_valid(&s, &format!(r#"{{"c": {c}}}"#));
    }
    assert_refused(&s, r#"{"c": 13}"#, "3");
    assert_refused(&s, r#"{"c": "r"}"#, "\"}");
    assert_refused(&s, r#"{"c": {"k":[true] }}"#, " }}");
    assert_refused(&s, r#"{"c": {"k": [true]}}"#, " [");
    assert_valid(&s, r#"{"n": 1, "m": -20}"#);
    assert_valid(&s, r#"{"n": 99, "m": -123456789012}"#);
    assert_refused(&s, r#"{"n": 0}"#, "0");
    assert_refused(&s, r#"{"n": 100}"#, "0}");
    assert_refused(&s, r#"{"n": -0}"#, "-");
    assert_refused(&s, r#"{"m": -19}"#, "}"); // -19 is a prefix of -190
    assert_refused(&s, r#"{"m": 5}"#, "5");
    assert_valid(&s, r#"{"s": "ab", "k": "fixed"}"#);
    assert_valid(&s, r#"{"s": "é日\n"}"#);
    assert_refused(&s, r#"{"s": "a"}"#, "\"}");
    assert_refused(&s, r#"{"s": "abcd"}"#, "d");
    assert_refused(&s, r#"{"k": "fixe"}"#, "\"}");
}

#[test]
fn unions_refs_and_arrays() {
    let s = compile(json!({
        "$defs": {
            "Node": {"type": "object", "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}
            }, "required": ["v"]},
            "Color": {"enum": ["r", "g"], "type": "string"}
        },
        "type": "object",
        "properties": {
            "tree": {"$ref": "#/$defs/Node"},
            "maybe": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}], "default": null},
            "color": {"allOf": [{"$ref": "#/$defs/Color"}]},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": false},
            "nums": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "number"}]}, "minItems": 2},
            "any": {},
            "opt": {"type": "string", "nullable": true}
        },
        "required": ["tree"]
    }));
    assert_valid(&s, r#"{"tree": {"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}, "maybe": null}"#);
    assert_valid(&s, r#"{"tree": {"v": 1}, "maybe": {"v": -4}, "color": "g", "pair": [1, "a"]}"#);
    assert_valid(&s, r#"{"tree":{"v":1},"nums":[1,2.5e-3],"any":[{"x":[1,"y",null]},-0.5],"opt":null}"#);
    assert_valid(&s, r#"{"tree":{"v":1},"any":12,"opt":"s"}"#);
    assert_refused(&s, r#"{"tree": {"kids": []}}"#, "kids");
    assert_refused(&s, r#"{"tree": {"v": 1}, "maybe": 3}"#, "3");
    assert_refused(&s, r#"{"tree": {"v": 1}, "color": "b"}"#, "b");
    assert_refused(&s, r#"{"tree": {"v": 1}, "pair": [1, "a", 2]}"#, ", 2");
    assert_refused(&s, r#"{"tree": {"v": 1}, "pair": ["a"]}"#, "\"a");
    assert_refused(&s, r#"{"tree": {"v": 1}, "nums": [1]}"#, "]");
    assert_refused(&s, r#"{"tree":{"v":1},"any":12 3}"#, "3}");
}

fn pets() -> Value {
    json!({
        "$defs": {
            "Cat": {"type": "object", "properties": {"pet_type": {"const": "cat", "type": "string"},
                "meows": {"type": "integer", "minimum": 0}}, "required": ["pet_type", "meows"]},
            "Dog": {"type": "object", "properties": {"pet_type": {"const": "dog", "type": "string"},
                "barks": {"type": "number"}, "name": {"type": "string"}}, "required": ["pet_type"]},
            "Dodo": {"type": "object", "properties": {"pet_type": {"enum": ["dodo"]}}, "required": ["pet_type"]}
        },
        "type": "object",
        "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"$ref": "#/$defs/Dodo"}],
            "discriminator": {"propertyName": "pet_type"}}, "n": {"type": "integer"}},
        "required": ["pet"]
    })
}

#[test]
fn tagged_unions_of_objects() {
    let s = compile(pets());
    assert_valid(&s, r#"{"pet": {"pet_type": "cat", "meows": 3}}"#);
    assert_valid(&s, r#"{"pet": { "pet_type" : "dog" }, "n": 1}"#);
    assert_valid(&s, r#"{"pet": {"pet_type": "dog", "barks": 1.5, "name": "Rex"}}"#);
    assert_valid(&s, r#"{"pet": {"pet_type": "dodo"}}"#);
    assert_refused(&s, r#"{"pet": {"barks": 1}}"#, "barks");
    assert_refused(&s, r#"{"pet": {"pet_type": "cow"}}"#, "ow");
    assert_refused(&s, r#"{"pet": {"pet_type": "cat", "barks": 1}}"#, "barks");
    assert_refused(&s, r#"{"pet": {"pet_type": "cat"}}"#, "}}");
    assert_refused(&s, r#"{"pet": {"pet_type": "dodo", "x": 1}}"#, ",");
    assert_refused(&s, r#"{"pet": {}}"#, "}}");
    // objects without a common tag stay refused
    let e = refused(json!({"type": "object", "properties": {"u": {"anyOf": [
        {"type": "object", "properties": {"a": {"const": "x"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"const": "y"}}, "required": ["b"]}]}}}));
    assert!(e.message.contains("tag"), "{e}");
}

#[test]
fn additional_properties_and_free_objects() {
    let s = compile(
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}}),
    );
    assert_valid(&s, r#"{"a": 1, "b": "x"}"#);
    assert_valid(&s, r#"{"b": "x", "a": 1, "c": ""}"#);
    assert_valid(&s, r#"{"ab": "x"}"#);
    assert_refused(&s, r#"{"a": 1, "a": 2}"#, "\": 2");
    assert_refused(&s, r#"{"b": 1}"#, "1");
    for schema in [json!({}), json!(true), json!({"type": "object"})] {
        let s = compile(schema);
        assert_valid(&s, r#"{"anything": [1, {"x": null}], "b": "c"}"#);
        assert_refused(&s, r#"[1]"#, "[");
    }
    let s = compile(json!({"type": "object", "additionalProperties": false}));
    assert_valid(&s, "{}");
    assert_refused(&s, r#"{"a": 1}"#, "\"a");
}

#[test]
fn unsupported_schemas_are_refused_with_the_path() {
    let cases = [
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}),
            "/properties/a/pattern",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x", "maxLength": 3}}}),
            "/properties/a/pattern",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}),
            "/properties/a/uniqueItems",
        ),
        (json!({"type": "array"}), ""),
        (json!({"type": "object", "properties": {"p": {"type": "number", "minimum": 1e-30}}}), "/properties/p/minimum"),
        (
            json!({"type": "object", "properties": {"p": {"type": "number", "minimum": 2, "exclusiveMaximum": 2}}}),
            "/properties/p",
        ),
        (
            json!({"type": "object", "properties": {"u": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}}}),
            "/properties/u/anyOf",
        ),
        (json!({"type": "object", "properties": {"r": {"$ref": "#/$defs/missing"}}}), "/properties/r/$ref"),
        (json!({"type": "object", "properties": {"r": {"$ref": "other.json#/x"}}}), "/properties/r/$ref"),
        (json!({"type": "object", "required": ["a"], "properties": {"b": {}}}), "/required"),
        (json!({"type": "object", "properties": {"e": {"enum": []}}}), "/properties/e/enum"),
        (
            json!({"type": "object", "properties": {"t": {"type": "array", "prefixItems": [{}], "items": false, "minItems": 2}}}),
            "/properties/t/minItems",
        ),
        (
            json!({"type": "object", "properties": {"i": {"type": "integer", "minimum": 5, "maximum": 4}}}),
            "/properties/i",
        ),
        (json!({"type": "object", "properties": {"t": {"type": "date"}}}), "/properties/t/type"),
        (
            json!({"type": "object", "properties": {"o": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}),
            "/properties/o/oneOf",
        ),
        (json!({"type": "object", "properties": {"s": {"allOf": [{}, {}]}}}), "/properties/s/allOf"),
        (
            json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": -1}}}),
            "/properties/s/maxLength",
        ),
        (json!("object"), ""),
    ];
    for (schema, path) in cases {
        match JsonSchema::compile(&schema) {
            Ok(_) => panic!("{schema} should be refused"),
            Err(e) => {
                assert_eq!(e.path, path, "{schema}: {e}");
                assert!(!e.message.is_empty());
            }
        }
    }
    // a $ref chain deeper than the compiler recurses
    let mut defs = serde_json::Map::new();
    for i in 0..500 {
        defs.insert(format!("d{i}"), json!({"$ref": format!("#/$defs/d{}", i + 1)}));
    }
    defs.insert("d500".into(), json!({"type": "integer"}));
    let e = refused(json!({"$defs": defs, "type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}}));
    assert!(e.message.contains("nested more than"), "{e}");
    // a pattern whose DFA is too large, and patterns too large together (2^10 states each)
    let e =
        refused(json!({"type": "object", "properties": {"p": {"type": "string", "pattern": "^(a|b)*a(a|b){12}$"}}}));
    assert!(e.message.contains("too complex"), "{e}");
    let props: serde_json::Map<String, Value> =
        (0..20).map(|i| (format!("p{i}"), json!({"type": "string", "pattern": "^(a|b)*a(a|b){9}$"}))).collect();
    let e = refused(json!({"type": "object", "properties": props}));
    assert!(e.message.contains("DFA states together"), "{e}");
    let e = JsonSchema::compile(&json!({"type": "object", "properties": {"a": {"not": {}}}})).unwrap_err();
    assert_eq!(e.to_string(), "the schema at /properties/a/not: 'not' is not supported in constrained generation");
}

/// An independent check of a parsed document against the schemas these tests use (by value,
/// not by bytes as the matcher works).
fn validate(schema: &Value, root: &Value, v: &Value) -> bool {
    let Some(o) = schema.as_object() else { return schema == &json!(true) };
    if let Some(r) = o.get("$ref").and_then(|r| r.as_str()) {
        return validate(root.pointer(&r[1..]).expect("ref"), root, v);
    }
    if let Some(alts) = o.get("anyOf").and_then(|a| a.as_array()) {
        return alts.iter().any(|a| validate(a, root, v));
    }
    if let Some(alts) = o.get("oneOf").and_then(|a| a.as_array()) {
        return alts.iter().filter(|a| validate(a, root, v)).count() == 1;
    }
    if let Some(c) = o.get("const") {
        return c == v;
    }
    if let Some(e) = o.get("enum").and_then(|e| e.as_array()) {
        return e.contains(v);
    }
    let types: Vec<&str> = match o.get("type") {
        Some(Value::String(t)) => vec![t],
        Some(Value::Array(ts)) => ts.iter().filter_map(|t| t.as_str()).collect(),
        _ => vec!["object", "array", "string", "number", "integer", "boolean", "null"],
    };
    types.iter().any(|t| match (*t, v) {
        ("object", Value::Object(m)) => {
            let props = o.get("properties").and_then(|p| p.as_object());
            let required = o.get("required").and_then(|r| r.as_array()).cloned().unwrap_or_default();
            required.iter().all(|k| m.contains_key(k.as_str().unwrap_or("")))
                && m.iter().all(|(k, x)| match props.and_then(|p| p.get(k)) {
                    Some(ps) => validate(ps, root, x),
                    None => match o.get("additionalProperties") {
                        None => props.is_none(),
                        Some(a) => validate(a, root, x),
                    },
                })
        }
        ("array", Value::Array(a)) => {
            let n = a.len() as u64;
            n >= o.get("minItems").and_then(|x| x.as_u64()).unwrap_or(0)
                && n <= o.get("maxItems").and_then(|x| x.as_u64()).unwrap_or(u64::MAX)
                && a.iter().all(|x| o.get("items").is_none_or(|i| validate(i, root, x)))
        }
        ("string", Value::String(s)) => {
            if let Some(p) = o.get("pattern").and_then(|p| p.as_str()) {
                return regex::Regex::new(p).unwrap().is_match(s);
            }
            match o.get("format").and_then(|f| f.as_str()) {
                // checked by parsing, independently of the pattern the matcher uses
                Some("date-time") => return s.len() >= 20 && s.as_bytes()[10] == b'T' && valid_date_time(s),
                Some("ipv4") => {
                    return s.parse::<std::net::Ipv4Addr>().is_ok()
                        && !s.split('.').any(|p| p.len() > 1 && p.starts_with('0'))
                }
                _ => {}
            }
            let n = s.chars().count() as u64;
            n >= o.get("minLength").and_then(|x| x.as_u64()).unwrap_or(0)
                && n <= o.get("maxLength").and_then(|x| x.as_u64()).unwrap_or(u64::MAX)
        }
        ("number", Value::Number(n)) => {
            let x = n.as_f64().unwrap();
            let b = |k: &str| o.get(k).and_then(|m| m.as_f64());
            b("minimum").is_none_or(|m| x >= m)
                && b("exclusiveMinimum").is_none_or(|m| x > m)
                && b("maximum").is_none_or(|m| x <= m)
                && b("exclusiveMaximum").is_none_or(|m| x < m)
        }
        ("integer", Value::Number(n)) => n.as_i64().is_some_and(|i| {
            o.get("minimum").and_then(|m| m.as_i64()).is_none_or(|m| i >= m)
                && o.get("maximum").and_then(|m| m.as_i64()).is_none_or(|m| i <= m)
        }),
        ("boolean", Value::Bool(_)) | ("null", Value::Null) => true,
        _ => false,
    })
}

/// An RFC 3339 date-time, checked field by field.
fn valid_date_time(s: &str) -> bool {
    let num = |t: &str| t.parse::<u32>().ok().filter(|_| t.bytes().all(|c| c.is_ascii_digit()));
    let field = |a: usize, b: usize| s.get(a..b).and_then(num);
    let (Some(_), Some(mo), Some(d), Some(h), Some(mi), Some(se)) =
        (field(0, 4), field(5, 7), field(8, 10), field(11, 13), field(14, 16), field(17, 19))
    else {
        return false;
    };
    let mut rest = &s[19..];
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &f[digits..];
    }
    let zone_ok = rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes()[3] == b':'
            && num(&rest[1..3]).is_some_and(|h| h < 24)
            && num(&rest[4..6]).is_some_and(|m| m < 60));
    let y = field(0, 4).unwrap_or(0);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    y >= 1 && (1..=12).contains(&mo) && (1..=days).contains(&d) && h < 24 && mi < 60 && se < 60 && zone_ok
}

/// A xorshift generator (the tests' random choices, seeded).
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// One random walk over the bytes `s` allows (preferring closing and structural bytes so that
/// walks end), at most `max` bytes; asserts it never reaches a dead end (no byte allowed, the
/// document not complete). The document, parsed, if the walk completed it.
fn random_walk(s: &JsonSchema, next: &mut impl FnMut() -> u64, max: usize, what: &Value) -> Option<Value> {
    let mut st = SchemaState::new();
    let mut frames = Frames::default();
    let mut doc = Vec::new();
    while !st.is_complete() && doc.len() < max {
        let ok: Vec<u8> = (0..=255u8)
            .filter(|&b| {
                let mut t = st;
                let r = t.feed(s, &mut frames, b);
                frames.rewind();
                r
            })
            .collect();
        assert!(!ok.is_empty(), "dead end after {:?} with {what}", String::from_utf8_lossy(&doc));
        let pref: Vec<u8> = ok.iter().copied().filter(|b| b"}]\",:".contains(b)).collect();
        let pick = if !pref.is_empty() && next() % 3 != 0 { &pref } else { &ok };
        let b = pick[(next() % pick.len() as u64) as usize];
        assert!(st.feed(s, &mut frames, b));
        frames.commit(&mut st);
        doc.push(b);
    }
    st.is_complete()
        .then(|| serde_json::from_slice(&doc).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&doc))))
}

/// Random walks over the bytes the matcher allows never reach a dead end (a state that is not
/// complete and accepts no byte), and every document they complete parses and validates.
#[test]
fn random_walks_never_dead_end_and_end_valid() {
    let schemas = [
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "integer", "minimum": -1000, "maximum": -995},
            "price": {"type": "number", "minimum": 0.5, "exclusiveMaximum": 2},
            "temp": {"type": "number", "minimum": -3.25, "maximum": -3.2},
            "code": {"type": "string", "pattern": "^[a-c]{2}[0-9]$|^x+é$"},
            "when": {"type": "string", "format": "date-time"},
            "ip": {"type": "string", "format": "ipv4"},
            "has": {"type": "string", "pattern": "q[rs]"},
            "tags": {"type": "array", "items": {"enum": ["a", "bc", 7, 71]}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"},
            "x": {"anyOf": [{"type": "number"}, {"type": "null"}, {"type": "string", "minLength": 1, "maxLength": 2}]}
        }, "required": ["name", "age", "tags"]}),
        json!({"$defs": {"T": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/T"}, "maxItems": 2}}}}, "$ref": "#/$defs/T"}),
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "boolean"}}),
        pets(),
    ];
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    for schema in &schemas {
        let s = compile(schema.clone());
        let mut completed = 0;
        for _ in 0..300 {
            if let Some(v) = random_walk(&s, &mut next, 400, schema) {
                completed += 1;
                assert!(validate(schema, schema, &v), "{v} does not match {schema}");
            }
        }
        assert!(completed > 100, "{completed} of 300 walks completed for {schema}");
    }
}

/// Random schemas (random keywords with random values, wrong types included) never make the
/// compiler panic; those it accepts never let a random walk dead-end.
#[test]
fn random_schemas_compile_or_refuse_and_never_dead_end() {
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    fn pick<'a, T>(n: &mut impl FnMut() -> u64, xs: &'a [T]) -> &'a T {
        &xs[(n() % xs.len() as u64) as usize]
    }
    fn value(n: &mut impl FnMut() -> u64) -> Value {
        match n() % 7 {
            0 => json!(null),
            1 => json!(n() % 2 == 0),
            2 => json!((n() % 200) as i64 - 100),
            3 => json!(((n() % 2000) as f64 - 1000.0) / 8.0),
            4 => json!(*pick(n, &["a", "bc", "", "é", "x\"y", "12"])),
            5 => json!([1, "a"]),
            _ => json!({"k": 1}),
        }
    }
    fn schema(n: &mut impl FnMut() -> u64, depth: u32) -> Value {
        let types = ["object", "array", "string", "number", "integer", "boolean", "null", "date"];
        let mut o = serde_json::Map::new();
        let keywords = n() % 5;
        for _ in 0..keywords {
            let k = *pick(
                n,
                &[
                    "type",
                    "enum",
                    "const",
                    "minimum",
                    "maximum",
                    "exclusiveMinimum",
                    "minLength",
                    "maxLength",
                    "pattern",
                    "format",
                    "items",
                    "minItems",
                    "maxItems",
                    "properties",
                    "required",
                    "anyOf",
                    "additionalProperties",
                    "nullable",
                    "prefixItems",
                ],
            );
            let v = match k {
                "type" if n() % 3 == 0 => json!([*pick(n, &types), *pick(n, &types)]),
                "type" => json!(*pick(n, &types)),
                "enum" => json!((0..n() % 4).map(|_| value(n)).collect::<Vec<_>>()),
                "const" => value(n),
                "minLength" | "maxLength" | "minItems" | "maxItems" => json!(n() % 4),
                "minimum" | "maximum" | "exclusiveMinimum" => json!(((n() % 40) as f64 - 20.0) / 4.0),
                "pattern" => json!(*pick(n, &["^a+$", "b", "^[0-9]{2}$", "(", "x|y"])),
                "format" => json!(*pick(n, &["date", "email", "uuid", "hostname"])),
                "items" | "additionalProperties" if depth < 3 => schema(n, depth + 1),
                "prefixItems" | "anyOf" if depth < 3 => {
                    json!((0..n() % 3 + 1).map(|_| schema(n, depth + 1)).collect::<Vec<_>>())
                }
                "properties" if depth < 3 => {
                    json!((0..n() % 3)
                        .map(|i| (format!("p{i}"), schema(n, depth + 1)))
                        .collect::<serde_json::Map<_, _>>())
                }
                "required" => json!(["p0"]),
                "nullable" => json!(n() % 2 == 0),
                _ => value(n),
            };
            o.insert(k.to_string(), v);
        }
        Value::Object(o)
    }
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..3000 {
        let inner = schema(&mut next, 1);
        let root = json!({"type": "object", "properties": {"v": inner}, "required": ["v"]});
        let Ok(s) = JsonSchema::compile(&root) else {
            refused += 1;
            continue;
        };
        accepted += 1;
        for _ in 0..5 {
            if let Some(v) = random_walk(&s, &mut next, 300, &root) {
                assert!(v.is_object());
            }
        }
    }
    println!("{accepted} random schemas accepted, {refused} refused");
    assert!(accepted > 500 && refused > 100, "{accepted} / {refused}");
}
