//! ctdrop runs as root with operator-typed strings (hosts, namespace names,
//! paths): none of them may reach a shell or another program. Remediation
//! (iptables, sysctl) is printed as advice, never executed. This test reads
//! the sources and fails on any way of starting a program.

use std::path::{Path, PathBuf};

/// Ways to run another program from Rust or libc.
const FORBIDDEN: &[&str] = &[
    "process::Command",
    "Command::new",
    "CommandExt",
    "libc::system",
    "libc::popen",
    "libc::execv",
    "libc::execl",
    "libc::fork",
    "libc::posix_spawn",
    "/bin/sh",
];

/// Files allowed to start programs, each with why its arguments cannot come
/// from the operator.
const ALLOWED: &[&str] = &[
    // `ctdrop demo` builds its own throwaway world (ip netns/link/addr,
    // iptables, conntrack -D) with constant names and addresses and the
    // argv of advice ctdrop generated; its only option is a number.
    "demo/stage.rs",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of `text` that mention a forbidden call, comments excluded.
fn offending_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split("//").next().unwrap_or("");
            FORBIDDEN.iter().any(|f| code.contains(f))
        })
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .collect()
}

#[test]
fn the_scanner_sees_a_shell_out() {
    let sample = "let out = std::process::Command::new(\"iptables\").arg(user).output();\n// Command::new in a comment is fine\n";
    assert_eq!(offending_lines(sample).len(), 1);
    assert!(offending_lines("use std::os::unix::process::CommandExt;").len() == 1);
}

#[test]
fn tracer_user_starts_no_programs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 10,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if ALLOWED.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in offending_lines(&text) {
            found.push(format!("src/{rel}:{n}: {line}"));
        }
    }
    assert!(
        found.is_empty(),
        "ctdrop must not start programs (print advice instead):\n{}",
        found.join("\n")
    );
}
