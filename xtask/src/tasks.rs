//! build, test, demo, bench.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{env, proc, setup};

/// Namespace prefixes the tests and the demo create; anything left with
/// these names after a run is a cleanup bug worth failing on.
const OUR_NETNS_PREFIXES: &[&str] = &["ctdt-", "ctdc-", "ctdo-", "ctdemo-", "ctdb-", "ctdw-"];

pub fn build() -> Result<PathBuf> {
    setup::run()?;
    build_binary()
}

/// tracer-user's build script builds the eBPF crate (aya-build) and embeds
/// the object, so this one command yields a self-contained binary.
fn build_binary() -> Result<PathBuf> {
    proc::check(
        Command::new(env::cargo())
            .args(["build", "--release", "-p", "tracer-user"])
            .current_dir(env::repo_root()),
    )?;
    let bin = env::target_dir().join("release/ctdrop");
    ensure!(
        bin.is_file(),
        "cargo build succeeded but {} is missing",
        bin.display()
    );
    println!("build: {}", bin.display());
    Ok(bin)
}

pub fn test(args: &[String]) -> Result<ExitCode> {
    let bin = build()?;
    // Lints first: a style slip is named in minutes, not after the suite.
    let mut failed = lint()?;
    // The release tarballs and the image too: tests/tests/ship.rs runs what ships.
    crate::dist::run(&[])?;
    crate::image::run()?;
    if !proc::status(&mut unit_tests(args))?.success() {
        failed.push("unit tests".to_owned());
    }
    if !proc::status(&mut integration_tests(args, &bin))?.success() {
        failed.push("integration tests".to_owned());
    }
    failed.extend(reap_leaked_netns()?);
    if !failed.is_empty() {
        bail!("test failed: {}", failed.join(", "));
    }
    println!("test: all passed");
    Ok(ExitCode::SUCCESS)
}

/// Crates whose modules may not import each other in a circle (xtask's
/// own bench/ still has one: its parent holds what its children share).
const MODULE_GATED: &[&str] = &["tracer-user", "tracer-common", "ctlab", "tests"];

/// `cargo xtask modules [SRC]`: the import graph (`module -> imports`) and
/// its circles, as the lint sees them.
pub fn modules(src: Option<PathBuf>) -> Result<ExitCode> {
    let src = src.unwrap_or_else(|| env::repo_root().join("tracer-user/src"));
    let g = crate::modcycles::graph(&crate::modcycles::load(&src)?);
    for (m, deps) in &g {
        let deps: Vec<&str> = deps
            .iter()
            .map(|d| if d.is_empty() { "crate" } else { d })
            .collect();
        println!(
            "{} -> {}",
            if m.is_empty() { "crate" } else { m },
            deps.join(", ")
        );
    }
    let circles = crate::modcycles::check(&src)?;
    for c in &circles {
        println!("circle: {c}");
    }
    println!("{} circles", circles.len());
    Ok(if circles.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo xtask lint`: the gates of `test` alone.
pub fn lint_task() -> Result<ExitCode> {
    setup::run()?;
    let failed = lint()?;
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("lint: all passed");
    Ok(ExitCode::SUCCESS)
}

/// Style and lint gates, run before the tests so a slip is named first:
/// rustfmt over the whole workspace, clippy with warnings as errors on the
/// host crates, and clippy on the eBPF crate with the pinned nightly and
/// the bpf target it alone builds for.
fn lint() -> Result<Vec<String>> {
    let root = env::repo_root();
    let mut failed = Vec::new();
    // First: it takes milliseconds and names the imports that close a loop.
    for krate in MODULE_GATED {
        let circles = crate::modcycles::check(&root.join(krate).join("src"))?;
        for c in &circles {
            eprintln!("lint: {krate}: {c}");
        }
        if !circles.is_empty() {
            failed.push(format!(
                "module circles in {krate} (see `cargo xtask modules`)"
            ));
        }
    }
    let fmt = Command::new(env::cargo())
        .args(["fmt", "--all", "--check"])
        .current_dir(root)
        .status()
        .context("cannot run cargo fmt")?;
    if !fmt.success() {
        failed.push("cargo fmt --check (run `cargo fmt --all`)".to_owned());
    }
    let host = Command::new(env::cargo())
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "tracer-ebpf",
            "--all-targets",
            "--release",
        ])
        .args(["--", "-D", "warnings"])
        .current_dir(root)
        .status()
        .context("cannot run cargo clippy")?;
    if !host.success() {
        failed.push("clippy (host crates)".to_owned());
    }
    // Its own target dir: the bpf-target check must not invalidate the
    // release build that aya-build keeps for the embedded object.
    let ebpf = Command::new("rustup")
        .args([
            "run",
            crate::toolchains::EBPF_NIGHTLY,
            "cargo",
            "clippy",
            "-p",
            "tracer-ebpf",
        ])
        .args([
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ])
        .args(["--", "-D", "warnings"])
        .env("CARGO_TARGET_DIR", env::target_dir().join("clippy-bpf"))
        .env("RUSTFLAGS", "--cfg bpf_target_arch=\"x86_64\"")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .current_dir(root)
        .status()
        .context("cannot run clippy for the eBPF crate")?;
    if !ebpf.success() {
        failed.push("clippy (tracer-ebpf, bpf target)".to_owned());
    }
    Ok(failed)
}

/// tracer-ebpf is excluded too: it is no_std/no_main and only builds for
/// the bpf target (aya-build does that).
fn unit_tests(args: &[String]) -> Command {
    let mut cmd = Command::new(env::cargo());
    cmd.args(["test", "--workspace", "--release"])
        .args([
            "--exclude",
            "ctdrop-tests",
            "--exclude",
            "tracer-ebpf",
            "--",
        ])
        .args(args)
        .current_dir(env::repo_root());
    cmd
}

/// One thread: the tests change the global sysctl nf_conntrack_max.
fn integration_tests(args: &[String], bin: &std::path::Path) -> Command {
    let mut cmd = Command::new(env::cargo());
    cmd.args([
        "test",
        "--release",
        "-p",
        "ctdrop-tests",
        // Every test file runs even after one fails: CI shows all failures.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ])
    .args(args)
    .env("CTDROP_BIN", bin)
    .env("CTDROP_DIST", env::target_dir().join("dist"))
    .current_dir(env::repo_root());
    cmd
}

/// Deletes namespaces a test or the demo left behind and names each one as
/// a failure, so a leak never goes unnoticed nor poisons the next run.
fn reap_leaked_netns() -> Result<Vec<String>> {
    let listing = proc::probe(Command::new("ip").args(["netns", "list"]))
        .context("`ip netns list` failed")?;
    let mut leaks = Vec::new();
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(prefix) = OUR_NETNS_PREFIXES.iter().find(|p| name.starts_with(**p)) else {
            continue;
        };
        if owner_alive(&name[prefix.len()..]) {
            // `<prefix><pid>-<n>` of a test process still running: another
            // suite's namespace, not a leak of ours.
            continue;
        }
        eprintln!("test: netns {name} was left behind; deleting it");
        let deleted = proc::status(Command::new("ip").args(["netns", "delete", name]))?.success();
        leaks.push(format!(
            "leaked netns {name}{}",
            if deleted { "" } else { " (could not delete)" }
        ));
    }
    Ok(leaks)
}

/// Whether the pid that leads `rest` (`<pid>-<n>`) is a live process.
fn owner_alive(rest: &str) -> bool {
    rest.split('-')
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| {
            pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
}

/// exec, not spawn: Ctrl-C, the exit code and the terminal all belong to ctdrop.
pub fn demo(args: &[String]) -> Result<ExitCode> {
    let bin = build()?;
    let err = Command::new(&bin).arg("demo").args(args).exec();
    Err(err).with_context(|| format!("cannot exec {} demo", bin.display()))
}

/// Not part of `test`: it takes minutes, needs the whole machine quiet and
/// holds the nf_conntrack_max lock throughout.
pub fn bench(a: &crate::BenchArgs) -> Result<()> {
    let bin = build()?;
    crate::bench::run(&crate::bench::Options {
        rounds: a.rounds as usize,
        seconds: a.seconds,
        only: a.only.clone(),
        ring_sweep: a.ring_sweep.clone(),
        ctdrop_configs: a.ctdrop_configs.clone(),
        ctdrop_args: a.ctdrop_args.clone(),
        skip_scale: a.no_scale,
        cpu: Some(a.cpu),
        ctdrop: bin,
        out_dir: env::target_dir().join("bench"),
        load_at_start: crate::bench::load(),
    })
}
