//! The modules of the daemon and of the XDP program form layers: no module uses one that
//! uses it back, directly or through others, and no group of sibling modules does either.
//!
//! Read from the sources: every `use` declaration and every path starting with `crate::`,
//! `super::` or `self::`, or naming a child module, is an edge from the file's module to the
//! deepest module the path names. Comments and string literals are skipped.
#![allow(
    unused_crate_dependencies,
    reason = "reads the sources; the crate's dependencies are the library's"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Module path ("" for the crate root) -> the modules it uses.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module path of a source file, relative to `src`.
fn module_of(src: &Path, file: &Path, root_file: &str) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == [root_file] {
        parts.clear();
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments and without the contents of string and char literals.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i += 2 + hashes;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// Every path of a `use` tree (`a::{b, c::{d}}` -> `a::b`, `a::c::d`).
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap().trim();
        if !path.is_empty() {
            out.push(format!("{prefix}{path}"));
        }
        return;
    };
    let head = format!("{prefix}{}", &tree[..open]);
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&inner[start..i], &head, out);
                start = i + 1;
            }
            _ => {}
        }
    }
    expand(&inner[start..], &head, out);
}

/// The paths a file names: `use` trees, and inline paths from `crate`, `super`, `self` or a
/// child module.
fn paths(code: &str, children: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    // `use` trees, then the rest of the code without them.
    let mut rest = String::with_capacity(code.len());
    let mut from = 0;
    for (i, _) in code.match_indices("use ") {
        let before = code[..i].chars().next_back();
        if i < from || before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = code[i..].find(';').map_or(code.len(), |e| i + e);
        expand(&code[i + 4..end], "", &mut out);
        rest.push_str(&code[from..i]);
        from = end;
    }
    rest.push_str(&code[from..]);
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut word = String::new();
    for c in rest.chars().chain([' ']) {
        if is_ident(c) {
            word.push(c);
            continue;
        }
        let first = word.split("::").next().unwrap_or("");
        if word.contains("::")
            && (["crate", "super", "self"].contains(&first) || children.contains(first))
        {
            out.push(word.clone());
        }
        word.clear();
    }
    out
}

/// Where the first inline module (`mod NAME {`) starts, and its name.
fn inline_module(code: &str) -> Option<(usize, String)> {
    code.match_indices("mod ").find_map(|(i, _)| {
        let rest = &code[i + 4..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let after = rest[name.len()..].trim_start();
        let before = code[..i].chars().next_back();
        let starts_word = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        (starts_word && !name.is_empty() && after.starts_with('{')).then_some((i, name))
    })
}

/// The deepest module `path` names, seen from `from`.
fn resolve(path: &str, from: &str, modules: &BTreeSet<String>) -> Option<String> {
    let mut segments = path.split("::").filter(|s| !s.is_empty()).peekable();
    let mut at: Vec<String> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").map(str::to_owned).collect()
    };
    match segments.peek().copied() {
        Some("crate") => {
            at.clear();
            segments.next();
        }
        Some("self") => {
            segments.next();
        }
        Some("super") => {
            while segments.peek() == Some(&"super") {
                at.pop();
                segments.next();
            }
        }
        Some(_) => {}
        None => return None,
    }
    for segment in segments {
        let mut next = at.clone();
        next.push(segment.to_owned());
        if !modules.contains(&next.join("::")) {
            break;
        }
        at = next;
    }
    Some(at.join("::"))
}

fn graph(src: &Path, root_file: &str) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        let is_main = file.file_name().is_some_and(|n| n == "main.rs");
        if is_main != (root_file == "main") && is_main {
            continue;
        }
        let Some(module) = module_of(src, file, root_file) else {
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        // An inline module (`mod tests { ... }`, always last in these files) is a child module
        // of its own: its `super` is the file's module.
        match inline_module(&code) {
            Some((at, name)) => {
                let child = if module.is_empty() {
                    name
                } else {
                    format!("{module}::{name}")
                };
                sources.insert(child, code[at..].to_owned());
                sources.insert(module, code[..at].to_owned());
            }
            None => {
                sources.insert(module, code);
            }
        }
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    let mut graph = Graph::new();
    for (module, code) in &sources {
        let prefix = if module.is_empty() {
            String::new()
        } else {
            format!("{module}::")
        };
        let children: BTreeSet<String> = modules
            .iter()
            .filter_map(|m| {
                m.strip_prefix(&prefix)
                    .filter(|c| !c.contains("::") && !c.is_empty())
            })
            .map(str::to_owned)
            .collect();
        let edges = graph.entry(module.clone()).or_default();
        for path in paths(code, &children) {
            if let Some(target) = resolve(&path, module, &modules) {
                if &target != module {
                    edges.insert(target);
                }
            }
        }
    }
    graph
}

/// The cycles of a graph (its strongly connected components with more than one node).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph.keys().collect();
    let reach = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for next in graph.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for n in &nodes {
        let component: Vec<String> = nodes
            .iter()
            .filter(|m| m != &n && reachable[*n].contains(**m) && reachable[*m].contains(*n))
            .map(|m| (*m).clone())
            .chain([(*n).clone()])
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if component.len() > 1 {
            found.insert(component);
        }
    }
    found.into_iter().collect()
}

/// The graph with every module folded into its ancestor that is a child of `parent`.
fn siblings(graph: &Graph, parent: &str) -> Graph {
    let prefix = if parent.is_empty() {
        String::new()
    } else {
        format!("{parent}::")
    };
    let fold = |m: &str| -> Option<String> {
        let rest = m.strip_prefix(&prefix)?;
        let child = rest.split("::").next().filter(|c| !c.is_empty())?;
        Some(format!("{prefix}{child}"))
    };
    let mut folded = Graph::new();
    for (from, targets) in graph {
        let Some(from) = fold(from) else { continue };
        let edges = folded.entry(from.clone()).or_default();
        for to in targets.iter().filter_map(|t| fold(t)) {
            if to != from {
                edges.insert(to);
            }
        }
    }
    folded
}

fn assert_layered(src: &Path, root_file: &str) -> Graph {
    let graph = graph(src, root_file);
    assert!(
        graph.len() > 5,
        "{}: too few modules found: {graph:?}",
        src.display()
    );
    let mut problems = Vec::new();
    for cycle in cycles(&graph) {
        problems.push(format!("modules use each other: {}", cycle.join(" <-> ")));
    }
    for parent in graph.keys() {
        for cycle in cycles(&siblings(&graph, parent)) {
            problems.push(format!(
                "sibling modules use each other: {}",
                cycle.join(" <-> ")
            ));
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "{}:\n{}\n\nthe graph:\n{graph:#?}",
        src.display(),
        problems.join("\n")
    );
    graph
}

#[test]
fn the_daemon_is_layered() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = assert_layered(&src, "lib");
    // The layers the library documents, checked to be read right.
    let uses = |from: &str, to: &str| {
        graph[from]
            .iter()
            .any(|t| t == to || t.starts_with(&format!("{to}::")))
    };
    assert!(uses("core", "plan::desired") && uses("shell::dataplane::maps", "plan::ops"));
    assert!(!uses("core", "shell") && !uses("plan::desired", "core"));
}

#[test]
fn the_xdp_program_is_layered() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../balancer-ebpf/src");
    assert_layered(&src, "main");
}

#[test]
fn a_cycle_is_found() {
    let graph: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c::d"]),
        ("c::d", vec!["a"]),
        ("e::f", vec!["e::g"]),
        ("e::g", vec!["e::f::h"]),
        ("e::f::h", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycles(&graph), [vec!["a", "b", "c::d"]]);
    assert_eq!(cycles(&siblings(&graph, "e")), [vec!["e::f", "e::g"]]);
    let mut out = Vec::new();
    expand("crate::{a::{b, c as d}, e}", "", &mut out);
    assert_eq!(out, ["crate::a::b", "crate::a::c", "crate::e"]);
    assert_eq!(
        code_only("let s = \"crate::x\"; // crate::y\nuse crate::z;"),
        "let s = \"\"; \nuse crate::z;"
    );
}
