//! Man pages and shell completions for the release tarball, generated from
//! the very clap definitions the binary parses with, so they never drift.
//!
//! Reached through a hidden first argument (`ctdrop __dist-assets DIR`)
//! rather than a subcommand: `cargo xtask dist` cannot depend on this crate
//! (xtask must install bpf-linker before the eBPF crate can build), so it
//! runs the freshly built host binary instead, and the command stays out of
//! `--help`, the man pages and the completions themselves.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// The argument main() looks for before clap parses anything.
pub const HIDDEN_ARG: &str = "__dist-assets";

/// Writes `DIR/man/ctdrop*.1` (one page per subcommand too) and
/// `DIR/completions/{ctdrop.bash,_ctdrop,ctdrop.fish}`.
pub fn write(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "ctdrop", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}
