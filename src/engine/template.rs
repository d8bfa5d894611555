//! Step inputs: a step's `input:` (any JSON/YAML value) whose strings may be minijinja templates,
//! compiled once when the workflow loads and rendered per run.
//!
//! Every string leaf containing `{{` or `{%` is a template; every other leaf is passed through as
//! is. Templates see one context, `{"event": {…attributes}, "data": {…}, "steps": {"<id>":
//! {"output": …}}}`, and render in two ways:
//!
//! - a leaf that is exactly one expression, `{{ expr }}` (whitespace inside the braces allowed,
//!   nothing outside them), renders to the expression's *native JSON value*: `{{ data.n }}` gives
//!   a number, `{{ steps.fetch.output }}` an object, `{{ data.name }}` a string;
//! - any other template (`"Hello {{ data.name }}!"`, `{% if … %}` blocks, two expressions) renders
//!   to a string.
//!
//! ```yaml
//! input:
//!   to: "{{ data.member.email }}"            # string (the field's value)
//!   count: "{{ data.items | length }}"       # number
//!   article: "{{ steps.fetch.output }}"      # object
//!   subject: "Welcome, {{ data.member.name }}!"
//!   retries: 3                               # literal
//! ```
//!
//! Undefined values are errors (minijinja's strict mode): `{{ data.missing }}` fails the render
//! instead of producing an empty string, and the error names the leaf (`input.subject`). Output is
//! never HTML-escaped, and a trailing newline (YAML's `|` blocks) is kept.
//!
//! Rendering is bounded ([`Bounds`]): each leaf may execute `template_fuel` instructions, and the
//! leaves of one input may produce `max_render_bytes` in all (measured as JSON). Past either, the
//! render fails with an error naming the limit, which fails that run; it never holds up the
//! stage for long, nor builds an unbounded value.

use std::{
    cell::Cell,
    collections::BTreeSet,
    fmt::{self, Write as _},
    io,
    sync::Arc,
};

use minijinja::{
    value::{Enumerator, Object, ObjectRepr},
    AutoEscape, Environment, ErrorKind, UndefinedBehavior,
};
use serde_json::{Map, Value as Json};

use crate::engine::{condition::FieldPaths, contain, Bounds};

/// The variable a single-expression leaf is assigned to, to read its value back natively.
const VALUE: &str = "weir_value";

/// Why an input could not be compiled or rendered. `path` is the leaf, e.g. `input.body.text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `position` is where in the leaf's text, (line, column) from 1, when minijinja says.
    #[error("{path}: invalid template: {message}")]
    Syntax { path: String, message: String, position: Option<(usize, usize)> },
    #[error("{path}: {message}")]
    Render { path: String, message: String },
}

impl TemplateError {
    /// The leaf's path, e.g. `input.body.text`.
    pub fn path(&self) -> &str {
        match self {
            TemplateError::Syntax { path, .. } | TemplateError::Render { path, .. } => path,
        }
    }

    /// Where in the leaf's text the error is, (line, column) from 1, when known.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            TemplateError::Syntax { position, .. } => *position,
            TemplateError::Render { .. } => None,
        }
    }
}

/// A step input with its templates compiled.
///
/// Each input has its own [`Environment`]: the templates are added to it as owned sources, named by
/// the JSON path of their leaf (so minijinja's own messages name the leaf too), and looked up by
/// that name when rendering. A shared environment would need a lock to add templates to (or
/// leaked sources), and templates of replaced workflow versions would pile up in it; with one per
/// input, dropping the workflow drops its templates. The cost is the built-in filter table per
/// input, a few kilobytes, paid at load.
#[derive(Clone)]
pub struct InputTemplate {
    env: Arc<Environment<'static>>,
    root: Node,
    steps: BTreeSet<String>,
    all_steps: bool,
    /// The parts of the event body the templates read, as paths from `data`.
    data: FieldPaths,
    /// [`Bounds::max_render_bytes`].
    max_bytes: usize,
}

#[derive(Debug, Clone)]
enum Node {
    /// A subtree without templates.
    Literal(Json),
    /// A template rendered to a string; the value is its name (the leaf's path).
    Text(String),
    /// A single expression rendered to its value; the value is its name (the leaf's path), and
    /// the expression as an attribute path when it is only that (see [`attribute_path`]).
    Native(String, Option<Vec<String>>),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl fmt::Debug for InputTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputTemplate").field("root", &self.root).field("steps", &self.steps).finish()
    }
}

impl InputTemplate {
    /// Compiles every template leaf of `input`, with the default [`Bounds`]; a syntax error
    /// names the leaf's path.
    pub fn compile(input: &Json) -> Result<InputTemplate, TemplateError> {
        Self::compile_bounded(input, "input", &Bounds::default())
    }

    /// Like [`Self::compile`], for a value found at `root` (e.g. `services.hook.connector.body`),
    /// so errors name the leaf from there.
    pub fn compile_at(input: &Json, root: &str) -> Result<InputTemplate, TemplateError> {
        Self::compile_bounded(input, root, &Bounds::default())
    }

    /// Like [`Self::compile_at`], rendering within `bounds`.
    pub fn compile_bounded(input: &Json, root: &str, bounds: &Bounds) -> Result<InputTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_keep_trailing_newline(true);
        env.set_fuel(Some(bounds.template_fuel));
        let root = compile_node(&mut env, input, &mut root.to_string())?;

        let mut steps = BTreeSet::new();
        let mut all_steps = false;
        let mut data = FieldPaths::new();
        for (_, template) in env.templates() {
            for variable in template.undeclared_variables(true) {
                match variable.strip_prefix("steps.") {
                    Some(rest) => {
                        steps.insert(rest.split('.').next().unwrap_or(rest).to_string());
                    }
                    None if variable == "steps" => all_steps = true,
                    None => {}
                }
                add_data_path(&mut data, &variable);
            }
        }
        Ok(InputTemplate { env: Arc::new(env), root, steps, all_steps, data, max_bytes: bounds.max_render_bytes })
    }

    /// Renders the input against `ctx` (usually `{"event": …, "data": …, "steps": {"<id>":
    /// {"output": …}}}`).
    pub fn render(&self, ctx: &Context) -> Result<Json, TemplateError> {
        match &self.root {
            Node::Literal(value) => Ok(value.clone()),
            root => self.render_node(root, &ctx.0, &Cell::new(self.max_bytes)),
        }
    }

    /// The step ids the templates read as `steps.<id>`, for checking that a step only reads steps
    /// it needs.
    pub fn references_steps(&self) -> BTreeSet<String> {
        self.steps.clone()
    }

    /// The parts of the event body (`data`, also seen as `event.data`) the templates read, as
    /// paths starting with `data`: rendering against a context whose body holds only these
    /// gives the same result as against the whole body.
    pub fn data_paths(&self) -> &FieldPaths {
        &self.data
    }

    /// Whether a template reads `steps` other than as `steps.<id>` (`steps["a-b"]`, a loop over
    /// `steps`): then [`Self::references_steps`] cannot name every step read.
    pub fn reads_steps_dynamically(&self) -> bool {
        self.all_steps
    }

    /// Renders `node`; `left` is what the input may still produce, in bytes of JSON.
    fn render_node(&self, node: &Node, ctx: &minijinja::Value, left: &Cell<usize>) -> Result<Json, TemplateError> {
        match node {
            Node::Literal(value) => Ok(value.clone()),
            Node::Text(name) => {
                let template = self.env.get_template(name).map_err(|e| render_error(name, "", &e))?;
                // Written into a buffer that refuses to grow past what is left, so a template
                // producing megabytes stops at the limit instead of after.
                let mut out = Limited { buf: Vec::new(), left: left.get(), keep: true };
                match template.render_captured_to(ctx, &mut out) {
                    Ok(_) => {}
                    Err(_) if out.left == usize::MAX => return Err(self.too_large(name)),
                    Err(e) => return Err(render_error(name, template.source(), &e)),
                }
                // The JSON string's quotes and escapes are not counted: the limit is approximate
                // by that much, never by the size of the text.
                left.set(out.left);
                Ok(Json::String(
                    String::from_utf8(out.buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                ))
            }
            Node::Native(name, path) => {
                // The common `{{ data.member.email }}` is a lookup: no need to start the engine. What
                // the lookup does not find goes through the engine after all, for its own error.
                if let Some(value) = path.as_deref().and_then(|path| lookup(ctx, path)) {
                    return self.charge(name, to_json(name, &value)?, left);
                }
                let template = self.env.get_template(name).map_err(|e| render_error(name, "", &e))?;
                let captured = template.render_captured(ctx).map_err(|e| {
                    let expr = single_expression(template.source()).unwrap_or_default();
                    render_error(name, &format!("{{{{{expr}}}}}"), &e)
                })?;
                let value = captured.state().lookup(VALUE).unwrap_or_default();
                if value.is_undefined() {
                    let expr = single_expression(template.source()).unwrap_or_default().trim();
                    return Err(TemplateError::Render {
                        path: name.clone(),
                        message: format!("`{expr}` is undefined"),
                    });
                }
                self.charge(name, to_json(name, &value)?, left)
            }
            Node::Array(items) => {
                items.iter().map(|n| self.render_node(n, ctx, left)).collect::<Result<_, _>>().map(Json::Array)
            }
            Node::Object(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for (key, node) in fields {
                    map.insert(key.clone(), self.render_node(node, ctx, left)?);
                }
                Ok(Json::Object(map))
            }
        }
    }

    /// Takes `value`'s size as JSON from what is left, or fails when it does not fit.
    fn charge(&self, name: &str, value: Json, left: &Cell<usize>) -> Result<Json, TemplateError> {
        let mut counter = Limited { buf: Vec::new(), left: left.get(), keep: false };
        serde_json::to_writer(&mut counter, &value).map_err(|_| self.too_large(name))?;
        left.set(counter.left);
        Ok(value)
    }

    fn too_large(&self, name: &str) -> TemplateError {
        TemplateError::Render {
            path: name.to_string(),
            message: format!(
                "the input renders to more than {} bytes, the limit (engine.max_render_bytes)",
                self.max_bytes
            ),
        }
    }
}

/// A writer that takes at most `left` bytes, then fails (and sets `left` to `usize::MAX` to say
/// why). Without `keep`, it only counts.
struct Limited {
    buf: Vec<u8>,
    left: usize,
    keep: bool,
}

impl io::Write for Limited {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if bytes.len() > self.left {
            self.left = usize::MAX;
            return Err(io::Error::other("output limit reached"));
        }
        self.left -= bytes.len();
        if self.keep {
            self.buf.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn compile_node(env: &mut Environment<'static>, value: &Json, path: &mut String) -> Result<Node, TemplateError> {
    let node = match value {
        Json::String(s) if s.contains("{{") || s.contains("{%") => {
            let syntax = |e: minijinja::Error| TemplateError::Syntax {
                path: path.clone(),
                message: message(&e),
                position: position(s, &e),
            };
            // A leaf that parses as one expression is assigned to a variable and read back as a
            // value; everything else is an ordinary template. Only a valid expression is rewritten,
            // so syntax errors always quote what the author wrote.
            match single_expression(s).filter(|expr| is_expression(env, expr)) {
                Some(expr) => {
                    env.add_template_owned(path.clone(), format!("{{% set {VALUE} = ({expr}) %}}")).map_err(syntax)?;
                    Node::Native(path.clone(), attribute_path(expr))
                }
                None => {
                    env.add_template_owned(path.clone(), s.clone()).map_err(syntax)?;
                    Node::Text(path.clone())
                }
            }
        }
        Json::Array(items) => {
            let mut nodes = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                nodes.push(compile_node(env, item, path)?);
                path.truncate(len);
            }
            Node::Array(nodes)
        }
        Json::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (key, item) in map {
                let len = path.len();
                push_key(path, key);
                fields.push((key.clone(), compile_node(env, item, path)?));
                path.truncate(len);
            }
            Node::Object(fields)
        }
        other => Node::Literal(other.clone()),
    };
    // Subtrees without templates collapse into one literal.
    Ok(match node {
        Node::Array(nodes) if nodes.iter().all(|n| matches!(n, Node::Literal(_))) => Node::Literal(value.clone()),
        Node::Object(fields) if fields.iter().all(|(_, n)| matches!(n, Node::Literal(_))) => {
            Node::Literal(value.clone())
        }
        node => node,
    })
}

/// The value of a rendered single expression, as JSON.
fn to_json(name: &str, value: &minijinja::Value) -> Result<Json, TemplateError> {
    serde_json::to_value(value)
        .map_err(|e| TemplateError::Render { path: name.to_string(), message: format!("the value is not JSON: {e}") })
}

/// `expr` as the attribute path it is, when it is nothing else: `data.member.email` (a context
/// variable, then names), not `data.items[0]`, `data.n + 1` or `data.x | upper`.
fn attribute_path(expr: &str) -> Option<Vec<String>> {
    let names: Vec<&str> = expr.trim().split('.').collect();
    let name = |s: &&str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    (["event", "data", "steps"].contains(&names[0]) && names.iter().all(name))
        .then(|| names.iter().map(|s| s.to_string()).collect())
}

/// What the engine would find at `path` in `ctx`, if it finds anything there.
fn lookup(ctx: &minijinja::Value, path: &[String]) -> Option<minijinja::Value> {
    let mut value = ctx.clone();
    for name in path {
        value = value.get_attr(name).ok().filter(|v| !v.is_undefined())?;
    }
    Some(value)
}

/// Adds the part of the body that reading `variable` (minijinja's nested name of a variable read,
/// `data.member.email`: as far as attribute access goes, so `data.items[0]` is `data.items`)
/// needs.
fn add_data_path(data: &mut FieldPaths, variable: &str) {
    let mut path: Vec<&str> = variable.split('.').collect();
    match path.as_slice() {
        // `event` whole holds the body too; `debug()` prints the whole context.
        ["event"] | ["debug", ..] => data.insert(&["data"]),
        ["event", "data", ..] => {
            path.remove(0);
            data.insert(&path);
        }
        ["data", ..] => data.insert(&path),
        _ => {}
    }
}

/// `.key` for identifier-like keys, `["key"]` otherwise.
fn push_key(path: &mut String, key: &str) {
    let plain = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        let _ = write!(path, "[{}]", Json::String(key.to_string()));
    }
}

/// The expression of a leaf that is exactly `{{ expr }}`, without whitespace-control markers.
fn single_expression(s: &str) -> Option<&str> {
    // The rewritten form of a native leaf, for error messages.
    if let Some(rest) = s.strip_prefix("{% set ").and_then(|r| r.strip_prefix(VALUE)) {
        return rest.strip_prefix(" = (")?.strip_suffix(") %}");
    }
    let inner = s.strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix(['-', '+']).unwrap_or(inner);
    let inner = inner.strip_suffix(['-', '+']).unwrap_or(inner);
    (!inner.trim().is_empty()).then_some(inner)
}

/// Whether `expr` parses as one minijinja expression.
fn is_expression(env: &Environment<'static>, expr: &str) -> bool {
    // minijinja 2.24's standalone expression lexer panics on block delimiters ("empty lexer
    // stack"); they mean several expressions anyway (a quoted `}}` loses nothing: it is a string).
    if ["{{", "}}", "{%", "%}", "{#", "#}"].iter().any(|d| expr.contains(d)) {
        return false;
    }
    // And in case other input trips it: a panic here would take down definition loading.
    contain(|| env.compile_expression(expr).is_ok()).unwrap_or(false)
}

/// minijinja's message with its detail (its `Display` leaves out nothing important but the
/// location, which the path replaces).
fn message(e: &minijinja::Error) -> String {
    let mut text = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(text, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(text, " (line {line})");
    }
    text
}

/// Where `e` is in `source`, (line, column) from 1, when minijinja gives the span.
fn position(source: &str, e: &minijinja::Error) -> Option<(usize, usize)> {
    let before = source.get(..e.range()?.start)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Some((before.matches('\n').count() + 1, before[line_start..].chars().count() + 1))
}

/// The error with the template it came from (minijinja does not name the undefined variable).
fn render_error(path: &str, source: &str, e: &minijinja::Error) -> TemplateError {
    let mut message = message(e);
    if e.kind() == ErrorKind::OutOfFuel {
        message.push_str(" (the template executes too many instructions: engine.template_fuel)");
    }
    if !source.is_empty() {
        let shown: String = source.chars().take(120).collect();
        let more = if shown.len() < source.len() { "…" } else { "" };
        let _ = write!(message, " in `{shown}{more}`");
    }
    TemplateError::Render { path: path.to_string(), message }
}

/// What templates render against: built once per event (or task) and shared by all its
/// templates.
///
/// JSON is not converted into minijinja values up front: objects and arrays are wrapped in a view
/// that minijinja looks into on access, so `{{ data.member.email }}` over a 10 KB event converts
/// one string, not the whole event. (Converting everything first cost about 5 µs per render for a
/// 1 KB event, more than everything else the evaluator does with it.)
#[derive(Debug, Clone)]
pub struct Context(minijinja::Value);

impl Context {
    /// A context whose top-level variables are the given parts.
    pub fn from_parts<'a>(parts: impl IntoIterator<Item = (&'a str, Context)>) -> Context {
        Context(parts.into_iter().map(|(name, part)| (name, part.0)).collect())
    }
}

impl From<Json> for Context {
    fn from(json: Json) -> Context {
        Context(JsonView::wrap(&Arc::new(json), Vec::new()))
    }
}

/// A JSON value inside a shared document, found by its path from the root.
#[derive(Debug)]
struct JsonView {
    root: Arc<Json>,
    path: Vec<PathStep>,
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

impl JsonView {
    /// Scalars become minijinja values right away; objects and arrays become views.
    fn wrap(root: &Arc<Json>, path: Vec<PathStep>) -> minijinja::Value {
        let view = JsonView { root: root.clone(), path };
        match view.node() {
            Json::Null => minijinja::Value::from(()),
            Json::Bool(b) => minijinja::Value::from(*b),
            Json::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => minijinja::Value::from(i),
                (None, Some(u)) => minijinja::Value::from(u),
                _ => minijinja::Value::from(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(text) => minijinja::Value::from(text.as_str()),
            Json::Array(_) | Json::Object(_) => minijinja::Value::from_object(view),
        }
    }

    fn node(&self) -> &Json {
        self.path.iter().fold(&*self.root, |node, step| match step {
            PathStep::Key(k) => &node[k.as_str()],
            PathStep::Index(i) => &node[*i],
        })
    }

    fn child(&self, step: PathStep) -> minijinja::Value {
        let mut path = Vec::with_capacity(self.path.len() + 1);
        path.extend(self.path.iter().cloned());
        path.push(step);
        JsonView::wrap(&self.root, path)
    }
}

impl Object for JsonView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.node() {
            Json::Array(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        match self.node() {
            Json::Array(items) => key.as_usize().filter(|i| *i < items.len()).map(|i| self.child(PathStep::Index(i))),
            Json::Object(_) => self.get_value_by_str(key.as_str()?),
            _ => None,
        }
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<minijinja::Value> {
        match self.node() {
            Json::Object(fields) if fields.contains_key(key) => Some(self.child(PathStep::Key(key.to_string()))),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.node() {
            Json::Array(items) => Enumerator::Seq(items.len()),
            Json::Object(fields) => {
                Enumerator::Values(fields.keys().map(|k| minijinja::Value::from(k.as_str())).collect())
            }
            _ => Enumerator::Empty,
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        match self.node() {
            Json::Array(items) => Some(items.len()),
            Json::Object(fields) => Some(fields.len()),
            _ => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Json {
        json!({
            "event": {"id": "e-1", "type": "member.created", "tenant": "t-1"},
            "data": {"member": {"name": "Ada", "email": "ada@example.com", "n": 3, "tags": ["a", "b"]}},
            "steps": {"fetch": {"output": {"title": "Hello", "words": 120}}},
        })
    }

    fn render(input: Json) -> Result<Json, TemplateError> {
        InputTemplate::compile(&input).unwrap().render(&ctx().into())
    }

    #[test]
    fn literals_pass_through() {
        let input =
            json!({"retries": 3, "flag": true, "none": null, "list": [1, "two", {"x": 1.5}], "s": "plain {text}"});
        assert_eq!(render(input.clone()).unwrap(), input);
        assert_eq!(render(json!("no templates")).unwrap(), json!("no templates"));
        assert_eq!(render(json!(null)).unwrap(), json!(null));
    }

    #[test]
    fn strings_interpolate() {
        let input = json!({
            "subject": "Welcome, {{ data.member.name }}!",
            "body": {"text": "{% if data.member.n > 2 %}many{% else %}few{% endif %}\n"},
            "two": "{{ event.type }}{{ event.tenant }}",
            "html": "<b>{{ '<&>' }}</b>",
            "count": 7,
        });
        assert_eq!(
            render(input).unwrap(),
            json!({
                "subject": "Welcome, Ada!",
                "body": {"text": "many\n"},
                "two": "member.createdt-1",
                "html": "<b><&></b>",
                "count": 7,
            })
        );
    }

    #[test]
    fn a_single_expression_renders_to_its_native_value() {
        let input = json!({
            "n": "{{ data.member.n }}",
            "sum": "{{data.member.n + 1}}",
            "name": "{{ data.member.name }}",
            "tags": "{{ data.member.tags }}",
            "output": "{{- steps.fetch.output -}}",
            "len": "{{ data.member.tags | length }}",
            "quoted": "{{ '}}' }}",
            "items": ["{{ data.member.n > 2 }}", "{{ event.id }}"],
            "padded": " {{ data.member.n }}",
        });
        assert_eq!(
            render(input).unwrap(),
            json!({
                "n": 3,
                "sum": 4,
                "name": "Ada",
                "tags": ["a", "b"],
                "output": {"title": "Hello", "words": 120},
                "len": 2,
                "quoted": "}}",
                "items": [true, "e-1"],
                "padded": " 3",
            })
        );
    }

    #[test]
    fn undefined_values_are_errors() {
        let err = render(json!({"body": {"text": "Hi {{ data.missing }}"}})).unwrap_err();
        assert!(matches!(&err, TemplateError::Render { path, .. } if path == "input.body.text"), "{err:?}");
        assert_eq!(err.to_string(), "input.body.text: undefined value (line 1) in `Hi {{ data.missing }}`");
        let err = render(json!({"to": "{{ data.missing }}"})).unwrap_err();
        assert_eq!(err.to_string(), "input.to: `data.missing` is undefined");
        let err = render(json!({"to": "{{ data.missing.deeper }}"})).unwrap_err();
        assert_eq!(err.to_string(), "input.to: undefined value (line 1) in `{{ data.missing.deeper }}`");
        let err = render(json!(["ok", {"x": "{{ steps.other.output }}"}])).unwrap_err();
        assert!(err.to_string().starts_with("input[1].x: "), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_leaf() {
        let err = InputTemplate::compile(&json!({"body": {"text": "Hi {{ data.name "}})).unwrap_err();
        assert!(matches!(&err, TemplateError::Syntax { path, .. } if path == "input.body.text"), "{err:?}");
        assert!(err.to_string().starts_with("input.body.text: invalid template: syntax error"), "{err}");
        let err = InputTemplate::compile(&json!({"a b": ["x", "{% if %}"]})).unwrap_err();
        assert!(err.to_string().starts_with(r#"input["a b"][1]: invalid template: "#), "{err}");
        let err = InputTemplate::compile(&json!("{{ data.n + }}")).unwrap_err();
        assert!(err.to_string().starts_with("input: invalid template: syntax error"), "{err}");
    }

    #[test]
    fn references_steps_lists_the_step_ids_read() {
        let t = InputTemplate::compile(&json!({
            "a": "{{ steps.fetch.output.title }}",
            "b": "{% for w in steps.summarize.output.words %}{{ w }}{% endfor %}",
            "c": ["{{ data.x }} {{ steps.fetch.output }}"],
            "d": "{{ event.id }}",
        }))
        .unwrap();
        assert_eq!(t.references_steps(), BTreeSet::from(["fetch".to_string(), "summarize".to_string()]));
        assert!(!t.reads_steps_dynamically());
        let t = InputTemplate::compile(&json!("{{ steps['a-b'].output }}")).unwrap();
        assert!(t.references_steps().is_empty());
        assert!(t.reads_steps_dynamically());
        assert!(InputTemplate::compile(&json!({"x": 1})).unwrap().references_steps().is_empty());
    }

    #[test]
    fn data_paths_name_the_parts_of_the_body_read() {
        let paths = |input: Json| InputTemplate::compile(&input).unwrap().data_paths().paths();
        let strings = |paths: &[&[&str]]| -> Vec<Vec<String>> {
            paths.iter().map(|p| p.iter().map(|s| s.to_string()).collect()).collect()
        };
        assert_eq!(
            paths(json!({
                "to": "{{ data.member.email }}",
                "n": "{{ data.items[0].n | default(1) }}",
                "t": "{{ event.type }} {{ event.data.post.title | upper }}",
                "s": "{{ steps.fetch.output }}",
            })),
            strings(&[&["data", "items"], &["data", "member", "email"], &["data", "post", "title"]])
        );
        assert!(paths(json!({"t": "{{ event.type }}", "x": 1})).is_empty());
        assert!(paths(json!("literal")).is_empty());
        // Whatever could see the whole body takes it whole.
        for whole in ["{{ event }}", "{{ data }}", "{{ data | tojson }}", "{{ debug() }}", "{{ event['data'].x }}"] {
            assert_eq!(paths(json!({ "x": whole })), strings(&[&["data"]]), "{whole}");
        }
        // A local variable named like the body reads nothing of it.
        assert!(paths(json!("{% set data = 1 %}{{ data }}")).is_empty());
    }

    /// The issue's repro: 400 million loop iterations held up every tenant for 22.8 s.
    #[test]
    fn an_expensive_template_runs_out_of_fuel() {
        let loops = "{% for a in range(20000) %}{% for b in range(20000) %}{% endfor %}{% endfor %}";
        let err = render(json!({ "x": loops })).unwrap_err();
        assert!(matches!(&err, TemplateError::Render { path, .. } if path == "input.x"), "{err:?}");
        assert!(err.to_string().contains("engine ran out of fuel"), "{err}");
        assert!(err.to_string().contains("engine.template_fuel"), "{err}");
        // A smaller budget refuses a smaller loop; the same loop fits a larger one.
        let bounded = |fuel| {
            let bounds = Bounds { template_fuel: fuel, ..Bounds::default() };
            let t = InputTemplate::compile_bounded(
                &json!("{% for i in range(1000) %}{{ i }}{% endfor %}"),
                "input",
                &bounds,
            );
            t.unwrap().render(&ctx().into())
        };
        assert!(bounded(1_000).unwrap_err().to_string().contains("fuel"));
        assert_eq!(bounded(100_000).unwrap().as_str().map(str::len), Some(2890));
    }

    /// The issue's repro: a 6 MB input, which the producer refused, which stopped the stage.
    #[test]
    fn a_large_render_stops_at_the_limit() {
        let big = json!({ "x": "{% for a in range(3000) %}{% for b in range(1000) %}xx{% endfor %}{% endfor %}" });
        // With the default budget it runs out of fuel first; with fuel to spare, the size stops it.
        assert!(render(big.clone()).is_err());
        let bounds = Bounds { template_fuel: 1_000_000_000, max_render_bytes: 1 << 20 };
        let err = InputTemplate::compile_bounded(&big, "input", &bounds).unwrap().render(&ctx().into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input.x: the input renders to more than 1048576 bytes, the limit (engine.max_render_bytes)"
        );
    }

    #[test]
    fn the_size_limit_counts_every_leaf_of_an_input() {
        let bounds = Bounds { max_render_bytes: 2_000, ..Bounds::default() };
        let compile = |input: Json| InputTemplate::compile_bounded(&input, "input", &bounds).unwrap();
        let data = json!({"data": {"s": "x".repeat(900), "list": vec!["y".repeat(10); 100]}});
        // One leaf fits, the second too, the third goes past (as a lookup, a value and a text).
        let t = compile(json!({"a": "{{ data.s }}", "b": "{{ data.s ~ '' }}", "c": "<{{ data.s }}>"}));
        let err = t.render(&data.clone().into()).unwrap_err();
        assert!(err.to_string().starts_with("input.c: the input renders to more than 2000 bytes"), "{err}");
        let t = compile(json!({"a": "{{ data.s }}", "b": "{{ data.s ~ '' }}"}));
        assert!(t.render(&data.clone().into()).is_ok());
        // A native value is measured as JSON: 100 strings of 10 are 1,301 bytes.
        let t = compile(json!(["{{ data.list }}", "{{ data.list }}"]));
        let err = t.render(&data.into()).unwrap_err();
        assert!(err.to_string().starts_with("input[1]: the input renders to more than 2000 bytes"), "{err}");
    }

    #[test]
    fn syntax_errors_give_their_position_in_the_leaf() {
        let err = InputTemplate::compile(&json!({"t": "line one\nHi {{ data.name + }}"})).unwrap_err();
        assert_eq!(err.position(), Some((2, 19)), "{err}"); // the `}}` it did not expect
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        let key =
            prop_oneof![Just("member".to_string()), Just("name".to_string()), Just("items".to_string()), ".{0,4}"];
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_filter_map("JSON has no NaN", |f| serde_json::Number::from_f64(f).map(Json::Number)),
            ".{0,12}".prop_map(Json::String),
        ];
        leaf.prop_recursive(6, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    const TEMPLATES: &[&str] = &[
        "{{ data.member.name }}",
        "{{ data.member }}",
        "Hi {{ data.member.name | upper }}!",
        "{{ data.items | length }}",
        "{{ data.items[0] }}",
        "{{ data.n + 1 }}",
        "{{ data.member.name ~ data.items }}",
        "{% for x in data.items %}{{ x }},{% endfor %}",
        "{% for k, v in data.member | items %}{{ k }}={{ v }}{% endfor %}",
        "{{ data | tojson }}",
        "{{ data.items | sort | join(',') }}",
        "{{ data.member.name * 3 }}",
        "{% if data.member.name is string and data.member.name|length > 2 %}y{% endif %}",
    ];

    proptest::proptest! {
        /// Any string leaf compiles or is refused, and renders or fails, without panicking.
        #[test]
        fn arbitrary_leaves_never_panic(leaf in r#"(\{\{|\}\}|\{%|%\}|\{#|#\}|[-+a-z.()\[\]|'" 0-9_]){0,12}"#) {
            if let Ok(t) = InputTemplate::compile(&json!({ "x": leaf })) {
                let _ = t.render(&ctx().into());
            }
        }

        /// Any text at all: compiled or refused, never a panic.
        #[test]
        fn arbitrary_text_never_panics(leaf in proptest::prelude::any::<String>()) {
            let _ = InputTemplate::compile(&json!({ "x": format!("{{{{{leaf}}}}}") }));
            let _ = InputTemplate::compile(&json!({ "x": format!("{{% {leaf} %}}") }));
            let _ = InputTemplate::compile(&json!({ "x": leaf }));
        }

        /// Compiled templates render any JSON event body to a value or an error, never a panic.
        #[test]
        fn templates_render_arbitrary_data_without_panicking(data in arb_json(), steps in arb_json()) {
            let input: Json = TEMPLATES.iter().enumerate().map(|(i, t)| (format!("t{i}"), json!(t))).collect();
            let template = InputTemplate::compile(&input).unwrap();
            for (i, _) in TEMPLATES.iter().enumerate() {
                let one = InputTemplate::compile(&input[format!("t{i}")]).unwrap();
                let _ = one.render(&json!({"event": {}, "data": data, "steps": steps}).into());
            }
            let _ = template.render(&json!({"event": {}, "data": data, "steps": steps}).into());
        }
    }

    #[test]
    fn templates_can_cross_threads() {
        fn check<T: Send + Sync + Clone + fmt::Debug>() {}
        check::<InputTemplate>();
    }
}
