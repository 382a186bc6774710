//! Count mode: the kernel counts every drop per group (namespace, reason,
//! protocol, conntrack reference, ICMP type/code) and a sample of drops
//! (1 in `--flow-sample` on average) per flow, and sends no record per
//! packet. Each period the group counters are read, the new drops get their
//! cause with the table fill sampled at that moment, and one `counts` line
//! goes out; at the end the per-flow map supplies the top flows, their
//! sampled counts scaled up to estimates and labelled as such.
//!
//! Totals are exact whatever the flood: the group map has few keys, every
//! counted drop is in a group or in `GROUP_MAP_FULL`, and the total is their
//! sum (checked against the kernel's `drop` counters). Per-flow detail is
//! bounded by the sampling and by the kernel map; what did not fit is
//! counted and reported.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::Result;
use tracer_common::{FilterConfig, FlowCount, FlowKey, GroupKey};

use crate::{
    cause::Cause,
    collector::{boot_offset_ns, Collector},
    events::CtFill,
    flows::{cause_index, FlowId, FlowSampling, FlowStat},
    kernel::{
        attach::{KernelStats, LoadOptions, Tracer},
        tier::Mode,
    },
    output::{CountsShown, Sink},
    session::{reasons_word, End, Source},
};

/// The group part of a flow key, to find the causes its drops were given.
fn group_of(k: &FlowKey) -> (u32, u32, u8, u8) {
    (k.netns, k.reason, k.l4_proto, k.has_ct)
}

pub fn flow_id(k: &FlowKey) -> FlowId {
    let addr = |b: [u8; 16]| match k.l3_proto {
        0x0800 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        0x86dd => Some(IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    };
    FlowId {
        netns: (k.netns != 0).then_some(k.netns),
        proto: k.l4_proto,
        src: addr(k.saddr),
        dst: addr(k.daddr),
        sport: k.sport,
        dport: k.dport,
    }
}

/// Turns cumulative kernel group counters into per-period, per-cause drops.
#[derive(Default)]
pub struct GroupCounter {
    seen: HashMap<GroupKey, u64>,
    /// Drops per cause of each (netns, reason, proto, has_ct), for flows.
    causes: HashMap<(u32, u32, u8, u8), [u64; Cause::ALL.len()]>,
}

/// New drops of one period.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Period {
    pub drops: u64,
    pub by_cause: BTreeMap<Cause, u64>,
    pub by_netns: BTreeMap<u32, u64>,
}

impl GroupCounter {
    /// Takes the current cumulative counters; each group's increase gets
    /// the cause `classify` gives it now and goes into the tally.
    pub fn absorb(
        &mut self,
        now: &[(GroupKey, u64)],
        mut classify: impl FnMut(&GroupKey) -> Cause,
        tally: &mut crate::flows::Tally,
    ) -> Period {
        let mut p = Period::default();
        for (k, total) in now {
            let before = self.seen.insert(*k, *total).unwrap_or(0);
            let n = total.saturating_sub(before);
            if n == 0 {
                continue;
            }
            let cause = classify(k);
            tally.add_counted((k.netns != 0).then_some(k.netns), k.reason, cause, n);
            self.causes
                .entry((k.netns, k.reason, k.l4_proto, k.has_ct))
                .or_default()[cause_index(cause)] += n;
            p.drops += n;
            *p.by_cause.entry(cause).or_default() += n;
            *p.by_netns.entry(k.netns).or_default() += n;
        }
        p
    }

    /// A flow's kernel counters as a flow-table entry, drops and bytes
    /// scaled by `one_in` (the sampling rate: each sampled drop stands for
    /// that many); all its drops get the cause most of its group's drops had.
    pub fn flow_stat(&self, k: &FlowKey, c: &FlowCount, one_in: u32) -> FlowStat {
        let mut by_cause = [0u64; Cause::ALL.len()];
        let main = self
            .causes
            .get(&group_of(k))
            .and_then(|per| {
                per.iter()
                    .enumerate()
                    .max_by_key(|(_, n)| **n)
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, _)| i)
            })
            .unwrap_or(cause_index(Cause::Other));
        let drops = c.packets.saturating_mul(one_in as u64);
        by_cause[main] = drops;
        FlowStat {
            drops,
            bytes: c.bytes.saturating_mul(one_in as u64),
            first_ns: c.first_ns,
            last_ns: c.last_ns,
            by_cause,
        }
    }
}

/// The in-kernel counts as a session source: every `every` the group
/// counters are read and one `counts` line goes out; at the end the last
/// period and the per-flow map.
pub struct CountSource {
    every: Duration,
    /// `--flow-sample`: per-flow detail from 1 drop in this many.
    flow_sample: u32,
    groups: GroupCounter,
    tick: Option<tokio::time::Interval>,
    /// When the period being counted began.
    last: Instant,
}

impl CountSource {
    pub fn new(every: Duration, flow_sample: u32) -> CountSource {
        CountSource {
            every,
            flow_sample,
            groups: GroupCounter::default(),
            tick: None,
            last: Instant::now(),
        }
    }

    /// Reads the counters, turns the increases into one period's drops and
    /// shows them.
    fn period(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()> {
        report_period(tracer, &mut self.groups, c, sinks, self.last.elapsed())?;
        self.last = Instant::now();
        Ok(())
    }
}

impl Source for CountSource {
    fn verb(&self) -> &'static str {
        "counting"
    }

    fn configure(&mut self, load: &mut LoadOptions) -> Result<()> {
        // The conntrack-path probes report through the ring, which count
        // mode does not read: it counts at kfree_skb only.
        if !matches!(load.mode, Mode::Auto | Mode::Tracepoint) {
            anyhow::bail!("--count-only counts at the kfree_skb tracepoint only: drop --mode or use --mode tracepoint");
        }
        load.mode = Mode::Tracepoint;
        load.filter.count_only = 1;
        load.count.flow_sample = self.flow_sample;
        // No records cross: the smallest ring the kernel accepts.
        // SAFETY: sysconf only reads a system constant.
        load.ring_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32;
        Ok(())
    }

    fn attached(&mut self, _tracer: &mut Tracer, _c: &mut Collector) -> Result<()> {
        let start = tokio::time::Instant::now() + self.every;
        self.tick = Some(tokio::time::interval_at(start, self.every));
        self.last = Instant::now();
        Ok(())
    }

    fn describe(&self, _c: &Collector, filter: &FilterConfig) -> String {
        format!("tier tracepoint; count mode; {}", reasons_word(filter))
    }

    async fn next(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()> {
        self.tick
            .as_mut()
            .expect("attached before reading")
            .tick()
            .await;
        self.period(tracer, c, sinks)
    }

    fn drain(
        &mut self,
        tracer: &Tracer,
        c: &mut Collector,
        sinks: &mut [Box<dyn Sink>],
    ) -> Result<()> {
        // Counts up to the stop belong to this run: one last period, then
        // the flows, read after detaching so both are final.
        self.period(tracer, c, sinks)?;
        // Heaviest first: with more kernel flows than --max-flows, the ones
        // kept in detail are those the top flows come from.
        let mut flows = tracer.flow_counts()?;
        flows.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(n.packets));
        for (k, n) in &flows {
            c.tally
                .add_flow(flow_id(k), self.groups.flow_stat(k, n, self.flow_sample));
        }
        c.tally.flow_sampling = Some(FlowSampling {
            one_in: self.flow_sample,
            sampled_drops: tracer.stats()?.flow_sampled,
        });
        Ok(())
    }

    fn stopped(&self, end: &End) -> String {
        let t = &end.collector.tally;
        let s = &end.stats;
        // The kernel keeps no separate total (a second counter per drop):
        // every counted drop is in a group, or in GROUP_MAP_FULL.
        let counted = t.total + s.group_map_full;
        if s.group_map_full > 0 {
            // Only when the group map itself was full; say so rather than pretend.
            log::warn!(
                "the kernel counted {counted} drops but only {} were grouped ({} hit a full group map)",
                t.total,
                s.group_map_full
            );
        }
        format!(
            "ctdrop: {}stopped after {:.1} s: {counted} drops counted, 0 events lost, {}{}",
            end.level,
            end.elapsed.as_secs_f64(),
            flow_words(self.flow_sample, t.flows_tracked(), s),
            crate::session::skipped_words(s)
        )
    }
}

/// The per-flow part of the `stopped` line: how many flows, from which
/// drops (all, or a sample), and how many of those found no flow slot.
fn flow_words(one_in: u32, tracked: usize, s: &KernelStats) -> String {
    if one_in <= 1 {
        return format!(
            "{tracked} flows tracked, {} drops in flows beyond the kernel flow map",
            s.flow_map_full
        );
    }
    format!(
        "{tracked} flows tracked from {} drops sampled 1 in {one_in} (flow counts are estimates: sampled counts x {one_in}), {} sampled drops in flows beyond the kernel flow map",
        s.flow_sampled, s.flow_map_full
    )
}

fn report_period(
    tracer: &Tracer,
    groups: &mut GroupCounter,
    c: &mut Collector,
    sinks: &mut [Box<dyn Sink>],
    interval: Duration,
) -> Result<()> {
    let now = tracer.group_counts()?;
    let period = {
        let Collector {
            classifier,
            sampler,
            tally,
            ..
        } = c;
        groups.absorb(
            &now,
            |g| {
                classifier
                    .classify_group(g, (g.netns != 0).then(|| sampler.fill(g.netns)).flatten())
            },
            tally,
        )
    };
    // A namespace turning packets away gets its table snapshotted (rate-
    // limited, off this loop), as in record mode.
    for ns in period.by_netns.keys() {
        if c.tally.count_in(*ns, Cause::ConntrackTableFull) > 0 {
            c.snapshots
                .table_full(*ns, || crate::conntrack::netns::find_namespace(*ns));
        }
    }
    c.poll_snapshots(sinks);
    let by_cause: Vec<(Cause, u64)> = period.by_cause.iter().map(|(c, n)| (*c, *n)).collect();
    let by_netns: Vec<(u32, Option<String>, u64, Option<CtFill>)> = period
        .by_netns
        .iter()
        .map(|(ns, n)| {
            let name = c.sampler.registry.display_name(*ns);
            (*ns, name, *n, c.sampler.fill(*ns))
        })
        .collect();
    let shown = CountsShown {
        wall_ns: crate::probe::mono_ns() + boot_offset_ns(),
        interval_s: interval.as_secs_f64(),
        drops: period.drops,
        drops_total: c.tally.total,
        by_cause: &by_cause,
        by_netns: &by_netns,
    };
    for s in sinks.iter_mut() {
        let _ = s.counts(&shown);
        let _ = s.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cause::Classifier, flows::Tally};

    const NF: u32 = 12;

    fn key(netns: u32, proto: u8, has_ct: u8) -> GroupKey {
        GroupKey {
            netns,
            reason: NF,
            l4_proto: proto,
            has_ct,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    #[test]
    fn periods_count_increases_once_and_classify_with_the_fill_then() {
        let c = Classifier {
            netfilter_drop: Some(NF),
            reinject: None,
            probes: false,
        };
        let mut g = GroupCounter::default();
        let mut t = Tally::new(10);
        let full = CtFill {
            count: 64,
            max: 64,
            sampled: true,
            counted_drop: None,
        };
        let room = CtFill {
            count: 3,
            max: 64,
            sampled: true,
            counted_drop: None,
        };
        let p1 = g.absorb(
            &[(key(7, 17, 0), 1000)],
            |k| c.classify_group(k, Some(full)),
            &mut t,
        );
        assert_eq!(p1.drops, 1000);
        assert_eq!(p1.by_cause[&Cause::ConntrackTableFull], 1000);
        // Same cumulative value: nothing new. Then 10 more while the table had room.
        let p2 = g.absorb(
            &[(key(7, 17, 0), 1000)],
            |k| c.classify_group(k, Some(full)),
            &mut t,
        );
        assert_eq!(p2, Period::default());
        let p3 = g.absorb(
            &[(key(7, 17, 0), 1010), (key(7, 6, 1), 4)],
            |k| c.classify_group(k, Some(room)),
            &mut t,
        );
        assert_eq!(p3.drops, 14);
        assert_eq!(p3.by_cause[&Cause::NetfilterRule], 14);
        assert_eq!(t.total, 1014);
        assert_eq!(t.count_in(7, Cause::ConntrackTableFull), 1000);
        assert_eq!(t.count_in(7, Cause::NetfilterRule), 14);
    }

    #[test]
    fn blocked_pmtu_errors_keep_their_cause_in_groups() {
        let c = Classifier {
            netfilter_drop: Some(NF),
            reinject: None,
            probes: false,
        };
        let mut k = key(7, 1, 0);
        k.icmp_type = 3;
        k.icmp_code = 4;
        assert_eq!(c.classify_group(&k, None), Cause::IcmpErrorBlocked);
        k.has_ct = 1;
        k.icmp_type = 8;
        let full = CtFill {
            count: 64,
            max: 64,
            sampled: true,
            counted_drop: None,
        };
        assert_eq!(c.classify_group(&k, Some(full)), Cause::NetfilterRule);
    }

    #[test]
    fn flows_take_their_groups_main_cause() {
        let c = Classifier {
            netfilter_drop: Some(NF),
            reinject: None,
            probes: false,
        };
        let mut g = GroupCounter::default();
        let mut t = Tally::new(10);
        let full = CtFill {
            count: 64,
            max: 64,
            sampled: true,
            counted_drop: None,
        };
        g.absorb(
            &[(key(7, 17, 0), 50)],
            |k| c.classify_group(k, Some(full)),
            &mut t,
        );
        let mut fk: FlowKey = bytemuck::Zeroable::zeroed();
        fk.netns = 7;
        fk.reason = NF;
        fk.l4_proto = 17;
        fk.l3_proto = 0x0800;
        fk.saddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        fk.dport = 53;
        let sampled = FlowCount {
            packets: 3,
            bytes: 90,
            first_ns: 1,
            last_ns: 2,
        };
        let s = g.flow_stat(&fk, &sampled, 1);
        assert_eq!(s.main_cause(), Cause::ConntrackTableFull);
        assert_eq!((s.drops, s.bytes), (3, 90));
        // Sampled 1 in 16: each sampled drop stands for 16.
        let s = g.flow_stat(&fk, &sampled, 16);
        assert_eq!((s.drops, s.bytes), (48, 1440));
        assert_eq!(s.by_cause[cause_index(Cause::ConntrackTableFull)], 48);
        let id = flow_id(&fk);
        assert_eq!(id.src, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(id.dport, 53);
        // A flow whose group was never read is not given a guessed cause.
        fk.netns = 8;
        assert_eq!(
            g.flow_stat(
                &fk,
                &FlowCount {
                    packets: 1,
                    ..Default::default()
                },
                16
            )
            .main_cause(),
            Cause::Other
        );
    }
}
