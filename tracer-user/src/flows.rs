//! The bounded per-flow table and the run's tallies.
//!
//! Totals (by cause, by namespace) are always exact. Per-flow detail is kept
//! for at most `max_flows` flows; flows beyond that are counted as
//! `flows_untracked`, never dropped silently.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use crate::{cause::Cause, events::DropEvent};

/// Default cap: 100k flows is ~15 MB and covers any top-N an operator reads.
pub const DEFAULT_MAX_FLOWS: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    pub netns: Option<u32>,
    pub proto: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Ports for TCP/UDP; (id, 0) for ICMP echo; zeros otherwise.
    pub sport: u16,
    pub dport: u16,
}

impl FlowId {
    pub fn of(ev: &DropEvent) -> FlowId {
        let (proto, src, dst, ports) = match &ev.flow {
            Some(f) => (f.proto, Some(f.src), Some(f.dst), f.ports),
            None => (0, None, None, None),
        };
        let (sport, dport) = match (ports, ev.icmp.and_then(|i| i.echo)) {
            (Some(p), _) => p,
            (None, Some((id, _))) => (id, 0),
            _ => (0, 0),
        };
        FlowId { netns: ev.netns, proto, src, dst, sport, dport }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowStat {
    pub drops: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub by_cause: [u64; Cause::ALL.len()],
}

impl FlowStat {
    /// The cause with the most drops in this flow.
    pub fn main_cause(&self) -> Cause {
        let (i, _) = self.by_cause.iter().enumerate().max_by_key(|(_, n)| **n).unwrap();
        Cause::ALL[i]
    }
}

#[derive(Clone, Debug, Default)]
pub struct NetnsTally {
    pub total: u64,
    pub by_cause: [u64; Cause::ALL.len()],
}

pub fn cause_index(c: Cause) -> usize {
    Cause::ALL.iter().position(|x| *x == c).unwrap()
}

#[derive(Debug)]
pub struct Tally {
    pub total: u64,
    pub by_cause: [u64; Cause::ALL.len()],
    pub by_netns: BTreeMap<Option<u32>, NetnsTally>,
    pub by_reason: BTreeMap<u32, u64>,
    pub by_ifindex: BTreeMap<(Option<u32>, u32), u64>,
    /// foldhash: several times cheaper than SipHash on this per-drop path,
    /// and still seeded per process, so crafted flows cannot force collisions.
    flows: HashMap<FlowId, FlowStat, foldhash::fast::RandomState>,
    max_flows: usize,
    pub flows_untracked: u64,
}

impl Tally {
    pub fn new(max_flows: usize) -> Tally {
        Tally {
            total: 0,
            by_cause: [0; Cause::ALL.len()],
            by_netns: BTreeMap::new(),
            by_reason: BTreeMap::new(),
            by_ifindex: BTreeMap::new(),
            flows: HashMap::default(),
            max_flows,
            flows_untracked: 0,
        }
    }

    pub fn record(&mut self, ev: &DropEvent, cause: Cause) {
        let ci = cause_index(cause);
        self.total += 1;
        self.by_cause[ci] += 1;
        let ns = self.by_netns.entry(ev.netns).or_default();
        ns.total += 1;
        ns.by_cause[ci] += 1;
        *self.by_reason.entry(ev.reason).or_default() += 1;
        if let Some(ifx) = ev.ifindex {
            *self.by_ifindex.entry((ev.netns, ifx)).or_default() += 1;
        }
        let id = FlowId::of(ev);
        let len = self.flows.len();
        let stat = match self.flows.get_mut(&id) {
            Some(s) => s,
            None if len >= self.max_flows => {
                self.flows_untracked += 1;
                return;
            }
            None => self.flows.entry(id).or_insert_with(|| FlowStat { first_ns: ev.ts_ns, ..Default::default() }),
        };
        stat.drops += 1;
        stat.bytes += ev.skb_len as u64;
        stat.last_ns = ev.ts_ns;
        stat.by_cause[ci] += 1;
    }

    /// Count mode: `n` drops the kernel counted in one (namespace, reason)
    /// group, all of one cause. Totals only; flows come from [`Self::add_flow`].
    pub fn add_counted(&mut self, netns: Option<u32>, reason: u32, cause: Cause, n: u64) {
        let ci = cause_index(cause);
        self.total += n;
        self.by_cause[ci] += n;
        let ns = self.by_netns.entry(netns).or_default();
        ns.total += n;
        ns.by_cause[ci] += n;
        *self.by_reason.entry(reason).or_default() += n;
    }

    /// Count mode: one flow's kernel counters into the per-flow table, within
    /// the cap like [`Self::record`]; the totals are not touched.
    pub fn add_flow(&mut self, id: FlowId, stat: FlowStat) {
        if let Some(s) = self.flows.get_mut(&id) {
            s.drops += stat.drops;
            s.bytes += stat.bytes;
            s.first_ns = s.first_ns.min(stat.first_ns);
            s.last_ns = s.last_ns.max(stat.last_ns);
            for (a, b) in s.by_cause.iter_mut().zip(stat.by_cause) {
                *a += b;
            }
        } else if self.flows.len() >= self.max_flows {
            self.flows_untracked += stat.drops;
        } else {
            self.flows.insert(id, stat);
        }
    }

    pub fn count(&self, c: Cause) -> u64 {
        self.by_cause[cause_index(c)]
    }

    pub fn count_in(&self, netns: u32, c: Cause) -> u64 {
        self.by_netns.get(&Some(netns)).map(|t| t.by_cause[cause_index(c)]).unwrap_or(0)
    }

    /// Every flow kept in detail, in no particular order.
    pub fn flows(&self) -> impl Iterator<Item = (&FlowId, &FlowStat)> {
        self.flows.iter()
    }

    pub fn flows_tracked(&self) -> usize {
        self.flows.len()
    }

    /// Flows with the most drops, most first; ties broken by flow for a
    /// stable order.
    pub fn top_flows(&self, n: usize) -> Vec<(&FlowId, &FlowStat)> {
        let mut v: Vec<_> = self.flows.iter().collect();
        v.sort_by(|a, b| b.1.drops.cmp(&a.1.drops).then_with(|| a.0.cmp(b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Flow;
    use tracer_common::source;

    fn ev(dport: u16, netns: u32) -> DropEvent {
        DropEvent {
            ts_ns: dport as u64,
            cpu: 0,
            reason: 12,
            location: 0,
            skb: 0,
            source: source::KFREE_SKB,
            detail: 0,
            netns: Some(netns),
            ifindex: Some(2),
            skb_len: 100,
            flow: Some(Flow { src: "198.18.0.1".parse().unwrap(), dst: "198.18.0.2".parse().unwrap(), proto: 17, ports: Some((9, dport)) }),
            icmp: None,
            ct: None,
            ct_fill: None,
            truncated: false,
            header: None,
        }
    }

    #[test]
    fn totals_stay_exact_past_the_flow_cap() {
        let mut t = Tally::new(2);
        for p in 0..5 {
            t.record(&ev(p, 1), Cause::ConntrackTableFull);
        }
        t.record(&ev(0, 1), Cause::NetfilterRule);
        assert_eq!(t.total, 6);
        assert_eq!(t.count(Cause::ConntrackTableFull), 5);
        assert_eq!(t.count_in(1, Cause::NetfilterRule), 1);
        assert_eq!(t.flows_tracked(), 2);
        assert_eq!(t.flows_untracked, 3);
    }

    #[test]
    fn counted_groups_and_flows_keep_totals_apart() {
        let mut t = Tally::new(1);
        t.add_counted(Some(1), 12, Cause::ConntrackTableFull, 1000);
        t.add_counted(Some(2), 12, Cause::NetfilterRule, 5);
        let stat = |drops| FlowStat { drops, by_cause: [drops, 0, 0, 0, 0, 0], ..Default::default() };
        t.add_flow(FlowId::of(&ev(1, 1)), stat(600));
        t.add_flow(FlowId::of(&ev(1, 1)), stat(100));
        t.add_flow(FlowId::of(&ev(2, 1)), stat(300));
        assert_eq!(t.total, 1005);
        assert_eq!(t.count_in(1, Cause::ConntrackTableFull), 1000);
        assert_eq!(t.count_in(2, Cause::NetfilterRule), 5);
        assert_eq!(t.flows_tracked(), 1);
        assert_eq!(t.top_flows(1)[0].1.drops, 700);
        // The second flow did not fit: its drops are named, not lost.
        assert_eq!(t.flows_untracked, 300);
    }

    #[test]
    fn top_flows_orders_by_drops() {
        let mut t = Tally::new(100);
        for _ in 0..3 {
            t.record(&ev(7, 1), Cause::ConntrackTableFull);
        }
        t.record(&ev(8, 1), Cause::NetfilterRule);
        let top = t.top_flows(1);
        assert_eq!(top[0].0.dport, 7);
        assert_eq!(top[0].1.drops, 3);
        assert_eq!(top[0].1.main_cause(), Cause::ConntrackTableFull);
        assert_eq!(top[0].1.first_ns, 7);
    }
}
