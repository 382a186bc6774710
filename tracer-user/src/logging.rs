//! ctdrop's diagnostics: records of the `log` crate, one line each on
//! stderr, `ctdrop: LEVEL: message` (no colours, no timestamps: a terminal
//! does not need them and a service manager adds its own).
//!
//! What is a log record and what is not:
//! - Results are not: drop lines, summaries and reports on stdout; on
//!   stderr the `attached` line scripts wait for, the `stopped` summary
//!   line, `wrote FILE`, and the one `ctdrop: ...` line of an error that
//!   ends the run (exit status 1, main.rs). No level hides them.
//! - Everything else on stderr is a record: `error` (something failed and
//!   the run goes on without it), `warning` (something is lost or less
//!   exact than it could be), `info` (what ctdrop did on its own: hook
//!   marks in a new namespace, a capture written), `debug` (how it decided:
//!   mechanisms, layouts), `trace`.
//!
//! Levels: `info` by default; `-q` only warnings and errors; `-v` debug
//! for ctdrop's own records; `-vv` trace, the libraries' debug records
//! (aya's loader) and the kernel programs' diagnostics. `RUST_LOG`
//! (env_logger syntax: `debug`, `warn,ctdrop=debug`, `bpf=debug`), when
//! set and not empty, replaces what -v and -q chose; `--bpf-log` still
//! adds the kernel diagnostics to it.
//!
//! Kernel diagnostics (aya-log, target `bpf`, printed `ctdrop: debug: bpf:
//! ...`): on when debug is enabled for target `bpf` (`-vv`, `--bpf-log`,
//! `RUST_LOG=debug`, `RUST_LOG=bpf=debug`), else off in the kernel itself:
//! the level is a `.rodata` global of the programs, set before load, so
//! with logging off the verifier removes the logging code and the drop
//! path runs what it ran without it (tracer-ebpf/src/log.rs).
use std::{
    io::Write,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Arc, OnceLock,
    },
    thread::JoinHandle,
};

use anyhow::{anyhow, Context, Result};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Target of the records the kernel programs send (their `target:`).
pub const KERNEL_TARGET: &str = "bpf";

/// What the command line asked for (global flags, `cli::Cli`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Verbosity {
    /// `-v` count.
    pub verbose: u8,
    /// `-q`.
    pub quiet: bool,
    /// `--bpf-log`.
    pub bpf_log: bool,
}

struct Logger {
    filter: env_filter::Filter,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// aya-log's level for the kernel programs (aya_log::Level numbering,
/// 1 error .. 5 trace); 0: off.
static KERNEL_LEVEL: AtomicU8 = AtomicU8::new(0);

/// Installs the logger. `rust_log` is `RUST_LOG` (None or empty: the
/// flags decide). A `RUST_LOG` that does not parse is refused, like any
/// other bad input.
pub fn init(v: Verbosity, rust_log: Option<&str>) -> Result<()> {
    let filter = build_filter(v, rust_log)?;
    KERNEL_LEVEL.store(kernel_level(&filter), Ordering::Relaxed);
    log::set_max_level(filter.filter());
    let logger = LOGGER.get_or_init(|| Logger { filter });
    // A second init (only tests call it twice) keeps the first logger.
    let _ = log::set_logger(logger);
    Ok(())
}

fn build_filter(v: Verbosity, rust_log: Option<&str>) -> Result<env_filter::Filter> {
    let mut b = env_filter::Builder::new();
    match rust_log.filter(|s| !s.trim().is_empty()) {
        Some(spec) => {
            b.try_parse(spec)
                .map_err(|e| anyhow!("RUST_LOG={spec:?}: {e}"))?;
        }
        None if v.quiet => {
            b.filter_level(LevelFilter::Warn);
        }
        None => {
            let (all, own) = match v.verbose {
                0 => (LevelFilter::Info, LevelFilter::Info),
                1 => (LevelFilter::Info, LevelFilter::Debug),
                _ => (LevelFilter::Debug, LevelFilter::Trace),
            };
            b.filter_level(all).filter_module("ctdrop", own);
            if v.verbose >= 2 {
                b.filter_module(KERNEL_TARGET, LevelFilter::Trace);
            }
        }
    }
    if v.bpf_log {
        b.filter_module(KERNEL_TARGET, LevelFilter::Trace);
    }
    Ok(b.build())
}

/// Kernel records go out at debug and above (their warnings too): the
/// most detailed level enabled for them, or 0 when debug is not.
fn kernel_level(filter: &env_filter::Filter) -> u8 {
    let on = |level| {
        filter.enabled(
            &Metadata::builder()
                .target(KERNEL_TARGET)
                .level(level)
                .build(),
        )
    };
    match (on(Level::Trace), on(Level::Debug)) {
        (true, _) => aya_log::Level::Trace as u8,
        (false, true) => aya_log::Level::Debug as u8,
        _ => 0,
    }
}

/// The value for the kernel programs' log level globals (0: off).
pub fn kernel_log_level() -> u8 {
    KERNEL_LEVEL.load(Ordering::Relaxed)
}

/// The line of a record, without the newline.
fn line(record: &Record) -> String {
    let level = match record.level() {
        Level::Error => "error",
        Level::Warn => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    };
    let target = record.target();
    // ctdrop's own records read as before; others say whose they are.
    if target == "ctdrop" || target.starts_with("ctdrop::") {
        format!("ctdrop: {level}: {}", record.args())
    } else {
        format!("ctdrop: {level}: {target}: {}", record.args())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let mut l = line(record);
        l.push('\n');
        // One write per line: lines of concurrent threads do not mix. A
        // closed stderr is nothing to report to.
        let _ = std::io::stderr().lock().write_all(l.as_bytes());
    }

    fn flush(&self) {}
}

/// Reads the kernel programs' aya-log ring into the logger, on a thread of
/// its own (count mode, live and watch alike), until dropped; dropping it
/// reads what is left first.
pub struct KernelLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the reader sleeps between looks at the stop flag when the
/// kernel sends nothing.
const KERNEL_LOG_POLL_MS: i32 = 100;

impl KernelLog {
    /// None when kernel logging is off (then the programs log nothing and
    /// their log ring stays empty).
    pub fn start(ebpf: &mut aya::Ebpf) -> Result<Option<KernelLog>> {
        if kernel_log_level() == 0 {
            return Ok(None);
        }
        // aya-log's ring exists only in programs that have a log call left.
        if ebpf.map("AYA_LOGS").is_none() {
            log::warn!("kernel diagnostics asked for, but the kernel programs have no log calls");
            return Ok(None);
        }
        let mut logger =
            aya_log::EbpfLogger::init(ebpf).context("reading the kernel programs' log")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bpf-log".into())
            .spawn(move || {
                let mut pfd = libc::pollfd {
                    fd: logger.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                loop {
                    let last = stopping.load(Ordering::Acquire);
                    // SAFETY: one valid pollfd, alive for the call; the
                    // fd is the logger's ring, open while it lives.
                    unsafe { libc::poll(&mut pfd, 1, KERNEL_LOG_POLL_MS) };
                    logger.flush();
                    if last {
                        return;
                    }
                }
            })
            .context("starting the kernel log reader")?;
        log::debug!(
            "kernel programs' diagnostics on (aya-log level {})",
            kernel_log_level()
        );
        Ok(Some(KernelLog {
            stop,
            thread: Some(thread),
        }))
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(f: &env_filter::Filter, target: &str, level: Level) -> bool {
        f.enabled(&Metadata::builder().target(target).level(level).build())
    }

    fn filter(
        verbose: u8,
        quiet: bool,
        bpf_log: bool,
        rust_log: Option<&str>,
    ) -> env_filter::Filter {
        build_filter(
            Verbosity {
                verbose,
                quiet,
                bpf_log,
            },
            rust_log,
        )
        .unwrap()
    }

    #[test]
    fn default_shows_info_hides_debug_and_keeps_kernel_logging_off() {
        let f = filter(0, false, false, None);
        assert!(enabled(&f, "ctdrop::kernel", Level::Info));
        assert!(!enabled(&f, "ctdrop::kernel", Level::Debug));
        assert!(!enabled(&f, "aya::bpf", Level::Debug));
        assert_eq!(kernel_level(&f), 0);
    }

    #[test]
    fn quiet_keeps_warnings_and_errors_only() {
        let f = filter(0, true, false, None);
        assert!(enabled(&f, "ctdrop::session", Level::Warn));
        assert!(enabled(&f, "ctdrop::session", Level::Error));
        assert!(!enabled(&f, "ctdrop::session", Level::Info));
        assert_eq!(kernel_level(&f), 0);
    }

    #[test]
    fn one_v_is_ctdrop_debug_not_the_libraries_nor_the_kernel() {
        let f = filter(1, false, false, None);
        assert!(enabled(&f, "ctdrop::kernel::attach", Level::Debug));
        assert!(!enabled(&f, "ctdrop::kernel::attach", Level::Trace));
        assert!(!enabled(&f, "aya::bpf", Level::Debug));
        assert_eq!(kernel_level(&f), 0);
    }

    #[test]
    fn two_v_is_trace_library_debug_and_kernel_logging() {
        let f = filter(2, false, false, None);
        assert!(enabled(&f, "ctdrop::kernel::attach", Level::Trace));
        assert!(enabled(&f, "aya::bpf", Level::Debug));
        assert_eq!(kernel_level(&f), aya_log::Level::Trace as u8);
    }

    #[test]
    fn rust_log_replaces_the_flags_and_bpf_log_adds_the_kernel() {
        let f = filter(0, true, false, Some("debug"));
        assert!(enabled(&f, "ctdrop::x", Level::Debug));
        assert_eq!(kernel_level(&f), aya_log::Level::Debug as u8);
        let f = filter(2, false, false, Some("warn"));
        assert!(!enabled(&f, "ctdrop::x", Level::Info));
        assert_eq!(kernel_level(&f), 0);
        let f = filter(0, false, true, Some("warn"));
        assert!(!enabled(&f, "ctdrop::x", Level::Info));
        assert_eq!(kernel_level(&f), aya_log::Level::Trace as u8);
        let f = filter(0, false, false, Some("warn,bpf=debug"));
        assert_eq!(kernel_level(&f), aya_log::Level::Debug as u8);
        // Empty is unset: the flags decide.
        let f = filter(0, true, false, Some(" "));
        assert!(!enabled(&f, "ctdrop::x", Level::Info));
    }

    #[test]
    fn bpf_log_alone_turns_the_kernel_on_and_nothing_else() {
        let f = filter(0, false, true, None);
        assert_eq!(kernel_level(&f), aya_log::Level::Trace as u8);
        assert!(!enabled(&f, "ctdrop::x", Level::Debug));
    }

    #[test]
    fn a_rust_log_that_does_not_parse_is_refused() {
        let e = build_filter(Verbosity::default(), Some("ctdrop=loud=x")).unwrap_err();
        assert!(format!("{e:#}").contains("RUST_LOG"), "{e:#}");
    }

    #[test]
    fn lines_keep_the_ctdrop_level_prefix_and_name_foreign_targets() {
        let rec = |target, level| {
            line(
                &Record::builder()
                    .target(target)
                    .level(level)
                    .args(format_args!("hello"))
                    .build(),
            )
        };
        assert_eq!(rec("ctdrop::kernel", Level::Warn), "ctdrop: warning: hello");
        assert_eq!(rec("ctdrop", Level::Info), "ctdrop: info: hello");
        assert_eq!(rec("bpf", Level::Debug), "ctdrop: debug: bpf: hello");
        assert_eq!(
            rec("aya::bpf", Level::Trace),
            "ctdrop: trace: aya::bpf: hello"
        );
    }
}
