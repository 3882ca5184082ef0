//! The deployment files against the server they deploy.
//!
//! `docker/Dockerfile`, `deploy/compose/` and `deploy/k8s/` configure `qpq-server` through
//! `QPQ_*` variables and run its subcommands. Nothing else would notice when a setting or a
//! subcommand is renamed, so these tests check that every `QPQ_*` name the files mention is one
//! the server reads ([`KNOWN_ENV`]), and that every `qpq-server` invocation names a subcommand
//! and flags the binary actually has (asking the binary's own `--help`).
//!
//! The workspace has no YAML parser, so the YAML is read line by line, relying only on what
//! YAML's indentation rules guarantee: which keys are siblings, list items and merge keys
//! (`<<: *anchor`). Each file family must yield the invocations it is known to hold, so a
//! scanner that silently found nothing would fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use quicproquo_server::config::KNOWN_ENV;

const BIN: &str = env!("CARGO_BIN_EXE_qpq-server");

fn repo_root() -> Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?)
}

/// `path` relative to the repository, for messages.
fn shown(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_owned()
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir:?}"))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    found.sort();
    ensure!(!found.is_empty(), "no YAML files under {dir:?}");
    Ok(found)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))
}

/// Every `QPQ_[A-Z0-9_]+` token in `text`, with its line number.
fn qpq_tokens(text: &str) -> Vec<(usize, String)> {
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(at) = line[from..].find("QPQ_").map(|i| i + from) {
            let glued = at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            let end = line[at + 4..]
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .map_or(line.len(), |i| i + at + 4);
            if !glued && end > at + 4 {
                tokens.push((n + 1, line[at..end].to_owned()));
            }
            from = end.max(at + 4);
        }
    }
    tokens
}

/// One significant line of a YAML file.
#[derive(Debug)]
struct Line {
    /// 1-based line number, for messages.
    number: usize,
    /// Column where the key (or the scalar of a list item) starts: after any `- `.
    col: usize,
    /// Whether the line starts a list item (`- ...`).
    dash: bool,
    /// The mapping key, if the line has one.
    key: Option<String>,
    /// What follows `key:` (or the whole item for a list item without a key).
    value: String,
}

/// Drops a trailing comment: a `#` outside quotes that starts the line or follows whitespace.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn parse_lines(text: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let content = strip_comment(raw).trim_end();
        let trimmed = content.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        let mut col = content.len() - trimmed.len();
        let mut rest = trimmed;
        let mut dash = false;
        if rest == "---" {
            // A document boundary ends every block.
            lines.push(Line {
                number: n + 1,
                col: 0,
                dash: false,
                key: None,
                value: String::new(),
            });
            continue;
        }
        if rest == "-" || rest.starts_with("- ") {
            dash = true;
            let after = rest[1..].trim_start();
            col += rest.len() - after.len();
            rest = after;
        }
        let (key, value) = match split_key(rest) {
            Some((k, v)) => (Some(k), v),
            None => (None, rest.to_owned()),
        };
        lines.push(Line {
            number: n + 1,
            col,
            dash,
            key,
            value,
        });
    }
    lines
}

/// `key: value` or `key:` → the key (unquoted) and the value; `None` for a plain scalar.
fn split_key(text: &str) -> Option<(String, String)> {
    if text.starts_with('[') || text.starts_with('{') {
        return None;
    }
    let (mut single, mut double) = (false, false);
    for (i, c) in text.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            ':' if !single && !double => {
                let after = &text[i + 1..];
                if after.is_empty() || after.starts_with(' ') {
                    return Some((unquote(&text[..i]), after.trim().to_owned()));
                }
            }
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_owned();
        }
    }
    s.to_owned()
}

/// The items of a one-line flow sequence `[a, "b", 'c']`.
fn flow_items(value: &str) -> Option<Vec<String>> {
    let inner = value.strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let (mut single, mut double) = (false, false);
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            ',' if !single && !double => {
                items.push(unquote(&inner[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        items.push(unquote(&inner[start..]));
    }
    Some(items)
}

/// Indices of the keys that are siblings of `lines[at]` in its mapping (itself included).
fn siblings(lines: &[Line], at: usize) -> Vec<usize> {
    let col = lines[at].col;
    let mut found = vec![at];
    if !lines[at].dash {
        for i in (0..at).rev() {
            let l = &lines[i];
            if l.col < col {
                break;
            }
            if l.col == col {
                found.push(i);
                if l.dash {
                    break;
                }
            }
        }
    }
    for (i, l) in lines.iter().enumerate().skip(at + 1) {
        if l.col < col || (l.col == col && l.dash) {
            break;
        }
        if l.col == col {
            found.push(i);
        }
    }
    found
}

/// Whether the mapping holding the keys `keys` runs the qpq-server image, directly or through
/// a merge key (`<<: *anchor`).
fn runs_qpq_server(lines: &[Line], keys: &[usize], depth: usize) -> Result<bool> {
    ensure!(
        depth < 8,
        "merge keys nested too deep near line {}",
        lines[keys[0]].number
    );
    for &i in keys {
        let l = &lines[i];
        match l.key.as_deref() {
            Some("image") => return Ok(unquote(&l.value).contains("qpq-server")),
            Some("<<") => {
                let anchor = l
                    .value
                    .strip_prefix('*')
                    .with_context(|| format!("line {}: merge of something else", l.number))?;
                let def = lines
                    .iter()
                    .position(|d| {
                        d.value == format!("&{anchor}")
                            || d.value.starts_with(&format!("&{anchor} "))
                    })
                    .with_context(|| format!("line {}: no anchor &{anchor}", l.number))?;
                let first_child = def + 1;
                ensure!(
                    first_child < lines.len() && lines[first_child].col > lines[def].col,
                    "anchor &{anchor} (line {}) is not a mapping",
                    lines[def].number
                );
                if runs_qpq_server(lines, &siblings(lines, first_child), depth + 1)? {
                    return Ok(true);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// One `qpq-server` command line found in a file: where, and its arguments.
#[derive(Debug)]
struct Invocation {
    place: String,
    args: Vec<String>,
}

/// The `command:` / `args:` lists of every container or service running qpq-server.
fn yaml_invocations(path: &Path, text: &str) -> Result<Vec<Invocation>> {
    let lines = parse_lines(text);
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !matches!(l.key.as_deref(), Some("command" | "args")) {
            continue;
        }
        let place = format!("{}:{}", path.display(), l.number);
        let items = if l.value.is_empty() {
            lines[i + 1..]
                .iter()
                .take_while(|item| item.dash && item.col > l.col && item.key.is_none())
                .map(|item| unquote(&item.value))
                .collect()
        } else if let Some(items) = flow_items(&l.value) {
            items
        } else {
            bail!(
                "{place}: write `{}` as a list",
                l.key.as_deref().unwrap_or_default()
            );
        };
        if runs_qpq_server(&lines, &siblings(&lines, i), 0)? {
            found.push(Invocation { place, args: items });
        }
    }
    Ok(found)
}

/// The image's default command line: ENTRYPOINT (exec form) followed by CMD.
fn dockerfile_invocation(path: &Path, text: &str) -> Result<Invocation> {
    let exec_form = |instruction: &str| -> Result<Vec<String>> {
        let line = text
            .lines()
            .rfind(|l| l.starts_with(&format!("{instruction} ")))
            .with_context(|| format!("{path:?} has no {instruction}"))?;
        flow_items(line[instruction.len()..].trim())
            .with_context(|| format!("{path:?}: {instruction} must use the exec (JSON) form"))
    };
    let mut args = exec_form("ENTRYPOINT")?;
    args.extend(exec_form("CMD")?);
    Ok(Invocation {
        place: path.display().to_string(),
        args,
    })
}

/// Checks one invocation against the binary; returns its subcommand.
fn check_invocation(inv: &Invocation) -> Result<String> {
    let mut args = inv.args.iter().peekable();
    if args
        .peek()
        .is_some_and(|a| *a == "qpq-server" || a.ends_with("/qpq-server"))
    {
        args.next();
    }
    let sub = args
        .next()
        .with_context(|| format!("{}: qpq-server without a subcommand", inv.place))?;
    let out = Command::new(BIN).args([sub.as_str(), "--help"]).output()?;
    ensure!(
        out.status.success(),
        "{}: `qpq-server {sub}` is not a subcommand of qpq-server:\n{}",
        inv.place,
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8(out.stdout)?;
    let help_words: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .collect();
    for flag in args.filter(|a| a.starts_with('-')) {
        let name = flag.split('=').next().unwrap_or(flag);
        ensure!(
            help_words.contains(name),
            "{}: `qpq-server {sub}` has no flag {name}",
            inv.place
        );
    }
    Ok(sub.clone())
}

fn subcommands(invocations: &[Invocation]) -> Result<BTreeSet<String>> {
    invocations.iter().map(check_invocation).collect()
}

#[test]
fn every_qpq_variable_in_the_deployment_files_is_one_the_server_reads() -> Result<()> {
    let root = repo_root()?;
    let mut files = yaml_files(&root.join("deploy"))?;
    files.push(root.join("docker/Dockerfile"));
    let mut unknown = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        for (line, var) in qpq_tokens(&read(file)?) {
            if !KNOWN_ENV.contains(&var.as_str()) {
                unknown.push(format!("{}:{line}: {var}", shown(&root, file).display()));
            }
            seen.insert(var);
        }
    }
    ensure!(
        unknown.is_empty(),
        "QPQ_ variables the server does not read (add them to config::KNOWN_ENV or fix the \
         file):\n{}",
        unknown.join("\n")
    );
    // The scan itself works: the settings every cluster node needs were found.
    for needed in [
        "QPQ_DATABASE_URL",
        "QPQ_NODE_CERTIFICATE_FILE",
        "QPQ_NODE_KEY_FILE",
        "QPQ_ADVERTISE",
        "QPQ_OPS_LISTEN",
    ] {
        ensure!(
            seen.contains(needed),
            "{needed} not found in the deployment files"
        );
    }
    Ok(())
}

#[test]
fn every_qpq_server_invocation_names_a_real_subcommand_and_flags() -> Result<()> {
    let root = repo_root()?;
    let families = [
        (
            "deploy/compose",
            &[
                "cluster-key",
                "edge",
                "migrate",
                "node-cert",
                "shard",
                "telemetry-key",
            ][..],
        ),
        ("deploy/k8s", &["edge", "migrate", "shard"][..]),
    ];
    for (dir, expected) in families {
        let mut invocations = Vec::new();
        for file in yaml_files(&root.join(dir))? {
            invocations.extend(yaml_invocations(&shown(&root, &file), &read(&file)?)?);
        }
        let found = subcommands(&invocations)?;
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        ensure!(
            found == expected,
            "{dir}: expected qpq-server invocations {expected:?}, found {found:?} in \
             {invocations:#?}"
        );
    }
    let dockerfile = root.join("docker/Dockerfile");
    let image_default = dockerfile_invocation(&shown(&root, &dockerfile), &read(&dockerfile)?)?;
    assert_eq!(check_invocation(&image_default)?, "standalone");
    Ok(())
}

#[test]
fn the_scanner_reads_the_yaml_shapes_the_files_use() -> Result<()> {
    let compose = r#"
x-node: &node
  image: qpq-server:dev   # the one image
  command: ["shard"]
services:
  one:
    <<: *node
    command:
      - edge
      - "--listen"
  other:
    image: jaegertracing/jaeger:2
    command: ["--set=a#b"]
"#;
    let found = yaml_invocations(Path::new("c.yaml"), compose)?;
    let args: Vec<_> = found.iter().map(|i| i.args.clone()).collect();
    assert_eq!(args, [vec!["shard"], vec!["edge", "--listen"]]);

    let k8s = r"
spec:
  containers:
    - name: a
      args: [migrate]
      image: qpq-server
      lifecycle:
        preStop:
          exec:
            command: [sleep, '5']
    - name: b
      image: postgres:17
      args:
      - -c
---
kind: Job
";
    let found = yaml_invocations(Path::new("k.yaml"), k8s)?;
    let args: Vec<_> = found.iter().map(|i| i.args.clone()).collect();
    assert_eq!(args, [vec!["migrate"]]);

    assert_eq!(
        qpq_tokens("a QPQ_* b ${QPQ_LOG:-x} XQPQ_NO $(QPQ_A1_B).x"),
        [(1, "QPQ_LOG".to_owned()), (1, "QPQ_A1_B".to_owned())]
    );

    let bogus = Invocation {
        place: "test".to_owned(),
        args: vec!["qpq-server".to_owned(), "no-such-subcommand".to_owned()],
    };
    assert!(check_invocation(&bogus).is_err());
    let bad_flag = Invocation {
        place: "test".to_owned(),
        args: vec!["migrate".to_owned(), "--no-such-flag".to_owned()],
    };
    assert!(check_invocation(&bad_flag).is_err());
    Ok(())
}
