//! `cargo xtask <task>`: the one entry point for setting up a machine,
//! building, testing and demoing ctdrop.

mod bpf_linker;
mod env;
mod proc;
mod setup;
mod tasks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "ctdrop project tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, nightly, bpf-linker).
    Setup,
    /// Setup, then build target/release/ctdrop (with the eBPF object embedded).
    Build,
    /// Setup and build, then run unit and integration tests (root needed).
    Test {
        /// Passed to every test binary, e.g. a name filter or --nocapture.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup and build, then run `ctdrop demo` with the given arguments.
    Demo {
        /// Passed to `ctdrop demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Not implemented yet.
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match env::init().and_then(|()| run(cli.task)) {
        Ok(code) => code,
        Err(err) => {
            // `{:#}` joins the context chain on one line; no backtrace on purpose.
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<ExitCode> {
    match task {
        Task::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Task::Build => tasks::build().map(|_| ExitCode::SUCCESS),
        Task::Test { args } => tasks::test(&args),
        Task::Demo { args } => tasks::demo(&args),
        Task::Bench => Ok(tasks::bench()),
    }
}
