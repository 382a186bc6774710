//! The module-circle gate: no module of a crate may import one that imports
//! it back, directly or around a loop.
//!
//! The rule, per file module (`a/mod.rs` is `a`, `a/b.rs` is `a::b`):
//! - an edge A -> B is any path in A's non-test code that names an item of
//!   B: `use crate::…` trees, `crate::…`, `super::…`, `self::…` paths, and
//!   paths through a module A declared or imported (`sink::Thing`);
//! - a path resolves to the deepest file module it names; an item a parent
//!   re-exports from its own child (`pub use child::Item;` in `mod.rs`) is
//!   followed to the child, and the re-export itself is no edge: a facade is
//!   fine, but a child that imports its parent's own items while the parent
//!   uses the child is a circle;
//! - `#[cfg(test)]` items and test-only modules do not count: tests may reach
//!   anywhere.
//!
//! A hand tokenizer, not a parser: comments, strings and char literals are
//! blanked, then paths are read from what is left. Good enough for a gate
//! whose failure names the files, so a miss is seen and fixed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::Path,
};

use anyhow::{Context, Result};

/// Module path ("" for the crate root) to its dependencies.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads every `.rs` file under `src` (root `lib.rs`) into modules.
pub fn load(src: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    walk(src, src, &mut files)?;
    Ok(files)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match parts.as_slice() {
            // The binary crate root reaches the library by its crate name.
            [only] if only == "main" => continue,
            [only] if only == "lib" => parts.clear(),
            _ if parts.last().is_some_and(|l| l == "mod") => {
                parts.pop();
            }
            _ => {}
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        out.insert(parts.join("::"), text);
    }
    Ok(())
}

/// The import graph of a crate given as module path -> source text.
pub fn graph(files: &BTreeMap<String, String>) -> Graph {
    let mut code: BTreeMap<String, String> = BTreeMap::new();
    let mut test_only: BTreeSet<String> = BTreeSet::new();
    for (m, text) in files {
        let (kept, test_mods) = strip_tests(&blank(text));
        for t in test_mods {
            test_only.insert(join(m, &t));
        }
        code.insert(m.clone(), kept);
    }
    // A test-only module's children are test-only too.
    let is_test = |m: &str| {
        test_only
            .iter()
            .any(|t| m == t || m.starts_with(&format!("{t}::")))
    };
    let modules: BTreeSet<String> = code.keys().filter(|m| !is_test(m)).cloned().collect();
    let uses: BTreeMap<String, Vec<UseItem>> = modules
        .iter()
        .map(|m| (m.clone(), use_items(&code[m])))
        .collect();
    // Re-exports of a module's own descendants: (module, name) -> target path.
    let mut reexports: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (m, items) in &uses {
        for u in items.iter().filter(|u| u.public) {
            let abs = absolute(m, &u.path, &modules);
            if let Some(target) = abs {
                if target.len() > 1 && is_descendant(m, &target, &modules) {
                    reexports.insert((m.clone(), u.name.clone()), target);
                }
            }
        }
    }
    let mut g = Graph::new();
    for m in &modules {
        let mut deps = BTreeSet::new();
        let mut aliases: HashMap<String, String> = HashMap::new();
        for u in &uses[m] {
            let Some(abs) = absolute(m, &u.path, &modules) else {
                continue;
            };
            let target = resolve(&abs, &modules, &reexports);
            if modules.contains(&abs.join("::")) {
                aliases.insert(u.name.clone(), abs.join("::"));
            }
            // A facade line is no edge; whoever imports through it is.
            let facade = u.public && reexports.contains_key(&(m.clone(), u.name.clone()));
            if !facade && target != *m && !(m.is_empty() && target.is_empty()) {
                deps.insert(target);
            }
        }
        for p in code_paths(&code[m]) {
            let abs = match p[0].as_str() {
                "crate" | "super" | "self" => absolute(m, &p, &modules),
                first => {
                    // A declared child, else a module brought in by `use`.
                    let child = join(m, first);
                    let base = if modules.contains(&child) {
                        Some(child)
                    } else {
                        aliases.get(first).cloned()
                    };
                    base.map(|b| {
                        split(&b)
                            .into_iter()
                            .chain(p[1..].iter().cloned())
                            .collect()
                    })
                }
            };
            if let Some(abs) = abs {
                let target = resolve(&abs, &modules, &reexports);
                if target != *m {
                    deps.insert(target);
                }
            }
        }
        // Declaring a child (`mod x;`) is not importing it.
        g.insert(m.clone(), deps);
    }
    g
}

/// Every strongly connected set of more than one module, and every module
/// that imports itself through a re-export, sorted.
pub fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut c = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(w);
                c.push(name(w));
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                t.out.push(c);
            }
        }
    }
    let mut t = T {
        g,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out.sort();
    t.out
}

/// One loop through a circle's modules, to show which imports close it.
pub fn loop_in(g: &Graph, members: &[String]) -> Vec<String> {
    let set: BTreeSet<&str> = members.iter().map(String::as_str).collect();
    let start = members[0].as_str();
    // Breadth-first from start's successors back to start, inside the set.
    let mut prev: HashMap<&str, &str> = HashMap::new();
    let mut queue = std::collections::VecDeque::new();
    for w in &g[start] {
        if set.contains(w.as_str()) && !prev.contains_key(w.as_str()) {
            prev.insert(w, start);
            queue.push_back(w.as_str());
        }
    }
    while let Some(v) = queue.pop_front() {
        if v == start {
            break;
        }
        for w in &g[v] {
            if set.contains(w.as_str()) && !prev.contains_key(w.as_str()) {
                prev.insert(w, v);
                queue.push_back(w.as_str());
            }
        }
    }
    let mut path = vec![name(start)];
    let mut v = prev.get(start).copied();
    while let Some(x) = v {
        path.push(name(x));
        if x == start {
            break;
        }
        v = prev.get(x).copied();
    }
    path.reverse();
    path
}

fn name(m: &str) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.to_owned()
    }
}

/// Checks one crate's `src`; Err lists every circle with one loop in it.
pub fn check(src: &Path) -> Result<Vec<String>> {
    let g = graph(&load(src)?);
    Ok(cycles(&g)
        .iter()
        .map(|c| {
            format!(
                "{} modules in a circle: {} (e.g. {})",
                c.len(),
                c.join(", "),
                loop_in(&g, c).join(" -> ")
            )
        })
        .collect())
}

fn join(m: &str, child: &str) -> String {
    if m.is_empty() {
        child.to_owned()
    } else {
        format!("{m}::{child}")
    }
}

fn split(m: &str) -> Vec<String> {
    if m.is_empty() {
        Vec::new()
    } else {
        m.split("::").map(str::to_owned).collect()
    }
}

fn is_descendant(m: &str, target: &[String], modules: &BTreeSet<String>) -> bool {
    let owner = deepest(target, modules);
    owner != m && (m.is_empty() || owner.starts_with(&format!("{m}::")))
}

/// `path` as segments from the crate root; None when it is not a crate path.
fn absolute(m: &str, path: &[String], modules: &BTreeSet<String>) -> Option<Vec<String>> {
    let mut base = split(m);
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        // 2018 paths: a declared child module, else an outside crate.
        Some(first) if modules.contains(&join(m, first)) => {}
        _ => return None,
    }
    base.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(base)
}

/// The deepest module a path names (a prefix of it that is a module).
fn deepest(path: &[String], modules: &BTreeSet<String>) -> String {
    for n in (0..=path.len()).rev() {
        let cand = path[..n].join("::");
        if modules.contains(&cand) {
            return cand;
        }
    }
    String::new()
}

/// The deepest module, following re-exports of children to the child.
fn resolve(
    path: &[String],
    modules: &BTreeSet<String>,
    reexports: &HashMap<(String, String), Vec<String>>,
) -> String {
    let mut path = path.to_vec();
    for _ in 0..8 {
        let owner = deepest(&path, modules);
        let depth = split(&owner).len();
        match path.get(depth) {
            Some(item) => match reexports.get(&(owner.clone(), item.clone())) {
                Some(t) => {
                    let mut next = t.clone();
                    next.extend(path[depth + 1..].iter().cloned());
                    path = next;
                }
                None => return owner,
            },
            None => return owner,
        }
    }
    deepest(&path, modules)
}

struct UseItem {
    public: bool,
    /// Full path of the imported thing (`self` in a tree resolved away).
    path: Vec<String>,
    /// Name it is known by in the importing module.
    name: String,
}

/// Every `use` declaration, its tree expanded.
fn use_items(code: &str) -> Vec<UseItem> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == "use" {
            let public = i > 0 && (toks[i - 1] == "pub" || toks[i - 1] == ")");
            let end = (i..toks.len())
                .find(|&j| toks[j] == ";")
                .unwrap_or(toks.len());
            let mut leaves = Vec::new();
            tree(&toks[i + 1..end], &mut Vec::new(), &mut leaves);
            for (path, name) in leaves {
                out.push(UseItem { public, path, name });
            }
            i = end;
        }
        i += 1;
    }
    out
}

/// Expands a use tree into (path, local name) leaves.
fn tree(toks: &[String], prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    let mut i = 0;
    let start = prefix.len();
    while i < toks.len() {
        let t = toks[i].as_str();
        match t {
            "::" => {}
            "{" => {
                let close = matching(toks, i);
                for part in split_commas(&toks[i + 1..close]) {
                    tree(part, prefix, out);
                }
                prefix.truncate(start);
                return;
            }
            "*" => {
                out.push((prefix.clone(), "*".to_owned()));
                prefix.truncate(start);
                return;
            }
            "as" => {
                let alias = toks.get(i + 1).cloned().unwrap_or_default();
                out.push((prefix.clone(), alias));
                prefix.truncate(start);
                return;
            }
            _ => prefix.push(t.to_owned()),
        }
        i += 1;
    }
    if prefix.len() > start || !prefix.is_empty() {
        let mut path = prefix.clone();
        let mut name = path.last().cloned().unwrap_or_default();
        if name == "self" {
            path.pop();
            name = path.last().cloned().unwrap_or_default();
        }
        if !path.is_empty() {
            out.push((path, name));
        }
    }
    prefix.truncate(start);
}

fn matching(toks: &[String], open: usize) -> usize {
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t.as_str() {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

fn split_commas(toks: &[String]) -> Vec<&[String]> {
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (j, t) in toks.iter().enumerate() {
        match t.as_str() {
            "{" => depth += 1,
            "}" => depth -= 1,
            "," if depth == 0 => {
                parts.push(&toks[from..j]);
                from = j + 1;
            }
            _ => {}
        }
    }
    parts.push(&toks[from..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Paths outside `use` lines: `a::b::c` sequences, as segment lists.
fn code_paths(code: &str) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == "use" {
            i = (i..toks.len())
                .find(|&j| toks[j] == ";")
                .unwrap_or(toks.len());
            continue;
        }
        // A path starts at an identifier not itself after `::`.
        let after_colons = i > 0 && toks[i - 1] == "::";
        if is_ident(&toks[i]) && !after_colons && toks.get(i + 1).is_some_and(|t| t == "::") {
            let mut p = vec![toks[i].clone()];
            let mut j = i + 1;
            while toks.get(j).is_some_and(|t| t == "::")
                && toks.get(j + 1).is_some_and(|t| is_ident(t))
            {
                p.push(toks[j + 1].clone());
                j += 2;
            }
            out.push(p);
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphanumeric() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(code[s..i].to_owned());
            continue;
        }
        if c == b':' && b.get(i + 1) == Some(&b':') {
            out.push("::".to_owned());
            i += 2;
            continue;
        }
        if !c.is_ascii_whitespace() {
            out.push((c as char).to_string());
        }
        i += 1;
    }
    out
}

/// Comments, strings and char literals replaced by spaces (newlines kept).
fn blank(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let space = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    space(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if (rest.starts_with(b"r#") || rest.starts_with(b"r\"") || rest.starts_with(b"br"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && raw_string_len(rest).is_some()
        {
            let n = raw_string_len(rest).expect("checked");
            for &c in &b[i..i + n] {
                space(&mut out, c);
            }
            i += n;
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    space(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\''), not a lifetime ('a).
            let n = if b.get(i + 1) == Some(&b'\\') {
                (i + 2..b.len().min(i + 12))
                    .find(|&j| b[j] == b'\'')
                    .map(|j| j + 1 - i)
            } else {
                let ch = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(ch + 2)
            };
            match n {
                Some(n) => {
                    out.extend(std::iter::repeat_n(b' ', n));
                    i += n;
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Length of a raw (byte) string literal at the start of `s`.
fn raw_string_len(s: &[u8]) -> Option<usize> {
    let mut i = if s.starts_with(b"br") { 2 } else { 1 };
    let hashes = s[i..].iter().take_while(|&&c| c == b'#').count();
    i += hashes;
    if s.get(i) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let end = s[i + 1..].windows(close.len()).position(|w| w == close)?;
    Some(i + 1 + end + close.len())
}

/// Removes `#[cfg(test)]` items; returns the code left and the names of
/// test-only child modules it declares (`#[cfg(test)] mod tests;`).
fn strip_tests(code: &str) -> (String, Vec<String>) {
    let mut out = code.to_owned();
    let mut test_mods = Vec::new();
    while let Some(at) = out.find("#[cfg(test)]") {
        let b = out.as_bytes();
        let mut i = at + "#[cfg(test)]".len();
        // Further attributes on the same item.
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if b[i..].starts_with(b"#[") {
                let mut depth = 0;
                while i < b.len() {
                    match b[i] {
                        b'[' => depth += 1,
                        b']' => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            } else {
                break;
            }
        }
        let head: Vec<String> = tokens(&out[i..out.len().min(i + 200)]);
        if let Some(pos) = head.iter().position(|t| t == "mod") {
            if head.get(pos + 2).is_some_and(|t| t == ";") {
                test_mods.push(head[pos + 1].clone());
            }
        }
        // The item ends at `;` before any `{`, or at the `{`'s match.
        let mut end = i;
        let mut depth = 0;
        while end < b.len() {
            match b[end] {
                b';' if depth == 0 => {
                    end += 1;
                    break;
                }
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end += 1;
                        break;
                    }
                }
                _ => {}
            }
            end += 1;
        }
        out.replace_range(at..end, "");
    }
    (out, test_mods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(m, t)| (m.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn a_use_tree_closing_a_loop_is_a_circle() {
        let c = crate_of(&[
            ("", "pub mod a; pub mod b; pub mod c;"),
            ("a", "use crate::{b::{self, B}, x::Y};\nfn f() { B; }"),
            ("b", "pub struct B; fn g() { crate::c::h(); }"),
            ("c", "use super::a as aa; pub fn h() {}"),
        ]);
        let g = graph(&c);
        assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
        assert_eq!(loop_in(&g, &cycles(&g)[0]), vec!["a", "b", "c", "a"]);
    }

    #[test]
    fn a_child_importing_its_parents_own_items_is_a_circle() {
        let c = crate_of(&[
            ("", "pub mod p;"),
            ("p", "mod k; pub struct Own; fn f() { k::run(); }"),
            ("p::k", "use super::Own; pub fn run() {}"),
        ]);
        assert_eq!(cycles(&graph(&c)), vec![vec!["p", "p::k"]]);
    }

    #[test]
    fn a_parent_reexporting_its_children_is_no_circle() {
        let c = crate_of(&[
            ("", "pub mod p; pub mod q;"),
            ("p", "mod k; mod l; pub use k::K; pub use l::{L, M as N};"),
            ("p::k", "pub struct K; fn f() { crate::p::N; }"),
            ("p::l", "pub struct L; pub struct M;"),
            ("q", "pub struct Q; use crate::p::K;"),
        ]);
        let g = graph(&c);
        assert!(cycles(&g).is_empty(), "{g:?}");
        // The facade is followed to the child that defines the item.
        assert!(g["q"].contains("p::k"), "{g:?}");
        assert!(g["p::k"].contains("p::l"), "{g:?}");
    }

    #[test]
    fn a_reexport_hides_no_circle() {
        let c = crate_of(&[
            ("", "pub mod p;"),
            ("p", "mod k; mod l; pub use l::L;"),
            ("p::k", "pub struct K; use crate::p::L;"),
            ("p::l", "pub struct L; use super::k::K;"),
        ]);
        assert_eq!(cycles(&graph(&c)), vec![vec!["p::k", "p::l"]]);
    }

    #[test]
    fn tests_comments_and_strings_do_not_count() {
        let c = crate_of(&[
            ("", "pub mod a; pub mod b;"),
            (
                "a",
                "// crate::b::X\nconst S: &str = \"crate::b::X\"; const R: &str = r#\"crate::b\"#;\n\
                 fn l<'a>(x: &'a u8) -> char { '\"' }\n\
                 #[cfg(test)]\nmod tests { use crate::b::X; }\n#[cfg(test)]\nmod more;",
            ),
            ("a::more", "use crate::b::X;"),
            ("b", "pub struct X; use crate::a::l;"),
        ]);
        let g = graph(&c);
        assert!(cycles(&g).is_empty(), "{g:?}");
        assert!(!g.contains_key("a::more"));
    }
}
