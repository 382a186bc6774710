//! The session engine, one for every mode: a [`Source`] (ring records, or
//! the kernel's in-kernel counts) feeds the [`Collector`], which shows each
//! drop to the sinks; [`finish`] does the end of every run. Modes are wiring
//! (`live`, `capture`, `watch`, `top`, `demo` pick a source and sinks).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracer_common::FilterConfig;

use crate::{
    cli::TraceArgs,
    collector::{prepare, release_freed_memory, Collector},
    events::ring::RingReader,
    kernel::{
        attach::{KernelStats, LoadOptions, Tracer},
        capabilities,
    },
    output::{ProbeShown, Progress, Sink},
    probe::sender::{self, ProbeEvent, ProberConfig},
    summary::Summary,
};

/// Sinks take it in `start`; defined with them.
pub use crate::output::SessionInfo;

/// How long the end of a run waits for a slow stdout reader to take the
/// rest (the summary): long enough for a reader that keeps up, short
/// enough that a stalled one cannot hold ctdrop past --duration.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Starts serving `metrics` on `addr` (`--metrics`). Bound before
/// attaching: a busy port is bad input, not a late surprise. `level` goes
/// in front of the message (`info: ` for a service).
pub async fn serve_metrics(
    addr: &str,
    metrics: std::sync::Arc<crate::output::metrics::Metrics>,
    level: &str,
) -> Result<()> {
    let listener = crate::output::metrics::bind(addr).await?;
    // Printed as before at every level: it tells where to scrape.
    eprintln!(
        "ctdrop: {level}metrics on http://{}/metrics",
        listener
            .local_addr()
            .context("reading the metrics address")?
    );
    tokio::spawn(crate::output::metrics::serve(listener, metrics));
    Ok(())
}

/// What a session traces and for how long; outputs come as sinks.
pub struct SessionOptions<'a> {
    pub trace: &'a TraceArgs,
    pub probe: &'a crate::cli::ProbeArgs,
    pub duration: Option<Duration>,
    /// Copy packet headers into each record (capture --headers).
    pub capture_headers: bool,
    /// Running as a service (`watch`): ctdrop's own lines carry a level,
    /// SIGUSR1 is handed to the sinks ([`Sink::user_signal`]), and
    /// namespaces created after the start are looked for every 10 s.
    pub service: bool,
}
/// Where a session's drops come from. Two kinds: [`RingSource`] (one record
/// per drop) and `counting::CountSource` (the kernel counts per group and
/// per flow; nothing per packet crosses).
// Not `Send`-bound futures on purpose: the session runs on one thread.
#[allow(async_fn_in_trait)]
pub trait Source {
    /// What the run says it does: "tracing" or "counting".
    fn verb(&self) -> &'static str;
    /// Adjusts how the kernel side is loaded; an error is bad input.
    fn configure(&mut self, _load: &mut LoadOptions) -> Result<()> {
        Ok(())
    }
    /// Takes what it reads from the freshly attached programs.
    fn attached(&mut self, tracer: &mut Tracer, c: &mut Collector) -> Result<()>;
    /// The `attached` line's words after the attach time.
    fn describe(&self, c: &Collector, filter: &FilterConfig) -> String;
    /// Waits for drops and hands them to the collector and the sinks.
    async fn next(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()>;
    /// Takes what is ready without waiting (every 50 ms).
    fn poll(&mut self, _c: &mut Collector, _sinks: &mut [Box<dyn Sink>]) {}
    /// After detaching: the rest, so that the totals are final (the maps
    /// stay readable).
    fn drain(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()>;
    /// The end-of-run stderr line; also says what does not add up.
    fn stopped(&self, end: &End) -> String;
}

/// What every source's end-of-run line may report.
pub struct End<'a> {
    pub elapsed: Duration,
    pub stats: KernelStats,
    pub collector: &'a Collector,
    /// `info: ` for a service, else empty.
    pub level: &'static str,
}

/// Ring records: one per drop, decoded and classified here.
#[derive(Default)]
pub struct RingSource {
    ring: Option<RingReader>,
    /// Records taken from the ring, to hold against the kernel's `sent`.
    read: u64,
    /// What `drain` found the kernel sent but nobody read (0 unless a bug).
    unread: u64,
}

impl RingSource {
    fn ring(&mut self) -> &mut RingReader {
        self.ring.as_mut().expect("attached before reading")
    }
}

impl Source for RingSource {
    fn verb(&self) -> &'static str {
        "tracing"
    }

    fn attached(&mut self, tracer: &mut Tracer, c: &mut Collector) -> Result<()> {
        c.classifier.probes = tracer.probes_drop_paths();
        c.hooks = tracer.hook_coverage();
        c.cpu_stat_unsure = tracer.cpu_stat_unsure();
        self.ring = Some(RingReader::new(tracer.take_ring()?)?);
        Ok(())
    }

    fn describe(&self, c: &Collector, filter: &FilterConfig) -> String {
        format!(
            "{}; {}",
            if c.classifier.probes {
                "tier kprobe: conntrack paths probed"
            } else if c.hooks.is_some() {
                "tier tracepoint + netfilter hooks: conntrack drops marked per packet"
            } else if c.cpu_stat_unsure.is_some() {
                "tier tracepoint + per-CPU conntrack counters: conntrack drops told at each drop"
            } else {
                "tier tracepoint: conntrack causes inferred"
            },
            reasons_word(filter)
        )
    }

    async fn next(
        &mut self,
        _tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()> {
        let n = self.ring().wait_and_drain(|b| c.handle(b, sinks)).await?;
        self.read += n as u64;
        Ok(())
    }

    fn poll(&mut self, c: &mut Collector, sinks: &mut [Box<dyn Sink>]) {
        // Drops already in the ring may explain a probe about to expire. The
        // kernel wakes us only per 1/16 of the ring, so this is also what
        // bounds the delay of a lone drop.
        let n = self
            .ring()
            .drain(crate::events::ring::BATCH, |b| c.handle(b, sinks));
        self.read += n as u64;
    }

    fn drain(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()> {
        // Detached: no run starts any more, so this ends even under a flood.
        // But closing the link does not wait for runs already under way on
        // other CPUs: one may still be filling its record. Every record the
        // kernel counted as sent is waited for, briefly (a run takes
        // microseconds), and what never comes is said in the stopped line.
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            self.read += self.ring().drain(usize::MAX, |b| c.handle(b, sinks)) as u64;
            let sent = tracer.stats()?.sent;
            self.unread = sent.saturating_sub(self.read);
            if self.unread == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn stopped(&self, end: &End) -> String {
        let t = &end.collector.tally;
        format!(
            "ctdrop: {}stopped after {:.1} s: {} drops recorded, {} events lost, {} flows tracked, {} drops in flows beyond --max-flows{}",
            end.level,
            end.elapsed.as_secs_f64(),
            t.total,
            end.stats.lost,
            t.flows_tracked(),
            t.flows_untracked,
            skipped_words(&end.stats)
        ) + &unread_words(self.unread)
    }
}

/// Said only when it happened (a bug): records the kernel sent that the
/// ring never gave us.
fn unread_words(unread: u64) -> String {
    if unread == 0 {
        return String::new();
    }
    format!(", {unread} records the kernel sent never reached us (a ctdrop bug: please report it)")
}

/// Said only when it happened: kfree_skb runs the kernel skipped.
pub fn skipped_words(s: &KernelStats) -> String {
    if s.skipped_runs == 0 {
        return String::new();
    }
    format!(
        ", {} kfree_skb runs skipped by the kernel (nested on a busy CPU: those drops are in no count)",
        s.skipped_runs
    )
}

/// The `attached` line's last words: which drops are traced.
pub fn reasons_word(filter: &FilterConfig) -> &'static str {
    if filter.all_reasons != 0 {
        "all drop reasons"
    } else {
        "netfilter drops"
    }
}

/// A session on ring records (`capture`, `watch`, `top`, `demo`, `live`).
pub async fn run(opts: &SessionOptions<'_>, sinks: Vec<Box<dyn Sink>>) -> Result<()> {
    run_with(opts, RingSource::default(), sinks).await
}

pub async fn run_with(
    opts: &SessionOptions<'_>,
    mut source: impl Source,
    mut sinks: Vec<Box<dyn Sink>>,
) -> Result<()> {
    let args = opts;
    let targets = args.probe.targets()?;
    let (p, btf) = prepare(args.trace, args.capture_headers)?;
    if !p.conntrack_loaded {
        log::warn!(
            "nf_conntrack is not loaded on this host: no conntrack drops can happen; {} other netfilter drops",
            source.verb()
        );
    }
    if let Err(e) = capabilities::ensure_tracefs() {
        log::info!("{e:#}");
    }
    let mut collector = Collector::new(&p, args.trace.max_flows, &targets, args.probe.timeout);
    // Before attaching: a Ctrl-C right after the `attached` line must end
    // the run with its summary, not kill the process.
    // (SIGUSR1 for `watch` likewise, below, before the `attached` line.)
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut load = LoadOptions {
        btf: &btf,
        offsets: p.offsets,
        filter: p.filter,
        ring_size: p.ring_size,
        mode: args.trace.mode,
        count: tracer_common::CountConfig::EVERY_DROP,
    };
    source.configure(&mut load)?;
    let filter = load.filter;
    let mut tracer = Tracer::load(&load)?;
    // Loaded: the BTF (and aya's parse of it) is not needed again.
    drop(btf);
    release_freed_memory();
    source.attached(&mut tracer, &mut collector)?;
    // Before the `attached` line: a signal sent as soon as it shows must
    // not meet the default action, which ends the process with no summary
    // (and, for a capture, no trailer).
    let mut sigusr1 = if args.service {
        Some(signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?)
    } else {
        None
    };
    // A line tests and scripts wait for: printed as it is at every log level.
    eprintln!(
        "ctdrop: {}attached tp_btf/kfree_skb in {} ms ({}); Ctrl-C to stop",
        if args.service { "info: " } else { "" },
        tracer.attach_time.as_millis(),
        source.describe(&collector, &filter),
    );
    // Test hook (tests/tests/reliability.rs): a bug in userspace while
    // programs are attached must still leave nothing attached.
    if std::env::var_os("CTDROP_TEST_PANIC_AFTER_ATTACH").is_some_and(|v| v == "1") {
        panic!("deliberate panic after attaching (CTDROP_TEST_PANIC_AFTER_ATTACH=1)");
    }
    let info = SessionInfo {
        reasons: &collector.reasons,
        mechanisms: {
            let mut m = tracer.mechanisms.clone();
            if args.capture_headers {
                m.push(crate::kernel::tier::Mechanism {
                    signal: "packet_headers",
                    chosen: Some(format!(
                        "tp_btf/kfree_skb, first {} bytes of the network header",
                        tracer_common::HEADER_CAPTURE_LEN
                    )),
                    note: String::new(),
                });
            }
            m
        },
        boot_offset_ns: collector.boot_offset,
        limits: crate::conntrack::stats::CtLimits::read(),
        counters_at_start: collector.baselines(),
        filter: &filter,
        namespaces: &collector.sampler.registry,
    };
    for s in sinks.iter_mut() {
        s.start(&info).context("starting output")?;
    }
    let mut probes = if targets.is_empty() {
        None
    } else {
        Some(sender::spawn(ProberConfig {
            targets: targets.clone(),
            interval: args.probe.interval,
            timeout: args.probe.timeout,
            same_id: args.probe.same_id,
            netns: args
                .probe
                .from_netns
                .as_ref()
                .map(|n| std::path::Path::new("/run/netns").join(n)),
            count: args.probe.count,
        })?)
    };
    let started = Instant::now();
    let mut ticks = 0u64;
    let mut deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // After a stall, one tick, not a burst of catch-up ticks: the loss
    // warning is promised at most once a second.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut expire_tick = tokio::time::interval(Duration::from_millis(50));
    let mut sample_tick = tokio::time::interval(Duration::from_millis(10));
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_lost = 0u64;
    let mut last_skipped = 0u64;
    // After a stop request, outstanding probes get their timeout to finish.
    let mut stopping: Option<tokio::time::Instant> = None;
    // Whoever read our output went away (`ctdrop live | head`): stop, or we
    // would trace for nobody, attached, until killed.
    let mut closed = false;

    loop {
        tokio::select! {
            r = source.next(&tracer, &mut collector, &mut sinks) => {
                r?;
                if output_closed(&mut sinks) { closed = true; break; }
            }
            ev = recv_probe(&mut probes) => match ev {
                Some(ev) => handle_probe(&mut collector, ev, &mut sinks),
                // The prober sent all it was asked to (--count).
                None => { probes = None; if stopping.is_none() { stopping = Some(tokio::time::Instant::now()); } }
            },
            _ = expire_tick.tick() => {
                source.poll(&mut collector, &mut sinks);
                // Also with nothing new: stdout's writer thread may have met
                // a closed pipe since the last drain (flushes are cheap).
                if output_closed(&mut sinks) {
                    closed = true;
                    break;
                }
                expire_probes(&mut collector, &mut sinks);
                collector.poll_snapshots(&mut sinks);
                let mut sink_failed = false;
                for k in sinks.iter_mut() {
                    sink_failed |= k.poll().is_err();
                }
                if stopping.is_none() && (sink_failed || sinks.iter().any(|k| k.wants_stop())) && begin_stop(&mut stopping, &mut probes, &collector) { break; }
                if stopping.is_some() && collector.matcher.pending() == 0 { break; }
                if let Some(t) = stopping {
                    if t.elapsed() > args.probe.timeout + Duration::from_millis(200) { break; }
                }
            }
            _ = sigint.recv() => { if begin_stop(&mut stopping, &mut probes, &collector) { break; } }
            _ = sigterm.recv() => { if begin_stop(&mut stopping, &mut probes, &collector) { break; } }
            _ = recv_signal(&mut sigusr1) => for s in sinks.iter_mut() { s.user_signal(); },
            _ = sleep_until(deadline) => { deadline = None; if begin_stop(&mut stopping, &mut probes, &collector) { break; } }
            _ = sample_tick.tick() => collector.sampler.sample_active(),
            _ = tick.tick() => {
                ticks += 1;
                if args.service && ticks.is_multiple_of(10) {
                    collector.sampler.registry.discover_all();
                }
                collector.sampler.sample_all();
                let s = tracer.stats()?;
                if s.lost > last_lost {
                    // Read by tests (reliability.rs) in this exact form, which
                    // is also what the logger prints for a warning: a plain
                    // line, so it shows whether or not a logger is installed.
                    eprintln!("ctdrop: warning: {} events lost in the last second (ring buffer full): raise --ring-size", s.lost - last_lost);
                    last_lost = s.lost;
                }
                if s.skipped_runs > last_skipped {
                    eprintln!("ctdrop: warning: the kernel skipped {} kfree_skb runs in the last second (a drop nested inside another on one CPU): those drops are in no count", s.skipped_runs - last_skipped);
                    last_skipped = s.skipped_runs;
                }
                let counters = if sinks.iter().any(|k| k.wants_counters()) { collector.counters_now() } else { BTreeMap::new() };
                let progress = Progress {
                    elapsed: started.elapsed(),
                    duration: args.duration,
                    mono_ns: crate::probe::mono_ns(),
                    stats: s,
                    tally: &collector.tally,
                    counters: &counters,
                };
                let mut sink_failed = false;
                for k in sinks.iter_mut() {
                    sink_failed |= k.tick(&progress).is_err();
                }
                // The failing sink says why from `summary`, which ends the run with an error.
                if sink_failed && begin_stop(&mut stopping, &mut probes, &collector) { break; }
            }
        }
    }
    finish(
        tracer,
        &mut source,
        collector,
        sinks,
        filter,
        started,
        closed,
        args.service,
    )
}

/// The end of every run, whatever the source: detach, take the rest,
/// release held verdicts, read the kernel's totals, check the counters,
/// conclude (snapshots, advice), build the one summary, hand it to every
/// sink, and say on stderr how the run ended.
#[allow(clippy::too_many_arguments)]
fn finish(
    mut tracer: Tracer,
    source: &mut impl Source,
    mut collector: Collector,
    mut sinks: Vec<Box<dyn Sink>>,
    filter: FilterConfig,
    started: Instant,
    closed: bool,
    service: bool,
) -> Result<()> {
    // Detach first: then nothing more arrives and what the source reads
    // now (ring records plus the lost count, or the counts) is final.
    tracer.detach();
    source.drain(&tracer, &mut collector, &mut sinks)?;
    // Verdicts still waiting for a probe the run ended before judging.
    let held = collector.order.flush();
    show_released(&collector, held, &mut sinks);
    let stats = tracer.stats()?;
    let ct_events = tracer.ct_events()?;
    let mechanisms = tracer.mechanisms.clone();
    drop(tracer);
    let checks = collector.counter_checks();
    collector.conclude(&mut sinks);
    let elapsed = started.elapsed();
    let c = &collector;
    let summary = Summary {
        tally: &c.tally,
        names: &c.sampler.registry,
        matcher: &c.matcher,
        probe_labels: &c.probe_labels,
        occupancy: &c.snapshots.taken,
        advice: &c.advice,
        inferred_by_budget: c.inferred_by_budget,
        decode_errors: c.decode_errors,
        boot_offset: c.boot_offset,
        probes_attached: c.classifier.probes,
        stats,
        elapsed,
        checks: &checks,
        filtered: filtered(&filter),
        ct_events: &ct_events,
        mechanisms: &mechanisms,
    };
    for s in sinks.iter_mut() {
        let r = s.summary(&summary).and_then(|()| s.flush());
        match r {
            Err(e) if closed && e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.context("writing the summary")?,
        }
    }
    if closed {
        // Read by tests (reliability.rs): a plain line, like `stopped` below.
        eprintln!("ctdrop: output closed (broken pipe): stopped tracing");
    }
    // On stderr too, at every log level (tests and scripts read it): with
    // stdout redirected, the operator still sees whether every drop made it out.
    eprintln!(
        "{}",
        source.stopped(&End {
            elapsed,
            stats,
            collector: &collector,
            level: if service { "info: " } else { "" },
        })
    );
    Ok(())
}

/// Flushes every sink; true when one found its reader gone (EPIPE).
fn output_closed(sinks: &mut [Box<dyn Sink>]) -> bool {
    let mut closed = false;
    for s in sinks.iter_mut() {
        if let Err(e) = s.flush() {
            closed |= e.kind() == std::io::ErrorKind::BrokenPipe;
        }
    }
    closed
}

/// Stops sending probes; true when nothing is outstanding and we can end.
fn begin_stop(
    stopping: &mut Option<tokio::time::Instant>,
    probes: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ProbeEvent>>,
    collector: &Collector,
) -> bool {
    if stopping.is_some() {
        return true; // a second Ctrl-C: stop now
    }
    *probes = None;
    *stopping = Some(tokio::time::Instant::now());
    collector.matcher.pending() == 0
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_probe(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ProbeEvent>>,
) -> Option<ProbeEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn handle_probe(c: &mut Collector, ev: ProbeEvent, sinks: &mut [Box<dyn Sink>]) {
    match ev {
        ProbeEvent::Sent {
            target,
            number,
            wire,
            mono_ns,
        } => {
            c.matcher.sent(target, number, wire, mono_ns);
            c.order.sent(target, number);
        }
        ProbeEvent::Reply {
            target,
            wire,
            mono_ns,
        } => {
            if let Some(o) = c.matcher.replied(target, wire, mono_ns) {
                show_outcome(c, o, sinks);
            }
        }
        ProbeEvent::Failed { target, error } => {
            log::warn!("probe to {} failed: {error}", c.probe_labels[target]);
        }
    }
}

fn expire_probes(c: &mut Collector, sinks: &mut [Box<dyn Sink>]) {
    for o in c.matcher.expire(crate::probe::mono_ns()) {
        show_outcome(c, o, sinks);
    }
}

/// Hands a verdict to the ordering; shows whatever it releases.
fn show_outcome(c: &mut Collector, o: crate::probe::Outcome, sinks: &mut [Box<dyn Sink>]) {
    let ready = c.order.verdict(o);
    show_released(c, ready, sinks);
}

fn show_released(
    c: &Collector,
    ready: Vec<crate::probe::order::Released>,
    sinks: &mut [Box<dyn Sink>],
) {
    for r in ready {
        let o = &r.outcome;
        let shown = ProbeShown {
            label: &c.probe_labels[o.target],
            outcome: o,
            wall_ns: o.sent_ns + c.boot_offset,
            lost: r.lost,
            sent: r.sent,
        };
        for s in sinks.iter_mut() {
            let _ = s.probe(&shown);
            let _ = s.flush();
        }
    }
}

pub(crate) fn filtered(f: &FilterConfig) -> bool {
    crate::filter::narrows(f)
}

pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
