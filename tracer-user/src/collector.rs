//! The collector: decode, classify (cause.rs), fill and counters
//! (conntrack/), probe matching (probe/) for every drop a source hands in,
//! and what is known before attaching (`prepare`).

use std::{
    collections::{BTreeMap, HashMap},
    rc::Rc,
    time::Duration,
};

use anyhow::Result;
use tracer_common::{flags, source, FilterConfig};

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
    events::{decode, decode::record_flags, DropEvent},
    flows::Tally,
    kernel::{
        attach::validate_ring_size,
        btf::{DropReasons, KernelBtf},
        capabilities,
    },
    model::DropLine,
    output::{symbols::Symbols, Shown, Sink},
    probe::{Matcher, SeenDrop, TargetSpec, Wire},
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
    /// Struct offsets for the kernel programs. The BTF they come from is
    /// not kept here: `prepare` hands it back beside, to load the programs
    /// with and drop then (it would be most of ctdrop's memory all run).
    pub offsets: tracer_common::Offsets,
    pub reasons: DropReasons,
    pub filter: FilterConfig,
    pub ring_size: u32,
    pub conntrack_loaded: bool,
}

/// `capture_headers`: the kernel appends the packet's first network-header
/// bytes to each record (for pcap-ng export; costs ring space and a copy).
pub fn prepare(args: &TraceArgs, capture_headers: bool) -> Result<(Prepared, KernelBtf)> {
    let ring_size = validate_ring_size(args.ring_size)?;
    capabilities::require("tracing", capabilities::TRACING)?;
    capabilities::require_btf(&args.btf)?;
    let btf = KernelBtf::open(&args.btf)?;
    let reasons = DropReasons::from_btf(&btf)?;
    let offsets = btf.offsets()?;
    let nf = reasons.value("NETFILTER_DROP");
    let mut filter: FilterConfig = bytemuck::Zeroable::zeroed();
    filter.netfilter_drop_reason = nf.unwrap_or(u32::MAX);
    filter.all_reasons = args.all_reasons as u8;
    // Only where it fits the byte (it is 2 on every kernel with reasons).
    filter.reinject_reason = reasons
        .value("NOT_SPECIFIED")
        .and_then(|v| u8::try_from(v).ok())
        .unwrap_or(0);
    filter.capture_headers = capture_headers as u8;
    crate::filter::fill(&args.filters(), &mut filter)?;
    let p = Prepared {
        offsets,
        reasons,
        filter,
        ring_size,
        conntrack_loaded: capabilities::conntrack_loaded(),
    };
    Ok((p, btf))
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
    /// Seeds of the per-CPU counter witness that moved during the attach.
    pub cpu_stat_unsure: Option<std::sync::Arc<crate::kernel::cpustat::Unsure>>,
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
                reinject: (p.filter.reinject_reason != 0)
                    .then_some(p.filter.reinject_reason as u32),
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
            cpu_stat_unsure: None,
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
        // A per-CPU counter decision against a baseline not known to hold
        // may rest on a drop nobody saw: the totals decide it.
        if record_flags(bytes) & flags::CT_STAT_BASELINE != 0
            && self
                .cpu_stat_unsure
                .as_ref()
                .is_some_and(|u| u.contains(ev.netns.unwrap_or(0), ev.cpu))
        {
            ev.source = source::CT_STAT_UNSEEN;
        }
        if ev.ct_fill.is_none() {
            if let Some(ns) = ev.netns {
                // A netfilter drop of a packet without an entry may be a
                // conntrack drop: the hook marks know where they cover the
                // namespace; elsewhere ask the namespace's drop counter.
                let mut candidate = ev.ct.is_none()
                    && !self.classifier.probes
                    && Some(ev.reason) == self.classifier.netfilter_drop
                    && !crate::cause::decided_in_kernel(ev.source);
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
            log::warn!("{e}");
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
