//! A tracing session: attach, drain, classify, show, summarize.

use std::{
    collections::BTreeMap,
    io::Write,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracer_common::FilterConfig;

use crate::{
    cause::{Cause, Classifier},
    cli::TraceArgs,
    conntrack::{netns::NsRegistry, stats::CtCounters, FillSampler},
    events::{decode, ring::RingReader, DropEvent},
    flows::Tally,
    kernel::{
        attach::{validate_ring_size, KernelStats, LoadOptions, Tracer},
        btf::{DropReasons, KernelBtf},
        capabilities,
    },
    output::{human, json::DropJson, symbols::Symbols, Shown},
};

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, to put kernel timestamps on the wall.
pub fn boot_offset_ns() -> u64 {
    let now = |clk| {
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clk, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    now(libc::CLOCK_REALTIME).saturating_sub(now(libc::CLOCK_MONOTONIC))
}

/// Everything found out before attaching.
pub struct Prepared {
    pub btf: KernelBtf,
    pub reasons: DropReasons,
    pub filter: FilterConfig,
    pub ring_size: u32,
    pub conntrack_loaded: bool,
}

pub fn prepare(args: &TraceArgs) -> Result<Prepared> {
    let ring_size = validate_ring_size(args.ring_size)?;
    capabilities::require_root()?;
    capabilities::require_btf(&args.btf)?;
    let btf = KernelBtf::open(&args.btf)?;
    let reasons = DropReasons::from_btf(&btf)?;
    let nf = reasons.value("NETFILTER_DROP");
    let mut filter: FilterConfig = bytemuck::Zeroable::zeroed();
    filter.netfilter_drop_reason = nf.unwrap_or(u32::MAX);
    filter.all_reasons = args.all_reasons as u8;
    if let Some(ns) = &args.netns {
        filter.netns = crate::conntrack::netns::resolve_netns_arg(ns)?;
    }
    filter.l4_proto = args.proto.unwrap_or(0);
    filter.port = args.port.unwrap_or(0);
    match args.host {
        Some(std::net::IpAddr::V4(a)) => {
            filter.host[..4].copy_from_slice(&a.octets());
            filter.host_len = 4;
        }
        Some(std::net::IpAddr::V6(a)) => {
            filter.host = a.octets();
            filter.host_len = 16;
        }
        None => {}
    }
    Ok(Prepared { btf, reasons, filter, ring_size, conntrack_loaded: capabilities::conntrack_loaded() })
}

/// Kernel counter increase in one namespace against what we recorded there.
pub struct CounterCheck {
    pub netns: u32,
    pub netns_name: Option<String>,
    pub delta: CtCounters,
    pub table_full: u64,
    pub insert_failed: u64,
}

impl CounterCheck {
    /// Every conntrack drop the kernel counted got exactly one record.
    pub fn agrees(&self) -> bool {
        self.delta.get("drop") == self.table_full + self.insert_failed
    }
}

pub struct Collector {
    pub classifier: Classifier,
    pub reasons: DropReasons,
    pub sampler: FillSampler,
    pub symbols: Symbols,
    pub tally: Tally,
    pub boot_offset: u64,
    pub decode_errors: u64,
    baselines: BTreeMap<u32, CtCounters>,
}

impl Collector {
    pub fn new(p: &Prepared, max_flows: usize) -> Collector {
        let mut registry = NsRegistry::new();
        registry.discover_all();
        let mut sampler = FillSampler::new(registry, Duration::from_millis(50));
        let mut baselines = BTreeMap::new();
        for ns in sampler.registry.inodes() {
            if let Some(c) = sampler.counters(ns) {
                baselines.insert(ns, c);
            }
        }
        Collector {
            classifier: Classifier { netfilter_drop: p.reasons.value("NETFILTER_DROP") },
            reasons: DropReasons::from_pairs(p.reasons.pairs().map(|(v, n)| (n.to_string(), v))),
            sampler,
            symbols: Symbols::load(),
            tally: Tally::new(max_flows),
            boot_offset: boot_offset_ns(),
            decode_errors: 0,
            baselines,
        }
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
                ev.ct_fill = self.sampler.fill(ns);
            }
        }
        let cause = self.classifier.classify(&ev);
        self.tally.record(&ev, cause);
        Some((ev, cause))
    }

    pub fn show<R>(&mut self, ev: &DropEvent, cause: Cause, f: impl FnOnce(&Shown) -> R) -> R {
        let reason = self.reasons.name(ev.reason);
        let location = self.symbols.resolve(ev.location).to_string();
        let (name, ifname) = match ev.netns.and_then(|ns| self.sampler.registry.get(ns)) {
            Some(h) => (h.name.clone(), ev.ifindex.and_then(|i| h.ifname(i))),
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
        f(&shown)
    }

    /// Kernel counters now against the baselines, for every namespace that
    /// had a baseline and either saw drops here or counted some itself.
    pub fn counter_checks(&mut self) -> Vec<CounterCheck> {
        let mut out = Vec::new();
        let nss: Vec<u32> = self.baselines.keys().copied().collect();
        for ns in nss {
            let Some(now) = self.sampler.counters(ns) else { continue };
            let delta = now.delta(&self.baselines[&ns]);
            let table_full = self.tally.count_in(ns, Cause::ConntrackTableFull);
            let insert_failed = self.tally.count_in(ns, Cause::ConntrackInsertFailed);
            if delta.get("drop") == 0 && table_full + insert_failed == 0 {
                continue;
            }
            let netns_name = self.sampler.registry.get(ns).and_then(|h| h.name.clone());
            out.push(CounterCheck { netns: ns, netns_name, delta, table_full, insert_failed });
        }
        out
    }
}

pub async fn run_live(args: &crate::cli::LiveArgs) -> Result<()> {
    let p = prepare(&args.trace)?;
    if !p.conntrack_loaded {
        eprintln!("ctdrop: nf_conntrack is not loaded on this host: no conntrack drops can happen; tracing other netfilter drops");
    }
    if let Err(e) = capabilities::ensure_tracefs() {
        eprintln!("ctdrop: note: {e:#}");
    }
    let mut collector = Collector::new(&p, args.trace.max_flows);
    let mut tracer = Tracer::load(&LoadOptions {
        btf_path: &args.trace.btf,
        offsets: p.btf.offsets()?,
        filter: p.filter,
        ring_size: p.ring_size,
    })?;
    let mut ring = RingReader::new(tracer.take_ring()?)?;
    eprintln!(
        "ctdrop: attached tp_btf/kfree_skb in {} ms (tier tracepoint; {}); Ctrl-C to stop",
        tracer.attach_time.as_millis(),
        if p.filter.all_reasons != 0 { "all drop reasons" } else { "netfilter drops" }
    );
    let started = Instant::now();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut line = String::with_capacity(256);
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_lost = 0u64;
    let json = args.json;

    let emit = |collector: &mut Collector, bytes: &[u8], out: &mut dyn Write, line: &mut String| {
        let Some((ev, cause)) = collector.ingest(bytes) else { return };
        line.clear();
        collector.show(&ev, cause, |s| {
            if json {
                *line = serde_json::to_string(&DropJson::from_shown(s)).unwrap_or_default();
            } else {
                human::drop_line(s, line);
            }
        });
        let _ = writeln!(out, "{line}");
    };

    loop {
        tokio::select! {
            r = ring.wait_and_drain(|b| emit(&mut collector, b, &mut out, &mut line)) => {
                r?;
                let _ = out.flush();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sleep_until(deadline) => break,
            _ = tick.tick() => {
                let s = tracer.stats()?;
                if s.lost > last_lost {
                    eprintln!("ctdrop: warning: {} events lost in the last second (ring buffer full): raise --ring-size", s.lost - last_lost);
                    last_lost = s.lost;
                }
            }
        }
    }
    // Records already in the ring belong to this run.
    ring.drain(|b| emit(&mut collector, b, &mut out, &mut line));
    let stats = tracer.stats()?;
    drop(tracer);
    let checks = collector.counter_checks();
    let summary = Summary { collector: &collector, stats, elapsed: started.elapsed(), checks: &checks, filtered: filtered(&p.filter) };
    if json {
        writeln!(out, "{}", serde_json::to_string(&summary.to_json())?)?;
    } else {
        summary.write_human(&mut out)?;
    }
    out.flush()?;
    Ok(())
}

fn filtered(f: &FilterConfig) -> bool {
    f.netns != 0 || f.l4_proto != 0 || f.port != 0 || f.host_len != 0
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub struct Summary<'a> {
    pub collector: &'a Collector,
    pub stats: KernelStats,
    pub elapsed: Duration,
    pub checks: &'a [CounterCheck],
    /// A filter was set: counts cover only matching packets.
    pub filtered: bool,
}

impl Summary<'_> {
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.collector.tally;
        let by_cause: serde_json::Map<String, serde_json::Value> =
            Cause::ALL.iter().map(|c| (c.as_str().to_string(), t.count(*c).into())).collect();
        let by_netns: serde_json::Map<String, serde_json::Value> = t
            .by_netns
            .iter()
            .map(|(ns, n)| (ns.map(|x| x.to_string()).unwrap_or_else(|| "unknown".into()), n.total.into()))
            .collect();
        let top: Vec<serde_json::Value> = t
            .top_flows(10)
            .into_iter()
            .map(|(id, s)| {
                serde_json::json!({
                    "netns": id.netns, "proto": crate::events::decode::proto_name(id.proto),
                    "src": id.src.map(|a| a.to_string()), "dst": id.dst.map(|a| a.to_string()),
                    "sport": id.sport, "dport": id.dport, "drops": s.drops, "cause": s.main_cause().as_str(),
                    "first_ts_ns": s.first_ns + self.collector.boot_offset, "last_ts_ns": s.last_ns + self.collector.boot_offset,
                })
            })
            .collect();
        let checks: Vec<serde_json::Value> = self
            .checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "netns": c.netns, "netns_name": c.netns_name,
                    "drop": c.delta.get("drop"), "insert_failed": c.delta.get("insert_failed"),
                    "early_drop": c.delta.get("early_drop"), "entries": c.delta.entries(),
                    "table_full_records": c.table_full, "insert_failed_records": c.insert_failed,
                    "agree": c.agrees(),
                })
            })
            .collect();
        serde_json::json!({
            "kind": "summary",
            "duration_s": self.elapsed.as_secs_f64(),
            "drops_total": t.total,
            "drops_by_cause": by_cause,
            "drops_by_netns": by_netns,
            "events_lost": self.stats.lost,
            "events_sent": self.stats.sent,
            "decode_errors": self.collector.decode_errors,
            "flows_tracked": t.flows_tracked(),
            "flows_untracked": t.flows_untracked,
            "top_flows": top,
            "kernel_counters": checks,
            "filtered": self.filtered,
        })
    }

    pub fn write_human(&self, out: &mut dyn Write) -> Result<()> {
        let t = &self.collector.tally;
        writeln!(out)?;
        writeln!(
            out,
            "ctdrop summary: {:.1} s, {} drops, {} events lost{}",
            self.elapsed.as_secs_f64(),
            t.total,
            self.stats.lost,
            if self.stats.lost > 0 { " (ring buffer full: raise --ring-size)" } else { "" }
        )?;
        writeln!(out, "by cause:")?;
        for c in Cause::ALL {
            let n = t.count(c);
            if n > 0 {
                writeln!(out, "  {:<26} {n:>10}", c.as_str())?;
            }
        }
        if !t.by_netns.is_empty() {
            writeln!(out, "by namespace:")?;
            for (ns, n) in &t.by_netns {
                writeln!(out, "  {:<26} {:>10}", ns.map(|x| x.to_string()).unwrap_or_else(|| "unknown".into()), n.total)?;
            }
        }
        let top = t.top_flows(5);
        if !top.is_empty() {
            writeln!(out, "top flows:")?;
            for (id, s) in top {
                let ports = if id.sport != 0 || id.dport != 0 { format!(" {} -> {}", id.sport, id.dport) } else { String::new() };
                writeln!(
                    out,
                    "  {:>8}  {} {} -> {}{}  {}",
                    s.drops,
                    crate::events::decode::proto_name(id.proto),
                    id.src.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                    id.dst.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                    ports,
                    s.main_cause()
                )?;
            }
        }
        if t.flows_untracked > 0 {
            writeln!(out, "  ({} drops in flows beyond --max-flows, counted in totals only)", t.flows_untracked)?;
        }
        for c in self.checks {
            let name = c.netns_name.clone().unwrap_or_else(|| c.netns.to_string());
            let verdict = if c.agrees() {
                "agrees".to_string()
            } else if self.filtered {
                "differs (a filter is set: only matching packets were traced)".to_string()
            } else {
                format!("DIFFERS: kernel counted {} conntrack drops, ctdrop attributed {}", c.delta.get("drop"), c.table_full + c.insert_failed)
            };
            writeln!(
                out,
                "kernel counters in {name}: drop +{}, insert_failed +{}, early_drop +{}, entries {} -- {verdict}",
                c.delta.get("drop"),
                c.delta.get("insert_failed"),
                c.delta.get("early_drop"),
                c.delta.entries()
            )?;
        }
        Ok(())
    }
}
