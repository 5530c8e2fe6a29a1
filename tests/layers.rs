//! The layering of `src/` stays true: `src/lib.rs`'s `# Layout` lists the top-level modules from
//! the top floor down, and every module may use only modules listed after it (below it). This
//! test reads every `crate::`, `super::` and `self::` path in `src/` (outside comments) and fails
//! naming the file, the line and the upward arrow. Inside the server layers (`net`, `net/http`,
//! `net/ws`, `shard`, `subscribe`) the files of one directory must not import each other in a
//! circle either (a `mod.rs` counts as a file of its directory).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Directories whose files must form no import circle.
const ACYCLIC_DIRS: &[&str] = &["net", "net/http", "net/ws", "shard", "subscribe"];

/// The module path of a source file: `src/net/ws/read.rs` -> `[net, ws, read]`,
/// `src/net/mod.rs` -> `[net]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

fn ident_len(s: &[u8]) -> usize {
    s.iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
        .count()
}

/// Parses the path after `crate::` (or `super::`/`self::`) at `s`: every path it names, as
/// segments (a `{..}` group yields one path per member, nested groups included).
fn parse_paths(s: &[u8], prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut i = 0;
    let mut segs = prefix;
    loop {
        while i < s.len() && s[i] == b' ' {
            i += 1;
        }
        if i < s.len() && s[i] == b'{' {
            i += 1;
            loop {
                while i < s.len() && matches!(s[i], b' ' | b',' | b'\n') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                i += parse_paths(&s[i..], segs.clone(), out);
            }
        }
        let n = ident_len(&s[i..]);
        if n == 0 {
            out.push(segs);
            return i;
        }
        segs.push(String::from_utf8_lossy(&s[i..i + n]).into_owned());
        i += n;
        if s[i..].starts_with(b"::") {
            i += 2;
        } else {
            out.push(segs);
            return i;
        }
    }
}

/// Every absolute module path the source `text` of module `me` refers to, with its line
/// number. Unit-test modules (from the first `#[cfg(test)]` on, at the end of a file by
/// convention) are not part of the layering and are not read.
fn references(text: &str, me: &[String]) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    // A whole `use` statement may span lines: join each statement's lines first.
    let mut joined = String::new();
    let mut starts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        starts.push((joined.len(), n + 1));
        joined.push_str(line);
        joined.push('\n');
    }
    let bytes = joined.as_bytes();
    let line_of = |pos: usize| {
        let k = starts.partition_point(|(p, _)| *p <= pos);
        starts[k - 1].1
    };
    for (kw, base) in [
        ("crate::", Vec::new()),
        // `super` is the parent module, whether `me` is a file or a directory module.
        ("super::", me[..me.len().saturating_sub(1)].to_vec()),
        ("self::", me.to_vec()),
    ] {
        let mut from = 0;
        while let Some(k) = joined[from..].find(kw) {
            let at = from + k;
            from = at + kw.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let mut paths = Vec::new();
            parse_paths(&bytes[from..], base.clone(), &mut paths);
            for p in paths {
                out.push((line_of(at), p));
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules in `# Layout`, top floor first.
fn layout(lib: &str) -> Vec<String> {
    let section = lib
        .split("//! # Layout")
        .nth(1)
        .expect("src/lib.rs has a # Layout section");
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .map(|l| l.split('`').next().unwrap().to_owned())
        .collect()
}

/// A circle in `graph`, if any (as the nodes along it).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let i = stack.iter().position(|s| s == n).unwrap();
                let mut c = stack[i..].to_vec();
                c.push(n.to_owned());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_parser_reads_grouped_nested_and_relative_paths() {
    // The reader itself: grouped and nested imports, inline paths, `super` from a file and from
    // a directory module, and comments skipped.
    let me: Vec<String> = vec!["net".into(), "ws".into(), "read".into()];
    let text = "use crate::{a::b, c::{d, e::F}};\n// crate::zzz\nlet x = crate::g::h();\nuse super::write::Sink;\n#[cfg(test)]\nuse crate::q;\n";
    let got: Vec<Vec<String>> = references(text, &me).into_iter().map(|(_, p)| p).collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        got,
        vec![
            s(&["a", "b"]),
            s(&["c", "d"]),
            s(&["c", "e", "F"]),
            s(&["g", "h"]),
            s(&["net", "ws", "write", "Sink"]),
        ]
    );
    let dir: Vec<String> = vec!["net".into(), "ws".into()];
    let got = references("use super::edge::Edge;", &dir);
    assert_eq!(got[0].1, s(&["net", "edge", "Edge"]));
}

#[test]
fn imports_point_down_the_layout_of_lib_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let order = layout(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let floor: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut tops = BTreeSet::new();
    let mut dirs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let name = file.file_name().unwrap();
        if name == "lib.rs" || name == "main.rs" {
            continue;
        }
        let me = module_path(&src, file);
        tops.insert(me[0].clone());
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(src.parent().unwrap()).unwrap().display();
        for (line, path) in references(&text, &me) {
            let Some(top) = path.first() else { continue };
            if !floor.contains_key(top.as_str()) {
                continue; // an item of the crate root (none today) or a macro path
            }
            if *top != me[0] {
                if floor.get(top.as_str()) <= floor.get(me[0].as_str()) {
                    problems.push(format!(
                        "{shown}:{line}: `{}` uses `{top}`, which the # Layout of src/lib.rs lists above it",
                        me[0]
                    ));
                }
                continue;
            }
            // Within the server layers' directories: the arrow between two files of the
            // deepest directory holding both.
            for d in ACYCLIC_DIRS {
                let dir: Vec<&str> = d.split('/').collect();
                let inside =
                    |p: &[String]| p.len() >= dir.len() && p.iter().zip(&dir).all(|(a, b)| a == b);
                if !inside(&me) || !inside(&path) {
                    continue;
                }
                let from = me
                    .get(dir.len())
                    .cloned()
                    .unwrap_or_else(|| "mod".to_owned());
                // A path into the directory names a child file only if that file exists.
                let to = match path.get(dir.len()) {
                    Some(child)
                        if src.join(d).join(format!("{child}.rs")).exists()
                            || src.join(d).join(child).join("mod.rs").exists() =>
                    {
                        child.clone()
                    }
                    _ => "mod".to_owned(),
                };
                if from != to {
                    dirs.entry(d.to_string())
                        .or_default()
                        .entry(from)
                        .or_default()
                        .insert(to);
                }
            }
        }
    }
    for t in &tops {
        if !floor.contains_key(t.as_str()) {
            problems.push(format!("src/{t}: not listed in the # Layout of src/lib.rs"));
        }
    }
    for m in &order {
        if !tops.contains(m) {
            problems.push(format!(
                "# Layout of src/lib.rs lists `{m}`, which is not in src/"
            ));
        }
    }
    for (d, graph) in &dirs {
        if let Some(c) = find_cycle(graph) {
            problems.push(format!(
                "src/{d}: files import each other in a circle: {}",
                c.join(" -> ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}
