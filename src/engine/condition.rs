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
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, OnceLock},
};

use cel_interpreter::{
    objects::{Key, Map},
    Context, ExecutionError, Program, Value,
};
use cel_parser::ast::{operators, EntryExpr, Expr, IdedExpr};
use serde_json::Value as Json;

use crate::envelope::Event;

/// The variables a condition may read.
pub const VARIABLES: [&str; 3] = ["event", "data", "steps"];

/// The attributes `event` carries.
pub const EVENT_ATTRIBUTES: [&str; 5] = ["id", "type", "source", "time", "tenant"];

/// Functions of cel-interpreter 0.10's default context (checked by a test against the interpreter).
const FUNCTIONS: &[&str] = &[
    "contains",
    "size",
    "max",
    "min",
    "startsWith",
    "endsWith",
    "string",
    "bytes",
    "double",
    "int",
    "uint",
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
    #[error("invalid condition `{expr}`: {message}")]
    Syntax { expr: String, message: String },
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
    #[error("condition `{expr}` failed: {message}")]
    Evaluation { expr: String, message: String },
    #[error("condition `{expr}` returned {kind}, expected bool")]
    NotBool { expr: String, kind: String },
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
    /// Parses and checks `source`, and records the paths it reads.
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        let syntax = |e: cel_interpreter::ParseErrors| ConditionError::Syntax {
            expr: source.to_string(),
            message: e
                .errors
                .iter()
                .map(|e| format!("{} at {}:{}", e.msg, e.pos.0, e.pos.1))
                .collect::<Vec<_>>()
                .join("; "),
        };
        // The program keeps its syntax tree private, so the walk parses a second time (load time
        // only). The ANTLR-generated parser panics on some malformed input (`data.n > `): that is
        // a syntax error too, never a crash of whatever is loading the definition.
        let parsed =
            catch_unwind(AssertUnwindSafe(|| (Program::compile(source), cel_parser::Parser::default().parse(source))));
        let Ok((program, ast)) = parsed else {
            return Err(ConditionError::Syntax {
                expr: source.to_string(),
                message: "syntax error (the parser could not make sense of it)".into(),
            });
        };
        let program = program.map_err(syntax)?;
        let ast = ast.map_err(syntax)?;
        let mut walk = Walk { source, bound: Vec::new(), paths: FieldPaths::new() };
        walk.expr(&ast)?;
        Ok(Condition { program: Arc::new(program), source: source.to_string(), paths: walk.paths })
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
        // cel-interpreter 0.10 still has unfinished match arms (todo macros) for input it cannot handle (a comprehension
        // over a string, say); an event must never take the evaluator down with it.
        let outcome = catch_unwind(AssertUnwindSafe(|| self.program.execute(&scope.context)));
        match outcome {
            Ok(Ok(Value::Bool(b))) => Ok(b),
            Ok(Ok(other)) => {
                Err(ConditionError::NotBool { expr: self.source.clone(), kind: other.type_of().to_string() })
            }
            Ok(Err(e)) => Err(ConditionError::Evaluation { expr: self.source.clone(), message: describe(&e) }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown");
                Err(ConditionError::Evaluation {
                    expr: self.source.clone(),
                    message: truncate(format!("the interpreter cannot evaluate this input ({what})")),
                })
            }
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
        ExecutionError::UnsupportedUnaryOperator(op, a) => format!("cannot apply '{op}' to {}", preview(a)),
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
}

impl Walk<'_> {
    fn expr(&mut self, e: &IdedExpr) -> Result<(), ConditionError> {
        if let Some(path) = self.path(e)? {
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
            Expr::List(list) => list.elements.iter().try_for_each(|e| self.expr(e)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(m) => {
                    self.expr(&m.key)?;
                    self.expr(&m.value)
                }
                EntryExpr::StructField(_) => Err(self.unsupported("a message field")),
            }),
            Expr::Comprehension(c) => {
                self.expr(&c.iter_range)?;
                self.expr(&c.accu_init)?;
                let depth = self.bound.len();
                self.bound.push(c.iter_var.clone());
                self.bound.extend(c.iter_var2.iter().cloned());
                self.bound.push(c.accu_var.clone());
                let body = [&c.loop_cond, &c.loop_step, &c.result].into_iter().try_for_each(|e| self.expr(e));
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
    context: Context<'static>,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope").finish_non_exhaustive()
    }
}

/// The built-in functions, registered once; each scope is a child context holding only variables.
fn functions() -> &'static Context<'static> {
    static ROOT: OnceLock<Context<'static>> = OnceLock::new();
    ROOT.get_or_init(Context::default)
}

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
            context.add_variable_from_value(name.as_str(), value);
        }
        Scope { context }
    }
}

fn attributes(event: &Event, selection: &Selection) -> Value {
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
    ] {
        if let Some(value) = value.filter(|_| wanted(name)) {
            entries.insert(Key::from(name), Value::String(Arc::new(value.clone())));
        }
    }
    map(entries)
}

/// A CEL map from a hash map as is (`Map: From<HashMap>` would re-hash every entry).
fn map(entries: HashMap<Key, Value>) -> Value {
    Value::Map(Map { map: Arc::new(entries) })
}

/// The selected part of `json`. Selected fields an object lacks stay absent; a value that is not
/// an object where fields are selected is taken whole (the expression then fails on it exactly as
/// it would on the full event).
fn select(json: &Json, selection: &Selection) -> Value {
    match (json, selection) {
        (Json::Object(object), Selection::Fields(fields)) => {
            let mut entries = HashMap::with_capacity(fields.len());
            for (name, child) in fields {
                if let Some(value) = object.get(name) {
                    entries.insert(Key::String(Arc::new(name.clone())), select(value, child));
                }
            }
            map(entries)
        }
        _ => convert(json),
    }
}

fn convert(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(convert).collect())),
        Json::Object(object) => {
            map(object.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), convert(v))).collect())
        }
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
        assert_eq!(err.to_string(), r#"condition `data.n > "x"` failed: cannot compare int 3 with string "x""#);
        let err = eval(r#"data.n + "x" == data.items"#, data.clone()).unwrap_err();
        assert!(err.to_string().ends_with(r#"failed: cannot apply 'add' to int 3 and string "x""#), "{err}");
        let err = eval("data.n + 1", data.clone()).unwrap_err();
        assert_eq!(err.to_string(), "condition `data.n + 1` returned int, expected bool");
        assert!(eval("data.n / 0 == 1", data.clone()).is_err());
        assert!(eval("data.s.startsWith(1)", data.clone()).is_err());
        // The interpreter leaves this case unimplemented (a todo macro); it must come back as an error.
        let err = eval("data.items.exists(i, i == 1)", data).unwrap_err();
        assert!(err.to_string().contains("cannot evaluate"), "{err}");
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
        // `x.name` on a map without the key resolves to the function when the context has one.
        let program = |name: &str| Program::compile(&format!("x.{name}")).unwrap();
        let mut context = Context::default();
        context.add_variable_from_value("x", map(HashMap::new()));
        for name in FUNCTIONS {
            assert!(matches!(program(name).execute(&context), Ok(Value::Function(..))), "{name}");
        }
        assert!(program("nope").execute(&context).is_err());
    }

    #[test]
    fn scope_converts_only_selected_fields() {
        let data = json!({"member": {"status": "paid", "bio": "x".repeat(1000)}, "other": [1, 2, 3]});
        let mut paths = FieldPaths::new();
        paths.insert(&["data", "member", "status"]);
        paths.insert(&["data", "member", "missing"]);
        let scope = Scope::build(&event(data), None, &paths);
        let value = scope.context.get_variable("data").unwrap();
        let member = map(HashMap::from([(Key::from("status"), Value::from("paid"))]));
        assert_eq!(value, map(HashMap::from([(Key::from("member"), member)])));
        assert!(scope.context.get_variable("event").is_err());
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

    proptest! {
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
                prop_assert_eq!(select(&parsed, selection), select(&full, selection));
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
