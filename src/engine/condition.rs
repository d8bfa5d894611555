//! Workflow conditions: CEL expressions compiled once, evaluated against a per-event [`Scope`].
//!
//! A condition may read three variables:
//!
//! - `event`: the CloudEvents attributes `event.id`, `event.type`, `event.source`, `event.time`
//!   (absent when the event has none) and `event.tenant`, all strings;
//! - `data`: the event's JSON body, e.g. `data.member.status`;
//! - `steps`: outputs of earlier steps, e.g. `steps.fetch.output.title`.
//!
//! # Why the field paths
//!
//! Evaluating a compiled program takes about a microsecond, but converting a 1 KB JSON body into
//! CEL values takes ten times that. So [`Condition::compile`] walks the parsed expression and
//! records the *selection paths* it reads (`data.member.status` → `["data", "member", "status"]`;
//! an index or a method call on a path stops it there, and the whole subtree is taken). The
//! evaluator unions the paths of every candidate workflow of an event in a [`FieldPaths`], builds
//! one [`Scope`] from just those subtrees, and evaluates each condition against it:
//!
//! ```
//! use weir::engine::condition::{Condition, FieldPaths, Scope};
//! # let event: weir::envelope::Event = serde_json::from_value(serde_json::json!({
//! #     "id": "e-1", "source": "/s", "type": "member.created", "tenant": "t-1",
//! #     "data": {"member": {"status": "paid", "bio": "long text that is never converted"}}})).unwrap();
//! let paid = Condition::compile(r#"data.member.status == "paid""#).unwrap();
//! let mut paths = FieldPaths::new();
//! paths.add(&paid); // once per candidate workflow
//! let scope = Scope::build(&event, None, &paths); // once per event
//! assert!(paid.evaluate(&scope).unwrap());
//! ```
//!
//! Missing fields stay absent in the scope, so `has(data.member.paid)` is `false` when the event
//! lacks the field, and reading it directly is an error. A scope must be built from paths that
//! include the condition's own; the pruned values are otherwise exactly what the full event would
//! give the expression.
//!
//! Compile time refuses what would only fail later: variables other than the three above, event
//! attributes other than the five, functions the interpreter does not have, and constructs it
//! cannot evaluate (message literals, optional selection).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, OnceLock},
};

use cel::{
    common::{
        ast::{operators, EntryExpr, Expr, IdedExpr},
        types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt},
        value::Val,
    },
    Context, ExecutionError, Program, Value,
};
use serde_json::Value as Json;

use crate::{engine::contain, envelope::Event};

/// The variables a condition may read.
pub(crate) const VARIABLES: [&str; 3] = ["event", "data", "steps"];

/// The attributes `event` carries.
pub(crate) const EVENT_ATTRIBUTES: [&str; 6] = ["id", "type", "source", "time", "tenant", "subject"];

/// Longest condition accepted, in bytes. The parser and the interpreter recurse over the
/// expression, so its size is what bounds their stack use and the time one evaluation takes
/// (the interpreter has no instruction budget); real conditions are a few hundred bytes.
pub(crate) const MAX_CONDITION_BYTES: usize = 4096;

/// Deepest nesting of a condition's syntax tree (`a + b + c` is three deep, `f(g(x))` three,
/// `data.a.b` three). The interpreter evaluates recursively on the stage's own thread, whose
/// stack (2 MiB) holds about 50 levels in an unoptimised build: a test evaluates the deepest
/// conditions accepted on such a stack.
pub(crate) const MAX_DEPTH: usize = 32;

/// Most comprehension macros (`all`, `exists`, `exists_one`, `map`, `filter`) nested in one
/// another. Each level multiplies the work by the length of the list it iterates, so
/// `data.a.all(x, data.a.all(y, data.a.all(z, …)))` over a long list is refused at load time.
pub(crate) const MAX_COMPREHENSION_NESTING: usize = 2;

/// The parser runs on a thread of its own with this much stack: in an unoptimised build the
/// generated parser uses about 150 KB of stack per nested parenthesis, more than the 2 MiB of
/// the threads that load definitions. (Reserved address space; only what is used is committed.)
const PARSER_STACK: usize = 64 << 20;

/// Functions of the `cel` crate's standard environment (a test checks each against the
/// interpreter).
const FUNCTIONS: &[&str] = &[
    "contains",
    "size",
    "startsWith",
    "endsWith",
    "string",
    "bytes",
    "bool",
    "double",
    "int",
    "uint",
    "dyn",
    "type",
    "matches",
    "duration",
    "timestamp",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
];

/// Operators the interpreter evaluates itself (they never reach the function table).
const OPERATORS: &[&str] = &[
    operators::CONDITIONAL,
    operators::LOGICAL_AND,
    operators::LOGICAL_OR,
    operators::LOGICAL_NOT,
    operators::SUBSTRACT,
    operators::ADD,
    operators::MULTIPLY,
    operators::DIVIDE,
    operators::MODULO,
    operators::EQUALS,
    operators::NOT_EQUALS,
    operators::GREATER_EQUALS,
    operators::LESS_EQUALS,
    operators::GREATER,
    operators::LESS,
    operators::NEGATE,
    operators::INDEX,
    operators::NOT_STRICTLY_FALSE,
    operators::IN,
];

/// Evaluation error messages are cut here: the interpreter prints whole values into some of them.
const MAX_MESSAGE: usize = 400;

/// Why a condition did not compile or evaluate. Every variant quotes the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionError {
    /// `position` is the (line, column) in the expression, both from 1, where the parser gives one.
    #[error("invalid condition `{expr}`: {message}")]
    Syntax { expr: String, message: String, position: Option<(usize, usize)> },
    #[error("condition `{expr}` uses unknown variable `{name}` (allowed: {})", VARIABLES.join(", "))]
    UnknownVariable { expr: String, name: String },
    #[error(
        "condition `{expr}` reads unknown event attribute `event.{name}` (allowed: {})",
        EVENT_ATTRIBUTES.map(|a| format!("event.{a}")).join(", ")
    )]
    UnknownAttribute { expr: String, name: String },
    #[error("condition `{expr}` calls unknown function `{name}`")]
    UnknownFunction { expr: String, name: String },
    #[error("condition `{expr}` uses {what}, which is not supported")]
    Unsupported { expr: String, what: &'static str },
    /// Longer or more deeply nested than the limits above.
    #[error("condition `{expr}` is too large: {what}")]
    TooLarge { expr: String, what: String },
    #[error("condition `{expr}` failed: {message}")]
    Evaluation { expr: String, message: String },
    #[error("condition `{expr}` returned {kind}, expected bool")]
    NotBool { expr: String, kind: String },
}

impl ConditionError {
    /// Where in the expression the error is, (line, column) from 1, when known.
    pub(crate) fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConditionError::Syntax { position, .. } => *position,
            _ => None,
        }
    }
}

/// A compiled CEL condition and the field paths it reads.
#[derive(Clone)]
pub struct Condition {
    program: Arc<Program>,
    source: String,
    paths: FieldPaths,
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition").field("source", &self.source).field("paths", &self.paths).finish()
    }
}

impl Condition {
    /// Parses and checks `source`, and records the paths it reads. Never panics: whatever the
    /// parser makes of the text, the answer is a condition or an error that says what is wrong.
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        let expr = || source.chars().take(200).collect::<String>() + if source.len() > 200 { "…" } else { "" };
        if source.len() > MAX_CONDITION_BYTES {
            return Err(ConditionError::TooLarge {
                expr: expr(),
                what: format!("{} bytes, more than {MAX_CONDITION_BYTES}", source.len()),
            });
        }
        // Parsing and the checks run on a thread with a large stack, and anything refused is
        // dropped there too (dropping a syntax tree recurses as deep as it is).
        let parse = || -> Result<(Program, FieldPaths), ConditionError> {
            let program = match contain(|| Program::compile(source)) {
                Ok(Ok(program)) => program,
                Ok(Err(errors)) => {
                    let first = errors.errors.first();
                    return Err(ConditionError::Syntax {
                        expr: source.to_string(),
                        message: errors
                            .errors
                            .iter()
                            .map(|e| format!("{} at {}:{}", e.msg, e.pos.0, e.pos.1))
                            .collect::<Vec<_>>()
                            .join("; "),
                        // The parser counts lines and columns from 1.
                        position: first
                            .filter(|e| e.pos.0 >= 1 && e.pos.1 >= 1)
                            .map(|e| (e.pos.0 as usize, e.pos.1 as usize)),
                    });
                }
                Err(panic) => {
                    return Err(ConditionError::Syntax {
                        expr: source.to_string(),
                        message: truncate(format!("the parser could not make sense of it ({panic})")),
                        position: None,
                    })
                }
            };
            let mut walk = Walk { source, bound: Vec::new(), paths: FieldPaths::new(), depth: 0, comprehensions: 0 };
            walk.expr(program.expression())?;
            Ok((program, walk.paths))
        };
        let (program, paths) = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("weir-cel-parse".into())
                .stack_size(PARSER_STACK)
                .spawn_scoped(scope, parse)
                .map_err(|e| ConditionError::Syntax {
                    expr: source.to_string(),
                    message: format!("could not start the parser thread ({e}); retry the load"),
                    position: None,
                })?
                .join()
                .unwrap_or_else(|_| {
                    Err(ConditionError::Syntax {
                        expr: source.to_string(),
                        message: "the parser failed on it".into(),
                        position: None,
                    })
                })
        })?;
        Ok(Condition { program: Arc::new(program), source: source.to_string(), paths })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The paths the condition reads, each starting with `event`, `data` or `steps`.
    pub fn paths(&self) -> Vec<Vec<String>> {
        self.paths.paths()
    }

    /// Evaluates against a scope built from paths that include this condition's.
    pub fn evaluate(&self, scope: &Scope) -> Result<bool, ConditionError> {
        // A panic in the interpreter on some input must come back as that event's error, never
        // take the stage down with it.
        match contain(|| self.program.execute(&scope.context)) {
            Ok(Ok(Value::Bool(b))) => Ok(b),
            Ok(Ok(other)) => {
                Err(ConditionError::NotBool { expr: self.source.clone(), kind: other.type_of().to_string() })
            }
            Ok(Err(e)) => Err(ConditionError::Evaluation { expr: self.source.clone(), message: describe(&e) }),
            Err(panic) => Err(ConditionError::Evaluation {
                expr: self.source.clone(),
                message: truncate(format!("the interpreter cannot evaluate this input ({panic})")),
            }),
        }
    }
}

fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(key) => format!("no such field `{key}`"),
        ExecutionError::UndeclaredReference(name) if VARIABLES.contains(&name.as_str()) => {
            format!("`{name}` is not in the scope (build it with FieldPaths that include this condition)")
        }
        ExecutionError::ValuesNotComparable(a, b) => format!("cannot compare {} with {}", preview(a), preview(b)),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
            format!("cannot apply '{op}' to {} and {}", preview(a), preview(b))
        }
        ExecutionError::NoSuchOverload(overload) => {
            // Operators are named `_+_`, `!_`, `_[_]`: show them as written.
            let name = overload.function();
            let shown = if name.contains('_') && !name.chars().any(|c| c.is_ascii_alphanumeric()) {
                name.replace('_', "")
            } else {
                name.to_string()
            };
            truncate(format!("cannot apply '{shown}' to ({})", overload.argument_types().join(", ")))
        }
        other => truncate(other.to_string()),
    }
}

/// A value's type and, for scalars, a short rendering (the interpreter's own messages print whole
/// maps).
fn preview(value: &Value) -> String {
    let kind = value.type_of();
    match value {
        Value::List(items) => format!("a list of {} items", items.len()),
        Value::Map(map) => format!("a map of {} entries", map.map.len()),
        Value::String(s) if s.chars().count() > 40 => {
            format!("{kind} {:?}…", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("{kind} {s:?}"),
        Value::Int(i) => format!("{kind} {i}"),
        Value::UInt(u) => format!("{kind} {u}"),
        Value::Float(f) => format!("{kind} {f}"),
        Value::Bool(b) => format!("{kind} {b}"),
        Value::Null => "null".to_string(),
        _ => kind.to_string(),
    }
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// Walks the syntax tree: checks names and collects paths.
struct Walk<'a> {
    source: &'a str,
    /// Comprehension variables in scope (`x` in `list.all(x, …)`, the macros' accumulators).
    bound: Vec<String>,
    paths: FieldPaths,
    /// Nesting of the node being walked, and of comprehensions around it.
    depth: usize,
    comprehensions: usize,
}

impl Walk<'_> {
    fn expr(&mut self, e: &IdedExpr) -> Result<(), ConditionError> {
        self.depth += 1;
        let checked = self.node(e);
        self.depth -= 1;
        checked
    }

    fn node(&mut self, e: &IdedExpr) -> Result<(), ConditionError> {
        if self.depth > MAX_DEPTH {
            return Err(self.too_deep());
        }
        if let Some(path) = self.path(e)? {
            // `data.a.b` is a chain of selections, as deep as it is long.
            if self.depth + path.len() - 1 > MAX_DEPTH {
                return Err(self.too_deep());
            }
            return self.record(path);
        }
        match &e.expr {
            Expr::Literal(_) | Expr::Ident(_) => Ok(()), // a bound identifier; `path` handled the rest
            Expr::Select(select) => self.expr(&select.operand),
            Expr::Call(call) => {
                let name = call.func_name.as_str();
                if name == operators::OPT_SELECT || name == operators::OPT_INDEX {
                    return Err(self.unsupported("optional selection"));
                }
                if !OPERATORS.contains(&name) && !FUNCTIONS.contains(&name) {
                    return Err(ConditionError::UnknownFunction {
                        expr: self.source.to_string(),
                        name: name.to_string(),
                    });
                }
                if let Some(target) = &call.target {
                    self.expr(target)?;
                }
                call.args.iter().try_for_each(|a| self.expr(a))
            }
            Expr::List(list) if !list.optional_indices.is_empty() => Err(self.unsupported("optional elements")),
            Expr::List(list) => list.elements.iter().try_for_each(|e| self.expr(e)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(m) if m.optional => Err(self.unsupported("optional entries")),
                EntryExpr::MapEntry(m) => {
                    self.expr(&m.key)?;
                    self.expr(&m.value)
                }
                EntryExpr::StructField(_) => Err(self.unsupported("a message field")),
            }),
            Expr::Comprehension(c) => {
                self.expr(&c.iter_range)?;
                self.expr(&c.accu_init)?;
                if self.comprehensions == MAX_COMPREHENSION_NESTING {
                    return Err(ConditionError::TooLarge {
                        expr: self.source.to_string(),
                        what: format!(
                            "more than {MAX_COMPREHENSION_NESTING} nested macros (all, exists, exists_one, map, filter)"
                        ),
                    });
                }
                let depth = self.bound.len();
                self.bound.push(c.iter_var.clone());
                self.bound.extend(c.iter_var2.iter().cloned());
                self.bound.push(c.accu_var.clone());
                self.comprehensions += 1;
                let body = [&c.loop_cond, &c.loop_step, &c.result].into_iter().try_for_each(|e| self.expr(e));
                self.comprehensions -= 1;
                self.bound.truncate(depth);
                body
            }
            Expr::Struct(_) => Err(self.unsupported("a message literal")),
            Expr::Unspecified => Err(self.unsupported("an empty expression")),
        }
    }

    /// The path `e` selects, if it is a chain of field selections on one of the variables.
    fn path(&self, e: &IdedExpr) -> Result<Option<Vec<String>>, ConditionError> {
        match &e.expr {
            Expr::Ident(name) if self.bound.iter().any(|b| b == name) => Ok(None),
            Expr::Ident(name) if VARIABLES.contains(&name.as_str()) => Ok(Some(vec![name.clone()])),
            Expr::Ident(name) => {
                Err(ConditionError::UnknownVariable { expr: self.source.to_string(), name: name.clone() })
            }
            Expr::Select(select) => Ok(self.path(&select.operand)?.map(|mut path| {
                path.push(select.field.clone());
                path
            })),
            _ => Ok(None),
        }
    }

    fn record(&mut self, path: Vec<String>) -> Result<(), ConditionError> {
        if path[0] == "event" {
            if let Some(attribute) = path.get(1) {
                if !EVENT_ATTRIBUTES.contains(&attribute.as_str()) {
                    return Err(ConditionError::UnknownAttribute {
                        expr: self.source.to_string(),
                        name: attribute.clone(),
                    });
                }
            }
        }
        self.paths.insert(&path);
        Ok(())
    }

    fn too_deep(&self) -> ConditionError {
        ConditionError::TooLarge {
            expr: self.source.to_string(),
            what: format!("nested more than {MAX_DEPTH} levels deep"),
        }
    }

    fn unsupported(&self, what: &'static str) -> ConditionError {
        ConditionError::Unsupported { expr: self.source.to_string(), what }
    }
}

/// A merged set of field paths: a prefix subsumes its extensions (`data.member` covers
/// `data.member.status`), and duplicates collapse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPaths {
    /// Variable name → what of it is selected.
    roots: BTreeMap<String, Selection>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selection {
    /// The whole subtree.
    All,
    /// Only these fields (never empty).
    Fields(BTreeMap<String, Selection>),
}

impl FieldPaths {
    pub const fn new() -> FieldPaths {
        FieldPaths { roots: BTreeMap::new() }
    }

    /// Every variable whole: what a scope without pruning holds.
    pub fn all() -> FieldPaths {
        FieldPaths { roots: VARIABLES.iter().map(|v| (v.to_string(), Selection::All)).collect() }
    }

    /// Adds the paths `condition` reads.
    pub fn add(&mut self, condition: &Condition) {
        self.extend(&condition.paths);
    }

    /// Adds `other`'s paths.
    pub fn extend(&mut self, other: &FieldPaths) {
        for (name, selection) in &other.roots {
            match self.roots.get_mut(name) {
                Some(mine) => mine.merge(selection),
                None => {
                    self.roots.insert(name.clone(), selection.clone());
                }
            }
        }
    }

    /// Adds one path (its first element names the variable); an empty path adds nothing.
    pub fn insert<S: AsRef<str>>(&mut self, path: &[S]) {
        let Some((root, rest)) = path.split_first() else { return };
        let mut node = self.roots.entry(root.as_ref().to_string()).or_insert_with(|| Selection::new(rest.is_empty()));
        for (i, field) in rest.iter().enumerate() {
            let Selection::Fields(fields) = node else { return };
            let last = i + 1 == rest.len();
            node = fields.entry(field.as_ref().to_string()).or_insert_with(|| Selection::new(last));
        }
        *node = Selection::All;
    }

    /// The paths, sorted.
    pub fn paths(&self) -> Vec<Vec<String>> {
        fn collect(prefix: &mut Vec<String>, selection: &Selection, out: &mut Vec<Vec<String>>) {
            match selection {
                Selection::All => out.push(prefix.clone()),
                Selection::Fields(fields) => {
                    for (name, child) in fields {
                        prefix.push(name.clone());
                        collect(prefix, child, out);
                        prefix.pop();
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (name, selection) in &self.roots {
            collect(&mut vec![name.clone()], selection, &mut out);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Whether any path starts with the variable `root`.
    pub fn reads(&self, root: &str) -> bool {
        self.roots.contains_key(root)
    }

    /// Parses from the JSON text `json` (the value of variable `root`, e.g. an event's `data`)
    /// only what the paths select under `root`, skipping the rest without building it; `Null`
    /// when no path reads `root`. What is kept is what [`Scope::build`] would select from the
    /// whole value, so an expression or template reading only these paths sees no difference.
    pub fn parse_selected(&self, root: &str, json: &str) -> serde_json::Result<Json> {
        let Some(selection) = self.roots.get(root) else { return Ok(Json::Null) };
        let mut de = serde_json::Deserializer::from_str(json);
        let value = serde::de::DeserializeSeed::deserialize(selection, &mut de)?;
        de.end()?;
        Ok(value)
    }
}

/// Parsing a selection's part of a JSON value (see [`FieldPaths::parse_selected`]).
impl<'de> serde::de::DeserializeSeed<'de> for &Selection {
    type Value = Json;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Json, D::Error> {
        match self {
            Selection::All => serde::Deserialize::deserialize(de),
            Selection::Fields(fields) => de.deserialize_any(SelectFields(fields)),
        }
    }
}

/// An object keeps only the selected fields; any other value is taken whole (as [`select`] does).
struct SelectFields<'s>(&'s BTreeMap<String, Selection>);

impl<'de> serde::de::Visitor<'de> for SelectFields<'_> {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(field) = map.next_key_seed(SelectedKey(self.0))? {
            match field {
                Some((name, child)) => {
                    out.insert(name.clone(), map.next_value_seed(child)?);
                }
                None => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Json::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
}

/// An object key: the selected field it names, if any, without allocating for the others.
struct SelectedKey<'s>(&'s BTreeMap<String, Selection>);

impl<'de, 's> serde::de::DeserializeSeed<'de> for SelectedKey<'s> {
    type Value = Option<(&'s String, &'s Selection)>;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de, 's> serde::de::Visitor<'de> for SelectedKey<'s> {
    type Value = Option<(&'s String, &'s Selection)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.get_key_value(key))
    }
}

impl Selection {
    fn new(whole: bool) -> Selection {
        if whole {
            Selection::All
        } else {
            Selection::Fields(BTreeMap::new())
        }
    }

    fn merge(&mut self, other: &Selection) {
        match (&mut *self, other) {
            (Selection::All, _) => {}
            (_, Selection::All) => *self = Selection::All,
            (Selection::Fields(mine), Selection::Fields(theirs)) => {
                for (name, child) in theirs {
                    match mine.get_mut(name) {
                        Some(m) => m.merge(child),
                        None => {
                            mine.insert(name.clone(), child.clone());
                        }
                    }
                }
            }
        }
    }
}

/// The per-event CEL context: the selected parts of the event (and step outputs) as CEL values.
pub struct Scope {
    context: Context<'static, 'static>,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope").finish_non_exhaustive()
    }
}

/// The standard environment, built once; each scope is a child context holding only variables.
fn functions() -> &'static Context<'static, 'static> {
    static ROOT: OnceLock<Context<'static, 'static>> = OnceLock::new();
    ROOT.get_or_init(Context::default)
}

/// A CEL value as the interpreter holds it.
type Cel = Box<dyn Val>;

impl Scope {
    /// Converts the parts of `event` (and `steps`, the `{"<id>": {"output": …}}` object) that
    /// `paths` selects. A variable no path names is left out; `steps` is an empty map when absent.
    pub fn build(event: &Event, steps: Option<&Json>, paths: &FieldPaths) -> Scope {
        let mut context = functions().new_inner_scope();
        for (name, selection) in &paths.roots {
            let value = match name.as_str() {
                "event" => attributes(event, selection),
                "data" => select(&event.data, selection),
                "steps" => match steps {
                    Some(steps) => select(steps, selection),
                    None => map(HashMap::new()),
                },
                _ => continue,
            };
            context.add_variable_as_val(name.as_str(), value);
        }
        Scope { context }
    }
}

fn attributes(event: &Event, selection: &Selection) -> Cel {
    let wanted = |name: &str| match selection {
        Selection::All => true,
        Selection::Fields(fields) => fields.contains_key(name),
    };
    let mut entries = HashMap::with_capacity(EVENT_ATTRIBUTES.len());
    for (name, value) in [
        ("id", Some(&event.id)),
        ("type", Some(&event.kind)),
        ("source", Some(&event.source)),
        ("time", event.time.as_ref()),
        ("tenant", Some(&event.tenant)),
        ("subject", event.subject.as_ref()),
    ] {
        if let Some(value) = value.filter(|_| wanted(name)) {
            entries.insert(CelMapKey::from(name.to_string()), Box::new(CelString::from(value.clone())) as Cel);
        }
    }
    map(entries)
}

fn map(entries: HashMap<CelMapKey<'static>, Cel>) -> Cel {
    Box::new(CelMap::from(entries))
}

/// The selected part of `json`. Selected fields an object lacks stay absent; a value that is not
/// an object where fields are selected is taken whole (the expression then fails on it exactly as
/// it would on the full event).
fn select(json: &Json, selection: &Selection) -> Cel {
    match (json, selection) {
        (Json::Object(object), Selection::Fields(fields)) => {
            let mut entries = HashMap::with_capacity(fields.len());
            for (name, child) in fields {
                if let Some(value) = object.get(name) {
                    entries.insert(CelMapKey::from(name.clone()), select(value, child));
                }
            }
            map(entries)
        }
        _ => convert(json),
    }
}

fn convert(json: &Json) -> Cel {
    match json {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Box::new(CelInt::from(i)),
            (None, Some(u)) => Box::new(CelUInt::from(u)),
            _ => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        Json::String(s) => Box::new(CelString::from(s.clone())),
        Json::Array(items) => Box::new(CelList::from(items.iter().map(convert).collect::<Vec<_>>())),
        Json::Object(object) => map(object.iter().map(|(k, v)| (CelMapKey::from(k.clone()), convert(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(data: Json) -> Event {
        Event {
            specversion: "1.0".into(),
            id: "e-1".into(),
            source: "/ghost/site-1".into(),
            kind: "member.created".into(),
            time: None,
            tenant: "t-1".into(),
            subject: None,
            datacontenttype: None,
            data,
        }
    }

    fn paths_of(source: &str) -> Vec<Vec<String>> {
        Condition::compile(source).unwrap().paths()
    }

    fn p(path: &str) -> Vec<String> {
        path.split('.').map(String::from).collect()
    }

    /// A CEL value as a comparable [`Value`].
    fn value(v: &dyn Val) -> Value {
        Value::try_from(v).unwrap()
    }

    fn value_of(json: &Json) -> Value {
        value(&*convert(json))
    }

    /// Evaluates `source` against a scope built from its own paths.
    fn eval(source: &str, data: Json) -> Result<bool, ConditionError> {
        let condition = Condition::compile(source).unwrap();
        let mut paths = FieldPaths::new();
        paths.add(&condition);
        condition.evaluate(&Scope::build(&event(data), None, &paths))
    }

    #[test]
    fn paths_follow_selections_and_stop_at_indexes_and_calls() {
        assert_eq!(paths_of(r#"data.member.status == "paid""#), vec![p("data.member.status")]);
        assert_eq!(
            paths_of(r#"event.type == "x" && data.member.n > 2 && steps.fetch.output.title != """#),
            vec![p("data.member.n"), p("event.type"), p("steps.fetch.output.title")]
        );
        // Index and method call: the subtree up to there.
        assert_eq!(paths_of("data.items[0].price > 10"), vec![p("data.items")]);
        assert_eq!(paths_of(r#"data.member.email.endsWith("@example.com")"#), vec![p("data.member.email")]);
        assert_eq!(paths_of("size(data.tags) > 0"), vec![p("data.tags")]);
        // has() reads the field it tests.
        assert_eq!(paths_of("has(data.member.paid)"), vec![p("data.member.paid")]);
        // A prefix subsumes its extensions; duplicates collapse.
        assert_eq!(paths_of("data.member.n > 1 && data.member == {} && data.member.n < 9"), vec![p("data.member")]);
        // Comprehension variables are not paths (even when they shadow a variable's name).
        assert_eq!(paths_of("data.items.exists(i, i.price > 10)"), vec![p("data.items")]);
        assert_eq!(paths_of("data.items.all(data, data > 1) && event.id != ''"), vec![p("data.items"), p("event.id")]);
        assert_eq!(paths_of("size(data) > 0"), vec![p("data")]);
        assert_eq!(paths_of("1 < 2"), Vec::<Vec<String>>::new());
    }

    #[test]
    fn field_paths_merge_conditions() {
        let mut paths = FieldPaths::new();
        paths.add(&Condition::compile("data.a.b == 1 && data.c == 2").unwrap());
        paths.add(&Condition::compile("data.a.b.c == 1 && data.d == 2 && event.type == 'x'").unwrap());
        assert_eq!(paths.paths(), vec![p("data.a.b"), p("data.c"), p("data.d"), p("event.type")]);
        paths.add(&Condition::compile("data.a == {}").unwrap());
        assert_eq!(paths.paths(), vec![p("data.a"), p("data.c"), p("data.d"), p("event.type")]);
        paths.insert(&["data"]);
        assert_eq!(paths.paths(), vec![p("data"), p("event.type")]);
        paths.insert(&["data", "x"]);
        assert_eq!(paths.paths(), vec![p("data"), p("event.type")]);
        assert!(FieldPaths::new().is_empty());
        assert_eq!(FieldPaths::all().paths(), vec![p("data"), p("event"), p("steps")]);
    }

    #[test]
    fn evaluates_true_and_false() {
        let data = json!({"member": {"status": "paid", "n": 3, "tags": ["a", "b"], "paid": true}});
        assert_eq!(eval(r#"data.member.status == "paid""#, data.clone()), Ok(true));
        assert_eq!(eval(r#"data.member.status == "free""#, data.clone()), Ok(false));
        assert_eq!(eval("data.member.n > 2 && data.member.n < 4.5", data.clone()), Ok(true));
        assert_eq!(eval(r#""b" in data.member.tags && size(data.member.tags) == 2"#, data.clone()), Ok(true));
        assert_eq!(eval("data.member.tags.exists(t, t == 'c')", data.clone()), Ok(false));
        assert_eq!(eval("has(data.member.paid) && data.member.paid", data.clone()), Ok(true));

        let mut e = event(data);
        e.time = Some("2026-11-23T10:00:00Z".into());
        let c = Condition::compile(
            r#"event.type == "member.created" && event.tenant == "t-1" && event.time.startsWith("2026")"#,
        )
        .unwrap();
        let mut paths = FieldPaths::new();
        paths.add(&c);
        assert_eq!(c.evaluate(&Scope::build(&e, None, &paths)), Ok(true));
        let c = Condition::compile("has(event.time)").unwrap();
        e.time = None;
        assert_eq!(c.evaluate(&Scope::build(&e, None, &FieldPaths::all())), Ok(false));

        let steps = json!({"fetch": {"output": {"title": "Hello", "ok": true}}});
        let c = Condition::compile(r#"steps.fetch.output.ok && steps.fetch.output.title == "Hello""#).unwrap();
        let mut paths = FieldPaths::new();
        paths.add(&c);
        assert_eq!(c.evaluate(&Scope::build(&e, Some(&steps), &paths)), Ok(true));
        let err = c.evaluate(&Scope::build(&e, None, &paths)).unwrap_err();
        assert!(err.to_string().contains("no such field `fetch`"), "{err}");
    }

    #[test]
    fn missing_fields_are_errors_except_under_has() {
        let data = json!({"member": {"status": "paid"}});
        let err = eval("data.member.paid == true", data.clone()).unwrap_err();
        assert_eq!(err.to_string(), "condition `data.member.paid == true` failed: no such field `paid`", "{err:?}");
        assert_eq!(eval("has(data.member.paid)", data.clone()), Ok(false));
        assert_eq!(eval("!has(data.member.paid) || data.member.paid", data.clone()), Ok(true));
        assert_eq!(eval("has(data.member.status)", data.clone()), Ok(true));
        // has() on a missing parent is an error, as CEL specifies.
        assert!(eval("has(data.account.id)", data).is_err());
    }

    #[test]
    fn wrong_types_and_non_bool_results_are_errors() {
        let data = json!({"n": 3, "s": "x", "items": "not a list"});
        let err = eval(r#"data.n > "x""#, data.clone()).unwrap_err();
        assert!(matches!(err, ConditionError::Evaluation { .. }), "{err:?}");
        assert_eq!(err.to_string(), r#"condition `data.n > "x"` failed: cannot apply '>' to (int, string)"#);
        let err = eval(r#"data.n + "x" == data.items"#, data.clone()).unwrap_err();
        assert!(err.to_string().ends_with(r#"failed: cannot apply 'add' to int 3 and string "x""#), "{err}");
        let err = eval("data.n + 1", data.clone()).unwrap_err();
        assert_eq!(err.to_string(), "condition `data.n + 1` returned int, expected bool");
        assert!(eval("data.n / 0 == 1", data.clone()).is_err());
        assert!(eval("data.s.startsWith(1)", data.clone()).is_err());
        // A comprehension over a string (cel-interpreter 0.10 panicked on it).
        let err = eval("data.items.exists(i, i == 1)", data).unwrap_err();
        assert!(matches!(err, ConditionError::Evaluation { .. }), "{err}");
    }

    #[test]
    fn compile_refuses_what_cannot_work() {
        let err = Condition::compile("data.n > ").unwrap_err();
        assert!(matches!(err, ConditionError::Syntax { .. }));
        assert!(err.to_string().starts_with("invalid condition `data.n > `: "), "{err}");
        let err = Condition::compile("member.status == 'paid'").unwrap_err();
        assert_eq!(
            err.to_string(),
            "condition `member.status == 'paid'` uses unknown variable `member` (allowed: event, data, steps)"
        );
        // A comprehension variable is only bound inside its macro.
        let err = Condition::compile("data.items.all(i, i > 0) && i == 1").unwrap_err();
        assert!(matches!(&err, ConditionError::UnknownVariable { name, .. } if name == "i"), "{err}");
        let err = Condition::compile("event.kind == 'x'").unwrap_err();
        assert!(err.to_string().contains("unknown event attribute `event.kind`"), "{err}");
        assert!(err.to_string().contains("event.type"), "{err}");
        let err = Condition::compile("data.s.startswith('a')").unwrap_err();
        assert_eq!(err.to_string(), "condition `data.s.startswith('a')` calls unknown function `startswith`");
        assert!(Condition::compile("data.items.exists(i, i == 1, 2)").is_err());
    }

    #[test]
    fn listed_functions_exist_in_the_interpreter() {
        // Called without arguments, a function the interpreter has finds no overload; one it
        // does not have is an undeclared reference.
        let exists = |name: &str| {
            ["{name}()", "''.{name}()"].iter().any(|form| {
                let program = Program::compile(&form.replace("{name}", name)).unwrap();
                !matches!(program.execute(&Context::default()), Err(ExecutionError::UndeclaredReference(_)))
            })
        };
        for name in FUNCTIONS {
            assert!(exists(name), "{name}");
        }
        assert!(!exists("nope"));
    }

    #[test]
    fn scope_converts_only_selected_fields() {
        let data = json!({"member": {"status": "paid", "bio": "x".repeat(1000)}, "other": [1, 2, 3]});
        let mut paths = FieldPaths::new();
        paths.insert(&["data", "member", "status"]);
        paths.insert(&["data", "member", "missing"]);
        let scope = Scope::build(&event(data), None, &paths);
        let value = value(&*scope.context.get_variable("data").unwrap());
        assert_eq!(value, value_of(&json!({"member": {"status": "paid"}})));
        assert!(scope.context.get_variable("event").is_none());
    }

    #[test]
    fn parsing_only_the_selected_fields_keeps_what_the_scope_reads() {
        let data = json!({"member": {"status": "paid", "bio": "x".repeat(1000), "tags": [1, {"a": 2}]},
                          "other": [1, 2, 3], "n": 1.5});
        let text = data.to_string();
        let mut paths = FieldPaths::new();
        paths.insert(&["data", "member", "status"]);
        paths.insert(&["data", "member", "tags"]);
        paths.insert(&["data", "n", "deeper"]);
        paths.insert(&["event", "type"]);
        assert_eq!(
            paths.parse_selected("data", &text).unwrap(),
            json!({"member": {"status": "paid", "tags": [1, {"a": 2}]}, "n": 1.5})
        );
        assert_eq!(paths.parse_selected("steps", &text).unwrap(), Json::Null);
        assert_eq!(FieldPaths::all().parse_selected("data", &text).unwrap(), data);
        let err = paths.parse_selected("data", r#"{"member": {"status": "paid"}} trailing"#).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn conditions_and_scopes_can_cross_threads() {
        fn check<T: Send + Sync>() {}
        check::<Condition>();
        check::<ConditionError>();
        fn send<T: Send>() {}
        send::<Scope>();
    }

    /// cel-interpreter 0.10's parser panicked on these (antlr4rust `tree.rs:383 unreachable`).
    #[test]
    fn invalid_conditions_are_syntax_errors_with_a_position() {
        for (source, position) in [("data.x == ", (1, 11)), ("1 +", (1, 4)), ("((", (1, 3))] {
            let err = Condition::compile(source).unwrap_err();
            assert!(matches!(err, ConditionError::Syntax { .. }), "{source}: {err:?}");
            assert_eq!(err.position(), Some(position), "{source}: {err}");
            assert!(err.to_string().starts_with(&format!("invalid condition `{source}`: ")), "{err}");
        }
        let err = Condition::compile("data.a &&\n data.b == ").unwrap_err();
        assert_eq!(err.position(), Some((2, 12)), "{err}");
    }

    /// Shapes that nest as deep as they are long, each `n` levels deep.
    fn nested(shape: &str, n: usize) -> String {
        let wrap = |open: &str, core: &str, close: &str| format!("{}{core}{}", open.repeat(n), close.repeat(n));
        match shape {
            "plus" => format!("data.n{} > 0", " + 1".repeat(n)),
            "select" => format!("data{} == 1", ".a".repeat(n)),
            "index" => format!("data{} == 1", "['a']".repeat(n)),
            "parens" => wrap("(", "data.n", ") == 1"),
            "calls" => wrap("int(", "data.n", ") == 1"),
            "lists" => wrap("[", "data.n", "]") + " == []",
            "negation" => wrap("-(", "data.n", ")") + " == 1",
            "not" => wrap("!(", "data.b", ")"),
            "ternary" => format!("{}true", "data.b ? data.b : ".repeat(n)),
            "in" => wrap("(", "data.n", " in [1])") + " == true",
            "macros" => format!("data.l.all(x, data.l.exists(y, x == y{}))", " + y".repeat(n)),
            _ => unreachable!("{shape}"),
        }
    }

    const SHAPES: [&str; 11] =
        ["plus", "select", "index", "parens", "calls", "lists", "negation", "not", "ternary", "in", "macros"];

    #[test]
    fn size_and_nesting_are_bounded_at_compile_time() {
        let long = format!("data.s == '{}'", "x".repeat(MAX_CONDITION_BYTES));
        let err = Condition::compile(&long).unwrap_err();
        assert!(err.to_string().contains(&format!("more than {MAX_CONDITION_BYTES}")), "{err}");
        for shape in SHAPES {
            let err = Condition::compile(&nested(shape, MAX_DEPTH + 1)).unwrap_err();
            assert!(matches!(err, ConditionError::TooLarge { .. } | ConditionError::Syntax { .. }), "{shape}: {err}");
        }
        let err = Condition::compile(&nested("plus", 2 * MAX_DEPTH)).unwrap_err();
        assert!(err.to_string().ends_with(&format!("nested more than {MAX_DEPTH} levels deep")), "{err}");
        // Long but shallow is fine: `&&` and `||` chains are balanced.
        Condition::compile(&vec!["data.n == 1"; 200].join(" || ")).unwrap();
        Condition::compile(&format!("data.s in [{}]", vec!["'abcdefgh'"; 300].join(", "))).unwrap();
        // Two nested macros are fine, three are not.
        Condition::compile("data.l.exists(x, data.l.all(y, x == y))").unwrap();
        let err =
            Condition::compile("data.l.exists(x, data.l.all(y, data.l.exists(z, x == y && y == z)))").unwrap_err();
        assert!(err.to_string().contains("more than 2 nested macros"), "{err}");
        // Chained (not nested) macros are fine.
        Condition::compile("data.l.map(x, x).filter(x, x > 1).map(x, x).all(x, x > 0)").unwrap();
    }

    /// The deepest condition of every shape that compiles evaluates on a stack the size of a
    /// tokio worker's (2 MiB), in this unoptimised build: an overflow here would abort the test
    /// binary, as it would abort the stage.
    #[test]
    fn the_deepest_accepted_conditions_evaluate_on_a_worker_sized_stack() {
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH + 2 {
            deep = json!({ "a": deep });
        }
        let data = json!({"n": 1, "b": true, "l": [1, 2, 3], "a": deep["a"]});
        let mut deepest = Vec::new();
        for shape in SHAPES {
            let n = (1..=MAX_DEPTH + 1).take_while(|&n| Condition::compile(&nested(shape, n)).is_ok()).last();
            let n = n.unwrap_or_else(|| panic!("{shape}: not even one level compiles"));
            assert!(n >= 5, "{shape}: only {n} levels");
            deepest.push(Condition::compile(&nested(shape, n)).unwrap());
        }
        let e = event(data);
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let scope = Scope::build(&e, None, &FieldPaths::all());
                for c in &deepest {
                    let _ = c.evaluate(&scope);
                }
                drop(deepest);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    const CONDITIONS: &[&str] = &[
        r#"data.member.status == "paid""#,
        "has(data.member.paid) && data.member.paid == true",
        "data.n > 3 || size(data.items) > 2",
        "data.items.exists(i, i == 1) && data.member.name.startsWith('a')",
        "data.n + 1 > data.m * 2 && data.n / data.m >= 0 && data.n % data.m == 0",
        "data.items[0] == data.member && -data.n < 0",
        r#""paid" in data.member || data.member.status in data.items"#,
        "data.items.map(x, x * 2).filter(y, y > 2).all(z, z != 0)",
        "steps.fetch.output.ok && int(data.n) >= uint(0) && string(data.n) == '1'",
        r#"data.member.email.matches("^a.*") && timestamp(data.member.at) > timestamp("2020-01-01T00:00:00Z")"#,
    ];

    fn arb_json() -> impl Strategy<Value = Json> {
        let key = prop_oneof![
            Just("member".to_string()),
            Just("status".to_string()),
            Just("paid".to_string()),
            Just("items".to_string()),
            Just("n".to_string()),
            Just("m".to_string()),
            Just("output".to_string()),
            Just("fetch".to_string()),
            "[a-z]{0,6}",
            ".{0,4}",
        ];
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            (-3i64..4).prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_filter_map("JSON has no NaN", |f| serde_json::Number::from_f64(f).map(Json::Number)),
            ".{0,12}".prop_map(Json::String),
            Just(Json::String("paid".into())),
            (0usize..100_000).prop_map(|n| Json::String("é".repeat(n))),
        ];
        let tree = leaf.prop_recursive(8, 128, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        });
        // Deep nesting on top, beyond what prop_recursive reaches (serde_json stops parsing at 128).
        (tree, 0usize..200, any::<bool>()).prop_map(|(mut value, depth, as_list)| {
            for _ in 0..depth {
                value = if as_list { json!([value]) } else { json!({ "member": value }) };
            }
            value
        })
    }

    /// Text that nests deeply or repeats: brackets, operators and macros, up to the size limit.
    fn arb_nested_source() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "(",
            ")",
            "[",
            "]",
            "{",
            "}",
            "data.",
            "a",
            ".a",
            "[0]",
            " + ",
            " == ",
            " && ",
            " ? ",
            " : ",
            "-",
            "!",
            "int(",
            ".all(x, ",
            ".exists(y, ",
            ".map(z, ",
            "x",
            "1",
            "'s'",
            ", ",
            " in ",
        ]);
        (prop::collection::vec(piece, 0..64), 1usize..80)
            .prop_map(|(pieces, times)| pieces.concat().repeat(times).chars().take(MAX_CONDITION_BYTES + 8).collect())
    }

    proptest! {
        /// Any text at all: compiled or refused, never a panic.
        #[test]
        fn arbitrary_text_never_panics(source in any::<String>()) {
            let _ = Condition::compile(&source);
        }

        /// Deep and repetitive text: compiled or refused, never a panic or a stack overflow, and
        /// what compiles evaluates (on this test thread's 2 MiB stack) to a value or an error.
        #[test]
        fn nested_sources_never_panic(source in arb_nested_source(), data in arb_json()) {
            if let Ok(c) = Condition::compile(&source) {
                let _ = c.evaluate(&Scope::build(&event(data), Some(&json!({})), &FieldPaths::all()));
            }
        }

        /// Any text compiles or is refused, never panics; what compiles evaluates without panicking.
        #[test]
        fn arbitrary_sources_never_panic(source in r#"[a-z.()\[\]{}<>=!&|+*/%?:,"' 0-9_-]{0,40}"#) {
            if let Ok(c) = Condition::compile(&source) {
                let e = event(json!({"a": {"b": 1}, "data": [1, "x"]}));
                let _ = c.evaluate(&Scope::build(&e, Some(&json!({})), &FieldPaths::all()));
            }
        }

        /// Parsing only the selected fields of a body's text gives the scope the whole body gives.
        #[test]
        fn selected_parse_agrees_with_the_full_body(data in arb_json()) {
            let mut paths = FieldPaths::new();
            for c in CONDITIONS {
                paths.add(&Condition::compile(c).unwrap());
            }
            let text = data.to_string();
            // Past serde_json's nesting limit the body is refused either way.
            if let Ok(full) = serde_json::from_str::<Json>(&text) {
                let selection = &paths.roots["data"];
                let parsed = paths.parse_selected("data", &text).unwrap();
                prop_assert_eq!(value(&*select(&parsed, selection)), value(&*select(&full, selection)));
            }
        }

        /// Any JSON body gives Ok or Err, never a panic; the pruned scope agrees with the full one.
        #[test]
        fn arbitrary_data_never_panics(data in arb_json(), steps in arb_json()) {
            let conditions: Vec<Condition> = CONDITIONS.iter().map(|c| Condition::compile(c).unwrap()).collect();
            let mut paths = FieldPaths::new();
            for c in &conditions {
                paths.add(c);
            }
            let e = event(data);
            let pruned = Scope::build(&e, Some(&steps), &paths);
            let full = Scope::build(&e, Some(&steps), &FieldPaths::all());
            for c in &conditions {
                let (a, b) = (c.evaluate(&pruned), c.evaluate(&full));
                // `exists` over a map walks its keys in hash order, so an error may surface in one
                // order and not the other; only values must agree.
                if let (Ok(a), Ok(b)) = (&a, &b) {
                    prop_assert_eq!(a, b, "{}", c.source());
                }
            }
        }
    }
}
