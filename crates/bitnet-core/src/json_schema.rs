//! JSON schemas for constrained generation (OpenAI's `response_format: {"type": "json_schema"}`,
//! llama.cpp's `--json-schema`): a schema is compiled ([`JsonSchema::compile`]) into a small graph
//! of nodes, and [`matcher`] recognizes, byte by byte, the JSON texts that are prefixes of a
//! document the schema accepts, so the vocabulary walk of [`crate::json_mode`] can list the
//! tokens that keep the output valid.
//!
//! What is enforced (the subset OpenAI's structured outputs and llama.cpp's grammar converter
//! share; everything else that constrains values is refused with an error naming it, never
//! ignored):
//! - `type` (one, or a list: a union), `enum`, `const`, `nullable` (OpenAPI's), `$ref` to
//!   `#`, `#/$defs/...`, `#/definitions/...` (recursion allowed), `anyOf` / `oneOf` whose
//!   alternatives start with different bytes (`{`, `[`, `"`, a digit or `-`, `t`/`f`, `n`;
//!   a string and string constants, or an integer and a number, merge into the wider one for
//!   `anyOf`), and unions of objects told apart by a tag: the same first property, required,
//!   with a different string `const` in each (pydantic's discriminated unions), `allOf` with
//!   one schema;
//! - objects: `properties` in the schema's order (as OpenAI and llama.cpp write them), the
//!   `required` ones always, the others optional; `additionalProperties` (`true` or a schema:
//!   other keys, after or between the declared ones; absent or `false` with `properties`: none;
//!   an object schema without `properties` takes any keys). A key appears at most once;
//! - arrays: `items`, `prefixItems` (or draft 7's `items` array with `additionalItems`),
//!   `minItems`, `maxItems`;
//! - strings: `minLength`, `maxLength` (in characters; an escape counts one, a surrogate pair
//!   one), or `pattern` (see `pattern.rs`; not together with the lengths);
//! - integers and numbers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (every
//!   prefix the matcher accepts can still end in range; number bounds are compared as exact
//!   decimals with up to 18 digits on each side of the point, see `decimal.rs`, and a bounded
//!   number is written without an exponent);
//! - `format` on strings, for the formats strict validators check (`date-time`, `date`, `time`,
//!   `uuid`, `ipv4`, `email`: written as a pattern, see `format_pattern`; without a `pattern`
//!   or lengths of the schema's own); other formats, like other annotations (`title`,
//!   `description`, `default`, `examples`, `$schema`, `$id`, `$comment`, ...), are ignored as
//!   the standard says.
//!
//! The output is compact where the schema pins it (an `enum` or `const` value is written as
//! `serde_json` writes it); elsewhere whitespace is free, as in JSON mode. The root must be an
//! object (as OpenAI requires), so the end of the document is the closing brace.

mod decimal;
pub mod matcher;
pub mod pattern;

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

/// Index of a node in [`JsonSchema::nodes`].
pub(crate) type NodeId = u32;

/// How a value starts, which is what a union chooses by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Class {
    const ALL: [Class; 6] = [Class::Object, Class::Array, Class::String, Class::Number, Class::Bool, Class::Null];

    /// The class of a value starting with `b` (not whitespace).
    pub(crate) fn of_byte(b: u8) -> Option<Class> {
        Some(match b {
            b'{' => Class::Object,
            b'[' => Class::Array,
            b'"' => Class::String,
            b'-' | b'0'..=b'9' => Class::Number,
            b't' | b'f' => Class::Bool,
            b'n' => Class::Null,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Class::Object => "an object",
            Class::Array => "an array",
            Class::String => "a string",
            Class::Number => "a number",
            Class::Bool => "a boolean",
            Class::Null => "null",
        }
    }
}

/// An integer bound meaning "none" (beyond every i64, so the arithmetic in the matcher needs no
/// special case).
pub(crate) const UNBOUNDED: i128 = 1 << 100;

#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// any JSON value
    Any,
    Object(ObjectNode),
    Array(ArrayNode),
    /// characters, inclusive
    String {
        min: u32,
        max: u32,
    },
    /// a string matching a `pattern`
    Pattern(Box<pattern::Pattern>),
    /// any number
    Number,
    /// a number within bounds (written without an exponent)
    Decimal(decimal::Range),
    /// inclusive bounds, [`UNBOUNDED`] (negated for `lo`) when absent
    Integer {
        lo: i128,
        hi: i128,
    },
    /// compact JSON texts, sorted and distinct (never empty)
    Literals(Vec<Box<[u8]>>),
    /// by the class of the first byte (at least two)
    Union([Option<NodeId>; 6]),
    /// objects told apart by their first property, `key`, whose value is a string constant in
    /// each (a discriminated union: pydantic's `Field(discriminator=...)`, tool calls by name):
    /// `tags` sorted and distinct, `variants[i]` the object node whose tag is `tags[i]`
    Tagged {
        key: Box<[u8]>,
        tags: Vec<Box<[u8]>>,
        variants: Vec<NodeId>,
    },
    /// a `$ref` target still being compiled (recursion), of the class its keywords suggest
    Pending(Option<Class>),
}

#[derive(Debug, Clone)]
pub(crate) struct Prop {
    /// the key as written in the output, between the quotes (JSON-escaped)
    pub key: Box<[u8]>,
    pub node: NodeId,
}

#[derive(Debug, Clone)]
pub(crate) struct ObjectNode {
    /// in the schema's (and the output's) order
    pub props: Vec<Prop>,
    /// indices into `props`, sorted by key bytes (key matching narrows a range of these)
    pub sorted: Vec<u16>,
    /// `next_required[i]`: the first required property at or after `i` (`props.len()`: none);
    /// `props.len() + 1` entries
    pub next_required: Vec<u16>,
    /// the schema of other keys' values, when other keys are allowed
    pub additional: Option<NodeId>,
}

impl ObjectNode {
    /// The key of `sorted[i]`.
    pub(crate) fn sorted_key(&self, i: usize) -> &[u8] {
        &self.props[self.sorted[i] as usize].key
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ArrayNode {
    /// the schemas of the first items, in order
    pub prefix: Vec<NodeId>,
    /// the schema of the items after those (none: no more)
    pub items: Option<NodeId>,
    pub min: u32,
    pub max: u32,
}

impl ArrayNode {
    /// The schema of item `i` (none: the array cannot have it).
    pub(crate) fn item(&self, i: u32) -> Option<NodeId> {
        if i >= self.max {
            return None;
        }
        self.prefix.get(i as usize).copied().or(self.items)
    }
}

/// A compiled schema (immutable; shared by the requests that use it).
#[derive(Debug, Clone)]
pub struct JsonSchema {
    pub(crate) nodes: Vec<Node>,
    pub(crate) root: NodeId,
}

/// Why a schema cannot be used: the JSON pointer of the part at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// e.g. `/properties/age/minimum` ("" is the whole schema)
    pub path: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "the schema: {}", self.message)
        } else {
            write!(f, "the schema at {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for SchemaError {}

/// Keywords that constrain values in ways this matcher does not enforce: refused, never ignored
/// (the output would not match the schema).
const UNSUPPORTED: &[&str] = &[
    "patternProperties",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
];

/// Most properties per object, and bytes per key (the matcher counts them in 16 bits).
const MAX_PROPS: usize = 4096;
const MAX_KEY: usize = 4096;
/// Most schemas nested in one another while compiling (the compiler recurses; `$ref` chains
/// count too).
const MAX_NESTING: usize = 128;
/// Most DFA states of all of a schema's patterns together (1 KiB of table each).
const MAX_PATTERN_STATES: usize = 16384;
/// Most nodes a schema compiles to (a guard against enormous schemas; each `enum` value, property
/// and sub-schema is one).
const MAX_NODES: usize = 100_000;

fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    /// `$ref` target pointer -> its node
    refs: HashMap<String, NodeId>,
    /// schemas being compiled, nested (`$ref` chains included)
    depth: usize,
    /// DFA states of the patterns so far
    pattern_states: usize,
}

type Result<T> = std::result::Result<T, SchemaError>;

fn err<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(SchemaError { path: path.to_string(), message: message.into() })
}

impl JsonSchema {
    /// Compiles `schema` (a JSON Schema object, or `true`) for the matcher; the root must
    /// describe an object.
    pub fn compile(schema: &Value) -> std::result::Result<JsonSchema, SchemaError> {
        let mut c = Compiler { root: schema, nodes: Vec::new(), refs: HashMap::new(), depth: 0, pattern_states: 0 };
        let root = c.schema(schema, "")?;
        let classes = c.classes(root);
        let root = match (classes.as_slice(), &c.nodes[root as usize]) {
            // `{}` / `true` at the root: any object (JSON mode)
            (_, Node::Any) => {
                let any = c.any("")?;
                c.push(Node::Object(free_object(Some(any))), "")?
            }
            ([Class::Object], _) => root,
            _ => return err("", "the root must be an object (\"type\": \"object\"), as OpenAI requires"),
        };
        Ok(JsonSchema { nodes: c.nodes, root })
    }
}

/// An object with any keys whose values match `value` (any value when `None`).
fn free_object(value: Option<NodeId>) -> ObjectNode {
    ObjectNode { props: Vec::new(), sorted: Vec::new(), next_required: vec![0], additional: value }
}

impl Compiler<'_> {
    fn push(&mut self, n: Node, path: &str) -> Result<NodeId> {
        if self.nodes.len() >= MAX_NODES {
            return err(path, format!("more than {MAX_NODES} nodes; the schema is too large"));
        }
        self.nodes.push(n);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn any(&mut self, path: &str) -> Result<NodeId> {
        self.push(Node::Any, path)
    }

    /// The classes a compiled node's values can start with.
    fn classes(&self, id: NodeId) -> Vec<Class> {
        match &self.nodes[id as usize] {
            Node::Any => Class::ALL.to_vec(),
            Node::Object(_) | Node::Tagged { .. } => vec![Class::Object],
            Node::Array(_) => vec![Class::Array],
            Node::String { .. } | Node::Pattern(_) => vec![Class::String],
            Node::Number | Node::Decimal(_) | Node::Integer { .. } => vec![Class::Number],
            Node::Literals(l) => {
                let mut v: Vec<Class> = Vec::new();
                for c in l.iter().filter_map(|t| Class::of_byte(t[0])) {
                    if !v.contains(&c) {
                        v.push(c);
                    }
                }
                v
            }
            Node::Union(slots) => Class::ALL.iter().zip(slots).filter(|(_, s)| s.is_some()).map(|(c, _)| *c).collect(),
            Node::Pending(c) => c.map_or_else(|| Class::ALL.to_vec(), |c| vec![c]),
        }
    }

    /// One schema (an object or a boolean) at JSON pointer `path`.
    fn schema(&mut self, v: &Value, path: &str) -> Result<NodeId> {
        if self.depth >= MAX_NESTING {
            return err(path, format!("schemas nested more than {MAX_NESTING} deep (with $ref chains)"));
        }
        self.depth += 1;
        let r = self.schema_inner(v, path);
        self.depth -= 1;
        r
    }

    fn schema_inner(&mut self, v: &Value, path: &str) -> Result<NodeId> {
        let obj = match v {
            Value::Bool(true) => return self.any(path),
            Value::Bool(false) => return err(path, "`false` accepts no value"),
            Value::Object(o) => o,
            _ => return err(path, "a schema must be an object or a boolean"),
        };
        for k in UNSUPPORTED {
            if obj.contains_key(*k) {
                return err(&format!("{path}/{k}"), format!("'{k}' is not supported in constrained generation"));
            }
        }
        if let Some(r) = obj.get("$ref") {
            return self.reference(r, &format!("{path}/$ref"));
        }
        if let Some(all) = obj.get("allOf") {
            let p = format!("{path}/allOf");
            return match all.as_array().map(|a| a.as_slice()) {
                Some([one]) => self.schema(one, &format!("{p}/0")),
                _ => err(&p, "only an 'allOf' of exactly one schema is supported"),
            };
        }
        for (kw, one_of) in [("anyOf", false), ("oneOf", true)] {
            if let Some(alts) = obj.get(kw) {
                let p = format!("{path}/{kw}");
                let Some(alts) = alts.as_array().filter(|a| !a.is_empty()) else {
                    return err(&p, format!("'{kw}' must be a non-empty array of schemas"));
                };
                let mut ids = Vec::new();
                for (i, a) in alts.iter().enumerate() {
                    ids.push(self.schema(a, &format!("{p}/{i}"))?);
                }
                let id = self.union(&ids, one_of, &p)?;
                return self.nullable(obj, id, path);
            }
        }
        let id = if let Some(c) = obj.get("const") {
            self.literals(std::slice::from_ref(c), obj, &format!("{path}/const"))?
        } else if let Some(e) = obj.get("enum") {
            let p = format!("{path}/enum");
            match e.as_array() {
                Some(vals) if !vals.is_empty() => self.literals(vals, obj, &p)?,
                _ => return err(&p, "'enum' must be a non-empty array"),
            }
        } else {
            match obj.get("type") {
                None => {
                    let t = infer_type(obj);
                    match t {
                        Some(t) => self.typed(obj, t, path)?,
                        None => self.any(path)?,
                    }
                }
                Some(Value::String(t)) => self.typed(obj, t, path)?,
                Some(Value::Array(ts)) if !ts.is_empty() => {
                    let mut ids = Vec::new();
                    for (i, t) in ts.iter().enumerate() {
                        let Some(t) = t.as_str() else {
                            return err(&format!("{path}/type/{i}"), "a type name must be a string");
                        };
                        ids.push(self.typed(obj, t, path)?);
                    }
                    self.union(&ids, true, &format!("{path}/type"))?
                }
                Some(_) => {
                    return err(&format!("{path}/type"), "'type' must be a type name or a non-empty array of them")
                }
            }
        };
        self.nullable(obj, id, path)
    }

    /// OpenAPI's `nullable: true`: the value may also be null.
    fn nullable(&mut self, obj: &Map<String, Value>, id: NodeId, path: &str) -> Result<NodeId> {
        if obj.get("nullable") == Some(&Value::Bool(true)) && !self.classes(id).contains(&Class::Null) {
            let null = self.push(Node::Literals(vec![b"null".to_vec().into_boxed_slice()]), path)?;
            return self.union(&[id, null], true, &format!("{path}/nullable"));
        }
        Ok(id)
    }

    fn reference(&mut self, r: &Value, path: &str) -> Result<NodeId> {
        let Some(r) = r.as_str() else { return err(path, "'$ref' must be a string") };
        let Some(pointer) = r.strip_prefix('#') else {
            return err(path, format!("'$ref' {r:?}: only references inside the schema (\"#...\") are supported"));
        };
        if let Some(&id) = self.refs.get(pointer) {
            return Ok(id);
        }
        let root = self.root;
        let Some(target) = root.pointer(pointer) else {
            return err(path, format!("'$ref' {r:?} points to nothing in the schema"));
        };
        // a placeholder first, so that a recursive reference finds it; a union that meets it
        // needs its class before the target is compiled (judged from its keywords)
        let class = shallow_class(root, target, 0);
        let id = self.push(Node::Pending(class), path)?;
        self.refs.insert(pointer.to_string(), id);
        let inner = self.schema(target, pointer)?;
        if let Some(class) = class {
            if self.classes(inner) != [class] {
                return err(path, format!("'$ref' {r:?} does not describe {} as its keywords suggest", class.name()));
            }
        }
        self.nodes[id as usize] = self.nodes[inner as usize].clone();
        Ok(id)
    }

    /// `const` / `enum` values (filtered by `type` when it is given).
    fn literals(&mut self, vals: &[Value], obj: &Map<String, Value>, path: &str) -> Result<NodeId> {
        let types: Option<Vec<&str>> = match obj.get("type") {
            Some(Value::String(t)) => Some(vec![t.as_str()]),
            Some(Value::Array(ts)) => Some(ts.iter().filter_map(|t| t.as_str()).collect()),
            _ => None,
        };
        let mut lits: Vec<Box<[u8]>> = Vec::new();
        for v in vals {
            if types.as_ref().is_some_and(|ts| !ts.iter().any(|t| value_has_type(v, t))) {
                continue;
            }
            let text = serde_json::to_vec(v).map_err(|e| SchemaError { path: path.into(), message: e.to_string() })?;
            lits.push(text.into_boxed_slice());
        }
        if lits.is_empty() {
            return err(path, "no value here matches the schema's 'type'");
        }
        lits.sort();
        lits.dedup();
        self.push(Node::Literals(lits), path)
    }

    fn typed(&mut self, obj: &Map<String, Value>, t: &str, path: &str) -> Result<NodeId> {
        match t {
            "object" => self.object(obj, path),
            "array" => self.array(obj, path),
            "string" => {
                let lengths = obj.contains_key("minLength") || obj.contains_key("maxLength");
                // a `format` that strict validators check is written as its pattern (when the
                // schema gives no pattern or lengths of its own)
                let format = obj.get("format").and_then(Value::as_str).and_then(format_pattern).filter(|_| !lengths);
                let (p, pp) = match (obj.get("pattern"), format) {
                    (Some(p), _) => (p, format!("{path}/pattern")),
                    (None, Some(f)) => (&Value::String(f.to_string()), format!("{path}/format")),
                    (None, None) => (&Value::Null, String::new()),
                };
                if !p.is_null() {
                    let Some(p) = p.as_str() else { return err(&pp, "'pattern' must be a string") };
                    if lengths {
                        return err(&pp, "'pattern' together with 'minLength' / 'maxLength' is not supported (put the length in the pattern)");
                    }
                    let compiled = pattern::Pattern::compile(p)
                        .map_err(|e| SchemaError { path: pp.clone(), message: format!("the pattern {p:?} {e}") })?;
                    self.pattern_states += compiled.states();
                    if self.pattern_states > MAX_PATTERN_STATES {
                        return err(
                            &pp,
                            format!("the schema's patterns need more than {MAX_PATTERN_STATES} DFA states together"),
                        );
                    }
                    return self.push(Node::Pattern(Box::new(compiled)), path);
                }
                let min = count(obj, "minLength", path)?.unwrap_or(0);
                let max = count(obj, "maxLength", path)?.unwrap_or(u32::MAX);
                if min > max {
                    return err(path, format!("minLength {min} is above maxLength {max}"));
                }
                self.push(Node::String { min, max }, path)
            }
            "number" => match number_bounds(obj, path)? {
                Some(r) => self.push(Node::Decimal(r), path),
                None => self.push(Node::Number, path),
            },
            "integer" => {
                let (lo, hi) = int_bounds(obj, path)?;
                self.push(Node::Integer { lo, hi }, path)
            }
            "boolean" => self.push(Node::Literals(vec![b"false".to_vec().into(), b"true".to_vec().into()]), path),
            "null" => self.push(Node::Literals(vec![b"null".to_vec().into()]), path),
            other => err(&format!("{path}/type"), format!("unknown type {other:?}")),
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, path: &str) -> Result<NodeId> {
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(a)) => {
                let mut r = Vec::new();
                for (i, k) in a.iter().enumerate() {
                    match k.as_str() {
                        Some(k) => r.push(k),
                        None => return err(&format!("{path}/required/{i}"), "a required name must be a string"),
                    }
                }
                r
            }
            Some(_) => return err(&format!("{path}/required"), "'required' must be an array of names"),
        };
        let props_v = match obj.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return err(&format!("{path}/properties"), "'properties' must be an object"),
        };
        let additional = match obj.get("additionalProperties") {
            None if props_v.is_none() => Some(self.any(path)?),
            None | Some(Value::Bool(false)) => None,
            Some(a) => Some(self.schema(a, &format!("{path}/additionalProperties"))?),
        };
        let Some(props_v) = props_v else {
            if let Some(r) = required.first() {
                return err(&format!("{path}/required"), format!("required property {r:?} is not in 'properties'"));
            }
            return self.push(Node::Object(free_object(additional)), path);
        };
        if props_v.len() > MAX_PROPS {
            return err(&format!("{path}/properties"), format!("more than {MAX_PROPS} properties"));
        }
        for r in &required {
            if !props_v.contains_key(*r) {
                return err(&format!("{path}/required"), format!("required property {r:?} is not in 'properties'"));
            }
        }
        let mut props = Vec::new();
        let mut is_req = Vec::new();
        for (k, v) in props_v {
            let node = self.schema(v, &format!("{path}/properties/{}", escape_pointer(k)))?;
            let quoted = serde_json::to_vec(&Value::String(k.clone())).expect("a string serializes");
            let key: Box<[u8]> = quoted[1..quoted.len() - 1].into();
            if key.len() > MAX_KEY {
                return err(&format!("{path}/properties"), format!("a key longer than {MAX_KEY} bytes"));
            }
            props.push(Prop { key, node });
            is_req.push(required.contains(&k.as_str()));
        }
        let n = props.len();
        let mut next_required = vec![n as u16; n + 1];
        for i in (0..n).rev() {
            next_required[i] = if is_req[i] { i as u16 } else { next_required[i + 1] };
        }
        let mut sorted: Vec<u16> = (0..n as u16).collect();
        sorted.sort_by(|&a, &b| props[a as usize].key.cmp(&props[b as usize].key));
        self.push(Node::Object(ObjectNode { props, sorted, next_required, additional }), path)
    }

    fn array(&mut self, obj: &Map<String, Value>, path: &str) -> Result<NodeId> {
        let mut prefix = Vec::new();
        let mut items_v = obj.get("items");
        let mut rest_kw = "items";
        let tuple = match (obj.get("prefixItems"), items_v) {
            (Some(p), _) => Some(("prefixItems", p)),
            (None, Some(Value::Array(_))) => {
                rest_kw = "additionalItems";
                let t = items_v.map(|i| ("items", i));
                items_v = obj.get("additionalItems");
                t
            }
            _ => None,
        };
        if let Some((kw, p)) = tuple {
            let Some(p) = p.as_array() else { return err(&format!("{path}/{kw}"), format!("'{kw}' must be an array")) };
            for (i, s) in p.iter().enumerate() {
                prefix.push(self.schema(s, &format!("{path}/{kw}/{i}"))?);
            }
        }
        let items = match items_v {
            None | Some(Value::Bool(true)) => Some(self.any(path)?),
            Some(Value::Bool(false)) => None,
            Some(s) => Some(self.schema(s, &format!("{path}/{rest_kw}"))?),
        };
        let min = count(obj, "minItems", path)?.unwrap_or(0);
        let max = count(obj, "maxItems", path)?.unwrap_or(u32::MAX);
        let most = if items.is_some() { max } else { max.min(prefix.len() as u32) };
        if min > most {
            return err(&format!("{path}/minItems"), format!("minItems {min} but at most {most} items are allowed"));
        }
        self.push(Node::Array(ArrayNode { prefix, items, min, max: most }), path)
    }

    /// The union of `ids` (anyOf / oneOf / a type list): one alternative per first-byte class.
    /// Alternatives of one class merge when one contains the other (never for `oneOf`, whose
    /// alternatives must then exclude each other, except identical literal sets).
    fn union(&mut self, ids: &[NodeId], one_of: bool, path: &str) -> Result<NodeId> {
        let mut slots: [Option<(usize, NodeId)>; 6] = [None; 6];
        for (i, &id) in ids.iter().enumerate() {
            if matches!(self.nodes[id as usize], Node::Pending(None)) {
                return err(
                    &format!("{path}/{i}"),
                    "a recursive '$ref' in a union must point to a schema with one 'type' (an object, an array, ...)",
                );
            }
            for (ci, class) in Class::ALL.iter().enumerate() {
                let Some(part) = self.class_part(id, *class, path)? else { continue };
                slots[ci] = Some(match slots[ci] {
                    None => (i, part),
                    Some((j, other)) => match self.merge(other, part, one_of, path)? {
                        Some(m) => (j, m),
                        None if *class == Class::Object => match self.tagged(other, part, path)? {
                            Some(m) => (j, m),
                            None => {
                                return err(
                                    path,
                                    format!(
                                        "alternatives {j} and {i} are both objects; a union of objects needs a first \
                                         property, required in each, with a different string 'const' in each (a tag)"
                                    ),
                                )
                            }
                        },
                        None => {
                            return err(
                                path,
                                format!(
                                    "alternatives {j} and {i} both start as {}; such unions are not supported",
                                    class.name()
                                ),
                            )
                        }
                    },
                });
            }
        }
        let set: Vec<(usize, NodeId)> = slots.iter().flatten().copied().collect();
        if set.iter().all(|(_, id)| *id == set[0].1) {
            return Ok(set[0].1);
        }
        if set.iter().all(|(_, id)| matches!(self.nodes[*id as usize], Node::Literals(_))) {
            let mut all: Vec<Box<[u8]>> = Vec::new();
            for (_, id) in &set {
                if let Node::Literals(l) = &self.nodes[*id as usize] {
                    all.extend(l.iter().cloned());
                }
            }
            all.sort();
            all.dedup();
            return self.push(Node::Literals(all), path);
        }
        self.push(Node::Union(slots.map(|s| s.map(|(_, id)| id))), path)
    }

    /// The part of node `id` whose values start as `class` (a new node for a split literal set).
    fn class_part(&mut self, id: NodeId, class: Class, path: &str) -> Result<Option<NodeId>> {
        if !self.classes(id).contains(&class) {
            return Ok(None);
        }
        Ok(Some(match &self.nodes[id as usize] {
            Node::Union(slots) => {
                let i = Class::ALL.iter().position(|c| *c == class).expect("a class");
                slots[i].expect("the class is present")
            }
            Node::Literals(l) => {
                let part: Vec<Box<[u8]>> = l.iter().filter(|t| Class::of_byte(t[0]) == Some(class)).cloned().collect();
                if part.len() == l.len() {
                    id
                } else {
                    self.push(Node::Literals(part), path)?
                }
            }
            _ => id,
        }))
    }

    /// Object alternatives `a` and `b` (either may already be a tagged union) as one tagged
    /// union, if every one starts with the same required property whose value is one string
    /// constant, different in each.
    fn tagged(&mut self, a: NodeId, b: NodeId, path: &str) -> Result<Option<NodeId>> {
        let mut key: Option<Box<[u8]>> = None;
        let mut pairs: Vec<(Box<[u8]>, NodeId)> = Vec::new();
        for id in [a, b] {
            let vs: Vec<NodeId> = match &self.nodes[id as usize] {
                Node::Tagged { variants, .. } => variants.clone(),
                _ => vec![id],
            };
            for v in vs {
                let Node::Object(o) = &self.nodes[v as usize] else { return Ok(None) };
                let Some(first) = o.props.first() else { return Ok(None) };
                if o.next_required[0] != 0 || key.as_ref().is_some_and(|k| *k != first.key) {
                    return Ok(None);
                }
                let tag = match &self.nodes[first.node as usize] {
                    Node::Literals(l) if l.len() == 1 && l[0].first() == Some(&b'"') && l[0].len() < MAX_KEY => {
                        l[0].clone()
                    }
                    _ => return Ok(None),
                };
                if pairs.iter().any(|(t, _)| *t == tag) {
                    return Ok(None);
                }
                key = Some(first.key.clone());
                pairs.push((tag, v));
            }
        }
        pairs.sort();
        let (tags, variants) = pairs.into_iter().unzip();
        let key = key.expect("at least two variants");
        self.push(Node::Tagged { key, tags, variants }, path).map(Some)
    }

    /// Two alternatives of one class as one node, if one contains the other (or both are
    /// literal sets); `None` when they cannot merge.
    fn merge(&mut self, a: NodeId, b: NodeId, one_of: bool, path: &str) -> Result<Option<NodeId>> {
        if a == b {
            return Ok(Some(a));
        }
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        if let (Node::Literals(x), Node::Literals(y)) = (na, nb) {
            if one_of && x.iter().any(|t| y.contains(t)) {
                return Ok(None);
            }
            let mut all: Vec<Box<[u8]>> = x.iter().chain(y.iter()).cloned().collect();
            all.sort();
            all.dedup();
            return self.push(Node::Literals(all), path).map(Some);
        }
        if one_of {
            return Ok(None);
        }
        let contains = |big: &Node, small: &Node| match (big, small) {
            (Node::Any, _) => true,
            (Node::Number, Node::Integer { .. } | Node::Decimal(_)) => true,
            (Node::Number, Node::Literals(_)) => true,
            (Node::Integer { lo, hi }, Node::Literals(l)) => l.iter().all(|t| {
                std::str::from_utf8(t).ok().and_then(|s| s.parse::<i128>().ok()).is_some_and(|v| *lo <= v && v <= *hi)
            }),
            (Node::String { min: 0, max: u32::MAX }, Node::Literals(_) | Node::Pattern(_)) => true,
            _ => false,
        };
        Ok(if contains(na, nb) {
            Some(a)
        } else if contains(nb, na) {
            Some(b)
        } else {
            None
        })
    }
}

/// The pattern a string `format` is written with, for the formats strict validators (and
/// OpenAI's structured outputs) check: RFC 3339 dates and times, UUIDs, IPv4 addresses, and
/// e-mail addresses of the plain `local@domain.tld` kind. Other formats stay annotations.
fn format_pattern(format: &str) -> Option<&'static str> {
    // years 0001-9999; each month's days (February to the 28th: every date written is valid
    // without a leap-year rule, strict parsers like Python's accept it)
    const DATE: &str = "([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))";
    const TIME: &str = "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])";
    static DATE_TIME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static DATE_ONLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static TIME_ONLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Some(match format {
        "date-time" => DATE_TIME.get_or_init(|| format!("^{DATE}T{TIME}$")),
        "date" => DATE_ONLY.get_or_init(|| format!("^{DATE}$")),
        "time" => TIME_ONLY.get_or_init(|| format!("^{TIME}$")),
        "uuid" => "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        "ipv4" => "^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$",
        "email" => "^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}$",
        _ => return None,
    })
}

/// The type a schema without `type` has, from its keywords.
fn infer_type(obj: &Map<String, Value>) -> Option<&'static str> {
    let has = |ks: &[&str]| ks.iter().any(|k| obj.contains_key(*k));
    if has(&["properties", "additionalProperties", "required"]) {
        Some("object")
    } else if has(&["items", "prefixItems", "minItems", "maxItems", "additionalItems"]) {
        Some("array")
    } else if has(&["minLength", "maxLength"]) {
        Some("string")
    } else if has(&["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]) {
        Some("number")
    } else {
        None
    }
}

/// The one class a schema's values start as, judged from its keywords (for a `$ref` target,
/// before it is compiled); `None` when it could be several.
fn shallow_class(root: &Value, v: &Value, depth: usize) -> Option<Class> {
    let obj = v.as_object()?;
    if depth > 32 {
        return None;
    }
    if let Some(r) = obj.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix('#')) {
        return shallow_class(root, root.pointer(r)?, depth + 1);
    }
    if let Some([one]) = obj.get("allOf").and_then(|a| a.as_array()).map(|a| a.as_slice()) {
        return shallow_class(root, one, depth + 1);
    }
    if obj.contains_key("anyOf") || obj.contains_key("oneOf") || obj.contains_key("enum") || obj.contains_key("const") {
        return None;
    }
    if obj.get("nullable") == Some(&Value::Bool(true)) {
        return None;
    }
    let t = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return None,
        None => infer_type(obj)?,
    };
    Some(match t {
        "object" => Class::Object,
        "array" => Class::Array,
        "string" => Class::String,
        "number" | "integer" => Class::Number,
        "boolean" => Class::Bool,
        "null" => Class::Null,
        _ => return None,
    })
}

fn value_has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// A non-negative count keyword (`minLength`, `maxItems`, ...), saturated to u32.
fn count(obj: &Map<String, Value>, k: &str, path: &str) -> Result<Option<u32>> {
    match obj.get(k) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n.min(u32::MAX as u64) as u32)),
            None => match v.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(Some(f.min(u32::MAX as f64) as u32)),
                _ => err(&format!("{path}/{k}"), format!("'{k}' must be a non-negative integer")),
            },
        },
    }
}

/// A number schema's bounds, if it has any (see [`int_bounds`] for the keywords).
fn number_bounds(obj: &Map<String, Value>, path: &str) -> Result<Option<decimal::Range>> {
    let flag = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    let mut r = decimal::Range::ALL;
    let mut any = false;
    for k in ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"] {
        let v = match obj.get(k) {
            None | Some(Value::Bool(_)) => continue,
            Some(Value::Number(n)) => n,
            Some(_) => return err(&format!("{path}/{k}"), format!("'{k}' must be a number")),
        };
        let Some(v) = decimal::parse_bound(v) else {
            return err(
                &format!("{path}/{k}"),
                format!("'{k}' {v}: bounds on numbers may have at most 18 digits before and after the point"),
            );
        };
        any = true;
        let excl = k.starts_with("exclusive")
            || (k == "minimum" && flag("exclusiveMinimum"))
            || (k == "maximum" && flag("exclusiveMaximum"));
        if k.ends_with("inimum") {
            if v > r.lo || (v == r.lo && excl) {
                (r.lo, r.lo_open) = (v, excl);
            }
        } else if v < r.hi || (v == r.hi && excl) {
            (r.hi, r.hi_open) = (v, excl);
        }
    }
    if r.lo > r.hi || (r.lo == r.hi && (r.lo_open || r.hi_open)) {
        return err(path, "no number lies within 'minimum' / 'maximum'");
    }
    Ok(any.then_some(r))
}

/// An integer schema's inclusive bounds (draft 6+ numeric `exclusiveMinimum` / `exclusiveMaximum`,
/// or draft 4's booleans beside `minimum` / `maximum`).
fn int_bounds(obj: &Map<String, Value>, path: &str) -> Result<(i128, i128)> {
    let num = |k: &str| -> Result<Option<f64>> {
        match obj.get(k) {
            None | Some(Value::Bool(_)) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => err(&format!("{path}/{k}"), format!("'{k}' must be a number")),
            },
        }
    };
    let flag = |k: &str| obj.get(k) == Some(&Value::Bool(true));
    // f64 bounds beyond +-2^100 are as good as none
    let clamp = |f: f64| (f.clamp(-(UNBOUNDED as f64), UNBOUNDED as f64)) as i128;
    let mut lo = -UNBOUNDED;
    let mut hi = UNBOUNDED;
    if let Some(m) = num("minimum")? {
        lo = lo.max(if flag("exclusiveMinimum") { clamp(m.floor()) + 1 } else { clamp(m.ceil()) });
    }
    if let Some(m) = num("exclusiveMinimum")? {
        lo = lo.max(clamp(m.floor()) + 1);
    }
    if let Some(m) = num("maximum")? {
        hi = hi.min(if flag("exclusiveMaximum") { clamp(m.ceil()) - 1 } else { clamp(m.floor()) });
    }
    if let Some(m) = num("exclusiveMaximum")? {
        hi = hi.min(clamp(m.ceil()) - 1);
    }
    if lo > hi {
        return err(path, "no integer lies within 'minimum' / 'maximum'");
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests;
