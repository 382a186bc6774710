//! `ctdrop watch`: the always-on flight recorder. It is wiring on the
//! session engine: the session traces exactly as `live` does, the
//! [`recorder::Recorder`] sink keeps recent drops in memory and writes one
//! capture file per incident, and the metrics sink keeps `/metrics`
//! current. Nothing goes to stdout; stderr gets one line per event (start,
//! trigger, capture written, deletion, error), each with a level.
pub mod files;
pub mod recorder;

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::{
    capture::sink::CaptureMeta,
    cli::WatchArgs,
    output::{
        metrics::{Metrics, MetricsSink},
        Sink,
    },
    session::{self, SessionOptions},
};

/// Defined with the option (the command line imports no mode).
pub use crate::cli::DEFAULT_BUFFER_RECORDS;

pub async fn run(args: &WatchArgs) -> Result<()> {
    // Bad input is refused before attaching anything.
    args.probe.targets()?;
    if args.buffer_records == 0 {
        bail!("--buffer-records must be at least 1");
    }
    files::prepare_dir(&args.dir)?;
    let metrics = Arc::new(Metrics::with_watch());
    if let Some(addr) = &args.metrics {
        session::serve_metrics(addr, metrics.clone(), "info: ").await?;
    }
    let cfg = recorder::Config {
        dir: args.dir.clone(),
        pre: args.pre,
        post: args.post,
        trigger_rate: args.trigger_rate,
        trigger_fill: args.trigger_fill,
        max_files: args.max_files,
        max_bytes: args.max_bytes,
        buffer_records: args.buffer_records,
        meta: CaptureMeta {
            command: std::env::args().collect(),
            probes: args
                .probe
                .ping
                .iter()
                .chain(&args.probe.probe)
                .cloned()
                .collect(),
            duration: None,
            headers: false,
            max_flows: args.trace.max_flows,
        },
    };
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(MetricsSink::new(metrics.clone())),
        Box::new(recorder::Recorder::new(cfg, metrics)),
    ];
    let opts = SessionOptions {
        trace: &args.trace,
        probe: &args.probe,
        duration: None,
        capture_headers: false,
        service: true,
    };
    session::run(&opts, sinks).await
}
