//! `cargo xtask <task>`: the one entry point for setting up a machine,
//! building, testing and demoing ctdrop.

mod bench;
mod bpf_linker;
mod dist;
mod env;
mod image;
mod modcycles;
mod proc;
mod setup;
mod tasks;
#[path = "../../toolchains.rs"]
mod toolchains;

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

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds per configuration (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Flood length per round, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Only these configurations (a is always run: it is the baseline), e.g. `--only b,c`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also run (b) with each of these --ring-size values, e.g. `--ring-sweep 256k,1M,16M`.
    #[arg(long, value_delimiter = ',')]
    pub ring_sweep: Vec<String>,
    /// Another configuration, KEY=ctdrop arguments (repeatable), run like (b)
    /// with stdout to /dev/null, e.g. `--ctdrop-config "w=watch --ring-size 1M"`;
    /// it must print ctdrop's `attached` and `stopped` lines. Arguments that
    /// start with an absolute path run that binary instead of this tree's,
    /// e.g. `--ctdrop-config "old=/tmp/ctdrop-old live --json"` (an A/B of
    /// two builds in one run).
    #[arg(long = "ctdrop-config")]
    pub ctdrop_configs: Vec<String>,
    /// Extra argument for every ctdrop run (repeatable), e.g. `--ctdrop-arg=--ring-size=1M`.
    #[arg(long = "ctdrop-arg", allow_hyphen_values = true)]
    pub ctdrop_args: Vec<String>,
    /// Skip the 1,000,000-flow memory runs.
    #[arg(long)]
    pub no_scale: bool,
    /// CPU the flood runs on (its receive path runs there too).
    #[arg(long, default_value_t = 0)]
    pub cpu: usize,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, nightly, bpf-linker).
    Setup,
    /// Setup, then build target/release/ctdrop (with the eBPF object embedded).
    Build,
    /// Static release tarballs in target/dist (musl; x86_64 and aarch64), with
    /// man pages, completions, licences and sha256 files.
    Dist {
        /// Only this target (repeatable), e.g. x86_64-unknown-linux-musl.
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// The FROM scratch OCI image (x86_64 static binary) as an OCI archive
    /// in target/dist, built with buildah.
    Image,
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
    /// Setup and build, then flood drops under no tracer, ctdrop and bpftrace
    /// in alternating rounds and print the table (root; several minutes).
    Bench(BenchArgs),
    /// No module import circles, then rustfmt and clippy (warnings as
    /// errors) over every crate, the eBPF one on its bpf target; `test` runs
    /// these first.
    Lint,
    /// Print a crate's module import graph and its circles (default: tracer-user).
    Modules {
        /// The crate's src directory.
        src: Option<std::path::PathBuf>,
    },
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
        Task::Dist { targets } => dist::run(&targets).map(|_| ExitCode::SUCCESS),
        Task::Image => image::run().map(|_| ExitCode::SUCCESS),
        Task::Test { args } => tasks::test(&args),
        Task::Demo { args } => tasks::demo(&args),
        Task::Bench(a) => tasks::bench(&a).map(|()| ExitCode::SUCCESS),
        Task::Lint => tasks::lint_task(),
        Task::Modules { src } => tasks::modules(src),
    }
}
