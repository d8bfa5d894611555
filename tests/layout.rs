//! The layout is the architecture: this test keeps it so.
//!
//! It reads `src/` as text and builds the graph of which module refers to which (`use crate::…`,
//! `super::…`, inline `crate::a::b` paths). Two properties must hold:
//!
//! - **No module cycle**, at any depth (what `cargo modules dependencies --lib --acyclic` checks,
//!   without installing it): a cycle means two modules can only be understood together.
//! - **Layers**: each top-level module refers only to the layers below it. The engine (workflow
//!   definitions, conditions, templates, planning) knows no Kafka and no stage; config knows
//!   nothing else of weir; connectors know no stage; Kafka plumbing knows no stage or workflow.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// What each top-level module may refer to. A module missing here fails the test, so a new
/// top-level module has to be placed in the layering deliberately.
const LAYERS: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("shutdown", &[]),
    ("envelope", &["config"]),
    ("telemetry", &["config", "shutdown"]),
    ("engine", &["config", "envelope", "telemetry"]),
    ("kafka", &["config", "envelope", "telemetry", "shutdown"]),
    ("connectors", &["config", "envelope", "telemetry", "engine", "shutdown"]),
    ("stages", &["config", "envelope", "telemetry", "shutdown", "engine", "kafka", "connectors"]),
    ("pipeline", &["config", "envelope", "telemetry", "shutdown", "engine", "kafka", "connectors", "stages"]),
    ("ops", &["config", "envelope", "telemetry", "shutdown", "engine", "kafka", "connectors", "stages", "pipeline"]),
];

#[test]
fn modules_form_no_cycle() {
    let graph = graph();
    let cycles = cycles(&graph);
    assert!(cycles.is_empty(), "module cycles (each line: modules that refer to each other in a circle):\n{}", {
        cycles.iter().map(|c| c.join(" <-> ")).collect::<Vec<_>>().join("\n")
    });
}

#[test]
fn each_layer_refers_only_to_the_layers_below() {
    let layers: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, targets) in graph() {
        let Some(top) = top_level(&from) else { continue };
        let Some(allowed) = layers.get(top.as_str()) else {
            wrong.push(format!("{from}: top-level module `{top}` has no place in LAYERS"));
            continue;
        };
        for to in targets {
            let Some(target_top) = top_level(&to) else { continue };
            if target_top != top && !allowed.contains(&target_top.as_str()) {
                wrong.push(format!("{from} refers to {to}: `{top}` may refer only to {allowed:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_cycles_and_group_imports() {
    let mut raw: Graph = BTreeMap::new();
    for m in ["crate::c", "crate::d"] {
        raw.entry(m.to_string()).or_default();
    }
    add_references(&mut raw, "crate::a", "use crate::{b::{self, X}, c};\nfn f() { super::d::g(); } // crate::e");
    add_references(&mut raw, "crate::b", "pub fn h() { crate::a::f() }");
    let graph = resolve(raw);
    assert_eq!(graph["crate::a"], BTreeSet::from(["crate::b".to_string(), "crate::c".into(), "crate::d".into()]));
    assert_eq!(cycles(&graph), vec![vec!["crate::a".to_string(), "crate::b".into()]]);
}

/// Module path → the module paths it refers to (only other modules of the crate).
type Graph = BTreeMap<String, BTreeSet<String>>;

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut graph: Graph = BTreeMap::new();
    let modules: Vec<(String, String)> = files
        .iter()
        .filter_map(|f| {
            let module = module_of(&src, f)?;
            Some((module, std::fs::read_to_string(f).expect("readable source")))
        })
        .collect();
    for (module, text) in &modules {
        graph.entry(module.clone()).or_default();
        add_references(&mut graph, module, text);
    }
    resolve(graph)
}

/// Resolves each reference to the deepest module that exists (`crate::a::b::Item` → `crate::a::b`)
/// and drops references of a module to itself or to its ancestors (which declare it).
fn resolve(graph: Graph) -> Graph {
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    graph
        .into_iter()
        .map(|(from, targets)| {
            let resolved = targets
                .into_iter()
                .filter_map(|t| deepest_module(&known, &t))
                .filter(|t| *t != from && !from.starts_with(&format!("{t}::")))
                .collect();
            (from, resolved)
        })
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `crate::a::b`; `src/lib.rs` → `crate`; the binary's
/// `src/main.rs` is not part of the library.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    match parts.last().map(String::as_str) {
        Some("main") if parts.len() == 1 => return None,
        Some("lib") if parts.len() == 1 => parts.clear(),
        Some("mod") => {
            parts.pop();
        }
        _ => {}
    }
    Some(std::iter::once("crate".to_string()).chain(parts).collect::<Vec<_>>().join("::"))
}

fn top_level(module: &str) -> Option<String> {
    module.split("::").nth(1).map(str::to_string)
}

fn deepest_module(known: &BTreeSet<String>, path: &str) -> Option<String> {
    let mut candidate = path.to_string();
    loop {
        if known.contains(&candidate) {
            return (candidate != "crate").then_some(candidate);
        }
        candidate.truncate(candidate.rfind("::")?);
    }
}

/// Adds every crate path `text` (the source of `module`) refers to, comments left out.
fn add_references(graph: &mut Graph, module: &str, text: &str) {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let targets = graph.entry(module.to_string()).or_default();
    let parent = module.rsplit_once("::").map_or("crate", |(p, _)| p).to_string();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':');
        let rest: String = chars[i..chars.len().min(i + 8)].iter().collect();
        let root = if !starts_word {
            None
        } else if rest.starts_with("crate::") {
            Some(("crate".to_string(), 7))
        } else if rest.starts_with("super::") {
            Some((parent.clone(), 7))
        } else if rest.starts_with("self::") {
            Some((module.to_string(), 6))
        } else {
            None
        };
        let Some((root, skip)) = root else {
            i += 1;
            continue;
        };
        let (paths, end) = use_tree(&chars, i + skip);
        for p in paths {
            let full = if p.is_empty() || p == "self" { root.clone() } else { format!("{root}::{p}") };
            targets.insert(full.trim_end_matches("::self").to_string());
        }
        i = end.max(i + 1);
    }
}

/// Parses a path or use tree starting at `i` (after `crate::`): `a::b`, `a::{b, c::{d}}`.
/// Returns the paths it names and where it ends.
fn use_tree(chars: &[char], mut i: usize) -> (Vec<String>, usize) {
    let mut prefix = String::new();
    loop {
        if chars.get(i) == Some(&'{') {
            let mut paths = Vec::new();
            i += 1;
            loop {
                while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    i += 1;
                }
                match chars.get(i) {
                    None => return (paths, i),
                    Some('}') => return (paths, i + 1),
                    _ => {}
                }
                let (inner, end) = use_tree(chars, i);
                paths.extend(
                    inner.into_iter().map(|p| if p.is_empty() { prefix.clone() } else { format!("{prefix}{p}") }),
                );
                // Skip a rename (`as x`) up to the next separator.
                i = end;
                while chars.get(i).is_some_and(|c| *c != ',' && *c != '}') {
                    i += 1;
                }
            }
        }
        let start = i;
        while chars.get(i).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word.is_empty() {
            return (vec![prefix.trim_end_matches("::").to_string()], i);
        }
        prefix.push_str(&word);
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            prefix.push_str("::");
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The strongly connected components with more than one module (Tarjan's algorithm).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.graph.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}
