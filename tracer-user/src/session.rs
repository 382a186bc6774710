//! A tracing session: attach, drain, classify, show, summarize.

use std::{
    collections::{BTreeMap, HashMap},
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracer_common::{source, FilterConfig};

use crate::{
    advice::{Advice, Host},
    cause::{Cause, Classifier},
    cli::TraceArgs,
    conntrack::{
        netns::{find_namespace, NsRegistry},
        occupancy::{Snapshots, SNAPSHOT_GAP},
        stats::{CounterCheck, CtCounters},
        FillSampler,
    },
    events::{decode, ring::RingReader, DropEvent},
    flows::Tally,
    kernel::{
        attach::{validate_ring_size, LoadOptions, Tracer},
        btf::{DropReasons, KernelBtf},
        capabilities,
    },
    output::{
        human::HumanSink,
        json::JsonSink,
        symbols::Symbols,
        ProbeShown, Progress, Shown, Sink,
    },
    probe::{
        sender::{self, ProbeEvent, ProberConfig},
        Matcher, SeenDrop, TargetSpec, Wire,
    },
    summary::Summary,
};
use crate::model::DropLine;

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, to put kernel timestamps on the wall.
pub fn boot_offset_ns() -> u64 {
    let now = |clk| {
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clk, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    now(libc::CLOCK_REALTIME).saturating_sub(now(libc::CLOCK_MONOTONIC))
}

/// Hands memory freed after parsing BTF back to the kernel: glibc keeps
/// small freed blocks in its heap otherwise, and the parsed BTF is tens of
/// megabytes of them.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap; no pointer of ours is involved.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
    // musl (the static release build) has no malloc_trim: its allocator
    // returns freed spans to the kernel by itself.
}

/// Everything found out before attaching.
pub struct Prepared {
    /// Struct offsets for the kernel programs. The parsed BTF they come
    /// from is not kept: it was most of ctdrop's memory for the whole run.
    pub offsets: tracer_common::Offsets,
    pub reasons: DropReasons,
    pub filter: FilterConfig,
    pub ring_size: u32,
    pub conntrack_loaded: bool,
}

/// `capture_headers`: the kernel appends the packet's first network-header
/// bytes to each record (for pcap-ng export; costs ring space and a copy).
pub fn prepare(args: &TraceArgs, capture_headers: bool) -> Result<Prepared> {
    let ring_size = validate_ring_size(args.ring_size)?;
    capabilities::require("tracing", capabilities::TRACING)?;
    capabilities::require_btf(&args.btf)?;
    let btf = KernelBtf::open(&args.btf)?;
    let reasons = DropReasons::from_btf(&btf)?;
    let offsets = btf.offsets()?;
    drop(btf);
    release_freed_memory();
    let nf = reasons.value("NETFILTER_DROP");
    let mut filter: FilterConfig = bytemuck::Zeroable::zeroed();
    filter.netfilter_drop_reason = nf.unwrap_or(u32::MAX);
    filter.all_reasons = args.all_reasons as u8;
    filter.capture_headers = capture_headers as u8;
    crate::filter::fill(args, &mut filter)?;
    Ok(Prepared {
        offsets,
        reasons,
        filter,
        ring_size,
        conntrack_loaded: capabilities::conntrack_loaded(),
    })
}

pub struct Collector {
    pub classifier: Classifier,
    pub reasons: DropReasons,
    pub sampler: FillSampler,
    pub symbols: Symbols,
    pub tally: Tally,
    pub boot_offset: u64,
    pub decode_errors: u64,
    /// Probe verdicts and passive echo-loss grouping (always on: an
    /// operator's own ping loop is matched even without `--ping`).
    pub matcher: Matcher,
    /// Verdicts held until every earlier probe has its own.
    pub order: crate::probe::order::InOrder,
    pub probe_labels: Vec<String>,
    /// Some probe is TCP or UDP: only then can a port drop explain one. A
    /// flood of UDP to a pinged host would otherwise have every drop
    /// serialised for the matcher, slow the reader and lose ring events.
    port_probes: bool,
    baselines: BTreeMap<u32, CtCounters>,
    /// Table snapshots taken when a namespace's table was full.
    pub snapshots: Snapshots,
    /// Filled by [`Collector::conclude`] at the end of a run.
    pub advice: Vec<Advice>,
    labels: Labels,
    /// Namespaces where netfilter hook marks tell conntrack drops apart.
    pub hooks: Option<crate::kernel::nfhook::HookCoverage>,
    /// Records whose cause the `drop` counter budget decided.
    pub inferred_by_budget: u64,
}

type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// (namespace name, interface name) of one (netns, ifindex).
type Place = (Option<Rc<str>>, Option<Rc<str>>);

/// Names shown with every drop, looked up once and then shared: copying
/// them per drop was a visible cost under a flood.
#[derive(Default)]
struct Labels {
    reasons: Fast<u32, Rc<str>>,
    locations: Fast<u64, Rc<str>>,
    /// (netns, ifindex) to (namespace name, interface name); only for
    /// namespaces the registry found, so a late one still gets its names.
    places: Fast<(u32, Option<u32>), Place>,
}

impl Collector {
    pub fn new(
        p: &Prepared,
        max_flows: usize,
        probes: &[TargetSpec],
        probe_timeout: Duration,
    ) -> Collector {
        let mut registry = NsRegistry::new();
        registry.discover_all();
        let mut sampler = FillSampler::new(registry, Duration::from_millis(50));
        let mut baselines = BTreeMap::new();
        for ns in sampler.registry.inodes() {
            let t = crate::probe::mono_ns();
            if let Some(c) = sampler.counters(ns) {
                sampler.seed(ns, crate::conntrack::Sample::new(t, &c));
                baselines.insert(ns, c);
            }
        }
        Collector {
            classifier: Classifier {
                netfilter_drop: p.reasons.value("NETFILTER_DROP"),
                probes: false,
            },
            reasons: DropReasons::from_pairs(p.reasons.pairs().map(|(v, n)| (n.to_string(), v))),
            sampler,
            symbols: Symbols::load(),
            tally: Tally::new(max_flows),
            boot_offset: boot_offset_ns(),
            decode_errors: 0,
            matcher: Matcher::new(
                probes.iter().map(|t| t.target.addr()).collect(),
                probe_timeout.as_nanos() as u64,
            ),
            order: crate::probe::order::InOrder::new(probes.len()),
            probe_labels: probes.iter().map(|t| t.label.clone()).collect(),
            port_probes: probes
                .iter()
                .any(|t| !matches!(t.target, crate::probe::target::Target::Echo(_))),
            baselines,
            labels: Labels::default(),
            snapshots: Snapshots::new(SNAPSHOT_GAP),
            advice: Vec::new(),
            hooks: None,
            inferred_by_budget: 0,
        }
    }

    /// Kernel counters per namespace when the run started.
    pub fn baselines(&self) -> &BTreeMap<u32, CtCounters> {
        &self.baselines
    }

    /// Conntrack counters of every namespace we hold, read now.
    pub fn counters_now(&mut self) -> BTreeMap<u32, (Option<String>, CtCounters)> {
        let mut out = BTreeMap::new();
        for ns in self.sampler.registry.inodes() {
            if let Some(c) = self.sampler.counters(ns) {
                out.insert(ns, (self.sampler.registry.display_name(ns), c));
            }
        }
        out
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// Hands a drop to the matcher when it can explain a probe or belongs
    /// to someone's ping: echo packets, and TCP/UDP to or from a probed host.
    fn feed_matcher(&mut self, s: &Shown) {
        let ev = s.ev;
        let Some(flow) = &ev.flow else { return };
        // Built only for drops that may explain one of our probes: a flood
        // of echo drops must cost no memory beyond the passive table.
        let seen = |reply_path: bool| SeenDrop {
            line: DropLine::from_shown(s).into_owned(),
            reply_path,
        };
        if let Some(icmp) = ev.icmp {
            if let Some((id, seq)) = icmp.echo {
                let wire = Wire::Echo { id, seq };
                if icmp.is_echo_request(flow.proto) {
                    self.matcher
                        .echo_request_dropped(flow.src, flow.dst, id, seq, s.cause);
                    if self.matcher.has_host(flow.dst) {
                        self.matcher.dropped(flow.dst, wire, seen(false));
                    }
                } else if self.matcher.has_host(flow.src) {
                    self.matcher.dropped(flow.src, wire, seen(true));
                }
            }
            return;
        }
        if !self.port_probes {
            return;
        }
        if let Some((sp, dp)) = flow.ports {
            if self.matcher.has_host(flow.dst) {
                self.matcher.dropped(
                    flow.dst,
                    Wire::Port {
                        proto: flow.proto,
                        local: sp,
                        remote: dp,
                    },
                    seen(false),
                );
            }
            if self.matcher.has_host(flow.src) {
                self.matcher.dropped(
                    flow.src,
                    Wire::Port {
                        proto: flow.proto,
                        local: dp,
                        remote: sp,
                    },
                    seen(true),
                );
            }
        }
    }

    /// Decodes, classifies and shows one raw record to every sink.
    pub fn handle(&mut self, bytes: &[u8], sinks: &mut [Box<dyn Sink>]) {
        let Some((ev, cause)) = self.ingest(bytes) else {
            return;
        };
        self.show(&ev, cause, |me, s| {
            me.feed_matcher(s);
            for sink in sinks.iter_mut() {
                let _ = sink.drop_event(s);
            }
        });
    }

    /// Decodes and classifies one raw record; None when it was malformed.
    pub fn ingest(&mut self, bytes: &[u8]) -> Option<(DropEvent, Cause)> {
        let mut ev = match decode(bytes) {
            Ok(ev) => ev,
            Err(_) => {
                self.decode_errors += 1;
                return None;
            }
        };
        if ev.ct_fill.is_none() {
            if let Some(ns) = ev.netns {
                // A netfilter drop of a packet without an entry may be a
                // conntrack drop: the hook marks know where they cover the
                // namespace; elsewhere ask the namespace's drop counter.
                let mut candidate = ev.ct.is_none()
                    && !self.classifier.probes
                    && Some(ev.reason) == self.classifier.netfilter_drop
                    && !matches!(ev.source, source::CT_HOOK_IN | source::CT_HOOK_CONFIRM);
                if candidate
                    && ev.source == source::KFREE_SKB
                    && self.hooks.as_ref().is_some_and(|h| h.covers(ns, ev.ts_ns))
                {
                    ev.source = source::HOOK_NOT_CONNTRACK;
                    candidate = false;
                }
                ev.ct_fill = if candidate {
                    self.sampler.judge(ns, ev.ts_ns)
                } else {
                    self.sampler.fill(ns)
                };
                if candidate && ev.ct_fill.is_some_and(|f| f.counted_drop.is_some()) {
                    ev.source = source::INFERRED_BY_BUDGET;
                    self.inferred_by_budget += 1;
                }
            }
        }
        let cause = self.classifier.classify(&ev);
        self.tally.record(&ev, cause);
        if let (Cause::ConntrackTableFull, Some(ns)) = (cause, ev.netns) {
            let registry = &self.sampler.registry;
            self.snapshots.table_full(ns, || {
                find_namespace(ns).map(|(_, path)| (registry.display_name(ns), path))
            });
        }
        Some((ev, cause))
    }

    pub fn show<R>(
        &mut self,
        ev: &DropEvent,
        cause: Cause,
        f: impl FnOnce(&mut Self, &Shown) -> R,
    ) -> R {
        let Collector {
            labels,
            reasons,
            symbols,
            sampler,
            ..
        } = self;
        let reason = labels
            .reasons
            .entry(ev.reason)
            .or_insert_with(|| reasons.name(ev.reason).into())
            .clone();
        let location = labels
            .locations
            .entry(ev.location)
            .or_insert_with(|| symbols.resolve(ev.location).into())
            .clone();
        let (name, ifname) = match ev.netns {
            Some(ns) => match labels.places.get(&(ns, ev.ifindex)) {
                Some(p) => p.clone(),
                None => match sampler.registry.get(ns) {
                    Some(h) => {
                        let ifname = ev
                            .ifindex
                            .and_then(|i| h.ifname(i))
                            .map(|n| Rc::from(n.as_str()));
                        let p = (
                            sampler.registry.display_name(ns).as_deref().map(Rc::from),
                            ifname,
                        );
                        labels.places.insert((ns, ev.ifindex), p.clone());
                        p
                    }
                    None => (None, None),
                },
            },
            None => (None, None),
        };
        let shown = Shown {
            ev,
            cause,
            wall_ns: ev.ts_ns + self.boot_offset,
            reason: &reason,
            netns_name: name.as_deref(),
            ifname: ifname.as_deref(),
            location: &location,
        };
        f(self, &shown)
    }

    /// Shows snapshots that finished since the last call.
    pub fn poll_snapshots(&mut self, sinks: &mut [Box<dyn Sink>]) {
        for o in self.snapshots.poll() {
            for s in sinks.iter_mut() {
                let _ = s.occupancy(&o);
            }
        }
    }

    /// End of a run: waits for snapshots still being taken, then works out
    /// the advice from everything seen.
    pub fn conclude(&mut self, sinks: &mut [Box<dyn Sink>]) {
        for o in self.snapshots.finish(Duration::from_secs(5)) {
            for s in sinks.iter_mut() {
                let _ = s.occupancy(&o);
            }
        }
        for e in &self.snapshots.errors {
            eprintln!("ctdrop: note: {e}");
        }
        let limits = self.sampler.limits();
        let registry = &self.sampler.registry;
        self.advice = crate::advice::from_run(
            &self.tally,
            &self.snapshots.taken,
            limits,
            &Host::detect(),
            |ns| registry.display_name(ns),
        );
    }

    /// Kernel counters now against the baselines, for every namespace that
    /// had a baseline and either saw drops here or counted some itself.
    pub fn counter_checks(&mut self) -> Vec<CounterCheck> {
        let mut out = Vec::new();
        let nss: Vec<u32> = self.baselines.keys().copied().collect();
        for ns in nss {
            let Some(now) = self.sampler.counters(ns) else {
                continue;
            };
            let delta = now.delta(&self.baselines[&ns]);
            let table_full = self.tally.count_in(ns, Cause::ConntrackTableFull);
            let insert_failed = self.tally.count_in(ns, Cause::ConntrackInsertFailed);
            if delta.get("drop") == 0 && table_full + insert_failed == 0 {
                continue;
            }
            let netns_name = self.sampler.registry.display_name(ns);
            out.push(CounterCheck {
                netns: ns,
                netns_name,
                delta,
                table_full,
                insert_failed,
            });
        }
        out
    }
}

pub async fn run_live(args: &crate::cli::LiveArgs) -> Result<()> {
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
        serve_metrics(addr, metrics.clone(), "").await?;
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
        crate::counting::run(&opts, args.report_every, sinks).await
    } else {
        run(&opts, sinks).await
    };
    out_handle.finish_and_report(OUTPUT_GRACE);
    r
}

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

/// Facts about the run that a sink may record before any event.
pub struct SessionInfo<'a> {
    pub reasons: &'a DropReasons,
    /// Mechanism per signal (or why none).
    pub mechanisms: Vec<crate::kernel::tier::Mechanism>,
    pub boot_offset_ns: u64,
    pub limits: Option<crate::conntrack::stats::CtLimits>,
    pub counters_at_start: &'a BTreeMap<u32, CtCounters>,
    pub filter: &'a FilterConfig,
    /// Names namespaces, as every output does.
    pub namespaces: &'a NsRegistry,
}

pub async fn run(opts: &SessionOptions<'_>, mut sinks: Vec<Box<dyn Sink>>) -> Result<()> {
    let args = opts;
    let targets = args.probe.targets()?;
    let p = prepare(args.trace, args.capture_headers)?;
    if !p.conntrack_loaded {
        eprintln!("ctdrop: nf_conntrack is not loaded on this host: no conntrack drops can happen; tracing other netfilter drops");
    }
    if let Err(e) = capabilities::ensure_tracefs() {
        eprintln!("ctdrop: note: {e:#}");
    }
    let mut collector = Collector::new(&p, args.trace.max_flows, &targets, args.probe.timeout);
    // Before attaching: a Ctrl-C right after the `attached` line must end
    // the run with its summary, not kill the process.
    // (SIGUSR1 for `watch` likewise, below, before the `attached` line.)
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut tracer = Tracer::load(&LoadOptions {
        btf_path: &args.trace.btf,
        offsets: p.offsets,
        filter: p.filter,
        ring_size: p.ring_size,
        mode: args.trace.mode,
    })?;
    release_freed_memory();
    collector.classifier.probes = tracer.probes_drop_paths();
    collector.hooks = tracer.hook_coverage();
    let mut ring = RingReader::new(tracer.take_ring()?)?;
    // Before the `attached` line: a signal sent as soon as it shows must
    // not meet the default action, which ends the process with no summary
    // (and, for a capture, no trailer).
    let mut sigusr1 = if args.service {
        Some(signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?)
    } else {
        None
    };
    eprintln!(
        "ctdrop: {}attached tp_btf/kfree_skb in {} ms ({}; {}); Ctrl-C to stop",
        if args.service { "info: " } else { "" },
        tracer.attach_time.as_millis(),
        if collector.classifier.probes {
            "tier kprobe: conntrack paths probed"
        } else if collector.hooks.is_some() {
            "tier tracepoint + netfilter hooks: conntrack drops marked per packet"
        } else {
            "tier tracepoint: conntrack causes inferred"
        },
        if p.filter.all_reasons != 0 {
            "all drop reasons"
        } else {
            "netfilter drops"
        }
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
        counters_at_start: &collector.baselines,
        filter: &p.filter,
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
    // After a stop request, outstanding probes get their timeout to finish.
    let mut stopping: Option<tokio::time::Instant> = None;
    // Whoever read our output went away (`ctdrop live | head`): stop, or we
    // would trace for nobody, attached, until killed.
    let mut closed = false;

    loop {
        tokio::select! {
            r = ring.wait_and_drain(|b| collector.handle(b, &mut sinks)) => {
                r?;
                if output_closed(&mut sinks) { closed = true; break; }
            }
            ev = recv_probe(&mut probes) => match ev {
                Some(ev) => handle_probe(&mut collector, ev, &mut sinks),
                // The prober sent all it was asked to (--count).
                None => { probes = None; if stopping.is_none() { stopping = Some(tokio::time::Instant::now()); } }
            },
            _ = expire_tick.tick() => {
                // Drops already in the ring may explain a probe about to
                // expire. The kernel wakes us only per 1/16 of the ring, so
                // this tick is also what bounds the delay of a lone drop.
                ring.drain(crate::events::ring::BATCH, |b| collector.handle(b, &mut sinks));
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
                    eprintln!("ctdrop: warning: {} events lost in the last second (ring buffer full): raise --ring-size", s.lost - last_lost);
                    last_lost = s.lost;
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
    // Detach first: then nothing more arrives, the drain ends even under a
    // flood, and the records in the ring plus the lost count are final.
    tracer.detach();
    ring.drain(usize::MAX, |b| collector.handle(b, &mut sinks));
    // Verdicts still waiting for a probe the run ended before judging.
    let held = collector.order.flush();
    show_released(&collector, held, &mut sinks);
    let stats = tracer.stats()?;
    let ct_events = tracer.ct_events()?;
    let mechanisms = tracer.mechanisms.clone();
    drop(tracer);
    let checks = collector.counter_checks();
    collector.conclude(&mut sinks);
    let summary = Summary {
        collector: &collector,
        stats,
        elapsed: started.elapsed(),
        checks: &checks,
        filtered: filtered(&p.filter),
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
        eprintln!("ctdrop: output closed (broken pipe): stopped tracing");
    }
    // On stderr too: with stdout redirected, the operator still sees whether
    // every drop made it out.
    let t = &collector.tally;
    eprintln!(
        "ctdrop: {}stopped after {:.1} s: {} drops recorded, {} events lost, {} flows tracked, {} drops in flows beyond --max-flows",
        if args.service { "info: " } else { "" },
        started.elapsed().as_secs_f64(),
        t.total,
        stats.lost,
        t.flows_tracked(),
        t.flows_untracked
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
            eprintln!(
                "ctdrop: probe to {} failed: {error}",
                c.probe_labels[target]
            );
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
