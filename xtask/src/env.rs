//! Where things live: the repo, cargo's home, our cache, the target dir.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// Puts `$CARGO_HOME/bin` first on PATH so every child process (rustup's
/// `cargo +nightly`, aya-build looking for bpf-linker, the tests) finds the
/// bpf-linker we install there, even when the caller's PATH lacks it.
pub fn init() -> Result<()> {
    let bin = cargo_home()?.join("bin");
    let rest = env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(bin.clone()).chain(env::split_paths(&rest).filter(|p| *p != bin));
    let joined = env::join_paths(paths).context("building PATH")?;
    // Done before any thread or child exists, so mutating the environment is sound.
    env::set_var("PATH", joined);
    Ok(())
}

pub fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

pub fn cargo_home() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// Our own state (bpf-linker marker, LLVM prefix); survives `cargo clean`.
/// CTDROP_CACHE is the override xtask/vm.sh uses for the same directory.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("CTDROP_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let base = match env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => home()?.join(".cache"),
    };
    Ok(base.join("ctdrop"))
}

/// The workspace root: xtask always sits one level below it.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// Honours CARGO_TARGET_DIR so the binary path we print is the one cargo wrote.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// The cargo that runs us: children then use the same toolchain.
pub fn cargo() -> std::ffi::OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}
