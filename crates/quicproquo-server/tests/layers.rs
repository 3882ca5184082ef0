//! The server's top-level modules form one-way layers (see the `# Layout` table in `lib.rs`):
//! these tests read every source file's `crate::` paths and fail when a module imports one of
//! a later layer, or when any cycle appears between top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The layers, lowest first: a module may import only modules of earlier layers.
const LAYERS: &[&[&str]] = &[
    &["model", "keystore", "pool"],
    &["obs"],
    &["store"],
    &["auth", "ordering"],
    &["wire"],
    &["cluster"],
    &["rpc"],
    &["config"],
    &["node"],
];

/// Top-level module -> the top-level modules its files name through `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level modules named by `crate::` paths in `source`, comments left out. Handles
/// `crate::a::b`, `crate::{a, b::c}` and paths inside expressions.
fn crate_imports(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            // `crate::` must start a path (not end an identifier such as `my_crate::`).
            let starts_path = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            rest = &rest[at + "crate::".len()..];
            if !starts_path {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name = first_ident(item.trim());
                    if !name.is_empty() {
                        out.insert(name.to_owned());
                    }
                }
            } else {
                let name = first_ident(rest);
                if !name.is_empty() {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    out
}

fn first_ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The import graph of the library's top-level modules (the binary's `main.rs` and `cli/`
/// and the crate root `lib.rs` are not modules of the library's layers).
fn library_graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src)?;
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .context("a file without a name")?;
        let module = top.strip_suffix(".rs").unwrap_or(top);
        if matches!(module, "lib" | "main" | "cli") {
            continue;
        }
        let source = std::fs::read_to_string(&file)?;
        let imports = graph.entry(module.to_owned()).or_default();
        for used in crate_imports(&source) {
            if used != module {
                imports.insert(used);
            }
        }
    }
    Ok(graph)
}

/// A cycle between modules of `graph`, if there is one (as the path that closes it).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

/// Every import that does not go to an earlier layer, as `(from, to)`.
fn upward_imports(graph: &Graph) -> Result<Vec<(String, String)>> {
    let layer_of = |m: &str| LAYERS.iter().position(|layer| layer.contains(&m));
    let mut wrong = Vec::new();
    for (from, imports) in graph {
        let Some(own) = layer_of(from) else {
            bail!("module `{from}` is in no layer: place it in LAYERS and in lib.rs's # Layout");
        };
        for to in imports {
            match layer_of(to) {
                Some(l) if l < own => {}
                _ => wrong.push((from.clone(), to.clone())),
            }
        }
    }
    Ok(wrong)
}

#[test]
fn server_modules_import_only_earlier_layers() -> Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = library_graph(&src)?;
    for layer in LAYERS {
        for module in *layer {
            assert!(graph.contains_key(*module), "no module `{module}` in src/");
        }
    }
    assert_eq!(
        find_cycle(&graph),
        None,
        "a cycle between top-level modules"
    );
    assert_eq!(upward_imports(&graph)?, vec![], "imports of a later layer");
    Ok(())
}

#[test]
fn the_checker_finds_imports_in_every_form() {
    let source = "use crate::store::log::LogStore;\n\
                  use crate::{obs::Observer, wire};\n\
                  let x = crate::model::group::GroupId::new(b)?;\n\
                  // crate::node is only mentioned in a comment\n\
                  let y = quicproquo_crate::thing; /// and crate::rpc in a doc\n";
    let found: Vec<String> = crate_imports(source).into_iter().collect();
    assert_eq!(found, ["model", "obs", "store", "wire"]);
}

#[test]
fn the_checker_catches_a_cycle_and_an_upward_import() -> Result<()> {
    let mut graph = Graph::new();
    let mut edge = |from: &str, to: &str| {
        graph
            .entry(from.to_owned())
            .or_default()
            .insert(to.to_owned());
    };
    edge("store", "model");
    edge("rpc", "store");
    assert_eq!(find_cycle(&graph), None);
    assert_eq!(upward_imports(&graph)?, vec![]);
    // The store reaching up into the RPC layer closes a cycle.
    graph
        .entry("store".to_owned())
        .or_default()
        .insert("rpc".to_owned());
    let cycle = find_cycle(&graph).unwrap_or_default();
    assert!(
        cycle.windows(2).any(|w| w == ["store", "rpc"]),
        "cycle {cycle:?}"
    );
    assert_eq!(
        upward_imports(&graph)?,
        vec![("store".to_owned(), "rpc".to_owned())]
    );
    Ok(())
}
