//! Capture files: a self-describing, versioned record of one tracing run
//! (`ctdrop capture`), read back by `report` and `export`.
//!
//! Layout: a preamble (magic, format version), a JSON header block, record
//! blocks (binary: drops, interned strings, once-a-second checkpoints;
//! typed probe verdicts in their serde form), table snapshots (typed, JSON)
//! and a JSON trailer block. See `block` for the framing, `record` for the
//! records, and README.md for why binary.
pub mod block;
pub mod codec;
pub mod meta;
pub mod reader;
pub mod record;
pub mod sink;
#[cfg(test)]
pub(crate) mod tests;
pub mod writer;

use anyhow::Result;

pub use block::FORMAT_VERSION;
pub use reader::{CaptureReader, End, Item};
pub use writer::CaptureWriter;

use crate::{
    cli::CaptureArgs,
    output::{human::SummaryOnly, json::JsonSink, Sink},
    session::{self, SessionOptions},
};

pub async fn run(args: &CaptureArgs) -> Result<()> {
    // Bad probe targets are bad input: refuse before creating anything.
    args.probe.targets()?;
    let w = CaptureWriter::create(&args.output, args.force)?;
    let meta = sink::CaptureMeta {
        command: std::env::args().collect(),
        probes: args
            .probe
            .ping
            .iter()
            .chain(&args.probe.probe)
            .cloned()
            .collect(),
        duration: args.duration,
        headers: args.headers,
        max_flows: args.trace.max_flows,
    };
    let progress = unsafe { libc::isatty(2) } == 1;
    let (out, out_handle) = crate::output::writer::stdout();
    // The file's sink last: if it fails at the end (disk full), the
    // summary on stdout is already out.
    let sinks: Vec<Box<dyn Sink>> = vec![
        if args.json {
            Box::new(JsonSink::new(out))
        } else {
            Box::new(SummaryOnly::new(out))
        },
        Box::new(sink::CaptureSink::new(w, meta, progress)),
    ];
    let opts = SessionOptions {
        trace: &args.trace,
        probe: &args.probe,
        duration: args.duration,
        capture_headers: args.headers,
        service: false,
    };
    let result = session::run(&opts, sinks).await;
    out_handle.finish_and_report(session::OUTPUT_GRACE);
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    match result {
        // Failed before the header was written: leave no empty file behind.
        Err(e) if size == 0 => {
            let _ = std::fs::remove_file(&args.output);
            Err(e)
        }
        Err(e) => Err(e),
        Ok(()) => {
            eprintln!(
                "ctdrop: wrote {} ({}); read it with: ctdrop report {}",
                args.output.display(),
                sink::human_bytes(size),
                args.output.display()
            );
            Ok(())
        }
    }
}
