//! `ctdrop live`: wiring only. Ring records (or, with `--count-only`, the
//! kernel's counts) into the session engine, shown on stdout as text or
//! JSON, optionally served as metrics.

use anyhow::Result;

use crate::{
    counting::CountSource,
    output::{human::HumanSink, json::JsonSink, Sink},
    session::{self, RingSource, SessionOptions, OUTPUT_GRACE},
};

pub async fn run(args: &crate::cli::LiveArgs) -> Result<()> {
    // SAFETY: isatty only reads the descriptor's state.
    let color = args.color.resolve(unsafe { libc::isatty(1) } == 1);
    // Never a blocking stdout: a reader that stops reading must not stall tracing.
    let (out, out_handle) = crate::output::writer::stdout();
    // Metrics are for scraping: per-drop lines on a terminal only bury them.
    let quiet = args.quiet || (args.metrics.is_some() && !args.json);
    let mut sinks: Vec<Box<dyn Sink>> = if args.json {
        vec![Box::new(JsonSink::new(out))]
    } else {
        vec![Box::new(HumanSink::new(out, color).quiet(quiet))]
    };
    if let Some(addr) = &args.metrics {
        let metrics = std::sync::Arc::new(crate::output::metrics::Metrics::new());
        session::serve_metrics(addr, metrics.clone(), "").await?;
        sinks.push(Box::new(crate::output::metrics::MetricsSink::new(metrics)));
    }
    let opts = SessionOptions {
        trace: &args.trace,
        probe: &args.probe,
        duration: args.duration,
        capture_headers: false,
        service: false,
    };
    let r = if args.count_only {
        session::run_with(
            &opts,
            CountSource::new(args.report_every, args.flow_sample),
            sinks,
        )
        .await
    } else {
        session::run_with(&opts, RingSource::default(), sinks).await
    };
    out_handle.finish_and_report(OUTPUT_GRACE);
    r
}
