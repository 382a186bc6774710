use clap::Parser;
use ctdrop::cli::{Cli, Command};

fn main() {
    one_line_panics();
    // One descriptor per traced namespace, and the soft 1024 is a relic.
    ctdrop::conntrack::netns::raise_fd_limit();
    if let Some(dir) = dist_assets_dir() {
        if let Err(e) = ctdrop::assets::write(&dir) {
            fail(e);
        }
        return;
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(async {
        match &cli.cmd {
            Command::Live(a) => ctdrop::live::run(a).await,
            Command::Top(a) => ctdrop::top::run(a).await,
            Command::Check(a) => ctdrop::check::run(a),
            Command::Capture(a) => ctdrop::capture::run(a).await,
            Command::Report(a) => ctdrop::report::run(a),
            Command::Export(a) => ctdrop::report::export::run(a),
            Command::Demo(a) => ctdrop::demo::run(a).await,
            Command::Watch(a) => ctdrop::watch::run(a).await,
        }
    });
    if let Err(e) = result {
        fail(e);
    }
}

/// `ctdrop __dist-assets DIR` (hidden; `cargo xtask dist` runs it).
fn dist_assets_dir() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    (args.next()? == ctdrop::assets::HIDDEN_ARG)
        .then(|| args.next().map(Into::into))
        .flatten()
}

/// One line, no backtrace: the operator is in the middle of an incident.
fn fail(e: anyhow::Error) -> ! {
    eprintln!("ctdrop: {e:#}");
    std::process::exit(1);
}

/// A bug must not bury the operator's terminal in a backtrace either: one
/// line, then the usual unwinding (which detaches the kernel programs; the
/// kernel would also drop them with our file descriptors). RUST_BACKTRACE
/// brings the full report back.
fn one_line_panics() {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("ctdrop: internal error (a bug, please report it): {msg}{at}");
    }));
}
