use clap::Parser;
use ctdrop::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(async {
        match &cli.cmd {
            Command::Live(a) => ctdrop::session::run_live(a).await,
            Command::Check(a) => ctdrop::check::run(a),
            Command::Capture(a) => ctdrop::capture::run(a).await,
            Command::Report(a) => ctdrop::report::run(a),
            Command::Export(a) => ctdrop::report::export::run(a),
            Command::Demo(_) => Err(anyhow::anyhow!("demo: not implemented yet")),
        }
    });
    if let Err(e) = result {
        fail(e);
    }
}

/// One line, no backtrace: the operator is in the middle of an incident.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("ctdrop: {e:#}");
    std::process::exit(1);
}
